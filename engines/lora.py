"""
engines/lora.py -- LoRA students on one shared baseline (soar.py --student-lora RANK).

A LoRA student is the frozen baseline plus, in every linear layer of its decoder blocks (PEFT's
"all-linear": q k v o gate up down; not the LM head), a low-rank update

    W' = W + (alpha / rank) * B @ A,    A [rank, in] random, B [out, rank] zero at the start,

so a new student is exactly its baseline. W' is formed as a weight (one small matmul per layer and
forward) and applied by the layer's own F.linear; so the lean fast path (engines/lean.py reads
`.weight`) and HF's forward both run a LoRA student unchanged, gradients reach A and B through W',
and a merged model (W' written into the weights) gives the same logits bit for bit.

One baseline in memory serves every student: `attach` wraps its layers once, `use(model, adapter)`
points them at one student's A and B, `off(model)` switches the adapter off (the KL reference is
the baseline itself: no second copy), `detach` unwraps. Saved in PEFT's format
(adapter_config.json + adapter_model.safetensors), which vLLM's multi-LoRA engine loads.

Evidence for the defaults: "LoRA Without Regret" (Schulman et al., Thinking Machines, 2025) finds
LoRA matching full fine-tuning for policy-gradient RL down to rank 1, with all layers adapted,
alpha = 32 at every rank (the 1/rank scale keeps the best learning rate nearly rank-independent)
and a learning rate about 10x the full-fine-tuning one; hence ALPHA and LR_SCALE.
"""
import contextlib
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

ALPHA = 32.0
LR_SCALE = 10.0  # a LoRA student's default learning rate: this times the full-fine-tuning one
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus the active student's low-rank update (none: the base layer)."""

    def __init__(self, base):
        super().__init__()
        self.base, self.scale, self.enabled = base, 0.0, True
        self.register_parameter("A", None)
        self.register_parameter("B", None)

    @property
    def weight(self):
        if self.A is None or not self.enabled:
            return self.base.weight
        return self.base.weight + self.scale * (self.B @ self.A)

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def _targets(model):
    """(name, module) of every adapted linear layer, in a fixed order."""
    return [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS
            and isinstance(m, (nn.Linear, LoRALinear))]


class Adapter:
    """One student: an (A, B) pair per adapted layer, trainable. Made from the model it will run on."""

    def __init__(self, model, rank, alpha=ALPHA, generator=None):
        self.rank, self.alpha, self.tensors = rank, alpha, {}
        for name, m in _targets(model):
            w = m.base.weight if isinstance(m, LoRALinear) else m.weight
            # PEFT's init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a = sqrt(5)), B = 0
            bound = 1 / math.sqrt(w.shape[1])
            a = (torch.rand(rank, w.shape[1], generator=generator) * 2 - 1) * bound
            self.tensors[name] = (nn.Parameter(a.to(w)), nn.Parameter(torch.zeros(w.shape[0], rank).to(w)))

    def parameters(self):
        return [p for ab in self.tensors.values() for p in ab]

    def version(self):
        """Changes with every in-place update of its tensors (optimiser step, load)."""
        return sum(p._version for p in self.parameters())

    def state(self):
        """Its tensors, detached on CPU (what a finished student leaves behind; merge_into takes it)."""
        return dict(rank=self.rank, alpha=self.alpha, tensors={
            n: (a.detach().cpu().clone(), b.detach().cpu().clone()) for n, (a, b) in self.tensors.items()})

    def load(self, state):
        with torch.no_grad():
            for n, (a, b) in self.tensors.items():
                a.copy_(state["tensors"][n][0])
                b.copy_(state["tensors"][n][1])
        return self


def attach(model):
    """Wrap model's adapted layers (in place, the weights shared) and freeze all of its parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in _targets(model):
        if not isinstance(m, LoRALinear):
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, LoRALinear(m))
    return model


def detach(model):
    """Undo attach: the plain layers back, trainable again."""
    for name, m in _targets(model):
        if isinstance(m, LoRALinear):
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, m.base)
    for p in model.parameters():
        p.requires_grad_(True)
    model.lora_adapter = None
    return model


def use(model, adapter):
    """Point the wrapped layers at adapter's tensors (None: the baseline alone)."""
    for name, m in _targets(model):
        m.A, m.B = (None, None) if adapter is None else adapter.tensors[name]
        m.scale = 0.0 if adapter is None else adapter.alpha / adapter.rank
    model.lora_adapter = adapter
    return model


def current(model):
    """The adapter model runs now (None: none)."""
    return getattr(model, "lora_adapter", None)


def active(model):
    """Whether model runs a student's adapter now (it is attached and pointed at one)."""
    return current(model) is not None


@contextlib.contextmanager
def off(model):
    """The baseline's own forward inside (the adapter switched off): the KL reference."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


def plain_state_dict(model, merge=True):
    """The model's state_dict under its plain names (attached or not); with merge, each adapted
    weight with the active adapter merged in (W + (alpha / rank) * B @ A, the very expression the
    forward computes), else the baseline's own."""
    out = {}
    for k, v in model.state_dict().items():
        if not k.endswith((".A", ".B")) or not isinstance(model.get_submodule(k.rsplit(".", 1)[0]), LoRALinear):
            out[k.replace(".base.", ".")] = v
    if merge:
        for name, m in _targets(model):
            if isinstance(m, LoRALinear) and m.A is not None:
                out[name + ".weight"] = m.weight.detach()
    return out


def merge_into(model, state):
    """Write an Adapter.state() into a plain model's weights: W <- W + (alpha / rank) * B @ A,
    computed as the forward does, so the merged model's logits equal the baseline + adapter's."""
    scale = state["alpha"] / state["rank"]
    with torch.no_grad():
        for name, (a, b) in state["tensors"].items():
            w = model.get_submodule(name).weight
            w.copy_(w + scale * (b.to(w) @ a.to(w)))
    return model


def is_state(state):
    """Whether a student's saved state is an Adapter.state() (else a full state_dict)."""
    return isinstance(state, dict) and "tensors" in state and "rank" in state


def save_peft(adapter, path, base_name=""):
    """adapter in PEFT's LoRA format: adapter_config.json + adapter_model.safetensors."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {}
    for n, (a, b) in adapter.tensors.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"base_model.model.{n}.lora_B.weight"] = b.detach().cpu().contiguous()
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    cfg = dict(peft_type="LORA", task_type="CAUSAL_LM", r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=0.0,
               bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=False, modules_to_save=None,
               target_modules=sorted({n.rsplit(".", 1)[-1] for n in adapter.tensors}), base_model_name_or_path=base_name)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


def load_peft(model, path):
    """An Adapter for model (attached or not) from a save_peft directory."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    t = load_file(os.path.join(path, "adapter_model.safetensors"))
    ad = Adapter(model, cfg["r"], cfg["lora_alpha"])
    return ad.load(dict(tensors={n: (t[f"base_model.model.{n}.lora_A.weight"], t[f"base_model.model.{n}.lora_B.weight"])
                                 for n in ad.tensors}))


@contextlib.contextmanager
def merged(model):
    """model as a plain one inside, each wrapped layer replaced by an nn.Linear holding W' (for
    save_pretrained); the wrapping comes back after. Costs one copy of the adapted weights."""
    swapped = []
    for name, m in _targets(model):
        if isinstance(m, LoRALinear):
            parent, child = name.rsplit(".", 1)
            plain = nn.Linear(m.base.in_features, m.base.out_features, bias=m.base.bias is not None,
                              device=m.base.weight.device, dtype=m.base.weight.dtype)
            with torch.no_grad():
                plain.weight.copy_(m.weight)
                if m.base.bias is not None:
                    plain.bias.copy_(m.base.bias)
            setattr(model.get_submodule(parent), child, plain)
            swapped.append((parent, child, m))
    try:
        yield model
    finally:
        for parent, child, m in swapped:
            setattr(model.get_submodule(parent), child, m)

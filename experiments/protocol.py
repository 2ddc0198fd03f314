"""
experiments/protocol.py -- the SOAR paper's evaluation protocol (arXiv 2601.18778), one command per method.

    # pass@k, k in 1,4,8,16,32, from 32 samples per D_test problem, for any model
    python experiments/protocol.py passk --model toy/model --test toy/hard/test.jsonl
    # PS: the promoted student with the best greedy accuracy on D_train, evaluated directly
    python experiments/protocol.py ps --run runs/soar-toy-seed0
    # PQ: a fresh base student trained on PQ plus D_train (curriculum or mixed)
    python experiments/protocol.py pq --run runs/soar-toy-seed0 --mode mixed
    # teacher evaluation: 128 valid questions from a teacher, then a fresh student as for PQ
    python experiments/protocol.py teacher --teacher runs/soar-toy-seed0/teacher --base toy/model
    # Hard-Only: a fresh student on D_train alone
    python experiments/protocol.py hard-only --base toy/model

Fresh students follow the checkpoint rule: the training reward (batch accuracy) is smoothed
with a centred moving average; the first step whose slope falls below 15% of the maximum is
the checkpoint, and test pass@k is averaged over the evaluations in the window after it.
The paper's scale is --smooth 25 --after 200 --steps 1500 --synthetic-steps 64; the defaults
here are the toy world's. Each command writes OUT/result.json and OUT/curve.jsonl.
"""
import argparse
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluate import checkpoint_step, load_data, pass_at_k_table, success_counts  # noqa: E402
from generate import STUDENT_PROMPTS, load_model, load_tokenizer, model_style  # noqa: E402
from train_student import RLConfig, train  # noqa: E402
from train_teacher import sample_teacher_datasets  # noqa: E402

KS = (1, 4, 8, 16, 32)


def passk(model, tok, test, style, samples, max_new_tokens):
    counts = success_counts(model, tok, test, samples, style, max_new_tokens=max_new_tokens, batch_size=128,
                            progress=False)
    return pass_at_k_table(counts, samples, KS)


def fresh_student(base, synthetic, real, mode, a, test, style):
    """Train a fresh copy of `base` and return (result, curve) under the checkpoint rule.

    mode: 'curriculum' (synthetic only for the first a.synthetic_steps, then real only),
          'mixed' (both throughout) or 'real' (Hard-Only)."""
    torch.manual_seed(a.seed)
    tok, model = load_tokenizer(base), load_model(base)
    both = synthetic + real
    pool = {"curriculum": lambda s: synthetic if s < a.synthetic_steps else real,
            "mixed": lambda s: both, "real": lambda s: real}[mode]
    if mode != "real" and not synthetic:
        raise ValueError("no synthetic questions to train on")
    cfg = RLConfig(lr=a.lr, kl_coef=a.kl_coef, questions=a.questions, group=a.group,
                   max_new_tokens=a.max_new_tokens, style=style)
    curve = []

    def on_step(stats, *_):
        row = {"step": stats["step"], "train_accuracy": stats["accuracy"], "reward": stats["reward"]}
        if (stats["step"] + 1) % a.eval_every == 0:
            row["test"] = passk(model, tok, test, style, a.samples, a.max_new_tokens)
        curve.append(row)

    train(model, tok, pool, a.steps, cfg, random.Random(a.seed), on_step, progress=True)
    c = checkpoint_step([r["train_accuracy"] for r in curve], a.smooth)
    window = [r["test"] for r in curve if "test" in r and c <= r["step"] < c + a.after]
    if not window:  # no evaluation inside the window: the first one after the checkpoint
        window = [next((r["test"] for r in curve if "test" in r and r["step"] >= c), curve[-1].get("test"))]
    result = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
    return dict(result, checkpoint_step=c, evals_averaged=len(window)), curve


def write(out, result, curve=None, **info):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({**info, **result}, f, indent=1)
    if curve is not None:
        with open(os.path.join(out, "curve.jsonl"), "w") as f:
            for r in curve:
                f.write(json.dumps(r) + "\n")
    print(json.dumps({**info, **result}))


def default_out(method, model, seed):
    """runs/protocol/<method>-<model's directory name>-seed<S>: results never land in a model directory."""
    return os.path.join("runs", "protocol", f"{method}-{os.path.basename(os.path.normpath(model))}-seed{seed}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=["passk", "ps", "pq", "teacher", "hard-only"])
    ap.add_argument("--out", help="result directory (default: inside the run directory for ps / pq, else "
                                  "runs/protocol/<method>-<model name>-seed<S>; never inside a model directory)")
    ap.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("inputs")
    g.add_argument("--model", help="passk: the model to measure")
    g.add_argument("--run", help="ps / pq: a soar.py run directory")
    g.add_argument("--teacher", help="teacher: the teacher checkpoint")
    g.add_argument("--base", help="fresh students start here (default: the run's base model, else toy/model)")
    g.add_argument("--train", help="D_train JSONL (default: the run's, else toy/hard/train.jsonl)")
    g.add_argument("--test", help="D_test JSONL (default: the run's, else toy/hard/test.jsonl)")
    g.add_argument("--style", choices=sorted(STUDENT_PROMPTS), default=None,
                    help="prompt wording (default: the model directory's soar.json, else math: the paper's)")
    g = ap.add_argument_group("fresh students (toy defaults)")
    g.add_argument("--mode", choices=["curriculum", "mixed"], default="mixed")
    g.add_argument("--questions-from-teacher", type=int, default=128, help="valid teacher questions (teacher eval)")
    g.add_argument("--steps", type=int, default=60)
    g.add_argument("--synthetic-steps", type=int, default=20, help="curriculum: synthetic-only steps")
    g.add_argument("--eval-every", type=int, default=10)
    g.add_argument("--smooth", type=int, default=9, help="centred moving-average width for the checkpoint rule")
    g.add_argument("--after", type=int, default=30, help="steps after the checkpoint whose test metrics are averaged")
    g.add_argument("--samples", type=int, default=32, help="samples per test problem for pass@k")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--kl-coef", type=float, default=0.001)
    g.add_argument("--questions", type=int, default=8)
    g.add_argument("--group", type=int, default=8)
    g.add_argument("--max-new-tokens", type=int, default=160)
    a = ap.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run_cfg = {}
    if a.run:
        with open(os.path.join(a.run, "config.json")) as f:
            run_cfg = json.load(f)
    base = a.base or run_cfg.get("model") or os.path.join(here, "toy", "model")
    style = a.style or run_cfg.get("style") or model_style(base)
    train_path = a.train or run_cfg.get("hard_train") or os.path.join(here, "toy", "hard", "train.jsonl")
    test_path = a.test or run_cfg.get("hard_test") or os.path.join(here, "toy", "hard", "test.jsonl")
    test = load_data(test_path)
    real = [(p["problem"], p["answer"]) for p in load_data(train_path)]
    info = dict(method=a.method, seed=a.seed, test=test_path, samples=a.samples)
    if a.method == "passk":
        if not a.model:
            ap.error("passk needs --model")
        torch.manual_seed(a.seed)
        tok, model = load_tokenizer(a.model), load_model(a.model)
        write(a.out or default_out("passk", a.model, a.seed), passk(model, tok, test, style, a.samples, a.max_new_tokens),
              model=a.model, **info)
    elif a.method == "ps":
        ps = os.path.join(a.run, "ps")
        if not os.path.isdir(ps):  # no promotion happened: the PS is the base student
            ps = base
        torch.manual_seed(a.seed)
        tok, model = load_tokenizer(ps), load_model(ps)
        write(a.out or os.path.join(a.run, "eval-ps"), passk(model, tok, test, style, a.samples, a.max_new_tokens),
              model=ps, **info)
    elif a.method == "pq":
        pq = [(r["question"], r["answer"]) for r in map(json.loads, open(os.path.join(a.run, "pq.jsonl")))]
        if not pq:  # no promotion: PQ is empty and the student sees D_train alone
            result, curve = fresh_student(base, [], real, "real", a, test, style)
        else:
            result, curve = fresh_student(base, pq, real, a.mode, a, test, style)
        write(a.out or os.path.join(a.run, f"eval-pq-{a.mode}"), result, curve, pq_size=len(pq), mode=a.mode, **info)
    elif a.method == "teacher":
        if not a.teacher:
            ap.error("teacher needs --teacher")
        torch.manual_seed(a.seed)
        tok, teacher = load_tokenizer(a.teacher), load_model(a.teacher)
        (data,), st = sample_teacher_datasets(teacher, tok, 1, a.questions_from_teacher, style,
                                              max_new_tokens=2 * a.max_new_tokens)
        del teacher
        synthetic = [(q, ans) for _, q, ans in data]
        result, curve = fresh_student(base, synthetic, real, a.mode, a, test, style)
        out = a.out or default_out("teacher", a.teacher, a.seed)
        write(out, result, curve, teacher=a.teacher, mode=a.mode, rejection_rate=st["rejection_rate"], **info)
        with open(os.path.join(out, "questions.jsonl"), "w") as f:
            for q, ans in synthetic:
                f.write(json.dumps({"question": q, "answer": ans}) + "\n")
    else:
        result, curve = fresh_student(base, [], real, "real", a, test, style)
        write(a.out or os.path.join("runs", f"hard-only-seed{a.seed}"), result, curve, **info)


if __name__ == "__main__":
    main()

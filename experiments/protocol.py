"""
python -m experiments.protocol -- the SOAR paper's evaluation protocol (arXiv 2601.18778), one command
per method. Run it from the repository root:

    # pass@k, k in 1,4,8,16,32, from 32 samples per D_test problem, for any model
    python -m experiments.protocol passk --model toy/model --test toy/hard/test.jsonl
    # PS: the promoted student with the best greedy accuracy on D_train, evaluated directly
    python -m experiments.protocol ps --run runs/soar-toy-seed0
    # PQ: a fresh base student trained on PQ plus D_train (curriculum or mixed)
    python -m experiments.protocol pq --run runs/soar-toy-seed0 --mode mixed
    # teacher evaluation: 128 valid questions from a teacher, then a fresh student as for PQ
    python -m experiments.protocol teacher --teacher runs/soar-toy-seed0/teacher --base toy/model
    # Hard-Only: a fresh student on D_train alone
    python -m experiments.protocol hard-only --base toy/model

Fresh students (PQ, teacher evaluation, Hard-Only) follow the paper's checkpoint rule (its
evaluation protocol): the mean shaped training reward of each RLOO step (120 / 20 / 10 / 0 per
completion, as train_student.py computes it) is smoothed with a centred moving average; the first
step whose slope falls below 15% of the maximum slope is the checkpoint, and test pass@k is averaged
over the evaluations in the window after it. The batch accuracy is logged beside the reward
(curve.jsonl) but does not choose the checkpoint. Their learning rate warms up linearly over
--warmup steps, then decays with a cosine to zero.

The paper's scale is --steps 1500 --synthetic-steps 64 --smooth 25 --after 200 --warmup 20
--max-new-tokens 1024 --teacher-max-new-tokens 512 --lr 1e-5 --group 32; the defaults here are the
toy world's. Each command writes OUT/result.json (and, for fresh students, OUT/curve.jsonl, with
--log tensorboard also as TensorBoard curves in OUT while it trains; for the teacher evaluation,
OUT/questions.jsonl). By default OUT lies under runs/ (or inside the given
soar.py run directory for ps / pq), never inside a model directory or another shipped file.

The first toy comparison (experiments/results/toy_table_333b3a2/) was made at commit 333b3a2, before two
fixes to this script: its fresh students' checkpoint rule smoothed the batch accuracy instead of the
training reward, and they trained without warmup (--warmup 0). Today's defaults follow the paper on both.
"""
import argparse
import json
import os
import random

import torch

from evaluate import checkpoint_step, load_data, pass_at_k_table, success_counts
from generate import STUDENT_PROMPTS, HelpFormatter, add_sampler_args, load_model, load_tokenizer, model_style, use_sampler
from train_student import RLConfig, train
from train_teacher import sample_teacher_datasets
from soar import PRESETS
from rundir.tblog import log_row, summary_writer

KS = (1, 4, 8, 16, 32)


def passk(model, tok, test, style, samples, max_new_tokens):
    """pass@k on `test`, and each problem's success count (for paired bootstraps over problems)."""
    counts = success_counts(model, tok, test, samples, style, max_new_tokens=max_new_tokens, batch_size=128,
                            progress=False)
    return dict(pass_at_k_table(counts, samples, KS), counts=counts)


def fresh_student(base, synthetic, real, mode, a, test, style, tb=None):
    """Train a fresh copy of `base` and return (result, curve) under the checkpoint rule.

    mode: 'curriculum' (synthetic only for the first a.synthetic_steps, then real only),
          'mixed' (both throughout) or 'real' (Hard-Only). tb: a SummaryWriter that gets each curve row."""
    torch.manual_seed(a.seed)
    tok, model = load_tokenizer(base), load_model(base)
    both = synthetic + real
    pool = {"curriculum": lambda s: synthetic if s < a.synthetic_steps else real,
            "mixed": lambda s: both, "real": lambda s: real}[mode]
    if mode != "real" and not synthetic:
        raise ValueError("no synthetic questions to train on")
    cfg = RLConfig(lr=a.lr, warmup=a.warmup, kl_coef=a.kl_coef, questions=a.questions, group=a.group,
                   max_new_tokens=a.max_new_tokens, style=style)
    curve = []

    def on_step(stats, *_):
        row = {"step": stats["step"], "train_accuracy": stats["accuracy"], "reward": stats["reward"]}
        if (stats["step"] + 1) % a.eval_every == 0:
            row["test"] = passk(model, tok, test, style, a.samples, a.max_new_tokens)
        curve.append(row)
        if tb:
            log_row(tb, row)

    train(model, tok, pool, a.steps, cfg, random.Random(a.seed), on_step, progress=True)
    # the paper's rule smooths the training reward: the mean shaped reward (120/20/10/0) of each step,
    # which also moves when answers get boxed or partly right; the accuracy stays in the curve only
    c = checkpoint_step([r["reward"] for r in curve], a.smooth)
    evals = [r for r in curve if "test" in r]
    if not evals:
        raise SystemExit(f"error: no test evaluation in {a.steps} steps (--eval-every {a.eval_every})")
    window = [r["test"] for r in evals if c <= r["step"] < c + a.after]
    if not window:  # no evaluation inside the window: the first one after the checkpoint, else the last
        window = [next((r["test"] for r in evals if r["step"] >= c), evals[-1]["test"])]
    result = {k: sum(w[k] for w in window) / len(window) for k in window[0] if k != "counts"}
    return dict(result, counts=[w["counts"] for w in window], checkpoint_step=c, evals_averaged=len(window), checkpoint_on="training reward",
                warmup=a.warmup), curve


def write(out, result, curve=None, **info):
    """OUT/result.json: pass@k, and `counts`, each D_test problem's successes out of --samples, one list
    per evaluation averaged (one for passk and ps; those in the checkpoint window for fresh students)."""
    if result["counts"] and not isinstance(result["counts"][0], list):
        result = dict(result, counts=[result["counts"]])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({**info, **result}, f, indent=1)
    if curve is not None:
        with open(os.path.join(out, "curve.jsonl"), "w") as f:
            for r in curve:
                f.write(json.dumps(r) + "\n")
    print(json.dumps({**info, **{k: v for k, v in result.items() if k != "counts"}}))


def default_out(method, model, seed):
    """runs/protocol/<method>-<model's directory name>-seed<S>: results never land in a model directory."""
    return os.path.join("runs", "protocol", f"{method}-{os.path.basename(os.path.normpath(model))}-seed{seed}")


def out_dir(a, base):
    """The result directory (see --out): inside the run for ps / pq, else under runs/protocol/."""
    if a.out:
        return a.out
    if a.method in ("ps", "pq"):
        return os.path.join(a.run, "eval-ps" if a.method == "ps" else f"eval-pq-{a.mode}")
    return default_out(a.method, {"passk": a.model, "teacher": a.teacher}.get(a.method, base), a.seed)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.protocol", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("method", choices=["passk", "ps", "pq", "teacher", "hard-only"],
                    help="passk: pass@k of --model; ps: pass@k of the run's promoted student; pq: a fresh student "
                         "on the run's PQ plus D_train; teacher: a fresh student on --teacher's questions plus "
                         "D_train; hard-only: a fresh student on D_train alone")
    ap.add_argument("--out", help="result directory (default: RUN/eval-ps or RUN/eval-pq-MODE for ps / pq, else "
                                  "runs/protocol/<method>-<model directory name>-seed<S>; never inside a model "
                                  "directory)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling, the training and the question order")
    ap.add_argument("--log", choices=["none", "tensorboard"], default="none",
                    help="tensorboard: a fresh student's curve.jsonl rows also as TensorBoard curves in OUT, as it "
                         "trains (pip install tensorboard==2.21.0); passk and ps train nothing")
    g = ap.add_argument_group("inputs")
    g.add_argument("--model", help="passk: the model to measure (required for passk)")
    g.add_argument("--run", help="ps / pq: a soar.py run directory (required for ps and pq); its config.json "
                                 "gives the base model, prompt style, D_train and D_test unless set below")
    g.add_argument("--teacher", help="teacher: the teacher checkpoint (required for teacher)")
    g.add_argument("--base", help="fresh students start here (default: the run's base model, else toy/model)")
    g.add_argument("--train", help="D_train JSONL (default: the run's, else the toy preset's, toy/hard-large/train.jsonl)")
    g.add_argument("--test", help="D_test JSONL (default: the run's, else the toy preset's, toy/hard-large/test.jsonl)")
    g.add_argument("--style", choices=sorted(STUDENT_PROMPTS), default=None,
                   help="prompt wording (default: the run's, else the soar.json in the directory of the model "
                        "that answers: --model for passk, the promoted student for ps, --base otherwise; "
                        "else math: the paper's)")
    g = ap.add_argument_group("evaluation")
    g.add_argument("--samples", type=int, default=32, help="samples per D_test problem for pass@k (the paper: 32)")
    g.add_argument("--max-new-tokens", type=int, default=160,
                   help="the student completion budget, in tokens: every pass@k sample here, and the training "
                        "rollouts of fresh students, which get the evaluation budget so that a student is trained "
                        "and measured on completions of the same length. 160 rather than the 120 of soar.py's toy "
                        "preset: the committed experiments/results were made with 160, and a correct toy "
                        "completion of the hard set's longest chains (L = 10) takes 96 tokens, so both budgets "
                        "hold every right answer. The paper: 1024")
    g.add_argument("--teacher-max-new-tokens", type=int, default=None,
                   help="teacher: the teacher's completion budget when sampling its questions (default: the one it "
                        "was trained with, from the config.json of the run holding --teacher, else the toy preset's "
                        "160). The evaluation samples with the training prompt, budget and validity filter. "
                        "The paper: 512")
    g = ap.add_argument_group("fresh students (pq, teacher, hard-only; defaults: the toy world's)")
    g.add_argument("--mode", choices=["curriculum", "mixed"], default="mixed",
                   help="curriculum: synthetic questions only for --synthetic-steps, then D_train only; mixed: "
                        "both throughout (the paper: curriculum for MATH, mixed for HARP and OlympiadBench)")
    g.add_argument("--questions-from-teacher", type=int, default=128,
                   help="teacher: valid teacher questions the fresh student trains on (the paper: 128)")
    g.add_argument("--steps", type=int, default=60, help="RLOO steps per fresh student (the paper: at most 1500)")
    g.add_argument("--synthetic-steps", type=int, default=20,
                   help="curriculum: synthetic-only steps before D_train (the paper: 64)")
    g.add_argument("--eval-every", type=int, default=10, help="test pass@k every this many steps")
    g.add_argument("--smooth", type=int, default=9,
                   help="width of the centred moving average over the training reward, for the checkpoint rule "
                        "(the paper: 25)")
    g.add_argument("--after", type=int, default=30,
                   help="steps after the checkpoint whose test evaluations are averaged (the paper: 200)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak AdamW learning rate (default: the run's student_lr, else the toy preset's, 1e-4; "
                        "the paper: 1e-5, its inner students' rate)")
    g.add_argument("--warmup", type=int, default=2,
                   help="linear learning-rate warmup steps, then cosine decay to zero over --steps. The paper's "
                        "hyperparameter table warms up over 20 steps and leaves the warmup out only in SOAR's "
                        "inner loop; fresh students are trained outside it, so they warm up. 2 is the paper's 20 "
                        "scaled down to the toy world's 60-step students. The committed "
                        "experiments/results predate this flag and were made with 0")
    g.add_argument("--kl-coef", type=float, default=0.001, help="k3 KL coefficient to the frozen base student")
    g.add_argument("--questions", type=int, default=8, help="questions per RLOO step (the paper: 8)")
    g.add_argument("--group", type=int, default=8, help="samples per question, the RLOO group (the paper: 32)")
    add_sampler_args(ap)
    a = ap.parse_args(argv)
    need = {"passk": "model", "ps": "run", "pq": "run", "teacher": "teacher"}.get(a.method)
    if need and not getattr(a, need):
        ap.error(f"{a.method} needs --{need}")
    writer = summary_writer() if a.log == "tensorboard" else None  # a missing package stops here, before any work
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # defaults come from the soar.py run measured (--run, or the run a --teacher was saved in), else
    # from the toy preset, so that fresh students see the hard set and learning rate the run's students saw
    run_cfg, toy = {}, PRESETS["toy"]
    run_dir = a.run or (a.teacher and os.path.dirname(os.path.abspath(a.teacher)))
    if run_dir and os.path.isfile(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            run_cfg = json.load(f)
    elif a.run:
        ap.error(f"--run {a.run}: no config.json there (not a soar.py run directory)")
    if a.lr is None:
        a.lr = run_cfg.get("student_lr", toy["student_lr"])
    base = a.base or run_cfg.get("model") or toy["model"]
    ps = None
    if a.method == "ps":
        ps = os.path.join(a.run, "ps")
        if not os.path.isdir(ps):  # no promotion happened: the PS is the base student
            ps = base
    # the prompt style of the model that answers: the measured one for passk / ps, else the fresh student's
    style = a.style or run_cfg.get("style") or model_style({"passk": a.model, "ps": ps}.get(a.method) or base)
    train_path = a.train or run_cfg.get("hard_train") or toy["hard_train"]
    test_path = a.test or run_cfg.get("hard_test") or toy["hard_test"]
    test = load_data(test_path)
    real = [(p["problem"], p["answer"]) for p in load_data(train_path)]
    use_sampler(a.sampler, {"passk": a.model, "ps": ps, "teacher": a.teacher}.get(a.method) or base, a.vllm_memory)
    info = dict(method=a.method, seed=a.seed, test=os.path.relpath(test_path, here), samples=a.samples,
                max_new_tokens=a.max_new_tokens, lr=a.lr)
    out = out_dir(a, base)
    # purge_step=0: a rerun into the same OUT replaces the curves, as it replaces result.json
    tb = writer(out, purge_step=0) if writer and a.method in ("pq", "teacher", "hard-only") else None
    if a.method == "passk":
        torch.manual_seed(a.seed)
        tok, model = load_tokenizer(a.model), load_model(a.model)
        write(out, passk(model, tok, test, style, a.samples, a.max_new_tokens), model=a.model, **info)
    elif a.method == "ps":
        torch.manual_seed(a.seed)
        tok, model = load_tokenizer(ps), load_model(ps)
        write(out, passk(model, tok, test, style, a.samples, a.max_new_tokens), model=ps, **info)
    elif a.method == "pq":
        pq = [(r["question"], r["answer"]) for r in map(json.loads, open(os.path.join(a.run, "pq.jsonl")))]
        if not pq:  # no promotion: PQ is empty and the student sees D_train alone
            result, curve = fresh_student(base, [], real, "real", a, test, style, tb)
        else:
            result, curve = fresh_student(base, pq, real, a.mode, a, test, style, tb)
        write(out, result, curve, pq_size=len(pq), mode=a.mode, **info)
    elif a.method == "teacher":
        torch.manual_seed(a.seed)
        tok, teacher = load_tokenizer(a.teacher), load_model(a.teacher)
        if a.teacher_max_new_tokens is None:  # the budget it was trained with
            a.teacher_max_new_tokens = run_cfg.get("teacher_max_new_tokens", toy["teacher_max_new_tokens"])
        (data,), st = sample_teacher_datasets(teacher, tok, 1, a.questions_from_teacher, style,
                                              max_new_tokens=a.teacher_max_new_tokens)
        del teacher
        synthetic = [(q, ans) for _, q, ans in data]
        result, curve = fresh_student(base, synthetic, real, a.mode, a, test, style, tb)
        write(out, result, curve, teacher=a.teacher, mode=a.mode, rejection_rate=st["rejection_rate"],
              teacher_max_new_tokens=a.teacher_max_new_tokens, **info)
        with open(os.path.join(out, "questions.jsonl"), "w") as f:
            for q, ans in synthetic:
                f.write(json.dumps({"question": q, "answer": ans}) + "\n")
    else:
        result, curve = fresh_student(base, [], real, "real", a, test, style, tb)
        write(out, result, curve, **info)
    if tb:
        tb.close()


if __name__ == "__main__":
    main()

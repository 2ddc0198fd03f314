"""
python -m experiments.reward_signal -- how much signal the grounded reward R_k carries: one outer step's
teacher datasets, each trained on by r students, and the spread of R_kj between datasets against
the spread between repeats of one dataset. Run it from the repository root:

    python -m experiments.reward_signal --out runs/signal/toy-hard              # the shipped hard set, the toy preset's lr
    python -m experiments.reward_signal --student-lr 1e-4 --inner-steps 40 --out runs/signal/s40   # other settings
    python -m experiments.reward_signal --student runs/soar/student --inner-steps 30 --out runs/signal/ps  # a promoted student
    python -m experiments.reward_signal --student-lora 4 --out runs/signal/lora4   # LoRA students, in lockstep
    python -m experiments.reward_signal --compare-samples 8 --out runs/signal/k8    # greedy and sampled Acc, same students
    python -m experiments.reward_signal --pool runs/signal/*/signal.json            # their F, pooled over probes

The teacher's RLOO step sees only R_k. If the R_kj of one dataset spread as much as the R_k of
different datasets, R_k is mostly the noise of the inner training, and the teacher cannot learn
which datasets help. Reported: the g x r matrix R_kj; a one-way analysis of variance (F = the
mean square between datasets over the mean square within them; F near 1: no signal beyond
noise); the share of students that gained; and, on the toy world, each dataset's share of
questions at L = 7-9 (the rungs just below the hard set). Same pieces and seeds as soar.py's
first outer step (base teacher, baseline student), with --r repeats instead of the preset's; --student
puts another baseline in the base student's place (a run's promoted student: does further inner
training still help it?). --reward-samples K scores Q_R as soar.py's flag does (mean success of K
draws); --compare-samples K scores each (full-copy) student both ways, greedy and by K draws (the
draws seeded as soar.py seeds them, one seed for baseline and students), so the two measures'
spreads come from the same trained students.
Writes OUT/signal.json and prints a table.
"""
import argparse
import json
import os
import random
import copy
import statistics
import time

import torch

from evaluate import load_problems, qr_accuracy
from generate import HelpFormatter, load_model, load_tokenizer, model_style
from train_student import RLConfig
from train_teacher import _train_inner_student, grounded_rewards, sample_teacher_datasets
from experiments.bench import cpu_model

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def anova(rkj):
    """One-way ANOVA of the rows of rkj (datasets x repeats): (MS between, MS within, F)."""
    g, r = len(rkj), len(rkj[0])
    means = [statistics.mean(row) for row in rkj]
    grand = statistics.mean(means)
    ms_between = r * sum((m - grand) ** 2 for m in means) / (g - 1)
    ms_within = sum((x - m) ** 2 for row, m in zip(rkj, means) for x in row) / (g * (r - 1))
    return ms_between, ms_within, (ms_between / ms_within if ms_within > 0 else float("inf"))


def pooled(results):
    """F pooled over probes (each a signal.json's dict, its own datasets, one g and r): the summed mean
    squares between datasets over the summed mean squares within, with their degrees of freedom; for
    greedy Acc and, where the probes have it, the --compare-samples measure."""
    g, r = results[0]["g"], results[0]["r"]
    if any((x["g"], x["r"]) != (g, r) for x in results):
        raise ValueError("pooled probes must share --g and --r")
    out = {}
    for name, part in (("greedy", lambda x: x), ("sampled", lambda x: x.get("compare"))):
        parts = [part(x) for x in results]
        if all(parts):
            b, w = sum(p["ms_between"] for p in parts), sum(p["ms_within"] for p in parts)
            out[name] = dict(f=b / w if w > 0 else float("nan"), df=(len(parts) * (g - 1), len(parts) * g * (r - 1)),
                             below=sum(p["students_below"] for p in parts), gained=sum(p["students_gained"] for p in parts),
                             students=len(parts) * g * r)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.reward_signal", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", default=os.path.join(HERE, "toy", "model"), help="base model: teacher and student")
    ap.add_argument("--student", help="baseline student (default: --model), e.g. a run's promoted student")
    ap.add_argument("--hard-train", default=os.path.join(HERE, "toy", "hard", "train.jsonl"), help="D_train JSONL")
    ap.add_argument("--out", help="result directory (required unless --pool)")
    ap.add_argument("--pool", nargs="+", metavar="SIGNAL_JSON", help="only print the pooled F of these probes' results")
    ap.add_argument("--g", type=int, default=4, help="teacher datasets")
    ap.add_argument("--n", type=int, default=16, help="questions per dataset")
    ap.add_argument("--r", type=int, default=3, help="students per dataset (repeats); >= 2")
    ap.add_argument("--m", type=int, default=0, help="reward questions Q_R (0: all of D_train)")
    ap.add_argument("--inner-steps", type=int, default=20, help="S, RLOO steps per student (the toy preset's)")
    ap.add_argument("--student-lr", type=float, default=3e-4, help="inner students' learning rate (the earlier toy preset's; the preset now uses 1e-4)")
    ap.add_argument("--student-lora", type=int, default=0, metavar="RANK",
                    help="LoRA students of this rank, trained in lockstep (soar.py's flag); 0: full copies")
    ap.add_argument("--lora-lr-scale", type=float, default=10.0,
                    help="with --student-lora, the students' learning rate is this times --student-lr (soar.py's)")
    ap.add_argument("--student-max-new-tokens", type=int, default=120, help="student budget (the toy preset's)")
    ap.add_argument("--teacher-max-new-tokens", type=int, default=160, help="teacher budget (the toy preset's)")
    ap.add_argument("--reward-samples", type=int, default=0, metavar="K",
                    help="Acc on Q_R: 0 greedy (the paper's), K mean success of K draws (soar.py's flag)")
    ap.add_argument("--compare-samples", type=int, default=0, metavar="K",
                    help="also score every student by the mean success of K draws (full copies only)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the teacher's draw, Q_R and the students")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the toy preset's)")
    a = ap.parse_args(argv)
    if a.pool:
        res = pooled([json.load(open(p)) for p in a.pool])
        for name, x in res.items():
            print(f"{name}: pooled F = {x['f']:.2f} (df {x['df'][0]}, {x['df'][1]}); {x['gained']} of {x['students']} "
                  f"students gained, {x['below']} below their baseline")
        return res
    if not a.out:
        ap.error("--out is required (unless --pool)")
    if a.r < 2 or a.g < 2:
        ap.error("--g and --r must be >= 2: the spreads need two of each")
    if a.compare_samples and (a.student_lora or a.compare_samples < 0):
        ap.error("--compare-samples K needs K > 0 and full-copy students (no --student-lora)")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    style, hard = model_style(a.model), load_problems(a.hard_train)
    tok, teacher, student = load_tokenizer(a.model), load_model(a.model), load_model(a.student or a.model)
    datasets, _ = sample_teacher_datasets(teacher, tok, a.g, a.n, style, max_new_tokens=a.teacher_max_new_tokens)
    qr = random.Random(a.seed).sample(hard, min(a.m or len(hard), len(hard)))
    base = qr_accuracy(student, tok, qr, style, a.student_max_new_tokens, a.reward_samples, a.seed)
    lr = a.student_lr * (a.lora_lr_scale if a.student_lora else 1)
    cfg = RLConfig(lr=lr, questions=8, group=8, max_new_tokens=a.student_max_new_tokens,
                   micro_batch=32, style=style, eval_samples=a.reward_samples)
    t0, other = time.time(), None
    if not a.compare_samples:
        results, _ = grounded_rewards(student, tok, datasets, qr, base, a.r, a.inner_steps, cfg, seed=a.seed,
                                      progress=True, threads=a.threads, lora_rank=a.student_lora)
        rkj = [res.repeat_rewards for res in results]
    else:  # grounded_rewards' own student function, then each trained student scored the second way
        base2 = qr_accuracy(student, tok, qr, style, a.student_max_new_tokens, a.compare_samples, a.seed)
        rkj, other, s = [], [], copy.deepcopy(student)
        for k, d in enumerate(datasets):
            rkj.append([]), other.append([])
            for j in range(a.r):
                acc, _, state = _train_inner_student(student, tok, [(q, x) for _, q, x in d], qr, a.inner_steps, cfg,
                                                     a.seed, k, j, None, a.threads)
                s.load_state_dict(state)
                rkj[k].append(acc - base)
                other[k].append(qr_accuracy(s, tok, qr, style, a.student_max_new_tokens, a.compare_samples, a.seed) - base2)
                print(f"student {k},{j}: R {rkj[k][-1]:+.4f}, sampled R {other[k][-1]:+.4f}", flush=True)
    seconds = time.time() - t0
    between, within, f = anova(rkj)
    out = dict(student=os.path.relpath(a.student or a.model, HERE), student_lr=a.student_lr, student_lora=a.student_lora, lr=lr,
               inner_seconds=round(seconds, 1), cpu=cpu_model(), hard_train=os.path.relpath(a.hard_train, HERE), q_r=len(qr), base_acc=base, g=a.g, n=a.n, r=a.r,
               inner_steps=a.inner_steps, seed=a.seed, r_kj_in_units_of_1_over_q_r=[[round(x * len(qr)) for x in row]
                                                                                   for row in rkj],
               r_kj=rkj, r_k=[statistics.mean(row) for row in rkj], ms_between=between, ms_within=within, f=f,
               students_gained=sum(x > 0 for row in rkj for x in row), students=a.g * a.r,
               reward_samples=a.reward_samples, students_below=sum(x < 0 for row in rkj for x in row))
    if other is not None:
        b2, w2, f2 = anova(other)
        out["compare"] = dict(samples=a.compare_samples, base_acc=base2, r_kj=other, ms_between=b2, ms_within=w2, f=f2,
                              students_gained=sum(x > 0 for row in other for x in row),
                              students_below=sum(x < 0 for row in other for x in row))
    if style == "toy":
        from toy.task import difficulty

        out["share_L7_9"] = [sum(7 <= (difficulty(q) or 0) <= 9 for _, q, _ in d) / len(d) for d in datasets]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "signal.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"Q_R: {len(qr)} problems of {out['hard_train']}, baseline greedy accuracy {base:.3f}")
    print("| dataset | R_kj (units of 1/|Q_R|) | R_k | share L 7-9 |\n|---|---|---|---|")
    for k, row in enumerate(out["r_kj_in_units_of_1_over_q_r"]):
        share = f"{out['share_L7_9'][k]:.2f}" if "share_L7_9" in out else "-"
        print(f"| {k} | {row} | {out['r_k'][k]:.4f} | {share} |")
    print(f"MS between datasets {between:.2e}, MS within (repeats) {within:.2e}, F = {f:.2f}; "
          f"{out['students_gained']} of {out['students']} students gained; inner loop {seconds:.0f} s on {out['cpu']}")
    if other is not None:
        c = out["compare"]
        print(f"scored by the mean success of {c['samples']} draws: baseline {c['base_acc']:.4f}, F = {c['f']:.2f}, "
              f"{c['students_gained']} gained, {c['students_below']} below the baseline")


if __name__ == "__main__":
    main()

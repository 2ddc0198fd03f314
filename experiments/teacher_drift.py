"""
python -m experiments.teacher_drift -- does the teacher's drift follow its evidence? The toy teacher
takes soar.py's outer update (teacher_step: RLOO over g datasets, AdamW, k3 KL to the base) on
rewards whose signal is known, with no inner students, so one setting costs minutes, not hours:

    python -m experiments.teacher_drift --noise 0.021 --out runs/drift/lr1e-4-null              # no evidence
    python -m experiments.teacher_drift --signal 0.054 --noise 0.021 --out runs/drift/lr1e-4-signal
    python -m experiments.teacher_drift --teacher-lr 1e-5 --teacher-warmup 20 --signal 0.054 --noise 0.021 \\
        --out runs/drift/lr1e-5-signal                                                          # the paper's lr

R_k = signal x (dataset k's share of questions at L = 8-9) + noise x N(0, 1). The defaults of the
commands above are the grounded reward's measured pieces on toy/hard-large (the tau null's 80
dataset rewards, experiments/README.md): R_k's deviation from its step's mean has SD 0.021, and
its slope on the L 8-9 share is +0.054 (correlation +0.26). A teacher whose drift follows its
evidence raises its L 8-9 share under the signal and not under the noise alone, while its answer
key stays right; one that only drifts moves as far (per-token KL to the base) under both.
Each step's row goes to OUT/drift.jsonl (its datasets to OUT/datasets.jsonl) as it is made; a summary
of the last 10 steps to OUT/summary.json.
"""
import argparse
import json
import os
import random
import time

import torch

from generate import HelpFormatter, load_model, load_tokenizer
from train_student import RLConfig, frozen_copy, make_optimizer
from train_teacher import sample_teacher_datasets, teacher_step
from toy.task import answer_key_accuracy, difficulty
from experiments.bench import cpu_model

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def share_hard(data, lo=8, hi=9):
    """A dataset's share of questions at L = lo..hi (the rungs just below the hard set)."""
    return sum(lo <= (difficulty(q) or 0) <= hi for _, q, _ in data) / len(data)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.teacher_drift", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", default=os.path.join(HERE, "toy", "model"), help="base teacher (a toy-style model)")
    ap.add_argument("--out", required=True, help="result directory")
    ap.add_argument("--steps", type=int, default=40, help="outer steps (teacher updates)")
    ap.add_argument("--g", type=int, default=4, help="datasets per step")
    ap.add_argument("--n", type=int, default=16, help="questions per dataset")
    ap.add_argument("--signal", type=float, default=0.0, help="reward per unit of a dataset's L 8-9 share")
    ap.add_argument("--noise", type=float, default=0.0, help="SD of the reward's Gaussian noise")
    ap.add_argument("--teacher-lr", type=float, default=1e-4, help="AdamW learning rate (the toy preset's)")
    ap.add_argument("--teacher-warmup", type=int, default=2, help="linear warmup, in steps (the toy preset's)")
    ap.add_argument("--teacher-kl", type=float, default=0.001, help="k3 KL weight to the base (the toy preset's)")
    ap.add_argument("--schedule-steps", type=int, default=0,
                    help="length of the cosine schedule (0: --steps; a sweep's T to mimic its first steps)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the teacher's draws and of the noise")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.noise < 0:
        ap.error("--steps must be >= 1 and --noise >= 0")
    torch.set_num_threads(a.threads)
    tok, teacher = load_tokenizer(a.model), load_model(a.model)
    ref = frozen_copy(teacher) if a.teacher_kl > 0 else None
    opt, sched = make_optimizer(teacher, a.teacher_lr, a.schedule_steps or a.steps, a.teacher_warmup)
    cfg = RLConfig(lr=a.teacher_lr, kl_coef=a.teacher_kl, max_new_tokens=160, micro_batch=32, style="toy")
    noise = random.Random(a.seed)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "config.json"), "w") as fh:
        json.dump(dict(vars(a), cpu=cpu_model()), fh, indent=1)
    rows, t0 = [], time.time()
    with open(os.path.join(a.out, "drift.jsonl"), "w") as fh, open(os.path.join(a.out, "datasets.jsonl"), "w") as dh:
        for t in range(a.steps):
            torch.manual_seed(a.seed * 1_000_003 + t)  # as soar.py seeds its steps
            datasets, _ = sample_teacher_datasets(teacher, tok, a.g, a.n, "toy", max_new_tokens=160)
            shares = [share_hard(d) for d in datasets]
            rewards = [a.signal * s + a.noise * noise.gauss(0, 1) for s in shares]
            upd = teacher_step(teacher, opt, sched, datasets, rewards, cfg, tok.pad_token_id, ref)
            opt.zero_grad(set_to_none=True)
            pairs = [(q, x) for d in datasets for _, q, x in d]
            row = dict(step=t, rewards=rewards, share_L8_9=sum(shares) / len(shares),
                       mean_L=sum(difficulty(q) or 0 for q, _ in pairs) / len(pairs),
                       answer_acc=answer_key_accuracy(pairs), teacher_kl=upd.get("kl"), grad_norm=upd.get("grad_norm"))
            rows.append(row)
            fh.write(json.dumps(row) + "\n")
            dh.write(json.dumps(dict(step=t, datasets=[[(q, x) for _, q, x in d] for d in datasets])) + "\n")
            fh.flush()
            print(f"step {t:3d} | share L8-9 {row['share_L8_9']:.3f} | mean L {row['mean_L']:.2f} | answers right "
                  f"{row['answer_acc']:.2f} | KL {row['teacher_kl']:.5f}", flush=True)
    last = rows[-10:]
    summary = dict(first10_share=sum(r["share_L8_9"] for r in rows[:10]) / len(rows[:10]),
                   last10_share=sum(r["share_L8_9"] for r in last) / len(last),
                   last10_answer_acc=sum(r["answer_acc"] for r in last) / len(last),
                   last10_kl=sum(r["teacher_kl"] for r in last) / len(last), seconds=round(time.time() - t0, 1))
    with open(os.path.join(a.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

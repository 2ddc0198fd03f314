"""
python -m experiments.lora_bench -- LoRA students against full copies on the toy world, side by side in
one run: one outer step's inner loop (the g x r students of experiments.reward_signal: the same teacher
datasets, Q_R and seeds) with full fine-tuning (today's loop, one student after another) and with LoRA
students of a few ranks (lockstep), timed, with the reward signal each gives (F, students that gained);
and what a batched HF sampling call for the students could save on this CPU.

    python -m experiments.lora_bench --out experiments/results/lora            # ~15 min on 2 cores
    python -m experiments.lora_bench --ranks 8 --only sampling --out runs/lora  # the sampling probe alone
    python -m experiments.lora_bench --only inner --ranks 8 --lora-lr-scale 1,3 --skip-full --out experiments/results/lora-lr

The sampling probe: the lockstep loop's hf path samples the students one call each. One call over
all of them (g*r students x 64 rows) would run the shared base once per token for every row, plus,
per student, the adapter's two small products in each adapted layer. Timed here: 12 calls of 64 rows
against one call of 768 rows of the base alone (an upper bound on the gain), and those per-student
adapter products for one decode step (what a batched call must add back).
"""
import argparse
import json
import os
import random
import time

import torch

import generate
from evaluate import greedy_accuracy, load_problems
from experiments.bench import cpu_model
from experiments.reward_signal import anova
from generate import HelpFormatter, load_model, load_tokenizer, model_style
from toy import task
from train_student import RLConfig
from train_teacher import grounded_rewards, sample_teacher_datasets

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def inner_loop(a, style, tok, teacher, student, hard):
    """One outer step's inner loop per setting (rank 0: full copies), the same datasets and Q_R for all."""
    torch.manual_seed(a.seed)
    datasets, _ = sample_teacher_datasets(teacher, tok, a.g, 16, style, max_new_tokens=160)
    qr = random.Random(a.seed).sample(hard, min(64, len(hard)))
    base = greedy_accuracy(student, tok, qr, style, 120)
    rows = []
    for rank, scale in ([] if a.skip_full else [(0, 1.0)]) + [(r, x) for r in a.ranks for x in a.lora_lr_scale]:
        lr = a.student_lr * scale
        cfg = RLConfig(lr=lr, questions=8, group=8, max_new_tokens=120, micro_batch=32, style=style)
        t0 = time.time()
        results, _ = grounded_rewards(student, tok, datasets, qr, base, a.r, a.inner_steps, cfg, seed=a.seed,
                                      progress=True, threads=a.threads, lora_rank=rank)
        rkj = [res.repeat_rewards for res in results]
        between, within, f = anova(rkj)
        rows.append(dict(rank=rank, lr_scale=scale, lr=lr, seconds=round(time.time() - t0, 1), f=f, ms_between=between,
                         ms_within=within, r_kj_in_units_of_1_over_q_r=[[round(x * len(qr)) for x in r] for r in rkj],
                         students_gained=sum(x > 0 for r in rkj for x in r),
                         students_below_baseline=sum(x < 0 for r in rkj for x in r), students=a.g * a.r))
        print(f"rank {rank:3d} (lr {lr:.0e}): {rows[-1]['seconds']:.0f} s, F = {f:.2f}, "
              f"{rows[-1]['students_gained']} of {a.g * a.r} gained")
    return dict(q_r=len(qr), base_acc=base, rows=rows)


def sampling(a, tok, model):
    """12 calls of 64 rows vs one of 768 (base alone), and the adapter products a batched call adds."""
    rng = random.Random(0)
    qs = [generate.student_prompt(task.make_question(rng.randint(5, 9), rng), "toy") for _ in range(8 * a.g * a.r)]
    per, out = 8, {}

    def timed(f):
        torch.manual_seed(0)
        t0 = time.time()
        f()
        return time.time() - t0

    for rep in range(2):  # alternating; the faster of two each
        one = timed(lambda: [generate.sample(model, tok, qs[per * i:per * (i + 1)], n=8, max_new_tokens=120,
                                             batch_size=64) for i in range(a.g * a.r)])
        big = timed(lambda: generate.sample(model, tok, qs, n=8, max_new_tokens=120, batch_size=8 * len(qs)))
        out["calls_per_student_s"] = min(one, out.get("calls_per_student_s", one))
        out["one_call_base_only_s"] = min(big, out.get("one_call_base_only_s", big))
    c = model.config
    d, ff, hd = c.hidden_size, c.intermediate_size, c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * hd
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, ff), (d, ff), (ff, d)]  # (in, out): q k v o gate up down
    for rank in a.ranks:
        n = a.g * a.r
        A = [[torch.randn(rank, i) for i, _ in shapes] for _ in range(n)]
        B = [[torch.randn(o, rank) for _, o in shapes] for _ in range(n)]
        xs = {i: torch.randn(n * 64, 1, i) for i, _ in shapes}

        def step():
            for _ in range(c.num_hidden_layers):
                for li, (i, _) in enumerate(shapes):
                    torch.cat([(xs[i][s * 64:(s + 1) * 64] @ A[s][li].t()) @ B[s][li].t() for s in range(n)])

        for _ in range(10):
            step()
        t0 = time.time()
        for _ in range(120):
            step()
        out[f"adapter_products_rank{rank}_s_per_120_steps"] = time.time() - t0
    for k, v in out.items():
        print(f"{k}: {v:.2f} s")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.lora_bench", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--out", required=True, help="result directory (lora_bench.json)")
    ap.add_argument("--only", default="inner,sampling", help="inner, sampling, or both")
    ap.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32],
                    help="LoRA ranks to compare with full copies")
    ap.add_argument("--hard-train", default=os.path.join(HERE, "toy", "hard", "train.jsonl"), help="D_train JSONL")
    ap.add_argument("--g", type=int, default=4, help="teacher datasets")
    ap.add_argument("--r", type=int, default=3, help="students per dataset")
    ap.add_argument("--inner-steps", type=int, default=20, help="S (the toy preset's)")
    ap.add_argument("--student-lr", type=float, default=3e-4, help="full-FT learning rate (the earlier toy preset's, which the committed LoRA results used)")
    ap.add_argument("--lora-lr-scale", type=lambda s: [float(x) for x in s.split(",")], default=[10.0],
                    help="LoRA lr = this x --student-lr (soar.py's default: 10); several: each rank at each")
    ap.add_argument("--skip-full", action="store_true", help="no full-fine-tuning row")
    ap.add_argument("--seed", type=int, default=0, help="seed of the datasets, Q_R and the students")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    path = os.path.join(HERE, "toy", "model")
    style, tok = model_style(path), load_tokenizer(path)
    teacher, student = load_model(path), load_model(path)
    res = dict(cpu=cpu_model(), threads=a.threads, g=a.g, r=a.r, inner_steps=a.inner_steps, seed=a.seed,
               hard_train=os.path.relpath(a.hard_train, HERE))
    print(res["cpu"])
    if "sampling" in a.only:
        res["sampling"] = sampling(a, tok, student)
    if "inner" in a.only:
        res["inner"] = inner_loop(a, style, tok, teacher, student, load_problems(a.hard_train))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "lora_bench.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

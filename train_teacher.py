"""
train_teacher.py -- the outer update: grounded dataset rewards and the teacher's RLOO step.

For each teacher dataset X_k (n synthetic question-answer pairs):

    R_kj = Acc(theta'_kj, Q_R) - Acc(theta, Q_R)      theta'_kj: the baseline student after
                                                       S RLOO steps on X_k (repeat j = 1..r)
    R_k  = mean_j R_kj                                 (the grounded reward)

The teacher then takes one policy-gradient step with RLOO over the g datasets:
A_k = R_k - mean_{j != k} R_j, and every one of the n completions in X_k gets A_k.
The update reuses train_student.policy_gradient_step, so there is one PG code path.

Also here: the teacher's rejection sampling (SOAR step 1), and the intrinsic "learnability" reward (a baseline of the paper), mean over
the dataset's questions of 0 if the student's success rate s_i is 0, else 1 - s_i.

Run alone it scores one teacher-sampled group of datasets and updates the teacher once:

    python train_teacher.py --teacher toy/model --student toy/model --reward-data toy/hard/train.jsonl
"""
import argparse
import copy
import json
import random
import sys
from dataclasses import dataclass, field

import torch

from evaluate import get_verifier, grade, greedy_accuracy, load_problems, teacher_pair
from generate import load_model, load_tokenizer, sample, student_prompt, teacher_prompt
from train_student import (Episode, RLConfig, frozen_copy, make_optimizer, policy_gradient_step, rloo_advantages,
                           train)


# -----------------------------------------------------------------------------
# Teacher sampling with rejection (SOAR step 1)


class TeacherSamplingError(RuntimeError):
    pass


def sample_teacher_datasets(model, tok, g, n, style="math", temperature=1.0, top_p=1.0, max_new_tokens=512,
                            batch_size=64, max_rounds=20, verifier=None, reject_path=None, sampler=None):
    """Sample until g*n valid teacher completions exist; return (datasets, stats).

    datasets[k] is a list of n (Completion, question, answer). Invalid completions are
    dropped and resampled, so every dataset in the RLOO group is complete and the
    advantages still sum to zero. Valid: evaluate.teacher_pair (tags, \\boxed{}, Math-Verify
    parses), whether or not the completion reached the token limit. Gives up after max_rounds batches, writing the
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
            qa = teacher_pair(c.text, verifier)
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
# Grounded rewards (SOAR steps 3 and 5)

@dataclass
class DatasetResult:
    k: int
    reward: float                              # R_k
    repeat_rewards: list                       # R_kj, j = 1..r
    zero_signal_groups: int = 0                # inner RLOO groups with all-equal rewards (no gradient)
    skipped_updates: int = 0                   # inner updates skipped for a non-finite loss or gradient
    students: list = field(default_factory=list, repr=False)  # kept only while k is the best so far


def grounded_rewards(student, tok, datasets, reward_qs, base_acc, repeats, steps, cfg, seed=0,
                     eval_max_new_tokens=None, progress=False):
    """R_k for every dataset; returns (results, best) where best holds the r trained students
    of the argmax dataset (state dicts on CPU), so promotion needs no retraining while at
    most 2r student copies are ever held."""
    from tqdm import tqdm

    results, best = [], None
    jobs = tqdm(total=len(datasets) * repeats, desc="inner students", disable=not progress, leave=False)
    for k, data in enumerate(datasets):
        pairs = [(q, a) for _, q, a in data]
        rs, states, health = [], [], {"zero_signal_groups": 0, "skipped": 0}

        def count(stats, *_):
            health["zero_signal_groups"] += stats["zero_signal_groups"]
            health["skipped"] += stats["skipped"]

        for j in range(repeats):
            s = copy.deepcopy(student)
            torch.manual_seed(seed * 100_003 + k * 1009 + j)
            train(s, tok, pairs, steps, cfg, rng=random.Random(seed * 7919 + k * 31 + j), on_step=count)
            acc = greedy_accuracy(s, tok, reward_qs, cfg.style, eval_max_new_tokens or cfg.max_new_tokens)
            rs.append(acc - base_acc)
            states.append({n: t.detach().cpu().clone() for n, t in s.state_dict().items()})
            del s
            jobs.update()
        res = DatasetResult(k, sum(rs) / len(rs), rs, health["zero_signal_groups"], health["skipped"])
        if best is None or res.reward > best.reward:
            res.students = states
            if best is not None:
                best.students = []
            best = res
        results.append(res)
    jobs.close()
    return results, best


def learnability_rewards(student, tok, datasets, group, cfg):
    """Intrinsic-T baseline: per question r_i = 0 if s_i == 0 else 1 - s_i, s_i the student's
    success rate over `group` samples (checked against the teacher's answer); dataset mean."""
    out = []
    for data in datasets:
        per_q = []
        for _, q, a in data:
            comps = sample(student, tok, [student_prompt(q, cfg.style)], n=group, temperature=cfg.temperature,
                           max_new_tokens=cfg.max_new_tokens, batch_size=cfg.sample_batch)
            s = sum(grade(c.text, a) for c in comps) / group
            per_q.append(0.0 if s == 0 else 1.0 - s)
        out.append(sum(per_q) / len(per_q))
    return out


def teacher_step(teacher, opt, sched, datasets, rewards, cfg, pad_id, ref_model=None):
    """RLOO over the g datasets; each dataset's advantage goes to all of its completions."""
    adv = rloo_advantages(torch.tensor(rewards, dtype=torch.float32)[None])[0].tolist()
    episodes = [Episode(c.prompt_ids, c.ids, rewards[k], adv[k]) for k, data in enumerate(datasets) for c, _, _ in data]
    stats = policy_gradient_step(teacher, opt, episodes, cfg, pad_id, ref_model, sched)
    stats["advantages"] = adv
    return stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="teacher model directory or hub name")
    ap.add_argument("--student", required=True, help="baseline student model directory or hub name")
    ap.add_argument("--reward-data", required=True, help="JSONL of hard problems (Q_R is drawn from it)")
    ap.add_argument("--style", choices=["math", "toy"], default=None)
    ap.add_argument("--g", type=int, default=4, help="datasets per teacher step (RLOO group)")
    ap.add_argument("--n", type=int, default=16, help="questions per dataset")
    ap.add_argument("--r", type=int, default=1, help="students trained per dataset")
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--m", type=int, default=32, help="reward questions Q_R")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--out", help="save the updated teacher here")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.g < 2:
        ap.error("--g must be >= 2 for RLOO")
    style = a.style or ("toy" if "toy" in a.teacher else "math")
    try:
        hard = load_problems(a.reward_data)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(a.seed)
    tok = load_tokenizer(a.teacher)
    teacher, student = load_model(a.teacher), load_model(a.student)
    cfg = RLConfig(lr=1e-4, questions=8, group=8, max_new_tokens=a.max_new_tokens, style=style)
    datasets, st = sample_teacher_datasets(teacher, tok, a.g, a.n, style, max_new_tokens=a.max_new_tokens)
    qr = random.Random(a.seed).sample(hard, min(a.m, len(hard)))
    base = greedy_accuracy(student, tok, qr, style, a.max_new_tokens)
    results, _ = grounded_rewards(student, tok, datasets, qr, base, a.r, a.inner_steps, cfg, a.seed, progress=True)
    opt, sched = make_optimizer(teacher, 1e-5, 1)
    stats = teacher_step(teacher, opt, None, datasets, [r.reward for r in results], cfg, tok.pad_token_id,
                         frozen_copy(teacher))
    print(json.dumps({"rejection_rate": st["rejection_rate"], "baseline_acc": base,
                      "rewards": [r.reward for r in results], **stats}))
    if a.out:
        teacher.save_pretrained(a.out)
        tok.save_pretrained(a.out)


if __name__ == "__main__":
    main()

"""
train_teacher.py -- the outer update: grounded dataset rewards and the teacher's RLOO step.

For each teacher dataset X_k (n synthetic question-answer pairs):

    R_kj = Acc(theta'_kj, Q_R) - Acc(theta, Q_R)      theta'_kj: the baseline student after
                                                       S RLOO steps on X_k (repeat j = 1..r)
    R_k  = mean_j R_kj                                 (the grounded reward)

Acc is greedy 0/1 accuracy (the paper's), or with RLConfig.eval_samples = K (soar.py --reward-samples)
the mean success of K draws per question, baseline and students drawn with the step's one seed.

The teacher then takes one policy-gradient step with RLOO over the g datasets:
A_k = R_k - mean_{j != k} R_j, and every one of the n completions in X_k gets A_k.
The update reuses train_student.policy_gradient_step, so there is one PG code path.

Also here: the teacher's rejection sampling (SOAR step 1), and the intrinsic "learnability" reward (a baseline of the paper), mean over
the dataset's questions of 0 if the student's success rate s_i is 0, else 1 - s_i.

Run alone it scores one teacher-sampled group of datasets and updates the teacher once:

    python train_teacher.py --teacher toy/model --student toy/model --reward-data toy/hard/train.jsonl
"""
import argparse
import contextlib
import copy
import json
import random
import sys
from dataclasses import dataclass, field

import torch

from engines import lora
from evaluate import get_verifier, grade, greedy_accuracy, load_problems, qr_accuracies, qr_accuracy, teacher_pair
from generate import (HelpFormatter, add_prompt_args, add_sampler_args, load_model, load_tokenizer, precision,
                      resolve_style, sample, sample_students, save_model, student_prompt, teacher_prompt, use_sampler)
from train_student import (Episode, RLConfig, draw_batch, frozen_copy, learn, make_optimizer, next_seed,
                           policy_gradient_step, rloo_advantages, start_run, train)


# -----------------------------------------------------------------------------
# Teacher sampling with rejection (SOAR step 1)


class TeacherSamplingError(RuntimeError):
    pass


def sample_teacher_datasets(model, tok, g, n, style="math", temperature=1.0, top_p=1.0, max_new_tokens=512,
                            batch_size=64, max_rounds=20, verifier=None, reject_path=None):
    """Sample until g*n valid teacher completions exist; return (datasets, stats).

    datasets[k] is a list of n (Completion, question, answer). Invalid completions are
    dropped and resampled, so every dataset in the RLOO group is complete and the
    advantages still sum to zero. Valid: the paper's three filters, evaluate.teacher_pair (question
    and answer tags, a \\boxed{} answer, an answer Math-Verify parses); a completion cut at the
    token limit that passes them is valid too (the filters, not the length, decide). Gives up after
    max_rounds batches, writing the rejected samples to reject_path for inspection."""
    verifier = verifier or get_verifier()
    prompt = teacher_prompt(style)
    valid, rejected, drawn = [], [], 0
    need = g * n
    for _ in range(max_rounds):
        want = max(batch_size, need - len(valid))
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
    remote_verifier_timeouts: int = 0          # verifier timeouts in Ray workers (this process's own are
                                               # in get_verifier().timeouts; 0 on the sequential path)


@contextlib.contextmanager
def _threads(n):
    """torch's CPU thread count set to n inside (unchanged for n = 0), restored after. Float sums
    split over a different number of threads round differently, so every inner student, here or
    in a Ray task, runs on the run's --threads: a run's numbers do not depend on --workers."""
    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _student_seeds(seed, k, j):
    """Student (k, j)'s random streams, from (seed, k, j) alone: its question order, and a torch
    generator (a LoRA student's initial A, then one sampling seed per RLOO step)."""
    return random.Random(seed * 7919 + k * 31 + j), torch.Generator().manual_seed(seed * 100_003 + k * 1009 + j)


def _train_inner_student(student, tok, pairs, reward_qs, steps, cfg, seed, k, j, eval_max_new_tokens, threads,
                         lora_rank=0):
    """Student (k, j): a copy of the baseline, seeded from (seed, k, j) only, trained on pairs and
    measured on reward_qs. Returns (accuracy, health counts, trained state dict on CPU). The one
    code path for both the sequential loop and the Ray tasks. lora_rank > 0: the student is an
    adapter on the baseline itself (attached by the caller; engines/lora.py), and its state the adapter's."""
    health = {"zero_signal_groups": 0, "skipped": 0}

    def count(stats, *_):
        health["zero_signal_groups"] += stats["zero_signal_groups"]
        health["skipped"] += stats["skipped"]

    if lora_rank:
        with _threads(threads):
            rng, gen = _student_seeds(seed, k, j)
            ad = lora.Adapter(student, lora_rank, generator=gen)
            lora.use(student, ad)
            try:
                train(student, tok, pairs, steps, cfg, rng=rng, on_step=count, seeds=gen)
                with precision(cfg.dtype, next(student.parameters()).device):
                    acc = qr_accuracy(student, tok, reward_qs, cfg.style, eval_max_new_tokens or cfg.max_new_tokens,
                                      cfg.eval_samples, seed)
            finally:
                lora.use(student, None)
        return acc, health, ad.state()
    with _threads(threads):
        s = copy.deepcopy(student)
        torch.manual_seed(seed * 100_003 + k * 1009 + j)
        train(s, tok, pairs, steps, cfg, rng=random.Random(seed * 7919 + k * 31 + j), on_step=count)
        with precision(cfg.dtype, next(s.parameters()).device):
            acc = qr_accuracy(s, tok, reward_qs, cfg.style, eval_max_new_tokens or cfg.max_new_tokens,
                              cfg.eval_samples, seed)
    state, copies = {}, {}
    for n, t in s.state_dict().items():  # tied weights (embedding = lm_head) are copied once
        key = (t.data_ptr(), t.shape)
        if key not in copies:
            copies[key] = t.detach().cpu().clone()
        state[n] = copies[key]
    del s
    return acc, health, state


def _keep_best(best, res, states):
    """The running argmax over datasets (first one wins a tie): only its students are kept."""
    if best is None or res.reward > best.reward:
        res.students = states
        if best is not None:
            best.students = []
        return res
    return best


def grounded_rewards(student, tok, datasets, reward_qs, base_acc, repeats, steps, cfg, seed=0,
                     eval_max_new_tokens=None, progress=False, workers=0, threads=0, lora_rank=0, lockstep=True):
    """R_k for every dataset; returns (results, best) where best holds the r trained students
    of the argmax dataset (state dicts, or adapter states, on CPU), so promotion needs no retraining.

    workers 0 trains the g*r students one after the other here; workers N > 0 runs them as Ray
    tasks (scaleout/ray_students.py), at most N in flight, with the same seeds and the same numbers. Every
    student runs on `threads` torch threads (0: this process's count), wherever it runs.
    lora_rank > 0: the students are LoRA adapters on the baseline (engines/lora.py), here trained
    in lockstep (train_lockstep; lockstep=False: one after the other, the same numbers).
    Memory: at most 2r student copies are held here (the best dataset's r and the current
    dataset's r), plus, with workers, the results of the tasks in flight (at most N)."""
    if workers > 0:  # Ray tasks: scaleout/ray_students.py (imported here only when asked for)
        from scaleout.ray_students import grounded_rewards_ray

        return grounded_rewards_ray(student, tok, datasets, reward_qs, base_acc, repeats, steps, cfg, seed,
                                    eval_max_new_tokens, progress, workers, threads or torch.get_num_threads(),
                                    lora_rank, _train_inner_student, DatasetResult, _keep_best)
    if lora_rank and lockstep:
        return _lockstep_rewards(student, tok, datasets, reward_qs, base_acc, repeats, steps, cfg, seed,
                                 eval_max_new_tokens, threads, lora_rank)
    from tqdm import tqdm

    results, best = [], None
    jobs = tqdm(total=len(datasets) * repeats, desc="inner students", disable=not progress, leave=False)
    with _attached(student, lora_rank):
        for k, data in enumerate(datasets):
            pairs = [(q, a) for _, q, a in data]
            rs, states, health = [], [], {"zero_signal_groups": 0, "skipped": 0}
            for j in range(repeats):
                acc, h, state = _train_inner_student(student, tok, pairs, reward_qs, steps, cfg, seed, k, j,
                                                     eval_max_new_tokens, threads, lora_rank)
                rs.append(acc - base_acc)
                states.append(state)
                for key in health:
                    health[key] += h[key]
                jobs.update()
            res = DatasetResult(k, sum(rs) / len(rs), rs, health["zero_signal_groups"], health["skipped"])
            best = _keep_best(best, res, states)
            results.append(res)
    jobs.close()
    return results, best


@contextlib.contextmanager
def _attached(student, lora_rank):
    """The baseline wrapped for LoRA students inside (engines/lora.py), plain again after."""
    if lora_rank:
        lora.attach(student)
    try:
        yield student
    finally:
        if lora_rank:
            lora.detach(student)


def train_lockstep(model, tok, students, steps, cfg):
    """SOAR step 3 for LoRA students: the students, each (adapter, pairs, rng, seed generator) on
    model's baseline, advance together one RLOO step at a time, so that each step draws all of their
    batches in one sampler call (on vLLM one generate, a LoRARequest per student). Each student
    draws from its own streams only, so its result does not depend on who shares the loop: trained
    alone (train(..., seeds=gen)) it is the same. Returns each student's health counts."""
    runs = []
    for ad, _, rng, _ in students:
        lora.use(model, ad)  # the optimiser takes the active adapter's parameters
        runs.append(start_run(model, steps, cfg, rng))
    health = [{"zero_signal_groups": 0, "skipped": 0} for _ in students]
    dev = next(model.parameters()).device
    try:
        for step in range(steps):
            batches = [draw_batch(run, pairs, step, cfg.questions) for run, (_, pairs, _, _) in zip(runs, students)]
            jobs = [(ad, [student_prompt(q, cfg.style) for q, _ in b], next_seed(gen))
                    for (ad, _, _, gen), b in zip(students, batches)]
            with precision(cfg.dtype, dev):
                comps = sample_students(model, tok, jobs, n=cfg.group, temperature=cfg.temperature, top_p=cfg.top_p,
                                        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.sample_batch)
            for i, (ad, *_) in enumerate(students):
                lora.use(model, ad)
                stats = learn(model, runs[i], step, batches[i], comps[i], cfg, tok.pad_token_id)
                runs[i].opt.zero_grad(set_to_none=True)  # one student's gradients at a time, not g*r
                health[i]["zero_signal_groups"] += stats["zero_signal_groups"]
                health[i]["skipped"] += stats["skipped"]
    finally:
        lora.use(model, None)
    return health


def _lockstep_rewards(student, tok, datasets, reward_qs, base_acc, repeats, steps, cfg, seed, eval_max_new_tokens,
                      threads, lora_rank):
    """grounded_rewards for LoRA students in lockstep: all g*r adapters (and their AdamW states)
    are held at once, beside the one baseline; each student is seeded as on the other paths."""
    students = []
    for k, data in enumerate(datasets):
        for j in range(repeats):
            rng, gen = _student_seeds(seed, k, j)
            students.append((lora.Adapter(student, lora_rank, generator=gen), [(q, a) for _, q, a in data], rng, gen))
    with _attached(student, lora_rank), _threads(threads):
        health = train_lockstep(student, tok, students, steps, cfg)
        with precision(cfg.dtype, next(student.parameters()).device):
            accs = qr_accuracies(student, tok, [s[0] for s in students], reward_qs, cfg.style,
                                 eval_max_new_tokens or cfg.max_new_tokens, cfg.eval_samples, seed)
    results, best = [], None
    for k in range(len(datasets)):
        ids = range(k * repeats, (k + 1) * repeats)
        rs = [accs[i] - base_acc for i in ids]
        res = DatasetResult(k, sum(rs) / len(rs), rs, sum(health[i]["zero_signal_groups"] for i in ids),
                            sum(health[i]["skipped"] for i in ids))
        best = _keep_best(best, res, [students[i][0].state() for i in ids])
        results.append(res)
    return results, best


def learnability_rewards(student, tok, datasets, group, cfg, seed=None):
    """Intrinsic-T baseline: per question r_i = 0 if s_i == 0 else 1 - s_i, s_i the student's
    success rate over `group` samples (checked against the teacher's answer); dataset mean.
    With a seed, dataset k's samples are drawn from torch seeded by (seed, k) alone, so they do
    not depend on what ran before (e.g. whether the inner students trained here or in Ray)."""
    out = []
    for k, data in enumerate(datasets):
        if seed is not None:
            torch.manual_seed(seed * 100_003 + 7_777_777 + k)
        per_q = []
        for _, q, a in data:
            comps = sample(student, tok, [student_prompt(q, cfg.style)], n=group, temperature=cfg.temperature,
                           max_new_tokens=cfg.max_new_tokens, batch_size=cfg.sample_batch)
            s = sum(grade(c.text, a, style=cfg.style) for c in comps) / group
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--teacher", required=True, help="teacher model: directory, .gguf file or hub name")
    ap.add_argument("--student", required=True, help="baseline student model: directory, .gguf file or hub name")
    ap.add_argument("--reward-data", required=True, help="JSONL of hard problems (Q_R is drawn from it)")
    ap.add_argument("--g", type=int, default=4, help="datasets per teacher step (the teacher's RLOO group)")
    ap.add_argument("--n", type=int, default=16, help="questions per dataset")
    ap.add_argument("--r", type=int, default=1, help="students trained per dataset")
    ap.add_argument("--inner-steps", type=int, default=20, help="S, RLOO steps per inner student")
    ap.add_argument("--m", type=int, default=32, help="reward questions Q_R drawn from --reward-data")
    ap.add_argument("--teacher-max-new-tokens", type=int, default=160,
                    help="teacher completion budget (the toy preset's; the paper's is 512)")
    ap.add_argument("--student-max-new-tokens", type=int, default=120,
                    help="student completion budget, training and evaluation (the toy preset's; the paper's is 1024)")
    ap.add_argument("--out", help="save the updated teacher here")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draws")
    add_prompt_args(ap)
    add_sampler_args(ap)
    a = ap.parse_args(argv)
    if a.g < 2:
        ap.error("--g must be >= 2 for RLOO")
    style = resolve_style(ap, a, a.teacher)
    try:
        hard = load_problems(a.reward_data)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(a.seed)
    tok = load_tokenizer(a.teacher)
    teacher, student = load_model(a.teacher), load_model(a.student)
    use_sampler(a.sampler, a.teacher, a.vllm_memory)
    cfg = RLConfig(lr=1e-4, questions=8, group=8, max_new_tokens=a.student_max_new_tokens, style=style)
    datasets, st = sample_teacher_datasets(teacher, tok, a.g, a.n, style, max_new_tokens=a.teacher_max_new_tokens)
    qr = random.Random(a.seed).sample(hard, min(a.m, len(hard)))
    base = greedy_accuracy(student, tok, qr, style, a.student_max_new_tokens)
    results, _ = grounded_rewards(student, tok, datasets, qr, base, a.r, a.inner_steps, cfg, a.seed, progress=True)
    opt, sched = make_optimizer(teacher, 1e-5, 1)
    tcfg = RLConfig(lr=1e-5, max_new_tokens=a.teacher_max_new_tokens, style=style)
    stats = teacher_step(teacher, opt, None, datasets, [r.reward for r in results], tcfg, tok.pad_token_id,
                         frozen_copy(teacher))
    print(json.dumps({"rejection_rate": st["rejection_rate"], "baseline_acc": base,
                      "rewards": [r.reward for r in results], **stats}))
    if a.out:
        save_model(teacher, tok, a.out, style)


if __name__ == "__main__":
    main()

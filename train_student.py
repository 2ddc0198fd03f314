"""
train_student.py -- the inner loop: a handwritten RLOO (RLVR) trainer.

One step:
  1. draw `questions` (question, reference answer) pairs, sample `group` completions
     each at the training temperature;
  2. score each with the shaped reward (120 / 20 / 10 / 0, evaluate.shaped_reward);
  3. RLOO advantage: A_i = r_i - mean_{j != i} r_j within each question's group;
  4. one optimiser step on  -sum_i A_i * log pi(y_i) / (completion tokens in the batch)
     (+ kl_coef * k3 KL to a frozen reference), gradient clipped.

Simplifications, all deliberate:
  - exactly one optimiser step per batch of fresh samples, so the policy that sampled
    is the policy being updated: the importance ratio is 1 and PPO-style clipping
    would do nothing; it is left out;
  - advantages are not divided by their std (RLOO as in the paper);
  - no value network, no reward model: the reward is the verifier.

Run alone it trains on a problem file (with real hard problems, the Hard-Only baseline):

    python train_student.py --model toy/model --data toy/hard/train.jsonl --steps 30 --out runs/hard_only
"""
import argparse
import copy
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from engines import lora
from engines.lean import fast_path_ok, lean_hidden, lean_weights
from evaluate import greedy_accuracy, load_problems, shaped_reward
from generate import (HelpFormatter, add_prompt_args, add_sampler_args, load_model, load_tokenizer, precision,
                      resolve_style, sample, save_model, student_prompt, use_sampler)


@dataclass
class RLConfig:
    lr: float = 1e-5
    warmup: int = 0                # linear warmup steps, then cosine decay to 0 over the run
    kl_coef: float = 0.001         # k3 KL to the frozen starting policy; 0 disables (no reference copy)
    questions: int = 8             # questions per step
    group: int = 32                # samples per question (the RLOO group)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    grad_clip: float = 1.0
    micro_batch: int = 64          # sequences per forward/backward (gradient accumulation)
    sample_batch: int = 64         # sequences per generate call
    style: str = "math"            # prompt wording (generate.STUDENT_PROMPTS)
    dtype: str = "fp32"            # "bf16": bf16 autocast over fp32 weights, bf16 frozen reference (generate.precision)
    eval_samples: int = 0          # an inner student's Acc on Q_R: 0 greedy (the paper's), K mean success of K draws


@dataclass
class Episode:
    prompt_ids: list    # prompt tokens
    ids: list           # completion tokens (EOS included when produced)
    reward: float
    advantage: float = 0.0


def rloo_advantages(rewards):
    """rewards: [groups, G] tensor -> A = r - (sum of the others) / (G - 1)."""
    G = rewards.shape[-1]
    if G < 2:
        raise ValueError("RLOO needs at least 2 samples per group")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (G - 1)


def completion_logprobs(model, episodes, temperature, pad_id, fast=None):
    """Per-token log-probs of each completion under model at `temperature`, and the mask:
    both [B, longest completion], row i's tokens first, then padding (mask 0).

    The mask is built from the completion lengths (not from `!= pad`), so an EOS equal to the
    pad token stays in the loss: the model must learn when to stop. Log-probs use
    logits / temperature, the distribution the sampler drew from (top_p = 1). Llama-family
    models take `shared_prompt_logprobs` (same numbers, less work); others the HF forward."""
    if fast_path_ok(model) if fast is None else fast:
        return shared_prompt_logprobs(model, episodes, temperature)
    seqs = [e.prompt_ids + e.ids for e in episodes]
    T, Tc = max(map(len, seqs)), max(len(e.ids) for e in episodes)
    dev = next(model.parameters()).device
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long, device=dev)
    attn = torch.zeros_like(x)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s, device=dev)
        attn[i, :len(s)] = 1
    logits = model(input_ids=x, attention_mask=attn).logits.float() / temperature
    # position p - 1 + j predicts completion token j
    at = torch.tensor([[len(e.prompt_ids) - 1 + min(j, len(e.ids) - 1) for j in range(Tc)] for e in episodes], device=dev)
    logits = torch.gather(logits, 1, at[..., None].expand(-1, -1, logits.shape[-1]))
    return _token_logprobs(logits, episodes, Tc, dev)


def _token_logprobs(logits, episodes, Tc, dev):
    ids = torch.zeros(len(episodes), Tc, dtype=torch.long, device=dev)
    mask = torch.zeros(len(episodes), Tc, device=dev)
    for i, e in enumerate(episodes):
        ids[i, :len(e.ids)] = torch.tensor(e.ids, device=dev)
        mask[i, :len(e.ids)] = 1
    return torch.gather(F.log_softmax(logits, -1), 2, ids[..., None]).squeeze(-1), mask


def shared_prompt_logprobs(model, episodes, temperature):
    """completion_logprobs for Llama-family models, with each distinct prompt run once.

    The samples of an RLOO group share their prompt, so its keys and values are computed once
    and every completion attends to them; the gradient reaches the prompt's computation from
    all of its completions. Same positions, same arithmetic as the full forward (a test checks
    log-probs and gradients against it); the prompt work shrinks by the group size."""
    dev = next(model.parameters()).device
    prompts = list(dict.fromkeys(tuple(e.prompt_ids) for e in episodes))
    row = torch.tensor([prompts.index(tuple(e.prompt_ids)) for e in episodes], device=dev)
    plen = torch.tensor([len(p) for p in prompts], device=dev)
    P, B, Tp, Tc = len(prompts), len(episodes), int(plen.max()), max(len(e.ids) for e in episodes)
    w = lean_weights(model, Tp + Tc)
    nh, nkv, hd = w["heads"]
    pad = lambda seqs, T: torch.tensor([list(s) + [0] * (T - len(s)) for s in seqs], device=dev)  # noqa: E731
    # 1. the prompts, right-padded, causal (a padding position is never attended to below)
    cache = [tuple(torch.zeros(P, nkv, Tp, hd, device=dev) for _ in "kv") for _ in w["layers"]]
    causal = torch.full((Tp + Tc, Tp + Tc), float("-inf"), device=dev).triu(1)
    hp = lean_hidden(w, pad(prompts, Tp), torch.arange(Tp, device=dev).expand(P, Tp), cache, 0, causal[None, None, :Tp, :Tp])
    # 2. the completions, each after its own prompt: its prompt's keys up to the prompt's length, then its own causally
    # index_select, not x[row]: its backward (index_add) is deterministic on CPU, advanced
    # indexing's (index_put with accumulate) is not with more than one thread
    cache = [tuple(torch.cat([x.index_select(0, row), x.new_zeros(B, nkv, Tc, hd)], 2) for x in kv) for kv in cache]
    mask = torch.zeros(B, 1, Tc, Tp + Tc, device=dev)
    mask[:, 0, :, :Tp] = torch.where(torch.arange(Tp, device=dev)[None] < plen[row][:, None], 0.0, float("-inf"))[:, None]
    mask[:, 0, :, Tp:] = causal[Tp:, Tp:]
    pos = plen[row][:, None] + torch.arange(Tc, device=dev)
    hc = lean_hidden(w, pad([e.ids for e in episodes], Tc), pos, cache, Tp, mask)
    # 3. completion token j is predicted from the state before it: the prompt's last, then its own
    last = hp.gather(1, (plen - 1)[:, None, None].expand(P, 1, hp.shape[-1])).index_select(0, row)
    h = torch.cat([last, hc[:, :-1]], 1)
    return _token_logprobs(F.linear(h, w["lm_head"]).float() / temperature, episodes, Tc, dev)


def pg_loss(logp, mask, advantages, n_tokens):
    """-sum over completion tokens of A * log pi, divided by n_tokens (see policy_gradient_step)."""
    return -(advantages[:, None] * logp * mask).sum() / n_tokens


def policy_gradient_step(model, opt, episodes, cfg, pad_id, ref_model=None, sched=None):
    """One optimiser step of -A * log pi (+ k3 KL) over all episodes; returns stats.

    Loss normaliser: the sum over every completion token of the batch, divided by the
    total number of completion tokens in the batch (not per sequence, then averaged).
    Each token counts the same, so long completions are not down-weighted per token
    (which would favour long wrong answers), and micro-batching does not change the
    gradient. A non-finite loss or gradient skips the update and leaves the weights as they were."""
    model.train()
    dev = next(model.parameters()).device
    n_tok = sum(len(e.ids) for e in episodes)
    opt.zero_grad(set_to_none=True)
    tot_pg = tot_kl = 0.0
    # micro-batches of similar length (each is padded to its own longest sequence, not the batch's),
    # a prompt's samples kept together (its work is shared: see shared_prompt_logprobs)
    groups = {}
    for e in episodes:
        groups.setdefault(tuple(e.prompt_ids), []).append(e)
    order = [e for g in sorted(groups.values(), key=lambda g: max(len(e.prompt_ids) + len(e.ids) for e in g)) for e in g]
    for s in range(0, len(order), cfg.micro_batch):
        mb = order[s:s + cfg.micro_batch]
        with precision(cfg.dtype, dev):
            logp, mask = completion_logprobs(model, mb, cfg.temperature, pad_id)
        adv = torch.tensor([e.advantage for e in mb], device=logp.device)
        pg = pg_loss(logp, mask, adv, n_tok)
        loss = pg
        if ref_model is not None and cfg.kl_coef > 0:
            # ref_model is model: a LoRA policy, whose reference is its own baseline with the adapter off
            with torch.inference_mode(), precision(cfg.dtype, dev), (lora.off(model) if ref_model is model else nullcontext()):
                ref_logp, _ = completion_logprobs(ref_model, mb, cfg.temperature, pad_id)
            d = ref_logp - logp  # k3 estimator of KL(pi || ref): e^d - d - 1 >= 0, unbiased
            kl = ((torch.exp(d) - d - 1) * mask).sum() / n_tok
            loss = loss + cfg.kl_coef * kl
            tot_kl += kl.item()
        tot_pg += pg.item()
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable(model), cfg.grad_clip).item()
    skipped = not (math.isfinite(tot_pg) and math.isfinite(tot_kl) and math.isfinite(grad_norm))
    if skipped:
        print(f"warning: non-finite loss or gradient (pg={tot_pg}, grad_norm={grad_norm}); update skipped", file=sys.stderr)
        opt.zero_grad(set_to_none=True)
    else:
        opt.step()
    if sched is not None:
        sched.step()
    return dict(pg_loss=tot_pg, kl=tot_kl, grad_norm=grad_norm, skipped=int(skipped), tokens=n_tok)


def trainable(model):
    """The parameters an update moves: all of them, or a LoRA policy's adapter alone (engines/lora.py)."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model, lr, total_steps, warmup=0):
    """AdamW with linear warmup then cosine decay to zero over total_steps."""
    opt = torch.optim.AdamW(trainable(model), lr=lr, weight_decay=0.0)
    def f(s):
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total_steps - warmup))))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, f)


def frozen_copy(model, dtype="fp32"):
    """A frozen copy of model (a KL reference), in bf16 when the run is (it is only ever read)."""
    ref = copy.deepcopy(model).eval()
    if dtype == "bf16":
        ref.to(torch.bfloat16)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@dataclass
class Run:
    """One student's place in its RLOO run: question order, optimiser, schedule, reference. A
    lockstep loop (train_teacher.train_lockstep) advances several of them one step at a time."""
    rng: random.Random
    opt: torch.optim.Optimizer
    sched: object
    ref: object = None             # the KL reference: a frozen copy, the model itself (LoRA: adapter off), or None
    order: list = field(default_factory=list)
    pool: object = None


def start_run(model, steps, cfg, rng=None):
    ref = None
    if cfg.kl_coef > 0:
        ref = model if lora.active(model) else frozen_copy(model, cfg.dtype)
    return Run(rng or random.Random(0), *make_optimizer(model, cfg.lr, steps, cfg.warmup), ref=ref)


def draw_batch(run, pairs, step, n):
    """n questions, drawn in shuffled passes over the pool (no repeats within a pass). `pairs` may
    be a function of the step returning the pool (a curriculum)."""
    new_pool = pairs(step) if callable(pairs) else pairs
    if new_pool is not run.pool:
        run.pool, run.order = new_pool, []
    batch = []
    while len(batch) < n:
        if not run.order:
            run.order = list(range(len(run.pool)))
            run.rng.shuffle(run.order)
        batch.append(run.pool[run.order.pop()])
    return batch


def learn(model, run, step, batch, comps, cfg, pad_id):
    """Score the batch's completions, RLOO advantages, one policy-gradient step; returns its stats."""
    rewards = torch.tensor([shaped_reward(c.text, batch[i // cfg.group][1], style=cfg.style)
                            for i, c in enumerate(comps)])
    flat = rewards.view(len(batch), cfg.group)
    adv = rloo_advantages(flat).flatten()
    eps = [Episode(c.prompt_ids, c.ids, r.item(), a.item()) for c, r, a in zip(comps, rewards, adv)]
    # at step 0 the policy is the reference: the k3 KL and its gradient are exactly 0, so skip its forward
    stats = policy_gradient_step(model, run.opt, eps, cfg, pad_id, run.ref if step > 0 else None, run.sched)
    stats.update(step=step, reward=rewards.mean().item(), accuracy=(rewards == 120.0).float().mean().item(),
                 zero_signal_groups=int((flat.max(1).values == flat.min(1).values).sum()),
                 lr=run.sched.get_last_lr()[0])
    return stats


def train(model, tok, pairs, steps, cfg, rng=None, on_step=None, progress=False, seeds=None):
    """Train `model` in place with RLOO on (question, answer) pairs for `steps` steps; return it.

    Sampling continues torch's global RNG, or with `seeds` (a torch.Generator: LoRA students,
    whose lockstep loop interleaves them) each step's draw is seeded by the next number from it."""
    from tqdm import tqdm

    run = start_run(model, steps, cfg, rng)
    dev = next(model.parameters()).device
    for step in tqdm(range(steps), desc="student RLOO", disable=not progress, leave=False):
        batch = draw_batch(run, pairs, step, cfg.questions)
        with precision(cfg.dtype, dev):
            comps = sample(model, tok, [student_prompt(q, cfg.style) for q, _ in batch], n=cfg.group,
                           temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.sample_batch, seed=None if seeds is None else next_seed(seeds))
        stats = learn(model, run, step, batch, comps, cfg, tok.pad_token_id)
        if on_step:
            on_step(stats, batch, comps)
    return model


def next_seed(gen):
    return int(torch.randint(2 ** 31 - 1, (), generator=gen))


# -----------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="local model directory, .gguf file or hub name")
    ap.add_argument("--data", required=True, help="JSONL problems to train on")
    ap.add_argument("--eval-data", help="JSONL problems for greedy accuracy before/after (default: --data)")
    ap.add_argument("--out", required=True, help="run directory")
    ap.add_argument("--steps", type=int, default=30, help="RLOO steps")
    ap.add_argument("--seed", type=int, default=0, help="seed of question order and sampling")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: bfloat16 autocast over fp32 master weights (generate.precision)")
    g = ap.add_argument_group("RLOO (defaults: the toy world's; the paper uses lr 1e-5, 8 x 32, 1024 tokens)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    g.add_argument("--warmup", type=int, default=0, help="linear warmup steps before the cosine decay")
    g.add_argument("--kl-coef", type=float, default=0.001, help="weight of the k3 KL to the starting policy (0: none)")
    g.add_argument("--questions", type=int, default=8, help="questions per step")
    g.add_argument("--group", type=int, default=8, help="samples per question (the RLOO group)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--max-new-tokens", type=int, default=120,
                   help="student completion budget (the toy preset's; the paper's is 1024)")
    add_prompt_args(ap)
    add_sampler_args(ap)
    a = ap.parse_args(argv)
    if a.group < 2:
        ap.error("--group must be >= 2 for RLOO")
    style = resolve_style(ap, a, a.model)
    cfg = RLConfig(lr=a.lr, warmup=a.warmup, kl_coef=a.kl_coef, questions=a.questions, group=a.group,
                   temperature=a.temperature, max_new_tokens=a.max_new_tokens, style=style, dtype=a.dtype)
    try:
        probs = load_problems(a.data)
        evals = load_problems(a.eval_data) if a.eval_data else probs
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    tok, model = load_tokenizer(a.model), load_model(a.model)
    use_sampler(a.sampler, a.model, a.vllm_memory, dtype=a.dtype)
    dev = next(model.parameters()).device
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump({**vars(a), "rl": asdict(cfg)}, f, indent=1)
    with precision(a.dtype, dev):
        acc0 = greedy_accuracy(model, tok, evals, style, a.max_new_tokens)
    print(f"greedy accuracy before: {acc0:.3f}")
    mf, sf, t0 = open(os.path.join(a.out, "metrics.jsonl"), "w"), open(os.path.join(a.out, "samples.jsonl"), "w"), time.time()

    def log(stats, batch, comps):
        mf.write(json.dumps({**stats, "seconds": time.time() - t0}) + "\n")
        mf.flush()
        for i, c in enumerate(comps):
            sf.write(json.dumps({"step": stats["step"], "question": batch[i // cfg.group][0], "completion": c.text}) + "\n")
        print(f"step {stats['step']:4d} reward {stats['reward']:6.2f} acc {stats['accuracy']:.3f} "
              f"zero-signal groups {stats['zero_signal_groups']}/{len(batch)}")

    train(model, tok, [(p["problem"], p["answer"]) for p in probs], a.steps, cfg, random.Random(a.seed), log, True)
    with precision(a.dtype, dev):
        acc1 = greedy_accuracy(model, tok, evals, style, a.max_new_tokens)
    print(f"greedy accuracy after: {acc1:.3f}")
    save_model(model, tok, os.path.join(a.out, "model"), style)
    with open(os.path.join(a.out, "result.json"), "w") as f:
        json.dump({"greedy_before": acc0, "greedy_after": acc1}, f)


if __name__ == "__main__":
    main()

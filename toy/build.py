"""
python -m toy.build -- build the toy world: a byte-level tokenizer, a tiny Llama, its pretraining,
and the hard set (found with evaluate.py's fail@k filter, not assumed). Run it from the repository
root:

    python -m toy.build pretrain                        # one stage, ~15 min on 2 CPU cores -> runs/toy/model
    python -m toy.build edge --model toy/model          # skill by difficulty: where the edge is
    python -m toy.build hardset --model toy/model       # fail@128 filter -> runs/toy/hard/{train,test}.jsonl

By default nothing is written under toy/: pretrain writes runs/toy/model (and its step checkpoints
beside it), hardset runs/toy/hard, and edge prints its table (--out writes it too). The shipped
toy/model, toy/hard and toy/edge.json are only replaced when --out toy/model, --out-dir toy/hard or
--out toy/edge.json ask for it. toy/README.md gives the exact commands that made them (three
pretraining stages, the edge table, then the hard-set filter).

Token budget: edge and hardset let the student (and, in edge, the teacher) write up to
--max-new-tokens 200 tokens, as toy/edge.json and toy/hard were made. That is more than soar.py's
toy preset (student 120, teacher 160) on purpose: a correct L = 10 student completion takes 96
tokens and a teacher question at L = 10 with its working 134, so a problem is never counted as
failed, or a teacher completion as invalid, only because the budget cut it.

The corpus teaches two things, in the exact prompt formats of generate.py:
  (a) solving chains in the student format, with a decaying tail of difficulty
      P(L) ~ 0.4^L for L = 1..10 (a few long chains, so skill fades gradually);
  (b) writing chains of every difficulty L = 1..10 (uniform) in the teacher format,
      working between the tags. The teacher format thus "knows" long chains that the
      student format cannot yet do: the latent skill SOAR needs.
"""
import argparse
import json
import math
import os
import random
import shlex
import sys
import time

import torch

from generate import HelpFormatter, student_prompt, teacher_prompt
from toy import task

EOS = "<|endoftext|>"
MAX_L = 10
STUDENT_DECAY = 0.4


def build_tokenizer():
    """Byte-level: one token per UTF-8 byte (256) plus EOS; loads with AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, pad_token=EOS)


def build_model(vocab_size, eos_id):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return LlamaForCausalLM(cfg)


def corpus_text(rng):
    """One pretraining text: (prompt, completion)."""
    if rng.random() < 0.5:
        w = [STUDENT_DECAY ** L for L in range(1, MAX_L + 1)]
        L = rng.choices(range(1, MAX_L + 1), weights=w)[0]
        q = task.make_question(L, rng)
        return student_prompt(q, "toy"), task.student_completion(q)
    q = task.make_question(rng.randint(1, MAX_L), rng)
    return teacher_prompt("toy"), task.teacher_completion(q)


def batch(tok, rng, size):
    ids, labels = [], []
    for _ in range(size):
        p, c = corpus_text(rng)
        pi, ci = tok(p, add_special_tokens=False)["input_ids"], tok(c + EOS, add_special_tokens=False)["input_ids"]
        ids.append(pi + ci)
        labels.append([-100] * len(pi) + ci)  # learn completions, not prompts
    T = max(map(len, ids))
    pad = tok.pad_token_id
    x = torch.tensor([s + [pad] * (T - len(s)) for s in ids])
    y = torch.tensor([s + [-100] * (T - len(s)) for s in labels])
    m = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in ids])
    return x, y, m


def pretrain(a):
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    task.ANSWER_DIGITS = a.answer_digits
    rng = random.Random(a.seed)
    tok = build_tokenizer()
    if a.init:  # continue pretraining from a checkpoint (a fresh optimiser and schedule)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(a.init)
    else:
        model = build_model(len(tok), tok.eos_token_id)
    print(f"params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
    lr_at = lambda s: a.lr * min(1, (s + 1) / a.warmup) * 0.5 * (1 + math.cos(math.pi * s / a.steps))  # noqa: E731
    t0 = time.time()
    for step in range(a.steps):
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step)
        x, y, m = batch(tok, rng, a.batch)
        loss = model(input_ids=x, attention_mask=m, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == a.steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f} lr {lr_at(step):.2e} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) in a.save_at or step == a.steps - 1:
            out = a.out if step == a.steps - 1 else f"{a.out}-step{step + 1}"
            model.save_pretrained(out)
            tok.save_pretrained(out)
            with open(os.path.join(out, "build.json"), "w") as f:
                json.dump({**vars(a), "step": step + 1}, f, indent=1)
            print(f"saved {out}", flush=True)


def hardset(a):
    """Candidates one rung or more above the student's edge, kept only if 0/k samples solve them."""
    import evaluate

    records = []
    per = a.per_level * len(a.levels) if len(a.per_level) == 1 else a.per_level
    if len(per) != len(a.levels):
        raise SystemExit("error: --per-level takes one count, or one per --levels entry")
    for L, n in zip(a.levels, per):
        records += task.problems(n, L, seed=a.seed + L)
    os.makedirs(a.out_dir, exist_ok=True)
    pool = os.path.join(a.out_dir, "pool.jsonl")
    with open(pool, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    evaluate.main(["--model", a.model, "--data", pool, "--fail-at", str(a.k), "--style", "toy",
                   "--max-new-tokens", str(a.max_new_tokens), "--batch-size", "128", "--out", a.out_dir,
                   "--seed", str(a.seed)])


def edge(a):
    """Print the student's skill by difficulty (sampled at T=1 and greedy) and the teacher
    format's validity and answer accuracy: where the edge of learnability is."""
    import evaluate
    from evaluate import teacher_pair
    from generate import load_model, load_tokenizer, sample

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    tok, model = load_tokenizer(a.model), load_model(a.model)
    rows = []
    for L in a.levels:
        probs = task.problems(a.per_level, L, seed=10_000 + L)  # not the hard pool's seeds
        counts = evaluate.success_counts(model, tok, probs, a.samples, "toy", max_new_tokens=a.max_new_tokens,
                                         batch_size=128, progress=False)
        g = evaluate.greedy_accuracy(model, tok, probs, "toy", max_new_tokens=a.max_new_tokens)
        rows.append({"L": L, "sampled": sum(counts) / (a.samples * len(probs)), "greedy": g,
                     "solved_any": sum(c > 0 for c in counts) / len(probs)})
        print(json.dumps(rows[-1]), flush=True)
    comps = sample(model, tok, [teacher_prompt("toy")], n=a.teacher_samples, max_new_tokens=a.max_new_tokens,
                   batch_size=128)
    parsed = [teacher_pair(c.text) for c in comps]
    ok = [p for p in parsed if p]
    by_L = {}
    for q, ans in ok:
        L = task.difficulty(q)
        right = L is not None and task.solve(q)[1] == ans
        by_L.setdefault(L, []).append(right)
    levels = sorted(by_L.items(), key=lambda x: (x[0] is None, x[0] or 0))  # L = None (not a chain) last
    teacher = {"valid": len(ok) / len(comps),
               "by_L": {str(L): {"share": len(v) / len(ok), "answer_right": sum(v) / len(v)} for L, v in levels}}
    print(json.dumps({"teacher": teacher}), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"student": rows, "teacher": teacher, "model": a.model}, f, indent=1)


BUDGET = ("200, as the shipped files were made, is more than soar.py's toy preset (student 120, teacher 160) "
          "on purpose: a correct L = 10 student completion takes 96 tokens")
STUDENT_BUDGET_HELP = f"student completion budget in tokens; {BUDGET}, so no candidate counts as unsolved only " \
                      "because a completion was cut"
EDGE_BUDGET_HELP = f"completion budget in tokens, student and teacher alike; {BUDGET} and a teacher question " \
                   "at L = 10 with its working 134, so no completion fails only because it was cut"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m toy.build", description=__doc__, formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{pretrain,hardset,edge}")
    p = sub.add_parser("pretrain", help="pretrain the toy model on the corpus", formatter_class=HelpFormatter,
                       description="Pretrain the toy model (or continue from --init) on the corpus.\n"
                                   "toy/README.md gives the three stages that made toy/model.")
    p.add_argument("--out", default=os.path.join("runs", "toy", "model"),
                   help="model directory (--out toy/model replaces the shipped model)")
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps")
    p.add_argument("--batch", type=int, default=64, help="sequences per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps, then cosine decay to zero")
    p.add_argument("--save-at", type=int, nargs="*", default=[500, 750, 1000, 1250],
                   help="also save OUT-step<N> at these steps")
    p.add_argument("--init", help="continue from this checkpoint (a fresh optimiser and schedule) instead of a "
                                  "random init (default: a random init)")
    p.add_argument("--answer-digits", type=int, default=task.ANSWER_DIGITS,
                   help="answers hold the last N running results (0: all; the first two stages used 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the corpus")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    h = sub.add_parser("hardset", help="the fail@k filter on fresh candidates: the hard set",
                       formatter_class=HelpFormatter,
                       description="Draw candidates at the given difficulties, keep those that no sample\n"
                                   "solves (fail@k), split them 50/50 into train.jsonl and test.jsonl.")
    h.add_argument("--model", default="toy/model", help="the model to filter with")
    h.add_argument("--levels", type=int, nargs="+", default=[9], help="difficulties L of the candidates")
    h.add_argument("--per-level", type=int, nargs="+", default=[320],
                   help="candidates per level: one count for all, or one per --levels entry")
    h.add_argument("--k", type=int, default=128, help="samples per candidate (T = 1); kept if none is right")
    h.add_argument("--max-new-tokens", type=int, default=200, help=STUDENT_BUDGET_HELP)
    h.add_argument("--out-dir", default=os.path.join("runs", "toy", "hard"),
                   help="output directory (--out-dir toy/hard replaces the shipped hard set)")
    h.add_argument("--seed", type=int, default=0, help="seed of the candidates and of the split")
    e = sub.add_parser("edge", help="the model's skill by difficulty L, student and teacher",
                       formatter_class=HelpFormatter,
                       description="Print the student's success by difficulty L (sampled at T = 1 and greedy)\n"
                                   "and the teacher format's validity and answer accuracy.")
    e.add_argument("--model", default="toy/model", help="the model to measure")
    e.add_argument("--levels", type=int, nargs="+", default=list(range(3, 11)), help="difficulties L")
    e.add_argument("--per-level", type=int, default=32, help="problems per L")
    e.add_argument("--samples", type=int, default=16, help="student samples per problem, T = 1")
    e.add_argument("--teacher-samples", type=int, default=256, help="teacher completions")
    e.add_argument("--max-new-tokens", type=int, default=200, help=EDGE_BUDGET_HELP)
    e.add_argument("--out", help="also write the table here, as JSON (default: print only; toy/edge.json was "
                                 "made with --out toy/edge.json)")
    e.add_argument("--seed", type=int, default=0, help="torch seed of the sampling")
    e.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    a = ap.parse_args(argv)
    a.command = shlex.join(["python", "-m", "toy.build", *(sys.argv[1:] if argv is None else argv)])  # for build.json
    {"pretrain": pretrain, "hardset": hardset, "edge": edge}[a.cmd](a)


if __name__ == "__main__":
    main()

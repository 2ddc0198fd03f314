"""
Build the toy world: a byte-level tokenizer, a tiny Llama, its pretraining, and the
hard set (found with evaluate.py's fail@k filter, not assumed).

    python -m toy.build pretrain                        # one stage, ~15 min on 2 CPU cores -> runs/toy/model
    python -m toy.build edge --model toy/model          # skill by difficulty: where the edge is
    python -m toy.build hardset --model toy/model       # fail@128 filter -> runs/toy/hard/{train,test}.jsonl

By default nothing is written under toy/: the shipped toy/model and toy/hard are only
replaced when --out toy/model / --out-dir toy/hard ask for it. toy/README.md gives the exact
commands that made them (three pretraining stages, then the hard-set filter).

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
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from generate import student_prompt, teacher_prompt  # noqa: E402
from toy import task  # noqa: E402

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
                json.dump({**vars(a), "step": step + 1, "command": " ".join(sys.argv)}, f, indent=1)
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
                   "--max-new-tokens", "200", "--batch-size", "128", "--out", a.out_dir, "--seed", str(a.seed)])


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
        counts = evaluate.success_counts(model, tok, probs, a.samples, "toy", max_new_tokens=200, batch_size=128,
                                         progress=False)
        g = evaluate.greedy_accuracy(model, tok, probs, "toy", max_new_tokens=200)
        rows.append({"L": L, "sampled": sum(counts) / (a.samples * len(probs)), "greedy": g,
                     "solved_any": sum(c > 0 for c in counts) / len(probs)})
        print(json.dumps(rows[-1]), flush=True)
    comps = sample(model, tok, [teacher_prompt("toy")], n=a.teacher_samples, max_new_tokens=200, batch_size=128)
    parsed = [teacher_pair(c.text) for c in comps]
    ok = [p for p in parsed if p]
    by_L = {}
    for q, ans in ok:
        L = task.difficulty(q)
        right = L is not None and task.solve(q)[1] == ans
        by_L.setdefault(L, []).append(right)
    teacher = {"valid": len(ok) / len(comps),
               "by_L": {str(L): {"share": len(v) / len(ok), "answer_right": sum(v) / len(v)} for L, v in sorted(by_L.items(), key=lambda x: (x[0] is None, x[0] or 0))}}
    print(json.dumps({"teacher": teacher}), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"student": rows, "teacher": teacher, "model": a.model}, f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain", help="pretrain the toy model on the corpus")
    p.add_argument("--out", default=os.path.join("runs", "toy", "model"), help="model directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="sequences per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps, then cosine (default: %(default)s)")
    p.add_argument("--save-at", type=int, nargs="*", default=[500, 750, 1000, 1250],
                   help="also save OUT-step<N> at these steps (default: %(default)s)")
    p.add_argument("--init", help="continue from this checkpoint instead of a random init")
    p.add_argument("--answer-digits", type=int, default=task.ANSWER_DIGITS,
                   help="answers hold the last N running results (0: all; the first two stages used 0)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    h = sub.add_parser("hardset", help="the fail@k filter on fresh candidates: the hard set")
    h.add_argument("--model", default="toy/model", help="the model to filter with (default: %(default)s)")
    h.add_argument("--levels", type=int, nargs="+", default=[9, 10], help="difficulties L (default: %(default)s)")
    h.add_argument("--per-level", type=int, nargs="+", default=[48, 48], help="candidates per level (default: %(default)s)")
    h.add_argument("--k", type=int, default=128, help="samples per candidate (default: %(default)s)")
    h.add_argument("--out-dir", default=os.path.join("runs", "toy", "hard"), help="output directory (default: %(default)s)")
    h.add_argument("--seed", type=int, default=0, help="seed of the candidates and of the split (default: %(default)s)")
    e = sub.add_parser("edge", help="the model's skill by difficulty L, student and teacher")
    e.add_argument("--model", default="toy/model", help="the model to measure (default: %(default)s)")
    e.add_argument("--levels", type=int, nargs="+", default=list(range(3, 11)), help="difficulties L (default: 3..10)")
    e.add_argument("--per-level", type=int, default=32, help="problems per L (default: %(default)s)")
    e.add_argument("--samples", type=int, default=16, help="student samples per problem, T = 1 (default: %(default)s)")
    e.add_argument("--teacher-samples", type=int, default=256, help="teacher completions (default: %(default)s)")
    e.add_argument("--out", help="also write the table here (JSON; toy/edge.json was made this way)")
    e.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    e.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    a = ap.parse_args(argv)
    {"pretrain": pretrain, "hardset": hardset, "edge": edge}[a.cmd](a)


if __name__ == "__main__":
    main()

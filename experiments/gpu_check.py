"""
experiments/gpu_check.py -- wall time and peak GPU memory of the paper preset's pieces on one GPU,
at Llama-3.2-3B-Instruct's shape with random weights.

    python -m experiments.gpu_check --out runs/gpu_check                  # fp32, units a-d
    python -m experiments.gpu_check --out runs/gpu_check --dtype bf16 --units a,b,c
    python -m experiments.gpu_check --out runs/gpu_check --tiny           # smoke test, tiny model (CPU is fine)
    python -m experiments.gpu_check --out runs/gpu_check-lora --dtype bf16 --student-lora 16   # LoRA students

  a  generate.sample: 8 prompts x 32 samples x 1024 new tokens, temperature 1, one batch of 256 rows
     (PRESETS["paper"]["sample_batch"]); there are no stop ids, so every row runs to full length.
  b  train_student.policy_gradient_step: 256 sequences (8 prompts of ~100 tokens x 32 completions of
     1024), PRESETS["paper"]["micro_batch"], k3 KL (0.001) to a frozen reference, AdamW (lr 1e-5) with
     its state already allocated, as in every inner step after the first. After an out-of-memory it
     is tried again with half the micro-batch, down to 1; each try is a row. With --student-lora RANK
     the student is a LoRA adapter on the model (engines/lora.py): its reference is the model with the
     adapter off, AdamW holds the adapter only, lr x lora.LR_SCALE (soar.py's default).
  c  greedy decoding (what evaluate.greedy_accuracy runs): 64 prompts (Q_R's size), 1024 new tokens, batch 64.
  d  `python soar.py --steps 1` (the toy preset; CUDA when present) in a child process.

--dtype is the stages' own option (generate.precision, RLConfig.dtype). Each unit has its own
try/except, so an out-of-memory becomes a row and the rest still run. Seconds: wall time between
torch.cuda.synchronize() calls. GiB: "start" is allocated when the timed call begins (weights,
reference, optimizer state), "peak" is torch.cuda.max_memory_allocated() during the unit. No unit
starts after --budget seconds (one H200, fp32: about 6-7 minutes in all). Nothing is downloaded: the
model is built from the configuration below with random weights, and the samplers get IdTokenizer.
Writes <out>/gpu_check-<dtype>[-tiny].md (the table) and .json (rows, versions, GPU name and memory).
"""
import argparse
import gc
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import torch
import transformers
from transformers import BatchEncoding, LlamaConfig, LlamaForCausalLM

import train_student
from engines import lora
from generate import precision, sample
from soar import PRESETS
from train_student import Episode, RLConfig, frozen_copy, make_optimizer, policy_gradient_step, rloo_advantages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER, GiB = PRESETS["paper"], 2 ** 30
LLAMA_3B = dict(  # meta-llama/Llama-3.2-3B-Instruct's config.json: the fields that shape the model
    hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
    head_dim=128, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
    tie_word_embeddings=True, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=8192))
TINY = dict(LLAMA_3B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64)
WORK = dict(prompts=8, group=32, prompt_len=100, new_tokens=1024, eval_questions=64)
TINY_WORK = dict(prompts=2, group=4, prompt_len=12, new_tokens=16, eval_questions=4)
TINY_SOAR = ("--g 2 --n 2 --m 2 --inner-steps 1 --student-questions 2 --student-group 2 --student-max-new-tokens 20 "
             "--teacher-max-new-tokens 100 --sample-batch 8 --threads 1").split()
CHILD = ("import sys, torch, soar\ntry:\n    soar.main(sys.argv[1:])\nfinally:\n    print('GPU_CHECK_PEAK', "
         "torch.cuda.max_memory_allocated() if torch.cuda.is_available() else -1, flush=True)\n")
COLUMNS = ["| unit | work | status | seconds | tokens/s | start GiB | peak GiB | note |", "|---|---|---|---|---|---|---|---|"]


class IdTokenizer:
    """What generate.sample asks of a tokenizer, for prompts that are token ids written as text
    ("128000 791 3575"): left-padded batch encoding (as generate.load_tokenizer sets up), decode and
    eos_token_id. That is None, and so is the model's generation_config.eos_token_id (main), so
    generate.stop_ids is empty and random weights sample every row to its full length."""
    eos_token_id, pad_token_id = None, 0

    def __call__(self, texts, return_tensors="pt", padding=True):
        rows = [[int(x) for x in t.split()] for t in texts]
        T = max(map(len, rows))
        return BatchEncoding({"input_ids": torch.tensor([[0] * (T - len(r)) + r for r in rows]),
                              "attention_mask": torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])})

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def prompts(n, length, cfg, rng, text=True):
    """n prompts of BOS and random ids, each about `length` tokens (+-10%, so batches are padded)."""
    ps = [[cfg.bos_token_id] + [rng.randrange(cfg.vocab_size) for _ in range(rng.randint(length * 9 // 10, length * 11 // 10))]
          for _ in range(n)]
    return [" ".join(map(str, p)) for p in ps] if text else ps


class Probe:
    """One unit's row: where the unit is (an out-of-memory row says where) and its timed call."""

    def __init__(self, dev, unit, what):
        self.cuda, self.where = dev.type == "cuda", "setup"
        self.row = dict(unit=unit, what=what, status="ok", seconds=None, tokens_per_s=None, start_gib=None,
                        peak_gib=None, note="")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def begin(self, where):
        self.where = where
        if self.cuda:
            torch.cuda.synchronize()
            self.row["start_gib"] = torch.cuda.memory_allocated() / GiB
        self.t0 = time.perf_counter()

    def end(self, tokens=None):
        if self.cuda:
            torch.cuda.synchronize()
        self.row["seconds"] = time.perf_counter() - self.t0
        self.row["tokens_per_s"] = tokens / self.row["seconds"] if tokens else None

    def run(self, fn):
        try:
            self.row["note"] = fn(self)
        except torch.OutOfMemoryError as e:
            m = re.search(r"Tried to allocate ([\d.]+ [GMK]iB)", str(e))
            self.row["status"] = f"OOM at {self.where}" + (f" (allocating {m.group(1)})" if m else "")
        except Exception as e:
            self.row["status"] = f"error at {self.where}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        if self.cuda and self.row["unit"] != "d":
            self.row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB


def unit_decode(model, tok, cfg, W, probe, dtype, n_prompts, n, is_greedy, batch, seed):
    """Units a and c: generate.sample on random prompts, every row to full length."""
    ps = prompts(n_prompts, W["prompt_len"], cfg, random.Random(seed))
    probe.begin("greedy decoding" if is_greedy else "sampling")
    with precision(dtype, model.device):
        out = sample(model, tok, ps, n=n, temperature=PAPER["temperature"], top_p=PAPER["top_p"],
                     max_new_tokens=W["new_tokens"], batch_size=batch, greedy=is_greedy, seed=seed)
    probe.end(sum(len(c.ids) for c in out))
    full = sum(len(c.ids) == W["new_tokens"] for c in out)
    return f"{full}/{len(out)} rows at full length, batch {batch}; KV cache in {model.dtype} (fast_sample: model.dtype)"


def unit_b(model, tok, cfg, W, probe, dtype, micro_batch, lora_rank=0):
    rng = random.Random(1)
    ps = prompts(W["prompts"], W["prompt_len"], cfg, rng, text=False)
    rewards = torch.tensor([[rng.choice([0.0, 10.0, 20.0, 120.0]) for _ in range(W["group"])] for _ in ps])
    adv = rloo_advantages(rewards)
    eps = [Episode(p, [rng.randrange(cfg.vocab_size) for _ in range(W["new_tokens"])], rewards[i, j].item(),
                   adv[i, j].item()) for i, p in enumerate(ps) for j in range(W["group"])]
    rl = RLConfig(lr=PAPER["student_lr"] * (lora.LR_SCALE if lora_rank else 1), kl_coef=PAPER["student_kl"],
                  temperature=PAPER["temperature"], micro_batch=micro_batch, dtype=dtype)
    probe.where = "frozen reference copy"
    if lora_rank:  # the adapter on the model itself; its reference: the model with the adapter off
        lora.use(lora.attach(model), lora.Adapter(model, lora_rank))
        ref = model
    else:
        ref = frozen_copy(model, dtype)
    probe.where = "AdamW state"
    opt, sched = make_optimizer(model, rl.lr, PAPER["inner_steps"])
    for p in train_student.trainable(model):
        p.grad = torch.zeros_like(p)
    opt.step()  # on zero gradients: allocates exp_avg and exp_avg_sq, moves no weight (weight decay 0)
    opt.zero_grad(set_to_none=True)
    probe.begin("update (forward, reference forward, backward, AdamW step)")
    st = policy_gradient_step(model, opt, eps, rl, tok.pad_token_id, ref, sched)  # applies rl.dtype itself
    probe.end(st["tokens"])
    what = f"LoRA rank {lora_rank}, reference: adapter off" if lora_rank else f"reference in {next(ref.parameters()).dtype}"
    if lora_rank:
        lora.use(model, None)
        lora.detach(model)
    return f"{what}; pg {st['pg_loss']:.3g}, kl {st['kl']:.2g}, grad norm {st['grad_norm']:.3g}, skipped {st['skipped']}"


def unit_d(out_dir, tiny, dtype, probe, timeout):
    run = os.path.join(out_dir, f"toy-step-{dtype}" + ("-tiny" if tiny else ""))
    shutil.rmtree(run, ignore_errors=True)  # this check's own run directory: soar.py never reuses one
    extra = (TINY_SOAR if tiny else []) + (["--dtype", dtype] if dtype != "fp32" else [])
    probe.begin("python soar.py --steps 1")
    p = subprocess.run([sys.executable, "-c", CHILD, "--steps", "1", "--out", run] + extra, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    probe.end()
    peak = re.search(r"GPU_CHECK_PEAK (-?\d+)", p.stdout)
    probe.row.update(start_gib=None, peak_gib=int(peak.group(1)) / GiB if peak and int(peak.group(1)) >= 0 else None)
    if p.returncode:
        last = (p.stderr.strip().splitlines() or ["?"])[-1][:200]
        probe.row["status"] = ("OOM in soar.py: " if "OutOfMemoryError" in p.stderr else f"soar.py exit {p.returncode}: ") + last
    return "toy preset" + (", shrunk (--tiny)" if tiny else "") + (f", --dtype {dtype}" if dtype != "fp32" else "")


def row_md(r):
    f = lambda x, d: "" if x is None else f"{x:.{d}f}"  # noqa: E731
    return (f"| {r['unit']} | {r['what']} | {r['status']} | {f(r['seconds'], 1)} | {f(r['tokens_per_s'], 0)} | "
            f"{f(r['start_gib'], 1)} | {f(r['peak_gib'], 1)} | {r['note']} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join("runs", "gpu_check"), help="where the table and JSON go")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="numeric mode (generate.precision)")
    ap.add_argument("--units", default="a,b,c,d", help="comma-separated, from a,b,c,d")
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 256, tiny workloads: a smoke test")
    ap.add_argument("--budget", type=float, default=420, help="seconds after which no unit starts")
    ap.add_argument("--student-lora", type=int, default=0, metavar="RANK", help="unit b with a LoRA student of this rank")
    a = ap.parse_args(argv)
    units = a.units.split(",")
    if set(units) - set("abcd"):
        ap.error(f"--units: a comma-separated subset of a,b,c,d (got {a.units!r})")
    t_start, dev = time.perf_counter(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, W, cuda = LlamaConfig(**(TINY if a.tiny else LLAMA_3B)), (TINY_WORK if a.tiny else WORK), dev.type == "cuda"
    torch.manual_seed(0)
    model, tok = None, IdTokenizer()
    if set(units) & set("abc"):
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)  # random weights, fp32
        model.generation_config.eos_token_id = None  # no stop ids (see IdTokenizer)
    meta = dict(torch=torch.__version__, transformers=transformers.__version__, cuda=torch.version.cuda,
                device=torch.cuda.get_device_name() if cuda else "cpu", tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                device_gib=torch.cuda.get_device_properties(0).total_memory / GiB if cuda else None,
                dtype=a.dtype, tiny=a.tiny, units=units, config=TINY if a.tiny else LLAMA_3B, work=W, paper_preset=PAPER,
                parameters=sum(p.numel() for p in model.parameters()) if model is not None else None)
    head = (f"gpu_check: {meta['device']}" + (f" ({meta['device_gib']:.1f} GiB)" if cuda else "")
            + f", torch {meta['torch']}, transformers {meta['transformers']}, --dtype {a.dtype}"
            + (" --tiny" if a.tiny else "") + f", {meta['parameters'] or '-'} parameters, random weights")
    print(head + "\n\n" + "\n".join(COLUMNS), flush=True)
    rows, n_seq, T = [], W["prompts"] * W["group"], W["new_tokens"]

    def record(unit, what, fn):
        """One row: fn(probe, seconds left) in its own try/except, then whatever it left is freed."""
        probe, left = Probe(dev, unit, what), a.budget - (time.perf_counter() - t_start)
        if left > 0:
            probe.run(lambda p: fn(p, left))
        else:
            probe.row["status"] = f"skipped: past --budget {a.budget:.0f} s"
        rows.append(probe.row)
        print(row_md(probe.row), flush=True)
        free()
        return probe.row["status"]

    def free():  # the gradients, and a failed unit's tensors (held by its traceback), before the next unit
        if model is not None:
            model.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    if "a" in units:
        record("a", f"sample {W['prompts']} x {W['group']} x {T} new tokens", lambda p, _: unit_decode(
            model, tok, cfg, W, p, a.dtype, W["prompts"], W["group"], False, PAPER["sample_batch"], 0))
    mb = PAPER["micro_batch"]
    while "b" in units and record("b", f"PG step, {n_seq} seqs x {T} tokens, micro_batch {mb}",
                                  lambda p, _: unit_b(model, tok, cfg, W, p, a.dtype, mb, a.student_lora)
                                  ).startswith("OOM") and mb > 1:
        mb //= 2  # the same step with half the micro-batch
    if "c" in units:
        record("c", f"greedy {W['eval_questions']} x {T} new tokens", lambda p, _: unit_decode(
            model, tok, cfg, W, p, a.dtype, W["eval_questions"], 1, True, 64, 2))
    model = None  # the child gets the whole GPU
    free()
    if "d" in units:
        record("d", "toy preset, one outer step", lambda p, left: unit_d(a.out, a.tiny, a.dtype, p, max(30.0, left)))
    meta["seconds"] = time.perf_counter() - t_start
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"gpu_check-{a.dtype}" + (f"-lora{a.student_lora}" if a.student_lora else "")
                        + ("-tiny" if a.tiny else ""))
    with open(stem + ".md", "w") as f:
        f.write(head + "\n\n" + "\n".join(COLUMNS + [row_md(r) for r in rows]) + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\n{meta['seconds']:.0f} s in all; written: {stem}.md, {stem}.json")


if __name__ == "__main__":
    main()

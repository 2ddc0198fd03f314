"""
python -m experiments.memory_plan -- the paper preset's GPU memory, computed (not measured) from
Llama-3.2-3B-Instruct's configuration and what the code holds, for one GPU (--workers 0): full
fine-tuning or LoRA students (--student-lora), full or LoRA teacher (--teacher-lora), on a 141 GB H200
and an 80 GB card. Prints, per case, what is resident and the largest micro-batch and sample batch
that fit. Where experiments.gpu_check measures otherwise, the measurement wins.

    python -m experiments.memory_plan                 # bf16 (the paper preset's --dtype), LoRA ranks 16 and 64
    python -m experiments.memory_plan --dtype fp32 --ranks 8

Units, all GiB (2^30 bytes):
  - a copy of the model: 3,212,749,824 parameters (embedding tied to the LM head); fp32 master weights
    in both modes (--dtype bf16 is autocast over fp32 weights), frozen KL references in bf16 under bf16;
  - AdamW: two fp32 moments per trained parameter; gradients: one fp32 per trained parameter, kept
    between the backward and the optimiser step (a LoRA student's are freed after its step);
  - a LoRA adapter on all linear layers: rank x 54,272 parameters per decoder layer (q, k, v, o, gate,
    up, down: in + out of each), 28 layers; fp32, with its AdamW moments;
  - one student update's activations: 18 GiB that do not depend on the micro-batch (the stacked
    weight copies the lean forward builds, the log-softmax over 128,256 tokens) plus 8.6 GiB per
    sequence of 100 + 1024 tokens in bf16, 11 in fp32 (scaleout/README.md's plan: 87 GiB in bf16 at micro-batch 8);
  - the teacher's update (step 5, after the inner loop): the teacher, its gradients, the baseline,
    and activations of completions of ~100 + 512 tokens (the same rates, scaled by length);
  - the HF sampler's KV cache: 112 KiB per token in bf16 (28 layers x 8 KV heads x 128 x 2 x 2 bytes),
    1,134 positions per row: 0.12 GiB per row; under --sampler vllm the engine's --vllm-memory share
    instead (it pages its KV cache, so one call of all g*r students' rows streams through it).
A LoRA student's forward forms W + (alpha / rank) B A per layer on the fly (engines/lora.py): one
layer's weight at a time, transient, within the 18 GiB above.
"""
import argparse

PARAMS = 3_212_749_824
LAYERS, HIDDEN, FFN, KV_DIM = 28, 3072, 8192, 8 * 128
LORA_PER_LAYER = (2 * HIDDEN) * 2 + (HIDDEN + KV_DIM) * 2 + (HIDDEN + FFN) * 3  # q, o; k, v; gate, up, down
GIB = 2 ** 30
GPUS = {"H200 141 GB": 139.0, "80 GB card": 79.0}  # usable


def lora_params(rank):
    return rank * LORA_PER_LAYER * LAYERS


def resident(dtype, student_lora, teacher_lora, students=16):
    """(rows of (what, GiB)) that stay for the inner loop, with one student updating."""
    w = PARAMS * 4 / GIB                       # fp32 weights
    ref = PARAMS * (2 if dtype == "bf16" else 4) / GIB
    rows = []
    if teacher_lora:
        a = lora_params(teacher_lora) * 4 / GIB
        rows.append(("teacher: frozen base (its KL reference) + adapter and AdamW", w + 3 * a))
    else:
        rows.append(("teacher, its frozen reference, its AdamW state", w + ref + 2 * w))
    rows.append(("baseline student", w))
    if student_lora:
        a = lora_params(student_lora) * 4 / GIB
        rows.append((f"{students} LoRA students (adapter + AdamW each; reference: the baseline) + one's gradients",
                     students * 3 * a + a))
    else:
        rows.append(("inner student, its reference, AdamW state, gradients", w + ref + 2 * w + w))
    return rows


def activations(dtype, micro_batch, tokens=1124):
    return 18.0 + (8.6 if dtype == "bf16" else 11.0) * micro_batch * tokens / 1124


def teacher_update(dtype, teacher_lora, micro_batch):
    """Step 5's peak: the teacher (+ its gradients), the baseline, and activations of its completions
    (the prompt, ~100 tokens, + 512), the students gone."""
    rows = resident(dtype, 0, teacher_lora)[:2]
    grads = lora_params(teacher_lora) * 4 / GIB if teacher_lora else PARAMS * 4 / GIB
    return sum(g for _, g in rows) + grads + activations(dtype, micro_batch, 612)


def kv_rows(dtype, rows):
    return rows * 1134 * 28 * 8 * 128 * 2 * (2 if dtype == "bf16" else 4) / GIB


def plan(dtype, student_lora, teacher_lora, vllm_share):
    rows = resident(dtype, student_lora, teacher_lora)
    base = sum(g for _, g in rows)
    out = []
    for gpu, usable in GPUS.items():
        left = usable * (1 - vllm_share) if vllm_share else usable
        mb = max((m for m in (1, 2, 4, 8) if base + activations(dtype, m) <= left
                  and teacher_update(dtype, teacher_lora, m) <= left), default=0)
        sb = max((s for s in (32, 64, 128, 256) if base + kv_rows(dtype, s) <= left), default=0)
        out.append((gpu, left, mb, sb))
    return rows, base, out


def project(tokens_per_completion=600, decode_tokens_per_s=25_000, mfu=0.35, peak_tflops=989.0, lora_flops=2 / 3):
    """GPU-hours of a 200-step paper-preset run on one H200, from published rates (not measured here):
    per outer step g*r = 16 students x S RLOO steps x 256 rollouts, teacher 256 completions, greedy Q_R
    evaluations; sampling at decode_tokens_per_s (bandwidth-bound vLLM decoding of a 3B model at batch
    ~256: 21-30k tokens/s on 4.8 TB/s), training at 8 N FLOPs per token (forward, backward, the
    reference's forward) at mfu of the bf16 peak; LoRA students' updates cost lora_flops of that."""
    rows = []
    for s_steps in (10, 20):  # S starts at 10 and grows by 5 per promotion up to 20
        gen = 16 * s_steps * 256 * tokens_per_completion + 256 * 512 + 17 * 64 * tokens_per_completion
        train = 16 * s_steps * 256 * (100 + tokens_per_completion) * 8 * PARAMS
        for name, f in (("full copies", 1.0), ("LoRA students", lora_flops)):
            sec = gen / decode_tokens_per_s + f * train / (mfu * peak_tflops * 1e12)
            rows.append((s_steps, name, sec / 3600, 200 * sec / 3600))
        # an end-to-end anchor instead: NeMo RL's GRPO on Llama-3.1-8B, 1,562 generated tokens/s per H100,
        # scaled by parameter count to 3.2B (an H200's bandwidth would add ~1.4x; not counted)
        sec = gen / (1562 * 8.03e9 / PARAMS)
        rows.append((s_steps, "end-to-end anchor", sec / 3600, 200 * sec / 3600))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.memory_plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    ap.add_argument("--vllm-memory", type=float, default=0.3, help="the engine's share of the GPU (0: --sampler hf)")
    a = ap.parse_args(argv)
    print(f"LoRA adapter, all linear layers: {LORA_PER_LAYER * LAYERS:,} parameters per unit of rank "
          f"({', '.join(f'rank {r}: {lora_params(r) / 1e6:.1f} M, {100 * lora_params(r) / PARAMS:.2f}%' for r in a.ranks)})")
    print(f"\n{a.dtype}, --sampler {'vllm (share ' + str(a.vllm_memory) + ')' if a.vllm_memory else 'hf'}; "
          "largest micro-batch (of 1, 2, 4, 8) and HF sample batch (of 32-256 rows) that fit beside what is resident\n")
    print("| students | teacher | resident GiB | " + " | ".join(f"{g}: micro-batch, sample batch" for g in GPUS) + " |")
    print("|---|---|---|" + "---|" * len(GPUS))
    for s in [0] + a.ranks:
        for t in (0, s) if s else (0,):
            rows, base, fits = plan(a.dtype, s, t, a.vllm_memory)
            cells = [(f"{mb}, " + (f"{sb}" if not a.vllm_memory else "engine") if mb else "does not fit")
                     for _, _, mb, sb in fits]
            print(f"| {'LoRA rank ' + str(s) if s else 'full copies'} | {'LoRA rank ' + str(t) if t else 'full'} | "
                  f"{base:.1f} | " + " | ".join(cells) + " |")
    print("\nresident, per part (GiB):")
    for s, t in [(0, 0)] + [(r, 0) for r in a.ranks] + [(r, r) for r in a.ranks]:
        rows, base, _ = plan(a.dtype, s, t, a.vllm_memory)
        print(f"  students {'LoRA ' + str(s) if s else 'full'}, teacher {'LoRA ' + str(t) if t else 'full'}: "
              + "; ".join(f"{w} {g:.1f}" for w, g in rows) + f"; total {base:.1f}")
    print("\nprojected, one H200, 200 outer steps (published rates, see project()):")
    for s_steps, name, h_step, h_run in project():
        print(f"  S = {s_steps}, {name}: {h_step:.2f} GPU-hours per outer step, {h_run:.0f} per run "
              f"(the paper: ~1,500-1,900 on 32 GPUs)")
    print(f"\none student update: {activations(a.dtype, 1):.1f} GiB at micro-batch 1, {activations(a.dtype, 8):.1f} at 8; "
          f"HF sampling: {kv_rows(a.dtype, 256):.1f} GiB of KV cache for 256 rows")


if __name__ == "__main__":
    main()

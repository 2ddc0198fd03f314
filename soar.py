"""
soar.py -- SOAR, the bi-level loop: a teacher writes problems, students learn from them,
and the teacher is rewarded by the students' measured gain on real problems they could not solve.

    python soar.py                                   # the toy world, ~10 min on 2 CPU cores
    python soar.py --steps 2 --out runs/quick        # a smoke run
    python soar.py --preset paper --model meta-llama/Llama-3.2-3B-Instruct \\
        --hard-train hard/train.jsonl --hard-test hard/test.jsonl     # a GPU user's run
    python soar.py --resume runs/soar-toy-seed0      # continue a stopped run
    python soar.py --log tensorboard                 # ... with live curves: tensorboard --logdir runs/
    python soar.py --workers 8                       # the g*r inner students as Ray tasks, 8 at a time
    python soar.py --workers 32 --ray-address auto   # ... on a running Ray cluster (`ray start`)

One outer step t (the SOAR paper, arXiv 2601.18778, its algorithm):
  1. teacher sampling with rejection -> g datasets of n valid (question, answer) pairs;
  2. Q_R: M questions drawn fresh from D_train; baseline student's greedy accuracy on it (or, with
     --reward-samples K, its mean success over K samples per question: a deviation);
  3. inner loop: for each dataset k and repeat j, a copy of the baseline student trained with
     RLOO for S steps on X_k; R_kj = its greedy accuracy on Q_R minus the baseline's; R_k = mean_j;
  4. promotion: if the moving average of R_hat = mean_k R_k over the last w steps exceeds tau,
     the median student of argmax_k R_k becomes the baseline, X_k* joins PQ, S grows by 5;
  5. teacher update: RLOO over the g datasets (A_k = R_k - mean of the others), one PG step.

Choices where the paper is silent, fixed here (not flags): the moving-average window restarts
after a promotion (rewards measured against the old baseline are not comparable) and must be
full before a promotion; with r even the median student is the lower median.
Baselines by flag: --reward learnability (Intrinsic-T, the paper's data-free baseline: the teacher
is trained on the learnability reward alone, with no D_train, no inner students and no promotion),
--no-promotion, --no-teacher-update (Base-T).

Workers: --workers 0 trains the inner students one after the other in this process; --workers N
runs them as Ray tasks (one CPU, and one GPU where there is one, each), at most N at a time, on a
local Ray cluster or, with --ray-address, a running one. Each student is seeded from (seed, step,
k, j) alone, runs on --threads torch threads wherever it runs, and is collected in (k, j) order,
so the metrics are the same for every N; --workers may change on --resume. On a CPU machine,
`--threads 1 --workers <cores>` uses every core once. Memory: at most 2r trained students are
held here, plus the results of the N tasks in flight.
"""
import argparse
import json
import os
import random
import sys
import time

import torch

from engines import lora
from evaluate import get_verifier, greedy_accuracy, qr_accuracy
from generate import (BUILTIN_STYLES, STUDENT_PROMPTS, HelpFormatter, add_style, model_style, precision, save_model,
                      teacher_prompt, use_prompt_files)
from train_student import RLConfig, frozen_copy, make_optimizer
from train_teacher import TeacherSamplingError, grounded_rewards, learnability_rewards, sample_teacher_datasets, teacher_step
from rundir.checkpoint import restore, save_checkpoint
from rundir.run import finish, open_run, step_row
from scaleout.ray_students import InnerStudentError
from rundir.tblog import log_row, summary_writer

HERE = os.path.dirname(os.path.abspath(__file__))

# Every hyperparameter, per preset. Flags override; the resolved set is saved with the run.
PRESETS = {
    "toy": dict(
        model=os.path.join(HERE, "toy", "model"), style="toy",
        # the paper's design scaled to the toy world; each departure from the paper preset below was
        # measured (README, "What is simplified"; experiments/README.md, "The lab at the paper's design"):
        # a hard set of 151 + 152 so that Q_R (M = 64) is a fresh draw; r = 3 and the median promoted;
        # tau above the 95th percentile of R-hat's moving average when the teacher learns nothing;
        # n 16 x S 20 at lr 1e-4 (ten passes: the paper's 1.25 gave no signal); a teacher KL weight of
        # 0.03 (at 0.001 an lr-1e-4 teacher drifts on noise alone as far as on signal). T = 3 keeps
        # `python soar.py` near 10 minutes (the window is full once, at its last step); the sweep runs 30.
        hard_train=os.path.join(HERE, "toy", "hard-large", "train.jsonl"),
        hard_test=os.path.join(HERE, "toy", "hard-large", "test.jsonl"),
        steps=3, g=4, n=16, r=3, m=64, tau=0.05, window=3,
        inner_steps=20, inner_steps_inc=5, inner_steps_max=30,
        teacher_lr=1e-4, teacher_warmup=2, teacher_kl=0.03, teacher_max_new_tokens=160, sample_batch=64,
        student_lr=1e-4, student_kl=0.001, student_questions=8, student_group=8, student_max_new_tokens=120,
        temperature=1.0, top_p=1.0, max_teacher_rounds=20, threads=2, micro_batch=32,
        dtype="fp32", sampler="hf", vllm_memory=0.3, student_lora=0, teacher_lora=0, lora_lr_scale=lora.LR_SCALE,
        reward_samples=0,
    ),
    "paper": dict(
        model="meta-llama/Llama-3.2-3B-Instruct", style="math", hard_train=None, hard_test=None,
        steps=200, g=4, n=64, r=4, m=64, tau=0.01, window=3,
        inner_steps=10, inner_steps_inc=5, inner_steps_max=20,
        teacher_lr=1e-5, teacher_warmup=20, teacher_kl=0.001, teacher_max_new_tokens=512, sample_batch=256,
        student_lr=1e-5, student_kl=0.001, student_questions=8, student_group=32, student_max_new_tokens=1024,
        temperature=1.0, top_p=1.0, max_teacher_rounds=20, threads=0, micro_batch=8,
        dtype="bf16", sampler="vllm", vllm_memory=0.3, student_lora=0, teacher_lora=0, lora_lr_scale=lora.LR_SCALE,
        reward_samples=0,
    ),
}
# keys that may differ between a run and its resumption (--log only writes beside the run: turn it on to watch the rest)
RESUMABLE = {"resume", "out", "steps", "workers", "ray_address", "vllm_memory", "log", "teacher_snapshots"}


def parse_args(argv=None):
    # the preset in use (or the resumed run's config) first, so that --help can show its values
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS))
    pre.add_argument("--resume")
    known, _ = pre.parse_known_args(argv)
    shown, name = PRESETS[known.preset or "toy"], f"preset {known.preset or 'toy'}"
    if known.resume and os.path.isfile(os.path.join(known.resume, "config.json")):
        with open(os.path.join(known.resume, "config.json")) as f:
            shown, name = json.load(f), f"run {known.resume}"

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)

    def flag(group, opt, help, **kw):
        key = opt[2:].replace("-", "_")
        if key in shown and kw.get("action") != "store_true":
            v = shown[key]
            v = os.path.relpath(v, HERE) if isinstance(v, str) and v.startswith(HERE + os.sep) else v
            help += f" [{name}: {v}]"
        group.add_argument(opt, help=help, **kw)

    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="hyperparameter set: toy (the embedded toy world, CPU) or paper (the paper's setting, GPU) "
                         "(default: toy)")
    ap.add_argument("--out", help="run directory (default: runs/soar-<preset>-seed<seed>)")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved config")
    ap.add_argument("--seed", type=int, help="seed of everything (default: 0)")
    ap.add_argument("--log", choices=["none", "tensorboard"], help="tensorboard: each metrics row also as TensorBoard "
                    "curves in the run directory, as it is written (rundir/tblog.py; pip install tensorboard==2.21.0) "
                    "(default: none; on --resume, the run's)")
    ap.add_argument("--teacher-snapshots", type=int, metavar="EVERY",
                    help="keep the teacher every EVERY outer steps, in RUN/teachers/stepNNN/ (after NNN updates), "
                         "for experiments/teacher_value.py (default: 0, none)")
    g = ap.add_argument_group("models and data")
    flag(g, "--model", "base model, the teacher's and the student's start: directory, .gguf file or hub name")
    flag(g, "--style", "prompt wording; must match the model's own (its directory's soar.json, else math)",
         choices=BUILTIN_STYLES)
    flag(g, "--teacher-prompt-file", "the teacher prompt's exact text (replaces --style's)", metavar="FILE")
    flag(g, "--student-prompt-file", "the student prompt's exact text, with {question}", metavar="FILE")
    flag(g, "--hard-train", "D_train: JSONL of fail@128 survivors (python evaluate.py --fail-at 128 makes it)")
    flag(g, "--hard-test", "D_test: JSONL, only recorded here (experiments/protocol.py evaluates on it)")
    flag(g, "--dtype", "fp32, or bf16: bfloat16 autocast over fp32 master weights and AdamW state, "
                       "bf16 frozen references (sound at lr 1e-5; see generate.precision)", choices=["fp32", "bf16"])
    flag(g, "--sampler", "engine of every sample: hf (this project's loop) or vllm (GPU, requirements-gpu.txt)",
         choices=["hf", "vllm"])
    flag(g, "--vllm-memory", "with --sampler vllm: the engine's fraction of GPU memory", type=float)
    g = ap.add_argument_group("outer loop")
    flag(g, "--steps", "outer steps T", type=int)
    flag(g, "--g", "datasets per step (the teacher's RLOO group)", type=int)
    flag(g, "--n", "question-answer pairs per dataset", type=int)
    flag(g, "--r", "students trained per dataset (repeats)", type=int)
    flag(g, "--m", "reward questions Q_R drawn from D_train each step (at most all of D_train)", type=int)
    flag(g, "--reward-samples", "Acc on Q_R: 0 greedy 0/1 accuracy (the paper's); K > 0 mean sampled success, K draws "
                                "per question at temperature 1, the same seed for baseline and students (a deviation)",
         type=int, metavar="K")
    flag(g, "--tau", "promotion threshold on the moving average of R_hat", type=float)
    flag(g, "--window", "moving-average window w (outer steps)", type=int)
    flag(g, "--reward", "teacher reward: grounded (SOAR; default) or learnability (the Intrinsic-T baseline)",
         choices=["grounded", "learnability"])
    flag(g, "--no-promotion", "never promote (a baseline)", action="store_true", default=None)
    flag(g, "--no-teacher-update", "freeze the teacher (the Base-T baseline)", action="store_true", default=None)
    g = ap.add_argument_group("inner loop (student RLOO)")
    flag(g, "--inner-steps", "S, RLOO steps per inner student", type=int)
    flag(g, "--inner-steps-inc", "S grows by this after each promotion", type=int)
    flag(g, "--inner-steps-max", "cap on S", type=int)
    flag(g, "--student-lr", "inner students' AdamW learning rate (no warmup, cosine decay over the S steps)",
         type=float)
    flag(g, "--student-kl", "inner students' k3 KL weight to the baseline", type=float)
    flag(g, "--student-questions", "questions per inner RLOO step", type=int)
    flag(g, "--student-group", "samples per question (the RLOO group)", type=int)
    flag(g, "--student-max-new-tokens", "the one student budget: tokens per completion in training, in every "
                                        "greedy evaluation (Q_R, D_train) and in learnability sampling", type=int)
    flag(g, "--student-lora", "RANK > 0: each inner student a LoRA adapter of that rank on the frozen baseline, the "
                              "g*r trained in lockstep (engines/lora.py; a deviation from the paper); 0: full copies",
         type=int, metavar="RANK")
    flag(g, "--lora-lr-scale", "a LoRA student's (or teacher's) learning rate is this times --student-lr "
                               "(--teacher-lr)", type=float)
    g = ap.add_argument_group("teacher")
    flag(g, "--teacher-lr", "teacher's AdamW learning rate", type=float)
    flag(g, "--teacher-warmup", "teacher's linear warmup, in outer steps", type=int)
    flag(g, "--teacher-kl", "teacher's k3 KL weight to the base model", type=float)
    flag(g, "--teacher-lora", "RANK > 0: the teacher a LoRA adapter on the frozen base model (its KL reference); "
                              "0: full fine-tuning, as in the paper", type=int, metavar="RANK")
    flag(g, "--teacher-max-new-tokens", "the one teacher budget: tokens per question-answer completion", type=int)
    flag(g, "--max-teacher-rounds", "sampling rounds before giving up on enough valid pairs", type=int)
    flag(g, "--temperature", "sampling temperature, teacher and students", type=float)
    flag(g, "--top-p", "nucleus sampling, teacher and students (1: off)", type=float)
    g = ap.add_argument_group("batching and threads (speed and memory only: the method is the same, though float "
                              "rounding and the order of random draws change)")
    flag(g, "--sample-batch", "sequences per sampling call (teacher and students)", type=int)
    flag(g, "--micro-batch", "sequences per forward/backward (gradient accumulation)", type=int)
    flag(g, "--threads", "torch CPU threads per process (0: torch's default); a count changes float rounding, "
                         "so compare runs made with the same", type=int)
    g = ap.add_argument_group("scale-out (results do not depend on these)")
    g.add_argument("--workers", type=int,
                   help="inner students trained at once as Ray tasks; 0 = one after the other here, "
                        "without Ray (default: 0)")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="join this running Ray cluster (\"auto\": the one `ray start` made on this node) "
                        "instead of starting a local one of --workers CPUs (default: none, start locally)")
    a = ap.parse_args(argv)
    given = {k: v for k, v in vars(a).items() if v is not None}  # flags actually passed
    if a.resume:
        path = os.path.join(a.resume, "config.json")
        if not os.path.isfile(path):
            ap.error(f"--resume {a.resume}: no run there ({path} is missing)")
        with open(path) as f:
            cfg = json.load(f)
        diff = sorted(k for k in given if k not in RESUMABLE and cfg.get(k) != given[k])
        if diff:
            ap.error(f"--resume {a.resume}: flags contradict the run's config.json: "
                     + ", ".join(f"{k} (run: {cfg.get(k)!r}, now: {given[k]!r})" for k in diff))
        for k, v in dict(workers=0, ray_address=None, dtype="fp32", sampler="hf", vllm_memory=0.3, log="none",
                         teacher_snapshots=0, student_lora=0, teacher_lora=0, lora_lr_scale=lora.LR_SCALE,
                         reward_samples=0).items():
            cfg.setdefault(k, v)  # runs saved before these flags existed
        cfg.update(given)
        cfg["out"] = a.resume
        if "teacher_prompt" in cfg:
            add_style(cfg["style"], cfg["teacher_prompt"], cfg["student_prompt"])
        for k in ("workers", "teacher_snapshots"):
            if cfg[k] < 0:
                ap.error(f"--{k.replace('_', '-')} must be >= 0 (got {cfg[k]})")
        if cfg["ray_address"] and not cfg["workers"]:
            ap.error("--ray-address needs --workers N > 0")
        return cfg
    cfg = dict(PRESETS[a.preset or "toy"], preset=a.preset or "toy", seed=0, reward="grounded",
               no_promotion=False, no_teacher_update=False, resume=None, workers=0, ray_address=None, log="none",
               teacher_snapshots=0)
    cfg.update(given)
    # a preset's settings belong to its model's prompt style: a model that declares another style (or
    # none: the paper's math prompts) does not silently run with them
    try:
        own = model_style(cfg["model"]) if "model" in given else cfg["style"]
    except FileNotFoundError as e:
        sys.exit(f"error: --model {cfg['model']}: {e}")
    except ValueError as e:
        ap.error(f"--model {cfg['model']}: {e}")
    if "style" not in given and own != cfg["style"]:
        ap.error(f"--model {cfg['model']} uses the {own!r} prompt style, but preset {cfg['preset']!r} is made for "
                 f"{cfg['style']!r} models (its prompts, token budgets and learning rates). Use --preset "
                 f"{'paper' if own == 'math' else 'toy'} with this model, or pass --style {cfg['style']} to run the "
                 f"{cfg['preset']} settings on it on purpose.")
    if "style" in given and own != cfg["style"]:
        print(f"notice: running --model {cfg['model']} (style {own!r}) with the {cfg['style']!r} prompts of "
              f"--style, and preset {cfg['preset']!r}'s budgets and learning rates", file=sys.stderr)
    try:  # prompt files: their texts go into the config, so that --resume and the workers use them
        cfg["style"] = use_prompt_files(cfg["style"], cfg.get("teacher_prompt_file"), cfg.get("student_prompt_file"))
    except (OSError, ValueError) as e:
        ap.error(f"prompt file: {e}")
    if cfg["style"] not in BUILTIN_STYLES:
        cfg["teacher_prompt"], cfg["student_prompt"] = teacher_prompt(cfg["style"]), STUDENT_PROMPTS[cfg["style"]]
    for k, lo in [("workers", 0), ("g", 2), ("r", 1), ("n", 1), ("m", 1), ("window", 1), ("steps", 0), ("inner_steps", 1),
                  ("student_group", 2), ("teacher_snapshots", 0), ("student_lora", 0), ("teacher_lora", 0),
                  ("reward_samples", 0)]:
        if cfg[k] < lo:
            ap.error(f"--{k.replace('_', '-')} must be >= {lo} (got {cfg[k]})")
    if cfg["tau"] < 0:
        ap.error("--tau must be >= 0")
    if cfg["ray_address"] and not cfg["workers"]:
        ap.error("--ray-address needs --workers N > 0")
    if cfg["n"] < cfg["student_questions"]:
        ap.error(f"--n ({cfg['n']}) must be >= --student-questions ({cfg['student_questions']})")
    if not cfg["hard_train"] and cfg["reward"] == "grounded":
        ap.error("--hard-train is required for this preset (make it with: python evaluate.py --fail-at 128 ...)")
    cfg["out"] = cfg.get("out") or os.path.join("runs", f"soar-{cfg['preset']}-seed{cfg['seed']}")
    return cfg


def moving_average(xs, window):
    xs = xs[-window:]
    return sum(xs) / len(xs) if xs else 0.0


# Where the world can check the teacher's answers (the toy world's solve), a step whose share of right
# answers falls below this is flagged: the base toy teacher writes 98% right, a drifted one 80% (the
# five-seed sweep, experiments/README.md).
TEACHER_ANSWER_FLOOR = 0.9


def should_promote(window_rewards, window, tau):
    """Promote when the window is full and its plain mean exceeds tau."""
    return len(window_rewards) >= window and moving_average(window_rewards, window) > tau


def median_index(values):
    """Index of the median of values (the lower median when their count is even)."""
    order = sorted(range(len(values)), key=lambda j: values[j])
    return order[(len(values) - 1) // 2]


def promote(student, tok, best, datasets, hard, state, cfg, t):
    """Step 4: the median student of the best dataset becomes the baseline, its dataset joins PQ,
    S grows; the promoted student with the best greedy accuracy on all of D_train is saved as PS."""
    j = median_index(best.repeat_rewards)
    if lora.is_state(best.students[j]):  # a LoRA student: its adapter merged into the baseline
        lora.merge_into(student, best.students[j])
    else:
        student.load_state_dict(best.students[j])
    state["pq"] += [{"question": q, "answer": a, "step": t} for _, q, a in datasets[best.k]]
    state["promotions"] += 1
    state["inner_steps"] = min(state["inner_steps"] + cfg["inner_steps_inc"], cfg["inner_steps_max"])
    state["window"] = []  # rewards measured against the old baseline are not comparable
    train_acc = greedy_accuracy(student, tok, hard, cfg["style"], cfg["student_max_new_tokens"])
    if train_acc > state.get("ps_train_acc", -1.0):
        state["ps_train_acc"], state["ps_step"] = train_acc, t
        save_model(student, tok, os.path.join(cfg["out"], "ps"), cfg["style"])
    return dict(dataset=best.k, student=j, reward=best.repeat_rewards[j], train_acc=train_acc)


def main(argv=None):
    cfg = parse_args(argv)
    out, seed = cfg["out"], cfg["seed"]
    writer = summary_writer() if cfg["log"] == "tensorboard" else None  # a missing package stops here, before any work
    hard, tok, teacher, student, ray, own_ray = open_run(cfg)
    t_lr = cfg["teacher_lr"] * (cfg["lora_lr_scale"] if cfg["teacher_lora"] else 1)
    if cfg["teacher_lora"]:  # the teacher an adapter on the frozen base model, which is also its KL reference
        lora.use(lora.attach(teacher), lora.Adapter(teacher, cfg["teacher_lora"],
                                                    generator=torch.Generator().manual_seed(seed)))
        teacher_ref = teacher if cfg["teacher_kl"] > 0 else None
    else:
        teacher_ref = frozen_copy(teacher, cfg["dtype"]) if cfg["teacher_kl"] > 0 else None
    mixed = precision(cfg["dtype"], next(student.parameters()).device)  # sampling and evaluation here
    t_opt, t_sched = make_optimizer(teacher, t_lr, max(1, cfg["steps"]), cfg["teacher_warmup"])
    tcfg = RLConfig(lr=t_lr, kl_coef=cfg["teacher_kl"], temperature=cfg["temperature"],
                    max_new_tokens=cfg["teacher_max_new_tokens"], micro_batch=cfg["micro_batch"], style=cfg["style"],
                    dtype=cfg["dtype"])
    s_lr = cfg["student_lr"] * (cfg["lora_lr_scale"] if cfg["student_lora"] else 1)
    scfg = RLConfig(lr=s_lr, kl_coef=cfg["student_kl"], questions=cfg["student_questions"],
                    group=cfg["student_group"], temperature=cfg["temperature"], top_p=cfg["top_p"],
                    max_new_tokens=cfg["student_max_new_tokens"], micro_batch=cfg["micro_batch"],
                    sample_batch=cfg["sample_batch"], style=cfg["style"], dtype=cfg["dtype"],
                    eval_samples=cfg["reward_samples"])
    state = dict(step=0, history=[], window=[], promotions=0, inner_steps=cfg["inner_steps"], pq=[])
    if cfg.get("resume"):
        state = restore(cfg, teacher, student, t_opt, t_sched, state)

    from tqdm import tqdm

    remote_timeouts = 0  # verifier timeouts inside Ray workers since this process started
    # resumed: TensorBoard hides what a killed run logged from this step on (its purge_step), so each step shows once
    tb = writer(out, purge_step=state["step"]) if writer else None
    metrics = open(os.path.join(out, "metrics.jsonl"), "a")
    samples = open(os.path.join(out, "teacher_samples.jsonl"), "a")
    bar = tqdm(range(state["step"], cfg["steps"]), desc="SOAR", initial=state["step"], total=cfg["steps"])
    try:
        for t in bar:
            t0 = time.time()
            torch.manual_seed(seed * 1_000_003 + t)  # each step reseeded: a resumed run repeats exactly
            rng = random.Random(seed * 1_000_003 + t)
            # 1. teacher sampling with rejection
            with mixed:
                datasets, st = sample_teacher_datasets(
                    teacher, tok, cfg["g"], cfg["n"], cfg["style"], cfg["temperature"], cfg["top_p"],
                    cfg["teacher_max_new_tokens"], cfg["sample_batch"], cfg["max_teacher_rounds"],
                    reject_path=os.path.join(out, "rejected.jsonl"))
            if cfg["reward"] == "grounded":
                # 2. fresh reward questions, baseline accuracy
                qr = rng.sample(hard, min(cfg["m"], len(hard)))
                with mixed:
                    base_acc = qr_accuracy(student, tok, qr, cfg["style"], cfg["student_max_new_tokens"],
                                           cfg["reward_samples"], seed * 1_000_003 + t)
                # 3. inner loop: g x r students
                try:
                    results, best = grounded_rewards(student, tok, datasets, qr, base_acc, cfg["r"],
                                                     state["inner_steps"], scfg, seed=seed * 1_000_003 + t,
                                                     progress=False, workers=cfg["workers"], threads=cfg["threads"],
                                                     lora_rank=cfg["student_lora"])
                except InnerStudentError as e:
                    raise InnerStudentError(f"step {t}: {e}") from e
                remote_timeouts += sum(res.remote_verifier_timeouts for res in results)
                rewards = [res.reward for res in results]
                # 4. promotion, when the moving average of R_hat exceeds tau
                r_hat = sum(rewards) / len(rewards)
                state["history"].append(r_hat)
                state["window"].append(r_hat)
                ma = moving_average(state["window"], cfg["window"])
                promoted = None
                if not cfg["no_promotion"] and should_promote(state["window"], cfg["window"], cfg["tau"]):
                    with mixed:
                        promoted = promote(student, tok, best, datasets, hard, state, cfg, t)
            else:  # Intrinsic-T, the paper's data-free baseline: the learnability reward alone; no D_train,
                # no inner students, no promotion (steps 2-4 do not exist for it)
                with mixed:
                    rewards = learnability_rewards(student, tok, datasets, cfg["student_group"], scfg,
                                                   seed=seed * 1_000_003 + t)
                results, base_acc, promoted, r_hat, ma = [], None, None, sum(rewards) / len(rewards), None
            # 5. teacher update
            upd = {}
            if not cfg["no_teacher_update"]:
                upd = teacher_step(teacher, t_opt, t_sched, datasets, rewards, tcfg, tok.pad_token_id, teacher_ref)
                t_opt.zero_grad(set_to_none=True)  # free the teacher's gradients (a model's size) until next step
            # log, then checkpoint: a run killed in between repeats this step on --resume
            row = step_row(t, cfg, state, datasets, st, rewards, results, base_acc, r_hat, ma, promoted, upd,
                           get_verifier().timeouts + remote_timeouts)
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if tb:
                log_row(tb, row, datasets)
            for k, data in enumerate(datasets):
                samples.write(json.dumps({"step": t, "dataset": k, "reward": rewards[k],
                                          "pairs": [{"question": q, "answer": a} for _, q, a in data]}) + "\n")
            samples.flush()
            state["step"] = t + 1
            # a snapshot before the checkpoint: a run killed between the two writes it again on --resume
            if cfg["teacher_snapshots"] and state["step"] % cfg["teacher_snapshots"] == 0:
                with lora.merged(teacher):  # a LoRA teacher is saved merged: a plain model
                    save_model(teacher, tok, os.path.join(out, "teachers", f"step{state['step']:03d}"), cfg["style"])
            save_checkpoint(cfg, teacher, student, t_opt, t_sched, state)
            if cfg["reward"] == "grounded":
                tqdm.write(f"step {t:3d} | R {r_hat:+.3f} MA {ma:+.3f} | promotions {state['promotions']} "
                           f"| reject {st['rejection_rate']:.2f} | base acc {base_acc:.3f} | S {state['inner_steps']} "
                           f"| {time.time() - t0:.0f}s" + (f" | PROMOTED dataset {promoted['dataset']}" if promoted else ""))
                if row.get("teacher_answer_acc", 1.0) < TEACHER_ANSWER_FLOOR:
                    tqdm.write(f"warning: only {row['teacher_answer_acc']:.0%} of the teacher's answers are right at step {t} "
                               f"(floor {TEACHER_ANSWER_FLOOR:.0%}): its students learn from a wrong key")
            else:
                tqdm.write(f"step {t:3d} | learnability {r_hat:.3f} | reject {st['rejection_rate']:.2f} "
                           f"| {time.time() - t0:.0f}s")
    except TeacherSamplingError as e:
        sys.exit(f"error: {e}")
    except InnerStudentError as e:
        sys.exit(f"error: {e}; the last finished step is checkpointed in {os.path.join(out, 'checkpoint.pt')}; "
                 f"continue with --resume {out}")
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last finished step is checkpointed in {os.path.join(out, 'checkpoint.pt')}; "
              f"continue with --resume {out}")
        sys.exit(130)
    finally:
        if tb:
            tb.close()
        if own_ray:  # disconnect; a local cluster this run started stops with it, a joined one keeps running
            ray.shutdown()
    finish(cfg, tok, teacher, student, state)


if __name__ == "__main__":
    main()

"""
soar.py -- SOAR, the bi-level loop: a teacher writes problems, students learn from them,
and the teacher is rewarded by the students' measured gain on real problems they could not solve.

    python soar.py                                   # the toy world, ~10 min on 2 CPU cores
    python soar.py --steps 2 --out runs/quick        # a smoke run
    python soar.py --preset paper --model meta-llama/Llama-3.2-3B-Instruct \\
        --hard-train hard/train.jsonl --hard-test hard/test.jsonl     # a GPU user's run
    python soar.py --resume runs/soar-toy-seed0      # continue a stopped run
    python soar.py --workers 8                       # the g*r inner students as Ray tasks, 8 at a time
    python soar.py --workers 32 --ray-address auto   # ... on a running Ray cluster (`ray start`)

One outer step t (the SOAR paper, arXiv 2601.18778, its algorithm):
  1. teacher sampling with rejection -> g datasets of n valid (question, answer) pairs;
  2. Q_R: M questions drawn fresh from D_train; baseline student's greedy accuracy on it;
  3. inner loop: for each dataset k and repeat j, a copy of the baseline student trained with
     RLOO for S steps on X_k; R_kj = its greedy accuracy on Q_R minus the baseline's; R_k = mean_j;
  4. promotion: if the moving average of R_hat = mean_k R_k over the last w steps exceeds tau,
     the median student of argmax_k R_k becomes the baseline, X_k* joins PQ, S grows by 5;
  5. teacher update: RLOO over the g datasets (A_k = R_k - mean of the others), one PG step.

Choices where the paper is silent, all flags: the moving-average window restarts after a
promotion (rewards measured against the old baseline are not comparable); with r even the
median student is the lower median; the window must be full before a promotion.
Baselines by flag: --reward learnability (Intrinsic-T), --no-promotion, --no-teacher-update (Base-T).

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

import numpy as np
import torch

from evaluate import diversity, get_verifier, greedy_accuracy, load_problems
from generate import load_model, load_tokenizer, save_model
from train_student import RLConfig, frozen_copy, make_optimizer
from train_teacher import (InnerStudentError, TeacherSamplingError, grounded_rewards, init_ray, learnability_rewards,
                           sample_teacher_datasets, teacher_step)

HERE = os.path.dirname(os.path.abspath(__file__))

# Every hyperparameter, per preset. Flags override; the resolved set is saved with the run.
PRESETS = {
    "toy": dict(
        model=os.path.join(HERE, "toy", "model"), style="toy",
        hard_train=os.path.join(HERE, "toy", "hard", "train.jsonl"),
        hard_test=os.path.join(HERE, "toy", "hard", "test.jsonl"),
        steps=6, g=4, n=16, r=1, m=32, tau=0.01, window=3,
        inner_steps=20, inner_steps_inc=5, inner_steps_max=30,
        teacher_lr=1e-4, teacher_warmup=2, teacher_kl=0.001, teacher_max_new_tokens=160, sample_batch=64,
        student_lr=1e-4, student_kl=0.001, student_questions=8, student_group=8, student_max_new_tokens=120,
        temperature=1.0, top_p=1.0, max_teacher_rounds=20, threads=2, micro_batch=32,
    ),
    "paper": dict(
        model="meta-llama/Llama-3.2-3B-Instruct", style="math", hard_train=None, hard_test=None,
        steps=200, g=4, n=64, r=4, m=64, tau=0.01, window=3,
        inner_steps=10, inner_steps_inc=5, inner_steps_max=20,
        teacher_lr=1e-5, teacher_warmup=20, teacher_kl=0.001, teacher_max_new_tokens=512, sample_batch=256,
        student_lr=1e-5, student_kl=0.001, student_questions=8, student_group=32, student_max_new_tokens=1024,
        temperature=1.0, top_p=1.0, max_teacher_rounds=20, threads=0, micro_batch=8,
    ),
}
# keys that may differ between a run and its resumption
RESUMABLE = {"resume", "out", "steps", "workers", "ray_address"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="hyperparameter set (default: toy)")
    ap.add_argument("--out", help="run directory (default runs/soar-<preset>-seed<seed>)")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    ap.add_argument("--seed", type=int, help="seed for everything (default 0)")
    g = ap.add_argument_group("models and data")
    g.add_argument("--model", help="base model (teacher and student start here): local dir or hub name")
    g.add_argument("--style", choices=["math", "toy"], help="prompt wording")
    g.add_argument("--hard-train", help="D_train JSONL (fail@128 survivors; evaluate.py --fail-at makes it)")
    g.add_argument("--hard-test", help="D_test JSONL (only recorded here; evaluate.py measures it)")
    g = ap.add_argument_group("outer loop")
    g.add_argument("--steps", type=int, help="outer steps T")
    g.add_argument("--g", type=int, help="datasets per step (the teacher's RLOO group)")
    g.add_argument("--n", type=int, help="question-answer pairs per dataset")
    g.add_argument("--r", type=int, help="students trained per dataset")
    g.add_argument("--m", type=int, help="reward questions Q_R drawn from D_train each step")
    g.add_argument("--tau", type=float, help="promotion threshold on the moving average of R_hat")
    g.add_argument("--window", type=int, help="moving-average window w")
    g.add_argument("--reward", choices=["grounded", "learnability"],
                   help="teacher reward: SOAR's grounded gain (default), or the Intrinsic-T learnability baseline")
    g.add_argument("--no-promotion", action="store_true", default=None, help="never promote (a baseline)")
    g.add_argument("--no-teacher-update", action="store_true", default=None, help="freeze the teacher (Base-T)")
    g = ap.add_argument_group("inner loop (student RLOO)")
    g.add_argument("--inner-steps", type=int, help="S, RLOO steps per inner student")
    g.add_argument("--inner-steps-inc", type=int, help="S grows by this after each promotion")
    g.add_argument("--inner-steps-max", type=int, help="cap on S")
    g.add_argument("--student-lr", type=float)
    g.add_argument("--student-kl", type=float)
    g.add_argument("--student-questions", type=int, help="questions per RLOO step")
    g.add_argument("--student-group", type=int, help="samples per question")
    g.add_argument("--student-max-new-tokens", type=int)
    g = ap.add_argument_group("scale-out (results do not depend on these)")
    g.add_argument("--workers", type=int,
                   help="inner students trained at once as Ray tasks; 0 = one after the other here, "
                        "without Ray (default: 0)")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="join this running Ray cluster (\"auto\": the one `ray start` made on this node) "
                        "instead of starting a local one of --workers CPUs (default: none, start locally)")
    g = ap.add_argument_group("teacher")
    g.add_argument("--teacher-lr", type=float)
    g.add_argument("--teacher-warmup", type=int)
    g.add_argument("--teacher-kl", type=float)
    g.add_argument("--teacher-max-new-tokens", type=int)
    g.add_argument("--sample-batch", type=int, help="sequences per generate call (teacher and students)")
    g.add_argument("--max-teacher-rounds", type=int, help="sampling rounds before giving up on valid pairs")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--micro-batch", type=int, help="sequences per forward/backward (gradient accumulation)")
    g.add_argument("--threads", type=int, help="torch CPU threads (0 = torch's default)")
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
        cfg.setdefault("workers", 0)
        cfg.setdefault("ray_address", None)
        cfg.update(given)
        cfg["out"] = a.resume
        if cfg["workers"] < 0:
            ap.error(f"--workers must be >= 0 (got {cfg['workers']})")
        if cfg["ray_address"] and not cfg["workers"]:
            ap.error("--ray-address needs --workers N > 0")
        return cfg
    cfg = dict(PRESETS[a.preset or "toy"], preset=a.preset or "toy", seed=0, reward="grounded",
               no_promotion=False, no_teacher_update=False, resume=None, workers=0, ray_address=None)
    cfg.update(given)
    for k, lo in [("workers", 0), ("g", 2), ("r", 1), ("n", 1), ("m", 1), ("window", 1), ("steps", 0), ("inner_steps", 1), ("student_group", 2)]:
        if cfg[k] < lo:
            ap.error(f"--{k.replace('_', '-')} must be >= {lo} (got {cfg[k]})")
    if cfg["tau"] < 0:
        ap.error("--tau must be >= 0")
    if cfg["ray_address"] and not cfg["workers"]:
        ap.error("--ray-address needs --workers N > 0")
    if cfg["n"] < cfg["student_questions"]:
        ap.error(f"--n ({cfg['n']}) must be >= --student-questions ({cfg['student_questions']})")
    if not cfg["hard_train"]:
        ap.error("--hard-train is required for this preset (make it with: python evaluate.py --fail-at 128 ...)")
    cfg["out"] = cfg.get("out") or os.path.join("runs", f"soar-{cfg['preset']}-seed{cfg['seed']}")
    return cfg


def moving_average(xs, window):
    xs = xs[-window:]
    return sum(xs) / len(xs) if xs else 0.0


def should_promote(window_rewards, window, tau):
    """Promote when the window is full and its plain mean exceeds tau."""
    return len(window_rewards) >= window and moving_average(window_rewards, window) > tau


def median_index(values):
    """Index of the median of values (the lower median when their count is even)."""
    order = sorted(range(len(values)), key=lambda j: values[j])
    return order[(len(values) - 1) // 2]


def _step_of(line):
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    """Python, NumPy and torch RNG states as tensors and plain types (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), numpy=[kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
                torch=torch.get_rng_state())


def set_rng_state(s):
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])


def load_checkpoint(path):
    """A run directory is data, never code: the checkpoint is read with weights_only=True, so a
    file holding anything but tensors and plain types is refused before any of it runs."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends: say what and where, run nothing
        sys.exit(f"error: {path} is not a checkpoint this program wrote (it holds objects other than tensors "
                 f"and plain types, which are never unpickled): {str(e).splitlines()[0]}")


def main(argv=None):
    cfg = parse_args(argv)
    out = cfg["out"]
    ckpt_path = os.path.join(out, "checkpoint.pt")
    if not cfg.get("resume") and os.path.exists(os.path.join(out, "config.json")):
        sys.exit(f"error: run directory {out} already holds a run; use --resume {out} or another --out")
    try:
        hard = load_problems(cfg["hard_train"])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: --hard-train: {e}")
    if len(hard) < 2:
        sys.exit(f"error: --hard-train {cfg['hard_train']}: needs at least 2 problems, has {len(hard)}")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    seed = cfg["seed"]
    torch.manual_seed(seed)
    try:
        tok = load_tokenizer(cfg["model"])
        teacher, student = load_model(cfg["model"]), load_model(cfg["model"])
    except (OSError, ValueError) as e:
        sys.exit(f"error: --model {cfg['model']}: {str(e).splitlines()[0]}")
    ray, own_ray = None, False
    if cfg["workers"]:
        try:
            ray, own_ray = init_ray(cfg["workers"], cfg.get("ray_address"))
        except ImportError:
            sys.exit("error: --workers needs Ray: pip install ray==2.60.0")
        except Exception as e:  # e.g. no cluster at --ray-address
            sys.exit(f"error: cannot start or join Ray (--ray-address {cfg.get('ray_address')}): "
                     f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}")
    try:  # only now, with every input checked, does the run directory appear
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    except OSError as e:
        sys.exit(f"error: cannot write the run directory {out}: {e.strerror}")
    teacher_ref = frozen_copy(teacher) if cfg["teacher_kl"] > 0 else None
    t_opt, t_sched = make_optimizer(teacher, cfg["teacher_lr"], max(1, cfg["steps"]), cfg["teacher_warmup"])
    tcfg = RLConfig(lr=cfg["teacher_lr"], kl_coef=cfg["teacher_kl"], temperature=cfg["temperature"],
                    max_new_tokens=cfg["teacher_max_new_tokens"], micro_batch=cfg["micro_batch"], style=cfg["style"])
    scfg = RLConfig(lr=cfg["student_lr"], kl_coef=cfg["student_kl"], questions=cfg["student_questions"],
                    group=cfg["student_group"], temperature=cfg["temperature"], top_p=cfg["top_p"],
                    max_new_tokens=cfg["student_max_new_tokens"], micro_batch=cfg["micro_batch"],
                    sample_batch=cfg["sample_batch"], style=cfg["style"])
    state = dict(step=0, history=[], window=[], promotions=0, inner_steps=cfg["inner_steps"], pq=[])
    if cfg.get("resume") and os.path.exists(ckpt_path):
        ck = load_checkpoint(ckpt_path)
        teacher.load_state_dict(ck["teacher"])
        student.load_state_dict(ck["student"])
        t_opt.load_state_dict(ck["teacher_opt"])
        t_sched.load_state_dict(ck["teacher_sched"])
        state = ck["state"]
        set_rng_state(ck["rng"])
        print(f"resumed {out} at step {state['step']}")
    if cfg.get("resume"):  # logs may hold lines (or a torn line) from after the checkpoint: cut them back
        for name in ("metrics.jsonl", "teacher_samples.jsonl"):
            p = os.path.join(out, name)
            if os.path.exists(p):
                keep = [line for line in open(p) if _step_of(line) is not None and _step_of(line) < state["step"]]
                open(p, "w").writelines(keep)

    from tqdm import tqdm

    remote_timeouts = 0  # verifier timeouts inside Ray workers since this process started
    metrics = open(os.path.join(out, "metrics.jsonl"), "a")
    samples = open(os.path.join(out, "teacher_samples.jsonl"), "a")
    bar = tqdm(range(state["step"], cfg["steps"]), desc="SOAR", initial=state["step"], total=cfg["steps"])
    try:
        for t in bar:
            t0 = time.time()
            torch.manual_seed(seed * 1_000_003 + t)  # each step reseeded: a resumed run repeats exactly
            rng = random.Random(seed * 1_000_003 + t)
            # 1. teacher sampling with rejection
            datasets, st = sample_teacher_datasets(
                teacher, tok, cfg["g"], cfg["n"], cfg["style"], cfg["temperature"], cfg["top_p"],
                cfg["teacher_max_new_tokens"], cfg["sample_batch"], cfg["max_teacher_rounds"],
                reject_path=os.path.join(out, "rejected.jsonl"))
            # 2. fresh reward questions, baseline accuracy
            qr = rng.sample(hard, min(cfg["m"], len(hard)))
            base_acc = greedy_accuracy(student, tok, qr, cfg["style"], cfg["student_max_new_tokens"])
            # 3. inner loop: g x r students
            try:
                results, best = grounded_rewards(student, tok, datasets, qr, base_acc, cfg["r"], state["inner_steps"],
                                                 scfg, seed=seed * 1_000_003 + t, progress=False,
                                                 workers=cfg["workers"], threads=cfg["threads"])
            except InnerStudentError as e:
                raise InnerStudentError(f"step {t}: {e}") from e
            remote_timeouts += sum(res.remote_verifier_timeouts for res in results)
            grounded = [res.reward for res in results]
            rewards = grounded if cfg["reward"] == "grounded" else learnability_rewards(
                student, tok, datasets, cfg["student_group"], scfg, seed=seed * 1_000_003 + t)
            # 4. promotion, on the grounded reward (the measured gain) whichever reward trains the teacher
            r_hat = sum(grounded) / len(grounded)
            state["history"].append(r_hat)
            state["window"].append(r_hat)
            ma = moving_average(state["window"], cfg["window"])
            promoted = None
            if not cfg["no_promotion"] and should_promote(state["window"], cfg["window"], cfg["tau"]):
                j = median_index(best.repeat_rewards)
                student.load_state_dict(best.students[j])
                state["pq"] += [{"question": q, "answer": a, "step": t} for _, q, a in datasets[best.k]]
                state["promotions"] += 1
                state["inner_steps"] = min(state["inner_steps"] + cfg["inner_steps_inc"], cfg["inner_steps_max"])
                state["window"] = []
                # PS is the promoted student with the best greedy accuracy on all of D_train
                train_acc = greedy_accuracy(student, tok, hard, cfg["style"], cfg["student_max_new_tokens"])
                promoted = dict(dataset=best.k, student=j, reward=best.repeat_rewards[j], train_acc=train_acc)
                if train_acc > state.get("ps_train_acc", -1.0):
                    state["ps_train_acc"], state["ps_step"] = train_acc, t
                    save_model(student, tok, os.path.join(out, "ps"), cfg["style"])
            # 5. teacher update
            upd = {}
            if not cfg["no_teacher_update"]:
                upd = teacher_step(teacher, t_opt, t_sched, datasets, rewards, tcfg, tok.pad_token_id, teacher_ref)
            questions = [q for data in datasets for _, q, _ in data]
            extra = {}
            if cfg["style"] == "toy":  # the toy world's difficulty knob, per question
                from toy.task import difficulty

                extra["difficulty"] = [difficulty(q) for q in questions]
            row = dict(step=t, reward_mean=r_hat, reward_ma=ma, rewards=rewards, grounded_rewards=grounded,
                       repeat_rewards=[res.repeat_rewards for res in results], baseline_acc=base_acc,
                       promoted=promoted, promotions=state["promotions"], inner_steps=state["inner_steps"],
                       rejection_rate=st["rejection_rate"], teacher_drawn=st["drawn"],
                       teacher_pg_loss=upd.get("pg_loss"), teacher_kl=upd.get("kl"),
                       teacher_grad_norm=upd.get("grad_norm"), teacher_update_skipped=upd.get("skipped"),
                       teacher_zero_signal=int(max(rewards) == min(rewards)),  # equal R_k: no gradient
                       inner_zero_signal_groups=sum(res.zero_signal_groups for res in results),
                       inner_skipped_updates=sum(res.skipped_updates for res in results),
                       verifier_timeouts=get_verifier().timeouts + remote_timeouts, question_diversity=diversity(questions), **extra)
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            for k, data in enumerate(datasets):
                samples.write(json.dumps({"step": t, "dataset": k, "reward": rewards[k],
                                          "pairs": [{"question": q, "answer": a} for _, q, a in data]}) + "\n")
            samples.flush()
            state["step"] = t + 1
            atomic_save(dict(teacher=teacher.state_dict(), student=student.state_dict(),
                             teacher_opt=t_opt.state_dict(), teacher_sched=t_sched.state_dict(), state=state,
                             rng=rng_state()), ckpt_path)
            tqdm.write(f"step {t:3d} | R {r_hat:+.3f} MA {ma:+.3f} | promotions {state['promotions']} "
                       f"| reject {st['rejection_rate']:.2f} | base acc {base_acc:.3f} | S {state['inner_steps']} "
                       f"| {time.time() - t0:.0f}s" + (f" | PROMOTED dataset {promoted['dataset']}" if promoted else ""))
    except TeacherSamplingError as e:
        sys.exit(f"error: {e}")
    except InnerStudentError as e:
        sys.exit(f"error: {e}; the last finished step is checkpointed in {ckpt_path}; continue with --resume {out}")
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last finished step is checkpointed in {ckpt_path}; continue with --resume {out}")
        sys.exit(130)
    finally:
        if own_ray:  # disconnect; a local cluster this run started stops with it, a joined one keeps running
            ray.shutdown()

    save_model(student, tok, os.path.join(out, "student"), cfg["style"])
    save_model(teacher, tok, os.path.join(out, "teacher"), cfg["style"])
    with open(os.path.join(out, "pq.jsonl"), "w") as f:
        for p in state["pq"]:
            f.write(json.dumps(p) + "\n")
    print(f"final baseline student: {os.path.join(out, 'student')}  ({state['promotions']} promotions)")
    if "ps_step" in state:
        print(f"promoted student (PS): {os.path.join(out, 'ps')}  (from step {state['ps_step']}, "
              f"greedy accuracy on D_train {state['ps_train_acc']:.3f})")
    print(f"promotion questions (PQ): {os.path.join(out, 'pq.jsonl')}  ({len(state['pq'])} pairs)")
    print(f"trained teacher (Grounded-T): {os.path.join(out, 'teacher')}")
    print(f"metrics: {os.path.join(out, 'metrics.jsonl')}")


if __name__ == "__main__":
    main()

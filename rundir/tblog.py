"""
rundir/tblog.py -- live curves of a run: each metrics row as TensorBoard scalars, as it is written.

    python soar.py --steps 2 --out runs/quick --log tensorboard    # event files in runs/quick/
    tensorboard --logdir runs/                                     # every run directory is one run

soar.py logs each outer step's metrics.jsonl row under tags grouped by the paper's five steps
(TensorBoard groups tags by what comes before the first "/"), with histograms of the questions'
difficulty (toy world) and of R_kj, and a few of the step's teacher questions as text;
experiments/protocol.py logs each fresh student's curve.jsonl row under fresh_student/.
tensorboard is an optional extra (pip install tensorboard==2.21.0), imported only by summary_writer();
nothing of the project is imported here.
"""
import os
import statistics
import sys
import time

import numpy as np

# tag -> key of a metrics row (soar.step_row; last: a fresh student's curve.jsonl row). A key whose value
# is None is not logged: Intrinsic-T has no MA or baseline accuracy, --no-teacher-update no loss.
SCALARS = {
    "1_teacher_sampling/rejection_rate": "rejection_rate", "1_teacher_sampling/drawn": "teacher_drawn",
    "1_teacher_sampling/question_diversity": "question_diversity",
    "1_teacher_sampling/answer_acc": "teacher_answer_acc",
    "2_reward/R_hat": "reward_mean", "2_reward/MA": "reward_ma", "2_reward/baseline_acc": "baseline_acc",
    "3_inner_loop/S": "inner_steps", "3_inner_loop/zero_signal_groups": "inner_zero_signal_groups",
    "3_inner_loop/skipped_updates": "inner_skipped_updates", "3_inner_loop/verifier_timeouts": "verifier_timeouts",
    "4_promotion/promotions": "promotions", "4_promotion/pq_size": "pq_size",
    "5_teacher_update/pg_loss": "teacher_pg_loss", "5_teacher_update/grad_norm": "teacher_grad_norm",
    "5_teacher_update/kl": "teacher_kl", "5_teacher_update/skipped": "teacher_update_skipped",
    "5_teacher_update/zero_signal": "teacher_zero_signal",
    "fresh_student/train_accuracy": "train_accuracy", "fresh_student/reward": "reward",
}


def summary_writer():
    """open(log_dir, purge_step=0): a torch SummaryWriter for log_dir (without tensorboard installed, a
    one-line exit here saying how to get it). TensorBoard reads a directory's event files in the order
    of their names, which begin with the second the file was opened: a writer opened in the same second
    as an earlier run's (a run killed and resumed at once) could sort first, and its purge would then
    drop its own points. So open waits, if need be, for the next second."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        sys.exit("error: --log tensorboard needs tensorboard: pip install tensorboard==2.21.0")

    def open_writer(log_dir, purge_step=0):
        names = os.listdir(log_dir) if os.path.isdir(log_dir) else []
        opened = [int(f.split(".")[3]) for f in names if f.startswith("events.out.tfevents.") and f.split(".")[3].isdigit()]
        while opened and time.time() < max(opened) + 1:
            time.sleep(0.05)
        return SummaryWriter(log_dir, purge_step=purge_step)

    return open_writer


def scalars(row):
    """{tag: value} of one metrics row: the table above, plus the per-row lists and dicts as scalars."""
    out = {tag: float(row[key]) for tag, key in SCALARS.items() if row.get(key) is not None}
    out.update({f"2_reward/R_{k}": float(r) for k, r in enumerate(row.get("rewards") or [])})
    if "promoted" in row:  # an event: 1 at the step that promoted
        out["4_promotion/promoted"] = float(bool(row["promoted"]))
        if row["promoted"]:
            out["4_promotion/promoted_train_acc"] = float(row["promoted"]["train_acc"])
    known = [d for d in row.get("difficulty") or [] if d is not None]
    if known:
        out["1_teacher_sampling/mean_difficulty"] = statistics.mean(known)
    test = row.get("test") or {}  # a fresh student's evaluation steps
    out.update({f"fresh_student/test_{k}": float(v) for k, v in test.items() if k.startswith("pass@")})
    return out


def questions_text(datasets, rewards, per_dataset=3):
    """Markdown: the first few (question, answer) pairs of each dataset [(prompt, q, a)], with its R_k."""
    lines = []
    for k, data in enumerate(datasets):
        lines.append(f"**dataset {k}** (R_{k} = {rewards[k]:+.4f})\n")
        lines += [f"- `{q}` → `{a}`" for _, q, a in data[:per_dataset]]
        lines.append("")
    return "\n".join(lines)


def log_row(writer, row, datasets=None):
    """Write one row at its step and flush: on disk before the caller checkpoints, so that a killed run
    loses no step it checkpointed (and a resumed one, opened with purge_step, repeats none)."""
    t = row["step"]
    for tag, v in scalars(row).items():
        writer.add_scalar(tag, v, t)
    known = [d for d in row.get("difficulty") or [] if d is not None]
    if known:
        writer.add_histogram("1_teacher_sampling/difficulty", np.array(known), t)
    if row.get("repeat_rewards"):
        writer.add_histogram("3_inner_loop/R_kj", np.array([x for rs in row["repeat_rewards"] for x in rs]), t)
    if datasets:
        writer.add_text("1_teacher_sampling/questions", questions_text(datasets, row["rewards"]), t)
    writer.flush()

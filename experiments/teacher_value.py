"""
python -m experiments.teacher_value -- what a teacher's questions are worth to a student, measured
with one fixed instrument, so that teachers (and one teacher's snapshots along a run) can be compared.

    python -m experiments.teacher_value --teacher toy/model --out runs/teacher_value/base-t      # Base-T
    python soar.py --teacher-snapshots 5 --out runs/x            # a run that keeps its teacher every 5 steps
    python -m experiments.teacher_value --run runs/x             # step 0 (its base teacher) and every snapshot
    python -m experiments.teacher_value --plot runs/x/teacher_value runs/y/teacher_value --out runs/tv.png
    python -m experiments.teacher_value --draws runs/x/teachers/step025 runs/x/teachers/step030 --k 16
    python -m experiments.teacher_value --shares runs/x/teacher_value/step*.json   # add L 8-9 shares to old files

The instrument: from the teacher, K datasets of n valid questions (the run's sampling, seeded by
--seed alone, so two teachers are read with the same draws); for each dataset, a fresh copy of the
*base* student trained for S RLOO steps on it (soar.py's inner loop, train_teacher.grounded_rewards,
r = 1); the dataset's value is that student's greedy accuracy on D_test minus the base student's.
The teacher's value is the mean over the K datasets, with a 95% percentile-bootstrap interval over
them. It measures a teacher, not a run: the student is always the base one, never a promoted one,
and nothing here changes the teacher. D_test is what it is scored on, so no setting is ever chosen
by it (choose them on probes that score D_train). Because the draws are common to all teachers,
two teachers that barely differ write nearly the same datasets and read nearly the same: --draws
says how many of the K·n questions two teachers share under the instrument's draws, and by how
much their weights differ at most.

Defaults are the toy preset's inner loop (S = 20, n = 16, lr 1e-4, 8 questions x 8 samples per step),
or the measured run's (--run). Each teacher's result goes to OUT/step{NNN}.json (with --teacher:
OUT/result.json); one that exists is skipped, so a stopped measurement continues.
"""
import argparse
import glob
import json
import os
import random
import statistics

import torch

from evaluate import greedy_accuracy, load_data
from generate import HelpFormatter, load_model, load_tokenizer, model_style
from soar import PRESETS
from train_student import RLConfig
from scaleout.ray_students import init_ray
from train_teacher import grounded_rewards, sample_teacher_datasets


def mean_ci(xs, reps=10_000, seed=0):
    """(mean, low, high): the 95% percentile-bootstrap interval of the mean of xs."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(xs, k=len(xs))) for _ in range(reps))
    return statistics.fmean(xs), means[int(0.025 * reps)], means[int(0.975 * reps) - 1]


def draws(teacher, tok, cfg, k):
    """The instrument's K datasets from a teacher (soar.py's rejection sampling with the run's settings)."""
    return sample_teacher_datasets(teacher, tok, k, cfg["n"], cfg["style"], cfg["temperature"], cfg["top_p"],
                                   cfg["teacher_max_new_tokens"], cfg["sample_batch"], cfg["max_teacher_rounds"])


def teacher_value(teacher_path, cfg, test, k, seed=0, workers=0):
    """One teacher's value (see the module docstring) as a dict; cfg: a soar.py config."""
    torch.manual_seed(seed)
    tok, teacher = load_tokenizer(cfg["model"]), load_model(teacher_path)
    style = cfg["style"]
    datasets, st = draws(teacher, tok, cfg, k)
    del teacher
    student = load_model(cfg["model"])
    base_acc = greedy_accuracy(student, tok, test, style, cfg["student_max_new_tokens"])
    scfg = RLConfig(lr=cfg["student_lr"], kl_coef=cfg["student_kl"], questions=cfg["student_questions"],
                    group=cfg["student_group"], temperature=cfg["temperature"], top_p=cfg["top_p"],
                    max_new_tokens=cfg["student_max_new_tokens"], micro_batch=cfg["micro_batch"],
                    sample_batch=cfg["sample_batch"], style=style, dtype=cfg["dtype"])
    results, _ = grounded_rewards(student, tok, datasets, test, base_acc, 1, cfg["inner_steps"], scfg, seed=seed,
                                  progress=True, workers=workers, threads=cfg["threads"])
    gains = [res.reward for res in results]
    mean, low, high = mean_ci(gains, seed=seed)
    extra = toy_facts(datasets) if style == "toy" else {}
    return dict(teacher=teacher_path, value=mean, ci=[low, high], gains=gains, base_acc=base_acc, k=k,
                seed=seed, rejection_rate=st["rejection_rate"], **extra)


def toy_facts(datasets):
    """On the toy world: the share of the datasets' answers that are right (the solver's), and each
    dataset's share of questions at L 8-9 (the hard set's rung and the one below), so that a gain can be
    set against how hard the questions that earned it were."""
    from toy.task import answer_key_accuracy, difficulty

    return dict(answer_acc=answer_key_accuracy([(q, a) for data in datasets for _, q, a in data]),
                hard_share=[sum(difficulty(q) in (8, 9) for _, q, _ in data) / len(data) for data in datasets])


def add_shares(path):
    """A toy result file written before toy_facts kept hard_share: draw its teacher's datasets again
    with the instrument's seeding and add each dataset's share of L 8-9 questions. The draws must be the
    measured ones: the answer key recomputed from them has to equal the one in the file."""
    res = json.load(open(path))
    here = os.path.dirname(os.path.abspath(path))
    run_cfg = os.path.join(os.path.dirname(here), "config.json")
    if os.path.basename(here) == "teacher_value" and os.path.exists(run_cfg):
        cfg = json.load(open(run_cfg))  # a snapshot read with --run: the run's own settings
    else:
        cfg = dict(PRESETS["toy"], style=model_style(res["teacher"]) or "toy")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(res["seed"])  # as teacher_value seeds it, before the same two loads
    tok, teacher = load_tokenizer(cfg["model"]), load_model(res["teacher"])
    facts = toy_facts(draws(teacher, tok, cfg, res["k"])[0])
    if abs(facts["answer_acc"] - res["answer_acc"]) > 1e-12:
        raise SystemExit(f"{path}: its teacher's draws came out different this time (answer key "
                         f"{facts['answer_acc']:.4f}, the file's {res['answer_acc']:.4f}: another CPU type?); nothing written")
    res["hard_share"] = facts["hard_share"]
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)
    return res


def draws_overlap(paths, cfg, k, seed=0):
    """How alike two teachers are as the instrument sees them: the questions they share, position
    by position, under the instrument's draws (teacher_value's seeding), and the largest absolute
    difference between their weights."""
    tok, qs, params = load_tokenizer(cfg["model"]), [], []
    for path in paths:
        torch.manual_seed(seed)
        teacher = load_model(str(path))
        datasets, _ = draws(teacher, tok, cfg, k)
        qs.append([(q, a) for data in datasets for _, q, a in data])
        params.append(dict(teacher.named_parameters()))
    a, b = params
    with torch.no_grad():
        dw = max((a[name].float() - b[name].float()).abs().max().item() for name in a)
    shared = sum(x == y for x, y in zip(*qs))
    return dict(teachers=[str(p) for p in paths], shared=shared, questions=len(qs[0]), max_weight_diff=dw, k=k, seed=seed)


def snapshots(run):
    """[(step, teacher path)] of a soar.py run: step 0 its base model, then each teachers/stepNNN/."""
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    found = [(int(os.path.basename(p)[4:]), p) for p in sorted(glob.glob(os.path.join(run, "teachers", "step*")))]
    return cfg, [(0, cfg["model"])] + found


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.teacher_value", description=__doc__,
                                 formatter_class=HelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", help="one teacher model (directory); the inner loop is the toy preset's")
    src.add_argument("--run", help="a soar.py run directory: its base teacher and every teachers/stepNNN/ "
                                   "snapshot, with the run's own inner loop")
    src.add_argument("--plot", nargs="+", metavar="DIR", help="draw the value per step of each DIR of results "
                                                              "(RUN/teacher_value) into --out (a .png)")
    src.add_argument("--draws", nargs=2, metavar="TEACHER", help="the questions two teachers share under the "
                                                                 "instrument's draws, and their largest weight difference")
    src.add_argument("--shares", nargs="+", metavar="RESULT", help="add each dataset's share of L 8-9 questions "
                                                                   "to toy result files that lack it (redrawn, checked)")
    ap.add_argument("--k", type=int, default=16, help="datasets (and fresh students) per teacher")
    ap.add_argument("--test", help="D_test (default: the run's hard_test, else the toy preset's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the teacher's draws and of the students")
    ap.add_argument("--workers", type=int, default=0, help="train the K students as Ray tasks, N at a time")
    ap.add_argument("--out", help="result directory (default: RUN/teacher_value, or runs/teacher_value/NAME); "
                                  "with --plot, the figure's path (default: runs/teacher_value.png)")
    a = ap.parse_args(argv)
    if a.plot:
        from experiments.plots import teacher_value_plot

        curves = {}
        for d in a.plot:
            rows = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(d, "step*.json")))]
            if not rows:
                ap.error(f"--plot {d}: no stepNNN.json there")
            run = os.path.dirname(os.path.normpath(d))  # RUN/teacher_value: labelled by its run
            curves[os.path.basename(run) or d] = [(r["step"], r["value"], *r["ci"]) for r in rows]
        print(teacher_value_plot(curves, a.out or os.path.join("runs", "teacher_value.png")))
        return
    if a.shares:
        for path in a.shares:
            if "hard_share" not in json.load(open(path)):
                res = add_shares(path)
                print(f"{path}: mean share of L 8-9 questions {statistics.fmean(res['hard_share']):.3f}", flush=True)
        return
    if a.draws:
        cfg = dict(PRESETS["toy"], style=model_style(a.draws[0]) or "toy")
        print(json.dumps(draws_overlap(a.draws, cfg, a.k, a.seed)))
        return
    if a.run:
        cfg, todo = snapshots(a.run)
        out = a.out or os.path.join(a.run, "teacher_value")
        todo = [(t, p, os.path.join(out, f"step{t:03d}.json")) for t, p in todo]
    else:
        cfg = dict(PRESETS["toy"], style=model_style(a.teacher) or "toy")
        out = a.out or os.path.join("runs", "teacher_value", os.path.basename(os.path.normpath(a.teacher)))
        todo = [(None, a.teacher, os.path.join(out, "result.json"))]
    test = load_data(a.test or cfg["hard_test"] or PRESETS["toy"]["hard_test"])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if a.workers:
        init_ray(a.workers)
    os.makedirs(out, exist_ok=True)
    for step, path, dest in todo:
        if os.path.exists(dest):
            continue
        res = dict(teacher_value(path, cfg, test, a.k, a.seed, a.workers), step=step)
        with open(dest + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(dest + ".tmp", dest)
        print(json.dumps({k: v for k, v in res.items() if k != "gains"}), flush=True)


if __name__ == "__main__":
    main()

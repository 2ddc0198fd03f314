"""
python -m experiments.sweep -- the toy lab's pre-registered sweep: does the grounded teacher learn at
the paper's design? (experiments/README.md, "The sweep, pre-registered", states the comparison, its
test and its size; this file runs exactly that.) Run from the repository root:

    python -m experiments.sweep --dry                 # every unit, in order, with its command
    python -m experiments.sweep --only soar-seed1 grounded-value-seed1    # some units (names as --dry prints)
    python -m experiments.sweep                       # every unit not done yet, then the report
    python -m experiments.sweep --report --out experiments/results/sweep  # the report from what is done
    python -m experiments.sweep --report --root experiments/results/sweep --out /tmp/again  # ... from the committed copies

Units, each done once its result file exists (so a stopped sweep continues; a stopped soar.py run
continues from its checkpoint; a unit whose result is committed under --keep is copied from there,
not run again):
  base-t-value            Base-T (the untrained model) read by experiments.teacher_value, K = 64;
  soar-seedS              SOAR, the toy preset for 30 outer steps, the teacher kept every 5 steps;
  grounded-value-seedS    its final teacher (Grounded-T) read by the same instrument, K = 32;
  base-seedS              the base model's pass@k on D_test, sampled with seed S (a run "broke through"
                          when its pass@32 is above it);
  grounded-t-seedS[-studentJ], base-t-seedS[-studentJ]
                          the protocol's teacher evaluation: 3 fresh base students per teacher and
                          seed, each with its own seed (experiments.toy_table's seeds: S, S + 1000 J);
  and on seed 0 only: nopromo-seed0 (SOAR without promotion, the paper's baseline), intrinsic-seed0
  (the learnability reward), and the teacher-value curves: every snapshot of the three runs, K = 16.

The instrument is soar.py's toy inner loop on the *base* student (n 16, S 20, lr 1e-4, r 1), scored
on D_test (toy/hard-large/test.jsonl): a teacher's value is its datasets' mean greedy gain there. The
report's primary number is the mean over seeds of (Grounded-T's value - Base-T's value), with a 95%
interval from a two-level bootstrap: the seeds resampled, then each teacher's datasets (Base-T's
too). The secondary, the protocol's pass@32 Grounded-T - Base-T, goes through experiments.report
(its bootstrap over seeds, students and test problems). The report writes sweep.json and sweep.md:
the primary per seed, the power as measured, and per SOAR run its promotions, the teacher's KL to
its base and answer key (the steps below soar.py's 90% floor named), and its share of hard questions.
"""
import argparse
import glob
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

from experiments.report import pooled_signal, rung_shares
from experiments.toy_table import student_seed

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEP = os.path.join("experiments", "results", "sweep")  # the committed copies (collect writes them)
PY = sys.executable
SEEDS, STUDENTS, STEPS, EVERY = (0, 1, 2, 3), 3, 30, 5
K_BASE, K_GROUNDED, K_CURVE = 64, 32, 16


def units(root, seeds=SEEDS):
    """[(name, file whose existence means done, command)] in the order the sweep runs them."""
    r = lambda *p: os.path.join(root, *p)  # noqa: E731
    value = [PY, "-m", "experiments.teacher_value"]
    soar = lambda s, name, *extra: (name, r(name, "pq.jsonl"), [  # noqa: E731
        PY, "soar.py", "--seed", str(s), "--steps", str(STEPS), "--teacher-snapshots", str(EVERY), *extra, "--out", r(name)])
    out = [("base-t-value", r("value", "base-t", "result.json"),
            value + ["--teacher", "toy/model", "--k", str(K_BASE), "--out", r("value", "base-t")])]
    for s in seeds:  # the primary comparison first, seed by seed
        out.append(soar(s, f"soar-seed{s}"))
        out.append((f"grounded-value-seed{s}", r("value", f"grounded-seed{s}", "result.json"),
                    value + ["--teacher", r(f"soar-seed{s}", "teacher"), "--k", str(K_GROUNDED),
                             "--out", r("value", f"grounded-seed{s}")]))
    for s in seeds:  # then the protocol: the base model's pass@k (what "broke through" is measured against)
        out.append((f"base-seed{s}", r(f"base-seed{s}", "result.json"), [PY, "-m", "experiments.protocol", "passk",
                    "--model", "toy/model", "--seed", str(s), "--out", r(f"base-seed{s}")]))
        for j in range(STUDENTS):  # and the fresh students
            for method, teacher in (("grounded-t", [r(f"soar-seed{s}", "teacher"), "--base", "toy/model"]),
                                    ("base-t", ["toy/model"])):
                name = f"{method}-seed{s}" + (f"-student{j}" if j else "")
                out.append((name, r(name, "result.json"), [PY, "-m", "experiments.protocol", "teacher", "--teacher",
                            *teacher, "--seed", str(student_seed(s, j)), "--out", r(name)]))
    if 0 in seeds:  # the teacher-value curves, on seed 0, each read right after its run (its snapshots
        for run, extra in (("soar-seed0", None), ("nopromo-seed0", ["--no-promotion"]),  # are not committed)
                           ("intrinsic-seed0", ["--reward", "learnability"])):
            if extra:
                out.append(soar(0, run, *extra))
            out.append((f"curve-{run}", r(run, "teacher_value", f"step{STEPS:03d}.json"),
                        value + ["--run", r(run), "--k", str(K_CURVE)]))
    return out


def two_level(grounded, base, boots=10_000, seed=0):
    """Mean over seeds of (mean of a seed's Grounded-T gains - mean of Base-T's gains), and its 95%
    interval: each replicate draws the seeds with replacement, then every drawn teacher's datasets
    (and Base-T's) with replacement. grounded: {seed: [gains]}; base: [gains]."""
    rng = random.Random(seed)
    m = statistics.fmean
    point = m([m(g) for g in grounded.values()]) - m(base)
    seeds, reps = list(grounded), []
    for _ in range(boots):
        drawn = [grounded[rng.choice(seeds)] for _ in seeds]
        reps.append(m([m(rng.choices(g, k=len(g))) for g in drawn]) - m(rng.choices(base, k=len(base))))
    reps.sort()
    return dict(diff=point, lo=reps[int(0.025 * boots)], hi=reps[int(0.975 * boots) - 1], seeds=len(seeds))


def collect(root, out):
    """Copy the report's inputs, all small, from ROOT into OUT under the same names, so that
    `--report --root OUT --out OUT` recomputes the report from the committed files alone: the
    instrument's value files, the runs' metrics and teacher-value curves, the protocol's result.json
    and evaluation questions. A run's metrics in OUT are not replaced by fewer rows (a committed run
    being run again is read from its committed rows until the rerun has as many)."""
    rows = lambda p: sum(1 for _ in open(p))  # noqa: E731
    keep = [os.path.join("value", "*", "result.json"), os.path.join("*-seed*", "metrics.jsonl"),
            os.path.join("*-seed*", "config.json"), os.path.join("*-seed*", "teacher_value", "step*.json"),
            os.path.join("*-seed*", "result.json"), os.path.join("*-seed*", "questions.jsonl"),
            # a finished run's mark and, for the primary's runs, the teacher the protocol reads (3.5 MB)
            os.path.join("*-seed*", "pq.jsonl"), os.path.join("soar-seed*", "teacher", "*")]
    for pattern in keep:
        for path in glob.glob(os.path.join(root, pattern)):
            dest = os.path.join(out, os.path.relpath(path, root))
            if os.path.abspath(dest) == os.path.abspath(path) or (
                    path.endswith("metrics.jsonl") and os.path.exists(dest) and rows(dest) > rows(path)):
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(path, dest)


def restore(root, keep, todo):
    """Copy into ROOT every unit done in KEEP (its result file is there) but not in ROOT: all its
    committed files, so that a fresh checkout continues the sweep instead of repeating it. A run whose
    curve is not kept is left to run again, curve and all (its snapshots are not committed). Returns
    the names copied."""
    dones, got = {n: d for n, d, _ in todo}, []
    kept = lambda p: os.path.join(keep, os.path.relpath(p, root))  # noqa: E731
    for name, done, _ in todo:
        if os.path.exists(done) or not os.path.exists(kept(done)):
            continue
        curve = dones.get(f"curve-{name}")
        if curve and not os.path.exists(curve) and not os.path.exists(kept(curve)):
            continue
        for path in glob.glob(os.path.join(os.path.dirname(kept(done)), "**", "*"), recursive=True):
            dest = os.path.join(root, os.path.relpath(path, keep))
            if os.path.isfile(path) and not os.path.exists(dest):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copyfile(path, dest)
        got.append(name)
    return got


def first_difference(a, b):
    """The first outer step at which two metrics.jsonl files differ (None: every row the same), and
    the keys that differ there: a rerun of a committed run on the same kind of CPU repeats it."""
    rows = lambda p: [json.loads(x) for x in open(p)]  # noqa: E731
    ra, rb = rows(a), rows(b)
    for x, y in zip(ra, rb):
        if x != y:
            return x.get("step"), sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
    return (None, []) if len(ra) == len(rb) else (min(len(ra), len(rb)), ["rows"])


def share_slope(teachers, boots=2000, seed=0):
    """How a dataset's gain goes with its share of L 8-9 questions, within a teacher: the slope of gain on
    share with each teacher's own means taken out (so teachers' differences do not make it), pooled over
    the teachers' datasets, and its 95% interval resampling each teacher's datasets. teachers:
    {label: (shares, gains)}. None where no teacher's shares vary."""
    def slope(pairs):
        sxy = sxx = 0.0
        for xs, ys in pairs:
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            sxy += sum((x - mx) * (y - my) for x, y in zip(xs, ys))
            sxx += sum((x - mx) ** 2 for x in xs)
        return sxy / sxx if sxx else None

    pairs, rng = list(teachers.values()), random.Random(seed)
    point = slope(pairs)
    if point is None:
        return None
    reps = []
    for _ in range(boots):
        drawn = []
        for xs, ys in pairs:
            idx = [rng.randrange(len(xs)) for _ in xs]
            drawn.append(([xs[i] for i in idx], [ys[i] for i in idx]))
        reps.append(slope(drawn) or 0.0)
    reps.sort()
    return dict(slope=point, lo=reps[int(0.025 * boots)], hi=reps[int(0.975 * boots) - 1],
                datasets=sum(len(xs) for xs, _ in pairs))


def run_facts(rows, floor):
    """What one SOAR run did, from its metrics rows: when it promoted, the peak of the reward's moving
    average (what τ is compared with), the teacher's largest per-token KL to its base, its answer key
    (mean, lowest, and the steps below FLOOR, soar.py's warning), and its share of questions at
    L 8-9 (the hard set's rung and the one below) over each third of the run; and how far its reward
    points at that share: the correlation, pooled over steps, of a dataset's RLOO advantage with its
    share (experiments.report.pooled_signal; 0: the update ignores it)."""
    col = lambda k: [r[k] for r in rows if r.get(k) is not None]  # noqa: E731
    acc, ma, kl = col("teacher_answer_acc"), col("reward_ma"), col("teacher_kl")
    share = [sum(d in (8, 9) for d in r["difficulty"]) / len(r["difficulty"]) for r in rows if r.get("difficulty")]
    third = max(1, -(-len(share) // 3))  # a run just started has no rows yet
    return dict(steps=len(rows), promoted_at=[r["step"] for r in rows if r.get("promoted")],
                reward_mean=statistics.fmean(col("reward_mean")) if col("reward_mean") else None,
                ma_peak=max(ma, default=None), kl_max=max(kl, default=None),
                answer_acc_mean=statistics.fmean(acc) if acc else None, answer_acc_min=min(acc, default=None),
                below_floor=[r["step"] for r in rows if r.get("teacher_answer_acc", 1.0) < floor],
                hard_share_thirds=[statistics.fmean(share[i:i + third]) for i in range(0, len(share), third)],
                hard_signal=pooled_signal(rung_shares(rows, 8, 9)))


def markdown(found, floor):
    """sweep.md: the primary and its seeds, the power as measured, and what each run did."""
    pts = lambda d: f"{100 * d['diff']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"  # noqa: E731
    lines = ["# The sweep's report (python -m experiments.sweep --report)", ""]
    if "primary" in found:
        pw = found["power"]
        lines += [f"Primary, Grounded-T - Base-T teacher value, points of D_test ({found['primary']['seeds']} "
                  f"of {len(SEEDS)} seeds): **{pts(found['primary'])}**", "",
                  "| seed | Grounded-T value, % [95% CI] | answers right | - Base-T, points [95% CI] |", "|---|---|---|---|"]
        for s, g in found["grounded_t"].items():
            lines.append(f"| {s} | {100 * g['value']:.2f} [{100 * g['ci'][0]:.2f}, {100 * g['ci'][1]:.2f}] | "
                         f"{100 * g.get('answer_acc', float('nan')):.1f}% | {pts(found['per_seed'][s])} |")
        b = found["base_t"]
        lines += ["", f"Base-T: {100 * b['value']:.2f}% [{100 * b['ci'][0]:.2f}, {100 * b['ci'][1]:.2f}], K = {b['k']}. "
                  f"Power: per-dataset SD {100 * pw['dataset_sd']:.2f} points (Base-T), {100 * pw['grounded_sd']:.2f} "
                  f"(Grounded-T); SE of D {100 * pw['se']:.2f} now, {100 * pw['se_planned']:.2f} at {len(SEEDS)} seeds "
                  f"(80% power for {100 * pw['mde80']:.2f} points)", ""]
    h = found.get("hardness")
    if h and h["fit"]:
        fit = h["fit"]
        lines += [f"Within a teacher, a dataset with 0.1 more of its questions at L 8-9 gained "
                  f"{10 * fit['slope']:+.2f} points of D_test [{10 * fit['lo']:+.2f}, {10 * fit['hi']:+.2f}] "
                  f"({fit['datasets']} datasets). Share of L 8-9 questions in the instrument's draws: " +
                  ", ".join(f"{n} {x:.3f}" for n, x in h["share"].items()) +
                  f"; at that slope the shares' differences predict Grounded-T - Base-T = "
                  f"{100 * h['predicted_diff']:+.2f} points ({h['seeds']} seeds).", ""]
    for run, pts in found.get("curves", {}).items():
        f = lambda x, n: "-" if x is None else f"{x:.{n}f}"  # noqa: E731
        lines += [f"Teacher value along {run} (K = {K_CURVE} per snapshot; step 0 is its base teacher):", "",
                  "| outer step | " + " | ".join(str(p["step"]) for p in pts) + " |", "|---|" + "---|" * len(pts),
                  "| value, % | " + " | ".join(f"{100 * p['value']:.2f}" for p in pts) + " |",
                  "| 95% CI | " + " | ".join(f"{100 * p['ci'][0]:.2f}-{100 * p['ci'][1]:.2f}" for p in pts) + " |",
                  "| answers right | " + " | ".join(f(p["answer_acc"], 3) for p in pts) + " |",
                  "| L 8-9 share | " + " | ".join(f(p["hard_share"], 3) for p in pts) + " |", ""]
    if found.get("runs"):
        lines += [f"| run | steps | promoted at | mean R̂ | MA peak | KL max | answers right, mean (lowest) | "
                  f"below {floor:.0%} at | L 8-9 share by thirds | advantage ~ L 8-9 share |", "|---|---|---|---|---|---|---|---|---|---|"]
        f = lambda x, n=4: "-" if x is None else f"{x:.{n}f}"  # noqa: E731
        for name, r in found["runs"].items():
            lines.append(f"| {name} | {r['steps']} | {', '.join(map(str, r['promoted_at'])) or 'never'} | "
                         f"{f(r['reward_mean'])} | {f(r['ma_peak'])} | {f(r['kl_max'])} | "
                         f"{f(r['answer_acc_mean'], 3)} ({f(r['answer_acc_min'], 3)}) | "
                         f"{', '.join(map(str, r['below_floor'])) or 'never'} | "
                         f"{', '.join(f(x, 3) for x in r['hard_share_thirds'])} | {f(r['hard_signal'], 2)} |")
    return "\n".join(lines) + "\n"


def report(root, out):
    """The primary comparison (and per seed) into OUT/sweep.json, the curve figure, and experiments.report
    for the protocol's rows; prints what it found. The inputs are copied into OUT first (collect)."""
    os.makedirs(out, exist_ok=True)
    collect(root, out)
    read = lambda p: json.load(open(p)) if os.path.exists(p) else None  # noqa: E731
    base = read(os.path.join(root, "value", "base-t", "result.json"))
    grounded = {s: read(os.path.join(root, "value", f"grounded-seed{s}", "result.json")) for s in SEEDS}
    grounded = {s: g for s, g in grounded.items() if g}
    found = dict(base_t=base and {k: base[k] for k in ("value", "ci", "k", "answer_acc") if k in base},
                 grounded_t={s: {k: g[k] for k in ("value", "ci", "k", "answer_acc") if k in g} for s, g in grounded.items()})
    if base and grounded:
        found["primary"] = two_level({s: g["gains"] for s, g in grounded.items()}, base["gains"])
        found["per_seed"] = {s: two_level({s: g["gains"]}, base["gains"]) for s, g in grounded.items()}
        # the power restated with what was measured (the pre-registration used SD 2.05, sigma_b 0 to 2).
        # Now: SE(D)^2 = var(seed values) / seeds + var(Base-T gains) / K_base; with one seed, the seed's
        # value varies by its own datasets only, var(its gains) / K. At the planned four seeds:
        # ((sigma_b^2 + var_g / K_GROUNDED) / 4 + var(Base-T gains) / K_BASE), where var_g pools the seeds'
        # gain variances and sigma_b^2 = var(seed values) - what the datasets alone give (0 until two seeds).
        var_d, vals = statistics.variance(base["gains"]), [g["value"] for g in grounded.values()]
        within = [statistics.variance(g["gains"]) / len(g["gains"]) for g in grounded.values()]
        var_g = statistics.fmean(statistics.variance(g["gains"]) for g in grounded.values())
        many = len(vals) > 1
        se = ((statistics.variance(vals) / len(vals) if many else within[0]) + var_d / len(base["gains"])) ** 0.5
        var_b = max(0.0, statistics.variance(vals) - statistics.fmean(within)) if many else None
        planned = (((var_b or 0.0) + var_g / K_GROUNDED) / len(SEEDS) + var_d / K_BASE) ** 0.5
        found["power"] = dict(dataset_sd=var_d ** 0.5, grounded_sd=var_g ** 0.5, seed_sd=var_b and var_b ** 0.5,
                              se=se, mde80_now=2.8 * se, se_planned=planned, mde80=2.8 * planned)
        p = found["primary"]
        print(f"instrument: per-dataset SD {100 * var_d ** 0.5:.2f} points (Base-T), {100 * var_g ** 0.5:.2f} "
              f"(Grounded-T); SE of D now {100 * se:.2f}; at {len(SEEDS)} seeds {100 * planned:.2f}, 80% power for "
              f"{100 * 2.8 * planned:.2f} points" + ("" if many else " (one seed: sigma_b taken as 0)"))
        print(f"Grounded-T - Base-T, teacher value (points of D_test, {p['seeds']} seeds): "
              f"{100 * p['diff']:+.2f} [{100 * p['lo']:+.2f}, {100 * p['hi']:+.2f}]")
    # is the teacher's gain where its hard questions are? (toy value files keep each dataset's L 8-9 share)
    have = {"base-t": base, **{f"grounded-seed{s}": g for s, g in grounded.items()}}
    have = {n: r for n, r in have.items() if r and "hard_share" in r}
    if "base-t" in have and len(have) > 1:
        fit = share_slope({n: (r["hard_share"], r["gains"]) for n, r in have.items()})
        share = {n: statistics.fmean(r["hard_share"]) for n, r in have.items()}
        seeds = [n for n in have if n != "base-t"]
        found["hardness"] = dict(share=share, fit=fit, predicted_diff=fit and statistics.fmean(
            fit["slope"] * (share[n] - share["base-t"]) for n in seeds), seeds=len(seeds))
    curves = {}  # the figure: seed 0's snapshots per reward (K_CURVE), each seed's final teacher, Base-T's band
    for run in ("soar-seed0", "nopromo-seed0", "intrinsic-seed0"):
        steps = sorted(glob.glob(os.path.join(root, run, "teacher_value", "step*.json")))
        if steps:
            rows = list(map(read, steps))
            curves[f"{run}, K = {K_CURVE}"] = [(r["step"], r["value"], *r["ci"]) for r in rows]
            found.setdefault("curves", {})[run] = [dict(step=r["step"], value=r["value"], ci=r["ci"],
                                                        answer_acc=r.get("answer_acc"), hard_share=r.get("hard_share") and
                                                        statistics.fmean(r["hard_share"])) for r in rows]
    finals = {f"Grounded-T seed {s}, K = {g['k']}": (STEPS, g["value"], *g["ci"]) for s, g in grounded.items()}
    if (curves or finals) and not importlib.util.find_spec("matplotlib"):
        print("teacher_value.png not drawn: matplotlib is not installed (pip install matplotlib)")
    elif curves or finals:
        from experiments.plots import teacher_value_plot

        band = base and (f"Base-T, K = {base['k']}", base["value"], *base["ci"])
        print(teacher_value_plot(curves, os.path.join(out, "teacher_value.png"), finals, band))
    from soar import TEACHER_ANSWER_FLOOR as floor  # soar.py's warning, so that the two cannot part
    runs = sorted(glob.glob(os.path.join(out, "*-seed*", "metrics.jsonl")))  # collect kept the longest
    found["runs"] = {os.path.basename(os.path.dirname(p)): run_facts([json.loads(x) for x in open(p)], floor)
                     for p in runs}
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(found, f, indent=1)
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write(markdown(found, floor))
    if any(os.path.exists(os.path.join(root, f"{m}-seed{s}", "result.json")) for m in ("grounded-t", "base-t") for s in SEEDS):
        subprocess.run([PY, "-m", "experiments.report", "--root", root, "--out", out], check=True, cwd=HERE)
    return found


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.join("runs", "sweep"), help="where every run and result goes")
    ap.add_argument("--only", nargs="+", metavar="UNIT", help="run these units only (names as --dry prints them)")
    ap.add_argument("--dry", action="store_true", help="print the units and their commands; run nothing")
    ap.add_argument("--report", action="store_true", help="only write the report from the units done")
    ap.add_argument("--out", help="the report's directory (default: ROOT/report)")
    ap.add_argument("--keep", default=KEEP, help="the committed copies: a unit done there is copied into ROOT, "
                    "not run again (default: %(default)s)")
    a = ap.parse_args(argv)
    os.chdir(HERE)  # soar.py and toy/model are named from the repository root
    todo = units(a.root)
    names = [n for n, _, _ in todo]
    for n in a.only or []:
        if n not in names:
            ap.error(f"--only {n}: no such unit (python -m experiments.sweep --dry lists them)")
    if not a.dry and os.path.isdir(a.keep) and os.path.abspath(a.keep) != os.path.abspath(a.root):
        got = restore(a.root, a.keep, todo)
        if got:
            print(f"copied from {a.keep}, done there: {' '.join(got)}", flush=True)
    t0 = time.time()
    for name, done, cmd in ([] if a.report else todo):
        if (a.only and name not in a.only) or (os.path.exists(done) and not a.dry):
            continue
        run_dir = cmd[cmd.index("--out") + 1] if cmd[1] == "soar.py" else None
        if run_dir and os.path.exists(os.path.join(run_dir, "config.json")):
            cmd = [PY, "soar.py", "--resume", run_dir, "--steps", str(STEPS)]  # a stopped run continues
        shown = " ".join("python" if c == PY else c for c in cmd)
        kept = os.path.exists(os.path.join(a.keep, os.path.relpath(done, a.root)))
        print(f"{name}{' (done)' if os.path.exists(done) else ' (done in ' + a.keep + ')' if kept else ''}: {shown}",
              flush=True)
        if a.dry:
            continue
        os.makedirs(a.root, exist_ok=True)
        log = os.path.join(a.root, name + ".log")
        with open(log, "a") as f:
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=HERE).returncode != 0:
                sys.exit(f"failed: {' '.join(cmd)} (see {log})")
        print(f"  done, {time.time() - t0:.0f}s so far", flush=True)
        before = run_dir and os.path.join(a.keep, os.path.relpath(run_dir, a.root), "metrics.jsonl")
        if before and os.path.exists(before):  # a committed run repeated: does it repeat exactly?
            step, keys = first_difference(before, os.path.join(run_dir, "metrics.jsonl"))
            said = f"repeats {before} exactly" if step is None else f"differs from {before} at step {step}: {', '.join(keys)}"
            print("  " + said, flush=True)
    if not a.dry:
        report(a.root, a.out or os.path.join(a.root, "report"))


if __name__ == "__main__":
    main()

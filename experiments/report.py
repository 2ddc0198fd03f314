"""
python -m experiments.report -- the paper-style table and plots from result directories. Run it from
the repository root (`python experiments/report.py` works too, without the answer-key numbers: they need
toy/task.py, which only `-m` puts on the path; of the project it imports only experiments/plots.py and
experiments/stats.py).

    python -m experiments.report --root runs/toy_table                            # -> runs/toy_table/report/
    python -m experiments.report --root runs/toy_table --out experiments/results/toy_table  # the committed files
    python -m experiments.report --run runs/soar-toy-seed0                       # one run -> its report/

Reads ROOT/<method>-seed<S>/result.json (pass@k, per-problem success counts) and, for the fresh students
after the first, ROOT/<method>-seed<S>-student<J>/result.json (experiments/toy_table.py --students), then
ROOT/soar-seed<S>/ and ROOT/intrinsic-seed<S>/metrics.jsonl (and ROOT/soar-seed<S>/edge.json where a run
promoted), and writes to OUT
    NAME.md         pass@k per method, mean +- SD over all its runs (seeds x students), and the share of
                    runs that broke through (pass@32 above the same seed's base model); each claim of the
                    paper as a paired difference per seed and over seeds, with a bootstrap interval over
                    seeds, students and test problems (experiments/stats.py); the teacher runs;
                    a per-seed table of what each seed's runs did (promotions, inner students below their
                    baseline, the final student's edge, the teachers' questions at L >= 7 early and late,
                    where each reward points, the evaluation questions' answer key, whether each fresh
                    student learned its training mix)
    NAME.json       the same numbers, per seed; results[method][seed] lists every run of that method and
                    seed in student order (its result.json: pass@k, counts, ...; "student": J)
    RUN-metrics.jsonl, soar-seed<S>-edge.json   copies of the teacher runs' logs and edges
    *.png           the figures of experiments/plots.py: teacher reward (with moving average and
                    promotions), pass@k curves, the share of each difficulty L among the teacher's
                    questions per outer step (with the student's edge), difficulty by promotion stage,
                    teacher diversity and answer key
On the toy world every teacher answer can be checked: the report gives the share of the teacher's
answers that are right, per outer step (from ROOT/<run>-seed<S>/teacher_samples.jsonl) and for the
evaluation questions of Base-T, Grounded-T and Intrinsic-T (ROOT/<method>-seed<S>/questions.jsonl).
By default OUT is ROOT/report: nothing lands in experiments/results unless --out names it; the
committed experiments/results/toy_table/ was made with the second command, from the sweep of
experiments/toy_table.py (experiments/results/toy_table_333b3a2/ holds the earlier 4-step sweep's).
matplotlib is needed for the plots only (pip install matplotlib); without it only the table is written.

--run RUN_DIR draws one soar.py run's figures (plots.run_plots: reward with promotions, per-dataset
rewards, the share of each difficulty L per step where the world defines difficulty, diversity) from
RUN_DIR/metrics.jsonl alone, into RUN_DIR/report/ (or --out); it may run while the run is still going.
"""
import argparse
import glob
import json
import os
import re
import shutil
import statistics

try:  # python -m experiments.report; run as a file, experiments/ itself is on the path
    from experiments.plots import GROUNDED, mean_difficulty, plots, run_plots
    from experiments.stats import paired_bootstrap, per_problem
except ModuleNotFoundError:
    from plots import GROUNDED, mean_difficulty, plots, run_plots
    from stats import paired_bootstrap, per_problem
try:  # the toy world's answer key; importable only with the repository root on the path (python -m)
    from toy.task import difficulty as toy_difficulty, solve as toy_solve
except ImportError:
    toy_solve = None

KS = (1, 4, 8, 16, 32)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each flag's default after its help; a flag whose default is
    worked out at run time (None here) says in its help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


METHODS = [("base", "base model"), ("hard-only", "Hard-Only"), ("soar-ps", "SOAR-PS"), ("soar-pq", "SOAR-PQ"),
           ("grounded-t", "Grounded-T"), ("base-t", "Base-T"), ("intrinsic-t", "Intrinsic-T")]


def run_name(name):
    """(method, seed, student) of a result directory's name <method>-seed<S>[-student<J>] (student 0 has
    no suffix: the single run of a sweep without --students); None for any other name."""
    m = re.fullmatch(r"(.+)-seed(\d+)(?:-student(\d+))?", name)
    return m and (m.group(1), int(m.group(2)), int(m.group(3) or 0))


def runs_of(root, method, file):
    """[(seed, student, path)] of ROOT/<method>-seed<S>[-student<J>]/FILE, in seed then student order."""
    out = []
    for path in glob.glob(os.path.join(root, f"{method}-seed*", file)):
        name = run_name(os.path.basename(os.path.dirname(path)))
        if name and name[0] == method:
            out.append((name[1], name[2], path))
    return sorted(out)


def collect(root):
    """{method: {seed: [result.json of each run, in student order, with "student": J]}}. A root of a
    sweep with one student per method and seed gives lists of one."""
    res = {}
    for path in glob.glob(os.path.join(root, "*-seed*", "result.json")):
        name = run_name(os.path.basename(os.path.dirname(path)))
        if name:
            res.setdefault(name[0], {}).setdefault(name[1], []).append(dict(json.load(open(path)), student=name[2]))
    return {m: {s: sorted(rs, key=lambda r: r["student"]) for s, rs in sorted(by_seed.items())}
            for m, by_seed in sorted(res.items())}


def fmt(xs):
    if not xs:
        return "-"
    mean = 100 * statistics.mean(xs)
    sd = 100 * statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}"


PROMOTION_METHODS = {"soar-ps", "soar-pq"}  # they exist only where the SOAR run promoted


def broke_through(res, key, seeds):
    """'j of n (share)': how many of the method's runs on these seeds have pass@32 above the same seed's
    base model ("-" for the base model itself, or without a base result for any of the seeds)."""
    if key == "base":
        return "-"
    base = {s: rs[0]["pass@32"] for s, rs in res.get("base", {}).items() if rs and "pass@32" in rs[0]}
    above = [r["pass@32"] > base[s] for s in seeds if s in base for r in res[key][s] if "pass@32" in r]
    return f"{sum(above)} of {len(above)} ({100 * sum(above) / len(above):.0f}%)" if above else "-"


def table(res, promotions=None):
    """pass@k per method, mean ± SD over all its runs (every fresh student of every seed), and how many
    of them broke through: pass@32 above the base model's of the same seed. As in the paper, SOAR-PS
    and SOAR-PQ are averaged over the seeds whose SOAR run promoted (their number of promotions is in
    the per-seed table); a run that never promoted has no PS or PQ of its own (its "PS" is the base
    student, its PQ empty), so it is counted and shown, not averaged in. The per-seed table gives each
    seed's mean over its students, with their number n where there is more than one."""
    promotions = promotions or {}
    lines = ["| method | seeds | runs | " + " | ".join(f"pass@{k}" for k in KS) + " | pass@32 above the base model's |",
             "|---|---|---|" + "---|" * (len(KS) + 1)]
    for key, name in METHODS:
        by_seed = res.get(key, {})
        seeds, shown = sorted(by_seed), f"{len(by_seed)}"
        if key in PROMOTION_METHODS and promotions and by_seed:
            never = [s for s in seeds if not promotions.get(s)]
            seeds = [s for s in seeds if promotions.get(s)]
            shown = f"{len(seeds)} promoted" + (f" ({len(never)} never promoted, left out)" if never else "")
        runs = [r for s in seeds for r in by_seed[s]]
        cells = [fmt([r[f"pass@{k}"] for r in runs if f"pass@{k}" in r]) for k in KS]
        lines.append(f"| {name} | {shown} | {len(runs)} | " + " | ".join(cells) +
                     f" | {broke_through(res, key, seeds)} |")
    seeds = sorted({s for by_seed in res.values() for s in by_seed})
    lines += ["", "pass@32 per seed (the mean over the seed's fresh students; n: how many, where more than one):", "",
              "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for key, name in METHODS:
        by_seed, cells = res.get(key, {}), []
        for s in seeds:
            xs = [r["pass@32"] for r in by_seed.get(s, []) if "pass@32" in r]
            n = f" (n={len(xs)})" if len(xs) > 1 else ""
            cells.append(f"{100 * statistics.mean(xs):.1f}{n}" if xs else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if promotions:
        lines.append("| SOAR run: promotions | " + " | ".join(str(promotions.get(s, "-")) for s in seeds) + " |")
    return "\n".join(lines)


def run_promotions(runs):
    """{seed: number of promotions} of each SOAR run {seed: metrics rows} (its last metrics line)."""
    return {int(s): rows[-1]["promotions"] for s, rows in runs.items() if rows}


def shared_questions(root):
    """Per teacher method: how many of its evaluation questions equal Base-T's (same seed and student,
    same position), summed over a seed's students.

    The same seed drives every teacher's sampler, so a teacher that has barely moved from the base
    model writes largely the same questions; this says how different the compared datasets really are."""
    out = {}
    for key in ("grounded-t", "intrinsic-t"):
        for seed, j, path in runs_of(root, key, "questions.jsonl"):
            base = os.path.join(root, f"base-t-seed{seed}" + (f"-student{j}" if j else ""), "questions.jsonl")
            if os.path.exists(base):
                qa = [json.loads(line).get("question") for line in open(path)]
                qb = [json.loads(line).get("question") for line in open(base)]
                same, n = out.setdefault(key, {}).get(str(seed), [0, 0])
                out[key][str(seed)] = [same + sum(x == y for x, y in zip(qa, qb)), n + len(qa)]
    return out


# The paper's claims, each a paired difference (first method minus second) on the same D_test problems
CLAIMS = [("soar-pq", "hard-only"), ("soar-ps", "hard-only"), ("grounded-t", "base-t"), ("grounded-t", "intrinsic-t")]


def paired(res, a, b, k, promotions=None, boots=10000, seed=0):
    """The paired difference a - b in pass@k on the same test problems, per seed and its mean over seeds,
    each with a 95% bootstrap interval (stats.paired_bootstrap: a seed's difference is the mean over a's
    students minus the mean over b's, problem by problem; the intervals resample the seeds, each
    method's students on their own, and the problems). PS and PQ count only the seeds whose SOAR run
    promoted, as in the table. None without per-problem counts for both methods on some seed."""
    seeds = sorted(set(res.get(a, {})) & set(res.get(b, {})))
    if promotions and a in PROMOTION_METHODS:
        seeds = [s for s in seeds if promotions.get(s)]
    return paired_bootstrap({s: ([per_problem(r, k) for r in res[a][s]], [per_problem(r, k) for r in res[b][s]])
                             for s in seeds}, boots, seed)


def claims(res, promotions, ks=(1, 32)):
    """{"A - B": {k: paired(...)}} for every claim and k."""
    names = dict(METHODS)
    return {f"{names[a]} - {names[b]}": {k: paired(res, a, b, k, promotions) for k in ks} for a, b in CLAIMS}


def claim_lines(found):
    """Markdown: each claim's paired difference per seed and over seeds, in points of pass@k."""
    lines = ["| claim | k | seeds | runs | per seed: difference [95% CI over students and problems] | mean over seeds "
             "[95% CI over seeds, students and problems] | CI excludes 0 |",
             "|---|---|---|---|---|---|---|"]
    for claim, by_k in found.items():
        for k, p in by_k.items():
            if p is None:
                continue
            f = lambda c: f"{100 * c['diff']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}]"  # noqa: E731
            per = "; ".join(f"{s}: {f(c)}" for s, c in p["seeds"].items())
            m = p["mean"]
            sig = "yes, higher" if m["lo"] > 0 else "yes, lower" if m["hi"] < 0 else "no"
            runs = " vs ".join(map(str, p["runs"]))
            lines.append(f"| {claim} | {k} | {len(p['seeds'])} | {runs} | {per} | {f(m)} | {sig} |")
    return lines if len(lines) > 2 else []


TEACHER_RUNS = [("soar", GROUNDED), ("intrinsic", "learnability reward (Intrinsic-T)")]


def pooled_signal(steps):
    """How far a run's teacher reward points along a feature of its datasets: the correlation, pooled over
    the outer steps [(feature of each dataset, R_k of each dataset)], between each dataset's RLOO advantage
    (R_k minus the mean of the other R_k: the weight the teacher's update gives that dataset) and its
    feature, centred within the step. 0: the update ignores the feature; 1: it ranks datasets by it. None
    without the numbers."""
    xs, ys = [], []
    for feature, rw in steps:
        g = len(rw)
        if g >= 2:
            xs += [f - statistics.mean(feature) for f in feature]
            ys += [x - (sum(rw) - x) / (g - 1) for x in rw]
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return None
    return statistics.correlation(xs, ys)


def rung_shares(rows, lo, hi=None):
    """Step by step, (each dataset's share of questions at rungs lo..hi, each dataset's R_k), from a run's
    metrics rows (its questions lie dataset after dataset); hi None: no upper bound."""
    inside = lambda x: x is not None and lo <= x and (hi is None or x <= hi)  # noqa: E731
    steps = []
    for r in rows:
        d, rw = r.get("difficulty"), r.get("rewards")
        if d and rw:
            n = len(d) // len(rw)
            steps.append(([sum(map(inside, d[k * n:(k + 1) * n])) / n for k in range(len(rw))], rw))
    return steps


def hard_signal(rows, hard=7):
    """pooled_signal of a run's metrics rows along the share of each dataset's questions at L >= hard."""
    return pooled_signal(rung_shares(rows, hard))


def right_signal(path):
    """pooled_signal along the share of each dataset's answers that are right (toy world), from a run's
    teacher_samples.jsonl; None without the answer key."""
    steps = {}
    for line in open(path):
        row = json.loads(line)
        steps.setdefault(row["step"], []).append((answer_key(row["pairs"]), row["reward"]))
    if any(k is None for ds in steps.values() for k, _ in ds):
        return None
    return pooled_signal([([k[0] for k, _ in ds], [r for _, r in ds]) for _, ds in sorted(steps.items())])


def teacher_summary(root, teachers):
    """Per teacher kind: promotions, question diversity and difficulty over its runs' outer steps;
    teachers: {kind: {seed: metrics rows}} (read once in main)."""
    out = {}
    for prefix, name in TEACHER_RUNS:
        runs = teachers[name]
        rows = [r for rs in runs.values() for r in rs]
        if rows:
            out[name] = {"runs": len(runs), "promotions": {s: sum(bool(r["promoted"]) for r in rs)
                                                           for s, rs in runs.items()},
                         "question_diversity": statistics.mean(r["question_diversity"] for r in rows),
                         "mean_difficulty": statistics.mean(mean_difficulty(r) for r in rows),
                         "reward_mean": statistics.mean(r["reward_mean"] for r in rows),
                         "hard_signal": {s: hard_signal(rs) for s, rs in runs.items()},
                         "right_signal": {s: right_signal(p) for s in runs for p in
                                          [os.path.join(root, f"{prefix}-seed{s}", "teacher_samples.jsonl")]
                                          if os.path.isfile(p)}}
    return out


def teacher_lines(teach):
    """The teacher summary table as markdown (empty when there is no teacher run)."""
    if not teach:
        return ""
    return "\n".join(["", "", "| teacher run | runs | mean R̂ (the run's own reward) | question diversity | mean difficulty L |",
                      "|---|---|---|---|---|"] +
                     [f"| {name} | {d['runs']} | {d['reward_mean']:.4f} | {d['question_diversity']:.3f} | "
                      f"{d['mean_difficulty']:.2f} |" for name, d in teach.items()])


def hard_share(rows):
    """Share of the questions at L >= 7 over these outer steps' logs (None without difficulties)."""
    ds = [d for r in rows for d in r.get("difficulty", []) if d is not None]
    return sum(d >= 7 for d in ds) / len(ds) if ds else None


def seed_facts(root, teachers, teach, shared, answers):
    """{fact: {seed: text}}: what each seed's runs did, one fact per row of the report's per-seed table."""
    facts, pct = {}, lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    for s, rows in teachers[GROUNDED].items():
        at = [r["step"] for r in rows if r["promoted"]]
        facts.setdefault("SOAR run: promotions (at outer steps)", {})[s] = f"{len(at)} ({', '.join(map(str, at))})" if at else "0"
        after = [x for r in rows if not at or r["step"] > at[-1] for xs in r.get("repeat_rewards") or [] for x in xs]
        facts.setdefault("SOAR run: inner students below their baseline, after the last promotion (all steps if "
                         "none)", {})[s] = f"{sum(x < 0 for x in after)} of {len(after)}"
        e = os.path.join(root, f"soar-seed{s}", "edge.json")
        if os.path.isfile(e):
            by_l = {r["L"]: r["sampled"] for r in json.load(open(e))["student"]}
            facts.setdefault("SOAR run: final student's edge L (its sampled success at L = 8, 9)", {})[s] = \
                f"{edge(e)} ({pct(by_l.get(8))}, {pct(by_l.get(9))})"
    for name, runs in teachers.items():
        for s, rows in runs.items():
            facts.setdefault(f"{name.split(' (')[0]}: questions at L >= 7, steps 0-4 -> last 10", {})[s] = \
                f"{pct(hard_share(rows[:5]))} -> {pct(hard_share(rows[-10:]))}"
    for key, what in (("hard_signal", "L >= 7 (hard_signal)"), ("right_signal", "right answers (right_signal)")):
        for prefix, name in TEACHER_RUNS:
            for s, c in teach.get(name, {}).get(key, {}).items():
                facts.setdefault(f"{name.split(' (')[0]}: reward toward {what}", {})[s] = "-" if c is None else f"{c:+.2f}"
    for key, per_seed in shared.items():
        for s, (same, n) in per_seed.items():
            facts.setdefault(f"{dict(METHODS)[key]}: evaluation questions identical to Base-T's", {})[int(s)] = \
                f"{same} of {n}"
    for i, what in enumerate(("with the right answer", "at L >= 7")):
        for key, per_seed in answers.items():
            for s, v in per_seed.items():
                facts.setdefault(f"{dict(METHODS)[key]}: evaluation questions {what}", {})[int(s)] = pct(v[i])
    for key, name in METHODS:  # did the fresh students learn their training mix? (first vs last 20 of their steps)
        learned = {}
        for s, _, path in runs_of(root, key, "curve.jsonl"):
            acc = [json.loads(line).get("train_accuracy") for line in open(path)]
            if len(acc) >= 40 and None not in acc:
                first, last = statistics.mean(acc[:20]), statistics.mean(acc[-20:])
                learned.setdefault(s, []).append(f"{pct(first)} -> {pct(last)}")
        if learned:  # one entry per student, in student order
            facts[f"{name}: fresh student's training accuracy, first -> last 20 steps"] = \
                {s: "; ".join(xs) for s, xs in learned.items()}
    return facts


def seed_lines(facts):
    """The per-seed facts as a markdown table (fact per row, seed per column)."""
    seeds = sorted({s for per in facts.values() for s in per})
    if not seeds:
        return ""
    return "\n".join(["", "", "Per seed (toy world; from the runs' logs):", "",
                      "| | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)] +
                     [f"| {fact} | " + " | ".join(per.get(s, "-") for s in seeds) + " |" for fact, per in facts.items()])


def answer_key(pairs):
    """(share of the pairs whose answer is the chain's true answer, share at L >= 7) for toy-world pairs
    [{question, answer}]; None when toy/task.py is not importable or no question is a chain."""
    if toy_solve is None:
        return None
    solved = [(toy_solve(p["question"]), p) for p in pairs]
    if not any(s for s, _ in solved):
        return None
    right = sum(s is not None and s[1] == p["answer"] for s, p in solved) / len(pairs)
    return right, sum((toy_difficulty(p["question"]) or 0) >= 7 for p in pairs) / len(pairs)


def answers_per_step(root, prefix):
    """{seed: [share of that outer step's teacher answers that are right]} of the runs ROOT/PREFIX-seed<S>."""
    out = {}
    for path in sorted(glob.glob(os.path.join(root, f"{prefix}-seed*", "teacher_samples.jsonl"))):
        steps = {}
        for line in open(path):
            row = json.loads(line)
            steps.setdefault(row["step"], []).extend(row["pairs"])
        keyed = [answer_key(steps[t]) for t in sorted(steps)]
        if keyed and None not in keyed:
            out[int(re.search(r"seed(\d+)", path).group(1))] = [k[0] for k in keyed]
    return out


def evaluation_answers(root):
    """{method: {seed: [share of its evaluation questions answered right, share at L >= 7]}} (toy world),
    over the questions of all the seed's students."""
    pairs, out = {}, {}
    for key in ("base-t", "grounded-t", "intrinsic-t"):
        for seed, _, path in runs_of(root, key, "questions.jsonl"):
            pairs.setdefault(key, {}).setdefault(str(seed), []).extend(json.loads(line) for line in open(path))
    for key, per_seed in pairs.items():
        for seed, ps in per_seed.items():
            k = answer_key(ps)
            if k:
                out.setdefault(key, {})[seed] = [round(x, 4) for x in k]
    return out


def soar_metrics(root, prefix="soar"):
    out = {}
    for path in sorted(glob.glob(os.path.join(root, f"{prefix}-seed*", "metrics.jsonl"))):
        seed = int(re.search(r"seed(\d+)", path).group(1))
        out[seed] = [json.loads(line) for line in open(path)]
    return out


def edge(path):
    """The student's edge in an edge file (python -m toy.build edge): the largest L it solves in at least
    half of its samples; None when the file is absent."""
    if not os.path.isfile(path):
        return None
    rows = json.load(open(path))["student"]
    return max((r["L"] for r in rows if r["sampled"] >= 0.5), default=None)


def run_report(run, out):
    """--run: one run's figures from RUN/metrics.jsonl; returns their paths. A torn last line (the run is
    writing it) is left out."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: --run {run}: no metrics.jsonl there (not a soar.py run directory)")
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    if not rows:
        raise SystemExit(f"error: --run {run}: {path} holds no finished outer step yet")
    os.makedirs(out, exist_ok=True)
    try:
        return run_plots(out, rows, os.path.basename(os.path.normpath(run)))
    except ImportError:
        raise SystemExit("error: --run draws figures and needs matplotlib: pip install matplotlib==3.11.2")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--root", default=os.path.join("runs", "toy_table"),
                    help="directory of the sweep's result directories (ROOT/<method>-seed<S>/)")
    ap.add_argument("--out", help="where the table and plots go (default: ROOT/report; the committed copies "
                                  "are made with --out experiments/results/toy_table)")
    ap.add_argument("--name", default="toy_table", help="file name stem of the table: OUT/NAME.md and OUT/NAME.json")
    ap.add_argument("--run", metavar="RUN_DIR", help="instead of a sweep: one soar.py run's figures, from "
                                                     "RUN_DIR/metrics.jsonl, into RUN_DIR/report (or --out)")
    a = ap.parse_args(argv)
    if a.run:
        for p in run_report(a.run, a.out or os.path.join(a.run, "report")):
            print("wrote", p)
        return
    a.out = a.out or os.path.join(a.root, "report")
    res = collect(a.root)
    teachers = {name: soar_metrics(a.root, prefix) for prefix, name in TEACHER_RUNS}  # every run's log, read once
    if not res and not any(teachers.values()):
        raise SystemExit(f"error: no */result.json and no soar-seed*/ or intrinsic-seed*/metrics.jsonl under {a.root}")
    os.makedirs(a.out, exist_ok=True)
    promotions = run_promotions(teachers[GROUNDED])
    t, found = table(res, promotions), claims(res, promotions)
    if claim_lines(found):
        t += "\n\nPaired differences in points of pass@k (first method minus second, same D_test problems):\n\n"
        t += "\n".join(claim_lines(found))
    teach, shared, answers = teacher_summary(a.root, teachers), shared_questions(a.root), evaluation_answers(a.root)
    keyed = {name: answers_per_step(a.root, prefix) for prefix, name in TEACHER_RUNS}
    facts = seed_facts(a.root, teachers, teach, shared, answers)
    t += teacher_lines(teach) + seed_lines(facts)
    print(t)
    with open(os.path.join(a.out, f"{a.name}.md"), "w") as f:
        f.write(t + "\n")
    with open(os.path.join(a.out, f"{a.name}.json"), "w") as f:
        json.dump({"results": res, "claims": found, "teachers": teach, "shared_with_base_t": shared,
                   "evaluation_answers": answers, "answers_per_step": keyed, "per_seed": facts},
                  f, indent=1)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    edges = {s: edge(os.path.join(a.root, f"soar-seed{s}", "edge.json")) for s in teachers[GROUNDED]}
    for p in plots(a.out, res, teachers, edges, edge(os.path.join(here, "toy", "edge.json")), keyed, METHODS, KS):
        print("wrote", p)
    # the teacher runs' own logs beside the table (small), so the committed results hold what the plots show
    for path in sorted(glob.glob(os.path.join(a.root, "*-seed*", "metrics.jsonl")) +
                       glob.glob(os.path.join(a.root, "soar-seed*", "edge.json"))):
        run = os.path.basename(os.path.dirname(path))
        if os.path.abspath(a.out) != os.path.abspath(os.path.dirname(path)):
            shutil.copyfile(path, os.path.join(a.out, f"{run}-{os.path.basename(path)}"))


if __name__ == "__main__":
    main()

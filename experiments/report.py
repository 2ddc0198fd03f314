"""
python -m experiments.report -- the paper-style table and plots from result directories. Run it from
the repository root (`python experiments/report.py` works too: it imports nothing of the project).

    python -m experiments.report --root runs/toy_table                            # -> runs/toy_table/report/
    python -m experiments.report --root runs/toy_table --out experiments/results  # regenerate the committed files

Reads ROOT/<method>-seed<S>/result.json (pass@k) and ROOT/soar-seed<S>/metrics.jsonl, and writes to OUT
    NAME.md         pass@k per method, mean +- SD over seeds
    NAME.json       the same numbers, per seed
    *.png           teacher reward (with moving average and promotions), pass@k curves,
                    teacher question difficulty by promotion stage, teacher diversity
By default OUT is ROOT/report: nothing lands in experiments/results unless --out names it.
The committed experiments/results/toy_table.md, toy_table.json and the four PNGs were made with the
second command (spelled `python experiments/report.py ...` then) from the sweep of
experiments/toy_table.py; the other files there come from soar.py and experiments/bench.py.
matplotlib is needed for the plots only (pip install matplotlib); without it only the table is written.
"""
import argparse
import glob
import json
import os
import re
import statistics

KS = (1, 4, 8, 16, 32)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each flag's default after its help; a flag whose default is
    worked out at run time (None here) says in its help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


METHODS = [("base", "base model"), ("hard-only", "Hard-Only"), ("soar-ps", "SOAR-PS"), ("soar-pq", "SOAR-PQ"),
           ("grounded-t", "Grounded-T"), ("base-t", "Base-T"), ("intrinsic-t", "Intrinsic-T")]


def collect(root):
    res = {}
    for path in glob.glob(os.path.join(root, "*-seed*", "result.json")):
        m = re.fullmatch(r"(.+)-seed(\d+)", os.path.basename(os.path.dirname(path)))
        res.setdefault(m.group(1), {})[int(m.group(2))] = json.load(open(path))
    return res


def fmt(xs):
    if not xs:
        return "-"
    mean = 100 * statistics.mean(xs)
    sd = 100 * statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}"


PROMOTION_METHODS = {"soar-ps", "soar-pq"}  # they exist only where the SOAR run promoted


def table(res, promotions=None):
    """pass@k per method, mean ± SD over seeds. As in the paper, SOAR-PS and SOAR-PQ are averaged
    over the runs that promoted (their number of promotions is in the per-seed table); a run that
    never promoted has no PS or PQ of its own (its "PS" is the base student, its PQ empty), so it is
    counted and shown, not averaged in."""
    promotions = promotions or {}
    lines = ["| method | seeds | " + " | ".join(f"pass@{k}" for k in KS) + " |",
             "|---|---|" + "---|" * len(KS)]
    for key, name in METHODS:
        runs, seeds = res.get(key, {}), f"{len(res.get(key, {}))}"
        if key in PROMOTION_METHODS and promotions:
            never = [s for s in runs if not promotions.get(s)]
            runs = {s: r for s, r in runs.items() if promotions.get(s)}
            seeds = f"{len(runs)} promoted" + (f" ({len(never)} never promoted, left out)" if never else "")
        cells = [fmt([r[f"pass@{k}"] for r in runs.values() if f"pass@{k}" in r]) for k in KS]
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    seeds = sorted({s for runs in res.values() for s in runs})
    lines += ["", "pass@32 per seed:", "", "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    for key, name in METHODS:
        runs = res.get(key, {})
        cells = [f"{100 * runs[s]['pass@32']:.1f}" if s in runs and "pass@32" in runs[s] else "-" for s in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if promotions:
        lines.append("| SOAR run: promotions | " + " | ".join(str(promotions.get(s, "-")) for s in seeds) + " |")
    return "\n".join(lines)


def run_promotions(root):
    """{seed: number of promotions} of each ROOT/soar-seed<S> run (its last metrics line)."""
    return {int(s): rows[-1]["promotions"] for s, rows in soar_metrics(root).items() if rows}


def shared_questions(root):
    """Per teacher method: how many of its evaluation questions equal Base-T's (same seed, same position).

    The same seed drives every teacher's sampler, so a teacher that has barely moved from the base
    model writes largely the same questions; this says how different the compared datasets really are."""
    out = {}
    for key in ("grounded-t", "intrinsic-t"):
        for path in sorted(glob.glob(os.path.join(root, f"{key}-seed*", "questions.jsonl"))):
            seed = re.search(r"seed(\d+)", path).group(1)
            base = os.path.join(root, f"base-t-seed{seed}", "questions.jsonl")
            if os.path.exists(base):
                qa = [json.loads(line).get("question") for line in open(path)]
                qb = [json.loads(line).get("question") for line in open(base)]
                out.setdefault(key, {})[seed] = [sum(x == y for x, y in zip(qa, qb)), len(qa)]
    return out


TEACHER_RUNS = [("soar", "grounded reward (SOAR)"), ("intrinsic", "learnability reward (Intrinsic-T)")]


def mean_difficulty(row):
    ds = [d for d in row.get("difficulty", []) if d is not None]
    return statistics.mean(ds) if ds else float("nan")


def teacher_summary(root):
    """Per teacher kind: promotions, question diversity and difficulty over its runs' outer steps."""
    out = {}
    for prefix, name in TEACHER_RUNS:
        runs = soar_metrics(root, prefix)
        rows = [r for rs in runs.values() for r in rs]
        if rows:
            out[name] = {"runs": len(runs), "promotions": {s: sum(bool(r["promoted"]) for r in rs)
                                                           for s, rs in runs.items()},
                         "question_diversity": statistics.mean(r["question_diversity"] for r in rows),
                         "mean_difficulty": statistics.mean(mean_difficulty(r) for r in rows),
                         "reward_mean": statistics.mean(r["reward_mean"] for r in rows)}
    return out


def teacher_lines(teach, shared):
    """The teacher summary table and the question overlap, as markdown (empty when there is neither)."""
    lines = []
    if teach:
        lines += ["", "", "| teacher run | runs | promotions (seed: count) | mean R̂ (the run's own reward) | question diversity | "
                  "mean difficulty L |", "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {d['runs']} | {json.dumps(d['promotions'])} | {d['reward_mean']:.4f} | "
                  f"{d['question_diversity']:.3f} | {d['mean_difficulty']:.2f} |" for name, d in teach.items()]
    for key, per_seed in shared.items():
        lines.append(f"\n{key}: evaluation questions identical to Base-T's (seed: shared/total): "
                     + json.dumps(per_seed))
    return "\n".join(lines)


def soar_metrics(root, prefix="soar"):
    out = {}
    for path in sorted(glob.glob(os.path.join(root, f"{prefix}-seed*", "metrics.jsonl"))):
        seed = int(re.search(r"seed(\d+)", path).group(1))
        out[seed] = [json.loads(line) for line in open(path)]
    return out


def save(fig, out_dir, name):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(root, res, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: table only (pip install matplotlib for the plots)")
        return []
    made = []
    runs = soar_metrics(root)
    if runs:  # teacher reward, its moving average and promotions
        fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.2), squeeze=False)
        for ax, (seed, rows) in zip(axes[0], runs.items()):
            steps = [r["step"] for r in rows]
            ax.plot(steps, [r["reward_mean"] for r in rows], "o-", label="mean teacher reward R̂")
            ax.plot(steps, [r["reward_ma"] for r in rows], "-", label="moving average")
            for r in rows:
                if r["promoted"]:
                    ax.axvline(r["step"], color="green", ls="--", lw=1)
            ax.axhline(0, color="gray", lw=0.5)
            ax.set_title(f"SOAR seed {seed} (dashed: promotion)")
            ax.set_xlabel("outer step")
        axes[0][0].legend(fontsize=7)
        made.append(save(fig, out_dir, "teacher_reward.png"))
        # teacher question difficulty by promotion stage (toy world)
        if any("difficulty" in r for rows in runs.values() for r in rows):
            stages = {}
            for rows in runs.values():
                stage = 0
                for r in rows:
                    stages.setdefault(stage, []).extend(d for d in r.get("difficulty", []) if d is not None)
                    stage += bool(r["promoted"])
            fig, ax = plt.subplots(figsize=(5.5, 3.2))
            for stage, ds in sorted(stages.items()):
                if ds:
                    ax.hist(ds, bins=range(1, 13), density=True, histtype="step", lw=2,
                            label=f"after {stage} promotion(s), {len(ds)} questions")
            ax.set_xlabel("difficulty L of the teacher's questions")
            ax.set_ylabel("share")
            ax.legend(fontsize=7)
            made.append(save(fig, out_dir, "teacher_difficulty.png"))
    teachers = {name: soar_metrics(root, prefix) for prefix, name in TEACHER_RUNS}
    if any(teachers.values()):  # grounded vs learnability teacher: diversity and difficulty per outer step
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for (name, runs_), color in zip(teachers.items(), ("C0", "C3")):
            for i, (seed, rows) in enumerate(sorted(runs_.items())):
                steps = [r["step"] for r in rows]
                label = name if i == 0 else None
                axes[0].plot(steps, [r["question_diversity"] for r in rows], "o-", color=color, alpha=.7, label=label)
                axes[1].plot(steps, [mean_difficulty(r) for r in rows], "o-", color=color, alpha=.7, label=label)
        axes[0].set_ylabel("question diversity")
        axes[1].set_ylabel("mean difficulty L of questions")
        for ax in axes:
            ax.set_xlabel("outer step")
            ax.legend(fontsize=7)
        made.append(save(fig, out_dir, "teacher_diversity.png"))
    if res:  # pass@k curves
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for key, name in METHODS:
            runs_ = res.get(key, {})
            if runs_:
                ys = [100 * statistics.mean(r[f"pass@{k}"] for r in runs_.values()) for k in KS]
                ax.plot(KS, ys, "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(KS, [str(k) for k in KS])
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k on the hard test split (%)")
        ax.legend(fontsize=7)
        made.append(save(fig, out_dir, "passk.png"))
    return made


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--root", default=os.path.join("runs", "toy_table"),
                    help="directory of the sweep's result directories (ROOT/<method>-seed<S>/)")
    ap.add_argument("--out", help="where the table and plots go (default: ROOT/report; the committed copies "
                                  "are made with --out experiments/results)")
    ap.add_argument("--name", default="toy_table", help="file name stem of the table: OUT/NAME.md and OUT/NAME.json")
    a = ap.parse_args(argv)
    a.out = a.out or os.path.join(a.root, "report")
    res = collect(a.root)
    if not res:
        raise SystemExit(f"error: no */result.json under {a.root}")
    os.makedirs(a.out, exist_ok=True)
    t = table(res, run_promotions(a.root))
    print(t)
    teach, shared = teacher_summary(a.root), shared_questions(a.root)
    extra = teacher_lines(teach, shared)
    print(extra)
    t += extra
    with open(os.path.join(a.out, f"{a.name}.md"), "w") as f:
        f.write(t + "\n")
    with open(os.path.join(a.out, f"{a.name}.json"), "w") as f:
        json.dump({"results": res, "teachers": teach, "shared_with_base_t": shared}, f, indent=1)
    for p in plots(a.root, res, a.out):
        print("wrote", p)


if __name__ == "__main__":
    main()

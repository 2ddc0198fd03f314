"""
experiments/plots.py -- the figures of experiments/report.py, drawn from numbers it has read.

    teacher_reward.png            each run's reward per outer step (SOAR: R̂, its moving average, promotions;
                                  Intrinsic-T: its learnability reward)
    teacher_difficulty.png        the grounded teacher's questions by difficulty L, per promotion stage
    teacher_difficulty_steps.png  the share of each L per outer step, with the base student's edge and each
                                  SOAR run's final student's
    teacher_diversity.png         question diversity, mean L and (toy world) the share of right answers per step
    passk.png                     pass@k per method, mean over seeds
run_plots() draws one run's figures (python -m experiments.report --run RUN_DIR) from its metrics rows alone;
teacher_value_plot() the teacher's value against outer step (python -m experiments.teacher_value --plot).

Nothing of the project is imported; matplotlib only inside plots(), so the tables need none.
"""
import os
import statistics

GROUNDED = "grounded reward (SOAR)"


def mean_difficulty(row):
    """Mean difficulty L of an outer step's teacher questions (toy world; nan without them)."""
    ds = [d for d in row.get("difficulty", []) if d is not None]
    return statistics.mean(ds) if ds else float("nan")


def difficulty_shares(rows, top=10):
    """[step][L-1]: the share of each outer step's teacher questions at L = 1..top (top: top or more)."""
    out = []
    for r in rows:
        ds = [min(d, top) for d in r.get("difficulty", []) if d is not None]
        out.append([ds.count(L) / max(1, len(ds)) for L in range(1, top + 1)])
    return out


def teacher_value_plot(curves, path, finals=None, band=None):
    """curves: {label: [(step, value, low, high)]}, values as fractions of D_test: one line per run with
    its 95% intervals, the teacher's value against outer step (step 0: its base teacher). finals:
    {label: (step, value, low, high)}, single readings drawn as squares beside that step (the sweep's
    final teachers); band: (label, value, low, high), a reference drawn across (Base-T's interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for i, (label, pts) in enumerate(sorted(curves.items())):
        pts = sorted(pts)
        xs = [p[0] + 0.15 * (i - (len(curves) - 1) / 2) for p in pts]  # side by side where steps coincide
        ys = [100 * p[1] for p in pts]
        # max(0, ...): an interval that misses its point (hand-made inputs) draws no bar rather than failing
        err = [[max(0, 100 * (p[1] - p[2])) for p in pts], [max(0, 100 * (p[3] - p[1])) for p in pts]]
        ax.errorbar(xs, ys, yerr=err, fmt="o-", ms=4, capsize=3, label=label)
    for j, (label, (x, v, lo, hi)) in enumerate(sorted((finals or {}).items())):
        ax.errorbar([x + 0.6 + 0.35 * j], [100 * v], yerr=[[max(0, 100 * (v - lo))], [max(0, 100 * (hi - v))]], fmt="s", ms=4,
                    capsize=3, label=label)
    if band:
        label, v, lo, hi = band
        ax.axhspan(100 * lo, 100 * hi, color="gray", alpha=0.15, lw=0, label=label)
        ax.axhline(100 * v, color="gray", ls="--", lw=0.8)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set(xlabel="outer step (0: the base teacher)", ylabel="teacher value: D_test gain, %")
    ax.set_title("a teacher's datasets, each training a fresh base student (95% intervals)", fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, os.path.dirname(path) or ".", os.path.basename(path))


def save(fig, out_dir, name):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_plots(out_dir, rows, name):
    """One run's figures from its metrics.jsonl rows, into out_dir; returns their paths (ImportError without
    matplotlib). reward.png: R̂ (Intrinsic-T: the learnability reward), its moving average, the promotions;
    dataset_rewards.png: each dataset's R_k per step, the promoted one circled; difficulty_steps.png (only
    where the rows have difficulty: the toy world): the share of each L per step; diversity.png: question
    diversity and the teacher's rejection rate per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, promos = [r["step"] for r in rows], [r["step"] for r in rows if r.get("promoted")]
    grounded = any(r.get("reward_ma") is not None for r in rows)  # Intrinsic-T has no moving average
    made = []

    def done(fig, ax, file, ylabel, color="green"):
        for t in promos:
            ax.axvline(t, color=color, ls="--", lw=1)
        ax.set_title(name + (" (dashed: promotion)" if promos else ""), fontsize=9)
        ax.set(xlabel="outer step", ylabel=ylabel)
        if len(steps) <= 20:
            ax.set_xticks(steps)
        made.append(save(fig, out_dir, file))

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(steps, [r["reward_mean"] for r in rows], "o-", ms=3, label="R̂ (mean of R_k)" if grounded else "reward")
    if grounded:
        ax.plot(steps, [r["reward_ma"] for r in rows], "-", label="moving average")
    ax.axhline(0, color="gray", lw=0.5)
    ax.legend(fontsize=7)
    done(fig, ax, "reward.png", "mean grounded reward" if grounded else "mean learnability reward")

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for r in rows:  # a step's datasets side by side (dataset k of one step is not dataset k of the next)
        g = len(r["rewards"])
        xs = [r["step"] + 0.1 * (k - (g - 1) / 2) for k in range(g)]
        ax.plot(xs, r["rewards"], "o", color="C0", ms=4)
        if r.get("promoted"):
            k = r["promoted"]["dataset"]
            ax.plot(xs[k], r["rewards"][k], "o", mfc="none", mec="green", ms=10, mew=1.5)
    ax.axhline(0, color="gray", lw=0.5)
    done(fig, ax, "dataset_rewards.png", "R_k of each dataset (circled: promoted)")

    if any(r.get("difficulty") for r in rows):  # the toy world's difficulty; a real model's rows have none
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        im = ax.imshow(list(map(list, zip(*difficulty_shares(rows)))), origin="lower", aspect="auto", vmin=0,
                       cmap="viridis", extent=(steps[0] - 0.5, steps[-1] + 0.5, 0.5, 10.5))
        fig.colorbar(im, ax=ax, label="share of the step's questions")
        done(fig, ax, "difficulty_steps.png", "difficulty L (10: 10 or more)", color="red")

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(steps, [r["question_diversity"] for r in rows], "o-", ms=3, label="question diversity")
    ax.plot(steps, [r["rejection_rate"] for r in rows], "s-", ms=3, label="teacher rejection rate")
    ax.set_ylim(-0.03, 1.05)
    ax.legend(fontsize=7)
    done(fig, ax, "diversity.png", "share")
    return made


def plots(out_dir, res, teachers, edges, base_edge, keyed=None, methods=(), ks=()):
    """Write the figures to out_dir; returns their paths (none without matplotlib).

    res: {method: {seed: [result.json of each run]}} (the pass@k curves average all runs); teachers:
    {"grounded reward (SOAR)" and/or "learnability reward (Intrinsic-T)": {seed: metrics.jsonl rows}};
    edges: {seed: the SOAR run's final student's edge L or None}; base_edge: the base student's; keyed:
    {teacher run kind: {seed: [share of right answers per outer step]}} (the toy answer key); methods:
    [(key, name)] in table order; ks: the k of pass@k."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: table only (pip install matplotlib for the plots)")
        return []
    made = []
    rows_of = [("SOAR" if name.startswith("grounded") else "Intrinsic-T", r_) for name, r_ in teachers.items() if r_]
    runs = teachers.get(GROUNDED) or {}
    if runs:  # teacher reward, its moving average and promotions; the learnability teacher's reward below
        cols = max(len(r_) for _, r_ in rows_of)
        fig, axes = plt.subplots(len(rows_of), cols, figsize=(4 * cols, 3 * len(rows_of)), squeeze=False)
        for i, (kind, runs_) in enumerate(rows_of):
            for ax, (seed, rows) in zip(axes[i], runs_.items()):
                steps = [r["step"] for r in rows]
                label = "mean grounded reward R̂" if kind == "SOAR" else "mean learnability reward"
                ax.plot(steps, [r["reward_mean"] for r in rows], "o-", ms=3, label=label)
                if kind == "SOAR":
                    ax.plot(steps, [r["reward_ma"] for r in rows], "-", label="moving average")
                for r in rows:
                    if r["promoted"]:
                        ax.axvline(r["step"], color="green", ls="--", lw=1)
                ax.axhline(0, color="gray", lw=0.5)
                ax.set_title(f"{kind} seed {seed}" + (" (dashed: promotion)" if kind == "SOAR" else ""), fontsize=9)
                ax.set_xlabel("outer step")
            axes[i][0].legend(fontsize=7)
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
    if any(any("difficulty" in r for rows in runs_.values() for r in rows) for runs_ in teachers.values()):
        # the share of each difficulty L among the teacher's questions, per outer step (mean over seeds),
        # with the student's edge: the base student's (toy/edge.json) and each SOAR run's final student's
        kinds = [(name, runs_) for name, runs_ in teachers.items() if runs_]
        fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 3.6), squeeze=False)
        for ax, (name, runs_) in zip(axes[0], kinds):
            shares = [difficulty_shares(rows) for rows in runs_.values()]
            T = min(len(x) for x in shares)
            mean = [[statistics.mean(x[t][L] for x in shares) for L in range(10)] for t in range(T)]
            im = ax.imshow(list(map(list, zip(*mean))), origin="lower", aspect="auto", cmap="viridis",
                           extent=(-0.5, T - 0.5, 0.5, 10.5), vmin=0)
            fig.colorbar(im, ax=ax, label="share of questions")
            if base_edge:
                ax.axhline(base_edge + 0.5, color="white", ls="--", lw=1.5, label=f"base student's edge (L = {base_edge})")
            if name.startswith("grounded"):
                for seed, rows in runs_.items():
                    promos = [r["step"] for r in rows if r["promoted"]]
                    e = edges.get(seed)
                    for t in promos:
                        ax.plot(t, 10.3, "v", color="red", ms=6)
                    if promos and e:
                        ax.plot([promos[-1], T - 0.5], [e + 0.5] * 2, color="red", lw=1.2)
                ax.plot([], [], "v", color="red", label="promotion; red line: that run's final student's edge")
            ax.set_title(f"{name}, mean over {len(shares)} seed(s)", fontsize=9)
            ax.set_xlabel("outer step")
            ax.set_ylabel("difficulty L (10: 10 or more)")
            ax.legend(fontsize=6, loc="lower left")
        made.append(save(fig, out_dir, "teacher_difficulty_steps.png"))
    if any(teachers.values()):  # grounded vs learnability teacher: diversity, difficulty, answer key per outer step
        keyed = {name: (keyed or {}).get(name, {}) for name in teachers}
        fig, axes = plt.subplots(1, 3 if any(keyed.values()) else 2, figsize=(13.5 if any(keyed.values()) else 9, 3.2))
        for (name, runs_), color in zip(teachers.items(), ("C0", "C3")):
            for i, (seed, rows) in enumerate(sorted(runs_.items())):
                steps = [r["step"] for r in rows]
                label = name if i == 0 else None
                axes[0].plot(steps, [r["question_diversity"] for r in rows], "o-", color=color, alpha=.7, label=label)
                axes[1].plot(steps, [mean_difficulty(r) for r in rows], "o-", color=color, alpha=.7, label=label)
                if seed in keyed[name]:
                    axes[2].plot(keyed[name][seed], "o-", color=color, alpha=.7, label=label)
        axes[0].set_ylabel("question diversity")
        axes[1].set_ylabel("mean difficulty L of questions")
        if len(axes) == 3:
            axes[2].set_ylabel("share of teacher answers that are right")
        for ax in axes:
            ax.set_xlabel("outer step")
            ax.legend(fontsize=7)
        made.append(save(fig, out_dir, "teacher_diversity.png"))
    if res:  # pass@k curves
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for key, name in methods:
            runs_ = res.get(key, {})
            if runs_:
                ys = [100 * statistics.mean(r[f"pass@{k}"] for rs in runs_.values() for r in rs) for k in ks]
                ax.plot(ks, ys, "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k on the hard test split (%)")
        ax.legend(fontsize=7)
        made.append(save(fig, out_dir, "passk.png"))
    return made

"""
python -m experiments.tau_null -- the promotion threshold's null: how large the moving average of R̂
gets when nothing is learned. Read from a soar.py run made with a frozen teacher and no promotion:

    python soar.py --hard-train toy/hard-large/train.jsonl --hard-test toy/hard-large/test.jsonl --r 3 --m 64 --steps 20 --no-teacher-update --no-promotion --out runs/null-large-r3-seed0
    python -m experiments.tau_null --run runs/null-large-r3-seed0 --out experiments/results/tau_null

In such a run every outer step draws fresh teacher datasets, a fresh Q_R and fresh student seeds
from the same teacher against the same baseline, so its R̂ (the mean of the g datasets' R_k) are
independent draws of one distribution: R̂'s null. The moving average that soar.py compares with τ is
then the mean of w such draws. Reported: R̂ per step, the null's 95th percentile of that mean (a
bootstrap: w draws with replacement from the run's R̂, 100,000 times) with a 90% interval for the
percentile itself (the run's steps resampled), the share of sliding windows of the run above a
given τ, and per-dataset R_k and per-student R_kj for comparison. On the toy world also the two
inputs of experiments/teacher_drift.py: the SD of R_k's deviation from its step's mean (the noise),
and that deviation's least-squares slope on the dataset's share of questions at L = 8-9 (the signal).

What "nothing is learned" means here: the teacher does not learn. The baseline student does learn
from the frozen teacher's datasets (R̂ > 0 on average when the baseline solves nothing), and that
is part of the null: a τ above it asks the teacher to beat its untrained self before a promotion.
"""
import argparse
import json
import os
import random
import statistics


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def null_of_mean(values, w, q=0.95, draws=100_000, outer=200, seed=0):
    """q-quantile of the mean of w independent draws from values, and a 90% interval for it from
    resampling values themselves (outer times, fewer inner draws each)."""
    rng = random.Random(seed)
    mean_of = lambda vs, n: [statistics.fmean(rng.choices(vs, k=w)) for _ in range(n)]  # noqa: E731
    point = percentile(mean_of(values, draws), q)
    spread = sorted(percentile(mean_of(rng.choices(values, k=len(values)), draws // 50), q) for _ in range(outer))
    return point, (spread[int(0.05 * outer)], spread[int(0.95 * outer) - 1])


def drift_inputs(rows, lo=8, hi=9):
    """The grounded reward's pieces on the toy world (None elsewhere): R_k's deviation from its step's
    mean, its SD, and its slope and correlation on dataset k's share of questions at L = lo..hi."""
    devs, shares = [], []
    for r in rows:
        d, g = r.get("difficulty"), len(r["rewards"])
        if not d or len(d) % g:
            return None
        n, mean = len(d) // g, statistics.fmean(r["rewards"])
        for k, rk in enumerate(r["rewards"]):
            devs.append(rk - mean)
            shares.append(sum(lo <= (x or 0) <= hi for x in d[k * n:(k + 1) * n]) / n)
    ms = statistics.fmean(shares)
    cov = statistics.fmean((s - ms) * e for s, e in zip(shares, devs))  # devs have mean 0 by construction
    var_s = statistics.pvariance(shares)
    return dict(datasets=len(devs), dev_sd=statistics.stdev(devs), slope=cov / var_s,
                corr=cov / (var_s * statistics.pvariance(devs)) ** 0.5, share_mean=ms, share_sd=statistics.stdev(shares))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.tau_null", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a soar.py run directory (--no-teacher-update --no-promotion)")
    ap.add_argument("--w", type=int, help="moving-average window (default: the run's)")
    ap.add_argument("--tau", type=float, help="threshold to compare (default: the run's)")
    ap.add_argument("--out", help="directory for RUN_NAME.json (default: print only)")
    a = ap.parse_args(argv)
    cfg = json.load(open(os.path.join(a.run, "config.json")))
    rows = [json.loads(line) for line in open(os.path.join(a.run, "metrics.jsonl")) if line.strip()]
    if not cfg.get("no_teacher_update") or not cfg.get("no_promotion"):
        raise SystemExit(f"error: {a.run} was not run with --no-teacher-update --no-promotion, so its R̂ is no null")
    w, tau = a.w or cfg["window"], a.tau if a.tau is not None else cfg["tau"]
    if len(rows) < 2 * w:
        raise SystemExit(f"error: {a.run} has {len(rows)} outer steps; the null needs at least {2 * w}")
    r_hat = [r["reward_mean"] for r in rows]
    windows = [statistics.fmean(r_hat[i:i + w]) for i in range(len(r_hat) - w + 1)]
    p95, (lo, hi) = null_of_mean(r_hat, w)
    q_r = round(1 / min(x for r in rows for ks in r["repeat_rewards"] for x in ks if x > 0))
    out = dict(run=a.run, steps=len(rows), w=w, tau=tau, q_r_units=q_r, r_hat=r_hat,
               r_hat_mean=statistics.fmean(r_hat), r_hat_sd=statistics.stdev(r_hat),
               ma_null_p95=p95, ma_null_p95_90ci=[lo, hi], sliding_ma=windows,
               sliding_ma_above_tau=sum(x > tau for x in windows) / len(windows),
               rewards=[r["rewards"] for r in rows], repeat_rewards=[r["repeat_rewards"] for r in rows],
               baseline_acc=[r["baseline_acc"] for r in rows], drift_inputs=drift_inputs(rows))
    print(f"{a.run}: {len(rows)} steps, R̂ mean {out['r_hat_mean']:+.4f} SD {out['r_hat_sd']:.4f} "
          f"(units of 1/{q_r}: {[round(x * q_r, 2) for x in r_hat]})")
    print(f"moving average of w = {w} under the null: 95th percentile {p95:+.4f} (90% interval {lo:+.4f} .. {hi:+.4f}); "
          f"tau = {tau} {'is above' if tau > hi else 'is below' if tau < lo else 'is within the interval of'} it; "
          f"{100 * out['sliding_ma_above_tau']:.0f}% of this run's {len(windows)} sliding windows exceed tau")
    if out["drift_inputs"]:
        di = out["drift_inputs"]
        print(f"R_k - its step's mean over {di['datasets']} datasets: SD {di['dev_sd']:.4f}; slope on the L 8-9 share "
              f"{di['slope']:+.4f} (correlation {di['corr']:+.2f}; share {di['share_mean']:.2f} +- {di['share_sd']:.2f})")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, os.path.basename(os.path.normpath(a.run)) + ".json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

"""
The statistics of experiments/report.py's claims: each D_test problem's pass@k from a result's success
counts, and the paired difference of two methods with a bootstrap over seeds, fresh students and test
problems. Plain Python (no numpy), so that the report runs wherever the sweep ran.
"""
import math
import random
import statistics


def per_problem(result, k):
    """Each D_test problem's unbiased pass@k (1 - C(n-c, k) / C(n, k)), averaged over the evaluations the
    result averaged (`counts`: one list per evaluation); None for a result written without counts."""
    counts, n = result.get("counts"), result.get("samples")
    if not counts or not n or k > n:
        return None
    at = lambda c: 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)  # noqa: E731
    return [statistics.mean(at(ev[i]) for ev in counts) for i in range(len(counts[0]))]


def mean(xs):
    return sum(xs) / len(xs)


def paired_bootstrap(runs, boots=10000, seed=0):
    """The difference a - b per seed and its mean over seeds, each with a 95% percentile bootstrap interval.

    runs: {seed: (a's runs, b's runs)}, a run being its per-problem values on the same test problems
    (None where it has none). A seed's difference is, per problem, the mean over a's students minus the
    mean over b's, averaged over the problems; the mean gives every seed the same weight.

    Each replicate resamples the test problems once (every seed and student is evaluated on the same
    problems, so one resample of problem indices serves them all). A seed's interval then resamples a's
    students and b's students with replacement, each method on its own: student j of a and student j
    of b are independent training runs, not a pair, so pairing them would hide their spread. The
    mean's interval first resamples the seeds with replacement, then the students within each drawn
    seed (afresh for every draw), so a difference that flips between seeds or between students does
    not pass for significant; with few seeds or students it is wide, as it should be. None when no
    seed has runs of both methods."""
    kept, n = {}, None
    for s, (ra, rb) in sorted(runs.items()):
        n = n or next((len(x) for x in ra + rb if x is not None), None)
        ra, rb = [x for x in ra if x is not None and len(x) == n], [x for x in rb if x is not None and len(x) == n]
        if ra and rb:
            kept[s] = (ra, rb)
    if not kept:
        return None
    rng, seed_rng, student_rng = random.Random(seed), random.Random(seed + 1), random.Random(seed + 2)

    def draw(at):  # one replicate's difference of a seed: its students resampled, method by method
        ma, mb = at
        return mean([student_rng.choice(ma) for _ in ma]) - mean([student_rng.choice(mb) for _ in mb])

    reps = {s: [] for s in kept}
    reps["mean"] = []
    for _ in range(boots):
        idx = [rng.randrange(n) for _ in range(n)]
        at = {s: tuple([sum(map(x.__getitem__, idx)) / n for x in r] for r in pair) for s, pair in kept.items()}
        for s in kept:
            reps[s].append(draw(at[s]))
        reps["mean"].append(mean([draw(at[seed_rng.choice(list(kept))]) for _ in kept]))

    def ci(key, point):
        xs = sorted(reps[key])
        return {"diff": point, "lo": xs[int(0.025 * boots)], "hi": xs[int(0.975 * boots) - 1]}

    point = {s: mean([mean(x) for x in ra]) - mean([mean(x) for x in rb]) for s, (ra, rb) in kept.items()}
    return {"seeds": {s: ci(s, d) for s, d in point.items()}, "mean": ci("mean", mean(list(point.values()))),
            "runs": [sum(len(ra) for ra, _ in kept.values()), sum(len(rb) for _, rb in kept.values())]}

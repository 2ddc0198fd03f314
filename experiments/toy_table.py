"""
python -m experiments.toy_table -- the paper's comparison on the toy world, end to end: 5 seeds, each
a 30-step SOAR run and an Intrinsic-T run beside the protocol's baselines, every fresh student three
times. Run it from the repository root (`python experiments/toy_table.py` works too):

    python -m experiments.toy_table                 # every method x 5 seeds x 3 students, then the report
    python -m experiments.toy_table --seeds 0       # one seed
    python -m experiments.toy_table --seeds 0 --dry # print the commands only
    python -m experiments.toy_table --students 1    # one fresh student per method and seed (the committed sweep)
    python -m experiments.toy_table --seeds 0 --soar-args "--r 3" --root runs/toy_table_r3 --dry   # a variant

For each seed: SOAR (grounded teacher, promotion; soar.py's toy preset with --steps 30), the edge of
its final student if it promoted (toy.build edge), Intrinsic-T (the learnability reward, 30 steps),
then the protocol of experiments/protocol.py on D_test: base model, Hard-Only, SOAR-PS, SOAR-PQ,
Grounded-T, Base-T, Intrinsic-T. Every fresh student (Hard-Only included) gets the same RL budget:
60 RLOO steps of 8 questions x 8 samples. Every command is skipped when its result already exists,
and an interrupted SOAR run continues from its checkpoint, so a stopped sweep continues where it
stopped.

One fresh student is one draw of a training run, and on the toy world two students of the same
method can land far apart; the comparison is meant to judge the teacher (and the method), not one
student's luck. So each method that trains a fresh student (Hard-Only, SOAR-PQ, Grounded-T, Base-T,
Intrinsic-T) runs --students times per seed. Student 0 is the single run of earlier sweeps, same
command and directory (ROOT/<method>-seed<S>, protocol --seed S), so their results count as student 0;
student j >= 1 goes to ROOT/<method>-seed<S>-student<j> with protocol --seed S + 1000 j (seeds below
1000 keep every run's seed distinct). In experiments/protocol.py --seed seeds torch and the question
order before the fresh student is loaded and trained, and its test pass@k sampling continues that
stream, so each student has its own training run and its own pass@k draws; for Grounded-T, Base-T and
Intrinsic-T it also seeds the teacher's draw of its 128 questions, so each student gets its own
sample of the teacher's questions. The base model's pass@k and SOAR-PS (the run's promoted student,
evaluated directly) train no student and run once per seed.

Cost: one seed with one student per method took 1.5-2 hours on 2 CPU cores, the SOAR run 65-80
minutes of it and the protocol's seven rows 20-40 (experiments/README.md); five of those rows are
fresh students, so each further student adds up to another 20-40 minutes per seed: about 2.2-3.3
hours per seed at --students 3.

Token budgets: the SOAR runs use soar.py's toy preset (student 120, teacher 160 tokens); the
protocol's fresh students and every pass@k use experiments/protocol.py's defaults (student 160,
see its --help for why; a teacher's evaluation questions get the budget it was trained with, 160).

Nothing here writes into shipped files by default: runs and results go under --root (default
runs/toy_table) and the report into ROOT/report. The committed experiments/results/toy_table/ came
from this command with one student per method and `python -m experiments.report --root runs/toy_table
--out experiments/results/toy_table`; experiments/results/toy_table_333b3a2/ holds the first sweep's (3
seeds, T = 4, the first hard set, commit 333b3a2).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
PROTOCOL = [PY, "-m", "experiments.protocol"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each flag's default after its help; a flag whose default is
    worked out at run time (None here) says in its help what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


STUDENTS = 3  # fresh students per method and seed
FRESH = ("hard-only", "soar-pq", "grounded-t", "base-t", "intrinsic-t")  # the methods that train a fresh student


def student_seed(seed, j):
    """The protocol --seed of fresh student j of a sweep seed: the seed itself for student 0 (the
    earlier single-student sweeps), seed + 1000 j after it."""
    return seed + 1000 * j


def commands(root, seed, soar_steps=None, soar_args=(), students=STUDENTS):
    """(file whose existence means done, command) for one seed, in order; run from the repository root.
    soar_args: extra soar.py flags for the SOAR run (a variant of the preset; Intrinsic-T keeps it).
    students: fresh students per method in FRESH; student 0's commands come first and are those of a
    single-student sweep, students 1.. follow, each in ROOT/<method>-seed<S>-student<j>."""
    r = lambda *p: os.path.join(root, *p)  # noqa: E731
    soar, intr = r(f"soar-seed{seed}"), r(f"intrinsic-seed{seed}")
    s = str(seed)
    steps = ["--steps", str(soar_steps)] if soar_steps else []  # default: the toy preset's T
    out = [
        (os.path.join(soar, "pq.jsonl"), [PY, "soar.py", "--seed", s, *steps, *soar_args, "--out", soar]),
        # the edge of the run's final student, if it promoted (else it is the base student's, toy/edge.json)
        (os.path.join(soar, "edge.json"), [PY, "-m", "toy.build", "edge", "--model", os.path.join(soar, "student"),
                                           "--out", os.path.join(soar, "edge.json"), "--seed", s]),
        (os.path.join(intr, "pq.jsonl"), [PY, "soar.py", "--seed", s, *steps, "--out", intr,
                                          "--reward", "learnability"]),
        (r(f"base-seed{seed}", "result.json"), [*PROTOCOL, "passk", "--model", "toy/model",
                                                "--seed", s, "--out", r(f"base-seed{seed}")]),
    ]  # the base model's pass@k and SOAR-PS train no student: one run per seed
    ps = (r(f"soar-ps-seed{seed}", "result.json"), [*PROTOCOL, "ps", "--run", soar, "--seed", s,
                                                    "--out", r(f"soar-ps-seed{seed}")])
    fresh = {"hard-only": ["hard-only"], "soar-pq": ["pq", "--run", soar],
             "grounded-t": ["teacher", "--teacher", os.path.join(soar, "teacher"), "--base", "toy/model"],
             "base-t": ["teacher", "--teacher", "toy/model"],
             "intrinsic-t": ["teacher", "--teacher", os.path.join(intr, "teacher"), "--base", "toy/model"]}
    for j in range(students):
        for method in FRESH:
            d = r(f"{method}-seed{seed}" + (f"-student{j}" if j else ""))
            out.append((os.path.join(d, "result.json"),
                        [*PROTOCOL, *fresh[method], "--seed", str(student_seed(seed, j)), "--out", d]))
            if (j, method) == (0, "hard-only"):
                out.append(ps)  # (the order of the single-student sweep)
    return out


def promoted(run_dir):
    """Whether the soar.py run in run_dir promoted a student (its last metrics line)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = f.read().splitlines()
    return bool(lines) and json.loads(lines[-1])["promotions"] > 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.toy_table", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds to run, one sweep each")
    ap.add_argument("--students", type=int, default=STUDENTS,
                    help="fresh students per method and seed (Hard-Only, SOAR-PQ and the three teachers); student j "
                         "trains with protocol --seed SEED + 1000 j; 1: the committed sweep's single student")
    ap.add_argument("--soar-steps", type=int, default=30,
                    help="outer steps T of the SOAR and Intrinsic-T runs (the quick start's `python soar.py` runs 3)")
    ap.add_argument("--soar-args", default="", metavar="FLAGS",
                    help='extra soar.py flags for the SOAR runs, e.g. "--r 3" (saved in each run\'s config.json, so a '
                         "resumed run keeps them); use another --root for such a variant")
    ap.add_argument("--root", default=os.path.join("runs", "toy_table"),
                    help="where every run and result goes (relative to the repository root)")
    ap.add_argument("--results", help="where the report's table and plots go (default: ROOT/report; "
                                      "--results experiments/results/toy_table regenerates the committed copies)")
    ap.add_argument("--dry", action="store_true", help="print the commands only; run nothing")
    a = ap.parse_args(argv)
    if a.students < 1:
        ap.error("--students must be at least 1")
    if a.students > 1 and max(a.seeds) >= 1000:
        ap.error("with --students above 1 the seeds must lie below 1000 (student j trains with seed + 1000 j)")
    os.chdir(HERE)  # soar.py, -m experiments.protocol and toy/model are named from the repository root
    t0 = time.time()
    for seed in a.seeds:
        for done, cmd in commands(a.root, seed, a.soar_steps, shlex.split(a.soar_args), a.students):
            if os.path.exists(done):
                continue
            run_dir = os.path.dirname(done)
            if cmd[1:4] == ["-m", "toy.build", "edge"] and not a.dry and not promoted(run_dir):
                continue  # (--dry prints it: whether it runs depends on the SOAR run)
            if cmd[1] == "soar.py" and os.path.exists(os.path.join(run_dir, "config.json")):
                cmd = [PY, "soar.py", "--resume", run_dir]  # an interrupted run continues
            print(" ".join(cmd), flush=True)
            if a.dry:
                continue
            os.makedirs(a.root, exist_ok=True)
            log = os.path.join(a.root, os.path.basename(os.path.dirname(done)) + ".log")
            with open(log, "w") as f:
                if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=HERE).returncode != 0:
                    sys.exit(f"failed: {' '.join(cmd)} (see {log})")
            print(f"  done, {time.time() - t0:.0f}s so far", flush=True)
    if not a.dry:
        subprocess.run([PY, "-m", "experiments.report", "--root", a.root,
                        "--out", a.results or os.path.join(a.root, "report")], check=True, cwd=HERE)
        print(f"total wall time: {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()

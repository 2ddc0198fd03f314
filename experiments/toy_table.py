"""
experiments/toy_table.py -- the paper's comparison on the toy world, end to end.

    python experiments/toy_table.py                 # every method x 3 seeds, then the report (~2 h 10 min, 2 cores)
    python experiments/toy_table.py --seeds 0       # one seed (~42 min)
    python experiments/toy_table.py --seeds 0 --dry # print the commands only

For each seed: SOAR (grounded teacher, promotion), Intrinsic-T (learnability reward), then
the protocol: base model, Hard-Only, SOAR-PS, SOAR-PQ, Grounded-T, Base-T, Intrinsic-T.
Every command is skipped when its result already exists, so an interrupted sweep continues
where it stopped. Results go under --root (default runs/toy_table); the report script turns
them into ROOT/report/toy_table.md and the PNG plots (`--results experiments/results` to
regenerate the committed copies, which is how they were made).
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def commands(root, seed, soar_steps=None):
    r = lambda *p: os.path.join(root, *p)  # noqa: E731
    soar, intr = r(f"soar-seed{seed}"), r(f"intrinsic-seed{seed}")
    s = str(seed)
    steps = ["--steps", str(soar_steps)] if soar_steps else []  # default: the toy preset's T
    return [
        (os.path.join(soar, "pq.jsonl"), [PY, "soar.py", "--seed", s, *steps, "--out", soar]),
        (os.path.join(intr, "pq.jsonl"), [PY, "soar.py", "--seed", s, *steps, "--out", intr,
                                    "--reward", "learnability"]),
        (r(f"base-seed{seed}", "result.json"), [PY, "experiments/protocol.py", "passk", "--model", "toy/model",
                                                "--seed", s, "--out", r(f"base-seed{seed}")]),
        (r(f"hard-only-seed{seed}", "result.json"), [PY, "experiments/protocol.py", "hard-only", "--seed", s,
                                                     "--out", r(f"hard-only-seed{seed}")]),
        (r(f"soar-ps-seed{seed}", "result.json"), [PY, "experiments/protocol.py", "ps", "--run", soar, "--seed", s,
                                                   "--out", r(f"soar-ps-seed{seed}")]),
        (r(f"soar-pq-seed{seed}", "result.json"), [PY, "experiments/protocol.py", "pq", "--run", soar, "--seed", s,
                                                   "--out", r(f"soar-pq-seed{seed}")]),
        (r(f"grounded-t-seed{seed}", "result.json"), [PY, "experiments/protocol.py", "teacher", "--teacher",
                                                      os.path.join(soar, "teacher"), "--base", "toy/model", "--seed", s,
                                                      "--out", r(f"grounded-t-seed{seed}")]),
        (r(f"base-t-seed{seed}", "result.json"), [PY, "experiments/protocol.py", "teacher", "--teacher", "toy/model",
                                                  "--seed", s, "--out", r(f"base-t-seed{seed}")]),
        (r(f"intrinsic-t-seed{seed}", "result.json"), [PY, "experiments/protocol.py", "teacher", "--teacher",
                                                       os.path.join(intr, "teacher"), "--base", "toy/model", "--seed", s,
                                                       "--out", r(f"intrinsic-t-seed{seed}")]),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default: 0 1 2)")
    ap.add_argument("--soar-steps", type=int, default=None, help="outer steps T (default: the toy preset's)")
    ap.add_argument("--root", default=os.path.join("runs", "toy_table"),
                    help="where every run and result goes (default: %(default)s)")
    ap.add_argument("--results", help="where the report's table and plots go (default: ROOT/report)")
    ap.add_argument("--dry", action="store_true", help="print the commands only")
    a = ap.parse_args(argv)
    os.chdir(HERE)
    t0 = time.time()
    for seed in a.seeds:
        for done, cmd in commands(a.root, seed, a.soar_steps):
            if os.path.exists(done):
                continue
            run_dir = os.path.dirname(done)
            if cmd[1] == "soar.py" and os.path.exists(os.path.join(run_dir, "config.json")):
                cmd = [PY, "soar.py", "--resume", run_dir]  # an interrupted run continues
            print(" ".join(cmd), flush=True)
            if a.dry:
                continue
            os.makedirs(a.root, exist_ok=True)
            log = os.path.join(a.root, os.path.basename(os.path.dirname(done)) + ".log")
            with open(log, "w") as f:
                if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                    sys.exit(f"failed: {' '.join(cmd)} (see {log})")
            print(f"  done, {time.time() - t0:.0f}s so far", flush=True)
    if not a.dry:
        subprocess.run([PY, "experiments/report.py", "--root", a.root,
                        "--out", a.results or os.path.join(a.root, "report")], check=True)
        print(f"total wall time: {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()

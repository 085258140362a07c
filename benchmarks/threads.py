"""Seconds per epoch of the default Ising run with the default thread choice, on a quiet and a busy CPU.

OpenMP threads that share a core with another job spin-wait at every parallel region; the
drivers therefore choose their thread count from the CPUs that are idle when they start
(``latticeflow.distributed.default_threads``). This script measures that choice against fixed
thread counts, first on a quiet machine, then beside ``--busy`` single-threaded CPU-bound jobs
(pure-Python spinners), each configuration in its own process:

    python benchmarks/threads.py                 # L=8 default, 12 epochs per configuration
    python benchmarks/threads.py --busy 1 --epochs 8

Seconds per epoch are taken from the run's log (wall time from epoch 2 to the last, so start-up
and the first epoch's warm-up are excluded). Absolute times are this machine's; compare the rows.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def run(threads: int | None, epochs: int, extra: list[str]) -> tuple[float, str]:
    """Seconds per epoch and the driver's 'threads:' line, for one configuration in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "models.ising", "--epochs", str(epochs), "--out", str(out), "--no-plot",
               *(["--threads", str(threads)] if threads else []), *extra]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
        log = pd.read_csv(out / "log.csv")
    line = next((s for s in proc.stdout.splitlines() if s.startswith("threads:")), "?")
    w = log["wall_time"].to_numpy()
    return (w[-1] - w[0]) / (len(w) - 1), line


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--busy", type=int, default=1, help="CPU-bound background jobs in the busy scenario")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="fixed thread counts to compare")
    p.add_argument("--flags", default="", help="extra flags for models.ising (default: the built-in default)")
    args = p.parse_args(argv)
    rows = []
    for scenario in ("quiet", "busy"):
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    for _ in range(args.busy if scenario == "busy" else 0)]
        try:
            time.sleep(1.0)
            for threads in (None, *args.threads):
                s, line = run(threads, args.epochs, args.flags.split())
                rows.append({"scenario": scenario, "threads": "default" if threads is None else threads,
                             "s_per_epoch": s, "chosen": line})
                print(f"{scenario:5s}  threads={rows[-1]['threads']!s:7s}  {s:.3f} s/epoch   {line}", flush=True)
        finally:
            for sp in spinners:
                sp.kill()
                sp.wait()
    print("\n| machine | threads | s/epoch | chosen by the driver |\n|---|---|---:|---|")
    for r in rows:
        print(f"| {r['scenario']} ({args.busy if r['scenario'] == 'busy' else 0} other job) | {r['threads']} | "
              f"{r['s_per_epoch']:.3f} | {r['chosen'] if r['threads'] == 'default' else ''} |")
    return rows


if __name__ == "__main__":
    main()

"""Accuracy of the variational free energy against Kaufman's exact value, under a time budget.

Runs ``models/ising.py`` on named configurations and prints the README's table: configuration,
wall time, epochs, final F/N (mean of the last 50 epochs ± its standard error), exact F/N,
error per site, the ratio of the error to the target, and the Kish ESS. The targets (issue 3):
|F/N − exact| ≤ 1e-3 at L=4 within 2 minutes and ≤ 5e-3 at L=16 within 30 minutes on 2 cores.
The variational F/N is an upper bound of the exact one: an estimate more than 3 standard errors
below it is flagged as a bug.

    python benchmarks/ising_accuracy.py --runs l4               # ~2 minutes
    python benchmarks/ising_accuracy.py --runs l4 l16 --threads 2 # + 30 minutes
    python benchmarks/ising_accuracy.py --runs paper4           # the paper's network, same budget as l4
    python benchmarks/ising_accuracy.py --runs l4min --threads 1           # 1 minute on 1 core
    python benchmarks/ising_accuracy.py --runs l16mix --seed 1              # 30 minutes on 2 cores, seed 1
    python benchmarks/ising_accuracy.py --runs l16mix --procs 2             # the same, 2 torchrun ranks of 1 thread

``--procs P`` runs each configuration data-parallel under torchrun (``torch.distributed.run``, P ranks on
this machine, ``--threads`` each, default 1), which on 2 cores trains the batch-128 L=16 flow faster than
one process with 2 threads (README).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models import ising as driver  # noqa: E402

# name -> (driver flags, wall-clock budget in minutes, target |error| per site)
RUNS: dict[str, tuple[list[str], float, float]] = {
    # the driver's defaults (quadratic + conv + ln cosh MLP, time-dependent, T=1, batch 256, Adam 1e-2
    # cosine); at L=4 without the conv part, which costs more than it gains there
    "l4": (["--L", "4", "--hidden", "128", "--potential", "quadratic+mlp", "--epochs", "2000"], 2.0, 1e-3),
    "l8": (["--L", "8"], 5.0, float("nan")),
    # + a 1-layer D4/Z2-symmetric conv potential (16 channels, 5×5): ~1.06 s per epoch on 2 threads
    "l16": (["--L", "16", "--hidden", "512", "--potential", "quadratic+conv+mlp", "--epochs", "1650"], 30.0, 5e-3),
    # the accuracy-per-minute targets (issue 16), each with its learning-rate decay spread over its budget
    # (--schedule-minutes, a little under the budget: the last epoch and the summary fit in it), so a slow day
    # or machine gives fewer epochs, never a decay cut off part way: 1e-3 at L=4 in 1 minute on 1 core, and at
    # L=16 in 30 minutes on 2 cores with the Z2 mixture of the potential without Z2 (README)
    # h=256 since the compiled RK4 step (latticeflow.native.step): more accurate per minute than h=128 there
    # (README); without a C++ compiler the eager step pays 1.65x per epoch for the width
    "l4min": (["--L", "4", "--hidden", "256", "--potential", "quadratic+mlp", "--schedule-minutes", "0.95"], 1.0, 1e-3),
    # batch 128: 9.77e-4 and 1.04e-3 with two seeds side by side on one core each; 8.27e-4 and 7.94e-4 with
    # --procs 2, seeds 0 and 1 one after the other (README)
    "l16mix": (["--L", "16", "--hidden", "512", "--group", "space", "--mixture", "z2", "--batch", "128",
                "--schedule-minutes", "29.5"], 30.0, 1e-3),
    # the paper's potential (softplus MLP, time-independent) with the same budget as l4, for contrast
    "paper4": (["--L", "4", "--hidden", "128", "--epochs", "3000", "--activation", "softplus",
                "--no-time-dependent", "--lr", "3e-3"], 2.0, 1e-3),
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_ranks(flags: list[str], procs: int, threads: int) -> dict:
    """``models/ising.py`` with ``flags`` under torchrun on ``procs`` local ranks of ``threads`` threads each;
    its summary.json (written by rank 0), or an error with the end of the run's output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={procs}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{_free_port()}", str(REPO / "models" / "ising.py"),
           *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return json.loads((Path(flags[flags.index("--out") + 1]) / "summary.json").read_text())


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=["l4"], choices=list(RUNS))
    p.add_argument("--procs", type=int, default=1, help="data-parallel ranks under torchrun (1: this process)")
    p.add_argument("--threads", type=int, default=None, help="threads per process (default 2, or 1 per rank)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (its output folder gets _seedS when not 0)")
    p.add_argument("--out", default="benchmarks/results/ising_accuracy")
    args = p.parse_args(argv)
    if args.procs < 1:
        p.error("--procs must be at least 1")
    threads = args.threads or (2 if args.procs == 1 else 1)
    rows = []
    for name in args.runs:
        flags, minutes, goal = RUNS[name]
        out = Path(args.out) / (name if args.seed == 0 else f"{name}_seed{args.seed}")
        full = [*flags, "--seed", str(args.seed), "--max-minutes", str(minutes), "--threads", str(threads),
                "--out", str(out), "--quiet", "--force"]  # a benchmark rerun replaces its own earlier result
        s = driver.main(full) if args.procs == 1 else run_ranks(full, args.procs, threads)
        rows.append({"run": name, "flags": " ".join(flags), "seed": args.seed, "procs": args.procs, "threads": threads,
                     "budget_min": minutes, "target": goal, **s})
    print("\n| run | flags | seed | processes × threads | wall (s) | epochs | F/N | exact | error | error/target | ESS |")
    print("|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|")
    for r in rows:
        below = r["error"] < -3 * r["stderr"]
        print(f"| {r['run']} | `{r['flags']}` | {r['seed']} | {r['procs']} × {r['threads']} | {r['wall_s']:.0f} | "
              f"{r['epochs']} | {r['free_energy_hs']:.5f}({r['stderr'] * 1e5:.0f}) | "
              f"{r['exact_hs']:.5f} | {r['error']:.2e}{' BELOW EXACT: BUG' if below else ''} | "
              f"{abs(r['error']) / r['target']:.2f} | {r['ess']:.3f} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()

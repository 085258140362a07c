"""Behaviour guard for refactors: fixed-seed runs whose numbers must not change.

Records the per-epoch log of the built-in Ising default, a short L=4 accuracy run, a short
MNIST run (when the shared MNIST copy or ``--data-dir`` is there) and ``python -m analysis`` on
the L=4 checkpoint, all on one thread, as JSON; ``--compare OLD.json`` reports every number
that differs (relative difference above ``--rtol``, default 0: the same digits):

    python benchmarks/refactor_guard.py --save benchmarks/results/guard_before.json
    ... refactor ...
    python benchmarks/refactor_guard.py --save benchmarks/results/guard_after.json \\
        --compare benchmarks/results/guard_before.json

Same machine, same thread count (1), same torch: floating-point results are then reproducible
to the last digit, so any difference is a change of behaviour to explain.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO / ".." / "shared" / "data" / "mnist"
TIMING = ("wall_time", "train_seconds")


def _run(args: list[str]) -> None:
    env_cmd = [sys.executable, *args]
    proc = subprocess.run(env_cmd, cwd=REPO, capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def _log(path: Path) -> dict[str, list[float]]:
    log = pd.read_csv(path).drop(columns=[c for c in TIMING if c in pd.read_csv(path, nrows=0).columns])
    return {c: log[c].astype(float).tolist() for c in log.columns}


def record(epochs_default: int, data_dir: Path | None) -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        _run(["-m", "models.ising", "--epochs", str(epochs_default), "--threads", "1", "--out", str(t / "default"),
              "--quiet", "--no-plot"])
        out["ising_default"] = _log(t / "default" / "log.csv")
        _run(["-m", "models.ising", "--L", "4", "--hidden", "128", "--potential", "quadratic+mlp", "--epochs", "200",
              "--threads", "1", "--out", str(t / "l4"), "--quiet", "--no-plot"])
        out["ising_l4"] = _log(t / "l4" / "log.csv")
        _run(["-m", "analysis", str(t / "l4" / "checkpoint.pt"), "--out", str(t / "report"), "--samples", "512",
              "--hmc-samples", "40", "--hmc-chains", "4", "--hmc-warmup", "20", "--independence", "512",
              "--sw-sweeps", "200", "--quiet", "--no-plots", "--threads", "1"])
        est = pd.read_csv(t / "report" / "estimates.csv")
        out["analysis_l4"] = {f"{r['quantity']} | {r['method']}": [float(r["value"]), float(r["stderr"])]
                              for _, r in est.iterrows()}
        if data_dir is not None and data_dir.is_dir():
            _run(["-m", "models.mnist", "--data-dir", str(data_dir), "--n-train", "400", "--n-eval", "200",
                  "--n-validation", "200", "--hidden", "32", "--n-steps", "4", "--step-size", "0.25", "--epochs", "2",
                  "--patience", "0", "--threads", "1", "--out", str(t / "mnist"), "--quiet", "--no-plot", "--whiten"])
            out["mnist"] = _log(t / "mnist" / "log.csv")
    return out


def _flatten(obj, prefix: str = "") -> dict[str, float]:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flatten(val, f"{prefix}{key}/").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in _flatten(val, f"{prefix}{i}/").items()}
    return {prefix.rstrip("/"): obj}


def compare(new: dict, old: dict, rtol: float) -> list[str]:
    a, b = _flatten(new), _flatten(old)
    diffs = [f"missing now: {k}" for k in sorted(b.keys() - a.keys())]
    diffs += [f"new: {k}" for k in sorted(a.keys() - b.keys())]
    for k in sorted(a.keys() & b.keys()):
        x, y = a[k], b[k]
        same = (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)) or x == y or (
            isinstance(x, (int, float)) and isinstance(y, (int, float)) and abs(x - y) <= rtol * max(abs(x), abs(y)))
        if not same:
            diffs.append(f"{k}: {y!r} -> {x!r}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save", required=True, help="write the recorded numbers here (JSON)")
    p.add_argument("--compare", default=None, help="an earlier recording to compare with")
    p.add_argument("--rtol", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=30, help="epochs of the built-in default run")
    p.add_argument("--data-dir", default=str(SHARED_MNIST))
    args = p.parse_args(argv)
    new = record(args.epochs, Path(args.data_dir) if args.data_dir else None)
    Path(args.save).parent.mkdir(parents=True, exist_ok=True)
    Path(args.save).write_text(json.dumps(new, indent=1))
    print(f"recorded {sum(len(_flatten(v)) for v in new.values())} numbers in {args.save}")
    if args.compare:
        diffs = compare(new, json.loads(Path(args.compare).read_text()), args.rtol)
        print("\n".join(diffs) if diffs else "identical")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

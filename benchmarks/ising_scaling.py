"""Training that holds at every size: wall time to variational errors of 1e-2, 5e-3, 2e-3 at L = 8 … 64.

Runs ``python -m models.ising`` at β_c for each L (each in its own process, under a wall-clock
budget) and reads its log: the first epoch at which the running mean of F/N (50 epochs) is within
each threshold of Kaufman's exact value, the wall time there, the number of rollbacks (the
trainer's recovery from diverged epochs), the final error, ESS and peak memory (the run's own
peak RSS, from its summary.json); then the importance-weighted F/N of the trained flow
(``python -m analysis`` on fresh float64 samples, with its verdict) against Kaufman:

    python benchmarks/ising_scaling.py --sizes 8 16 --minutes 10 --threads 2 --keep runs/scale
    python benchmarks/ising_scaling.py --sizes 32 --minutes 60 --flags "--epochs 3300"
    python benchmarks/ising_scaling.py --runs runs/scale/L32 runs/scale/L64   # finished run folders

Each row also says whether the running mean is monotone after warm-up apart from the logged
rollbacks (the issue's criterion: no run diverges). Absolute times are this machine's.
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
THRESHOLDS = (1e-2, 5e-3, 2e-3)
WINDOW = 50  # epochs of the running mean (the driver's summary window)


def first_time_within(log: pd.DataFrame, exact: float, threshold: float, window: int = WINDOW) -> float | None:
    """Wall time (s) of the first epoch whose running mean of F/N is within ``threshold`` of exact."""
    run = log["free_energy_hs"].rolling(window, min_periods=min(window, len(log))).mean()
    hit = (run - exact).abs() <= threshold
    return float(log["wall_time"][hit].iloc[0]) if hit.any() else None


def largest_rise(log: pd.DataFrame, warmup: int = 100, window: int = WINDOW) -> tuple[float, int | None]:
    """The largest rise of the running mean of F/N above its best value so far after ``warmup``
    epochs, in units of the running mean's standard error, and the epoch where it happens."""
    run = log["free_energy_hs"].rolling(window).mean().iloc[warmup:]
    se = (log["stderr"].rolling(window).mean() / window ** 0.5).iloc[warmup:]
    rise = (run - run.cummin()) / se
    if rise.empty or rise.isna().all():
        return 0.0, None
    i = rise.idxmax()
    return float(rise[i]), int(log["epoch"][i])


def monotone_after_warmup(log: pd.DataFrame, warmup: int = 100, window: int = WINDOW, slack: float = 3.0) -> bool:
    """Whether the running mean never rises by more than ``slack`` standard errors after ``warmup`` epochs."""
    return largest_rise(log, warmup, window)[0] <= slack


def importance_estimate(run: Path, samples: int, threads: int) -> dict:
    """The importance-weighted −ln Z_HS/N of the run's flow (``python -m analysis``, no chains)."""
    out = run / "scaling_report"
    cmd = [sys.executable, "-m", "analysis", str(run / "checkpoint.pt"), "--out", str(out), "--samples", str(samples),
           "--skip-hmc", "--independence", "0", "--sw-sweeps", "0", "--rk4-check", "0", "--threads", str(threads),
           "--no-plots", "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"is_note": f"analysis failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    est = pd.read_csv(out / "estimates.csv")
    row = est[(est["quantity"] == "free_energy_hs") & (est["method"] == "flow importance")].iloc[0]
    ess = est[(est["quantity"] == "ess") & (est["method"] == "flow importance")]["value"]
    return {"is_error": float(row["value"] - row["exact"]), "is_stderr": float(row["stderr"]),
            "is_sigma": float(row["deviation_sigma"]), "is_reliable": bool(row["reliable"]),
            "is_reason": "" if bool(row["reliable"]) else str(row["reason"]),
            "is_ess": float(ess.iloc[0]) if len(ess) else None}


def summarise(out: Path, L: int | None = None, status: int = 0) -> dict:
    """A scaling-table row from a finished run folder (its log.csv, summary.json and config.json)."""
    log = pd.read_csv(out / "log.csv")
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    config = json.loads((out / "config.json").read_text())
    L = int(config["L"]) if L is None else L
    exact = summary.get("exact_hs")
    if exact is None:  # diverged without a summary: the exact value from the library
        import latticeflow as lf

        exact = lf.ising(L, config["beta"]).exact_free_energy()
    rise, at = largest_rise(log)
    return {"L": L, "batch": config.get("batch"), "status": status, "epochs": len(log),
            "wall_s": float(log["wall_time"].iloc[-1]),
            **{f"t_{t:g}": first_time_within(log, exact, t) for t in THRESHOLDS},
            "error": summary.get("error"), "ess": summary.get("ess"),
            "rollbacks": int(log["rollbacks"].iloc[-1]) if "rollbacks" in log else 0,
            "monotone": rise <= 3.0, "largest_rise_se": rise, "largest_rise_epoch": at,
            "threads": summary.get("provenance", {}).get("threads"),
            "peak_mib": summary.get("provenance", {}).get("peak_rss_mib")}


def run_size(L: int, minutes: float, threads: int, flags: list[str], keep: Path | None) -> tuple[dict, Path]:
    out = (keep if keep is not None else Path(tempfile.mkdtemp(prefix="scaling_"))) / f"L{L}"
    epochs = [] if "--epochs" in flags else ["--epochs", "100000"]
    cmd = [sys.executable, "-m", "models.ising", "--L", str(L), *epochs, "--max-minutes", str(minutes),
           "--threads", str(threads), "--out", str(out), "--quiet", "--no-plot", *flags]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if not (out / "log.csv").exists():
        raise RuntimeError(f"L={L}: no log ({proc.returncode}): {proc.stderr[-2000:]}")
    return summarise(out, L, proc.returncode), out


def table(rows: list[dict]) -> str:
    fmt = lambda v: "—" if v is None else f"{v / 60:.1f} min"  # noqa: E731
    lines = ["| L | batch | threads | epochs | wall | to 1e-2 | to 5e-3 | to 2e-3 | final error | ESS | "
             "importance F/N − exact | rollbacks | monotone (largest rise) | peak RSS |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|"]
    for r in rows:
        err = "—" if r["error"] is None else f"{r['error']:.2e}"
        ess = "—" if r["ess"] is None else f"{r['ess']:.3f}"
        if "is_error" in r:
            imp = f"{r['is_error']:.1e} ± {r['is_stderr']:.1e} ({r['is_sigma']:+.1f}σ, ESS {r['is_ess']:.3f})"
            imp += "" if r["is_reliable"] else f"; flagged: {r['is_reason']}"
        else:
            imp = r.get("is_note", "—")
        rise = f"{r['largest_rise_se']:.1f} SE at epoch {r['largest_rise_epoch']}"
        peak = "—" if r["peak_mib"] is None else f"{r['peak_mib'] / 1024:.1f} GiB"
        lines.append(f"| {r['L']} | {r['batch']} | {r['threads']} | {r['epochs']} | {fmt(r['wall_s'])} | "
                     f"{fmt(r['t_0.01'])} | {fmt(r['t_0.005'])} | {fmt(r['t_0.002'])} | {err} | {ess} | {imp} | "
                     f"{r['rollbacks']} | {'yes' if r['monotone'] else 'no'} ({rise}) | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--runs", type=Path, nargs="+", help="summarise these finished run folders instead of training")
    p.add_argument("--minutes", type=float, default=10.0, help="budget per size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--flags", default="", help="extra flags for models.ising (with --epochs: the cosine's length)")
    p.add_argument("--keep", type=Path, help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--is-samples", type=int, default=16384, help="flow samples of the importance estimate (0: skip)")
    args = p.parse_args(argv)
    rows = []
    folders = args.runs or [None] * len(args.sizes)
    for L, folder in zip(args.sizes if not args.runs else [None] * len(folders), folders):
        if folder is None:
            row, folder = run_size(L, args.minutes, args.threads, args.flags.split(), args.keep)
        else:
            row = summarise(folder)
        if args.is_samples and (folder / "checkpoint.pt").exists():
            row.update(importance_estimate(folder, args.is_samples, args.threads))
        rows.append(row)
        print(json.dumps(row, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)), flush=True)
    print("\n" + table(rows))
    return rows


if __name__ == "__main__":
    main()

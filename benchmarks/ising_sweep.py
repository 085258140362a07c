"""Thermodynamic curves across β in one run: wall time and the error per β against Kaufman.

Runs ``python -m models.ising --beta GRID`` (a warm-started sweep, :mod:`latticeflow.sweep`) and
prints, per β: epochs, training seconds, the variational and importance-weighted F/N minus the
exact finite-L value (Ising normalisation), the reweighted U/N and C/N minus exact, each also in
units of its standard error, and the ESS. Extra flags go to the driver.

    python benchmarks/ising_sweep.py                                   # L=8, 0.3 0.4 β_c 0.5 0.6, ~10 min on 1 core
    python benchmarks/ising_sweep.py --out runs/sweep_l8 -- --epochs 600 --warm-epochs 200
    python benchmarks/ising_sweep.py --table runs/sweep_l16   # the per-β table of a finished sweep
    python benchmarks/ising_sweep.py --finite-size runs/sweep_l4 runs/sweep_l8 --out runs/fss   # C/N and Binder at several L
    python benchmarks/ising_sweep.py --step-check runs/sweep_l16 --from-beta 0.44   # its β again at ε/2
    python benchmarks/ising_sweep.py --remeasure runs/sweep_l16 --only 10,11 --threads 1   # today's verdicts
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from models import ising as driver  # noqa: E402

DEFAULT_FLAGS = ["--L", "8", "--beta", "0.3,0.4,critical,0.5,0.6", "--epochs", "300", "--warm-epochs", "100"]


def per_beta(table: pd.DataFrame) -> pd.DataFrame:
    """One row per β: errors against the exact finite-L values, in absolute terms and in σ."""
    rows = []
    for beta, g in table.groupby("beta"):
        def pick(q: str, method: str, norm: str = "") -> pd.Series:
            sel = g[(g["quantity"] == q) & (g["method"] == method)]
            if norm:
                sel = sel[sel["normalisation"] == norm]
            return sel.iloc[0]

        fv, fi = pick("free_energy", "variational", "ising"), pick("free_energy", "importance", "ising")
        u, c = pick("energy", "reweighted"), pick("specific_heat", "reweighted")
        rows.append({"beta": beta, "epochs": int(fv["epochs"]), "train_s": float(fv["train_s"]),
                     "measure_s": float(fv["measure_s"]), "ess": float(fv["ess"]),
                     "F_var-exact": fv["value"] - fv["exact"], "F_IS-exact": fi["value"] - fi["exact"],
                     "F_IS_sigma": fi["deviation_sigma"], "U-exact": u["value"] - u["exact"],
                     "U_sigma": u["deviation_sigma"], "C-exact": c["value"] - c["exact"], "C_sigma": c["deviation_sigma"],
                     **{f"{q}_sigma": pick(q, "reweighted")["deviation_sigma"] for q in ("abs_m", "binder", "susceptibility")
                        if len(g[(g["quantity"] == q) & (g["method"] == "reweighted")])},
                     **_refined(g), "samples": int(fi["n_samples"]), **_verdicts(g)})
    return pd.DataFrame(rows)


def _verdicts(g: pd.DataFrame) -> dict[str, str]:
    """The importance and reweighted rows whose error bars the sweep marks not reliable (tables with verdicts)."""
    if "reliable" not in g:
        return {}
    from analysis.thermo import _reliable

    sel = g[g["method"].isin(["importance", "reweighted"]) & (g["normalisation"].fillna("") != "ising")]
    return {"not_reliable": ",".join(sel["quantity"][~_reliable(sel)])}


def _refined(g: pd.DataFrame) -> dict[str, float]:
    """The step check's importance-weighted F/N (every RK4 step split, ``--step-check``), if measured."""
    sel = g[(g["quantity"] == "free_energy") & (g["method"] == "importance_refined") & (g["normalisation"] == "ising")]
    if not len(sel):
        return {}
    r = sel.iloc[0]
    return {"F_IS_fine-exact": r["value"] - r["exact"], "F_IS_fine_sigma": r["deviation_sigma"]}


def finite_size(folders: list[str], out: Path) -> pd.DataFrame:
    """The finite-size figure (:func:`analysis.thermo.plot_finite_size`) of finished sweeps at several L."""
    import json

    from analysis.thermo import plot_finite_size

    tables = {}
    for f in folders:
        L = int(json.loads(Path(f, "sweep.json").read_text())["config"]["L"])
        if L in tables:
            raise SystemExit(f"error: two sweeps at L={L} ({f})")
        tables[L] = pd.read_csv(Path(f, "sweep.csv"))
    out.mkdir(parents=True, exist_ok=True)
    path = plot_finite_size(tables, out / "finite_size.png", title="Ising sweeps: finite-size scaling")
    print(f"wrote {path}")
    return pd.concat(tables.values(), ignore_index=True)


def _finished(root: Path, from_beta: float, only: list[int] | None = None,
              why: str = "") -> tuple[dict, list[tuple[int, Path]]]:
    """A sweep's manifest and its finished β ≥ ``from_beta`` (with ``only``: those places in the grid)
    as (place, run folder); a β-conditioned sweep, which has no checkpoint per β, is refused."""
    manifest = json.loads((root / "sweep.json").read_text())
    if manifest.get("method") == "conditioned":
        raise SystemExit(f"{root} is a β-conditioned sweep: it has one flow, not a checkpoint per β{why}")
    runs = []
    for k, name in enumerate(manifest["runs"]):
        run = root / name
        if (run / "estimates.csv").is_file() and (only is None or k in only) \
                and float(pd.read_csv(run / "estimates.csv")["beta"].iloc[0]) >= from_beta:
            runs.append((k, run))
    return manifest, runs


def step_check(folder: str, from_beta: float, refine: int = 2, samples: int = 4096, seed: int = 11) -> pd.DataFrame:
    """The step check (:func:`analysis.thermo.step_check_rows`) of a finished sweep's β ≥ ``from_beta``.

    For sweeps measured without it (``--step-check 1``, or written before it existed): each β's
    checkpoint is measured again with every RK4 step split in ``refine``, ``samples`` fresh
    samples; the rows (both normalisations, variational and importance) go to
    ``FOLDER/step_check.csv`` and the importance-weighted F/N per β is printed beside the value
    the sweep measured at the trained step.
    """
    import torch

    from analysis.report import load_model
    from analysis.thermo import step_check_rows

    root = Path(folder)
    _, runs = _finished(root, from_beta, why="; it measures the step check itself (--step-check N when it runs)")
    measured = pd.read_csv(root / "sweep.csv")
    rows = []
    for _, run in runs:
        beta = float(pd.read_csv(run / "estimates.csv")["beta"].iloc[0])  # as sweep.csv writes it
        flow, target, _ = load_model(run / "checkpoint.pt")
        for r in step_check_rows(flow, target, refine=refine, n_samples=samples,
                                 generator=torch.Generator().manual_seed(seed)):
            rows.append({"beta": beta, **r})
        fine = rows[-1]  # importance, Ising normalisation
        coarse = measured[(measured["beta"] == beta) & (measured["quantity"] == "free_energy")
                          & (measured["method"] == "importance") & (measured["normalisation"] == "ising")].iloc[0]
        print(f"β = {beta:.6f}: F_IS − exact at ε {coarse['value'] - coarse['exact']:+.2e} ± {coarse['stderr']:.1e} "
              f"({coarse['deviation_sigma']:+.1f}σ, ESS {coarse['ess']:.3f}); at ε/{refine} "
              f"{fine['value'] - fine['exact']:+.2e} ± {fine['stderr']:.1e} ({fine['deviation_sigma']:+.1f}σ, "
              f"ESS {fine['ess']:.3f})", flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(root / "step_check.csv", index=False)
    return table


def remeasure(folder: str, from_beta: float, samples: int | None = None, max_samples: int | None = None,
              only: list[int] | None = None) -> pd.DataFrame:
    """The finished β of a sweep measured again by today's :func:`latticeflow.sweep.measure_beta`.

    Same seeds as the sweep (so with its ``samples`` the first measurement repeats the sweep's own
    samples, and with the sweep's settings all of them), the verdicts and the extension to
    ``max_samples`` of the current code, and the sweep's step check.
    For sweeps measured before the tail rules; the rows go to ``FOLDER/remeasured.csv`` (with
    ``only``: ``remeasured_<k>_<k>.csv``; the sweep's own files are left as they are) and the per-β
    table is printed.
    """
    from analysis.report import load_model
    from latticeflow.config import IsingConfig
    from latticeflow.sweep import measure_beta

    root = Path(folder)
    manifest, runs = _finished(root, from_beta, only)
    config = IsingConfig.from_dict(manifest["config"])
    samples = int(samples or manifest["samples"])
    max_samples = int(max_samples or manifest.get("max_samples", 4 * samples))
    step = int(manifest.get("step_check", 1))
    frames = []
    for k, run in runs:
        flow, target, _ = load_model(run / "checkpoint.pt")
        old = pd.read_csv(run / "estimates.csv").iloc[0]
        t0 = time.perf_counter()
        table = measure_beta(flow, target, k, config, samples, step, None, max_samples=max_samples, verbose=True,
                             epochs=int(old["epochs"]), train_s=float(old["train_s"]))
        print(f"β = {float(target.beta):.6f}: measured in {time.perf_counter() - t0:.0f} s", flush=True)
        frames.append(table)
    if not frames:
        raise SystemExit(f"{root}: no finished β to measure again")
    table = pd.concat(frames, ignore_index=True)
    name = "remeasured.csv" if only is None else f"remeasured_{'_'.join(str(k) for k in sorted(only))}.csv"
    table.to_csv(root / name, index=False)  # one file per subset: two subsets can run side by side
    out = per_beta(table)
    with pd.option_context("display.width", 250, "display.float_format", "{:.4g}".format):
        print(out.to_string(index=False))
    return table


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/ising_sweep/l8", help="sweep folder [%(default)s]")
    p.add_argument("--threads", default="1", help="torch threads [%(default)s]")
    p.add_argument("flags", nargs="*", help="more driver flags (after --), e.g. -- --epochs 600")
    p.add_argument("--table", default=None, metavar="SWEEP_FOLDER",
                   help="only print the per-β table of this finished (or stopped) sweep")
    p.add_argument("--finite-size", nargs="+", default=None, metavar="SWEEP_FOLDER",
                   help="only draw the finite-size figure of these finished sweeps into --out/finite_size.png")
    p.add_argument("--step-check", default=None, metavar="SWEEP_FOLDER",
                   help="only measure the finished β of this sweep again at half the RK4 step (step_check.csv)")
    p.add_argument("--from-beta", type=float, default=0.0,
                   help="with --step-check or --remeasure: only β >= this [all]")
    p.add_argument("--remeasure", default=None, metavar="SWEEP_FOLDER",
                   help="only measure the finished β of this sweep again with today's verdicts and extension "
                        "(the sweep's seeds; remeasured.csv)")
    p.add_argument("--only", default=None, help="with --remeasure: the β by their place in the grid, e.g. 10,11 [all]")
    p.add_argument("--samples", type=int, default=None, help="with --remeasure: first samples [the sweep's]")
    p.add_argument("--max-samples", type=int, default=None,
                   help="with --remeasure: samples of a β measured again [the sweep's, or 4 × --samples]")
    args = p.parse_args(argv)
    if args.remeasure:
        import torch

        torch.set_num_threads(int(args.threads))
        only = None if args.only is None else [int(k) for k in args.only.split(",")]
        return remeasure(args.remeasure, args.from_beta, args.samples, args.max_samples, only)
    if args.step_check:
        return step_check(args.step_check, args.from_beta)
    if args.finite_size:
        return finite_size(args.finite_size, Path(args.out))
    if args.table:
        out = per_beta(pd.read_csv(Path(args.table, "sweep.csv")))
        with pd.option_context("display.width", 250, "display.float_format", "{:.4g}".format):
            print(out.to_string(index=False))
        return out
    flags = [*DEFAULT_FLAGS, *args.flags, "--out", args.out, "--threads", args.threads, "--quiet"]
    if Path(args.out, "sweep.json").is_file():
        flags += ["--force"]
    print("python -m models.ising " + " ".join(flags), flush=True)
    t0 = time.perf_counter()
    summary = driver.main(flags)
    wall = time.perf_counter() - t0
    out = per_beta(summary["table"])
    with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
        print(out.to_string(index=False))
    print(f"wall time {wall:.0f} s ({summary['stop_reason']}); figure {Path(args.out) / 'sweep.png'}")
    out.to_csv(Path(args.out) / "per_beta.csv", index=False)
    return out


if __name__ == "__main__":
    main()

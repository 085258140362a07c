"""Coverage of the report's error bars at L=3 and L=4, where every observable is exact (enumeration).

For each lattice one flow is trained in memory and frozen at three stages (barely, partly and well
trained); the report (``analysis.report.compute_estimates``) then runs with many seeds, and every
estimate with an exact value gives a z-score. Honest error bars: the z-scores of the estimates the
report marks reliable are about standard normal (≥ 90 % within 2σ, none beyond 4σ). Prints the
coverage per method and per stage and writes every z-score to a CSV:

    python benchmarks/calibration.py --seeds 8 --out calibration.csv          # the README table
    python benchmarks/calibration.py --seeds 2 --latent                       # with latent HMC (slow)
    python benchmarks/calibration.py --hmc-repeats 40 --sizes 3               # physical HMC alone, 40 seeds
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from analysis.calibration import coverage, trained_stages, zscores
from analysis.latent import exact_reference, physical_hmc
from latticeflow import ising
from analysis.report import ReportSettings
from latticeflow.config import ISING_DEFAULT

STAGES = {"barely trained": 5, "partly trained": 60, "well trained": 800}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[3, 4])
    p.add_argument("--seeds", type=int, default=8, help="report seeds per flow and stage")
    p.add_argument("--latent", action="store_true", help="also latent HMC (about a minute per run at L=4)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="CSV of every z-score")
    p.add_argument("--hmc-repeats", type=int, default=0,
                   help="only physical HMC (the report's defaults) with this many seeds: spread of z(|m|)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.hmc_repeats:
        for L in args.sizes:
            target = ising(L, "critical")
            exact = exact_reference(target)["abs_m"]
            zs = []
            for seed in range(args.hmc_repeats):
                r = physical_hmc(target, n_chains=16, n_samples=300, n_leapfrog=10, n_warmup=100, max_seconds=30,
                                 generator=torch.Generator().manual_seed(seed))
                e = r.observables["abs_m"]
                zs.append((e.value - exact) / e.stderr)
            z = pd.Series(zs)
            print(f"L={L}: physical HMC z(|m|) over {len(z)} seeds: mean {z.mean():+.2f}, std {z.std(ddof=0):.2f}, "
                  f"{(z.abs() > 2).mean():.1%} beyond 2σ, max |z| {z.abs().max():.2f}")
        return pd.DataFrame()
    settings = ReportSettings(skip_latent_hmc=not args.latent, chain_seconds=30.0, plots=False, verbose=False)
    frames = []
    t0 = time.perf_counter()
    for L in args.sizes:
        config = ISING_DEFAULT.replace(L=L, potential="quadratic+mlp", hidden=64, epochs=max(STAGES.values()),
                                       seed=L)
        for stage, epochs, flow, target in trained_stages(config, STAGES):
            z = zscores(flow, target, range(args.seeds), settings, L=L, stage=stage, epochs=epochs)
            frames.append(z)
            print(f"L={L} {stage} ({epochs} epochs): ESS/B {z['ess_fraction'].mean():.3f}, Pareto k "
                  f"{z['pareto_k'].mean():.2f}; {len(z)} z-scores ({time.perf_counter() - t0:.0f} s)", flush=True)
    z = pd.concat(frames, ignore_index=True)
    if args.out:
        z.to_csv(args.out, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print("\nper method (reliable estimates only in the coverage columns):")
        print(coverage(z, "method").round(3).to_string())
        print("\nper lattice and stage:")
        print(coverage(z, ["L", "stage"]).round(3).to_string())
        print("\nall reliable estimates:")
        print(coverage(z.assign(all="all"), "all").round(3).to_string())
    return z


if __name__ == "__main__":
    main()

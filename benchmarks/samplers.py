"""Sampler efficiency with trained flows: τ per gradient evaluation and per CPU second.

For each checkpoint the report's samplers run with the same settings (latent HMC, physical HMC,
the neural independence sampler, Swendsen-Wang; fixed chain lengths, no extension, so the
costs compare) and one table row per sampler gives the integrated autocorrelation time τ of |m|
and E, the cost of an effectively independent sample in evaluations (τ × evaluations per
sample) and in CPU seconds (τ × seconds per sample), and the verdict on its estimates:

    python benchmarks/samplers.py runs/eff/L4good/checkpoint.pt runs/eff/L8/checkpoint.pt \\
        runs/eff/L16/checkpoint.pt --threads 1
    python benchmarks/samplers.py CKPT --leapfrog 10 5 3 2     # latent HMC's trajectory length only
"""

from __future__ import annotations

import argparse
import math

import pandas as pd
import torch

from analysis.latent import latent_hmc, physical_hmc
from analysis.report import ReportSettings, compute_estimates, load_model


def leapfrog_sweep(ckpt: str, counts: list[int], n_samples: int = 200, n_chains: int = 16) -> pd.DataFrame:
    """Latent HMC with each leapfrog count (and physical HMC with 10) on one checkpoint, same seeds."""
    flow, target, _ = load_model(ckpt)
    rows = []
    for n in counts:
        r = latent_hmc(flow, target, n_chains=n_chains, n_samples=n_samples, n_leapfrog=n, n_warmup=100,
                       generator=torch.Generator().manual_seed(0))
        rows.append({"sampler": f"latent HMC, {n} leapfrog", "step": r.step_size, "acceptance": r.acceptance_rate,
                     "tau_abs_m": r.tau["abs_m"], "evals_per_indep_abs_m": r.effective_evals(),
                     "ms_per_indep_abs_m": 1e3 * r.effective_seconds(), "rhat_abs_m": r.rhat["abs_m"]})
    r = physical_hmc(target, n_chains=n_chains, n_samples=5 * n_samples, n_leapfrog=10, n_warmup=100,
                     generator=torch.Generator().manual_seed(0))
    rows.append({"sampler": "physical HMC, 10 leapfrog", "step": r.step_size, "acceptance": r.acceptance_rate,
                 "tau_abs_m": r.tau["abs_m"], "evals_per_indep_abs_m": r.effective_evals(),
                 "ms_per_indep_abs_m": 1e3 * r.effective_seconds(), "rhat_abs_m": r.rhat["abs_m"]})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--hmc-samples", type=int, default=300)
    p.add_argument("--hmc-chains", type=int, default=16)
    p.add_argument("--independence", type=int, default=4096)
    p.add_argument("--sw-sweeps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="CSV of the table")
    p.add_argument("--leapfrog", type=int, nargs="+", default=None,
                   help="only compare latent HMC trajectory lengths (leapfrog steps) on each checkpoint")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.leapfrog:
        for ckpt in args.checkpoints:
            print(ckpt)
            print(leapfrog_sweep(ckpt, args.leapfrog).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        return pd.DataFrame()
    settings = ReportSettings(hmc_samples=args.hmc_samples, hmc_chains=args.hmc_chains, chain_seconds=0.0,
                              independence=args.independence, sw_sweeps=args.sw_sweeps, rk4_check=0, plots=False,
                              verbose=False)
    rows = []
    for ckpt in args.checkpoints:
        flow, target, state = load_model(ckpt)
        res = compute_estimates(flow, target, settings)
        fe = res["flow"]
        err = fe.free_energy_variational.value - fe.exact["free_energy_hs"]
        for s in res["samplers"]:
            rows.append({"L": target.lattice.L, "flow F/N error": err, "ESS/B": fe.ess, "sampler": s["method"],
                         "acceptance": s["acceptance"], "tau_abs_m": s["tau_abs_m"], "tau_E": s["tau_energy"],
                         "evals_per_sample": s["evals_per_sample"], "ms_per_sample": 1e3 * s["seconds_per_sample"],
                         "evals_per_indep_abs_m": s["tau_abs_m"] * s["evals_per_sample"],
                         "ms_per_indep_abs_m": 1e3 * s["effective_seconds_abs_m"],
                         "reliable": s["reliable"], "reason": s["reason"]})
        print(f"{ckpt}: L={target.lattice.L}, F/N error {err:.2e}, ESS/B {fe.ess:.3f}", flush=True)
    table = pd.DataFrame(rows)
    if args.out:
        table.to_csv(args.out, index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 60):
        print(table.drop(columns=["reason"]).to_string(index=False, float_format=lambda v: f"{v:.3g}"
                                                       if math.isfinite(v) else "—"))
    return table


if __name__ == "__main__":
    main()

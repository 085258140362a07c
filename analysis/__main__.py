"""Command line: ``python -m analysis CHECKPOINT --out REPORT_DIR`` (see analysis/report.py).

Examples:
    python -m analysis runs/ising/checkpoint.pt --out runs/ising/report
    python -m analysis runs/ising/checkpoint.pt --out /tmp/r --samples 16384 --hmc-samples 1000
    python -m analysis runs/ising/checkpoint.pt --out /tmp/r --skip-hmc --sw-sweeps 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from latticeflow.cli import (checkpoint_file, fraction, int_at_least, nonnegative_float, nonnegative_int, positive_float,
                             positive_int, run_cli)
from latticeflow.distributed import setup_run

from .report import ReportSettings, run_report

_D = ReportSettings()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis", description="Physics report on a trained Ising or φ⁴ flow "
                                "(free energies, observables, HMC, independence sampler).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                usage="%(prog)s CHECKPOINT [flags]   (--help lists them)")
    p.add_argument("checkpoint", type=checkpoint_file, help="checkpoint.pt written by models/ising.py or models/phi4.py (or its run folder)")
    p.add_argument("--out", default=None, help="report folder (default: <checkpoint folder>/report)")
    p.add_argument("--samples", type=int_at_least(2), default=_D.samples, help="i.i.d. flow samples for F and observables")
    p.add_argument("--batch", type=positive_int, default=_D.batch, help="flow samples per call")
    p.add_argument("--hmc-samples", type=int_at_least(2), default=_D.hmc_samples, help="stored HMC iterations per chain")
    p.add_argument("--hmc-chains", type=positive_int, default=_D.hmc_chains, help="HMC chains")
    p.add_argument("--hmc-leapfrog", type=positive_int, default=_D.hmc_leapfrog,
                   help="leapfrog steps per trajectory of physical HMC")
    p.add_argument("--latent-leapfrog", type=positive_int, default=_D.latent_leapfrog,
                   help="leapfrog steps per trajectory of latent HMC (short trajectories are cheaper per "
                        "independent sample there)")
    p.add_argument("--hmc-warmup", type=nonnegative_int, default=_D.hmc_warmup, help="step-size adaptation iterations")
    p.add_argument("--target-accept", type=fraction, default=_D.target_accept, help="HMC acceptance aimed at")
    p.add_argument("--step-size", type=positive_float, default=_D.step_size, help="initial leapfrog step")
    p.add_argument("--skip-hmc", action="store_true", help="skip latent and physical HMC")
    p.add_argument("--skip-latent-hmc", action="store_true", help="skip latent HMC only (the costly one)")
    p.add_argument("--independence", type=nonnegative_int, default=_D.independence,
                   help="independence-sampler chain length (0: skip)")
    p.add_argument("--sw-sweeps", type=nonnegative_int, default=_D.sw_sweeps, help="Swendsen-Wang sweeps per chain (0: skip)")
    p.add_argument("--sw-chains", type=positive_int, default=_D.sw_chains, help="Swendsen-Wang chains")
    p.add_argument("--chain-seconds", type=nonnegative_float, default=_D.chain_seconds,
                   help="sampling-time budget per HMC sampler for running chains on until R-hat <= 1.01 and "
                        "n >= 50 tau (0: no extension)")
    p.add_argument("--rk4-check", type=nonnegative_int, default=_D.rk4_check,
                   help="flow samples whose integrated ln q is checked against the exact RK4-map density "
                        "(sets the free energies' systematic error; 0: skip)")
    p.add_argument("--seed", type=int, default=_D.seed)
    p.add_argument("--L", type=int_at_least(2), default=None, help="expected lattice size (error if the checkpoint differs)")
    p.add_argument("--dtype", default=_D.dtype, choices=["float64", "float32"], help="precision of the analysis")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the report; raises ValueError/FileNotFoundError on bad input (the CLI prints them)."""
    args = parse_args(argv)
    setup_run("cpu", args.threads, verbose=not args.quiet)
    if _kind(args.checkpoint) == "phi4":
        return _phi4(args)
    settings = ReportSettings(samples=args.samples, batch=args.batch, hmc_samples=args.hmc_samples,
                              hmc_chains=args.hmc_chains, hmc_leapfrog=args.hmc_leapfrog,
                              latent_leapfrog=args.latent_leapfrog, hmc_warmup=args.hmc_warmup,
                              target_accept=args.target_accept, step_size=args.step_size, skip_hmc=args.skip_hmc,
                              skip_latent_hmc=args.skip_latent_hmc,
                              independence=args.independence, sw_sweeps=args.sw_sweeps, sw_chains=args.sw_chains,
                              chain_seconds=args.chain_seconds, rk4_check=args.rk4_check, seed=args.seed, L=args.L,
                              dtype=args.dtype, plots=not args.no_plots,
                              verbose=not args.quiet)
    out = args.out if args.out is not None else Path(args.checkpoint).parent / "report"
    return run_report(args.checkpoint, out, settings)


def _kind(checkpoint: str) -> str | None:
    from latticeflow.checkpoint import checkpoint_kind, load_checkpoint

    try:
        return checkpoint_kind(load_checkpoint(Path(checkpoint), required=("model",)))
    except (ValueError, OSError):  # the Ising report names the problem with this file
        return None


def _phi4(args: argparse.Namespace) -> dict[str, Any]:
    """A φ⁴ checkpoint: flow estimates, neural MCMC and HMC for the same seconds (analysis/phi4_report.py);
    the Ising-only flags (Swendsen-Wang, latent HMC, the RK4 check, the chain extension) do not apply."""
    import torch

    from .phi4_report import run_phi4_report

    out = args.out if args.out is not None else Path(args.checkpoint).parent / "report"
    return run_phi4_report(args.checkpoint, out, samples=args.samples, batch=args.batch, hmc_chains=args.hmc_chains,
                           hmc_leapfrog=args.hmc_leapfrog, hmc_warmup=args.hmc_warmup,
                           target_accept=args.target_accept, skip_hmc=args.skip_hmc, seed=args.seed,
                           dtype=torch.float64 if args.dtype == "float64" else torch.float32, L=args.L,
                           verbose=not args.quiet)


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` for the shell: a bad value or checkpoint is one ``error:`` line and exit status 2."""
    return run_cli(main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())

"""Variational free energy of the 2D Ising model with a Monge-Ampère flow (paper section 4.2).

Trains a flow by reverse KL (eq. 7) against the Hubbard-Stratonovich energy of the L×L
Ising model and prints the variational F/N next to the exact (Kaufman) value. Writes
``log.csv``, ``checkpoint.pt``, ``config.json`` and ``convergence.png`` to ``--out``.

    python -m models.ising                         # built-in default, a few minutes on 2 cores
    python -m models.ising --paper                 # the paper's configuration (L=16, h=512, ...)
    python -m models.ising --L 16 --potential quadratic+mlp --epochs 3000
    python -m models.ising --resume runs/ising/checkpoint.pt
    python -m models.ising --L 8 --beta 0.30:0.60:16   # a sweep over β (latticeflow.sweep): sweep.csv, sweep.png
    torchrun --nproc_per_node=2 models/ising.py --L 8   # data-parallel over 2 processes

Data parallel (torchrun): ``--batch`` is the global batch; each of the W ranks draws
``batch / W`` samples with its own random stream (rank 0 with ``--seed`` itself, so one
process is the plain run; rank r with a seed derived from (seed, r)), DDP averages the
gradients, and F/N, its standard error and the ESS are computed over the gathered global
batch. Only rank 0 writes the log, checkpoints, config, summary and figure. A checkpoint
holds every rank's stream and resumes on any number of ranks (rank r continues its saved
stream if there is one, else starts a fresh one seeded from (seed, r, epoch)). A signal
(SIGINT/SIGTERM) or ``--max-minutes`` stops all ranks after the same epoch, with a checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (e.g. by torchrun): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latticeflow import distributed as dist
from latticeflow.build import make_trainer
from latticeflow.cli import add_run_arguments, checkpoint_file, nonnegative_int, positive_int, run_cli
from latticeflow.config import (ISING_DEFAULT, ISING_PAPER, IsingConfig, add_arguments, conflicts, given,
                                uncapped)
from latticeflow.runs import RunStart, provenance, write_json
from latticeflow.sweep import MANIFEST, BetaGrid, beta_or_grid

#: Files a run writes besides checkpoint, log, config and summary (removed by --force with them).
OUTPUTS = ("convergence.png", "convergence.pdf")
#: Config keys a resumed run may change; every other explicit flag must agree with the checkpoint.
RESUME_OVERRIDES = ("epochs", "max_rollbacks")


def build_parser() -> argparse.ArgumentParser:
    """The flags: the config's fields (generated from :class:`~latticeflow.config.IsingConfig`,
    defaulting to None so that the preset or the resumed checkpoint applies), then the run's."""
    p = argparse.ArgumentParser(prog="python -m models.ising", description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [flags]   (--help lists them)")
    p.add_argument("--paper", action="store_true", help="the paper's hyperparameters (appendix C) as the defaults")
    add_arguments(p, IsingConfig, {"model": "model (defaults: the built-in default; --paper: the paper's appendix C)",
                                   "training": "training"})
    _accept_beta_grids(p)
    s = p.add_argument_group("sweep (a β grid: --beta 0.30:0.60:16, or 0.3,0.4,critical)")
    s.add_argument("--warm-epochs", type=positive_int, default=None,
                   help="epochs of each β after the first, warm-started from the previous β [--epochs / 4]")
    s.add_argument("--cold-epochs", type=positive_int, default=None,
                   help="epochs of each warm-started β above β_c (the ordered phase, where the gap to exact "
                        "grows) [--warm-epochs]")
    s.add_argument("--cold-mixture", action="store_true", default=None,
                   help="train each β above β_c as the exact Z2 mixture of a flow without the Z2 symmetry "
                        "(twice the cost of an epoch): the flow carries the Gaussian to one magnetised mode "
                        "instead of tearing it in two [off]")
    s.add_argument("--samples", type=positive_int, default=None,
                   help="flow samples measured per β (free energies, U/N, C/N, ...) [4096]")
    s.add_argument("--max-samples", type=positive_int, default=None,
                   help="a β whose importance-weighted error bars fail the tail rules (Pareto k̂ of the "
                        "weights or of an estimate's own contributions) is measured again with this many "
                        "samples; equal to --samples: never [4 × --samples]")
    s.add_argument("--conditioned", type=nonnegative_int, default=None, metavar="DEGREE",
                   help="instead of one flow per β: one flow conditioned on β over the grid's range (a Legendre "
                        "series of this degree in β, each coefficient a potential of the configured family), "
                        "trained for --epochs on every β at once, then measured at each β [off]")
    s.add_argument("--step-check", type=positive_int, default=None,
                   help="measure each β's free energies again with every RK4 step split in this many, "
                        "the check that they are converged in the step (1: none) [2]")
    g = add_run_arguments(p, "ising", resume=_run_to_resume,
                          resume_help="continue the run of this checkpoint.pt (or run folder, or sweep folder)",
                          plot_help="skip the convergence figure")
    g.add_argument("--checkpoint-every", type=positive_int, default=100, help="epochs between checkpoints [100]")
    return p


def _accept_beta_grids(parser: argparse.ArgumentParser) -> None:
    """``--beta`` (generated from the config) also takes a grid, which makes the run a sweep."""
    action = next(a for a in parser._actions if a.dest == "beta")
    action.type = beta_or_grid
    action.help = action.help.replace(" [", "; or a grid for a sweep: start:stop:n, a comma list, both [", 1)


def _run_to_resume(text: str) -> Path:
    """``--resume``: a checkpoint (or run folder), or a sweep folder (its manifest)."""
    path = Path(text)
    if (path / MANIFEST).is_file():
        return path / MANIFEST
    if path.name == MANIFEST and path.is_file():
        return path
    return checkpoint_file(text)


def run_sweep(args: argparse.Namespace) -> dict:
    """The sweep of ``--beta GRID`` (or ``--resume SWEEP_FOLDER``): :func:`latticeflow.sweep.sweep`.

    Raises:
        ValueError: a bad value, an occupied folder, a resume with other settings (nothing written).
    """
    from latticeflow.runs import default_folder, link_latest
    from latticeflow.sweep import read_manifest, sweep

    grid = args.beta if isinstance(args.beta, BetaGrid) else None
    args.beta = None
    resume = args.resume is not None
    if resume:
        manifest = read_manifest(args.resume)
        if args.paper:
            raise ValueError("--paper chooses a model, and a resumed sweep keeps its own")
        base, flags = IsingConfig.from_dict(manifest["config"]), given(args, IsingConfig)
        new = base.replace(**flags)
        bad = [f"--{k.replace('_', '-')} {getattr(new, k)} (sweep: {getattr(base, k)})" for k in flags
               if getattr(new, k) != getattr(base, k)]
        if bad:
            raise ValueError(f"{', '.join(bad)}: a resumed sweep keeps its configuration ({args.resume})")
        config, out = None, args.resume.parent
        if args.out is not None and Path(args.out).resolve() != out.resolve():
            raise ValueError(f"a sweep resumes in its own folder {out}, not --out {args.out}")
    else:
        config = config_from_args(args)
        out = Path(args.out) if args.out else default_folder("ising-sweep")
    device = dist.setup_run(args.device, args.threads, args.tf32, verbose=not args.quiet)
    if dist.world_size() > 1:
        raise ValueError("a β sweep runs in one process; start it without torchrun")
    conditioned = args.conditioned is not None or (resume and manifest.get("method") == "conditioned")
    if conditioned:
        from latticeflow.conditioned import conditioned_sweep

        if (args.warm_epochs is not None or args.cold_epochs is not None or args.cold_mixture
                or args.max_samples is not None):
            raise ValueError("--warm-epochs, --cold-epochs, --cold-mixture and --max-samples belong to a "
                             "warm-started sweep, not to --conditioned")
        if resume and args.conditioned is not None and args.conditioned != manifest.get("degree"):
            raise ValueError(f"--conditioned {args.conditioned} (sweep: {manifest.get('degree')}): a resumed sweep "
                             f"keeps its configuration ({args.resume})")
        table = conditioned_sweep(config, grid, degree=args.conditioned, out=out, samples=args.samples,
                                  step_check=args.step_check, max_minutes=args.max_minutes, resume=resume,
                                  force=args.force, device=device, progress=not args.quiet, verbose=True,
                                  plot=not args.no_plot, checkpoint_every=args.checkpoint_every)
    else:
        if resume and args.conditioned is not None:
            raise ValueError(f"--conditioned: {args.resume} holds a warm-started sweep")
        table = sweep(config, grid, out=out, warm_epochs=args.warm_epochs, cold_epochs=args.cold_epochs,
                      cold_mixture=args.cold_mixture, samples=args.samples, max_samples=args.max_samples,
                      step_check=args.step_check, max_minutes=args.max_minutes, resume=resume, force=args.force,
                      device=device, progress=not args.quiet, verbose=True, plot=not args.no_plot,
                      checkpoint_every=args.checkpoint_every, make_trainer=make_trainer)
    if args.out is None and not resume:
        link_latest(out)
    reason = table.attrs["stop_reason"]
    written = [str(out / n) for n in ("sweep.csv", "sweep.png") if len(table) and (out / n).is_file()]
    print(f"{len(table.attrs['finished'])} of {len(table.attrs['betas'])} β measured in {table.attrs['wall_s']:.0f} s"
          + (f"; wrote {' and '.join(written)}" if written else ""))
    if reason == "signal":
        print(f"interrupted by signal {table.attrs['stop_signal']}; resume with: python -m models.ising --resume {out}",
              file=sys.stderr)
    elif reason == "time":
        print(f"stopped by the --max-minutes budget; continue with: python -m models.ising --resume {out}")
    return {"stop_reason": "epochs" if reason == "finished" else reason, "stop_signal": table.attrs["stop_signal"],
            "table": table}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def config_from_args(args: argparse.Namespace, base: dict | IsingConfig | None = None) -> IsingConfig:
    """The run's config: the preset (``--paper`` or the built-in default), or a resumed checkpoint's
    config ``base``, updated by the flags given explicitly.

    Raises:
        ValueError: an invalid value; on resume, a flag that conflicts with the checkpoint (only
            epochs may change).
    """
    flags = given(args, IsingConfig)
    if base is None:
        return (ISING_PAPER if args.paper else ISING_DEFAULT).replace(**uncapped(flags))
    base = base if isinstance(base, IsingConfig) else IsingConfig.from_dict(base)
    if args.paper:
        raise ValueError("--paper chooses a model, and a resumed run keeps the checkpoint's")
    problem = conflicts(base, flags, RESUME_OVERRIDES)
    if problem:
        raise ValueError(problem)
    return base.replace(**flags)


def summarize(log, target, window: int = 50) -> dict:
    """F/N over the last ``window`` epochs in both normalisations, against the exact values.

    An annealed run's log has a ``beta`` column: only its epochs at the target's β count (none, if the
    run stopped during the anneal: then the F/N is NaN).
    """
    if "beta" in log:
        log = log[log["beta"] == target.beta]
    last = log.iloc[-min(window, len(log)):]
    if not len(last):
        nan = float("nan")
        return {"free_energy_hs": nan, "free_energy_ising": nan, "stderr": nan, "exact_hs": target.exact_free_energy(),
                "exact_ising": target.to_ising_free_energy(target.exact_free_energy()), "error": nan, "ess": nan,
                "window": {"epochs": [0, 0], "n": 0, "statistic": f"no epoch at β = {target.beta:g} yet (annealing)"}}
    col = "free_energy_hs" if "free_energy_hs" in last else "free_energy"
    f_hs = float(last[col].mean())
    exact_hs = target.exact_free_energy()
    return {"free_energy_hs": f_hs, "free_energy_ising": target.to_ising_free_energy(f_hs),
            "stderr": float(last[col].std() / len(last) ** 0.5) if len(last) > 1 else float("nan"),
            "exact_hs": exact_hs, "exact_ising": target.to_ising_free_energy(exact_hs), "error": f_hs - exact_hs,
            "ess": float(last["ess"].mean()),
            "window": {"epochs": [int(last["epoch"].iloc[0]), int(last["epoch"].iloc[-1])], "n": len(last),
                       "statistic": "mean of the per-epoch batch means; stderr = their std / sqrt(n)"},
            "normalisation": "per site; hs: -ln Z_HS/N of the Hubbard-Stratonovich density (the variational "
                             "loss), ising: -ln Z_Ising/N of the spin model (paper appendix B)"}


def main(argv: list[str] | None = None) -> dict:
    """Train (or resume) one run; returns its summary (with ``stop_reason`` and ``stop_signal``).

    Raises:
        ValueError: a bad value, an occupied output folder, a checkpoint of another kind or a
            conflicting flag on resume (nothing is written then).
        TrainingDiverged: the run diverged (log and a good checkpoint are kept).
    """
    args = build_parser().parse_args(argv)
    if isinstance(args.beta, BetaGrid) or (args.resume is not None and args.resume.name == MANIFEST):
        return run_sweep(args)
    sweep_only = ("warm_epochs", "cold_epochs", "cold_mixture", "samples", "max_samples", "step_check",
                  "conditioned")
    if any(getattr(args, k) is not None for k in sweep_only):
        raise ValueError("--warm-epochs, --cold-epochs, --cold-mixture, --samples, --max-samples, --step-check and "
                         "--conditioned belong to a sweep: give --beta a grid (e.g. 0.3:0.6:8)")
    run = RunStart("ising", out=args.out, resume=args.resume, force=args.force, outputs=OUTPUTS)
    out = run.out
    config = config_from_args(args, run.base)
    run.check_epochs(config.epochs)
    device = dist.setup_run(args.device, args.threads, args.tf32, verbose=not args.quiet)
    trainer, target = make_trainer(config, device, str(out), progress=not args.quiet,
                                   checkpoint_every=args.checkpoint_every)
    if args.resume:
        trainer.load(args.resume)
    exact = target.exact_free_energy()
    run.claim()  # set-up succeeded: only now is anything written
    try:
        if dist.is_main():
            write_json(out / "config.json", config.to_dict())
            print(f"Ising L={config['L']} beta={target.beta:.10f}{' (critical)' if config['beta_name'] else ''}: "
                  f"N={target.N}, alpha={target.alpha:.6f}; exact -ln Z/N = {exact:.10f} (HS), "
                  f"{target.to_ising_free_energy(exact):.10f} (Ising); potential {config['potential']}, "
                  f"{sum(p.numel() for p in trainer.flow.parameters())} parameters, {dist.world_size()} process(es)"
                  + (f"; resumed at epoch {trainer.epoch}" if args.resume else "") + f"; writing to {out}")
        t0 = time.perf_counter()
        log = trainer.fit(config["epochs"], max_minutes=args.max_minutes)
        wall = time.perf_counter() - t0
        summary = {"epochs": int(log["epoch"].iloc[-1]) if len(log) else 0, "stop_reason": trainer.stop_reason,
                   "stop_signal": trainer.stop_signal, "wall_s": wall, "rollbacks": trainer.rollbacks,
                   **summarize(log, target),
                   "provenance": provenance(device)}
        if dist.is_main():
            print(f"F/N (mean of epochs {summary['window']['epochs'][0]}-{summary['window']['epochs'][1]}) = "
                  f"{summary['free_energy_hs']:.6f} ± {summary['stderr']:.6f} (HS; exact {exact:.6f}, error "
                  f"{summary['error']:.2e}) = {summary['free_energy_ising']:.6f} (Ising; exact "
                  f"{summary['exact_ising']:.6f});  ESS = {summary['ess']:.3f}  ({summary['epochs']} epochs, {wall:.0f} s)")
            run.warn_if_bound_broken(summary["error"], summary["stderr"])
            write_json(out / "summary.json", summary)
            if not args.no_plot:
                from analysis.plots import plot_convergence

                path = plot_convergence(log, exact, out / "convergence.png", title=f"Ising L={config['L']}, β = {target.beta:.6g}",
                                        exact_label="exact (Kaufman, finite L)")
                print(f"wrote {path}")
            run.say_how_it_ended(trainer, args.max_minutes)
    finally:
        run.release()
    dist.cleanup()
    return summary


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` for the shell; the exit status as in :mod:`latticeflow.cli`."""
    return run_cli(main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())

"""Variational free energy of the 2D Ising model with a Monge-Ampère flow (paper section 4.2).

Trains a flow by reverse KL (eq. 7) against the Hubbard-Stratonovich energy of the L×L
Ising model and prints the variational F/N next to the exact (Kaufman) value. Writes
``log.csv``, ``checkpoint.pt``, ``config.json`` and ``convergence.png`` to ``--out``.

    python -m models.ising                         # built-in default, a few minutes on 2 cores
    python -m models.ising --paper                 # the paper's configuration (L=16, h=512, ...)
    python -m models.ising --L 16 --potential quadratic+mlp --epochs 3000
    python -m models.ising --resume runs/ising/checkpoint.pt
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
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script (e.g. by torchrun): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from latticeflow import distributed as dist
from latticeflow import ising
from latticeflow.build import build_flow
from latticeflow.cli import checkpoint_file, positive_float, positive_int, run_cli
from latticeflow.config import ISING_DEFAULT, ISING_PAPER, IsingConfig, add_arguments, conflicts, given
from latticeflow.runs import RunStart, provenance, write_json
from latticeflow.train import VariationalTrainer, cosine_schedule

#: Files a run writes besides checkpoint, log, config and summary (removed by --force with them).
OUTPUTS = ("convergence.png", "convergence.pdf")
#: Config keys a resumed run may change; every other explicit flag must agree with the checkpoint.
RESUME_OVERRIDES = ("epochs",)
# the largest RK4 step measured to keep the variational bound (README, Results: 0.2 broke it at L=4)
MAX_SAFE_STEP = 0.1


def build_parser() -> argparse.ArgumentParser:
    """The flags: the config's fields (generated from :class:`~latticeflow.config.IsingConfig`,
    defaulting to None so that the preset or the resumed checkpoint applies), then the run's."""
    p = argparse.ArgumentParser(prog="python -m models.ising", description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [flags]   (--help lists them)")
    p.add_argument("--paper", action="store_true", help="the paper's hyperparameters (appendix C) as the defaults")
    add_arguments(p, IsingConfig, {"model": "model (defaults: the built-in default; --paper: the paper's appendix C)",
                                   "training": "training"})
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder [a new runs/ising/<date>-<time>, linked as "
                                               "runs/ising/latest; with --resume: the checkpoint's folder]")
    g.add_argument("--resume", type=checkpoint_file, default=None,
                   help="continue the run of this checkpoint.pt (or run folder)")
    g.add_argument("--force", action="store_true", help="replace the run already in --out (its files are deleted)")
    g.add_argument("--max-minutes", type=positive_float, default=None, help="wall-clock budget (exit status 0)")
    g.add_argument("--checkpoint-every", type=positive_int, default=100, help="epochs between checkpoints [100]")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:k [auto]")
    g.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on GPUs")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads [chosen from the idle CPUs, printed at start]")
    g.add_argument("--no-plot", action="store_true", help="skip the convergence figure")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


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
        return (ISING_PAPER if args.paper else ISING_DEFAULT).replace(**flags)
    base = base if isinstance(base, IsingConfig) else IsingConfig.from_dict(base)
    if args.paper:
        raise ValueError("--paper chooses a model, and a resumed run keeps the checkpoint's")
    problem = conflicts(base, flags, RESUME_OVERRIDES)
    if problem:
        raise ValueError(problem)
    return base.replace(**flags)


def make_trainer(config: IsingConfig | dict, device: torch.device, out_dir: str | None, progress: bool = True,
                 checkpoint_every: int = 100) -> tuple[VariationalTrainer, object]:
    """Target, flow, optimiser, schedule and trainer for a config (an IsingConfig or its dict)."""
    config = config if isinstance(config, IsingConfig) else IsingConfig.from_dict(config)
    target = ising(config["L"], config["beta"], J=config["J"])
    if float(config["step_size"]) > MAX_SAFE_STEP:
        warnings.warn(f"RK4 step {config['step_size']} > {MAX_SAFE_STEP}: the integrated ln p may be too inaccurate "
                      "for a variational bound, and training exploits that (at L=4, steps of 0.2 gave an F/N "
                      "2e-2 below the exact value; README, Results)", stacklevel=2)
    torch.manual_seed(config["seed"])
    flow = build_flow(config, target.lattice).to(device)
    # DDP(SampleModule(flow)) under torchrun, so that DDP averages the gradients of the draws
    model = dist.wrap_sampler(flow, device)
    opt = torch.optim.Adam(flow.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    sched = cosine_schedule(opt, config["epochs"], warmup=config["warmup"]) if config["schedule"] == "cosine" else None
    gen = dist.rank_generator(config["seed"], device)  # rank 0: seed itself; rank r: from (seed, r)
    trainer = VariationalTrainer(model, target, opt, batch_size=config["batch"], scheduler=sched, config=config.to_dict(),
                                 grad_clip=config.get("grad_clip"),
                                 out_dir=out_dir, generator=gen, progress=progress, checkpoint_every=checkpoint_every,
                                 seed=config["seed"], kind="ising")
    return trainer, target


def summarize(log, target, window: int = 50) -> dict:
    """F/N over the last ``window`` epochs in both normalisations, against the exact values."""
    last = log.iloc[-min(window, len(log)):]
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
                   "stop_signal": trainer.stop_signal, "wall_s": wall, **summarize(log, target),
                   "provenance": provenance(device)}
        if dist.is_main():
            print(f"F/N (mean of epochs {summary['window']['epochs'][0]}-{summary['window']['epochs'][1]}) = "
                  f"{summary['free_energy_hs']:.6f} ± {summary['stderr']:.6f} (HS; exact {exact:.6f}, error "
                  f"{summary['error']:.2e}) = {summary['free_energy_ising']:.6f} (Ising; exact "
                  f"{summary['exact_ising']:.6f});  ESS = {summary['ess']:.3f}  ({summary['epochs']} epochs, {wall:.0f} s)")
            if summary["error"] < -3 * summary["stderr"]:
                print("warning: F/N lies below the exact value by more than 3 standard errors: the variational "
                      "bound is broken (RK4 steps too coarse?); do not use this number", file=sys.stderr)
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

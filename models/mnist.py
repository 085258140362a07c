"""Density estimation of MNIST with a Monge-Ampère flow (paper section 4.1, Fig. 3, Table 1).

Turns the flags into an :class:`~latticeflow.mnist.MNISTConfig` (whose defaults are the paper's
configuration: softplus MLP potential with h = 1024, 100 RK4 steps of 0.1, batch 100, Adam
1e-3, early stopping with patience 30), trains with :class:`~latticeflow.mnist.DensityTrainer`
by maximum likelihood (eq. 6) under MAF's protocol (50,000 / 10,000 / 10,000 images, fresh
dequantisation noise every epoch, logit transform with λ = 1e-6), and reports the test NLL of
the best validation epoch in nats in logit space (the paper's Table 1 convention) and in
bits/dim in pixel space. ``--whiten`` (not in the paper) puts the Gaussian baseline's exact
affine whitening in front of the flow (:class:`~latticeflow.mnist.AffineFlow`), so training
starts at the full-covariance Gaussian instead of N(0, I). ``--potential mlp+sitewise`` (not in
the paper) adds a separable per-pixel potential (:class:`~latticeflow.potentials.SitewisePotential`)
that transports each pixel's marginal; with the whitening it is the fast CPU recipe of the README's
MNIST race (``benchmarks/mnist_race.py``).

Outputs in ``--out``: ``log.csv`` (per epoch: train / validation / test NLL in nats and
bits/dim with standard errors), ``checkpoint.pt`` (every epoch, exact resume), ``best.pt``,
``config.json``, ``summary.json`` and the figures ``samples``, ``gaussianization`` (Fig. 3b)
and ``nll`` (Fig. 3a), each as PNG and PDF.

    python -m models.mnist                                  # paper configuration (days on a CPU)
    python -m models.mnist --n-train 2000 --n-eval 500 --hidden 128 --n-steps 20 --step-size 0.5
    python -m models.mnist --whiten --n-train 2000 --n-eval 500 --hidden 128 --n-steps 20 --step-size 0.5
    python -m models.mnist --whiten --potential mlp+sitewise --hidden 256 --n-steps 20 --step-size 0.5 --lr 1e-2
    python -m models.mnist --resume runs/mnist/checkpoint.pt
    torchrun --nproc_per_node=8 models/mnist.py --device cuda --tf32   # data parallel

On a CPU shared with other busy processes use ``--threads 1``: torch's threads wait for each
other at every one of the thousands of small parallel regions of an iteration, and a descheduled
thread stalls them all (measured here: 70x slower with 2 threads on 2 busy cores).

An interruption (SIGINT/SIGTERM, ``--max-minutes``) in the middle of an epoch ends that epoch
early (its row records how many training images it saw), evaluates, checkpoints and stops;
resuming starts the next epoch. Resuming from an epoch boundary reproduces an uninterrupted run
exactly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script (e.g. by torchrun): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from latticeflow import distributed as dist  # noqa: E402
from latticeflow.cli import add_run_arguments, positive_int, run_cli  # noqa: E402
from latticeflow.config import add_arguments, given  # noqa: E402
from latticeflow.mnist import (  # noqa: E402
    MNIST_PAPER,
    PAPER_TEST_NLL,
    DensityTrainer,
    MNISTConfig,
    MNISTData,
    as_config,
    inner_flow,
    load_data,
    make_trainer,
)
from latticeflow.mnist.config import resume_conflicts  # noqa: E402
from latticeflow.runs import RunStart, provenance, write_json  # noqa: E402

__all__ = ["OUTPUTS", "RESUME_OVERRIDES", "build_parser", "cli", "config_from_args", "main", "parse_args"]

#: Keys a resumed run may change; any other explicit flag must agree with the checkpoint.
RESUME_OVERRIDES = ("epochs", "patience", "eval_batch", "grad_checkpoint")
#: Files a run writes besides checkpoint, log, config and summary (removed by --force with them).
OUTPUTS = ("best.pt", *(f"{name}.{ext}" for name in ("samples", "gaussianization", "nll") for ext in ("png", "pdf")))


# ---------------------------------------------------------------------------------------------
# Flags → config
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The flags: the config's fields (generated from :class:`~latticeflow.mnist.MNISTConfig`, defaulting
    to None so that the paper's configuration or the resumed checkpoint's applies), then the run's."""
    p = argparse.ArgumentParser(prog="python -m models.mnist", description=__doc__.split("\n\n")[0])
    titles = {"model": "model (defaults: the paper's configuration)", "training": "training", "data": "data"}
    add_arguments(p, MNISTConfig, titles)
    groups = {g.title: g for g in p._action_groups}
    groups[titles["model"]].add_argument("--layers", dest="conv_layers", type=int, choices=(1, 2), default=None,
                                         help="the old name of --conv-layers")
    groups[titles["data"]].add_argument("--data-dir", default=None,
                                        help="folder with the IDX files [data/, then ../shared/data/mnist]")
    g = add_run_arguments(p, "mnist", budget_help="wall-clock budget (ends the epoch in progress)")
    g.add_argument("--n-samples", type=positive_int, default=100, help="generated images in the samples figure [100]")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def config_from_args(args: argparse.Namespace, base: MNISTConfig | dict[str, Any] | None = None) -> MNISTConfig:
    """The run's config: the paper's (:data:`~latticeflow.mnist.MNIST_PAPER`), or a resumed checkpoint's
    config ``base``, updated by the flags given explicitly (``--patience 0``: None, no early stopping).

    On resume only :data:`RESUME_OVERRIDES` may differ from the checkpoint.

    Raises:
        ValueError: an invalid value, or a resumed run given a conflicting model flag.
    """
    flags = given(args, MNISTConfig)
    if flags.get("patience") == 0:
        flags["patience"] = None
    if base is None:
        return MNIST_PAPER.replace(**flags)
    base = as_config(base)
    problem = resume_conflicts(base, flags, RESUME_OVERRIDES)
    if problem:
        raise ValueError(problem)
    return base.replace(**{k: v for k, v in flags.items() if k in RESUME_OVERRIDES})


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, evaluate the best model on the test set, and draw the figures.

    Returns:
        summary: test NLL and bits/dim of the best model (± standard errors), epochs, timings.

    Raises:
        FileNotFoundError: no MNIST files (the message says where it looked and how to get them).
        MNISTFormatError, CheckpointError, ValueError: bad data, checkpoint or flags.
    """
    args = parse_args(argv)
    run = RunStart("mnist", out=args.out, resume=args.resume, force=args.force, outputs=OUTPUTS)
    out = run.out
    config = config_from_args(args, run.base)
    run.check_epochs(config.epochs)
    device = dist.setup_run(args.device, args.threads, args.tf32, verbose=not args.quiet)
    data = load_data(args.data_dir, config)
    # on resume the whitening buffers come from the checkpoint: no fit
    trainer = make_trainer(config, data, device, out, progress=not args.quiet, fit=not args.resume)
    if args.resume:
        trainer.load(args.resume)
    run.claim()  # set-up succeeded: only now is anything written
    try:
        return _train(args, config, data, trainer, device, run)
    finally:
        run.release()


def _format_result(name: str, stats: dict[str, float]) -> str:
    return (f"{name}: NLL = {stats['nll']:.1f} ± {stats['nll_stderr']:.1f} nats (logit space), "
            f"{stats['bpd']:.4f} ± {stats['bpd_stderr']:.4f} bits/dim  ({int(stats['images'])} images)")


def _train(args: argparse.Namespace, config: MNISTConfig, data: MNISTData, trainer: DensityTrainer,
           device: torch.device, run: RunStart) -> dict[str, Any]:
    out = run.out
    flow = trainer.flow
    n_params = sum(p.numel() for p in flow.parameters())
    if dist.is_main():
        write_json(out / "config.json", {**config.to_dict(), "data_dir": str(data.directory)})
        print(f"MNIST from {data.directory}: {len(data.train)} / {len(data.validation)} / {len(data.test)} "
              f"train / validation / test images of {data.image_shape[0]}x{data.image_shape[1]}")
        print(f"Monge-Ampère flow{' behind the Gaussian-baseline whitening' if config.whiten else ''}: "
              f"{config.potential} potential ({n_params} parameters), {config.n_steps} RK4 "
              f"steps of {config.step_size} (T = {inner_flow(flow).total_time:g}), batch {config.batch}, "
              f"lr {config.lr}, {config.dtype}, grad checkpoint {config.grad_checkpoint}, {device}, "
              f"{dist.world_size()} process(es)" + (f"; resumed at epoch {trainer.epoch}" if args.resume else ""))
    t0 = time.perf_counter()
    log = trainer.fit(config.epochs, max_minutes=args.max_minutes)
    wall = time.perf_counter() - t0
    # the best model by validation NLL, as in the paper's protocol; its epoch's row already holds
    # its test and validation numbers (same weights, same fixed noise), so no second evaluation
    row = trainer.best_record()
    trainer.restore_best()
    keys = ("nll", "nll_stderr", "bpd", "bpd_stderr", "images")
    test = {k: float(row[f"test_{k}"]) for k in keys}
    validation = {k: float(row[f"validation_{k}"]) for k in keys}
    summary = {"best_epoch": int(row["epoch"]), "epochs": trainer.epoch, "stop_reason": trainer.stop_reason,
               "stop_signal": trainer.stop_signal, "wall_s": wall, "parameters": n_params,
               "normalisation": "test_nll/validation_nll: nats per image in logit space (paper Table 1); "
                                "bpd: bits per pixel in pixel space [0, 256)",
               **{f"test_{k}": v for k, v in test.items()}, **{f"validation_{k}": v for k, v in validation.items()}}
    if dist.is_main():
        print(f"stopped: {trainer.stop_reason} after epoch {summary['epochs']} ({wall:.0f} s); "
              f"best validation epoch {summary['best_epoch']}")
        print(_format_result("validation", validation))
        print(_format_result("test      ", test))
        print("paper Table 1 (test NLL, nats, logit space): "
              + ", ".join(f"{k} {m} ± {e}" for k, (m, e) in PAPER_TEST_NLL.items()))
        write_json(out / "summary.json", {**summary, "provenance": provenance(device)})
        if not args.no_plot:
            from analysis.mnist_plots import make_figures

            test_y, _ = trainer.eval_sets["test"].fixed()
            reference = PAPER_TEST_NLL if data.dim == 784 else None
            for path in make_figures(flow, log, test_y, out, data.image_shape, n_samples=args.n_samples,
                                     seed=config.seed, reference=reference):
                print(f"wrote {path} (+ .pdf)")
        run.say_how_it_ended(trainer, args.max_minutes)
    dist.cleanup()
    return summary


def cli(argv: Sequence[str] | None = None) -> int:
    """:func:`main` for the shell; the exit status as in :mod:`latticeflow.cli` (user errors: one
    ``error:`` line and status 2; divergence 1; SIGINT 130, SIGTERM 143)."""
    return run_cli(main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())

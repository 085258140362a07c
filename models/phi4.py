"""Variational φ⁴ field theory with a Monge-Ampère flow, and neural MCMC with the trained flow.

Trains a flow by reverse KL (eq. 7 of Zhang, E & Wang, arXiv:1809.10188) against the φ⁴ action
on the periodic L×L lattice (:mod:`latticeflow.phi4`), prints the variational F/N (against the
exact value for the free theory, λ = 0), then runs independence Metropolis with the flow as the
proposal (Albergo, Kanwar & Shanahan, arXiv:1904.12072) and prints its acceptance rate and the
observables. Writes ``log.csv``, ``checkpoint.pt``, ``config.json``, ``summary.json`` and
``convergence.png`` to ``--out``.

    python -m models.phi4                                   # L=6, m²=−4, λ=6.975 (the standard point)
    python -m models.phi4 --L 4 --m2 1 --lam 0              # the free theory: F/N against the exact value
    python -m models.phi4 --L 8 --kappa 0.2 --lam-tilde 0.5 # the hopping form
    python -m models.phi4 --resume runs/phi4/latest --epochs 3000

One process (no torchrun). Exit statuses as ``python -m models.ising``: 0 finished (or stopped by
--max-minutes), 1 diverged, 2 a user error (one ``error:`` line, nothing written), 130/143 after SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from latticeflow import distributed as dist
from latticeflow.build import make_trainer as build_make_trainer
from latticeflow.cli import add_run_arguments, positive_int, run_cli
from latticeflow.config import add_arguments, conflicts, given, uncapped
from analysis.phi4_report import SCALARS, describe, flow_estimates, propagator_deviation, reference
from latticeflow.phi4 import Phi4
from latticeflow.phi4_config import PHI4_DEFAULT, Phi4Config
from latticeflow.runs import RunStart, provenance, write_json
from latticeflow.train import VariationalTrainer

OUTPUTS = ("convergence.png", "convergence.pdf")
RESUME_OVERRIDES = ("epochs",)


def build_parser() -> argparse.ArgumentParser:
    """The flags: :class:`~latticeflow.phi4_config.Phi4Config`'s fields, then the run's."""
    p = argparse.ArgumentParser(prog="python -m models.phi4", description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [flags]   (--help lists them)")
    add_arguments(p, Phi4Config, {"model": "model (target and flow)", "training": "training"})
    g = add_run_arguments(p, "phi4", plot_help="skip the convergence figure")
    g.add_argument("--checkpoint-every", type=positive_int, default=100, help="epochs between checkpoints [100]")
    g.add_argument("--mcmc-samples", type=positive_int, default=8192,
                   help="proposals of the neural MCMC chain after training [8192]")
    return p


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> Phi4Config:
    """The default updated by the explicit flags, or on resume the checkpoint's config (only --epochs may change).

    Raises:
        ValueError: an invalid value or a conflicting flag on resume.
    """
    flags = given(args, Phi4Config)
    if base is None:
        return PHI4_DEFAULT.replace(**uncapped(flags))
    cfg = Phi4Config.from_dict(base)
    problem = conflicts(cfg, flags, RESUME_OVERRIDES)
    if problem:
        raise ValueError(problem)
    return cfg.replace(**flags)


def make_trainer(config: Phi4Config, device: torch.device, out_dir: str | None, progress: bool = True,
                 checkpoint_every: int = 100) -> tuple[VariationalTrainer, Phi4]:
    """Target, flow, Adam, schedule and trainer: the library's :func:`~latticeflow.build.make_trainer`
    with the φ⁴ target and the config's flow and training fields (``max_rollbacks`` recoveries from a
    divergence, as for Ising)."""
    return build_make_trainer(config.flow_config(), device, out_dir, progress, checkpoint_every,
                              target=config.target(), kind="phi4", saved_config=config.to_dict())


def _scalars(obs: dict) -> dict:
    return {k: obs[k] for k in SCALARS} | {k + "_err": obs[k + "_err"] for k in SCALARS} | {"ess": obs["ess"]}


def sample_summary(est: dict) -> dict:
    """The summary.json entry of :func:`analysis.phi4_report.flow_estimates`: neural MCMC (acceptance, τ of |m|
    and m²), the importance-weighted F/N with its error and the weights' verdict, the observables."""
    mc, w, imp = est["mcmc"], est["weights"], est["importance"]
    out = {"acceptance": mc["acceptance"], "n": est["n"], "wall_s": est["seconds"],
           "tau_abs_m": mc["tau_abs_m"], "tau_m2": mc["tau_m2"],
           "free_energy_variational": est["variational"].value, "free_energy_variational_err": est["variational"].stderr,
           "free_energy_reweighted": imp.value, "free_energy_reweighted_err": imp.stderr,
           "weights": {"kish_ess": w.ess / w.n, "pareto_k": w.pareto_k, "reliable": w.verdict.reliable,
                       "reason": w.verdict.reason},
           "chain": _scalars(est["chain"]), "reweighted": _scalars(est["reweighted"])}
    if est["exact"] is not None:
        out["exact"] = {k: est["exact"][k] for k in (*SCALARS, "free_energy")}
        out["propagator"] = propagator_deviation(est)
    return out


def summarize(log, target: Phi4, window: int = 50) -> dict:
    """F/N over the last ``window`` epochs in the target's own normalisation, against the exact value (λ = 0)."""
    last = log.iloc[-min(window, len(log)):]
    col = next(c for c in last.columns if c.startswith("free_energy"))
    f = float(last[col].mean())
    try:
        exact = target.exact_free_energy()
    except ValueError:
        exact = None
    return {"free_energy": f, "stderr": float(last[col].std() / len(last) ** 0.5) if len(last) > 1 else float("nan"),
            "exact": exact, "error": None if exact is None else f - exact, "ess": float(last["ess"].mean()),
            "normalisation": f"per site, -ln Z/N of the {target.form} form",
            "window": {"epochs": [int(last["epoch"].iloc[0]), int(last["epoch"].iloc[-1])], "n": len(last)}}


def main(argv: list[str] | None = None) -> dict:
    """Train (or resume) one run, then run neural MCMC; returns the summary.

    Raises:
        ValueError: a bad value, an occupied output folder, a foreign checkpoint or a conflicting flag
            (nothing is written then).
        TrainingDiverged: the run diverged (log and a good checkpoint are kept).
    """
    args = build_parser().parse_args(argv)
    if args.resume is None:
        config_from_args(args)  # bad values fail before the output folder is even looked at
    run = RunStart("phi4", out=args.out, resume=args.resume, force=args.force, outputs=OUTPUTS)
    out = run.out
    config = config_from_args(args, run.base)
    run.check_epochs(config.epochs)
    device = dist.setup_run(args.device, args.threads, args.tf32, verbose=not args.quiet)
    trainer, target = make_trainer(config, device, str(out), progress=not args.quiet,
                                   checkpoint_every=args.checkpoint_every)
    if args.resume:
        trainer.load(args.resume)
    summary0 = {"exact": None}
    try:
        summary0["exact"] = target.exact_free_energy()
    except ValueError:
        pass
    run.claim()  # set-up succeeded: only now is anything written
    try:
        write_json(out / "config.json", config.to_dict())
        exact = summary0["exact"]
        print(f"phi4 {target!r} (kappa={target.kappa:.6g}, lam_tilde={target.lam_tilde:.6g}): N={target.N}; "
              + (f"exact -ln Z/N = {exact:.10f}" if exact is not None else "no exact ln Z (lam > 0)")
              + f"; potential {config.potential}, {sum(p.numel() for p in trainer.flow.parameters())} parameters"
              + (f"; resumed at epoch {trainer.epoch}" if args.resume else "") + f"; writing to {out}")
        t0 = time.perf_counter()
        log = trainer.fit(config.epochs, max_minutes=args.max_minutes)
        wall = time.perf_counter() - t0
        summary = {"epochs": int(log["epoch"].iloc[-1]) if len(log) else 0, "stop_reason": trainer.stop_reason,
                   "stop_signal": trainer.stop_signal, "wall_s": wall, **summarize(log, target)}
        err = "" if exact is None else f"; exact {exact:.6f}, error {summary['error']:.2e}"
        print(f"F/N (mean of epochs {summary['window']['epochs'][0]}-{summary['window']['epochs'][1]}) = "
              f"{summary['free_energy']:.6f} ± {summary['stderr']:.6f}{err};  ESS = {summary['ess']:.3f}  "
              f"({summary['epochs']} epochs, {wall:.0f} s)")
        run.warn_if_bound_broken(summary["error"] if exact is not None else None, summary["stderr"])
        if trainer.stop_reason in (None, "done", "time", "epochs"):
            gen = torch.Generator(device=device).manual_seed(config.seed + 1)
            est = flow_estimates(trainer.flow, target, args.mcmc_samples, config.batch_size, gen,
                                 seed=config.seed + 2)
            summary["neural_mcmc"] = sample_summary(est)
            for line in describe(est, ref=reference(target)):
                print(line)
        summary["provenance"] = provenance(device)
        write_json(out / "summary.json", summary)
        if not args.no_plot:
            from analysis.plots import plot_convergence

            col = next(c for c in log.columns if c.startswith("free_energy"))
            plog = log.rename(columns={col: "free_energy_hs"}) if col != "free_energy_hs" else log
            path = plot_convergence(plog, exact, out / "convergence.png", title=f"phi4 {target!r}",
                                    exact_label="exact (free theory)")
            print(f"wrote {path}")
        run.say_how_it_ended(trainer, args.max_minutes)
    finally:
        run.release()
    return summary


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` for the shell; the exit status as in :mod:`latticeflow.cli`."""
    return run_cli(main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())

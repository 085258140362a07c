r"""A physics report on a trained Ising flow: free energies, observables, samplers, figures.

Given a checkpoint written by ``models/ising.py`` this module rebuilds the flow and the
target (``config`` → ``ising(L, beta, J)`` and :func:`latticeflow.build.build_flow`), then
computes, next to the exact values (Kaufman; enumeration for N <= 16):

* from i.i.d. flow samples (:func:`analysis.latent.flow_estimates`): the variational F/N
  (eq. 7), the importance-sampled −ln Z/N (HS and Ising normalisation), the effective
  sample size, and observables plain and importance-reweighted;
* Markov chains: latent-space HMC, HMC on the HS field, the neural independence sampler
  (:mod:`analysis.latent`) and a Swendsen-Wang baseline (:mod:`analysis.wolff`), with
  acceptance, integrated autocorrelation times and the cost of an effectively independent
  sample (τ × seconds per sample), hence the speed-up of latent over physical HMC.

It writes ``estimates.csv`` (quantity, method, value, stderr, exact, deviation in σ),
``samplers.csv``, ``report.md`` and figures (PNG and PDF). Command line:

    python -m analysis runs/ising/checkpoint.pt --out runs/ising/report [--samples 4096]
        [--hmc-samples 300] [--skip-hmc] [--seed 0]

References: Zhang, E & Wang, "Monge-Ampère Flow for Generative Modeling", arXiv:1809.10188
(section 4.2); Li & Wang, "Neural Network Renormalization Group", arXiv:1802.02840.
"""

from __future__ import annotations

import csv
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from latticeflow import ising
from latticeflow._checks import check_choice, check_fraction, check_positive, check_size
from latticeflow.build import build_flow
from latticeflow.checkpoint import CheckpointError, check_kind, checkpoint_kind, load_checkpoint
from latticeflow.flow import Flow
from latticeflow.ising import IsingHS

from .diagnostics import BOUND, PLAIN, Verdict, chain_verdict, split_rhat
from .free_energy import Estimate, format_with_error
from .latent import (
    ChainResult,
    FlowEstimates,
    flow_estimates,
    integration_error,
    target_side_free_energy,
    latent_hmc,
    neural_independence_sampler,
    physical_hmc,
    quiet_integrated_time,
    speedup,
)

__all__ = ["ReportSettings", "compute_estimates", "estimate_rows", "load_model", "render_markdown", "run_report", "write_csv"]

OBSERVABLES = ("energy", "specific_heat", "abs_m", "m2", "binder", "susceptibility")
LABELS = {
    "free_energy_hs": "−ln Z_HS / N",
    "free_energy_ising": "−ln Z_Ising / N",
    "ess": "ESS / B",
    "energy": "U / N",
    "specific_heat": "C / N",
    "abs_m": r"⟨\|m\|⟩",  # pipes escaped: they would split a Markdown table cell
    "m2": "⟨m²⟩",
    "binder": "Binder U₄",
    "susceptibility": r"χ = βN(⟨m²⟩ − ⟨\|m\|⟩²)",
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
CSV_COLUMNS = ("quantity", "method", "value", "stderr", "systematic", "exact", "deviation_sigma", "reliable",
               "reason")
CROSS_CHECK_SIGMA = 3.0  # flow-side and target-side −ln Z/N must agree within this (see compute_estimates)


# ---------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ReportSettings:
    """What to compute; validated on construction (ValueError quoting the bad value).

    Attributes:
        samples: i.i.d. flow samples for the free energies and observables, >= 2.
        batch: flow samples per call, >= 1.
        hmc_samples: stored HMC iterations per chain, >= 2.
        hmc_chains: HMC chains, >= 1.
        hmc_leapfrog: leapfrog steps per trajectory of physical HMC, >= 1.
        latent_leapfrog: leapfrog steps per trajectory of latent HMC, >= 1. The adapted step
            shrinks as the trajectory grows (ε·n ≈ 1.1–1.7 at L=4 for n = 2…10), so short
            trajectories are cheaper per independent sample: on a trained L=4 flow 7.2
            gradient evaluations per independent |m| with n = 3 against 28 with n = 10.
        hmc_warmup: step-size adaptation iterations, >= 0.
        target_accept: HMC acceptance aimed at, in (0, 1).
        step_size: initial leapfrog step, > 0.
        independence: length of the independence-sampler chain, >= 2 (0 skips it).
        sw_sweeps: Swendsen-Wang sweeps per chain (0 skips it); sw_chains chains after
            sw_thermalize discarded sweeps.
        skip_hmc: skip both HMC runs.
        skip_latent_hmc: skip latent HMC only (it costs a flow pass and its gradient per leapfrog step).
        chain_seconds: sampling-time budget per HMC sampler for running the chains on
            (doubling) until R̂ ≤ 1.01 and n ≥ 50τ (0: no extension; the verdict still applies).
        rk4_check: flow samples whose integrated ln q is checked against the exact density of
            the RK4 map (full Jacobian); max|δ|/N becomes the free energies' systematic error
            (0 skips the check, and the free energies then carry no integrator error).
        seed: seed of all random streams.
        L: expected lattice size (None: take the checkpoint's).
        dtype: ``"float64"`` (default) or ``"float32"``: the precision of the analysis.
        plots: write figures.
        verbose: print progress.
    """

    samples: int = 4096
    batch: int = 512
    hmc_samples: int = 300
    hmc_chains: int = 16
    hmc_leapfrog: int = 10
    latent_leapfrog: int = 3
    hmc_warmup: int = 100
    target_accept: float = 0.65
    step_size: float = 0.1
    independence: int = 4096
    sw_sweeps: int = 2000
    sw_chains: int = 8
    sw_thermalize: int = 200
    skip_hmc: bool = False
    skip_latent_hmc: bool = False
    chain_seconds: float = 60.0
    rk4_check: int = 8
    seed: int = 0
    L: int | None = None
    dtype: str = "float64"
    plots: bool = True
    verbose: bool = True

    def __post_init__(self) -> None:
        clean: dict[str, Any] = {}

        def size(name: str, minimum: int) -> int:
            clean[name] = check_size(name, getattr(self, name), minimum)
            return clean[name]

        for name, minimum in (("samples", 2), ("batch", 1), ("hmc_samples", 2), ("hmc_chains", 1),
                              ("hmc_leapfrog", 1), ("latent_leapfrog", 1), ("hmc_warmup", 0)):
            size(name, minimum)
        clean["target_accept"] = check_fraction("target_accept", self.target_accept)
        clean["step_size"] = check_positive("step_size", self.step_size)
        if size("independence", 0) == 1:
            raise ValueError("independence must be 0 (skip) or a chain length >= 2, got independence=1")
        if size("sw_sweeps", 0) == 1:
            raise ValueError("sw_sweeps must be 0 (skip) or at least 2, got sw_sweeps=1")
        if not isinstance(self.chain_seconds, (int, float)) or not self.chain_seconds >= 0:
            raise ValueError(f"chain_seconds must be a number >= 0, got chain_seconds={self.chain_seconds!r}")
        for name, minimum in (("sw_chains", 1), ("sw_thermalize", 0), ("seed", 0), ("rk4_check", 0)):
            size(name, minimum)
        if self.L is not None:
            size("L", 2)
        check_choice("dtype", self.dtype, tuple(DTYPES))
        for name, value in clean.items():  # a frozen dataclass: store the cleaned values (3.0 → 3) this way
            object.__setattr__(self, name, value)


# ---------------------------------------------------------------------- loading
def load_model(checkpoint: str | os.PathLike, L: int | None = None,
               dtype: torch.dtype = torch.float64) -> tuple[Flow, IsingHS, dict[str, Any]]:
    """Rebuild the flow and target of a ``models/ising.py`` checkpoint.

    The flow is whatever :func:`latticeflow.build.build_flow` makes of the checkpoint's config:
    a :class:`~latticeflow.flow.MongeAmpereFlow`, or a
    :class:`~latticeflow.mixture.SymmetricMixture` for a run trained with ``--mixture``.

    Args:
        checkpoint: path of ``checkpoint.pt``.
        L: the lattice size the caller expects (None: accept the checkpoint's).
        dtype: the flow's dtype for the analysis (float64 recommended; float32 weights are
            converted, which changes the flow by rounding only; every estimate stays exact
            for the converted flow).

    Returns:
        (flow in eval mode, a :class:`~latticeflow.flow.Flow`; target; the checkpoint dict).

    Raises:
        FileNotFoundError: no such file.
        latticeflow.checkpoint.CheckpointError (a ValueError): unreadable file, missing or
            malformed config, or weights that do not fit the config.
        ValueError: the checkpoint's L differs from ``L``.
    """
    path = Path(checkpoint)
    state = load_checkpoint(path, required=("config", "model"))
    if checkpoint_kind(state) is not None:  # another driver's checkpoint is named; an unknown one is checked below
        check_kind(state, path, "ising")
    cfg = state["config"]
    if not isinstance(cfg, dict) or not {"L", "beta"} <= set(cfg):
        have = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
        raise CheckpointError(f"checkpoint {path} has no usable config (needs at least L and beta), got {have}")
    if "conditioned" in cfg:
        c = cfg["conditioned"]
        raise CheckpointError(f"checkpoint {path} holds a β-conditioned flow (β in [{c.get('low')}, {c.get('high')}]): "
                              "its sweep measures it at every β (python -m models.ising --resume SWEEP_FOLDER), or in "
                              "Python latticeflow.conditioned.AtBeta(flow, beta) at one β")
    if L is not None and int(cfg["L"]) != int(L):
        raise ValueError(f"checkpoint {path} was trained for L={cfg['L']}, but L={L} was requested")
    with warnings.catch_warnings():  # the doubled bonds of the L=2 torus are intended
        warnings.simplefilter("ignore")
        try:
            target = ising(int(cfg["L"]), cfg["beta"], J=float(cfg.get("J", 1.0)))
            flow = build_flow(cfg, target.lattice)
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path} has an invalid config: {e}") from None
    try:
        flow.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit the flow its config describes: "
                              f"{str(e).splitlines()[0]}") from None
    return flow.to(dtype).eval(), target, state


# ---------------------------------------------------------------------- tables
def _row(quantity: str, method: str, est: Estimate | float, exact: float | None, verdict: Verdict,
         systematic: float = 0.0) -> dict[str, Any]:
    value, err = (est.value, est.stderr) if isinstance(est, Estimate) else (float(est), math.nan)
    ex = math.nan if exact is None else float(exact)
    dev = math.nan
    total = math.hypot(err, systematic) if math.isfinite(err) else math.nan
    if math.isfinite(ex) and math.isfinite(total) and total > 0:
        dev = (value - ex) / total
    return {"quantity": quantity, "method": method, "value": value, "stderr": err, "systematic": systematic,
            "exact": ex, "deviation_sigma": dev, "reliable": verdict.reliable, "reason": verdict.reason}


def estimate_rows(flow: FlowEstimates, chains: dict[str, dict[str, Estimate]] | None = None,
                  exact: dict[str, float] | None = None, verdicts: dict[str, Verdict] | None = None,
                  systematic: float = 0.0) -> list[dict[str, Any]]:
    """The comparison table: one row per (quantity, method), each with its verdict.

    Args:
        flow: the flow estimates.
        chains: method name → observables dict (e.g. ``ChainResult.observables``).
        exact: exact references; default ``flow.exact``.
        verdicts: method name → :class:`~analysis.diagnostics.Verdict` of the chains (a chain
            without one is marked unreliable: it was not diagnosed).
        systematic: the integrator's systematic error of the free energies per site
            (max|δ|/N from :func:`analysis.latent.integration_error`); the deviation divides by
            √(stderr² + systematic²).

    Returns:
        list of dicts with keys quantity, method, value, stderr, systematic, exact,
        deviation_sigma (NaN where unknown), reliable and reason (why not, "" when reliable).
        Plain flow averages and the variational bound are never reliable estimates of the
        target; importance-sampling rows follow the weights' diagnostics (``flow.importance``), and
        each reweighted observable also the tail of its own samples' contributions (``flow.tails``).

    Raises:
        TypeError: flow is not a FlowEstimates.
    """
    if not isinstance(flow, FlowEstimates):
        raise TypeError(f"flow must be a FlowEstimates (analysis.latent.flow_estimates), got {type(flow).__name__}")
    ex = dict(flow.exact if exact is None else exact)
    weights = flow.importance.verdict if flow.importance is not None else Verdict(False, "weights not diagnosed")
    rows = [
        _row("free_energy_hs", "flow variational", flow.free_energy_variational, ex.get("free_energy_hs"), BOUND,
             systematic),
        _row("free_energy_hs", "flow importance", flow.free_energy_importance, ex.get("free_energy_hs"), weights,
             systematic),
        _row("free_energy_ising", "flow variational", flow.free_energy_variational_ising, ex.get("free_energy_ising"),
             BOUND, systematic),
        _row("free_energy_ising", "flow importance", flow.free_energy_importance_ising, ex.get("free_energy_ising"),
             weights, systematic),
        _row("ess", "flow importance", flow.ess, None, Verdict(True)),
    ]
    methods = {"flow plain": flow.observables, "flow reweighted": flow.observables_reweighted, **(chains or {})}
    judged = {"flow plain": PLAIN, "flow reweighted": weights, **(verdicts or {})}
    for q in OBSERVABLES:
        for method, obs in methods.items():
            if q in obs:
                verdict = judged.get(method, Verdict(False, "not diagnosed"))
                if method == "flow reweighted" and q in flow.tails:  # where large weights meet extreme values
                    verdict = Verdict.combine(verdict, flow.tails[q][1])
                rows.append(_row(q, method, obs[q], ex.get(q), verdict))
    return rows


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike, columns: tuple[str, ...] | None = None) -> Path:
    """Write rows (dicts) to a CSV file with the given column order (default: the first row's keys)."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    cols = list(columns or rows[0].keys())
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    return path


def _sampler_row(r: ChainResult, reference: ChainResult | None) -> dict[str, Any]:
    row = {
        "method": r.method, "chains": r.n_chains, "samples_per_chain": r.n_samples,
        "acceptance": r.acceptance_rate, "step_size": r.step_size, "n_leapfrog": r.n_leapfrog,
        "tau_abs_m": r.tau["abs_m"], "tau_energy": r.tau["energy"], "tau_m": r.tau["m"],
        "tau_lower_bound": r.tau_is_lower_bound("abs_m") or r.tau_is_lower_bound("energy"),
        "evals_per_sample": r.evals_per_sample, "seconds_per_sample": r.seconds_per_sample,
        "effective_seconds_abs_m": r.effective_seconds("abs_m"),
        "speedup_seconds_abs_m": math.nan, "speedup_evals_abs_m": math.nan,
        "rhat_abs_m": r.rhat.get("abs_m", math.nan), "rhat_energy": r.rhat.get("energy", math.nan),
        "burn_in": r.burn_in, "reliable": r.verdict.reliable, "reason": r.verdict.reason,
    }
    if reference is not None:
        s = speedup(r, reference, "abs_m")
        row["speedup_seconds_abs_m"], row["speedup_evals_abs_m"] = s["seconds"], s["evals"]
    return row


def cluster_verdict(run: Any) -> tuple[Verdict, dict[str, float], dict[str, float]]:
    """Verdict, τ and split-R̂ of a Swendsen-Wang run's |m| and E traces."""
    names = ("abs_m", "energy", "m")
    tau = {k: quiet_integrated_time(run.series(k)) for k in names}
    rhat = {k: split_rhat(run.series(k)) for k in names}
    return chain_verdict(int(run.m.shape[0]), rhat, tau), tau, rhat


def _cluster_row(run: Any) -> dict[str, Any]:
    n, C = run.m.shape
    verdict, tau, rhat = cluster_verdict(run)
    sps = run.seconds / (n * C)
    return {"method": "Swendsen-Wang", "chains": C, "samples_per_chain": n, "acceptance": 1.0,
            "step_size": math.nan, "n_leapfrog": 0, "tau_abs_m": tau["abs_m"], "tau_energy": tau["energy"],
            "tau_m": tau["m"], "tau_lower_bound": n < 50 * max(tau["abs_m"], tau["energy"]), "evals_per_sample": 1.0,
            "seconds_per_sample": sps, "effective_seconds_abs_m": tau["abs_m"] * sps,
            "speedup_seconds_abs_m": math.nan, "speedup_evals_abs_m": math.nan,
            "rhat_abs_m": rhat["abs_m"], "rhat_energy": rhat["energy"], "burn_in": 0,
            "reliable": verdict.reliable, "reason": verdict.reason}


def _fmt(x: float, digits: int = 4) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, (int, np.integer)):
        return str(x)
    return f"{x:.{digits}g}"


def render_markdown(header: dict[str, Any], rows: list[dict[str, Any]], samplers: list[dict[str, Any]],
                    figures: list[Path]) -> str:
    """The report as Markdown: settings, the estimates table, the samplers table, figures."""
    lines = [f"# Flow report: Ising L={header['L']}, β={header['beta']:.10g}, J={header['J']:g}", ""]
    for k, v in header.items():
        lines.append(f"- **{k}**: {v}")
    bad = [r for r in rows if not r["reliable"] and r["method"] not in ("flow plain", "flow variational")]
    lines += ["", "## Estimates (per site)", "",
              "Deviation = (estimate − exact)/σ with σ = √(stderr² + systematic²); the systematic error is the "
              "integrator's (RK4) error of ln q, measured on fresh samples. **use?** says whether the error bar "
              "can be trusted (R̂ ≤ 1.01 and chains ≥ 50τ for Monte Carlo; Pareto k̂ ≤ 0.7 and Kish ESS ≥ 100 for "
              "importance weights; see analysis/diagnostics.py). Plain flow averages are biased by the flow's "
              "error and the variational F is an upper bound: neither estimates the target.", ""]
    if bad:
        lines += ["**Do not use** these numbers (their error bars are not to be trusted):", ""]
        lines += [f"- {LABELS.get(r['quantity'], r['quantity'])}, {r['method']}: {r['reason']}" for r in bad]
        lines += [""]
    lines += ["| quantity | method | estimate ± error | systematic | exact | deviation (σ) | use? |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        est = format_with_error(r["value"], r["stderr"]) if math.isfinite(r["stderr"]) else _fmt(r["value"], 6)
        use = "yes" if r["reliable"] else f"**no**: {r['reason']}"
        lines.append(f"| {LABELS.get(r['quantity'], r['quantity'])} | {r['method']} | {est} | "
                     f"{_fmt(r.get('systematic', 0.0), 2)} | {_fmt(r['exact'], 10)} | "
                     f"{_fmt(r['deviation_sigma'], 2)} | {use} |")
    if samplers:
        lines += ["", "## Samplers", "",
                  "τ in stored samples (HMC: trajectories; SW: sweeps); cost of an independent sample = "
                  "τ × seconds per sample; speed-up relative to physical HMC (> 1: cheaper). τ(m) of the "
                  "signed magnetisation measures tunnelling between the ±m modes. "
                  "'τ lower bound' marks chains shorter than 50τ (for |m| or E). Split-R̂ across chains "
                  "started from over-dispersed points; burn-in: iterations dropped when the chains were run on "
                  "to converge.", "",
                  r"| method | chains × samples | acceptance | step | τ(\|m\|) | τ(E) | τ(m) | τ lower bound | "
                  r"R̂(\|m\|) | R̂(E) | burn-in | "
                  r"evals/sample | s/sample | τ·s (\|m\|) | speed-up (s) | speed-up (evals) | use? |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in samplers:
            lines.append(
                f"| {s['method']} | {s['chains']} × {s['samples_per_chain']} | {_fmt(s['acceptance'], 3)} | "
                f"{_fmt(s['step_size'], 3)} | {_fmt(s['tau_abs_m'], 3)} | {_fmt(s['tau_energy'], 3)} | "
                f"{_fmt(s['tau_m'], 3)} | "
                f"{_fmt(s['tau_lower_bound'])} | {_fmt(s['rhat_abs_m'], 4)} | {_fmt(s['rhat_energy'], 4)} | "
                f"{_fmt(s['burn_in'])} | {_fmt(s['evals_per_sample'], 3)} | "
                f"{_fmt(s['seconds_per_sample'], 3)} | "
                f"{_fmt(s['effective_seconds_abs_m'], 3)} | {_fmt(s['speedup_seconds_abs_m'], 3)} | "
                f"{_fmt(s['speedup_evals_abs_m'], 3)} | {'yes' if s['reliable'] else '**no**: ' + s['reason']} |")
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{p.stem}]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"


def compute_estimates(flow: Flow, target: IsingHS, settings: ReportSettings | None = None) -> dict[str, Any]:
    """Every estimate of the report for an in-memory flow and target, with verdicts; nothing written.

    Args:
        flow: the flow (float64 recommended).
        target: its Ising HS target.
        settings: a :class:`ReportSettings` (default: the defaults).

    Returns:
        dict with ``rows`` (:func:`estimate_rows`), ``samplers`` (sampler table rows), ``flow``
        (FlowEstimates), ``chains`` (method → ChainResult), ``cluster`` (the SW run or None)
        ``rk4`` (the integrator check: samples, mean, max_abs, systematic, seconds; or None) and
        ``cross_check`` (−ln Z/N from the first converged HMC chain's samples through the flow's
        density, :func:`analysis.latent.target_side_free_energy`: chain, value, stderr and
        deviation_sigma from the flow-side importance estimate; or None). Beyond
        :data:`CROSS_CHECK_SIGMA` the flow misses part of the target, and every importance
        estimate (reweighted, importance-weighted F, independence sampler) is marked unusable.
    """
    s = settings if settings is not None else ReportSettings()
    say = print if s.verbose else (lambda *a, **k: None)
    N = target.N

    def gen(k: int) -> torch.Generator:
        return torch.Generator().manual_seed(s.seed * 1000 + k)

    fe = flow_estimates(flow, target, n_samples=s.samples, batch=s.batch, generator=gen(1))
    say(f"flow samples ({s.samples}, {fe.seconds:.1f} s): F_var/N = {fe.free_energy_variational}, "
        f"F_IS/N = {fe.free_energy_importance}, exact = {fe.exact.get('free_energy_hs', float('nan')):.8f}, "
        f"ESS = {fe.ess:.3f}, Pareto k = {fe.importance.pareto_k:.3g}")
    systematic, rk4 = 0.0, None
    if s.rk4_check:
        t_rk4 = time.perf_counter()
        delta = integration_error(flow, s.rk4_check, gen(5))["delta"].detach().cpu().numpy()
        systematic = float(np.abs(delta).max()) / N
        rk4 = {"samples": s.rk4_check, "mean": float(delta.mean()), "max_abs": float(np.abs(delta).max()),
               "systematic": systematic, "seconds": time.perf_counter() - t_rk4}
        say(f"RK4 density check on {s.rk4_check} samples ({rk4['seconds']:.1f} s): ln q integrated − exact "
            f"mean {rk4['mean']:+.2e}, max |.| {rk4['max_abs']:.2e} nats: free energies get a systematic error "
            f"of {systematic:.2e} per site")
    chains: dict[str, ChainResult] = {}
    if not s.skip_hmc:
        hmc_args = dict(n_chains=s.hmc_chains, n_samples=s.hmc_samples, n_leapfrog=s.hmc_leapfrog,
                        n_warmup=s.hmc_warmup, target_accept=s.target_accept, step_size=s.step_size,
                        max_seconds=s.chain_seconds or None)
        if not s.skip_latent_hmc:
            chains["latent HMC"] = latent_hmc(flow, target, generator=gen(2),
                                              **{**hmc_args, "n_leapfrog": s.latent_leapfrog})
        chains["physical HMC"] = physical_hmc(target, generator=gen(3), dtype=DTYPES[s.dtype], **hmc_args)
    if s.independence:
        chains["independence"] = neural_independence_sampler(flow, target, s.independence, generator=gen(4),
                                                              batch=s.batch)
    for name, r in chains.items():
        say(f"{name}: acceptance {r.acceptance_rate:.3f}, tau(|m|) = {r.tau['abs_m']:.3g}, "
            f"tau(E) = {r.tau['energy']:.3g}, R-hat(|m|) = {r.rhat.get('abs_m', math.nan):.4g}, "
            f"{r.n_samples} samples after {r.burn_in} burn-in, {r.seconds_per_sample * 1e3:.3g} ms/sample "
            f"({r.total_seconds:.1f} s)" + ("" if r.verdict.reliable else f"; NOT RELIABLE: {r.verdict.reason}"))
    cluster = None
    lat = target.lattice
    if s.sw_sweeps and lat.periodic and target.J == 1.0:
        from .wolff import cluster_chain

        cluster = cluster_chain(lat.L, target.beta, s.sw_sweeps, n_thermalize=s.sw_thermalize, seed=s.seed,
                                n_chains=s.sw_chains)
        say(f"Swendsen-Wang: {s.sw_sweeps} sweeps × {s.sw_chains} chains, tau(|m|) = "
            f"{quiet_integrated_time(cluster.series('abs_m')):.3g} ({cluster.seconds:.1f} s)")

    cross = None
    reference_chain = next((chains[k] for k in ("physical HMC", "latent HMC") if k in chains and chains[k].verdict.reliable),
                           None)
    if reference_chain is not None:
        fp = target_side_free_energy(flow, target, reference_chain, generator=gen(6), batch=s.batch)
        fq = fe.free_energy_importance
        z = (fq.value - fp.value) / math.hypot(fq.stderr, fp.stderr)
        cross = {"chain": reference_chain.method, "value": fp.value, "stderr": fp.stderr, "deviation_sigma": z}
        say(f"target-side check ({reference_chain.method} samples through the flow's density): −ln Z/N = {fp}, "
            f"flow-side {fq}: {z:+.1f}σ")
        if abs(z) > CROSS_CHECK_SIGMA:
            miss = Verdict(False, f"the flow misses part of the target: −ln Z/N from {reference_chain.method} samples "
                                  f"is {fp}, {z:+.1f}σ from the flow samples' {fq}")
            fe.importance = replace(fe.importance, verdict=Verdict.combine(fe.importance.verdict, miss))
            if "independence" in chains:
                chains["independence"].verdict = Verdict.combine(chains["independence"].verdict, miss)
    observables = {name: r.observables for name, r in chains.items()}
    verdicts = {name: r.verdict for name, r in chains.items()}
    if cluster is not None:
        observables["Swendsen-Wang"] = cluster.observables(n_blocks=min(50, s.sw_sweeps))
        verdicts["Swendsen-Wang"] = cluster_verdict(cluster)[0]
    rows = estimate_rows(fe, observables, verdicts=verdicts, systematic=systematic)
    unusable = [r for r in rows if not r["reliable"] and r["method"] not in ("flow plain", "flow variational")]
    for r in unusable:
        say(f"do not use: {r['quantity']} from {r['method']}: {r['reason']}")
    reference = chains.get("physical HMC")
    samplers = [_sampler_row(r, reference if r is not reference else None) for r in chains.values()]
    if cluster is not None:
        samplers.append(_cluster_row(cluster))
    return {"rows": rows, "samplers": samplers, "flow": fe, "chains": chains, "cluster": cluster, "rk4": rk4,
            "cross_check": cross}


# ---------------------------------------------------------------------- the whole report
def run_report(checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
               settings: ReportSettings | None = None, **overrides: Any) -> dict[str, Any]:
    """Compute everything for one checkpoint and write the report folder.

    Args:
        checkpoint: a ``checkpoint.pt`` written by ``models/ising.py``.
        out_dir: folder for ``estimates.csv``, ``samplers.csv``, ``report.md`` and figures.
        settings: a :class:`ReportSettings`; keyword ``overrides`` replace its fields.

    Returns:
        dict with ``rows`` (estimates), ``samplers``, ``flow`` (FlowEstimates), ``chains``
        (method → ChainResult), ``cluster`` (the SW run or None), ``files`` (written paths).

    Raises:
        ValueError: bad settings (before anything is loaded), a checkpoint for another L,
            or an unusable checkpoint (CheckpointError, naming the file).
        FileNotFoundError: the checkpoint does not exist.
    """
    base = asdict(settings) if settings is not None else {}
    unknown = set(overrides) - set(ReportSettings.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown report settings {sorted(unknown)}; "
                        f"valid: {sorted(ReportSettings.__dataclass_fields__)}")
    s = ReportSettings(**{**base, **overrides})
    say = print if s.verbose else (lambda *a, **k: None)
    flow, target, state = load_model(checkpoint, L=s.L, dtype=DTYPES[s.dtype])
    cfg = state["config"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    N = target.N
    n_params = sum(p.numel() for p in flow.parameters())
    say(f"{checkpoint}: Ising L={target.lattice.L} beta={target.beta:.6g} J={target.J:g}, "
        f"{cfg.get('potential', '?')} potential, {n_params} parameters, epoch {state.get('epoch', '?')}")

    t0 = time.perf_counter()
    res = compute_estimates(flow, target, s)
    fe, chains, cluster, rows, samplers, rk4 = (res[k] for k in ("flow", "chains", "cluster", "rows", "samplers",
                                                                 "rk4"))
    systematic = 0.0 if rk4 is None else rk4["systematic"]
    cross = res["cross_check"]
    lat = target.lattice

    figures: list[Path] = []
    if s.plots:
        from . import plots

        title = f"Ising L={lat.L}, β={target.beta:.4g}"
        figures.append(plots.plot_magnetisation_histogram(
            fe.m, out / "magnetisation.png", log_weights=fe.log_weights, N=N, title=title,
            reference=cluster.m if cluster is not None else None))
        if fe.spins.size:
            figures.append(plots.plot_spin_grid(fe.spins, out / "spins.png", title="flow samples"))
        hmc_runs = {k: v for k, v in chains.items() if "HMC" in k}
        if hmc_runs:
            figures.append(plots.plot_chains({k: v.abs_m for k, v in hmc_runs.items()}, out / "hmc_abs_m.png",
                                             quantity="$|m|$", title=title))
            figures.append(plots.plot_chains({k: v.energy for k, v in hmc_runs.items()}, out / "hmc_energy.png",
                                             quantity="$E/N$", title=title))
        log = pd.DataFrame.from_records(state.get("log") or [])
        if len(log) and "epoch" in log and ({"free_energy_hs", "free_energy"} & set(log.columns)):
            figures.append(plots.plot_convergence(log, fe.exact.get("free_energy_hs"), out / "convergence.png",
                                                  title=title, spins=fe.spins[:9] if fe.spins.size else None))

    header = {"checkpoint": str(checkpoint), "L": lat.L, "beta": float(target.beta), "J": float(target.J), "N": N,
              "potential": cfg.get("potential", "?"), "parameters": n_params, "epoch": state.get("epoch", "?"),
              "n_steps × step_size": f"{cfg.get('n_steps', '?')} × {cfg.get('step_size', '?')}",
              "analysis dtype": s.dtype, "flow samples": s.samples, "seed": s.seed,
              "importance weights": f"Pareto k̂ = {fe.importance.pareto_k:.3g} (usable ≤ {fe.importance.k_max:.2g}), "
                                    f"Kish ESS = {fe.importance.ess:.1f} of {fe.n_samples}, "
                                    f"Var ln w = {fe.importance.log_weight_variance:.3g}",
              "target-side check": ("no converged HMC chain to check against" if cross is None else
                                    f"−ln Z/N from {cross['chain']} samples through the flow's density "
                                    f"{format_with_error(cross['value'], cross['stderr'])}, "
                                    f"{cross['deviation_sigma']:+.1f}σ from the flow samples' (> {CROSS_CHECK_SIGMA:g}σ: "
                                    f"the flow misses part of the target; importance estimates marked unusable)"),
              "RK4 density check": ("skipped (free energies carry no integrator error)" if rk4 is None else
                                    f"{rk4['samples']} samples: ln q integrated − exact mean {rk4['mean']:+.2e}, "
                                    f"max {rk4['max_abs']:.2e} nats → systematic {systematic:.2e} per site"),
              "wall time": f"{time.perf_counter() - t0:.1f} s"}
    files = [write_csv(rows, out / "estimates.csv", CSV_COLUMNS)]
    if samplers:
        files.append(write_csv(samplers, out / "samplers.csv"))
    md = out / "report.md"
    md.write_text(render_markdown(header, rows, samplers, figures))
    files += [md] + figures
    say(f"wrote {md}")
    return {"rows": rows, "samplers": samplers, "flow": fe, "chains": chains, "cluster": cluster, "files": files,
            "settings": s, "rk4": rk4, "cross_check": cross}

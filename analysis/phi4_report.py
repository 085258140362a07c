"""Estimates from a trained φ⁴ flow, and the HMC baseline they are compared with.

One set of i.i.d. flow samples x ~ q (float64) gives:

- the variational F/N = ⟨S + ln q⟩/N (an upper bound of −ln Z/N) and the importance-weighted
  F/N = −ln⟨e^{−S−ln q}⟩/N with a block-jackknife error and the weights' verdict (Pareto k̂,
  Kish ESS; :func:`analysis.diagnostics.importance_diagnostics`): the absolute free energy,
  which plain MCMC does not give;
- the observables of :func:`latticeflow.phi4.observables`, reweighted by w = e^{−S−ln q};
- neural MCMC: independence Metropolis with the flow as the proposal (Albergo, Kanwar &
  Shanahan, arXiv:1904.12072) over the same samples, with its acceptance and the integrated
  autocorrelation times τ of |m| and m² (the series behind ⟨|m|⟩ and χ);
- for the free theory (λ = 0) the deviations from the closed forms (ln Z, χ, ξ, the propagator G(x)).

:func:`hmc_baseline` runs HMC on the action for a fixed number of iterations or seconds and
measures the same τ, so the two samplers are compared at equal CPU time by their effective
samples per second (n / τ / seconds).

The HMC reference values at the standard point and along L/ξ ≈ 4 are the package file
``phi4_reference.csv`` next to this module (:func:`reference`), made by ``benchmarks/phi4.py``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from latticeflow.build import build_flow
from latticeflow.checkpoint import CheckpointError, check_kind, load_checkpoint
from latticeflow.phi4 import Phi4, observables
from latticeflow.stats import jackknife_stderr

from .autocorr import integrated_time
from .diagnostics import importance_diagnostics, split_rhat
from .free_energy import importance_free_energy, variational_free_energy
from .hmc import from_energy, hmc, independence_metropolis

__all__ = ["SCALARS", "REFERENCE_CSV", "load_phi4", "draw", "flow_estimates", "hmc_baseline", "trace_estimates",
           "reference", "estimate_rows"]

#: The scalar observables of :func:`latticeflow.phi4.observables` reported everywhere.
SCALARS = ("m", "abs_m", "m2", "chi", "binder", "xi", "action_density")
#: HMC reference values (one row per run; the command that made it in its last column).
REFERENCE_CSV = Path(__file__).with_name("phi4_reference.csv")


def load_phi4(checkpoint: str | Path, dtype: torch.dtype = torch.float64) -> tuple[torch.nn.Module, Phi4, dict]:
    """The flow (eval mode, ``dtype``), target and checkpoint dict of a ``models.phi4`` checkpoint.

    Raises:
        FileNotFoundError: no such file.
        latticeflow.checkpoint.CheckpointError (a ValueError): not a φ⁴ checkpoint, or a config or
            weights that do not fit.
    """
    from latticeflow.phi4_config import Phi4Config

    path = Path(checkpoint)
    state = load_checkpoint(path, required=("config", "model"))
    check_kind(state, path, "phi4")
    try:
        cfg = Phi4Config.from_dict(state["config"])
        target = cfg.target()
        flow = build_flow(cfg.flow_config(), target.lattice)
        flow.load_state_dict(state["model"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not give a φ⁴ flow: {str(e).splitlines()[0]}") from None
    return flow.to(dtype).eval(), target, state


def draw(flow: torch.nn.Module, target: Phi4, n: int, batch: int,
         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """n flow samples in batches: x (n, N), ln q (n,), S (n,), float64 on the CPU."""
    xs, lqs = [], []
    flow.eval()
    for start in range(0, n, batch):
        x, lq = flow.sample(min(batch, n - start), generator=generator)
        xs.append(x.detach().double().cpu())
        lqs.append(lq.detach().double().cpu())
    x, lq = torch.cat(xs), torch.cat(lqs)
    return x, lq, target.energy(x)


def _series(x: Tensor, L: int) -> dict[str, np.ndarray]:
    """Per-configuration m, |m|, m² of x with shape (..., N)."""
    m = x.reshape(*x.shape[:-1], L * L).double().mean(-1).cpu().numpy()
    return {"m": m, "abs_m": np.abs(m), "m2": m**2}


def trace_estimates(m: np.ndarray, N: int, n_blocks: int = 20) -> dict[str, float]:
    """⟨|m|⟩ and χ = N(⟨m²⟩ − ⟨m⟩²) of Markov chains' magnetisation traces m (n,) or (n, C), with
    block-jackknife errors over ``n_blocks`` time windows (each window holds all chains), the
    integrated autocorrelation times τ(|m|) and τ(m²) in iterations, and the split-R̂ of both."""
    m = np.asarray(m, dtype=np.float64)
    m = m[:, None] if m.ndim == 1 else m
    n, C = m.shape
    nb = min(n_blocks, n)
    prim = np.stack([np.abs(m), m**2, m], -1)  # (n, C, 3)
    blocks = np.stack([b.sum((0, 1)) for b in np.array_split(prim, nb)])  # (nb, 3)
    counts = np.array([b.shape[0] * C for b in np.array_split(prim, nb)], dtype=np.float64)

    def est(s: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = s / c[..., None]
        return mean[..., 0], N * (mean[..., 1] - mean[..., 2] ** 2)

    (am, chi), (am_j, chi_j) = est(blocks.sum(0), counts.sum()), est(blocks.sum(0) - blocks, counts.sum() - counts)
    out = {"n": n, "chains": C, "abs_m": float(am), "abs_m_err": float(jackknife_stderr(am_j)),
           "chi": float(chi), "chi_err": float(jackknife_stderr(chi_j))}
    for name, s in (("abs_m", np.abs(m)), ("m2", m**2)):
        out["tau_" + name] = integrated_time(s) if n >= 2 else math.nan
        out["rhat_" + name] = split_rhat(s)
    return out


def flow_estimates(flow: torch.nn.Module, target: Phi4, n: int, batch: int,
                   generator: torch.Generator | None = None, seed: int = 0, n_blocks: int = 20) -> dict[str, Any]:
    """Every estimate from n fresh flow samples (see the module docstring), with the sampling time.

    Args:
        generator: drives the flow's samples (on the flow's device); ``seed`` the Metropolis draws.

    Returns:
        dict with ``variational`` and ``importance`` (per-site :class:`Estimate` of −ln Z/N in the
        target's normalisation), ``weights`` (:class:`~analysis.diagnostics.ImportanceDiagnostics`),
        ``reweighted`` and ``chain`` (observables), ``mcmc`` (acceptance, τ, ⟨|m|⟩ and χ of the
        chain from :func:`trace_estimates`), ``exact`` (closed forms for λ = 0, else None),
        ``seconds`` (sampling and Metropolis wall time), ``n``.
    """
    t0 = time.perf_counter()
    with torch.no_grad():
        x, lq, S = draw(flow, target, n, batch, generator)
    chain = independence_metropolis(x, lq, -S, generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - t0
    N = target.N
    lw = -S - lq
    mcmc = trace_estimates(_series(chain.samples, target.L)["m"], N, n_blocks)
    mcmc["acceptance"] = chain.acceptance_rate
    exact = None
    if target.quartic == 0:
        exact = dict(target.exact_observables(), free_energy=target.exact_free_energy(),
                     G=target.exact_propagator().numpy())
    return {"n": n, "seconds": seconds,
            "variational": variational_free_energy(lq, S).per_site(N),
            "importance": importance_free_energy(lq, S, n_blocks=min(100, n)).per_site(N),
            "weights": importance_diagnostics(lw.numpy()),
            "reweighted": observables(x, target, log_weights=lw, n_blocks=n_blocks),
            "chain": observables(chain.samples, target, n_blocks=n_blocks), "mcmc": mcmc, "exact": exact}


def hmc_baseline(target: Phi4, chains: int = 64, n_samples: int | None = None, seconds: float | None = None,
                 n_warmup: int = 200, n_leapfrog: int = 10, target_accept: float = 0.8, seed: int = 0,
                 chunk: int = 50) -> dict[str, Any]:
    """HMC on the φ⁴ action (no flow): ``chains`` chains for ``n_samples`` iterations, or in chunks of
    ``chunk`` iterations until ``seconds`` of sampling have passed (after the warm-up, which is timed
    separately), keeping only the magnetisation traces.

    Returns:
        :func:`trace_estimates` of the traces plus ``acceptance``, ``step_size``, ``seconds`` (sampling),
        ``warmup_seconds``.

    Raises:
        ValueError: neither or both of ``n_samples`` and ``seconds``.
    """
    if (n_samples is None) == (seconds is None):
        raise ValueError("give exactly one of n_samples and seconds")
    gen = torch.Generator().manual_seed(seed)
    f = from_energy(target)
    traces: list[np.ndarray] = []

    def keep(k: int, x: Tensor, lp: Tensor) -> None:
        traces.append(x.mean(-1).double().numpy().copy())

    t0 = time.perf_counter()
    x0 = 0.1 * torch.randn(chains, target.N, generator=gen, dtype=torch.float64)
    warm = hmc(f, x0, n_samples=1, n_leapfrog=n_leapfrog, step_size=0.1, n_warmup=n_warmup,
               target_accept=target_accept, generator=gen, keep_samples=False)
    warm_s = time.perf_counter() - t0
    x, eps, n_acc = warm.final, warm.step_size, 0.0
    t1 = time.perf_counter()
    while True:
        k = chunk if n_samples is None else min(chunk, n_samples - len(traces))
        res = hmc(f, x, n_samples=k, n_leapfrog=n_leapfrog, step_size=eps, n_warmup=0, generator=gen,
                  keep_samples=False, callback=keep, jitter=0.2)
        x, n_acc = res.final, n_acc + res.acceptance_rate * k
        if (n_samples is not None and len(traces) >= n_samples) or \
                (seconds is not None and time.perf_counter() - t1 >= seconds):
            break
    sampling = time.perf_counter() - t1
    out = trace_estimates(np.stack(traces), target.N)
    out.update(acceptance=n_acc / len(traces), step_size=eps, seconds=sampling, warmup_seconds=warm_s,
               n_leapfrog=n_leapfrog)
    return out


def reference(target: Phi4, path: str | Path | None = None) -> dict[str, tuple[float, float]] | None:
    """HMC reference observables (value, error) for the target's (L, m², λ) from ``phi4_reference.csv``:
    the inverse-variance mean over its rows for that point, or None when it has none."""
    p = Path(path) if path is not None else REFERENCE_CSV
    if target.form != "mass" or not p.exists():  # the table is in the mass form's field normalisation
        return None
    df = pd.read_csv(p)
    rows = df[(df["L"] == target.L) & np.isclose(df["m2"], target.m2, atol=1e-9, rtol=0)
              & np.isclose(df["lam"], target.lam, atol=1e-9, rtol=0)]
    if not len(rows):
        return None
    out = {}
    for k in SCALARS:
        v, e = rows["obs_" + k].to_numpy(float), rows["obs_" + k + "_err"].to_numpy(float)
        w = 1 / e**2
        out[k] = (float((w * v).sum() / w.sum()), float(w.sum() ** -0.5))
    return out


def _row(quantity: str, method: str, value: float, err: float, exact: float | None, what: str,
         reliable: bool = True, reason: str = "", exact_err: float = 0.0) -> dict[str, Any]:
    """One tidy row; a reference's own error (``exact_err``) enters the deviation in quadrature."""
    both = math.hypot(err, exact_err)
    dev = None if exact is None or not both > 0 else (value - exact) / both
    return {"quantity": quantity, "method": method, "value": value, "stderr": err, "exact": exact,
            "exact_kind": what if exact is not None else "", "deviation_sigma": dev, "reliable": reliable,
            "reason": reason}


def estimate_rows(est: dict[str, Any], target: Phi4, ref: dict[str, tuple[float, float]] | None = None,
                  hmc: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The tidy table of :func:`flow_estimates` (and an HMC baseline): one row per (quantity, method), with
    the closed form (λ = 0) or the HMC reference (``ref``, its error added in quadrature) to compare with."""
    ex = est["exact"]
    w = est["weights"]
    rows = [_row("free_energy", "variational (upper bound)", est["variational"].value, est["variational"].stderr,
                 None if ex is None else ex["free_energy"], "closed form"),
            _row("free_energy", "importance", est["importance"].value, est["importance"].stderr,
                 None if ex is None else ex["free_energy"], "closed form", w.verdict.reliable, w.verdict.reason)]
    for k in SCALARS:
        for method, obs, ok, why in (("reweighted", est["reweighted"], w.verdict.reliable, w.verdict.reason),
                                     ("neural MCMC", est["chain"], True, "")):
            value, err = obs[k], obs[k + "_err"]
            if ex is not None:
                rows.append(_row(k, method, value, err, ex[k], "closed form", ok, why))
            elif ref is not None:
                r, re = ref[k]
                rows.append(_row(k, method, value, err, r, "HMC reference", ok, why, exact_err=re))
            else:
                rows.append(_row(k, method, value, err, None, "", ok, why))
    if hmc is not None:
        for k in ("abs_m", "chi"):
            rows.append(_row(k, "HMC", hmc[k], hmc[k + "_err"], None if ex is None else ex[k], "closed form"))
    return rows


def propagator_deviation(est: dict[str, Any]) -> dict[str, float] | None:
    """For the free theory: the largest |G(x) − exact| over x in units of the reweighted and of the chain's
    jackknife errors, and the χ² per point of the reweighted G(x) (None for λ > 0)."""
    ex = est["exact"]
    if ex is None:
        return None
    out = {}
    for method in ("reweighted", "chain"):
        o = est[method]
        z = (o["G"] - ex["G"]) / o["G_err"]
        out[method + "_max_sigma"] = float(np.abs(z).max())
        out[method + "_chi2_per_point"] = float((z**2).mean())
    return out


def sampler_rows(est: dict[str, Any], hmc: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Neural MCMC against HMC: iterations, seconds, τ(|m|), τ(m²) and effective samples per second
    (n·chains / τ / seconds) of each, the cost of training not included."""
    rows = []
    for name, r, secs in (("neural MCMC", est["mcmc"], est["seconds"]), ("HMC", hmc, None)):
        if r is None:
            continue
        s = secs if secs is not None else r["seconds"]
        total = r["n"] * r["chains"]
        rows.append({"sampler": name, "iterations": r["n"], "chains": r["chains"], "seconds": s,
                     "acceptance": r.get("acceptance", math.nan), "tau_abs_m": r["tau_abs_m"],
                     "tau_m2": r["tau_m2"], "rhat_abs_m": r["rhat_abs_m"], "rhat_m2": r["rhat_m2"],
                     "ess_per_s_abs_m": total / r["tau_abs_m"] / s, "ess_per_s_m2": total / r["tau_m2"] / s,
                     "abs_m": r["abs_m"], "abs_m_err": r["abs_m_err"], "chi": r["chi"], "chi_err": r["chi_err"]})
    return rows


def run_phi4_report(checkpoint: str | Path, out_dir: str | Path, samples: int = 8192, batch: int = 256,
                    hmc_chains: int = 64, hmc_leapfrog: int = 10, hmc_warmup: int = 200, target_accept: float = 0.8,
                    skip_hmc: bool = False, seed: int = 0, dtype: torch.dtype = torch.float64, L: int | None = None,
                    verbose: bool = True) -> dict[str, Any]:
    """``python -m analysis`` on a φ⁴ checkpoint: :func:`flow_estimates` from ``samples`` flow samples,
    HMC for the same number of seconds (unless ``skip_hmc``), written as ``estimates.csv``,
    ``samplers.csv`` and ``report.json`` in ``out_dir``.

    Raises:
        ValueError: a checkpoint of another L than ``L``; an unusable checkpoint (CheckpointError).
        FileNotFoundError: no such checkpoint.
    """
    import json

    say = print if verbose else (lambda *a, **k: None)
    flow, target, state = load_phi4(checkpoint, dtype)
    if L is not None and target.L != L:
        raise ValueError(f"checkpoint {checkpoint} was trained for L={target.L}, but L={L} was requested")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say(f"{checkpoint}: {target!r}, epoch {state.get('epoch', '?')}")
    est = flow_estimates(flow, target, samples, batch, torch.Generator().manual_seed(seed), seed=seed + 1)
    hm = None if skip_hmc else hmc_baseline(target, chains=hmc_chains, seconds=est["seconds"], n_warmup=hmc_warmup,
                                            n_leapfrog=hmc_leapfrog, target_accept=target_accept, seed=seed + 2)
    ref = reference(target)
    rows = estimate_rows(est, target, ref, hm)
    samplers = sampler_rows(est, hm)
    pd.DataFrame(rows).to_csv(out / "estimates.csv", index=False)
    pd.DataFrame(samplers).to_csv(out / "samplers.csv", index=False)
    w = est["weights"]
    report = {"checkpoint": str(checkpoint), "target": repr(target), "L": target.L, "m2": target.m2,
              "lam": target.lam, "epoch": state.get("epoch"), "samples": samples,
              "variational": [est["variational"].value, est["variational"].stderr],
              "importance": [est["importance"].value, est["importance"].stderr],
              "weights": {"pareto_k": w.pareto_k, "kish_ess": w.ess, "reliable": w.verdict.reliable,
                          "reason": w.verdict.reason},
              "acceptance": est["mcmc"]["acceptance"], "propagator": propagator_deviation(est),
              "reference": "closed form" if est["exact"] is not None else ("HMC table" if ref else None)}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    for line in describe(est, hm, ref):
        say(line)
    say(f"wrote {out / 'estimates.csv'}, {out / 'samplers.csv'}, {out / 'report.json'}")
    return {"estimates": est, "hmc": hm, "rows": rows, "samplers": samplers, "report": report}


def describe(est: dict[str, Any], hmc: dict[str, Any] | None = None,
             ref: dict[str, tuple[float, float]] | None = None) -> list[str]:
    """Readable lines: free energies (against the closed form for λ = 0), the weights' verdict, neural MCMC
    with τ, observables (reweighted and chain, against the closed form or the HMC reference), the HMC baseline."""
    v, i, w, mc, ex = est["variational"], est["importance"], est["weights"], est["mcmc"], est["exact"]
    lines = []
    if ex is not None:
        f = ex["free_energy"]
        lines.append(f"F/N variational {v} (− exact {v.value - f:+.2e}); importance {i} (− exact {i.value - f:+.2e}, "
                     f"{i.deviation(f):+.1f}σ); exact {f:.10f}")
    else:
        lines.append(f"F/N variational {v}; importance {i}")
    lines.append(f"weights: Kish ESS {w.ess / w.n:.3f}·B, Pareto k̂ {w.pareto_k:.2f}"
                 + ("" if w.verdict.reliable else f"; NOT RELIABLE: {w.verdict.reason}"))
    lines.append(f"neural MCMC: acceptance {mc['acceptance']:.3f} over {mc['n']} proposals, τ(|m|) "
                 f"{mc['tau_abs_m']:.2f}, τ(m²) {mc['tau_m2']:.2f} ({est['seconds']:.1f} s)")
    for k in SCALARS:
        c, r = est["chain"], est["reweighted"]
        cmp = ""
        if ex is not None:
            cmp = f"   exact {ex[k]:.5f}"
        elif ref is not None:
            cmp = f"   HMC reference {ref[k][0]:.5f} ± {ref[k][1]:.5f}"
        lines.append(f"  {k:15s} chain {c[k]:.5f} ± {c[k + '_err']:.5f}   reweighted {r[k]:.5f} ± {r[k + '_err']:.5f}"
                     + cmp)
    if hmc is not None:
        lines.append(f"HMC, same {hmc['seconds']:.1f} s: {hmc['n']} iterations × {hmc['chains']} chains, acceptance "
                     f"{hmc['acceptance']:.2f}, τ(|m|) {hmc['tau_abs_m']:.2f}, τ(m²) {hmc['tau_m2']:.2f}; "
                     f"|m| {hmc['abs_m']:.5f} ± {hmc['abs_m_err']:.5f}, χ {hmc['chi']:.4f} ± {hmc['chi_err']:.4f}")
    pg = propagator_deviation(est)
    if pg is not None:
        lines.append(f"G(x) against the exact propagator: max {pg['reweighted_max_sigma']:.1f}σ (reweighted), "
                     f"{pg['chain_max_sigma']:.1f}σ (chain); χ²/point {pg['reweighted_chi2_per_point']:.2f}, "
                     f"{pg['chain_chi2_per_point']:.2f}")
    return lines

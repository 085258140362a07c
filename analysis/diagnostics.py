r"""Diagnostics that decide whether an estimate and its error bar can be used.

Every estimate in a report carries a verdict: ``reliable`` (its error bar is expected to
cover the exact value like a standard normal) and, when not, the reason. The rules:

* **Markov chains** (latent HMC, physical HMC, the independence sampler, Swendsen-Wang):
  rank-normalised split-R̂ ≤ :data:`RHAT_MAX` for every monitored trace (Vehtari, Gelman,
  Simpson, Carpenter & Bürkner, "Rank-normalization, folding, and localization: an improved
  R̂", Bayesian Analysis 16 (2021), who recommend 1.01), computed by ArviZ
  (``arviz_stats``) on chains started from over-dispersed points; and a chain of at least
  :data:`TAU_LENGTHS` integrated autocorrelation times (emcee's rule: shorter chains
  underestimate τ, hence the error bar).
* **Importance sampling** with flow samples (reweighted observables, the importance-weighted
  free energy, the independence sampler's proposals): the Pareto k̂ of the log-weights
  (Vehtari, Simpson, Gelman, Yao & Gabry, "Pareto smoothed importance sampling", JMLR 25
  (2024), computed by ArviZ's ``psislw``) at most min(:data:`PARETO_K_MAX`, 1 − 1/log10 B):
  above it the weights' variance is effectively infinite and a jackknife error bar means
  nothing; a Kish effective sample size of at least :data:`MIN_EFFECTIVE_SAMPLES`; and a
  Kish ESS of at least :data:`MIN_ESS_FRACTION` of the samples. The last rule is empirical:
  a flow that misses part of the target (at β_c, too few disordered configurations) has
  rare huge weights that a few thousand samples often do not contain, and then neither k̂
  nor the jackknife can see them. In the calibration runs (benchmarks/calibration.py) such
  samples had k̂ < 0.5 and ESS/B up to 0.4 while their estimates lay 4–7.5σ from the exact
  values; every set with ESS/B ≥ 0.5 was covered.
* **Plain flow averages** are averages over the model q, not the target: biased by the
  flow's error, never reliable as estimates of the target. **The variational free energy**
  is an upper bound of −ln Z: its error bar is that of F_q, not of F.

The thresholds are module constants so that a test can check the coverage they give
(``tests/test_calibration.py``: z-scores of the reliable estimates behave like a standard
normal at L=3 and L=4, where every observable is exact by enumeration).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from arviz_stats.base import array_stats

__all__ = [
    "MIN_EFFECTIVE_SAMPLES",
    "MIN_ESS_FRACTION",
    "PARETO_K_MAX",
    "RHAT_MAX",
    "TAU_LENGTHS",
    "ImportanceDiagnostics",
    "Verdict",
    "chain_verdict",
    "importance_diagnostics",
    "split_rhat",
]

RHAT_MAX = 1.01
TAU_LENGTHS = 50
PARETO_K_MAX = 0.7
MIN_EFFECTIVE_SAMPLES = 100.0
MIN_ESS_FRACTION = 0.5


@dataclass(frozen=True)
class Verdict:
    """Whether an estimate's error bar can be trusted; ``reason`` says why not ("" when it can)."""

    reliable: bool
    reason: str = ""

    @staticmethod
    def combine(*verdicts: "Verdict") -> "Verdict":
        """Reliable when all are; the reasons of the failing ones joined by '; '."""
        reasons = [v.reason for v in verdicts if not v.reliable]
        return Verdict(not reasons, "; ".join(reasons))


OK = Verdict(True)


def split_rhat(trace: object) -> float:
    """Rank-normalised split-R̂ of a trace of shape (n, C): n iterations of C chains.

    One chain is split in halves like every other (so a drifting single chain shows too).
    Returns NaN for a constant trace (nothing to compare) and for n < 4.
    """
    t = np.asarray(trace, dtype=np.float64)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(f"trace must have shape (n, C), got {t.shape}")
    if t.shape[0] < 4 or not np.isfinite(t).all() or np.ptp(t) == 0:
        return math.nan
    if t.shape[1] == 1:  # ArviZ needs two chains: the halves of one chain, split again inside
        h = t.shape[0] // 2
        t = np.stack([t[:h, 0], t[h:2 * h, 0]], axis=1)
    return float(array_stats.rhat(t.T, chain_axis=-2, draw_axis=-1, method="rank"))


def chain_verdict(n_samples: int, rhat: Mapping[str, float], tau: Mapping[str, float],
                  names: tuple[str, ...] = ("abs_m", "energy")) -> Verdict:
    """The verdict on a Markov chain's estimates from its R̂ and τ of the traces ``names``.

    Args:
        n_samples: stored iterations per chain.
        rhat: trace name → split-R̂ (NaN: a constant trace, not a failure).
        tau: trace name → integrated autocorrelation time in iterations.
        names: the traces that the estimates depend on.
    """
    reasons = []
    for name in names:
        r = rhat.get(name, math.nan)
        if math.isfinite(r) and r > RHAT_MAX:
            reasons.append(f"R̂({name}) = {r:.3f} > {RHAT_MAX}")
        t = tau.get(name, math.nan)
        if not math.isfinite(t):
            reasons.append(f"τ({name}) unknown")
        elif n_samples < TAU_LENGTHS * t:
            reasons.append(f"chain of {n_samples} < {TAU_LENGTHS}τ({name}) = {TAU_LENGTHS * t:.0f}")
    return Verdict(not reasons, "; ".join(reasons))


@dataclass(frozen=True)
class ImportanceDiagnostics:
    """Diagnostics of a set of importance log-weights.

    Attributes:
        n: number of weights B.
        pareto_k: PSIS tail index k̂ (ArviZ); > 0.7 means unusable weights.
        k_max: the threshold applied, min(0.7, 1 − 1/log10 B).
        ess: Kish effective sample size (Σw)²/Σw² (not normalised).
        log_weight_variance: Var(ln w): 0 for a perfect flow.
        verdict: the resulting :class:`Verdict`.
    """

    n: int
    pareto_k: float
    k_max: float
    ess: float
    log_weight_variance: float
    verdict: Verdict


def importance_diagnostics(log_weights: object) -> ImportanceDiagnostics:
    """Pareto k̂, Kish ESS and Var(ln w) of log-weights, and the verdict on estimates from them."""
    lw = np.asarray(log_weights, dtype=np.float64).ravel()
    if lw.size < 2 or not np.isfinite(lw).all():
        return ImportanceDiagnostics(int(lw.size), math.nan, PARETO_K_MAX, math.nan, math.nan,
                                     Verdict(False, "fewer than 2 finite log-weights"))
    w = np.exp(lw - lw.max())
    ess = float(w.sum() ** 2 / (w**2).sum())
    var = float(lw.var())
    k_max = min(PARETO_K_MAX, 1.0 - 1.0 / math.log10(lw.size)) if lw.size > 10 else 0.0
    if var == 0.0:  # equal weights: a perfect proposal, k̂ is −∞ in the limit
        k = -math.inf
    else:
        try:
            k = float(array_stats.psislw(-lw)[1])  # ArviZ takes log-likelihoods: ln w = −(that)
        except ValueError:  # too few weights for a tail fit (fewer than 25), or a constant tail
            k = math.nan
    reasons = []
    if not k <= k_max:
        reasons.append(f"Pareto k̂ = {k:.2f} > {k_max:.2f} (importance weights too heavy-tailed)")
    if ess < MIN_EFFECTIVE_SAMPLES:
        reasons.append(f"Kish ESS {ess:.0f} < {MIN_EFFECTIVE_SAMPLES:.0f}")
    if ess < MIN_ESS_FRACTION * lw.size:
        reasons.append(f"Kish ESS/B = {ess / lw.size:.3f} < {MIN_ESS_FRACTION} (the flow may miss part of the "
                       f"target, unseen by the weights)")
    return ImportanceDiagnostics(int(lw.size), k, k_max, ess, var, Verdict(not reasons, "; ".join(reasons)))

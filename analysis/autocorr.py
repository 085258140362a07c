"""Autocorrelation analysis of Monte Carlo time series.

For a stationary series O_t with normalised autocorrelation ρ(k), the integrated
autocorrelation time is

    τ = 1 + 2 Σ_{k≥1} ρ(k),

so the mean of n correlated samples has variance Var(O) τ / n (n/τ effectively independent
samples). τ is estimated with Sokal's self-consistent window: the sum is cut at the first
window M with M ≥ c·τ(M). The work is done by emcee (``emcee.autocorr.integrated_time`` and
``emcee.autocorr.function_1d``, FFT based, Foreman-Mackey et al. 2013); this module wraps it
with input checks, multi-chain handling and no exception for short chains.

Series layout: shape (n,) for one chain or (n, C) for C independent chains of equal length
(the autocorrelation functions of the chains are averaged, as emcee does for walkers).
"""

from __future__ import annotations

import math

import numpy as np
from emcee.autocorr import function_1d
from emcee.autocorr import integrated_time as _emcee_integrated_time

from .free_energy import Estimate

__all__ = ["autocorrelation_function", "integrated_time", "mean_with_error"]


def _check_series(series: object) -> np.ndarray:
    """Return ``series`` as a float64 (n, C) array with n >= 2, finite."""
    try:
        import torch

        if isinstance(series, torch.Tensor):
            series = series.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover
        pass
    x = np.asarray(series, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"series must have shape (n,) or (n, chains), got shape={x.shape}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"series needs at least 2 time steps and 1 chain, got shape={x.shape}")
    if not np.all(np.isfinite(x)):
        n_bad = int((~np.isfinite(x)).sum())
        raise ValueError(f"series must be finite, got {n_bad} NaN/inf entries in shape={x.shape}")
    return x


def _varying_chains(x: np.ndarray) -> np.ndarray:
    """Columns that are not constant (a constant chain has an undefined 0/0 autocorrelation)."""
    return x[:, np.ptp(x, axis=0) > 0]


def autocorrelation_function(series: object, max_lag: int | None = None) -> np.ndarray:
    """Normalised autocorrelation function ρ(k), k = 0..max_lag, averaged over chains.

    Args:
        series: time series, shape (n,) or (n, C).
        max_lag: largest lag returned, 0 <= max_lag < n; default n − 1.

    Returns:
        ρ, shape (max_lag + 1,), with ρ(0) = 1. A series with no fluctuations at all has
        ρ = (1, 0, 0, ...) by convention.

    Raises:
        ValueError: wrong shape, n < 2, non-finite entries or max_lag out of range.
    """
    x = _check_series(series)
    n = x.shape[0]
    if max_lag is None:
        max_lag = n - 1
    if isinstance(max_lag, bool) or not isinstance(max_lag, (int, np.integer)) or not 0 <= max_lag < n:
        raise ValueError(f"max_lag must be an integer in [0, n-1={n - 1}], got max_lag={max_lag!r}")
    v = _varying_chains(x)
    if v.shape[1] == 0:
        rho = np.zeros(max_lag + 1)
        rho[0] = 1.0
        return rho
    rho = np.mean([function_1d(v[:, k]) for k in range(v.shape[1])], axis=0)
    return rho[: max_lag + 1]


def integrated_time(series: object, c: float = 5, tol: float = 50) -> float:
    """Integrated autocorrelation time τ = 1 + 2 Σ_k ρ(k) with Sokal's automatic window.

    Short chains do not raise: emcee is called with ``quiet=True``, so when n < tol·τ the
    estimate is still returned and emcee logs a warning (logger ``emcee.autocorr``). Treat
    such an estimate as a lower bound.

    Args:
        series: time series, shape (n,) or (n, C) for C chains (ACFs averaged).
        c: window constant, the sum stops at the first M >= c·τ(M) (default 5).
        tol: chain length in units of τ below which emcee warns (default 50).

    Returns:
        τ as a float (about 1 for independent samples). A series with no fluctuations
        returns 1.0 (its error bar is zero whatever τ is).

    Raises:
        ValueError: wrong shape, n < 2, non-finite entries, c <= 0 or tol <= 0.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> round(integrated_time(rng.normal(size=100_000)), 1)
        1.0
    """
    x = _check_series(series)
    for name, val in (("c", c), ("tol", tol)):
        if isinstance(val, bool) or not isinstance(val, (int, float, np.floating, np.integer)) or not val > 0:
            raise ValueError(f"{name} must be a positive number, got {name}={val!r}")
    v = _varying_chains(x)
    if v.shape[1] == 0:
        return 1.0
    tau = _emcee_integrated_time(v, c=c, tol=tol, quiet=True, has_walkers=True)
    return float(np.asarray(tau).reshape(-1)[0])


def mean_with_error(series: object, c: float = 5) -> Estimate:
    """Mean of a correlated series with the error √(Var · τ / (n·C)).

    Args:
        series: time series, shape (n,) or (n, C) of C independent, equilibrated chains.
        c: window constant for :func:`integrated_time`.

    Returns:
        Estimate(mean over all entries, standard error including the autocorrelation time).
    """
    x = _check_series(series)
    tau = integrated_time(x, c=c)
    var = x.var(ddof=1) if np.ptp(x) > 0 else 0.0  # exact 0 for a constant series
    # τ below 1 (anticorrelated series) is kept: it genuinely shrinks the error
    return Estimate(float(x.mean()), float(math.sqrt(var * tau / x.size)))

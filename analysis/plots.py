"""Figures for papers (matplotlib, Agg backend): PNG and PDF side by side.

* :func:`plot_convergence`: variational F/N against epoch (paper Fig. 4), optional spin inset.
* :func:`plot_magnetisation_histogram`: P(m) from flow samples, plain and importance
  reweighted, against a reference chain (Swendsen-Wang).
* :func:`plot_chains`: Monte Carlo traces and autocorrelation functions side by side
  (latent against physical HMC).
* :func:`plot_spin_grid` / :func:`spin_tile`: a grid of spin configurations.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path.with_suffix(".png"), dpi=150, bbox_inches="tight")
    fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    return path.with_suffix(".png")


def plot_convergence(log: pd.DataFrame | str | Path, exact: float | None, path: str | Path, *,
                     title: str = "", spins: np.ndarray | None = None, zoom: bool = True) -> Path:
    """Variational free energy per site against training epoch, with the exact line (paper Fig. 4).

    Args:
        log: training log (DataFrame or CSV path) with columns epoch, free_energy, stderr.
        exact: exact −ln Z/N in the same normalisation, drawn as a red line; None to omit.
        path: output file; written as .png and .pdf.
        title: figure title.
        spins: optional grid of generated spin configurations, shape (k, L, L), drawn as an inset.
        zoom: add a second panel with the error F/N − exact on a log scale.
    Returns:
        the PNG path.
    """
    if not isinstance(log, pd.DataFrame):
        log = pd.read_csv(log)
    if len(log) == 0 or "free_energy" not in log:
        raise ValueError("log must have at least one row with a 'free_energy' column")
    two = zoom and exact is not None
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(10 if two else 5.5, 4), squeeze=False)
    ax = axes[0, 0]
    e, f = log["epoch"].to_numpy(), log["free_energy"].to_numpy()
    ax.plot(e, f, lw=0.8, label="variational $F/N$ (eq. 7)")
    if len(f) >= 20:
        w = max(5, len(f) // 50)
        ax.plot(e, pd.Series(f).rolling(w, min_periods=1).mean(), lw=1.5, label=f"running mean ({w})")
    if exact is not None:
        ax.axhline(exact, color="red", lw=1.2, label=f"exact {exact:.6f}")
        lo = exact - 0.02 * abs(exact)
        ax.set_ylim(lo, max(np.nanpercentile(f, 98), exact + 0.05 * abs(exact)))
    ax.set_xlabel("epoch")
    ax.set_ylabel(r"$F/N = -\ln Z/N$")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title)
    if spins is not None:
        tile = spin_tile(spins)
        inset = ax.inset_axes([0.45, 0.3, 0.5, 0.5])
        inset.imshow(tile, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        inset.set_xticks([])
        inset.set_yticks([])
    if two:
        ax2 = axes[0, 1]
        err = f - exact
        ax2.semilogy(e, np.clip(err, 1e-6, None), lw=0.6, alpha=0.6, label="$F/N$ − exact")
        if len(f) >= 20:
            ax2.semilogy(e, np.clip(pd.Series(err).rolling(w, min_periods=1).mean(), 1e-6, None), lw=1.5,
                         label="running mean")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("error per site")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3, which="both")
    return _save(fig, path)


# ---------------------------------------------------------------------- input checks
def _as_array(name: str, values: object) -> np.ndarray:
    """A float64 numpy array from numpy or torch input."""
    try:
        import torch

        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an array of numbers, got {type(values).__name__}") from None


def _check_m(name: str, m: object) -> np.ndarray:
    arr = _as_array(name, m).reshape(-1) if np.ndim(m) != 0 else None
    if arr is None or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty array of magnetisations per site, got shape={np.shape(m)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {int((~np.isfinite(arr)).sum())} NaN/inf entries")
    if np.abs(arr).max() > 1 + 1e-9:
        raise ValueError(f"{name} must hold magnetisations per site in [-1, 1], got max |m| = {np.abs(arr).max():.6g}")
    return arr


# ---------------------------------------------------------------------- spin configurations
def spin_tile(spins: object, columns: int | None = None) -> np.ndarray:
    """Tile k spin configurations into one grey image, one-pixel grey gaps between them.

    Args:
        spins: ±1 spins or values in [−1, 1] (e.g. tanh x), shape (k, L, L) or (k, L²).
        columns: tiles per row; default ⌈√k⌉.

    Returns:
        image with values in [0, 1] (−1 → 0 black, +1 → 1 white, gaps 0.5), shape
        (rows·(L+1) − 1, columns·(L+1) − 1).

    Raises:
        ValueError: no configurations, a non-square site count, or values outside [−1, 1].
    """
    s = _as_array("spins", spins)
    if s.ndim == 2:
        L = int(round(math.sqrt(s.shape[1])))
        if L * L != s.shape[1]:
            raise ValueError(f"spins of shape (k, N) need a square N = L², got N={s.shape[1]}")
        s = s.reshape(-1, L, L)
    if s.ndim != 3 or s.shape[0] == 0 or s.shape[1] != s.shape[2]:
        raise ValueError(f"spins must have shape (k, L, L) with k >= 1, got shape={s.shape}")
    if not np.all(np.isfinite(s)) or np.abs(s).max() > 1 + 1e-9:
        raise ValueError("spins must be finite values in [-1, 1] (±1 spins or tanh x)")
    k, L = s.shape[0], s.shape[1]
    cols = int(math.ceil(math.sqrt(k))) if columns is None else int(columns)
    if cols < 1:
        raise ValueError(f"columns must be a positive integer, got columns={columns!r}")
    cols = min(cols, k)
    rows = int(math.ceil(k / cols))
    tile = np.full((rows * (L + 1) - 1, cols * (L + 1) - 1), 0.5)
    for n, conf in enumerate(s):
        r, c = divmod(n, cols)
        tile[r * (L + 1): r * (L + 1) + L, c * (L + 1): c * (L + 1) + L] = (conf + 1) / 2
    return tile


def plot_spin_grid(spins: object, path: str | Path, *, title: str = "", columns: int | None = None) -> Path:
    """A grid of spin configurations (e.g. flow samples), black −1, white +1.

    Args:
        spins: shape (k, L, L) or (k, L²), ±1 or in [−1, 1].
        path: output file; written as .png and .pdf.
        title: figure title.
        columns: tiles per row (default ⌈√k⌉).

    Returns:
        the PNG path.
    """
    tile = spin_tile(spins, columns)
    h, w = tile.shape
    fig, ax = plt.subplots(figsize=(min(8.0, 1.0 + 0.12 * w), min(8.0, 1.0 + 0.12 * h)))
    ax.imshow(tile, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return _save(fig, path)


# ---------------------------------------------------------------------- magnetisation histogram
def plot_magnetisation_histogram(m: object, path: str | Path, *, log_weights: object | None = None,
                                 reference: object | None = None, N: int | None = None, title: str = "",
                                 reference_label: str = "Swendsen-Wang") -> Path:
    """Histogram P(m) of the magnetisation per site: flow samples, reweighted, and a reference.

    The reweighted histogram uses the self-normalised importance weights w ∝ e^{ln w}, so
    it estimates the exact Boltzmann P(m) however good the flow is (given enough samples).

    Args:
        m: magnetisation per site of each flow sample (of spins drawn from p(s | x)), shape (B,).
        path: output file; written as .png and .pdf.
        log_weights: ln w = −E − ln q of each sample, shape (B,), or None.
        reference: magnetisations from a reference chain, any shape (flattened), or None.
        N: number of sites; bins are then centred on the allowed values −1 + 2k/N.
        title: figure title.
        reference_label: legend entry of the reference.

    Returns:
        the PNG path.

    Raises:
        ValueError: empty or non-finite arrays, |m| > 1, log_weights of another length than m,
            or N < 1.
    """
    m = _check_m("m", m)
    w = None
    if log_weights is not None:
        lw = _as_array("log_weights", log_weights).reshape(-1) if np.ndim(log_weights) != 0 else np.empty(0)
        if lw.shape != m.shape:
            raise ValueError(f"log_weights must have the shape of m, ({m.size},), got shape={np.shape(log_weights)}")
        if np.isnan(lw).any() or np.isposinf(lw).any() or np.isneginf(lw).all():
            raise ValueError("log_weights must be free of NaN and +inf and not all -inf")
        w = np.exp(lw - lw.max())
    ref = _check_m("reference", reference) if reference is not None else None
    if N is not None:
        if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 1:
            raise ValueError(f"N must be a positive integer, got N={N!r}")
        bins = np.linspace(-1 - 1 / N, 1 + 1 / N, N + 2)
    else:
        bins = np.linspace(-1, 1, 42)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.hist(m, bins=bins, density=True, histtype="step", lw=1.2, label=f"flow samples ({m.size})")
    if w is not None:
        ax.hist(m, bins=bins, weights=w, density=True, histtype="step", lw=1.5, label="flow, reweighted")
    if ref is not None:
        ax.hist(ref, bins=bins, density=True, histtype="stepfilled", alpha=0.25, color="gray",
                label=f"{reference_label} ({ref.size})")
    ax.set_xlabel("$m$ per site")
    ax.set_ylabel("$P(m)$")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


# ---------------------------------------------------------------------- Monte Carlo chains
def plot_chains(traces: Mapping[str, object], path: str | Path, *, quantity: str = "$|m|$",
                max_lag: int | None = None, max_steps: int = 500, title: str = "") -> Path:
    """Traces (first chain) and autocorrelation functions (averaged over chains) of samplers.

    Args:
        traces: label → series of shape (n,) or (n, C), e.g. {"latent HMC": abs_m, ...}.
        path: output file; written as .png and .pdf.
        quantity: axis label of the traced observable.
        max_lag: largest lag of the autocorrelation panel; default min(n − 1, 100).
        max_steps: Monte Carlo steps shown in the trace panel.
        title: figure title.

    Returns:
        the PNG path.

    Raises:
        ValueError: no traces, a series with fewer than 2 steps or non-finite entries, or
            max_lag out of range.
    """
    from .autocorr import autocorrelation_function, integrated_time

    if not isinstance(traces, Mapping) or len(traces) == 0:
        raise ValueError(f"traces must be a non-empty mapping label -> series, got {type(traces).__name__} "
                         f"of length {len(traces) if hasattr(traces, '__len__') else '?'}")
    series = {}
    for label, values in traces.items():
        arr = _as_array(f"traces[{label!r}]", values)
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] < 1:
            raise ValueError(f"traces[{label!r}] must have shape (n,) or (n, C) with n >= 2, got shape={arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"traces[{label!r}] must be finite, got {int((~np.isfinite(arr)).sum())} NaN/inf entries")
        series[label] = arr
    n_min = min(a.shape[0] for a in series.values())
    lag = min(n_min - 1, 100) if max_lag is None else max_lag
    if isinstance(lag, bool) or not isinstance(lag, (int, np.integer)) or not 1 <= lag < n_min:
        raise ValueError(f"max_lag must be an integer in [1, n-1={n_min - 1}], got max_lag={max_lag!r}")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, arr in series.items():
        steps = min(max_steps, arr.shape[0])
        (line,) = ax1.plot(np.arange(steps), arr[:steps, 0], lw=0.8, label=label)
        rho = autocorrelation_function(arr, max_lag=int(lag))
        log = logging.getLogger("emcee.autocorr")  # short chains: τ is drawn anyway, no log spam
        disabled, log.disabled = log.disabled, True
        try:
            tau = integrated_time(arr)
        finally:
            log.disabled = disabled
        ax2.plot(np.arange(lag + 1), rho, color=line.get_color(), lw=1.2, label=rf"{label}, $\tau$ = {tau:.3g}")
    ax1.set_xlabel("Monte Carlo step")
    ax1.set_ylabel(quantity)
    ax1.legend(fontsize=8)
    ax2.axhline(0.0, color="black", lw=0.5)
    ax2.set_xlabel("lag")
    ax2.set_ylabel(rf"autocorrelation of {quantity}")
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)

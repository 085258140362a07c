"""Figures for papers (matplotlib, Agg backend): PNG and PDF side by side.

* :func:`plot_convergence`: variational F/N against training step (paper Fig. 4), optional spin
  inset; values below the exact −ln Z/N (a broken variational bound) are flagged, see
  :func:`bound_violations`.
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


#: Free-energy columns of a training log → the normalisation named on the y axis.
_FREE_ENERGY_COLUMNS = {"free_energy_hs": "Hubbard-Stratonovich", "free_energy": "Hubbard-Stratonovich",
                        "free_energy_ising": "Ising"}
#: Standard errors below the exact value beyond which a value counts as a broken bound.
_BOUND_SIGMAS = 3.0
#: Values reaching more than this many times the late spread beyond it switch the main panel to symlog.
_OUTLIER_RATIO = 100.0
_BROKEN = "red"  # below exact by more than 3 standard errors: the variational bound is broken
_NOISY = "darkorange"  # below exact, but within 3 standard errors: compatible with noise


def _running_window(n: int) -> int | None:
    """Window of the running mean drawn for n training steps; None (no running mean) below 20 steps."""
    return max(5, n // 50) if n >= 20 else None


def _below_exact(f: np.ndarray, stderr: np.ndarray | None, exact: float, window: int | None,
                 sigmas: float = _BOUND_SIGMAS) -> dict[str, np.ndarray | None]:
    """Where the batch means and their running mean lie below ``exact``.

    Args:
        f: variational F/N per step, shape (n,).
        stderr: standard error of each batch mean, shape (n,), or None (then taken as 0).
        exact: exact −ln Z/N.
        window: running-mean window (full windows only), or None for no running mean.
        sigmas: standard errors below ``exact`` beyond which a value is a broken bound.

    Returns:
        ``running`` (the running mean, or None) and boolean masks of shape (n,): ``broken`` / ``noisy``
        (batch mean below ``exact`` by more / at most ``sigmas`` standard errors) and
        ``running_broken`` / ``running_noisy`` (the same for the running mean, with its standard
        error √(Σ stderr²)/window; all False without a running mean).
    """
    se = np.zeros_like(f) if stderr is None else np.nan_to_num(stderr, nan=0.0)
    out: dict[str, np.ndarray | None] = {"running": None}
    with np.errstate(invalid="ignore"):
        below = f < exact
        out["broken"] = f - exact < -sigmas * se
        out["noisy"] = below & ~out["broken"]
        out["running_broken"] = out["running_noisy"] = np.zeros(f.shape, dtype=bool)
        if window is not None:
            rm = pd.Series(f).rolling(window, min_periods=window).mean().to_numpy()
            rse = np.sqrt(pd.Series(se ** 2).rolling(window, min_periods=window).sum().to_numpy()) / window
            out["running"] = rm
            out["running_broken"] = rm - exact < -sigmas * rse
            out["running_noisy"] = (rm < exact) & ~out["running_broken"]
    return out


def bound_violations(f: object, stderr: object | None, exact: float, *, window: int | None = None,
                     sigmas: float = _BOUND_SIGMAS) -> int:
    """Number of training steps at which the variational free energy breaks its bound F/N ≥ −ln Z/N.

    The variational F is an upper bound of −ln Z, so a value below it means a biased
    estimator, e.g. an ODE integration too coarse for the log-density. A step counts when its
    batch mean lies below ``exact`` by more than ``sigmas`` standard errors, or when the running
    mean of the ``window`` steps up to it lies below ``exact`` by more than ``sigmas`` of its own
    standard error √(Σ stderr²)/window. Without standard errors (None, or NaN entries) any value
    below ``exact`` counts.

    Args:
        f: variational F/N per step, shape (n,); NaN entries never count.
        stderr: standard error of each batch mean per site, shape (n,), or None.
        exact: exact −ln Z/N in the same normalisation as ``f``.
        window: running-mean window; None for the one :func:`plot_convergence` draws
            (max(5, n // 50) steps, no running mean below 20 steps), 0 for no running mean.
        sigmas: how many standard errors below ``exact`` count as a broken bound.

    Returns:
        the number of steps with a broken bound.

    Raises:
        ValueError: ``f`` and ``stderr`` of different shapes, a non-finite ``exact``, a negative
            ``window`` or a negative ``sigmas``.
    """
    f = _as_array("f", f).reshape(-1)
    se = None if stderr is None else _as_array("stderr", stderr).reshape(-1)
    if se is not None and se.shape != f.shape:
        raise ValueError(f"stderr must have the shape of f, ({f.size},), got shape={se.shape}")
    if not math.isfinite(exact):
        raise ValueError(f"exact must be finite, got exact={exact!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0):
        raise ValueError(f"window must be a non-negative integer or None, got window={window!r}")
    if not sigmas >= 0:
        raise ValueError(f"sigmas must be >= 0, got sigmas={sigmas!r}")
    w = _running_window(f.size) if window is None else (int(window) or None)
    below = _below_exact(f, se, exact, w, sigmas)
    return int((below["broken"] | below["running_broken"]).sum())


def _y_limits(ax: plt.Axes, f: np.ndarray, exact: float | None) -> None:
    """Y-limits that show every finite value and the exact line; symlog when early values are outliers.

    The scale turns symmetric-logarithmic (linear over the late values) when the values reach
    more than ``_OUTLIER_RATIO`` times the spread of the second half (with the exact value) beyond it.
    """
    vals = f[np.isfinite(f)]
    if vals.size == 0:
        return
    late = vals[vals.size // 2:]
    if exact is not None:
        vals, late = np.append(vals, exact), np.append(late, exact)
    lo, hi = float(vals.min()), float(vals.max())
    late_lo, late_hi = float(late.min()), float(late.max())
    late_span = max(late_hi - late_lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    linthresh = max(abs(late_lo), abs(late_hi), late_span)
    # symlog only pays when the outliers span decades beyond the late values (e.g. a blow-up to 1e6);
    # an early F/N of −1.0 against a late −2.32 reads best on a plain linear axis
    if max(hi - late_hi, late_lo - lo) > _OUTLIER_RATIO * late_span and max(abs(lo), abs(hi)) > 10 * linthresh:
        ax.set_yscale("symlog", linthresh=linthresh)
        # ticks at 1, 2, 5 × 10^k: decades alone leave a range like [−2.4, −0.9] unlabelled
        from matplotlib.ticker import ScalarFormatter, SymmetricalLogLocator

        ax.yaxis.set_major_locator(SymmetricalLogLocator(base=10, linthresh=linthresh, subs=[1.0, 2.0, 5.0]))
        ax.yaxis.set_major_formatter(ScalarFormatter())
    if hi == lo:
        lo, hi = lo - max(0.01 * abs(lo), 1e-3), hi + max(0.01 * abs(hi), 1e-3)
    t = ax.yaxis.get_transform()
    tlo, thi = t.transform([lo, hi])
    pad = 0.05 * (thi - tlo)
    ax.set_ylim(*t.inverted().transform([tlo - pad, thi + pad]))


def _mark_below(ax: plt.Axes, x: np.ndarray, y: np.ndarray, running: np.ndarray | None,
                below: dict[str, np.ndarray | None], legend: bool = True) -> None:
    """Loud marks at the values below exact: red beyond 3 standard errors, orange within them.

    ``y`` and ``running`` are the values drawn (F/N or |F/N − exact|) for the masks in ``below``;
    ``legend``: give the marks legend entries.
    """
    for kind, colour, text in (("broken", _BROKEN, "bound broken"), ("noisy", _NOISY, "within 3 s.e.")):
        mask = below[kind]
        if mask.any():
            ax.plot(x[mask], y[mask], ls="none", marker="v", ms=5 if kind == "broken" else 4, color=colour,
                    mfc=colour if kind == "broken" else "none", zorder=5,
                    label=f"below exact: {text}" if legend else None)
        mask = below[f"running_{kind}"]
        if running is not None and mask.any():
            ax.plot(x, np.where(mask, running, np.nan), color=colour, lw=2.5, marker="v", ms=3, zorder=4,
                    label=f"running mean below exact: {text}" if legend else None)


def _convergence_figure(log: pd.DataFrame | str | Path, exact: float | None, *, column: str | None = None,
                        title: str = "", spins: np.ndarray | None = None, zoom: bool = True,
                        exact_label: str = "exact (finite L)") -> plt.Figure:
    """The figure of :func:`plot_convergence`, not saved (the caller closes it); same arguments but ``path``."""
    if not isinstance(log, pd.DataFrame):
        log = pd.read_csv(log)
    accepted = ", ".join(repr(c) for c in _FREE_ENERGY_COLUMNS)
    if column is None:
        column = next((c for c in ("free_energy_hs", "free_energy") if c in log), None)
        if column is None:
            raise ValueError(f"log must have a free-energy column, one of {accepted} (column=None picks "
                             f"'free_energy_hs', else 'free_energy'); got columns {list(log.columns)}")
    elif column not in _FREE_ENERGY_COLUMNS:
        raise ValueError(f"column must be None or one of {accepted}, got column={column!r}")
    elif column not in log:
        raise ValueError(f"log has no column {column!r} (accepted free-energy columns: {accepted}); "
                         f"got columns {list(log.columns)}")
    if len(log) == 0:
        raise ValueError(f"log must have at least one row with a {column!r} column")
    if exact is not None and not math.isfinite(exact):
        raise ValueError(f"exact must be a finite number or None, got exact={exact!r}")
    f = log[column].to_numpy(dtype=np.float64)
    e = log["epoch"].to_numpy(dtype=np.float64) if "epoch" in log else np.arange(1.0, len(f) + 1)
    se = log["stderr"].to_numpy(dtype=np.float64) if "stderr" in log else None
    w = _running_window(len(f))
    below = _below_exact(f, se, exact if exact is not None else -np.inf, w)
    rm = below["running"]
    norm = _FREE_ENERGY_COLUMNS[column]

    two = zoom and exact is not None
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(10.5 if two else 5.5, 4.2), squeeze=False)
    ax = axes[0, 0]
    if se is not None:
        ax.fill_between(e, f - se, f + se, color="tab:blue", alpha=0.25, lw=0, label="± 1 standard error")
    ax.plot(e, f, color="tab:blue", lw=0.8, label="variational $F/N$ (batch mean)")
    if rm is not None:
        ax.plot(e, rm, color="tab:green", lw=1.5, label=f"running mean ({w} steps)")
    if exact is not None:
        ax.axhline(exact, color="black", ls="--", lw=1.2, label=f"{exact_label}: {exact:.6f}")
        _mark_below(ax, e, f, rm, below, legend=not two)  # two panels: the error panel's legend says it
    _y_limits(ax, f, exact)
    ax.set_xlabel("training step")
    ax.set_ylabel(rf"free energy per site, $-\ln Z/N$ ({norm})")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title)
    if spins is not None:
        tile = spin_tile(spins)
        inset = ax.inset_axes([0.53, 0.12, 0.42, 0.42])
        inset.imshow(tile, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        inset.set_xticks([])
        inset.set_yticks([])
    if two:
        ax2 = axes[0, 1]
        # log scale of |F/N − exact|: exact zeros are left out, nothing is clipped
        with np.errstate(invalid="ignore"):
            dist = np.where(f != exact, np.abs(f - exact), np.nan)
            rdist = None if rm is None else np.where(rm != exact, np.abs(rm - exact), np.nan)
        ax2.plot(e, dist, color="tab:blue", lw=0.6, alpha=0.6, label="$|F/N - $exact$|$ (batch mean)")
        if se is not None:
            ax2.plot(e, se, color="gray", ls=":", lw=1.0, label="standard error")
        if rdist is not None:
            ax2.plot(e, rdist, color="tab:green", lw=1.5, label=f"running mean ({w} steps)")
        _mark_below(ax2, e, dist, rdist, below)
        ax2.set_yscale("log")
        ax2.set_xlabel("training step")
        ax2.set_ylabel(f"$|F/N - $exact$|$ ({norm})")
        ax2.set_title("distance to exact (▼: below exact)", fontsize=9)
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3, which="both")
    n_bad = int((below["broken"] | below["running_broken"]).sum()) if exact is not None else 0
    if n_bad:
        fig.text(0.5, 1.0, f"F/N below exact at {n_bad} of {len(f)} training steps:{' ' if two else chr(10)}"
                 "variational bound broken (integration too coarse?)", ha="center", va="bottom", color=_BROKEN, fontsize=11,
                 fontweight="bold", bbox=dict(facecolor="#ffecec", edgecolor=_BROKEN, boxstyle="round"))
    fig.tight_layout()
    return fig


def plot_convergence(log: pd.DataFrame | str | Path, exact: float | None, path: str | Path, *,
                     title: str = "", spins: np.ndarray | None = None, zoom: bool = True, column: str | None = None,
                     exact_label: str = "exact (finite L)") -> Path:
    """Variational free energy per site against training step, with the exact line (paper Fig. 4).

    The main panel shows every value (symmetric-log y when early values are outliers by more
    than 100× the late spread), the ±1 standard-error band, a running mean and the exact line.
    The error panel shows |F/N − exact| on a log scale, with the standard error for scale. As
    F/N is an upper bound of −ln Z/N, values below exact are marked in both panels and never
    clipped: red beyond 3 standard errors, orange within them; when :func:`bound_violations`
    counts any step, a red warning heads the figure.

    Args:
        log: training log (DataFrame or CSV path) with a free-energy column (see ``column``) and
            optionally ``epoch`` (else 1, 2, …) and ``stderr`` (standard error of the batch mean
            per site, drawn as a band).
        exact: exact −ln Z/N in the same normalisation as ``column``, drawn as a dashed line; None to omit.
        path: output file; written as .png and .pdf.
        title: figure title.
        spins: optional grid of generated spin configurations, shape (k, L, L), drawn as an inset.
        zoom: add a second panel with |F/N − exact| on a log scale (when ``exact`` is given).
        column: ``"free_energy_hs"`` or ``"free_energy"`` (Hubbard-Stratonovich normalisation), or
            ``"free_energy_ising"`` (Ising normalisation); None picks ``free_energy_hs`` if
            present, else ``free_energy`` (older logs).
        exact_label: legend entry of the exact line, e.g. ``"exact (Kaufman, finite L)"``.

    Returns:
        the PNG path.

    Raises:
        ValueError: no rows, no accepted free-energy column, or a non-finite ``exact``.
    """
    fig = _convergence_figure(log, exact, column=column, title=title, spins=spins, zoom=zoom,
                              exact_label=exact_label)
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

"""Thermodynamics across temperatures: per-β estimates from a trained flow, exact curves, the figure.

Notation as in :mod:`analysis.observables`: β the inverse temperature, N = L² sites, H(s) =
−J Σ_bonds s_i s_j, m = Σ s_i / N. For one β and a flow q trained against the HS target,
:func:`estimate_rows` draws B i.i.d. samples x ∼ q and reports, per site:

* F/N: the variational F_q = ⟨ln q + E⟩ (paper eq. 7, an upper bound) and the importance-
  weighted F_IS = −ln⟨w⟩, ln w = −E − ln q (jackknife error), in both normalisations (−ln Z_HS/N,
  the loss, and −ln Z_Ising/N = the HS value + (ln Z_HS − ln Z_Ising)/N); the Kish ESS of w;
* U/N = ⟨H⟩/N, C/N = β² (⟨H²⟩ − ⟨H⟩²)/N, ⟨|m|⟩, ⟨m²⟩, Binder U₄ = 1 − ⟨m⁴⟩/(3⟨m²⟩²),
  χ = βN(⟨m²⟩ − ⟨|m|⟩²): self-normalised importance averages Σ w O / Σ w of the improved
  (Rao-Blackwellised) conditional moments E[O(s) | x] of the spins s ∼ p(s | x) (they average
  to the Ising Boltzmann averages, since the HS joint density's marginal in s is Boltzmann);
* a verdict on every error bar (``reliable``, ``reason``, ``pareto_k``): the tail of the weights
  and of each estimate's own per-sample contributions (below T_c, rare configurations between the
  two magnetised modes carry large weights and extreme values of m and H at once);

next to the exact values of the same finite periodic lattice (Kaufman: F/N, U/N, C/N;
enumeration for N ≤ 16: the magnetisation moments) and Onsager's infinite-lattice F/N and U/N.
:func:`plot_sweep` draws F/N, U/N and C/N against β with the dense exact curves and a residual
panel in units of σ.

Reference: Zhang, E & Wang, "Monge-Ampère Flow for Generative Modeling", arXiv:1809.10188
(section 4.2 and appendix B); B. Kaufman, Phys. Rev. 76, 1232 (1949); L. Onsager, Phys. Rev.
65, 117 (1944).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from latticeflow import exact  # noqa: E402
from latticeflow.ising import IsingHS, critical  # noqa: E402

from .diagnostics import BOUND, PLAIN, Verdict  # noqa: E402
from .free_energy import Estimate  # noqa: E402
from .latent import flow_estimates  # noqa: E402
from .plots import _save  # noqa: E402

__all__ = ["COLUMNS", "QUANTITIES", "estimate_rows", "exact_curves", "plot_finite_size", "plot_sweep"]

#: Columns of the tidy table (``sweep.csv``): one row per (β, quantity, method).
COLUMNS = ("beta", "beta_name", "L", "quantity", "normalisation", "method", "value", "stderr", "exact",
           "exact_stderr", "exact_source", "deviation_sigma", "reliable", "reason", "pareto_k", "onsager", "ess",
           "n_samples", "epochs", "warm_start_from", "train_s", "measure_s")
#: Swendsen-Wang sweeps per chain (16 chains) behind the magnetisation references when N > 16.
SW_SWEEPS = 2000
#: quantity → (label, observable key of :func:`analysis.observables.measure`)
QUANTITIES = {"energy": "U/N", "specific_heat": "C/N", "abs_m": "⟨|m|⟩", "m2": "⟨m²⟩", "binder": "Binder U₄",
              "susceptibility": "χ = βN(⟨m²⟩ − ⟨|m|⟩²)", "susceptibility_m2": "χ₀ = βN⟨m²⟩"}


def _row(quantity: str, normalisation: str, method: str, est: Estimate | float, exact_value: float | Estimate | None,
         verdict: tuple[float, Verdict], onsager: float | None = None, source: str = "exact") -> dict[str, Any]:
    """One tidy row; a reference with an error (an Estimate: Swendsen-Wang) enters the deviation in quadrature;
    ``verdict`` is (the Pareto k̂ behind it or NaN, the Verdict on the error bar)."""
    value, err = (est.value, est.stderr) if isinstance(est, Estimate) else (float(est), math.nan)
    ref = exact_value if isinstance(exact_value, Estimate) else Estimate(math.nan if exact_value is None
                                                                          else float(exact_value), 0.0)
    ex, ex_err = float(ref.value), float(ref.stderr)
    dev = math.nan
    if math.isfinite(ex) and math.isfinite(err):
        dev = Estimate(value, math.hypot(err, ex_err)).deviation(ex)
    return {"quantity": quantity, "normalisation": normalisation, "method": method, "value": value, "stderr": err,
            "exact": ex, "exact_stderr": ex_err if math.isfinite(ex) else math.nan,
            "exact_source": source if math.isfinite(ex) else "", "deviation_sigma": dev,
            "reliable": verdict[1].reliable, "reason": verdict[1].reason, "pareto_k": verdict[0],
            "onsager": math.nan if onsager is None else float(onsager)}


def _free_energy_rows(fe: Any, suffix: str = "", onsager: float | None = None) -> list[dict[str, Any]]:
    """Variational and importance-weighted F/N in the HS and Ising normalisations, methods + ``suffix``;
    ``onsager`` (L = ∞) goes with the Ising rows."""
    ref = fe.exact
    bound, weights = (math.nan, BOUND), (fe.importance.pareto_k, fe.importance.tail)
    return [
        _row("free_energy", "hs", "variational" + suffix, fe.free_energy_variational, ref.get("free_energy_hs"), bound),
        _row("free_energy", "hs", "importance" + suffix, fe.free_energy_importance, ref.get("free_energy_hs"),
             weights),
        _row("free_energy", "ising", "variational" + suffix, fe.free_energy_variational_ising,
             ref.get("free_energy_ising"), bound, onsager),
        _row("free_energy", "ising", "importance" + suffix, fe.free_energy_importance_ising,
             ref.get("free_energy_ising"), weights, onsager),
    ]


def estimate_rows(flow: torch.nn.Module, target: IsingHS, n_samples: int = 4096, batch: int = 512,
                  generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                  sw_sweeps: int = SW_SWEEPS, sw_seed: int = 0) -> list[dict[str, Any]]:
    """The tidy rows of one β: free energies, ESS and reweighted observables against exact values.

    The flow is measured in ``dtype`` (a float64 copy by default, as ``python -m analysis`` does:
    the estimates are exact for the converted flow, which differs from the trained one by rounding).

    Args:
        flow: the trained flow (left unchanged).
        target: its HS target on a periodic L×L lattice, with beta and J.
        n_samples: B >= 2 i.i.d. flow samples.
        batch: samples per flow call.
        generator: torch.Generator of the samples.
        dtype: precision of the measurement.
        sw_sweeps: Swendsen-Wang sweeps (16 chains, 200 discarded) that give the reference of the
            magnetisation moments where enumeration cannot (N > 16; J > 0); 0: none.
        sw_seed: seed of the Swendsen-Wang chains.

    Returns:
        rows with the keys ``quantity``, ``normalisation`` ("hs", "ising" or "" for observables),
        ``method`` ("variational", "importance", "reweighted", "flow"), ``value``, ``stderr``,
        ``exact`` (NaN where unknown), ``exact_stderr`` (0 for closed forms and enumeration, the
        jackknife error of a Swendsen-Wang reference), ``exact_source`` ("exact" or "swendsen-wang"),
        ``deviation_sigma`` = (value − exact)/√(stderr² + exact_stderr²), ``reliable`` and
        ``reason`` (the verdict on the error bar: importance and reweighted rows need the weights'
        Pareto k̂ ≤ 0.7 and a Kish ESS ≥ 100, and a reweighted row also the k̂ of its own samples'
        contributions, :func:`analysis.diagnostics.influence_verdict`; variational and plain flow
        rows are never estimates of the target), ``pareto_k`` (the k̂ behind the verdict: the
        weights' for F, the contributions' for an observable), ``onsager`` (the infinite lattice,
        NaN where not applicable) and ``ess``, ``n_samples``, ``measure_s``.
    """
    model = copy.deepcopy(flow).to(dtype).eval()
    fe = flow_estimates(model, target, n_samples=n_samples, batch=batch, generator=generator, n_spin_images=0)
    ref = fe.exact
    beta, J = float(target.beta), float(target.J)
    f_inf = -exact.onsager_log_z(beta, J)
    u_inf = exact.onsager_internal_energy(beta, J)
    rows = _free_energy_rows(fe, onsager=f_inf)
    sw = {}
    if sw_sweeps > 0 and J > 0 and any(ref.get(k) is None for k in QUANTITIES):
        from .wolff import cluster_chain

        sw = cluster_chain(target.lattice.L, beta * J, sw_sweeps, n_thermalize=200, seed=sw_seed).observables()
    for key in QUANTITIES:
        onsager = u_inf if key == "energy" else None
        reference, source = ref.get(key), "exact"
        if reference is None and key in sw:
            reference, source = sw[key], "swendsen-wang"
        k, tail = fe.tails[key]
        rows.append(_row(key, "", "reweighted", fe.observables_reweighted[key], reference,
                         (k, Verdict.combine(fe.importance.tail, tail)), onsager, source))
        rows.append(_row(key, "", "flow", fe.observables[key], reference, (math.nan, PLAIN), onsager, source))
    for r in rows:
        r.update(ess=fe.ess, n_samples=fe.n_samples, measure_s=fe.seconds)
    return rows


def step_check_rows(flow: torch.nn.Module, target: IsingHS, refine: int = 2, n_samples: int = 4096,
                    batch: int = 512, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float64) -> list[dict[str, Any]]:
    """The free energies again with every RK4 step split in ``refine`` (the same T = n_steps·ε).

    ln q is the RK4-integrated ∫∇²φ dt, not the exact log-density of the RK4 map: a flow trained
    at step ε can lean on that difference (below T_c, up to 6e-3 per site at L=8; README). With
    ε/refine the sampler and its ln q both move toward the continuous flow's, so an importance
    estimate that moves by more than its errors between ε and ε/refine is not converged in the
    step and its error bar does not cover the discretisation. The rows have methods
    ``variational_refined`` and ``importance_refined`` (HS and Ising normalisation) and
    ``step_refine`` = refine; fresh samples from ``generator``.

    Args:
        flow: the trained flow (left unchanged); every MongeAmpereFlow in it is refined.
        target: its HS target.
        refine: steps per trained step, an integer >= 2.
        n_samples, batch, generator, dtype: as :func:`estimate_rows`.

    Returns:
        four rows as :func:`estimate_rows` makes them, with ``ess``, ``n_samples``, ``measure_s``
        and ``step_refine``.

    Raises:
        ValueError: refine < 2, or a flow without a MongeAmpereFlow to refine.
    """
    from latticeflow.flow import finer_steps

    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 2:
        raise ValueError(f"refine must be an integer >= 2, got refine={refine!r}")
    model = copy.deepcopy(flow).to(dtype).eval()
    with finer_steps(model, refine):
        fe = flow_estimates(model, target, n_samples=n_samples, batch=batch, generator=generator, n_spin_images=0)
    rows = _free_energy_rows(fe, suffix="_refined")
    for r in rows:
        r.update(ess=fe.ess, n_samples=fe.n_samples, measure_s=fe.seconds, step_refine=refine)
    return rows


# ---------------------------------------------------------------------- exact curves
def exact_curves(L: int, betas: np.ndarray, J: float = 1.0) -> pd.DataFrame:
    """Kaufman's finite-L F/N (Ising normalisation), U/N and C/N, and Onsager's F/N, U/N, C/N on ``betas``.

    Onsager's C/N = −β² dU/dβ is a centred finite difference of his U/N (it diverges
    logarithmically at β_c, where the curve is drawn as it comes).

    Args:
        L: linear size of the periodic lattice.
        betas: inverse temperatures > 0, shape (n,), increasing.
        J: coupling.

    Returns:
        columns ``beta``, ``free_energy``, ``energy``, ``specific_heat`` (Kaufman, finite L) and
        ``onsager_free_energy``, ``onsager_energy``, ``onsager_specific_heat``.
    """
    betas = np.asarray(betas, dtype=np.float64)
    f = [exact.kaufman_free_energy(L, b, J) for b in betas]
    u = [exact.kaufman_internal_energy(L, b, J) for b in betas]
    c = [exact.kaufman_specific_heat(L, b, J) for b in betas]
    h = 1e-5
    fi = [-exact.onsager_log_z(b, J) for b in betas]
    ui = [exact.onsager_internal_energy(b, J) for b in betas]
    ci = [-(b**2) * (exact.onsager_internal_energy(b + h, J) - exact.onsager_internal_energy(b - h, J)) / (2 * h)
          for b in betas]
    return pd.DataFrame({"beta": betas, "free_energy": f, "energy": u, "specific_heat": c,
                         "onsager_free_energy": fi, "onsager_energy": ui, "onsager_specific_heat": ci})


# ---------------------------------------------------------------------- the figure
_PANELS = (("free_energy", "F/N  (−ln Z_Ising/N)"), ("energy", "U/N"), ("specific_heat", "C/N"))


def _pick(table: pd.DataFrame, quantity: str, method: str, normalisation: str = "") -> pd.DataFrame:
    sel = table[(table["quantity"] == quantity) & (table["method"] == method)]
    if quantity == "free_energy":
        sel = sel[sel["normalisation"] == (normalisation or "ising")]
    return sel.sort_values("beta")


def _reliable(rows: pd.DataFrame) -> np.ndarray:
    """The rows' verdicts as a boolean array (rows written before the verdicts, without one: reliable)."""
    if "reliable" not in rows:
        return np.ones(len(rows), dtype=bool)
    return rows["reliable"].map(lambda v: str(v).strip().lower() not in ("false", "0")).to_numpy(dtype=bool)


def plot_sweep(table: pd.DataFrame, path: str | Path, *, L: int, J: float = 1.0, title: str = "",
               n_dense: int = 200) -> Path:
    """F/N, U/N and C/N against β: estimates with error bars on the exact finite-L curves, residuals in σ.

    Top row: Kaufman's curves of the same L (thick), Onsager's infinite lattice (thin grey), the
    importance-weighted F/N and the reweighted U/N, C/N with one-σ error bars, and the variational
    F/N (open markers, an upper bound). Bottom row: (estimate − exact)/σ with ±1σ and ±2σ bands,
    open where the row's verdict says the error bar is not reliable.
    Writes ``path`` as PNG and PDF.

    Args:
        table: tidy rows as written to ``sweep.csv`` (see :data:`COLUMNS`).
        path: output path (its suffix is replaced by .png and .pdf).
        L: linear size (for the exact curves).
        J: coupling.
        title: figure title.
        n_dense: points of the exact curves.

    Returns:
        the PNG path.
    """
    if len(table) == 0:
        raise ValueError("plot_sweep needs at least one β in the table, got an empty table")
    betas = np.sort(table["beta"].unique())
    span = max(betas[-1] - betas[0], 0.1)
    lo, hi = max(betas[0] - 0.05 * span, 1e-3), betas[-1] + 0.05 * span
    dense = exact_curves(L, np.linspace(lo, hi, n_dense), J)
    fig, axes = plt.subplots(2, 3, figsize=(12, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    for k, (q, label) in enumerate(_PANELS):
        ax, res = axes[0, k], axes[1, k]
        ax.plot(dense["beta"], dense[f"onsager_{q}"], color="0.55", lw=0.8, label="Onsager, L = ∞")
        ax.plot(dense["beta"], dense[q], color="k", lw=1.6, label=f"Kaufman, L = {L}")
        method = "importance" if q == "free_energy" else "reweighted"
        est = _pick(table, q, method)
        ax.errorbar(est["beta"], est["value"], yerr=est["stderr"], fmt="o", ms=4, color="C3", capsize=2,
                    label="flow, importance-weighted" if q == "free_energy" else "flow, reweighted")
        if q == "free_energy":
            var = _pick(table, q, "variational")
            ax.errorbar(var["beta"], var["value"], yerr=var["stderr"], fmt="o", ms=5, mfc="none", color="C0",
                        capsize=2, label="flow, variational (bound)")
        if q == "specific_heat":
            finite = dense["specific_heat"].to_numpy()
            top = max(np.nanmax(finite), np.nanmax(est["value"] + est["stderr"]) if len(est) else 0.0)
            ax.set_ylim(0.0, 1.3 * top)  # Onsager's log divergence would flatten the finite-L curve
        ax.axvline(critical / J, color="0.8", lw=0.8, ls=":")
        ax.set_ylabel(label)
        ax.grid(alpha=0.25)
        sigma = est["deviation_sigma"].to_numpy(dtype=float)
        res.axhspan(-2, 2, color="0.93")
        res.axhspan(-1, 1, color="0.85")
        res.axhline(0.0, color="k", lw=0.8)
        ok = _reliable(est)
        res.plot(est["beta"][ok], sigma[ok], "o", ms=4, color="C3")
        if (~ok).any():  # the verdict says the error bar is likely too small: an open marker
            res.plot(est["beta"][~ok], sigma[~ok], "o", ms=5, mfc="none", color="C3",
                     label="error bar not reliable (heavy tail)")
            res.legend(fontsize=6, loc="lower left")
        finite_sigma = sigma[np.isfinite(sigma)]
        bound = max(3.0, 1.15 * float(np.abs(finite_sigma).max())) if finite_sigma.size else 3.0
        res.set_ylim(-bound, bound)
        res.set_ylabel("(est − exact)/σ")
        res.set_xlabel("β")
        res.grid(alpha=0.25)
    axes[0, 0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)  # PNG and PDF


def plot_finite_size(tables: dict[int, pd.DataFrame], path: str | Path, *, J: float = 1.0, title: str = "",
                     n_dense: int = 200) -> Path:
    """Sweeps at several L on one figure: C/N (its peak moving toward β_c as L grows, on Kaufman's curve of
    each L) and the Binder cumulant U₄ (the curves crossing near β_c), reweighted estimates with one-σ
    error bars, the references of each L (enumeration, or Swendsen-Wang with its error) as open markers.

    Args:
        tables: L → tidy sweep table (``sweep.csv``) of that L.
        path: output path (PNG and PDF are written).

    Returns:
        the PNG path.
    """
    tables = {int(L): t for L, t in tables.items() if len(t)}
    if not tables:
        raise ValueError("plot_finite_size needs at least one non-empty sweep table")
    allb = np.concatenate([t["beta"].unique() for t in tables.values()])
    span = max(allb.max() - allb.min(), 0.1)
    dense_b = np.linspace(max(allb.min() - 0.05 * span, 1e-3), allb.max() + 0.05 * span, n_dense)
    fig, (axc, axb) = plt.subplots(1, 2, figsize=(10, 4.2))
    for k, (L, t) in enumerate(sorted(tables.items())):
        color = f"C{k}"
        axc.plot(dense_b, exact_curves(L, dense_b, J)["specific_heat"], color=color, lw=1.2, label=f"Kaufman, L = {L}")
        c = _pick(t, "specific_heat", "reweighted")
        axc.errorbar(c["beta"], c["value"], yerr=c["stderr"], fmt="o", ms=4, color=color, capsize=2)
        u = _pick(t, "binder", "reweighted")
        axb.errorbar(u["beta"], u["value"], yerr=u["stderr"], fmt="o-", ms=4, lw=0.8, color=color, capsize=2,
                     label=f"flow, L = {L}")
        ref = u[np.isfinite(u["exact"].to_numpy(dtype=float))]
        if len(ref):
            err = ref["exact_stderr"] if "exact_stderr" in ref else None
            source = ", ".join(sorted({s for s in ref.get("exact_source", pd.Series(["exact"])) if s})) or "exact"
            axb.errorbar(ref["beta"], ref["exact"], yerr=err, fmt="s", ms=6, mfc="none", color=color, capsize=2,
                         label=f"{source}, L = {L}")
    for ax, label in ((axc, "C/N"), (axb, "Binder U₄ = 1 − ⟨m⁴⟩/(3⟨m²⟩²)")):
        ax.axvline(critical / J, color="0.6", lw=0.8, ls=":")
        ax.set_xlabel("β")
        ax.set_ylabel(label)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)

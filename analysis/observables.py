"""Ising observables with jackknife errors, plain or importance-reweighted.

Notation: B samples of N sites; ``spins`` t of shape (B, N) holds either Ising spins ±1 or
the improved (Rao-Blackwellised) spin estimates t_i = tanh x_i of the Hubbard-Stratonovich
field x. J is the coupling, β the inverse temperature; the energy is
H(s) = −J Σ_bonds s_i s_j (each entry of the bond list once, so the doubled bonds of the
periodic L=2 torus count twice, as in Z = Σ_s exp(½ sᵀKs) with K = βJA).

Per-site observables, m = Σ_i s_i / N and e = H / N:
    ⟨m⟩, ⟨|m|⟩, ⟨m²⟩, ⟨m⁴⟩, ⟨e⟩, ⟨e²⟩,
    Binder cumulant       U4 = 1 − ⟨m⁴⟩ / (3⟨m²⟩²)        (2/3 when ordered, → 0 when disordered),
    susceptibility        χ = βN (⟨m²⟩ − ⟨|m|⟩²)            (the usual finite-lattice estimator),
    zero-field χ          χ₀ = βN ⟨m²⟩                       (⟨m⟩ = 0 by symmetry on a finite lattice),
    specific heat         C/N = β²N (⟨e²⟩ − ⟨e⟩²).
(The χ conventions differ between papers; both are reported, keys below.)

Improved estimators. Given the HS field x the spins are independent with
p(s_i | x) = σ(2 s_i x_i), i.e. E[s_i | x] = t_i = tanh x_i (paper appendix B). Every per-sample
quantity here is replaced by its exact conditional expectation given x, which has the same
mean and never a larger variance (Rao-Blackwell):
  * E[s_i s_j | x] = t_i t_j for i ≠ j (independent sites), so E[e | x] = −J Σ_bonds t_i t_j / N;
  * s_i² = 1, so E[(Σ s)² | x] = (Σ t)² − Σ t² + N  — not (Σ t)², which would drop the
    N − Σ t² diagonal term and underestimate m²;
  * E[(Σ s)⁴ | x] from the summed cumulants of the independent ±1 variables
    κ1 = t, κ2 = 1 − t², κ3 = −2t(1 − t²), κ4 = −2(1 − t²)(1 − 3t²);
  * E[|Σ s| | x] from the exact Poisson-binomial law of the number of up spins (O(N²) per sample);
  * E[H² | x] = E[H | x]² + Var(H | x), with Var summed over equal and site-sharing bond pairs.
For t = ±1 all of these reduce to the plain values, so one code path serves both inputs.

Errors: block jackknife over B (contiguous blocks, so correlated chains work when blocks are
longer than the autocorrelation time). With log weights ln w_b the averages are
self-normalised, ⟨O⟩ = Σ w O / Σ w, and the whole ratio is jackknifed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import scipy.sparse as sp

from latticeflow._checks import check_beta

from .free_energy import Estimate

__all__ = ["energy_moments", "influences", "magnetisation_moments", "measure", "moments_of", "summarize"]

_SPIN_TOL = 1e-12


# ---------------------------------------------------------------------- input checks
def _to_numpy(x: object) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x)


def _check_spins(spins: object) -> np.ndarray:
    """Return ``spins`` as a float64 (B, N) array with entries in [−1, 1]."""
    t = np.asarray(_to_numpy(spins), dtype=np.float64)
    if t.ndim == 1:
        t = t[None, :]
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"spins must have shape (B, N) with B, N >= 1, got shape={t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"spins must be finite, got {int((~np.isfinite(t)).sum())} NaN/inf entries in shape={t.shape}")
    big = np.abs(t).max()
    if big > 1 + _SPIN_TOL:
        raise ValueError(
            f"spins must be ±1 or improved estimates tanh(x) in [-1, 1], got max |s| = {big:.6g}; "
            "pass tanh(x), not the field x"
        )
    return np.clip(t, -1.0, 1.0)


def _check_bonds(lattice_or_bonds: object, N: int) -> np.ndarray:
    """Return the bond list as an int64 (E, 2) array with valid, distinct endpoints."""
    bonds = getattr(lattice_or_bonds, "bonds", lattice_or_bonds)
    lat_N = getattr(lattice_or_bonds, "N", None)
    if lat_N is not None and lat_N != N:
        raise ValueError(f"spins have N={N} sites but the lattice has N={lat_N}")
    b = np.asarray(_to_numpy(bonds))
    if b.ndim != 2 or b.shape[1] != 2 or not np.issubdtype(b.dtype, np.integer):
        raise ValueError(f"bonds must be an integer array of shape (E, 2), got shape={b.shape}, dtype={b.dtype}")
    if b.size and (b.min() < 0 or b.max() >= N):
        raise ValueError(f"bond endpoints must lie in [0, N={N}), got range [{b.min()}, {b.max()}]")
    if np.any(b[:, 0] == b[:, 1]):
        raise ValueError("bonds must join two different sites, got a self-loop")
    return b.astype(np.int64)


def _coupling_matrix(bonds: np.ndarray, N: int, J: float) -> sp.csr_matrix:
    """W = J·A as a sparse symmetric (N, N) matrix; repeated bonds add up (multiplicity)."""
    i, j = bonds[:, 0], bonds[:, 1]
    data = np.full(2 * len(i), J, dtype=np.float64)
    return sp.coo_matrix((data, (np.concatenate([i, j]), np.concatenate([j, i]))), shape=(N, N)).tocsr()


def _check_J(J: object) -> float:
    if isinstance(J, bool) or not isinstance(J, (int, float, np.floating, np.integer)) or not math.isfinite(J):
        raise ValueError(f"J must be a finite real number, got J={J!r}")
    return float(J)


def _check_beta(beta: object) -> float | None:
    return check_beta(beta, optional=True)


# ---------------------------------------------------------------------- per-sample moments
def _abs_sum_expectation(t: np.ndarray) -> np.ndarray:
    """E[|Σ_i s_i| | t] for independent ±1 spins with means t, shape (B, N) → (B,).

    The number of up spins k is Poisson-binomial with p_i = (1 + t_i)/2; its law is built
    site by site (a length-(N+1) convolution per site), then Σ_k P(k)|2k − N|.
    """
    B, N = t.shape
    out = np.abs(t.sum(1))
    fuzzy = np.any(np.abs(t) < 1.0, axis=1)  # rows that are not plain ±1 configurations
    if not fuzzy.any():
        return out
    p = 0.5 * (1.0 + t[fuzzy])
    q = 1.0 - p
    dist = np.zeros((p.shape[0], N + 1))
    dist[:, 0] = 1.0
    for i in range(N):
        # after i sites only counts 0..i are possible; update in place from the top down
        hi = i + 1
        dist[:, 1 : hi + 1] = dist[:, 1 : hi + 1] * q[:, i : i + 1] + dist[:, 0:hi] * p[:, i : i + 1]
        dist[:, 0] *= q[:, i]
    out[fuzzy] = dist @ np.abs(2.0 * np.arange(N + 1) - N)
    return out


def magnetisation_moments(spins: object) -> dict[str, np.ndarray]:
    """Per-sample (conditional) moments of the magnetisation per site m = Σ s / N.

    Args:
        spins: ±1 spins or improved estimates tanh x, shape (B, N).

    Returns:
        dict with keys ``m``, ``abs_m``, ``m2``, ``m4``, each shape (B,): the exact
        expectations E[m^k | t] for independent spins of mean t (the plain powers for ±1).

    Raises:
        ValueError: wrong shape, non-finite entries or |t| > 1.
    """
    t = _check_spins(spins)
    N = t.shape[1]
    k1 = t.sum(1)
    t2 = t * t
    v = 1.0 - t2
    k2 = v.sum(1)
    k3 = (-2.0 * t * v).sum(1)
    k4 = (-2.0 * v * (1.0 - 3.0 * t2)).sum(1)
    s2 = k1**2 + k2  # = (Σt)² − Σt² + N
    s4 = k4 + 4.0 * k3 * k1 + 3.0 * k2**2 + 6.0 * k2 * k1**2 + k1**4  # 4th raw moment from cumulants
    return {
        "m": k1 / N,
        "abs_m": _abs_sum_expectation(t) / N,
        "m2": s2 / N**2,
        "m4": s4 / N**4,
    }


def energy_moments(spins: object, lattice: object, J: float = 1.0) -> dict[str, np.ndarray]:
    """Per-sample (conditional) energy per site e = −J Σ_bonds s_i s_j / N and its square.

    Args:
        spins: ±1 spins or improved estimates tanh x, shape (B, N).
        lattice: a SquareLattice (its ``bonds`` are used) or a bond list, shape (E, 2).
        J: coupling (J > 0 ferromagnetic).

    Returns:
        dict with keys ``energy`` = E[e | t] and ``energy_sq`` = E[e² | t], each shape (B,).

    Raises:
        ValueError: bad spins, bonds outside [0, N), self-loops, non-finite J.
    """
    t = _check_spins(spins)
    B, N = t.shape
    W = _coupling_matrix(_check_bonds(lattice, N), N, _check_J(J))
    W2 = W.multiply(W).tocsr()
    h = (W @ t.T).T  # local fields (W t)_k, shape (B, N)
    t2 = t * t
    mean_H = -0.5 * np.einsum("bi,bi->b", t, h)
    # Var(H | t): equal bond pairs + pairs of bonds sharing exactly one site (see module docstring)
    same = 0.5 * (W2.sum() - np.einsum("bi,bi->b", t2, (W2 @ t2.T).T))
    shared = np.einsum("bk,bk->b", 1.0 - t2, h * h - (W2 @ t2.T).T)
    var_H = np.maximum(same + shared, 0.0)  # exact arithmetic gives >= 0; clip rounding
    return {"energy": mean_H / N, "energy_sq": (mean_H**2 + var_H) / N**2}


# ---------------------------------------------------------------------- jackknife
def _block_starts(B: int, n_blocks: int) -> np.ndarray:
    sizes = np.full(n_blocks, B // n_blocks)
    sizes[: B % n_blocks] += 1
    return np.concatenate([[0], np.cumsum(sizes)[:-1]])


def _leave_one_block_out(
    values: np.ndarray,
    log_weights: np.ndarray | None,
    n_blocks: int,
    derived: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """derived(⟨O_1⟩, …, ⟨O_K⟩) from all samples and with each contiguous block left out.

    Args:
        values: per-sample observables, shape (B, K).
        log_weights: ln w, shape (B,), or None for equal weights.
        n_blocks: number of contiguous blocks.
        derived: maps means of shape (..., K) to results of shape (..., M).

    Returns:
        (full, theta): shapes (M,) and (n_blocks, M); the means are (weighted) sample means.
    """
    B = values.shape[0]
    w = np.ones(B) if log_weights is None else np.exp(log_weights - log_weights.max())
    starts = _block_starts(B, n_blocks)
    bw = np.add.reduceat(w, starts)  # (nb,)
    bwo = np.add.reduceat(w[:, None] * values, starts, axis=0)  # (nb, K)
    tw, two = bw.sum(), bwo.sum(0)
    full = derived(two / tw)
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = derived((two - bwo) / (tw - bw)[:, None])  # leave-one-block-out, (nb, M)
    return full, theta


_MOMENT_KEYS = ("m", "abs_m", "m2", "m4", "energy", "energy_sq")


def _prepare(moments: Mapping[str, object], N: int, beta: float | None, log_weights: object | None,
             n_blocks: int | None) -> tuple[np.ndarray, np.ndarray | None, int, list[str],
                                             Callable[[np.ndarray], np.ndarray]]:
    """Checked (values (B, K), ln w or None, n_blocks, output names, derived) of :func:`summarize`'s input."""
    unknown = set(moments) - set(_MOMENT_KEYS)
    if unknown or not moments:
        raise ValueError(f"moments keys must be among {_MOMENT_KEYS}, got {sorted(moments)}")
    if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 1:
        raise ValueError(f"N must be a positive integer, got N={N!r}")
    beta = _check_beta(beta)
    keys = [k for k in _MOMENT_KEYS if k in moments]
    cols = [np.asarray(_to_numpy(moments[k]), dtype=np.float64) for k in keys]
    shapes = {k: c.shape for k, c in zip(keys, cols)}
    if any(c.ndim != 1 for c in cols) or len(set(shapes.values())) != 1:
        raise ValueError(f"moments must be 1-D arrays of one common shape (B,), got shapes {shapes}")
    values = np.stack(cols, axis=1)
    B = values.shape[0]
    if B < 2:
        raise ValueError(f"summarize needs at least 2 samples for a jackknife error, got B={B}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"moments must be finite, got NaN/inf in shapes {shapes}")
    lw = None
    if log_weights is not None:
        lw = np.asarray(_to_numpy(log_weights), dtype=np.float64)
        if lw.shape != (B,):
            raise ValueError(f"log_weights must have shape (B,)=({B},) like the samples, got shape={lw.shape}")
        if np.isnan(lw).any() or np.isposinf(lw).any() or np.isneginf(lw).all():
            raise ValueError("log_weights must be free of NaN and +inf and not all -inf")
    if n_blocks is None:
        n_blocks = min(B, 100)
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, (int, np.integer)) or not 2 <= n_blocks <= B:
        raise ValueError(f"n_blocks must be an integer in [2, B={B}], got n_blocks={n_blocks!r}")

    col = {k: i for i, k in enumerate(keys)}
    names = list(keys)
    if {"m2", "m4"} <= col.keys():
        names.append("binder")
    if beta is not None and {"m2", "abs_m"} <= col.keys():
        names.append("susceptibility")
    if beta is not None and "m2" in col:
        names.append("susceptibility_m2")
    if beta is not None and {"energy", "energy_sq"} <= col.keys():
        names.append("specific_heat")

    def derived(mu: np.ndarray) -> np.ndarray:
        out = [mu[..., col[k]] for k in keys]
        with np.errstate(divide="ignore", invalid="ignore"):
            if "binder" in names:
                out.append(1.0 - mu[..., col["m4"]] / (3.0 * mu[..., col["m2"]] ** 2))
            if "susceptibility" in names:
                out.append(beta * N * (mu[..., col["m2"]] - mu[..., col["abs_m"]] ** 2))
            if "susceptibility_m2" in names:
                out.append(beta * N * mu[..., col["m2"]])
            if "specific_heat" in names:
                out.append(beta**2 * N * (mu[..., col["energy_sq"]] - mu[..., col["energy"]] ** 2))
        return np.stack(out, axis=-1)

    return values, lw, int(n_blocks), names, derived


def summarize(
    moments: Mapping[str, object],
    N: int,
    beta: float | None = None,
    log_weights: object | None = None,
    n_blocks: int | None = None,
) -> dict[str, Estimate]:
    """Averages and derived observables with block-jackknife errors from per-sample moments.

    Args:
        moments: per-sample arrays of shape (B,) with any of the keys ``m``, ``abs_m``,
            ``m2``, ``m4``, ``energy``, ``energy_sq`` (as returned by
            :func:`magnetisation_moments` and :func:`energy_moments`; per-site quantities).
        N: number of sites.
        beta: inverse temperature; needed for ``susceptibility``, ``susceptibility_m2`` and
            ``specific_heat`` (omitted when None).
        log_weights: importance log weights ln w, shape (B,), or None for plain averages;
            the weighted averages are self-normalised, Σ w O / Σ w.
        n_blocks: jackknife blocks in [2, B]; default min(B, 100). Blocks are contiguous in
            the sample order, so for a Markov chain they must be longer than τ.

    Returns:
        dict name → Estimate with the averages of the given moments plus, when their
        ingredients are present, ``binder`` = 1 − ⟨m⁴⟩/(3⟨m²⟩²), ``susceptibility`` =
        βN(⟨m²⟩ − ⟨|m|⟩²), ``susceptibility_m2`` = βN⟨m²⟩ and ``specific_heat`` =
        β²N(⟨e²⟩ − ⟨e⟩²) (per site).

    Raises:
        ValueError: unknown keys, arrays of different shapes, non-finite values, bad weights,
            B < 2 or bad n_blocks.
    """
    values, lw, n_blocks, names, derived = _prepare(moments, N, beta, log_weights, n_blocks)
    est, theta = _leave_one_block_out(values, lw, n_blocks, derived)
    err = np.sqrt((n_blocks - 1) / n_blocks * np.sum((theta - theta.mean(0)) ** 2, axis=0))  # block jackknife
    return {name: Estimate(float(v), float(e)) for name, v, e in zip(names, est, err)}


def influences(
    moments: Mapping[str, object],
    N: int,
    beta: float | None = None,
    log_weights: object | None = None,
) -> dict[str, np.ndarray]:
    """Each sample's contribution to each estimate of :func:`summarize`: ψ_b = (B − 1)(θ − θ_(−b)).

    θ is the estimate from all B samples and θ_(−b) the one without sample b (the jackknife's
    pseudo-values less θ). For a (self-normalised, weighted) mean ψ_b = w_b (O_b − ⟨O⟩)/w̄ up to
    O(1/B), and for a derived quantity f(⟨O⟩) the same with ∇f: the estimate's error is
    √(Σ ψ²)/B, so a heavy tail of |ψ| is a heavy tail of the error itself. Unlike the weights
    alone, ψ sees where large weights meet extreme values of the observable (below T_c: rare
    configurations between the two magnetised modes, which carry both).

    Arguments as :func:`summarize`. Returns dict name → array of shape (B,).
    """
    values, lw, _, names, derived = _prepare(moments, N, beta, log_weights, None)
    B = values.shape[0]
    full, theta = _leave_one_block_out(values, lw, B, derived)
    psi = (B - 1) * (full[None, :] - theta)
    return {name: psi[:, i] for i, name in enumerate(names)}


def measure(
    spins: object,
    lattice: object,
    beta: float | None = None,
    J: float = 1.0,
    log_weights: object | None = None,
    n_blocks: int | None = None,
) -> dict[str, Estimate]:
    """All Ising observables of a batch of configurations, with jackknife errors.

    Args:
        spins: ±1 spins or improved estimates tanh x, shape (B, N) (numpy or torch).
        lattice: a SquareLattice or a bond list of shape (E, 2).
        beta: inverse temperature for χ and C (omitted when None).
        J: coupling of H = −J Σ_bonds s_i s_j.
        log_weights: importance log weights, shape (B,), or None.
        n_blocks: jackknife blocks, default min(B, 100).

    Returns:
        dict name → Estimate, see :func:`summarize` for the keys and conventions.

    Example:
        >>> from latticeflow import SquareLattice
        >>> obs = measure(np.ones((4, 16)), SquareLattice(4), beta=0.4)
        >>> obs["energy"].value, obs["binder"].value
        (-2.0, 0.6666666666666667)
    """
    t = _check_spins(spins)
    return summarize(moments_of(t, lattice, J), t.shape[1], beta=beta, log_weights=log_weights, n_blocks=n_blocks)


def moments_of(spins: object, lattice: object, J: float = 1.0) -> dict[str, np.ndarray]:
    """Per-sample magnetisation and energy moments (:func:`magnetisation_moments` and
    :func:`energy_moments` together), the input of :func:`summarize` and :func:`influences`."""
    t = _check_spins(spins)
    moments = magnetisation_moments(t)
    moments.update(energy_moments(t, lattice, J))
    return moments

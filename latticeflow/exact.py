r"""Exact references for the 2D Ising model: Kaufman, Onsager, enumeration, transfer matrix.

Notation: an L×L lattice has N = L² sites, numbered i = row·L + col. The partition function
of a configuration-space Ising model with symmetric couplings K (N, N) is

    Z = Σ_s exp(½ sᵀKs),     s ∈ {±1}^N,

and the nearest-neighbour model has K = β·J·A with A the adjacency matrix counting bond
multiplicity, i.e. Z = Σ_s exp(βJ Σ_<ij> s_i s_j) with every bond counted once (on the
periodic L=2 torus each neighbour pair is joined by two bonds, so A_ij = 2 and there are
still 2N bonds). Everything here is float64.

Finite periodic lattice (Kaufman 1949, eq. 39). With K = βJ,

    Z = ½ (2 sinh 2K)^{N/2} (Z₁ + Z₂ + Z₃ + Z₄),
    Z₁ = Π_{r=0}^{L-1} 2 cosh(L γ_{2r+1}/2),    Z₂ = Π_{r=0}^{L-1} 2 sinh(L γ_{2r+1}/2),
    Z₃ = Π_{r=0}^{L-1} 2 cosh(L γ_{2r}/2),      Z₄ = Π_{r=0}^{L-1} 2 sinh(L γ_{2r}/2),
    cosh γ_k = cosh 2K coth 2K − cos(πk/L),    γ_0 = 2K + ln tanh K.

γ_k > 0 for k ≠ 0, while γ_0 carries a sign: negative for β < β_c, zero at β_c, positive
above, and Z₄ changes sign with it. The evaluation is done in log space without
cancellation: cosh γ_k − 1 = (s − 1)²/s + 2 sin²(πk/2L) with s = sinh 2K, so
γ_k = log1p(δ + √(δ(δ+2))); and the four terms are grouped as

    Z₁ + Z₂ = Z₁ (1 + Π_r tanh(Lγ_{2r+1}/2)),
    Z₃ + Z₄ = Z₃ (1 + t₀ p) = Z₃ (2σ(2x₀) − t₀ (1 − p)),

with x₀ = Lγ_0/2, t₀ = tanh x₀, p = Π_{r≥1} tanh(Lγ_{2r}/2) and σ the logistic function.
The last form adds two non-negative numbers when x₀ < 0 (high temperature, where 1 + t₀p → 0)
and is ≥ 1 when x₀ ≥ 0, so it never cancels and is analytic through β_c: autograd gives exact
first and second derivatives (internal energy, specific heat) even at γ_0 = 0.

Infinite lattice (Onsager 1944). Per site,

    ln Z/N = ln 2 + 1/(8π²) ∫₀^{2π}∫₀^{2π} ln[cosh² 2K − sinh 2K (cos θ₁ + cos θ₂)] dθ₁ dθ₂;

the θ₂ integral is done in closed form, (1/π)∫₀^π ln(a − b cos θ) dθ = ln[(a + √(a² − b²))/2],
leaving one smooth quadrature. The internal energy per site is

    U/N = −J coth 2K [1 + (2/π)(2 tanh² 2K − 1) K₁(k)],   k = 2 sinh 2K / cosh² 2K,

with K₁ the complete elliptic integral of the first kind of modulus k (scipy's parameter is
m = k²; we pass 1 − m = (1 − s²)²/cosh⁴ 2K to ``ellipkm1`` to keep precision near β_c).
The spontaneous magnetization (Yang 1952) is M = (1 − sinh(2K)^{-4})^{1/8} for K > K_c, else 0.

References:
    B. Kaufman, "Crystal Statistics. II. Partition Function Evaluated by Spinor Analysis",
    Phys. Rev. 76, 1232 (1949), eq. 39.
    L. Onsager, "Crystal Statistics. I. A Two-Dimensional Model with an Order-Disorder
    Transition", Phys. Rev. 65, 117 (1944).
    C. N. Yang, "The Spontaneous Magnetization of a Two-Dimensional Ising Model",
    Phys. Rev. 85, 808 (1952).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from scipy import integrate, special
from torch import Tensor

__all__ = [
    "CRITICAL_BETA",
    "EnumerationResult",
    "enumerate_ising",
    "enumerate_log_z",
    "kaufman_free_energy",
    "kaufman_internal_energy",
    "kaufman_log_z",
    "kaufman_log_z_torch",
    "kaufman_specific_heat",
    "onsager_internal_energy",
    "onsager_log_z",
    "onsager_magnetization",
    "transfer_matrix_log_z",
]

CRITICAL_BETA: float = 0.5 * math.log1p(math.sqrt(2.0))
"""β_c = ½ ln(1 + √2) ≈ 0.4407 of the square-lattice Ising model with J = 1 (log1p: within half an ulp
of the true value, where ln(1 + √2) rounds 1 + √2 first and lands one ulp low). The one definition;
``latticeflow.critical`` is this number."""

MAX_ENUMERATION_SITES = 20  # 2^20 ≈ 10⁶ states
MAX_BETA_J = 150.0  # closed forms: sinh(2βJ)² must stay finite in float64
MAX_TRANSFER_L = 12  # 2^12 = 4096: dense float64 transfer matrices of 128 MiB
BOUNDARIES = ("periodic", "open")
_ENUMERATION_CHUNK = 1 << 15  # states per vectorised block


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_L(L: object, maximum: int | None = None) -> int:
    """Return L as an int if it is an integer >= 2 (and <= ``maximum`` when given).

    Raises:
        ValueError: quoting the bad value and the valid range.
    """
    expected = "an integer >= 2" if maximum is None else f"an integer in [2, {maximum}]"
    value = L
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"L must be {expected}, got L={L!r} of type {type(L).__name__}")
    if not isinstance(value, numbers.Integral):
        if not (math.isfinite(value) and float(value).is_integer()):
            raise ValueError(f"L must be {expected}, got L={L!r}")
    value = int(value)
    if value < 2 or (maximum is not None and value > maximum):
        raise ValueError(f"L must be {expected}, got L={L!r}")
    return value


def _check_positive(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number > 0.

    Raises:
        ValueError: quoting the bad value.
    """
    x = value
    if isinstance(x, Tensor) and x.numel() == 1:
        x = x.item()
    elif isinstance(x, np.ndarray) and x.size == 1:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a finite number > 0, got {name}={value!r} of type {type(value).__name__}")
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {name}={value!r}")
    return float(x)


def _check_beta(beta: object) -> float:
    """Return β as a float; β must be finite and > 0."""
    return _check_positive("beta", beta)


def _check_J(J: object) -> float:
    """Return J as a float; only ferromagnetic J > 0 has the closed forms used here."""
    return _check_positive("J", J)


def _check_coupling(beta: object, J: object) -> tuple[float, float]:
    """Return (β, J) for the closed forms: both finite and > 0, and βJ <= MAX_BETA_J.

    Beyond βJ ≈ 177 sinh² 2βJ overflows float64; there ln Z = ln 2 + 2NβJ to double precision
    anyway, so the closed forms refuse rather than return garbage derivatives.
    """
    b, j = _check_beta(beta), _check_J(J)
    if b * j > MAX_BETA_J:
        raise ValueError(
            f"beta*J must be <= {MAX_BETA_J:g} for the closed forms (sinh 2βJ overflows float64), "
            f"got beta={beta!r}, J={J!r} (beta*J={b * j:g})"
        )
    return b, j


def _check_boundary(boundary: object) -> str:
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {', '.join(map(repr, BOUNDARIES))}; got boundary={boundary!r}")
    return boundary  # type: ignore[return-value]


def _check_couplings(K: object) -> np.ndarray:
    """Return the couplings as a float64 (N, N) array: square, symmetric, finite, N <= 20.

    Raises:
        TypeError: K is not a real numeric array.
        ValueError: wrong shape, not symmetric, not finite, or too many sites.
    """
    if isinstance(K, Tensor):
        K = K.detach().cpu().numpy()
    try:
        arr = np.asarray(K)
    except Exception as err:  # pragma: no cover - exotic inputs
        raise TypeError(f"couplings must be a real (N, N) array, got {type(K).__name__}") from err
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"couplings must be a real (N, N) array, got {type(K).__name__} of dtype={arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"couplings must be a square (N, N) matrix with N >= 1, got shape={arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"couplings must be finite, got {int(np.sum(~np.isfinite(arr)))} non-finite entries")
    asym = float(np.max(np.abs(arr - arr.T)))
    if asym > 1e-12 * max(1.0, float(np.max(np.abs(arr)))):
        raise ValueError(f"couplings must be symmetric, got max |K - K^T| = {asym:.3g}")
    n = arr.shape[0]
    if n > MAX_ENUMERATION_SITES:
        raise ValueError(
            f"enumeration needs N <= {MAX_ENUMERATION_SITES} sites (2^N states), got N={n} (shape={arr.shape})"
        )
    return 0.5 * (arr + arr.T)


# ---------------------------------------------------------------------------------------------
# Kaufman: finite periodic L×L lattice
# ---------------------------------------------------------------------------------------------


def _log_tanh_np(y: np.ndarray) -> np.ndarray:
    """ln tanh y for y > 0, accurate both for small y and for y → ∞ (≈ −2e^{−2y})."""
    e = np.exp(-2.0 * y)
    return np.log(-np.expm1(-2.0 * y)) - np.log1p(e)


def _log_tanh_torch(y: Tensor) -> Tensor:
    """ln tanh y for y > 0 (see :func:`_log_tanh_np`); analytic for y > 0."""
    return torch.log(-torch.expm1(-2.0 * y)) - torch.log1p(torch.exp(-2.0 * y))


def _kaufman_gamma_np(L: int, K: float) -> tuple[float, np.ndarray]:
    """Return (γ_0 with its sign, γ_k for k = 1..2L−1)."""
    s = math.sinh(2.0 * K)
    k = np.arange(1, 2 * L, dtype=np.float64)
    # cosh γ_k − 1 = (s − 1)²/s + 2 sin²(πk/2L): both terms ≥ 0, no cancellation near β_c.
    delta = (s - 1.0) * ((s - 1.0) / s) + 2.0 * np.sin(np.pi * k / (2 * L)) ** 2
    gamma = np.log1p(delta + np.sqrt(delta) * np.sqrt(delta + 2.0))
    gamma0 = 2.0 * K + float(_log_tanh_np(np.array(K)))
    return gamma0, gamma


def _kaufman_log_z_np(L: int, K: float) -> float:
    gamma0, gamma = _kaufman_gamma_np(L, K)
    x0 = 0.5 * L * gamma0
    x = 0.5 * L * gamma  # x[j] belongs to k = j + 1
    x_odd, x_even = x[0::2], x[1::2]  # k = 1, 3, ..., 2L−1 and k = 2, 4, ..., 2L−2
    log2cosh = lambda y: np.logaddexp(y, -y)  # noqa: E731  ln(2 cosh y), no overflow
    # Z₁ + Z₂ = Z₁ (1 + e^{S_odd}), S_odd = Σ ln tanh ≤ 0.
    log_a = np.sum(log2cosh(x_odd)) + np.log1p(np.exp(np.sum(_log_tanh_np(x_odd))))
    # Z₃ + Z₄ = Z₃ (2σ(2x₀) − tanh(x₀)(1 − p)), p = Π_{r≥1} tanh(Lγ_{2r}/2).
    one_minus_p = -np.expm1(np.sum(_log_tanh_np(x_even)))
    bracket = 2.0 * special.expit(2.0 * x0) - math.tanh(x0) * one_minus_p
    log_b = log2cosh(x0) + np.sum(log2cosh(x_even)) + (np.log(bracket) if bracket > 0 else -np.inf)
    n = L * L
    log_2sinh2k = 2.0 * K + math.log(-math.expm1(-4.0 * K))
    return float(-math.log(2.0) + 0.5 * n * log_2sinh2k + np.logaddexp(log_a, log_b))


def kaufman_log_z(L: int, beta: float, J: float = 1.0) -> float:
    """ln Z of the periodic L×L Ising model from Kaufman's closed form (1949, eq. 39).

    Z = Σ_s exp(βJ Σ_<ij> s_i s_j) over the 2N bonds of the torus (for L = 2 each neighbour
    pair is joined twice). Evaluated in log space: finite and accurate to ~1e-16 relative
    for all βJ in (0, 150] and L up to thousands, including β exactly at β_c.

    Args:
        L: linear size, an integer >= 2.
        beta: inverse temperature, finite and > 0.
        J: ferromagnetic coupling, finite and > 0.

    Returns:
        ln Z (not per site).

    Raises:
        ValueError: L, beta or J out of range, or beta*J > 150.

    Example:
        >>> round(kaufman_log_z(2, 0.5) - math.log(2 * math.exp(4.0) + 12 + 2 * math.exp(-4.0)), 12)
        0.0
    """
    L = _check_L(L)
    beta, J = _check_coupling(beta, J)
    return _kaufman_log_z_np(L, beta * J)


def kaufman_log_z_torch(L: int, beta: Tensor | float, J: float = 1.0) -> Tensor:
    """Differentiable float64 torch version of :func:`kaufman_log_z`.

    The same grouping of the four terms is used (see the module docstring), written with
    analytic functions only, so first and second derivatives with respect to ``beta`` are
    exact even at γ_0 = 0 (β = β_c).

    Args:
        L: linear size, an integer >= 2.
        beta: inverse temperature, a scalar float or a 0-dim tensor (possibly requiring grad).
        J: ferromagnetic coupling, finite and > 0.

    Returns:
        ln Z, a 0-dim float64 tensor (differentiable in ``beta`` when it requires grad).

    Raises:
        ValueError: L, beta or J out of range, or beta*J > 150.
    """
    L = _check_L(L)
    if isinstance(beta, Tensor) and beta.numel() != 1:
        raise ValueError(f"beta must be a scalar (a float or a 1-element tensor), got shape={tuple(beta.shape)}")
    _, J = _check_coupling(beta, J)
    if isinstance(beta, Tensor):
        b = beta.reshape(()).to(torch.float64)
    else:
        b = torch.tensor(float(beta), dtype=torch.float64)
    K = b * J
    s = torch.sinh(2.0 * K)
    k = torch.arange(1, 2 * L, dtype=torch.float64)
    delta = (s - 1.0) * ((s - 1.0) / s) + 2.0 * torch.sin(math.pi * k / (2 * L)) ** 2
    gamma = torch.log1p(delta + torch.sqrt(delta) * torch.sqrt(delta + 2.0))
    gamma0 = 2.0 * K + _log_tanh_torch(K)
    x0 = 0.5 * L * gamma0
    x = 0.5 * L * gamma
    x_odd, x_even = x[0::2], x[1::2]

    def log2cosh(y: Tensor) -> Tensor:
        # ln(2 cosh y) = a + log1p(e^{−2a}) with a = |y| written as a `where` of two linear
        # branches, so autograd's first and second derivatives are exactly tanh y and sech² y,
        # also at y = 0 (torch's abs has zero second derivative there, and logaddexp's double
        # backward returns NaN once e^{−2y} underflows).
        a = torch.where(y >= 0, y, -y)
        return a + torch.log1p(torch.exp(-2.0 * a))

    log_a = log2cosh(x_odd).sum() + torch.nn.functional.softplus(_log_tanh_torch(x_odd).sum(), threshold=1e9)
    one_minus_p = -torch.expm1(_log_tanh_torch(x_even).sum())
    bracket = 2.0 * torch.sigmoid(2.0 * x0) - torch.tanh(x0) * one_minus_p
    # The bracket underflows to 0 only deep in the high-temperature phase of a large lattice,
    # where Z₃ + Z₄ is < 1e-300 of Z₁ + Z₂; the guard keeps the backward pass finite there.
    tiny = torch.finfo(torch.float64).tiny
    bracket = torch.where(bracket > 0, bracket, torch.full_like(bracket, tiny))
    log_b = log2cosh(x0) + log2cosh(x_even).sum() + torch.log(bracket)
    n = L * L
    log_2sinh2k = 2.0 * K + torch.log(-torch.expm1(-4.0 * K))
    return -math.log(2.0) + 0.5 * n * log_2sinh2k + torch.logaddexp(log_a, log_b)


def _kaufman_derivatives(L: int, beta: float, J: float) -> tuple[float, float, float]:
    """Return (ln Z, d ln Z/dβ, d² ln Z/dβ²) by float64 autograd through the closed form."""
    b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
    log_z = kaufman_log_z_torch(L, b, J)
    (d1,) = torch.autograd.grad(log_z, b, create_graph=True)
    (d2,) = torch.autograd.grad(d1, b)
    return log_z.item(), d1.item(), d2.item()


def kaufman_free_energy(L: int, beta: float, J: float = 1.0) -> float:
    """Dimensionless free energy per site, −ln Z / N, of the periodic L×L lattice.

    Args:
        L: linear size, an integer >= 2.
        beta: inverse temperature, finite and > 0.
        J: ferromagnetic coupling, finite and > 0.

    Returns:
        −ln Z / N (= β f per site).
    """
    L = _check_L(L)
    return -kaufman_log_z(L, beta, J) / (L * L)


def kaufman_internal_energy(L: int, beta: float, J: float = 1.0) -> float:
    """Internal energy per site U/N = ⟨−J Σ_<ij> s_i s_j⟩/N = −(1/N) d ln Z/dβ.

    The derivative is exact float64 autograd through :func:`kaufman_log_z_torch`.

    Args:
        L: linear size, an integer >= 2.
        beta: inverse temperature, finite and > 0.
        J: ferromagnetic coupling, finite and > 0.

    Returns:
        U/N in units where the bond energy is −J s_i s_j (so U/N → −2J as β → ∞).
    """
    L = _check_L(L)
    beta, J = _check_coupling(beta, J)
    _, d1, _ = _kaufman_derivatives(L, beta, J)
    return -d1 / (L * L)


def kaufman_specific_heat(L: int, beta: float, J: float = 1.0) -> float:
    """Specific heat per site C/N = β² (d² ln Z/dβ²)/N = β² Var(E)/N (k_B = 1).

    The second derivative is exact float64 autograd through :func:`kaufman_log_z_torch`.

    Args:
        L: linear size, an integer >= 2.
        beta: inverse temperature, finite and > 0.
        J: ferromagnetic coupling, finite and > 0.

    Returns:
        C/N, dimensionless.
    """
    L = _check_L(L)
    beta, J = _check_coupling(beta, J)
    _, _, d2 = _kaufman_derivatives(L, beta, J)
    return beta * beta * d2 / (L * L)


# ---------------------------------------------------------------------------------------------
# Onsager: infinite lattice
# ---------------------------------------------------------------------------------------------


def onsager_log_z(beta: float, J: float = 1.0) -> float:
    """ln Z / N of the infinite square lattice (Onsager 1944).

    The double integral ln 2 + (1/8π²)∫∫ ln[cosh² 2K − sinh 2K (cos θ₁ + cos θ₂)] is reduced to
    a single smooth quadrature by doing the θ₂ integral in closed form:
    ln Z/N = ln 2 + (1/2π) ∫₀^π ln[(a + √(a² − s²))/2] dθ, a = cosh² 2K − s cos θ, s = sinh 2K.

    Args:
        beta: inverse temperature, finite and > 0.
        J: ferromagnetic coupling, finite and > 0.

    Returns:
        ln Z / N (= −β f).
    """
    beta, J = _check_coupling(beta, J)
    K = beta * J
    s = math.sinh(2.0 * K)
    c2 = math.cosh(2.0 * K) ** 2

    def integrand(theta: float) -> float:
        # a − s = c2 − s(1 + cos θ) and a + s = c2 + s(1 − cos θ); a − s = (1 − s)² + 2s sin²(θ/2)
        # via cosh² = 1 + s², written without cancellation near β_c, θ = 0.
        a = c2 - s * math.cos(theta)
        a_minus_s = (1.0 - s) ** 2 + 2.0 * s * math.sin(0.5 * theta) ** 2
        a_plus_s = a + s
        return math.log(0.5 * (a + math.sqrt(a_minus_s * a_plus_s)))

    # Near β_c the integrand varies on the scale θ ~ |1 − s| close to θ = 0 (a √ branch point
    # approaches the real axis); geometric break points let quad resolve it.
    width = abs(1.0 - s) / math.sqrt(s)
    points = [width * 10.0**j for j in range(0, 20) if 0.0 < width * 10.0**j < 1.0]
    value, _ = integrate.quad(
        integrand, 0.0, math.pi, points=points or None, epsabs=1e-13, epsrel=1e-13, limit=400
    )
    return math.log(2.0) + value / (2.0 * math.pi)


def onsager_internal_energy(beta: float, J: float = 1.0) -> float:
    """Internal energy per site of the infinite lattice, U/N = −d(ln Z/N)/dβ.

    U/N = −J coth 2K [1 + (2/π)(2 tanh² 2K − 1) K₁(k)], k = 2 sinh 2K / cosh² 2K, with K₁ the
    complete elliptic integral of the first kind (``scipy.special.ellipkm1`` of 1 − k²). At
    β_c the logarithmic divergence of K₁ is multiplied by zero and U/N = −√2 J.

    Args:
        beta: inverse temperature, finite and > 0.
        J: ferromagnetic coupling, finite and > 0.

    Returns:
        U/N, with bond energy −J s_i s_j.
    """
    beta, J = _check_coupling(beta, J)
    K = beta * J
    s = math.sinh(2.0 * K)
    c2 = 1.0 + s * s  # cosh² 2K
    one_minus_m = (1.0 - s * s) ** 2 / (c2 * c2)  # 1 − k², exact form, no cancellation
    factor = (s * s - 1.0) / c2  # 2 tanh² 2K − 1
    elliptic = 0.0 if factor == 0.0 else factor * float(special.ellipkm1(one_minus_m))
    coth = math.sqrt(c2) / s
    return -J * coth * (1.0 + 2.0 / math.pi * elliptic)


def onsager_magnetization(beta: float, J: float = 1.0) -> float:
    """Spontaneous magnetization per site of the infinite lattice (Yang 1952).

    M = (1 − sinh(2βJ)^{-4})^{1/8} for βJ > β_c, and 0 for βJ <= β_c.

    Args:
        beta: inverse temperature, finite and > 0.
        J: ferromagnetic coupling, finite and > 0.

    Returns:
        M in [0, 1).
    """
    beta, J = _check_coupling(beta, J)
    K = beta * J
    if K <= CRITICAL_BETA:
        return 0.0
    x = 1.0 - math.sinh(2.0 * K) ** -4
    return max(x, 0.0) ** 0.125


# ---------------------------------------------------------------------------------------------
# Brute-force enumeration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnumerationResult:
    """Exact Boltzmann averages from enumerating all 2^N configurations of Z = Σ_s e^{½ sᵀKs}.

    Attributes:
        log_z: ln Z.
        energy: ⟨−½ sᵀKs⟩/N (equals β·U/N when K = βJA).
        energy_sq: ⟨(−½ sᵀKs)²⟩/N², so C/N = N (energy_sq − energy²).
        abs_m: ⟨|m|⟩ with m = Σ_i s_i / N.
        m2: ⟨m²⟩.
        m4: ⟨m⁴⟩.
        n_sites: N.
    """

    log_z: float
    energy: float
    energy_sq: float
    abs_m: float
    m2: float
    m4: float
    n_sites: int

    @property
    def specific_heat(self) -> float:
        """C/N = Var(½ sᵀKs)/N = N (energy_sq − energy²); equals β² Var(E_phys)/N for K = βJA."""
        return self.n_sites * (self.energy_sq - self.energy * self.energy)

    @property
    def binder(self) -> float:
        """Binder cumulant U₄ = 1 − ⟨m⁴⟩ / (3⟨m²⟩²)."""
        return 1.0 - self.m4 / (3.0 * self.m2 * self.m2)


def _spins_block(start: int, stop: int, n: int) -> np.ndarray:
    """Spins of states start..stop−1, shape (stop − start, n), bit i of the state ↔ site i."""
    states = np.arange(start, stop, dtype=np.int64)
    bits = (states[:, None] >> np.arange(n, dtype=np.int64)) & 1
    return (1 - 2 * bits).astype(np.float64)


def _enumerate(K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the log-weights ½ sᵀKs and magnetizations m of all 2^N states, each shape (2^N,)."""
    n = K.shape[0]
    total = 1 << n
    log_w = np.empty(total, dtype=np.float64)
    mag = np.empty(total, dtype=np.float64)
    for start in range(0, total, _ENUMERATION_CHUNK):
        stop = min(start + _ENUMERATION_CHUNK, total)
        s = _spins_block(start, stop, n)
        log_w[start:stop] = 0.5 * np.einsum("bi,bi->b", s @ K, s)
        mag[start:stop] = s.sum(axis=1) / n
    return log_w, mag


def enumerate_log_z(K: np.ndarray) -> float:
    """ln Z = ln Σ_s exp(½ sᵀKs) by enumerating all 2^N spin configurations.

    Args:
        K: symmetric finite couplings, shape (N, N) with N <= 20 (a torch tensor is accepted).

    Returns:
        ln Z.

    Raises:
        TypeError: K is not a real array.
        ValueError: K not square, not symmetric, not finite, or N > 20.
    """
    K = _check_couplings(K)
    log_w, _ = _enumerate(K)
    return float(special.logsumexp(log_w))


def enumerate_ising(K: np.ndarray) -> EnumerationResult:
    """Exact ln Z and Boltzmann averages by enumerating all 2^N spin configurations.

    With E(s) = −½ sᵀKs (dimensionless, i.e. β times the physical energy when K = βJA):
    energy = ⟨E⟩/N, energy_sq = ⟨E²⟩/N², and for m = Σ_i s_i/N: ⟨|m|⟩, ⟨m²⟩, ⟨m⁴⟩.
    Takes ~0.05 s at N = 16 and ~1 s at N = 20.

    Args:
        K: symmetric finite couplings, shape (N, N) with N <= 20 (a torch tensor is accepted).

    Returns:
        An :class:`EnumerationResult`.

    Raises:
        TypeError: K is not a real array.
        ValueError: K not square, not symmetric, not finite, or N > 20.
    """
    K = _check_couplings(K)
    n = K.shape[0]
    log_w, mag = _enumerate(K)
    log_z = float(special.logsumexp(log_w))
    p = np.exp(log_w - log_z)
    energy = -log_w / n
    m2 = mag * mag
    return EnumerationResult(
        log_z=log_z,
        energy=float(p @ energy),
        energy_sq=float(p @ (energy * energy)),
        abs_m=float(p @ np.abs(mag)),
        m2=float(p @ m2),
        m4=float(p @ (m2 * m2)),
        n_sites=n,
    )


# ---------------------------------------------------------------------------------------------
# Row-to-row transfer matrix
# ---------------------------------------------------------------------------------------------


def _row_spins(L: int) -> np.ndarray:
    """All 2^L row configurations, shape (2^L, L)."""
    return _spins_block(0, 1 << L, L)


def _normalised_product(a: tuple[np.ndarray, float], b: tuple[np.ndarray, float]) -> tuple[np.ndarray, float]:
    """(A, ln α)(B, ln β) = (AB/n, ln α + ln β + ln n) with n = max(AB): A, B positive matrices."""
    prod = a[0] @ b[0]
    norm = float(prod.max())
    return prod / norm, a[1] + b[1] + math.log(norm)


def _log_trace_power(log_t: np.ndarray, power: int) -> float:
    """ln tr T^power for a positive matrix T given entrywise as ln T, by normalised squaring."""
    shift = float(log_t.max())
    base = (np.exp(log_t - shift), shift)
    result: tuple[np.ndarray, float] | None = None
    # Binary powering on all but the last factor, then tr(AB) = Σ_ij A_ij B_ji (no final matmul).
    bits = bin(power)[2:][::-1]
    factors = []
    for i, bit in enumerate(bits):
        if bit == "1":
            factors.append(base)
        if i < len(bits) - 1:
            base = _normalised_product(base, base)
    for factor in factors[:-1]:
        result = factor if result is None else _normalised_product(result, factor)
    last = factors[-1]
    if result is None:
        return float(math.log(np.trace(last[0])) + last[1])
    trace = float(np.sum(result[0] * last[0].T))
    return math.log(trace) + result[1] + last[1]


def transfer_matrix_log_z(L: int, beta: float, J: float = 1.0, boundary: str = "periodic") -> float:
    """ln Z of the L×L nearest-neighbour Ising model from the row-to-row transfer matrix.

    With rows σ ∈ {±1}^L, row energy E_row(σ) = K Σ_c σ_c σ_{c+1} (wrapping c = L−1 → 0 only for
    periodic boundaries) and K = βJ, the symmetric transfer matrix is
    T(σ, σ') = exp(½E_row(σ) + K σ·σ' + ½E_row(σ')), so

        periodic: Z = tr T^L,     open: Z = vᵀ T^{L−1} v,  v(σ) = exp(½E_row(σ)).

    For L = 2 periodic the wrap-around counts each neighbour pair twice, as on the torus.
    Products are renormalised at every step and the scales accumulated in log space.

    Args:
        L: linear size, an integer in [2, 12] (T is 2^L × 2^L).
        beta: inverse temperature, finite and > 0.
        J: coupling, finite and > 0.
        boundary: ``"periodic"`` or ``"open"``.

    Returns:
        ln Z.

    Raises:
        ValueError: bad L, beta, J or boundary.
    """
    L = _check_L(L, maximum=MAX_TRANSFER_L)
    K = _check_beta(beta) * _check_J(J)
    boundary = _check_boundary(boundary)
    s = _row_spins(L)
    if boundary == "periodic":
        e_row = K * np.sum(s * np.roll(s, -1, axis=1), axis=1)
    else:
        e_row = K * np.sum(s[:, :-1] * s[:, 1:], axis=1)
    log_t = s @ s.T
    log_t *= K
    log_t += 0.5 * e_row[:, None]
    log_t += 0.5 * e_row[None, :]
    if boundary == "periodic":
        return _log_trace_power(log_t, L)
    # Open: apply T (L − 1) times to v, renormalising the vector each time.
    shift = float(log_t.max())
    t = np.exp(log_t - shift, out=log_t)
    log_v = 0.5 * e_row
    v_shift = float(log_v.max())
    v = np.exp(log_v - v_shift)
    log_scale = v_shift
    for _ in range(L - 1):
        v = t @ v
        norm = float(v.max())
        v /= norm
        log_scale += shift + math.log(norm)
    final = np.exp(0.5 * e_row - v_shift)
    return float(math.log(final @ v) + log_scale + v_shift)

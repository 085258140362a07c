"""Real scalar φ⁴ theory on the periodic L×L lattice: the target, exact free-theory values, observables.

Two parametrisations of the same model (d = 2 dimensions, μ over the two lattice directions,
x + μ the periodic neighbour):

mass form (Albergo, Kanwar & Shanahan, "Flow-based generative models for Markov chain Monte
Carlo in lattice field theory", arXiv:1904.12072, eq. 2, as written there)::

    S_m(φ) = Σ_x [ −2 Σ_μ φ_x φ_{x+μ} + (m² + 2d) φ_x² + λ φ_x⁴ ]  =  φᵀ(−Δ + m²)φ + λ Σ_x φ_x⁴

hopping form (Lüscher & Weisz)::

    S_h(φ̃) = Σ_x [ −2κ Σ_μ φ̃_x φ̃_{x+μ} + φ̃_x² + λ̃ (φ̃_x² − 1)² ]

The map between them. Substituting φ = √κ φ̃ in S_m and matching the hopping term gives

    κ (m² + 2d) = 1 − 2λ̃,   λ κ² = λ̃,   S_m(√κ φ̃) = S_h(φ̃) − N λ̃,

so m² = (1 − 2λ̃)/κ − 2d, λ = λ̃/κ², and in the other direction κ is the positive root of
2λκ² + (m² + 2d)κ − 1 = 0 (κ = 1/(m² + 2d) at λ = 0). The scale is √κ, not the √(2κ) familiar
from the continuum normalisation ½(∂φ)² + ½m²φ²: S_m has no factor ½ (its kinetic term is
Σ_x Σ_μ (φ_{x+μ} − φ_x)²). With dφ = κ^{N/2} dφ̃ (the Jacobian):

    ln Z_m = ln Z_h + (N/2) ln κ + N λ̃.

Both forms are one action S = Σ_x [ −2h Σ_μ φ_x φ_{x+μ} + c φ_x² + g φ_x⁴ ] + N s with
(h, c, g, s) = (1, m² + 2d, λ, 0) or (κ, 1 − 2λ̃, λ̃, λ̃), which :class:`Phi4` implements.

Free theory (g = 0). S = ½ φᵀMφ with M = 2(c − 2h Σ_μ cos k_μ) in the Fourier basis
k = 2π(n₁, n₂)/L (in the mass form M_k = 2(p̂² + m²), p̂² = Σ_μ 4 sin²(k_μ/2)), so

    ln Z = (N/2) ln 2π − ½ Σ_k ln M_k,     ⟨φ_x φ_0⟩ = (1/N) Σ_k e^{ik·x} / M_k,

χ = Σ_x G(x) = 1/M_0 and, in the mass form, the second-moment correlation length ξ = 1/m exactly.
The formula holds for every L ≥ 2 (on L = 2 the neighbours x ± μ coincide and the bond is counted
twice, as the sum over x and μ says). The action is bounded below iff g > 0, or g = 0 and
min_k M_k > 0 (m² > 0; κ < 1/4).

Symbols: B batch, N = L² sites, site i = row·L + col (as :class:`~latticeflow.lattice.SquareLattice`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import check_batch, check_finite, check_size
from .lattice import SquareLattice
from .stats import jackknife_stderr, kish_ess
from .symmetry import SymmetryGroup, space_group

__all__ = ["Phi4", "phi4", "phi4_hopping", "mass_to_hopping", "hopping_to_mass", "observables", "DIM"]

DIM = 2  # lattice dimension d


# ---------------------------------------------------------------------- parameter checks and the map
def _check_lam(name: str, value: object) -> float:
    v = check_finite(name, value)
    if v < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (the action is unbounded below otherwise), "
                         f"got {name}={value!r}")
    return v


def _check_mass(m2: object, lam: float) -> float:
    m2 = check_finite("m2", m2)
    if lam == 0 and m2 <= 0:
        raise ValueError(f"m2 must be > 0 when lam = 0 (the free action is unbounded below otherwise), got m2={m2!r}")
    return m2


def _check_kappa(kappa: object, lam_tilde: float) -> float:
    k = check_finite("kappa", kappa)
    if k < 0:
        raise ValueError(f"kappa must be a finite number >= 0, got kappa={kappa!r}")
    if lam_tilde == 0 and k >= 1 / (2 * DIM):
        raise ValueError(f"kappa must be < 1/{2 * DIM} when lam_tilde = 0 (the free action is unbounded below "
                         f"otherwise), got kappa={kappa!r}")
    return k


def mass_to_hopping(m2: float, lam: float) -> tuple[float, float]:
    """(κ, λ̃) of the hopping form for the mass-form (m², λ): the positive root of 2λκ² + (m²+2d)κ − 1 = 0.

    Raises:
        ValueError: bad (m², λ) (see :func:`phi4`).
    """
    lam = _check_lam("lam", lam)
    m2 = _check_mass(m2, lam)
    b = m2 + 2 * DIM
    if lam == 0:
        kappa = 1 / b  # b > 2d > 0 here
    else:  # the root with κ > 0 (the product of the roots is −1/(2λ) < 0); written without cancellation
        kappa = 2 / (b + math.sqrt(b * b + 8 * lam))
    return kappa, lam * kappa * kappa


def hopping_to_mass(kappa: float, lam_tilde: float) -> tuple[float, float]:
    """(m², λ) of the mass form for the hopping-form (κ, λ̃), κ > 0: m² = (1 − 2λ̃)/κ − 2d, λ = λ̃/κ².

    Raises:
        ValueError: bad (κ, λ̃), or κ = 0 (decoupled sites have no mass form).
    """
    lam_tilde = _check_lam("lam_tilde", lam_tilde)
    kappa = _check_kappa(kappa, lam_tilde)
    if kappa == 0:
        raise ValueError("kappa must be > 0 for the mass form (phi = sqrt(kappa) * phi_tilde), got kappa=0")
    return (1 - 2 * lam_tilde) / kappa - 2 * DIM, lam_tilde / kappa**2


# ---------------------------------------------------------------------- the target
class Phi4:
    """The φ⁴ action S = Σ_x [−2h Σ_μ φ_x φ_{x+μ} + c φ_x² + g φ_x⁴] + N s on the periodic L×L lattice.

    Build with :func:`phi4` (mass form) or :func:`phi4_hopping` (hopping form); see the module
    docstring for both and the map between them.

    Attributes:
        N: number of sites L².
        L: linear size.
        lattice: the periodic :class:`~latticeflow.lattice.SquareLattice`.
        form: ``"mass"`` or ``"hopping"``.
        m2, lam: mass-form parameters (None for a hopping target with κ = 0).
        kappa, lam_tilde: hopping-form parameters.
    """

    def __init__(self, L: int, form: str, m2: float | None, lam: float | None, kappa: float, lam_tilde: float) -> None:
        self.L, self.N = L, L * L
        with warnings.catch_warnings():  # the L = 2 double-bond warning is about Ising couplings; S counts them as written
            warnings.simplefilter("ignore")
            self.lattice = SquareLattice(L, "periodic")
        self.form = form
        self.m2, self.lam, self.kappa, self.lam_tilde = m2, lam, kappa, lam_tilde
        if form == "mass":
            self.hopping, self.quadratic, self.quartic, self.shift = 1.0, m2 + 2 * DIM, lam, 0.0
        else:
            self.hopping, self.quadratic, self.quartic, self.shift = kappa, 1 - 2 * lam_tilde, lam_tilde, lam_tilde

    # ------------------------------------------------------------ action
    def energy(self, x: Tensor) -> Tensor:
        """S(x) for fields x of shape (B, N) (or (N,)); returns shape (B,), differentiable in x."""
        x = check_batch(x, self.N)
        f = x.reshape(-1, self.L, self.L)
        # Σ_x Σ_μ φ_x φ_{x+μ}: one roll per direction counts each bond once (twice on L = 2, as the formula)
        hop = (f * (torch.roll(f, -1, 1) + torch.roll(f, -1, 2))).sum((1, 2))
        x2 = x * x
        return -2 * self.hopping * hop + self.quadratic * x2.sum(-1) + self.quartic * (x2 * x2).sum(-1) + self.N * self.shift

    __call__ = energy

    def grad(self, x: Tensor) -> Tensor:
        """∇S(x) = −2h Σ_μ (φ_{x+μ} + φ_{x−μ}) + 2cφ + 4gφ³, shape (B, N)."""
        x = check_batch(x, self.N)
        f = x.reshape(-1, self.L, self.L)
        nb = (torch.roll(f, -1, 1) + torch.roll(f, 1, 1) + torch.roll(f, -1, 2) + torch.roll(f, 1, 2)).reshape(x.shape)
        return -2 * self.hopping * nb + 2 * self.quadratic * x + 4 * self.quartic * x**3

    def symmetry_group(self) -> SymmetryGroup:
        """The invariance group of S: translations × D4 × Z2 (φ → −φ), 16N elements."""
        return space_group(self.lattice).with_spin_flip()

    # ------------------------------------------------------------ the other parametrisation
    def to_mass(self) -> "Phi4":
        """The same model in the mass form (field φ = √κ φ̃ of this target's φ̃ when it is a hopping one)."""
        return self if self.form == "mass" else phi4(self.L, *hopping_to_mass(self.kappa, self.lam_tilde))

    def to_hopping(self) -> "Phi4":
        """The same model in the hopping form (φ̃ = φ/√κ)."""
        return self if self.form == "hopping" else phi4_hopping(self.L, self.kappa, self.lam_tilde)

    @property
    def free_energy_offsets(self) -> dict[str, float]:
        """F/N offsets: this form's −ln Z/N (0) and the other's, from ln Z_m = ln Z_h + (N/2) ln κ + N λ̃."""
        if self.kappa == 0:
            return {"hopping": 0.0}
        to_hopping = 0.5 * math.log(self.kappa) + self.lam_tilde  # F_h/N − F_m/N
        return {"mass": 0.0, "hopping": to_hopping} if self.form == "mass" else {"hopping": 0.0, "mass": -to_hopping}

    # ------------------------------------------------------------ free theory: exact values
    def spectrum(self) -> Tensor:
        """M_k = 2(c − 2h Σ_μ cos k_μ), the Fourier eigenvalues of the quadratic part, shape (L, L), float64."""
        k = 2 * math.pi * torch.arange(self.L, dtype=torch.float64) / self.L
        cos = torch.cos(k)
        return 2 * (self.quadratic - 2 * self.hopping * (cos[:, None] + cos[None, :]))

    def _check_free(self) -> Tensor:
        if self.quartic != 0:
            raise ValueError(f"no exact ln Z for the interacting theory ({self!r}); exact values exist for "
                             "lam = 0 only (HMC references: benchmarks/phi4.py --hmc)")
        return self.spectrum()

    def exact_log_z(self) -> float:
        """ln Z = (N/2) ln 2π − ½ Σ_k ln M_k − N s of the free theory.

        Raises:
            ValueError: λ > 0 (no closed form).
        """
        mk = self._check_free()
        return 0.5 * self.N * math.log(2 * math.pi) - 0.5 * float(torch.log(mk).sum()) - self.N * self.shift

    def exact_free_energy(self, per_site: bool = True) -> float:
        """Exact −ln Z (per site by default) of the free theory; ValueError for λ > 0."""
        f = -self.exact_log_z()
        return f / self.N if per_site else f

    def exact_propagator(self) -> Tensor:
        """⟨φ_x φ_0⟩ = (1/N) Σ_k e^{ik·x}/M_k of the free theory, shape (L, L) indexed by x = (row, col), float64."""
        return torch.fft.ifft2(1 / self._check_free()).real

    def exact_observables(self) -> dict[str, float]:
        """Free-theory values of :func:`observables`' scalars: χ = 1/M_0, ξ (second moment), Binder 0, ⟨m²⟩ = χ/N,
        ⟨|m|⟩ = √(2⟨m²⟩/π), S/N = ½ (equipartition: ⟨½φᵀMφ⟩ = N/2)."""
        mk = self._check_free()
        chi = float(1 / mk[0, 0])
        p1 = 4 * math.sin(math.pi / self.L) ** 2
        xi2 = float(mk[0, 1] / mk[0, 0] - 1) / p1
        m2 = chi / self.N
        return {"m": 0.0, "abs_m": math.sqrt(2 * m2 / math.pi), "m2": m2, "chi": chi, "binder": 0.0,
                "xi": math.sqrt(xi2), "action_density": 0.5 + self.shift}

    def best_gaussian(self, tol: float = 1e-13) -> dict[str, Any]:
        """The translation-invariant Gaussian q = N(0, Σ) closest to e^{−S} in reverse KL (Hartree).

        With S = ½ φᵀMφ + g Σ_x φ_x⁴ + N s and Σ of Fourier eigenvalues s_k, v = ⟨φ_x²⟩_q =
        mean_k s_k: F = ½ Σ_k s_k M_k + 3 g N v² − ½ Σ_k ln s_k − (N/2)(1 + ln 2π) + N s, and
        ∂F/∂s_k = 0 gives s_k = 1/(M_k + 12 g v), self-consistent in v (bisection). For g = 0
        it is the free theory itself (F exact); for g > 0 it is the mean-field (Hartree) mass
        M_k + 12gv > 0, which exists even where M_0 < 0 (m² < 0). The flow's quadratic part can
        start here (:func:`latticeflow.build.start_at_best_gaussian`).

        Returns:
            dict with ``spectrum`` (s_k, (L, L) float64 in FFT order), ``v`` and ``free_energy``
            (F/N of q, an upper bound of −ln Z/N).
        """
        M, g = self.spectrum(), float(self.quartic)
        if g == 0:
            spec = 1.0 / M
        else:
            def excess(v: float) -> float:  # mean_k s_k(v) − v, decreasing in v where M_k + 12gv > 0
                return float((1.0 / (M + 12 * g * v)).mean()) - v

            lo = max(0.0, -float(M.min()) / (12 * g)) * (1 + 1e-12) + 1e-300
            hi = max(lo * 2, 1.0)
            while excess(hi) > 0:
                hi *= 2
            while hi - lo > tol * hi:
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
            spec = 1.0 / (M + 12 * g * hi)
        v = float(spec.mean())
        F = (0.5 * float((spec * M).sum()) + 3 * g * self.N * v**2 - 0.5 * float(torch.log(spec).sum())
             - 0.5 * self.N * (1 + math.log(2 * math.pi))) / self.N + self.shift
        return {"spectrum": spec, "v": v, "free_energy": F}

    def sample_free(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples of the free theory: φ = M^{−1/2} z by FFT, shape (n, N), float64."""
        mk = self._check_free()
        z = torch.randn(n, self.L, self.L, generator=generator, dtype=torch.float64)
        return torch.fft.ifft2(torch.fft.fft2(z) / mk.sqrt()).real.reshape(n, self.N)

    def __repr__(self) -> str:
        if self.form == "mass":
            return f"Phi4(L={self.L}, m2={self.m2:g}, lam={self.lam:g})"
        return f"Phi4(L={self.L}, kappa={self.kappa:g}, lam_tilde={self.lam_tilde:g})"


def phi4(L: int = 6, m2: float = -4.0, lam: float = 6.975) -> Phi4:
    """φ⁴ in the mass form S = Σ_x[−2Σ_μ φ_xφ_{x+μ} + (m² + 4)φ_x² + λφ_x⁴] on the periodic L×L lattice.

    The default is the standard point of Albergo, Kanwar & Shanahan (arXiv:1904.12072): L=6, m²=−4, λ=6.975.

    Args:
        L: linear size, an integer >= 2.
        m2: bare mass squared, finite (> 0 when lam = 0).
        lam: quartic coupling, finite and >= 0.

    Raises:
        ValueError: L < 2, non-finite or negative lam, non-finite m2, or m2 <= 0 with lam = 0.

    Example:
        >>> round(phi4(L=4, m2=1.0, lam=0.0).exact_free_energy(), 10)
        0.1786332384
    """
    L = check_size("L", L, minimum=2)
    lam = _check_lam("lam", lam)
    m2 = _check_mass(m2, lam)
    kappa, lam_tilde = mass_to_hopping(m2, lam)
    return Phi4(L, "mass", m2, lam, kappa, lam_tilde)


def phi4_hopping(L: int = 6, kappa: float = 0.25, lam_tilde: float = 0.5) -> Phi4:
    """φ⁴ in the hopping form S = Σ_x[−2κΣ_μ φ̃_xφ̃_{x+μ} + φ̃_x² + λ̃(φ̃_x² − 1)²].

    Args:
        L: linear size, an integer >= 2.
        kappa: hopping parameter, finite and >= 0 (< 1/4 when lam_tilde = 0).
        lam_tilde: quartic coupling, finite and >= 0.

    Raises:
        ValueError: L < 2, bad kappa or lam_tilde.
    """
    L = check_size("L", L, minimum=2)
    lam_tilde = _check_lam("lam_tilde", lam_tilde)
    kappa = _check_kappa(kappa, lam_tilde)
    m2, lam = hopping_to_mass(kappa, lam_tilde) if kappa > 0 else (None, None)
    return Phi4(L, "hopping", m2, lam, kappa, lam_tilde)


# ---------------------------------------------------------------------- observables
def _primaries(x: Tensor, L: int) -> Tensor:
    """Per-sample quantities whose (weighted) means the observables are built from, shape (B, 5 + N):
    m, |m|, m², m⁴, then C(y) = (1/N) Σ_x φ_x φ_{x+y} for the N displacements y."""
    f = x.reshape(-1, L, L).double()
    m = f.mean((1, 2))
    fk = torch.fft.fft2(f)
    corr = torch.fft.ifft2(fk * fk.conj()).real.reshape(len(f), -1) / (L * L)
    return torch.cat([torch.stack([m, m.abs(), m**2, m**4], 1), corr], 1)


def _derived(mean: np.ndarray, action: np.ndarray, L: int) -> dict[str, np.ndarray]:
    """Observables from the means of the primaries (last axis), for any leading shape (jackknife blocks)."""
    N = L * L
    m, am, m2, m4 = (mean[..., i] for i in range(4))
    G = mean[..., 4:].reshape(mean.shape[:-1] + (L, L)) - (m**2)[..., None, None]  # connected G(y)
    Gt = 0.5 * (G.sum(-1) + G.sum(-2))  # zero-momentum projection G(t), both directions averaged
    chi = G.sum((-1, -2))
    k = 2 * math.pi / L
    c = np.cos(k * np.arange(L))
    g1 = 0.5 * ((G * c[:, None]).sum((-1, -2)) + (G * c[None, :]).sum((-1, -2)))  # G̃ at the smallest momentum
    with np.errstate(divide="ignore", invalid="ignore"):
        xi2 = (chi / g1 - 1) / (4 * math.sin(math.pi / L) ** 2)
        binder = 1 - m4 / (3 * m2**2)
    return {"m": m, "abs_m": am, "m2": m2, "chi": N * (m2 - m**2), "binder": binder,
            "xi": np.sqrt(xi2), "action_density": action / N, "G": G, "G_t": Gt}


def observables(x: Tensor, target: Phi4, log_weights: Tensor | None = None, n_blocks: int = 20) -> dict[str, Any]:
    """Lattice observables of φ⁴ samples, plain or importance-reweighted, with block-jackknife errors.

    m = (1/N) Σ_x φ_x. Scalars: ⟨m⟩, ⟨|m|⟩, ⟨m²⟩, χ = N(⟨m²⟩ − ⟨m⟩²) = Σ_y G(y), Binder cumulant
    U = 1 − ⟨m⁴⟩/(3⟨m²⟩²), ξ from the second moment ξ² = (G̃(0)/G̃(p₁) − 1)/p̂₁² (p₁ = 2π/L,
    p̂₁² = 4 sin²(π/L)), action density ⟨S⟩/N. Arrays: the connected G(y) = ⟨φ_x φ_{x+y}⟩ − ⟨m⟩²
    (averaged over x), shape (L, L), and its zero-momentum projection G(t) = Σ_{y₁} G(y₁, t), shape (L,).
    With ``log_weights`` (ln w = −S − ln q for flow samples) every mean is Σ w O / Σ w.

    Args:
        x: field configurations, shape (B, N), B >= n_blocks.
        target: the :class:`Phi4` target (lattice and action).
        log_weights: ln w, shape (B,), or None for plain means.
        n_blocks: jackknife blocks (consecutive: use blocks longer than a chain's autocorrelation).

    Returns:
        dict name → value (float, or ndarray for ``G`` and ``G_t``); name + ``_err`` its jackknife
        error; ``ess``: Kish ESS / B (1 without weights).
    """
    x = check_batch(x, target.N).detach()
    B = x.shape[0]
    n_blocks = check_size("n_blocks", n_blocks, minimum=2)
    if B < n_blocks:
        raise ValueError(f"observables needs at least n_blocks={n_blocks} samples, got B={B}")
    prim = _primaries(x, target.L).cpu().numpy()
    act = target.energy(x.double()).cpu().numpy()
    if log_weights is None:
        w = np.ones(B)
    else:
        lw = log_weights.detach().double().cpu().numpy()
        if lw.shape != (B,) or np.isnan(lw).any():
            raise ValueError(f"log_weights must have shape ({B},) without NaN, got shape={lw.shape}")
        w = np.exp(lw - lw.max())
    wp = np.concatenate([w[:, None] * prim, (w * act)[:, None], w[:, None]], 1)
    blocks = np.stack([b.sum(0) for b in np.array_split(wp, n_blocks)])  # (n_blocks, P + 2)
    total = blocks.sum(0)

    def est(s: np.ndarray) -> dict[str, np.ndarray]:
        return _derived(s[..., :-2] / s[..., -1:], s[..., -2] / s[..., -1], target.L)

    full, jack = est(total), est(total[None] - blocks)
    out: dict[str, Any] = {}
    for k, v in full.items():
        out[k] = float(v) if np.ndim(v) == 0 else v
        out[k + "_err"] = float(jackknife_stderr(jack[k])) if np.ndim(v) == 0 else jackknife_stderr(jack[k])
    out["ess"] = 1.0 if log_weights is None else float(kish_ess(torch.from_numpy(np.log(w))))
    return out

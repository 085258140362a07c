"""The Ising model as a continuous target: the Hubbard-Stratonovich (HS) representation.

Notation: N sites, couplings K (N, N) symmetric, Z_Ising = Σ_s exp(½ sᵀKs) over s ∈ {±1}^N
(paper eq. 10); for the nearest-neighbour model K = β·J·A with A the adjacency matrix
counting bond multiplicity. Shift M = K + αI with α chosen so that the smallest eigenvalue
of M is 0.1 (paper appendix B). Gaussian integration then gives the continuous energy

    E(x) = ½ xᵀ M⁻¹ x − Σ_i ln cosh x_i                               (paper eq. 8)

whose partition function Z_HS = ∫ dx e^{−E(x)} satisfies

    −ln Z_HS = −ln Z_Ising − ½ ln det M + (N/2) [ln(2/π) − α]          (appendix B)

Derivation of the constant: ∫dx exp(−½xᵀM⁻¹x + sᵀx) = (2π)^{N/2} det(M)^{1/2} exp(½ sᵀMs) and
½ sᵀMs = ½ sᵀKs + αN/2 for s_i² = 1, while Σ_s e^{sᵀx} = 2^N Π cosh x_i.

Spins are recovered from p(s_i | x) = σ(2 s_i x_i); tanh x_i is the improved estimator of
⟨s_i⟩ given x. On the periodic lattice M is circulant, so M⁻¹x and ln det M use the 2D FFT
(O(N log N), no N×N matrix); arbitrary couplings (any graph, spin glasses) use a dense
eigendecomposition, for small N.

Reference: Zhang, E & Wang, "Monge-Ampère Flow for Generative Modeling", arXiv:1809.10188.
"""

from __future__ import annotations

import math

import networkx as nx
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import check_batch, check_beta, check_choice, check_finite, check_positive, check_size
from .exact import CRITICAL_BETA
from .lattice import SquareLattice
from .potentials.activations import log_cosh  # the one ln cosh; importable from here

critical: float = CRITICAL_BETA
"""β_c = ½ ln(1 + √2) of the square-lattice Ising model (J = 1): :data:`latticeflow.exact.CRITICAL_BETA`."""

MIN_EIGENVALUE = 0.1  # smallest eigenvalue of M = K + αI (paper appendix B)


def _check_beta(beta: object) -> float:
    return check_beta(beta)  # type: ignore[return-value]


class IsingHS:
    """Continuous HS target for an Ising model with couplings K.

    Build with :func:`ising` (square lattice), :meth:`from_couplings` or :meth:`from_graph`.

    Attributes:
        N: number of sites (the dimension of x).
        alpha: the diagonal shift α.
        eigenvalues: eigenvalues of M = K + αI, shape (N,), float64 (all >= 0.1).
        lattice: the SquareLattice, or None for general couplings.
        beta: inverse temperature where known, else None.
    """

    def __init__(
        self,
        *,
        kernel: Tensor | None = None,
        couplings: np.ndarray | None = None,
        lattice: SquareLattice | None = None,
        beta: float | None = None,
        J: float | None = None,
    ) -> None:
        self.lattice, self.beta, self.J = lattice, beta, J
        if kernel is not None:
            # circulant: eigenvalues of K are the 2D DFT of its first row (an (L, L) image)
            self._L = kernel.shape[0]
            self.N = kernel.numel()
            lam = torch.fft.fft2(kernel).real
            self.alpha = MIN_EIGENVALUE - float(lam.min())
            self._mu = lam + self.alpha  # (L, L) eigenvalues of M
            self.eigenvalues = self._mu.reshape(-1)
            self._dense = None
        else:
            K = np.asarray(couplings, dtype=np.float64)
            self.N = K.shape[0]
            lam, Q = np.linalg.eigh(K)
            self.alpha = MIN_EIGENVALUE - float(lam[0])
            mu = lam + self.alpha
            self.eigenvalues = torch.from_numpy(mu)
            self._dense = torch.from_numpy((Q / mu) @ Q.T)  # M⁻¹
            self._couplings = K
        self._mu_cache: dict = {}

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_couplings(cls, couplings: np.ndarray | Tensor, beta: float | None = None) -> "IsingHS":
        """Target for Z = Σ_s exp(½ sᵀKs) with arbitrary symmetric couplings K (dense path).

        Args:
            couplings: K, shape (N, N), symmetric and finite (β already included).
            beta: optional label; not applied to K.

        Raises:
            ValueError: K not square, not symmetric or not finite.
        """
        K = np.asarray(couplings.detach().cpu() if isinstance(couplings, Tensor) else couplings, dtype=np.float64)
        if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] < 1:
            raise ValueError(f"couplings must be a square (N, N) matrix, got shape={K.shape}")
        if not np.all(np.isfinite(K)):
            raise ValueError("couplings must be finite, got NaN or inf entries")
        if not np.allclose(K, K.T, rtol=0, atol=1e-12 * max(1.0, np.abs(K).max())):
            raise ValueError(f"couplings must be symmetric, got max |K - K^T| = {np.abs(K - K.T).max():.3g}")
        return cls(couplings=0.5 * (K + K.T), beta=beta)

    @classmethod
    def from_graph(cls, graph: nx.Graph, beta: float, J: float = 1.0, weight: str | None = "weight") -> "IsingHS":
        """Target for the Ising model on any networkx graph: K = β·J·A (multi-edges add up).

        Edge attribute ``weight`` (default 1) multiplies J per bond, so a spin glass is a
        graph with ±1 weights.
        """
        beta = _check_beta(beta)
        J = check_finite("J", J)
        A = nx.to_numpy_array(graph, weight=weight, nodelist=sorted(graph.nodes()))
        return cls.from_couplings(beta * J * A, beta=beta)

    # ------------------------------------------------------------ linear algebra
    def couplings(self) -> np.ndarray:
        """K as a dense (N, N) float64 matrix (small N; the FFT path never builds it)."""
        if self._dense is not None:
            return self._couplings
        L = self._L
        k = torch.fft.ifft2(self._mu - self.alpha).real.reshape(-1).numpy()  # first row of K
        r, c = np.divmod(np.arange(self.N), L)
        dr = (r[None, :] - r[:, None]) % L
        dc = (c[None, :] - c[:, None]) % L
        return k[dr * L + dc]

    @property
    def log_det(self) -> float:
        """ln det M, float64."""
        return float(torch.log(self.eigenvalues).sum())

    def _spectrum(self, x: Tensor) -> Tensor:
        key = (x.dtype, x.device)
        if key not in self._mu_cache:
            self._mu_cache[key] = self._mu.to(dtype=x.dtype, device=x.device)
        return self._mu_cache[key]

    def apply_inverse(self, x: Tensor) -> Tensor:
        """M⁻¹ x for a batch, shape (B, N) → (B, N)."""
        if self._dense is not None:
            return x @ self._dense.to(x)
        L = self._L
        img = x.reshape(-1, L, L)
        mu = self._spectrum(x)[:, : L // 2 + 1]
        return torch.fft.irfft2(torch.fft.rfft2(img) / mu, s=(L, L)).reshape(x.shape)

    # ------------------------------------------------------------ energy
    def energy(self, x: Tensor) -> Tensor:
        """E(x) = ½ xᵀM⁻¹x − Σ ln cosh x_i (eq. 8).

        Args:
            x: field configurations, shape (B, N), float32 or float64.
        Returns:
            energies, shape (B,).
        """
        x = check_batch(x, self.N)
        return 0.5 * (x * self.apply_inverse(x)).sum(-1) - log_cosh(x).sum(-1)

    def grad(self, x: Tensor) -> Tensor:
        """∇E(x) = M⁻¹x − tanh x, shape (B, N)."""
        x = check_batch(x, self.N)
        return self.apply_inverse(x) - torch.tanh(x)

    __call__ = energy

    # ------------------------------------------------------------ constants and exact values
    @property
    def log_z_offset(self) -> float:
        """ln Z_HS − ln Z_Ising = ½ ln det M + (N/2)(ln(π/2) + α)."""
        return 0.5 * self.log_det + 0.5 * self.N * (math.log(math.pi / 2) + self.alpha)

    @property
    def free_energy_offsets(self) -> dict[str, float]:
        """Offsets per site from this target's F/N (−ln Z_HS/N) to each normalisation: ``hs`` (0) and
        ``ising`` (F_Ising/N = F_HS/N + (ln Z_HS − ln Z_Ising)/N), as logged by variational training."""
        return {"hs": 0.0, "ising": self.log_z_offset / self.N}

    def exact_log_z_ising(self) -> float:
        """Exact ln Z_Ising: Kaufman (periodic square lattice), transfer matrix (open, L <= 12)
        or enumeration (general couplings, N <= 20).

        Raises:
            ValueError: when no exact method covers this system.
        """
        from . import exact

        lat = self.lattice
        if lat is not None and lat.periodic:
            return exact.kaufman_log_z(lat.L, self.beta, self.J)
        if lat is not None and lat.L <= 12:
            return exact.transfer_matrix_log_z(lat.L, self.beta, self.J, boundary=lat.boundary)
        if self.N <= 20:
            return exact.enumerate_log_z(self.couplings())
        raise ValueError(f"no exact ln Z for this system (N={self.N}): open lattices need L <= 12, general couplings N <= 20")

    def exact_log_z(self) -> float:
        """Exact ln Z_HS = ln Z_Ising + log_z_offset."""
        return self.exact_log_z_ising() + self.log_z_offset

    def exact_free_energy(self, per_site: bool = True) -> float:
        """Exact −ln Z_HS (per site by default): the lower bound of the variational loss (eq. 7)."""
        f = -self.exact_log_z()
        return f / self.N if per_site else f

    def to_ising_free_energy(self, free_energy_hs: float, per_site: bool = True) -> float:
        """Convert an HS free energy −ln Z_HS (per site if ``per_site``) into −ln Z_Ising."""
        off = self.log_z_offset / self.N if per_site else self.log_z_offset
        return free_energy_hs + off

    def best_gaussian(self, tol: float = 1e-12) -> dict[str, Any]:
        """The translation-invariant Gaussian q = N(0, Σ) closest to e^{−E} in reverse KL, in closed form.

        Σ is circulant with eigenvalues s_k (those of M are m_k). With v = Σ_ii = mean_k s_k and
        g(v) = E[ln cosh(√v ξ)], ξ ~ N(0, 1), the variational free energy of q is

            F(s) = ½ Σ_k s_k/m_k − N g(v) − ½ Σ_k ln s_k − (N/2)(1 + ln 2π),

        and ∂F/∂s_k = 0 gives s_k = m_k/(1 − c m_k) with c = 2g'(v) = E[sech²(√v ξ)] (Stein's
        lemma), a one-dimensional fixed point in v solved by bisection (the Gaussian averages
        by the trapezoid rule on ξ ∈ [−14, 14], spectrally accurate for these analytic integrands). This is where a flow whose potential is ½ xᵀAx starts
        best: x(T) = e^{AT} z has covariance e^{2AT}, so A has eigenvalues ln(s_k)/(2T)
        (:meth:`latticeflow.potentials.QuadraticPotential.set_covariance`).

        Returns:
            dict with ``spectrum`` (s_k as an (L, L) float64 tensor in FFT order), ``v``,
            ``c`` and ``free_energy`` (F/N of q, HS normalisation: an upper bound of the exact one).

        Raises:
            ValueError: a target with dense couplings (no translation invariance).
        """
        if self._dense is not None:
            raise ValueError("best_gaussian needs a translation-invariant (periodic lattice) target")
        m = self._mu.double()
        xi, wq = gaussian_average_grid()

        def c_of(v: float) -> float:
            return float((wq / np.cosh(math.sqrt(v) * xi) ** 2).sum())

        def excess(v: float) -> float:  # mean_k s_k(v) − v, decreasing in v on the valid range
            c = c_of(v)
            if c * float(m.max()) >= 1.0:
                return math.inf
            return float((m / (1.0 - c * m)).mean()) - v

        lo, hi = 1e-8, float(m.max()) * 10 + 10.0
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            if excess(mid) > 0:
                lo = mid
            else:
                hi = mid
            if hi / lo - 1 < tol:
                break
        v = hi
        c = c_of(v)
        spec = m / (1.0 - c * m)
        g = float((wq * log_cosh(torch.from_numpy(math.sqrt(float(spec.mean())) * xi)).numpy()).sum())
        F = (0.5 * (spec / m).sum() - self.N * g - 0.5 * torch.log(spec).sum()
             - 0.5 * self.N * (1 + math.log(2 * math.pi))) / self.N
        return {"spectrum": spec, "v": float(spec.mean()), "c": c, "free_energy": float(F)}

    def __repr__(self) -> str:
        where = repr(self.lattice) if self.lattice is not None else f"couplings N={self.N}"
        return f"IsingHS({where}, beta={self.beta}, J={self.J}, alpha={self.alpha:.6g})"


def ising(L: int = 8, beta: float | str = critical, J: float = 1.0, boundary: str = "periodic") -> IsingHS:
    """The HS target of the nearest-neighbour Ising model on an L×L square lattice.

    Args:
        L: linear size, integer >= 2 (default 8, as the built-in default run, IsingConfig).
        beta: inverse temperature > 0, or ``"critical"`` for β_c = ½ ln(1+√2).
        J: ferromagnetic coupling, finite and > 0 (the exact references are Kaufman's ferromagnet;
            the antiferromagnet on an even torus is the same model with one sublattice flipped).
        boundary: ``"periodic"`` (FFT path) or ``"open"`` (dense path).

    Returns:
        an :class:`IsingHS` target; ``target.energy(x)`` takes x of shape (B, L²).

    Example:
        >>> target = ising(L=16, beta=critical)
        >>> round(target.exact_free_energy(), 10)
        -2.3159208588
    """
    L = check_size("L", L, minimum=2)
    beta = _check_beta(beta)
    J = check_positive("J", J)
    check_choice("boundary", boundary, ("periodic", "open"))
    lat = SquareLattice(L, boundary)
    if lat.periodic:
        return IsingHS(kernel=beta * J * lat.coupling_kernel(), lattice=lat, beta=beta, J=J)
    t = IsingHS.from_couplings(beta * J * lat.adjacency(), beta=beta)
    t.lattice, t.J = lat, J
    return t


# ---------------------------------------------------------------------- spins
def gaussian_average_grid(n: int = 4001, half_width: float = 14.0) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ξ and weights w with Σ w f(ξ) ≈ E f(ξ), ξ ~ N(0, 1) (trapezoid rule, error ~1e-15 for analytic f)."""
    xi = np.linspace(-half_width, half_width, n)
    w = np.exp(-0.5 * xi**2)
    return xi, w / w.sum()


def sample_spins(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw Ising spins from p(s_i | x) = σ(2 s_i x_i), independently per site.

    Args:
        x: field configurations, shape (B, N).
        generator: optional torch.Generator for reproducibility.
    Returns:
        spins ±1 with the dtype of x, shape (B, N).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating torch.Tensor, got {type(x).__name__}")
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return torch.where(u < torch.sigmoid(2 * x), 1.0, -1.0).to(x.dtype)


def improved_spins(x: Tensor) -> Tensor:
    """E[s_i | x] = tanh x_i, the lower-variance (Rao-Blackwellised) spin estimator, shape of x."""
    return torch.tanh(x)

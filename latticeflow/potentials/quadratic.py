"""The quadratic potential φ(x) = ½ xᵀAx + bᵀx, whose flow is exactly Gaussian.

"Monge-Ampère Flow for Generative Modeling" (Zhang, E, Wang, arXiv:1809.10188), appendix A:

    ∇φ = Ax + b,      ∇²φ = tr A,

the same Laplacian for every sample, so log p changes by exactly −t·tr A and
x(t) = e^{At} x(0) + (e^{At} − 1)A⁻¹b. On a periodic L1×L2 lattice A is circulant,
A_ij = a(r_i − r_j), with one parameter per orbit of displacements
(``latticeflow.symmetry.displacement_orbits``), and is applied by a real 2D FFT:
A x = irfft2(x̂ · â) (â is real because a(dr) = a(−dr)), tr A = N·a(0). On small lattices
(N ≤ ``DENSE_MAX_SITES``) the FFTs cost more in per-call overhead than they save, and A is
applied as one (N, N) matmul, gathered from the same orbit parameters at every evaluation
(``python benchmarks/quadratic_speed.py`` prints the ratio of the two, forward and backward).

Symbols: B batch, N = L1·L2 sites (or dim), t time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_size
from ..symmetry import displacement_orbits
from .base import Evaluation, Noise, Potential, _at_time, _is_scalar_time

__all__ = ["DENSE_MAX_SITES", "QuadraticPotential"]

#: The largest lattice (sites) on which ``method="auto"`` applies the circulant A as a dense matmul: one
#: evaluation (forward + backward, batch 256, 1 thread) ran 2.22x faster than the FFTs at L=4, 2.05x at L=8,
#: 1.37x at L=12 and 0.72x at L=16 (``python benchmarks/quadratic_speed.py --sizes 4 8 12 16 --threads 1``; README).
DENSE_MAX_SITES = 144


def _displacements(L1: int, L2: int) -> tuple[Tensor, Tensor]:
    """Row and column indices of r_i − r_j on the L1×L2 torus, each (N, N), sites in row-major order."""
    r, c = torch.meshgrid(torch.arange(L1), torch.arange(L2), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    return (r[:, None] - r[None, :]) % L1, (c[:, None] - c[None, :]) % L2


def _lattice_shape(shape: object) -> tuple[int, int]:
    """(L1, L2) from a pair of positive integers; ValueError naming the bad value otherwise."""
    if isinstance(shape, (tuple, list)) and len(shape) == 2:
        return check_size("L1", shape[0]), check_size("L2", shape[1])
    raise ValueError(f"lattice_shape must be an int N or a pair (L1, L2), got {shape!r}")


class QuadraticPotential(Potential):
    """φ(x) = ½ xᵀAx + bᵀx with an exactly Gaussian flow (paper appendix A).

    ∇φ = Ax + b and ∇²φ = tr A, the same for every sample, so log p changes by exactly
    −t·tr A and x(t) = e^{At} x(0) + (e^{At} − 1)A⁻¹b.

    On an L1×L2 periodic lattice (``lattice_shape=(L1, L2)``) A is circulant,
    A_ij = a(r_i − r_j), with a kernel over displacement orbits: a(dr) = a(−dr) always
    (``symmetric="translation"``), and also D4-invariant with ``symmetric="d4"`` (square
    lattices). A is applied with a 2D real FFT in O(N log N) (``method="fft"``), or as a dense
    (N, N) matrix gathered from the orbit parameters (``method="dense"``, O(N²) per sample but
    one matmul); ``method="auto"`` takes the dense matmul up to ``DENSE_MAX_SITES`` sites, where
    it is measured faster, and the FFT above. tr A = N·a(0). The linear term is b = c·1
    (translation invariant); ``linear=False`` drops it, making φ Z2-even. ``symmetric="none"``
    (the only choice when ``lattice_shape`` is an int N) uses a dense symmetric A = (M + Mᵀ)/2
    and a free b: O(N²) per sample.

    Time dependence: every parameter θ becomes θ + t·θ', with θ' initialised at zero.
    All parameters start at zero: the initial flow is the identity.

    Args:
        lattice_shape: (L1, L2) for a lattice, or an int N for an unstructured vector.
        symmetric: ``"d4"``, ``"translation"`` or ``"none"``.
        linear: include the linear term b.
        time_dependent: parameters vary linearly in t.
        method: how a lattice potential applies A: ``"auto"``, ``"fft"`` or ``"dense"`` (same
            parameters and values; per-sample times (B,) always take the FFT).
    """

    def __init__(self, lattice_shape: int | tuple[int, int], symmetric: str = "d4", linear: bool = True,
                 time_dependent: bool = False, method: str = "auto") -> None:
        super().__init__()
        self.symmetric = check_choice("symmetric", symmetric, ("d4", "translation", "none"))
        if isinstance(lattice_shape, int) and not isinstance(lattice_shape, bool):
            self.dim = check_size("lattice_shape", lattice_shape)
            self.shape = None
            if symmetric != "none":
                raise ValueError(f"symmetric={symmetric!r} needs a lattice_shape (L1, L2), got the int "
                                 f"lattice_shape={lattice_shape}; use symmetric='none' for a plain vector")
        else:
            self.shape = _lattice_shape(lattice_shape)
            self.dim = self.shape[0] * self.shape[1]
            if symmetric == "d4" and self.shape[0] != self.shape[1]:
                raise ValueError(f"symmetric='d4' needs a square lattice, got lattice_shape={self.shape}")
        self.linear = bool(linear)
        self.time_dependent = bool(time_dependent)
        N = self.dim
        if self.symmetric == "none":
            self.register_buffer("orbits", None)
            n_a, b_shape = (N, N), (N,)
        else:
            orbits = displacement_orbits(*self.shape, d4=self.symmetric == "d4")
            self.register_buffer("orbits", orbits, persistent=False)
            n_a, b_shape = (int(orbits.max()) + 1,), ()
        self.register_buffer("pair_orbits", None, persistent=False)
        self.set_method(method)
        self.a = nn.Parameter(torch.zeros(n_a))
        self.a_t = nn.Parameter(torch.zeros(n_a)) if self.time_dependent else None
        self.b = nn.Parameter(torch.zeros(b_shape)) if self.linear else None
        self.b_t = nn.Parameter(torch.zeros(b_shape)) if self.linear and self.time_dependent else None

    def extra_repr(self) -> str:
        shape = self.shape if self.shape is not None else self.dim
        return (f"lattice_shape={shape}, symmetric={self.symmetric!r}, linear={self.linear}, "
                f"time_dependent={self.time_dependent}, method={self.method!r}")

    def set_method(self, method: str) -> None:
        """How a lattice potential applies A from now on: ``"auto"``, ``"fft"`` or ``"dense"``
        (values and parameters unchanged; see the class docstring)."""
        self.method = check_choice("method", method, ("auto", "fft", "dense"))
        small = self.dim <= DENSE_MAX_SITES
        self.dense = self.orbits is not None and (method == "dense" or (method == "auto" and small))
        if self.dense and self.pair_orbits is None:
            self.pair_orbits = self._pair_table()
        elif not self.dense:
            self.pair_orbits = None

    def invariant_under(self, group: Any) -> bool:
        """Whether A (and b) are invariant under every element of ``group`` whatever the
        parameters: A_{p(i) p(j)} and A_ij in the same displacement orbit for every permutation p,
        and no linear term if the group flips signs. Checked on the orbit table, on lattices of at
        most ``DENSE_MAX_SITES`` sites (False above: the check costs G·N² there, the saving is small)."""
        if self.orbits is None or self.dim > DENSE_MAX_SITES or getattr(group, "dim", None) != self.dim:
            return False
        if self.b is not None and bool((group.signs < 0).any()):
            return False
        pairs = self.pair_orbits if self.pair_orbits is not None else self._pair_table()
        perms = group.perms.long()
        for block in perms.split(64):  # (g, N, N) at a time
            if not bool((pairs[block[:, :, None], block[:, None, :]] == pairs).all()):
                return False
        return True

    def _pair_table(self) -> Tensor:
        """(N, N) orbit indices: A_ij = a[table[i, j]], the orbit of r_i − r_j."""
        return self.orbits[_displacements(*self.shape)]

    def kernel(self, t: Tensor | float = 0.0) -> Tensor:
        """The circulant kernel a(dr) as an (L1, L2) image (row 0 of A); (B, L1, L2) for t of shape (B,)."""
        if self.orbits is None:
            raise ValueError("kernel() exists only for lattice potentials (symmetric='d4' or 'translation')")
        return _at_time(self.a, self.a_t, t)[..., self.orbits]

    @torch.no_grad()
    def set_covariance(self, spectrum: Tensor, T: float) -> None:
        """Set A so that the flow of this potential alone maps N(0, I) to N(0, Σ) in time T.

        x(T) = e^{AT} z has covariance e^{2AT}: A = ln(Σ)/(2T), with Σ circulant of eigenvalues
        ``spectrum`` (an (L1, L2) tensor in FFT order, all > 0, invariant under this
        potential's symmetry). The linear and time-dependent parts are set to zero.

        Raises:
            ValueError: a non-lattice potential, a spectrum of the wrong shape or not positive,
                or T <= 0.
        """
        if self.orbits is None:
            raise ValueError("set_covariance needs a lattice potential (symmetric='d4' or 'translation')")
        spec = torch.as_tensor(spectrum, dtype=torch.float64)
        if tuple(spec.shape) != tuple(self.shape) or not bool((spec > 0).all()):
            raise ValueError(f"spectrum must be a positive tensor of shape {tuple(self.shape)}, got shape "
                             f"{tuple(spec.shape)}")
        if not T > 0:
            raise ValueError(f"T must be > 0, got T={T!r}")
        kernel = torch.fft.ifft2(torch.log(spec) / (2.0 * T)).real  # a(dr), an (L1, L2) image
        orbits = self.orbits.reshape(-1)
        n = int(orbits.max()) + 1
        total = torch.zeros(n, dtype=torch.float64).index_add_(0, orbits, kernel.reshape(-1))
        count = torch.zeros(n, dtype=torch.float64).index_add_(0, orbits, torch.ones_like(kernel.reshape(-1)))
        self.a.copy_((total / count).to(self.a))
        for p in (self.a_t, self.b, self.b_t):
            if p is not None:
                p.zero_()

    def _kernel_and_transform(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        K = self.kernel(t)
        return K, torch.fft.rfft2(K).real

    def matrix(self, t: float = 0.0) -> Tensor:
        """The dense matrix A, shape (N, N) (for tests and inspection; O(N²) memory)."""
        if self.orbits is None:
            M = _at_time(self.a, self.a_t, t)
            return 0.5 * (M + M.transpose(-1, -2))
        return self.kernel(t)[_displacements(*self.shape)]

    def _dense_parts(self) -> tuple[Tensor, Tensor | None]:
        """A's constant and time parts as dense (N, N) matrices, gathered from the orbit parameters."""
        return self.a[self.pair_orbits], None if self.a_t is None else self.a_t[self.pair_orbits]

    def dense_parts(self) -> tuple[Tensor, Tensor | None] | None:
        """(A0, A1) with A(t) = A0 + t A1 as dense (N, N) matrices (A1 None without time dependence),
        once per integration inside ``shared_constants``; None unless this is a dense lattice
        potential without a linear part (what the compiled RK4 step takes, latticeflow.native.step)."""
        if self.orbits is None or not self.dense or self.b is not None:
            return None
        return self._shared("dense", self._dense_parts)

    def _evaluate(self, x: Tensor, t: Tensor | float, noise: Noise, value: bool) -> Evaluation:
        B, N = x.shape
        if self.orbits is None:
            A = self.matrix(t)
            Ax = x @ A if A.dim() == 2 else torch.einsum("bij,bj->bi", A, x)
            lap = torch.diagonal(A, dim1=-2, dim2=-1).sum(-1).expand(B)
        elif self.dense and _is_scalar_time(t):
            A0, A1 = self._shared("dense", self._dense_parts)
            A = A0 if A1 is None else A0 + t * A1  # symmetric: a(dr) = a(−dr)
            Ax = x @ A
            lap = (N * A[0, 0]).expand(B)
        else:
            L1, L2 = self.shape
            # K(dr) = K(−dr) makes its Fourier transform real: A x = irfft2(x̂ · K̂)
            if self.a_t is None:
                K, khat = self._shared("kernel", lambda: self._kernel_and_transform(0.0))
            else:
                K, khat = self._kernel_and_transform(t)
            Ax = torch.fft.irfft2(torch.fft.rfft2(x.reshape(B, L1, L2)) * khat, s=(L1, L2)).reshape(B, N)
            lap = (N * K[..., 0, 0]).expand(B)
        grad = Ax
        phi = 0.5 * (x * Ax).sum(1) if value else None
        if self.b is not None:
            b = _at_time(self.b, self.b_t, t)
            if self.orbits is None:
                grad = grad + b
                if value:
                    phi = phi + (x * b).sum(1)
            else:
                b_col = b[:, None] if b.dim() == 1 else b
                grad = grad + b_col
                if value:
                    phi = phi + b * x.sum(1)
        return phi, grad, lap

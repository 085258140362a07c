"""Translation-invariant convolutional potential on the periodic L×L lattice, by FFT.

One circular k×k convolution with C channels, h = K ⋆ x + b, optionally a per-site (1×1)
layer g = V a(h) + b₂, and a sum over sites and channels (layers = 1, 2):

    φ = Σ_{c,s} w_c a(h_{c,s})        or        φ = Σ_{c,s} w_c a(g_{c,s}).

Both are φ = Σ_s F(h_{:,s}) with a per-site F of the C pre-activations; as ∂h_{c,s}/∂x_i =
K_c(i − s), the Laplacian is exactly ∇²φ = Σ_s tr(H_F(h_{:,s}) Γ) with the kernel Gram matrix
Γ_{cc'} = Σ_d K_c(d) K_{c'}(d) (see :class:`ConvPotential`), and ∇φ is the adjoint
convolution of ∂φ/∂h. The convolutions are circular, done with 2D real FFTs in
O(B·C·N log N) (:func:`_kernel_spectrum`). D4-invariant kernels come from
``latticeflow.symmetry`` (:func:`~latticeflow.symmetry.d4_average`,
:func:`~latticeflow.symmetry.displacement_orbits`). The potential enters the flow of
"Monge-Ampère Flow for Generative Modeling" (Zhang, E, Wang, arXiv:1809.10188) like any other.

Symbols: B batch, L lattice size, N = L² sites, C channels, k kernel size, J the number of
D4 orbits of kernel sites, t time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_size
from ..symmetry import d4_average, displacement_orbits
from .activations import ACTIVATIONS, EVEN_ACTIVATIONS
from .base import Evaluation, Noise, Potential, _initial_readout, _readout

__all__ = ["ConvPotential"]


# ---------------------------------------------------------------------- kernels
def _kernel_spectrum(K: Tensor, L: int) -> Tensor:
    """rfft2 of the k×k kernels K (C, k, k) embedded in the periodic L×L lattice, (C, L, L//2+1).

    The embedding v_c(u) = K_c(p − u) (p = k//2, u mod L) turns the circular cross-correlation
    h_c(s) = Σ_d K_c(d) x(s + d − p) (what ``conv2d`` does with circular padding) into the
    circular convolution h_c = v_c ∗ x, i.e. ĥ_c = V̂_c x̂; its adjoint (the gradient with
    respect to x) is Σ_c conj(V̂_c) ĝ_c.
    """
    k = K.shape[-1]
    p = k // 2
    v = F.pad(K.flip(-1, -2), (0, L - k, 0, L - k))
    return torch.fft.rfft2(torch.roll(v, (-p, -p), (-2, -1)))


def _d4_kernel_basis(k: int) -> Tensor:
    """Orthonormal basis (J, k²) of the D4-invariant k×k kernels: one row per D4 orbit of
    kernel offsets (i − p, j − p), 1/√|orbit| on the orbit's sites (J = 6 for k = 5)."""
    p = k // 2
    # orbits of displacements mod k; rolled so that kernel site (i, j) reads offset (i − p, j − p)
    labels = torch.roll(displacement_orbits(k, k, d4=True), (p, p), (0, 1)).reshape(-1)
    basis = F.one_hot(labels).t().to(torch.get_default_dtype())
    return basis / basis.sum(1, keepdim=True).sqrt()


# ---------------------------------------------------------------------- the potential
class ConvPotential(Potential):
    """Translation-invariant convolutional potential on the periodic L×L lattice.

    One circular k×k convolution with C channels, h = K ⋆ x + b, optionally followed by a
    per-site (1×1) layer g = V a(h) + b₂, and a sum over sites and channels:

        layers=1:  φ = Σ_{c,s} w_c a(h_{c,s})
        layers=2:  φ = Σ_{c,s} w_c a(g_{c,s})

    Both are φ = Σ_s F(h_{:,s}) with a per-site function F of the C pre-activations. Since
    ∂h_{c,s}/∂x_i = K_c(i − s), the Laplacian is exactly ∇²φ = Σ_s tr(H_F(h_{:,s}) Γ) with the
    kernel Gram matrix Γ_{cc'} = Σ_d K_c(d) K_{c'}(d) (C×C, parameters only):

        layers=1:  ∇²φ = Σ_{c,s} w_c a''(h_{c,s}) ‖K_c‖²
        layers=2:  ∇²φ = Σ_{c,s} w_c [a''(g) (v⊙a'(h))ᵀ Γ (v⊙a'(h))]_{c,s}
                         + Σ_{c',s} (Vᵀ(w⊙a'(g)))_{c',s} a''(h_{c',s}) Γ_{c'c'}

    with v = V_c the row of V. The gradient is the transposed convolution of ∂φ/∂h. Costs are
    those of the forward pass (layers=2 adds O(B·N·C³)).

    Symmetries: translation invariance by construction; ``d4=True`` ties each kernel to its
    D4 average, making φ invariant under the lattice point group; ``z2=True`` (needs
    ``activation="lncosh"``) drops the first bias so h is odd in x and a(h) even, making
    φ(−x) = φ(x). Time dependence: readout w(t) = w + t·u (all symmetries kept).

    Args:
        L: lattice size (the potential acts on N = L² sites, i = row·L + col).
        channels: C.
        layers: 1 or 2 hidden layers (the second is 1×1).
        kernel_size: odd k ≤ L (a larger kernel would wrap around and alias).
        activation: ``"softplus"``, ``"lncosh"`` or ``"tanh"``.
        d4: D4-symmetric kernels.
        z2: Z2-even potential.
        time_dependent: readout depends linearly on t.
        init_scale: standard deviation of the initial readout (0: identity flow), or ``"linear"``
            for nn.Linear's U(±1/√C).
    """

    def __init__(self, L: int, channels: int = 16, layers: int = 1, kernel_size: int = 3,
                 activation: str = "softplus", d4: bool = False, z2: bool = False,
                 time_dependent: bool = False, init_scale: float | str = 1e-3) -> None:
        super().__init__()
        self.L = check_size("L", L, minimum=1)
        self.dim = self.L * self.L
        self.channels = check_size("channels", channels)
        self.layers = check_size("layers", layers)
        if self.layers > 2:
            raise ValueError(f"layers must be 1 or 2 (exact Laplacian derived for these), got layers={layers!r}")
        k = check_size("kernel_size", kernel_size)
        if k % 2 == 0 or k > self.L:
            raise ValueError(f"kernel_size must be odd and <= L={self.L} (no wrap-around), "
                             f"got kernel_size={kernel_size!r}")
        self.kernel_size = k
        self.activation = check_choice("activation", activation, tuple(ACTIVATIONS))
        self._act = ACTIVATIONS[activation]
        self.d4, self.z2 = bool(d4), bool(z2)
        if self.z2 and activation not in EVEN_ACTIVATIONS:
            raise ValueError(f"z2=True needs an even activation {EVEN_ACTIVATIONS}, got activation={activation!r}")
        self.time_dependent = bool(time_dependent)
        C = self.channels
        fan_in = k * k
        self.conv_weight = nn.Parameter(torch.randn(C, k, k) / math.sqrt(fan_in))
        self.conv_bias = None if self.z2 else nn.Parameter(torch.empty(C).uniform_(-0.5, 0.5))
        if self.layers == 2:
            self.mix_weight = nn.Parameter(torch.randn(C, C) / math.sqrt(C))
            self.mix_bias = nn.Parameter(torch.empty(C).uniform_(-0.5, 0.5))
        else:
            self.mix_weight = self.mix_bias = None
        self.readout = nn.Parameter(_initial_readout(C, init_scale))
        self.readout_t = nn.Parameter(torch.zeros(C)) if self.time_dependent else None
        # the span of the D4-invariant kernels, for the 2-layer Laplacian (not saved: a function of k)
        basis = _d4_kernel_basis(k) if self.d4 and self.layers == 2 else None
        self.register_buffer("kernel_basis", basis, persistent=False)

    def extra_repr(self) -> str:
        return (f"L={self.L}, channels={self.channels}, layers={self.layers}, kernel_size={self.kernel_size}, "
                f"activation={self.activation!r}, d4={self.d4}, z2={self.z2}, time_dependent={self.time_dependent}")

    def _gram_forms(self, Kf: Tensor) -> tuple[Tensor, Tensor]:
        """diag(Γ) (C,) and P (C, C_out·J) with ‖(a' @ P)_d‖² = (v_d⊙a')ᵀ Γ (v_d⊙a') for each d.

        Γ = K Kᵀ = F Fᵀ with F = K Bᵀ (C, J), B an orthonormal basis of the kernels' span: the
        D4-invariant k×k kernels (J = number of D4 orbits of kernel sites, 6 for k = 5) when
        ``d4``, else all of them (B = I, J = k²). Then (v⊙a')ᵀΓ(v⊙a') = ‖Fᵀ(v⊙a')‖², and the
        C_out quadratic forms of a site are one (C) @ (C, C_out·J) product and a sum of squares.
        """
        V = self.mix_weight
        F_ = Kf if self.kernel_basis is None else Kf @ self.kernel_basis.t()  # (C, J)
        P = V.t()[:, :, None] * F_[:, None, :]  # P[c, d, j] = V_dc F_cj
        return Kf.square().sum(1), P.reshape(self.channels, -1)

    def kernels(self) -> Tensor:
        """The effective first-layer kernels, shape (C, k, k) (D4-averaged when d4=True)."""
        return d4_average(self.conv_weight) if self.d4 else self.conv_weight

    def _evaluate(self, x: Tensor, t: Tensor | float, noise: Noise, value: bool) -> Evaluation:
        B, L, C = x.shape[0], self.L, self.channels
        K = self._shared("kernels", self.kernels)
        # circular convolutions by FFT: O(B·C·N log N), and much faster than conv2d's backward on CPU
        spectrum = self._shared("spectrum", lambda: _kernel_spectrum(K, L))  # (C, L, L//2+1)
        h = torch.fft.irfft2(torch.fft.rfft2(x.reshape(B, 1, L, L)) * spectrum, s=(L, L))
        if self.conv_bias is not None:
            h = h + self.conv_bias[:, None, None]
        a, a1, a2 = self._act(h, value or self.layers == 2)
        w = _readout(self.readout, self.readout_t, t)  # (C,) or (B, C)
        wcol = w[..., None, None]
        Kf = K.reshape(C, -1)
        if self.layers == 1:
            dphi_dh = a1 * wcol  # (B, C, L, L)
            wk = w * self._shared("ksq", lambda: Kf.square().sum(1))  # w_c ‖K_c‖², (C,) or (B, C)
            a2s = a2.sum((2, 3))
            lap = a2s @ wk if wk.dim() == 1 else (a2s * wk).sum(1)
            phi = (a.sum((2, 3)) * w).sum(1) if value else None
        else:
            V = self.mix_weight
            g = torch.einsum("dc,bcxy->bdxy", V, a) + self.mix_bias[:, None, None]
            b_, b1, b2 = self._act(g, value)
            q = b1 * wcol  # ∂φ/∂g, (B, C, L, L)
            r = torch.einsum("dc,bdxy->bcxy", V, q)  # Vᵀq: ∂φ/∂a(h)
            dphi_dh = r * a1
            gram_diag, P = self._shared("gram", lambda: self._gram_forms(Kf))
            a1s = a1.permute(0, 2, 3, 1).reshape(B * L * L, C)  # (B·S, C)
            quad = (a1s @ P).reshape(B * L * L, C, -1).square().sum(-1).reshape(B, L, L, C)  # (B, S, C_out)
            lap_g = (b2.permute(0, 2, 3, 1) * quad).sum((1, 2))  # (B, C_out)
            lap_g = (lap_g * w).sum(1)
            lap_h = ((r * a2).sum((2, 3)) * gram_diag).sum(1)
            lap = lap_g + lap_h
            phi = (b_.sum((2, 3)) * w).sum(1) if value else None
        # ∇φ: the adjoint convolution, summed over channels
        grad = torch.fft.irfft2((torch.fft.rfft2(dphi_dh) * spectrum.conj()).sum(1), s=(L, L)).reshape(B, L * L)
        return phi, grad, lap

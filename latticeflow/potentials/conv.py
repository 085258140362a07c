"""Translation-invariant convolutional potential on the periodic L×L lattice, direct or by FFT.

One circular k×k convolution with C channels, h = K ⋆ x + b, optionally a per-site (1×1)
layer g = V a(h) + b₂, and a sum over sites and channels (layers = 1, 2):

    φ = Σ_{c,s} w_c a(h_{c,s})        or        φ = Σ_{c,s} w_c a(g_{c,s}).

Both are φ = Σ_s F(h_{:,s}) with a per-site F of the C pre-activations; as ∂h_{c,s}/∂x_i =
K_c(i − s), the Laplacian is exactly ∇²φ = Σ_s tr(H_F(h_{:,s}) Γ) with the kernel Gram matrix
Γ_{cc'} = Σ_d K_c(d) K_{c'}(d) (see :class:`ConvPotential`), and ∇φ is the adjoint
convolution of ∂φ/∂h. The convolutions are circular, done either directly, as matmuls on the
k² shifted copies of x with the batch innermost (:class:`_Stencil`, O(B·N·(k² + C·J)), and for
the one-layer hot path one autograd node with a hand-written backward, :class:`_ConvDrift`), or
with 2D real FFTs in O(B·C·N log N) (:func:`_kernel_spectrum`); :func:`auto_method` picks
direct for k <= 9 (4× faster per RK stage at L=16, k=5). D4-invariant kernels come from
``latticeflow.symmetry`` (:func:`~latticeflow.symmetry.d4_average`,
:func:`~latticeflow.symmetry.displacement_orbits`). The potential enters the flow of
"Monge-Ampère Flow for Generative Modeling" (Zhang, E, Wang, arXiv:1809.10188) like any other.

Symbols: B batch, L lattice size, N = L² sites, C channels, k kernel size, J the number of
D4 orbits of kernel sites (k² without D4), t time.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import native
from .._checks import check_choice, check_size
from ..symmetry import d4_average, displacement_orbits
from .activations import ACTIVATIONS, EVEN_ACTIVATIONS, FUSED, fused_forward, pre_scale
from .base import Evaluation, Noise, Potential, _initial_readout, _is_scalar_time, _readout

__all__ = ["CONV_METHODS", "ConvPotential", "auto_method"]

#: how the circular convolutions are computed: "direct" (matmuls on patches), "fft" (2D real
#: FFTs) or "auto" (:func:`auto_method`); the results agree to rounding.
CONV_METHODS = ("auto", "direct", "fft")


def auto_method(L: int, k: int) -> str:
    """The faster convolution for k×k kernels on the L×L lattice: "direct" for k <= 9, else "fft".

    The direct method costs O(B·N·(k² + C·J)) per convolution, the FFT O(B·C·N log N), so the
    choice is by k. Measured with benchmarks/conv_speed.py (1 thread, C=16, D4 kernels, one RK
    stage forward and backward): direct/FFT time 0.23 at L=16, k=5; 0.27 at L=32, k=5; 0.87 at
    L=16, k=11; 1.42 at L=16, k=15. Kernels without D4 symmetry make the direct matmuls k²/J
    times larger, hence the margin below the measured crossover.
    """
    return "direct" if k <= 9 else "fft"


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


# ---------------------------------------------------------------------- direct convolution
# Layout: a plane over the batch is a (L, L, B) array with the batch innermost, stored as (N·B,),
# so that a shift by a lattice displacement moves contiguous runs of L·B numbers. The k² shifted
# copies of x (the patches, im2col) are then k² block copies, a convolution with C channels is one
# (C, J) @ (J, N·B) matmul, and its adjoint one matmul and k² shifted adds.
class _Stencil:
    """The k² kernel offsets on the periodic L×L lattice and the kernel basis they are grouped by.

    ``patches(x)`` (B, N) -> z (J, N·B) with z = basis @ cols(x), cols_d(s, b) = x_b(s + d − p)
    the patch of site s for the k² offsets d (row-major), and ``fold`` its adjoint (J, N·B) ->
    (B, N). ``basis`` is None (J = k², z = cols) or an orthonormal basis (J, k²) with one nonzero
    per column, such as the D4 orbits of :func:`_d4_kernel_basis`: then z_j is a weighted sum
    of the offsets of orbit j (J = 6 planes for k = 5, not 25), formed by adds, no matmul.
    """

    def __init__(self, L: int, k: int, basis: Tensor | None) -> None:
        self.L, self.k, self.p = L, k, k // 2
        # padded row P is lattice row (P − p) mod L: made once per device, not at every RK stage
        self._wraps: dict[torch.device, Tensor] = {}
        self._tables: native.ConvTables | None = None
        if basis is None:
            self.J, self.rows, self.coefs = k * k, None, None
        else:
            rows = basis.abs().argmax(0)
            if int((basis != 0).sum()) != k * k:
                raise ValueError("the kernel basis must have one nonzero per column")
            self.J = basis.shape[0]
            self.rows = rows.tolist()
            self.coefs = basis[rows, torch.arange(k * k)].tolist()

    def tables(self) -> native.ConvTables:
        """The neighbour tables of the compiled kernel (``latticeflow.native``), made once."""
        if self._tables is None:
            self._tables = native.ConvTables(self.L, self.k, self.rows, self.coefs)
        return self._tables

    def _wrap(self, device: torch.device) -> Tensor:
        """(L+2p,) the lattice row (or column) of each padded row: (P − p) mod L."""
        idx = self._wraps.get(device)
        if idx is None:
            idx = self._wraps[device] = (torch.arange(self.L + 2 * self.p, device=device) - self.p) % self.L
        return idx

    def _padded(self, x: Tensor) -> Tensor:
        """(B, N) -> the circularly padded lattice (L+2p, L+2p, B): padded row P is row (P − p) mod L."""
        L, B = self.L, x.shape[0]
        idx = self._wrap(x.device)
        return x.t().reshape(L, L, B).index_select(0, idx).index_select(1, idx)

    def patches(self, x: Tensor) -> Tensor:
        L, k, B = self.L, self.k, x.shape[0]
        xp = self._padded(x)
        if self.rows is None:  # the views (L, L, B, k, k) of xp, copied once into (k, k, L, L, B)
            return xp.unfold(0, k, 1).unfold(1, k, 1).permute(3, 4, 0, 1, 2).reshape(k * k, L * L * B)
        z = x.new_zeros(self.J, L, L, B)
        for d, (j, c) in enumerate(zip(self.rows, self.coefs)):  # the k² offsets (not sites or samples)
            r, q = divmod(d, k)
            z[j].add_(xp[r:r + L, q:q + L], alpha=c)
        return z.reshape(self.J, L * L * B)

    def fold(self, y: Tensor) -> Tensor:
        L, k, p = self.L, self.k, self.p
        B = y.shape[1] // (L * L)
        y = y.reshape(self.J, L, L, B)
        P = L + 2 * p
        acc = y.new_zeros(P, P, B)
        for d in range(k * k):  # the k² offsets: shifted adds of (L, L, B) blocks
            r, q = divmod(d, k)
            if self.rows is None:
                acc[r:r + L, q:q + L] += y[d]
            else:
                acc[r:r + L, q:q + L].add_(y[self.rows[d]], alpha=self.coefs[d])
        # wrap the padding back onto the lattice (the adjoint of _padded)
        idx = self._wrap(y.device)
        rows = y.new_zeros(L, P, B).index_add_(0, idx, acc)
        out = y.new_zeros(L, L, B).index_add_(1, idx, rows)
        return out.reshape(L * L, B).t().contiguous()


class _Patches(torch.autograd.Function):
    """x (B, N) -> stencil.patches(x) (J, N·B), linear in x; its backward is :class:`_Fold` (and
    vice versa), so derivatives of any order are exact."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, stencil: _Stencil) -> Tensor:
        ctx.stencil = stencil
        return stencil.patches(x)

    @staticmethod
    def backward(ctx: Any, dz: Tensor) -> tuple[Tensor | None, ...]:
        return _Fold.apply(dz, ctx.stencil), None


class _Fold(torch.autograd.Function):
    """y (J, N·B) -> stencil.fold(y) (B, N), the adjoint of :class:`_Patches`."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, stencil: _Stencil) -> Tensor:
        ctx.stencil = stencil
        return stencil.fold(y)

    @staticmethod
    def backward(ctx: Any, dx: Tensor) -> tuple[Tensor | None, ...]:
        return _Patches.apply(dx, ctx.stencil), None


def _drift_reference(x: Tensor, A: Tensor, b: Tensor | None, w: Tensor, ksq: Tensor, stencil: _Stencil,
                     activation: str) -> tuple[Tensor, Tensor]:
    """(∇φ, ∇²φ) of the one-layer potential with plain autograd ops: what :class:`_ConvDrift`
    computes, and its double backward."""
    B, N = x.shape
    h = _Patches.apply(x, stencil)
    h = A @ h if b is None else torch.addmm(b[:, None], A, h)
    _, a1, a2 = ACTIVATIONS[activation](h, False)
    grad = _Fold.apply((A * w[:, None]).t() @ a1, stencil)
    lap = (w * ksq) @ a2.reshape(-1, N, B).sum(1)
    return grad, lap


def _reference_backward(needs: tuple[bool, ...], inputs: tuple[Tensor | None, ...], stencil: _Stencil,
                        activation: str, dG: Tensor | None, dL: Tensor | None) -> tuple[Tensor | None, ...]:
    """The backward of :class:`_ConvDrift` under create_graph=True: :func:`_drift_reference`
    differentiated with recorded ops, so that higher derivatives stay exact."""
    # on aliases, so that a path from one input to another (ksq = ‖A‖² when A = K) is not counted twice
    inputs = tuple(None if t is None else t.view_as(t) for t in inputs)
    wrt = [i for i, t in enumerate(inputs) if needs[i] and t is not None]
    outs = [(o, g) for o, g in zip(_drift_reference(*inputs, stencil, activation), (dG, dL)) if g is not None]
    got = torch.autograd.grad([o for o, _ in outs], [inputs[i] for i in wrt], [g for _, g in outs],
                              create_graph=True, allow_unused=True)
    res: list[Tensor | None] = [None] * 7
    for i, g in zip(wrt, got):
        res[i] = g
    return tuple(res)


class _ConvDrift(torch.autograd.Function):
    """(∇φ, ∇²φ) of φ = Σ_{c,s} w_c a(h_{c,s}), h = A·z(x) + b, with a hand-written backward.

    z = stencil.patches(x) (J, N·B), A (C, J) the kernels in the stencil's basis, ksq = ‖K_c‖²
    (C,). With base(h) (σ or tanh, as in ``FUSED``), a', a'', a''' and c = w⊙ksq:

        grad = fold(Aᵀ (w⊙a'(h))),        lap_b = Σ_c c_c Σ_s a''(h)_{c,s,b}.

    For incoming Ĝ (B, N), L̂ (B,), with ẑ = patches(Ĝ):

        ∂/∂h = (w⊙A ẑ)⊙a'' + (c ⊗ L̂)⊙a''',       ∂/∂x = fold(Aᵀ ∂/∂h),
        ∂/∂A = (∂/∂h) zᵀ + w⊙(a' ẑᵀ),   ∂/∂b = Σ_{s,b} ∂/∂h,
        ∂/∂w = Σ_j A⊙(a' ẑᵀ) + ksq⊙(S L̂),   ∂/∂ksq = w⊙(S L̂),   S = Σ_s a'' (C, B).

    Per stage it keeps base(h) and a'' (C, N·B), z and S; w enters the matmuls (w⊙A), so the
    (C, N·B) elementwise work is base, a'', and two or three passes for ∂/∂h (one broadcast
    multiply-add each). Under create_graph=True the backward differentiates
    :func:`_drift_reference` instead, so higher derivatives stay exact.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, A: Tensor, b: Tensor | None, w: Tensor, ksq: Tensor, stencil: _Stencil,
                activation: str) -> tuple[Tensor, Tensor]:
        B, N = x.shape
        C = A.shape[0]
        z = stencil.patches(x)
        s = pre_scale(activation, x.dtype, x.device)  # the matmul forms s·h (2h for tanh h = 2σ(2h) − 1)
        h = (s * A) @ z if b is None else torch.addmm(b[:, None], A, z, beta=s, alpha=s)
        base, d1, d2 = fused_forward(activation, h, s)
        grad = stencil.fold((A * w[:, None]).t() @ d1)
        S = d2.reshape(C, N, B).sum(1)  # (C, B)
        lap = (w * ksq) @ S
        ctx.stencil, ctx.activation, ctx.has_bias = stencil, activation, b is not None
        ctx.save_for_backward(x, A, b if b is not None else A.new_empty(0), w, ksq, z, base, d2, S)
        return grad, lap

    @staticmethod
    def backward(ctx: Any, dG: Tensor | None, dL: Tensor | None) -> tuple[Tensor | None, ...]:
        x, A, b, w, ksq, z, base, d2, S = ctx.saved_tensors
        b = b if ctx.has_bias else None
        needs = ctx.needs_input_grad
        stencil, activation = ctx.stencil, ctx.activation
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference with recorded ops
            return _reference_backward(needs, (x, A, b, w, ksq), stencil, activation, dG, dL)
        B, N = x.shape
        C = A.shape[0]
        dh = dA = dw = dksq = None
        d1 = base if activation != "tanh" else FUSED[activation][1](base, d2)[0]
        if dG is not None:
            zG = stencil.patches(dG)
            dh = (A * w[:, None]) @ zG  # w⊙(A ẑ), (C, N·B)
            if needs[1] or needs[3]:
                M = d1 @ zG.t()  # (C, J)
                dA = M * w[:, None]
                dw = (A * M).sum(1)
        if dL is not None:
            E = torch.outer(w * ksq, dL)[:, None, :]  # c ⊗ L̂, (C, 1, B)
            base3 = base.reshape(C, N, B)
            if dh is None:
                dh = base.new_zeros(C, N * B)
            dh3 = dh.reshape(C, N, B)
            if activation == "lncosh":  # a''' = −2 tanh·a''
                dh3.addcmul_(base3, E, value=-2.0).mul_(d2.reshape(C, N, B))
            elif activation == "softplus":  # a''' = a''(1 − 2σ)
                dh3.add_(E).addcmul_(base3, E, value=-2.0).mul_(d2.reshape(C, N, B))
            else:
                d3 = FUSED[activation][1](base, d2)[2].reshape(C, N, B)
                dh3.mul_(d2.reshape(C, N, B)).addcmul_(d3, E)
            T = S @ dL  # (C,)
            dw = ksq * T if dw is None else dw + ksq * T
            dksq = w * T
        elif dh is not None:
            dh.mul_(d2)
        dx = db = None
        if dh is not None:
            if needs[1]:
                dA = dh @ z.t() if dA is None else dA.addmm_(dh, z.t())
            if needs[2] and b is not None:
                db = dh.sum(1)
            if needs[0]:
                dx = stencil.fold(A.t() @ dh)
        return (dx, dA if needs[1] else None, db, dw if needs[3] else None, dksq if needs[4] else None,
                None, None)


class _ConvDriftNative(torch.autograd.Function):
    """:class:`_ConvDrift` computed by the compiled kernel (``latticeflow.native``): the same
    outputs and gradients to rounding, one pass over the lattice per block of samples instead of
    a pass over C·N·B numbers per elementwise step; it saves only x (the backward recomputes
    the activations). Under create_graph=True its backward is :func:`_reference_backward`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, A: Tensor, b: Tensor | None, w: Tensor, ksq: Tensor, stencil: _Stencil,
                activation: str) -> tuple[Tensor, Tensor]:
        x, A, w = x.contiguous(), A.contiguous(), w.contiguous()
        bias = b.contiguous() if b is not None else A.new_zeros(A.shape[0])
        grad, S = native.conv_forward(x, stencil.tables(), A, bias, w, activation)
        ctx.stencil, ctx.activation, ctx.has_bias = stencil, activation, b is not None
        ctx.save_for_backward(x, A, b if b is not None else A.new_empty(0), w, ksq)
        return grad, (w * ksq) @ S

    @staticmethod
    def backward(ctx: Any, dG: Tensor | None, dL: Tensor | None) -> tuple[Tensor | None, ...]:
        x, A, b, w, ksq = ctx.saved_tensors
        b = b if ctx.has_bias else None
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():
            return _reference_backward(needs, (x, A, b, w, ksq), ctx.stencil, ctx.activation, dG, dL)
        dG = torch.zeros_like(x) if dG is None else dG.contiguous()
        dL = x.new_zeros(x.shape[0]) if dL is None else dL.contiguous()
        bias = b if b is not None else A.new_zeros(A.shape[0])
        dx, P, M, db, T = native.conv_backward(x, dG, dL, ctx.stencil.tables(), A, bias, w, (w * ksq).contiguous(),
                                               ctx.activation)
        dA = P + M * w[:, None]
        dw = (A * M).sum(1) + ksq * T
        return (dx if needs[0] else None, dA if needs[1] else None, db if needs[2] and b is not None else None,
                dw if needs[3] else None, w * T if needs[4] else None, None, None)


def _native_takes(x: Tensor, A: Tensor, b: Tensor | None, w: Tensor, stencil: _Stencil, activation: str) -> bool:
    """Whether :class:`_ConvDriftNative` computes this stage: the kernel takes x (CPU, float32 or
    float64, k <= 9, C <= 64, see ``native.available``) and the parameters have x's dtype and
    device (the kernel reads raw memory: a mismatch goes to the eager stage, which raises)."""
    if any(t is not None and (t.dtype != x.dtype or t.device != x.device) for t in (A, b, w)):
        return False
    return native.available(x, stencil.k * stencil.k, activation, A.shape[0])


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
        method: how the convolutions are computed, ``"direct"`` (matmuls on the k² shifted
            copies of x), ``"fft"`` (2D real FFTs) or ``"auto"`` (:func:`auto_method`); the same
            numbers to rounding.
    """

    def __init__(self, L: int, channels: int = 16, layers: int = 1, kernel_size: int = 3,
                 activation: str = "softplus", d4: bool = False, z2: bool = False,
                 time_dependent: bool = False, init_scale: float | str = 1e-3, method: str = "auto") -> None:
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
        # the span of the D4-invariant kernels (the 2-layer Laplacian, the direct convolution);
        # not saved: a function of k
        basis = _d4_kernel_basis(k) if self.d4 else None
        self.register_buffer("kernel_basis", basis, persistent=False)
        self.method = check_choice("method", method, CONV_METHODS)
        if self.method == "auto":
            self.method = auto_method(self.L, k)
        self._stencil = _Stencil(self.L, k, basis)

    def extra_repr(self) -> str:
        return (f"L={self.L}, channels={self.channels}, layers={self.layers}, kernel_size={self.kernel_size}, "
                f"activation={self.activation!r}, d4={self.d4}, z2={self.z2}, time_dependent={self.time_dependent}, "
                f"method={self.method!r}")

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
        if self.method == "fft":
            return self._evaluate_fft(x, t, value)
        return self._evaluate_direct(x, t, value)

    def _evaluate_direct(self, x: Tensor, t: Tensor | float, value: bool) -> Evaluation:
        """The same numbers as :meth:`_evaluate_fft`, with the convolutions as matmuls on patches.

        Planes are (C, N·B) with the batch innermost (see :class:`_Stencil`); with D4 kernels
        K = A·basis (A = K basisᵀ, (C, J)) the patches are summed over the J kernel orbits, so
        both convolutions are (C, J) matmuls. The integrator's hot path of the one-layer
        potential (scalar t, no value) is one autograd node, :class:`_ConvDrift`; the rest is
        plain autograd ops (exact to any order through :class:`_Patches` and :class:`_Fold`).
        """
        B, L, C = x.shape[0], self.L, self.channels
        N = L * L
        K = self._shared("kernels", self.kernels)
        Kf = K.reshape(C, -1)
        basis, stencil = self.kernel_basis, self._stencil
        A = self._shared("coefficients", lambda: Kf if basis is None else Kf @ basis.t())  # (C, J)
        ksq = self._shared("ksq", lambda: Kf.square().sum(1))  # ‖K_c‖², (C,)
        if self.layers == 1 and not value and _is_scalar_time(t):
            # the integrator's hot path: one autograd node per stage (see _ConvDrift)
            w = _readout(self.readout, self.readout_t, t)
            drift = _ConvDriftNative if _native_takes(x, A, self.conv_bias, w, stencil, self.activation) else _ConvDrift
            grad, lap = drift.apply(x, A, self.conv_bias, w, ksq, stencil, self.activation)
            return None, grad, lap
        z = _Patches.apply(x, stencil)  # (J, N·B)
        h = A @ z if self.conv_bias is None else torch.addmm(self.conv_bias[:, None], A, z)  # (C, N·B)
        a, a1, a2 = self._act(h, value or self.layers == 2)
        w = _readout(self.readout, self.readout_t, t)  # (C,) or (B, C)
        wcol = w[:, None] if w.dim() == 1 else w.t().repeat(1, N)  # broadcasts against (C, N·B)

        def site_sum(v: Tensor) -> Tensor:  # (C, N·B) -> (C, B)
            return v.reshape(-1, N, B).sum(1)

        def readout(s: Tensor, c: Tensor) -> Tensor:  # Σ_c c_c s_c with s (C, B), c (C,) or (B, C) -> (B,)
            return c @ s if c.dim() == 1 else (c.t() * s).sum(0)

        if self.layers == 1:
            dphi_dh = a1 * wcol  # (C, N·B)
            lap = readout(site_sum(a2), w * ksq)
            phi = readout(site_sum(a), w) if value else None
        else:
            V = self.mix_weight
            g = torch.addmm(self.mix_bias[:, None], V, a)  # (C, N·B)
            b_, b1, b2 = self._act(g, value)
            q = b1 * wcol  # ∂φ/∂g
            r = V.t() @ q  # ∂φ/∂a(h)
            dphi_dh = r * a1
            gram_diag, P = self._shared("gram", lambda: self._gram_forms(Kf))
            quad = (P.t() @ a1).reshape(C, -1, N * B).square().sum(1)  # (C_out, N·B)
            lap = readout(site_sum(b2 * quad), w) + readout(site_sum(r * a2), gram_diag)
            phi = readout(site_sum(b_), w) if value else None
        # ∇φ: the adjoint convolution, summed over channels
        grad = _Fold.apply(A.t() @ dphi_dh, stencil)
        return phi, grad, lap

    def _evaluate_fft(self, x: Tensor, t: Tensor | float, value: bool) -> Evaluation:
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

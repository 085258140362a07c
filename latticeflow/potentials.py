"""Scalar potentials φ(x, t) with exact gradients and Laplacians for the Monge-Ampère flow.

"Monge-Ampère Flow for Generative Modeling" (Zhang, E, Wang, arXiv:1809.10188) moves samples
along dx/dt = ∇φ (eq. 2) while their log density changes as d ln p/dt = −∇²φ (eq. 3). Every
potential here therefore returns the triple (φ (B,), ∇φ (B, N), ∇²φ (B,)), exact unless
stated, and differentiable with respect to its parameters (training backpropagates through
the integrator). The Laplacians are analytic and cost about as much as the gradient: no
Hessians, no dense (h, h) or (N, N) matrices where a vector does.

Potentials:

- :class:`MLPPotential`: the paper's φ(x) = Σ_k w_k a(W_k·x + b_k) (section 3).
- :class:`QuadraticPotential`: ½ xᵀAx + bᵀx with a translation- (and D4-) invariant circulant
  A applied by FFT; its flow is exactly Gaussian (appendix A).
- :class:`ConvPotential`: translation-invariant convolutional potential on the periodic
  L×L lattice, optionally D4- and Z2-invariant.
- :class:`AutogradPotential`: any scalar network, gradient by autograd, Laplacian exact
  (N Hessian-vector products) or by Hutchinson's estimator.
- :class:`SumPotential`: sums (also written ``p + q``).
- :class:`Symmetrized`: the group average φ(x) = (1/|G|) Σ_g φ̃(g·x) of section 4.2, exact or
  with one random group element per sample per integration step.

Stochastic potentials (random symmetrisation, Hutchinson probes) are stateless: their
randomness is an explicit ``noise`` token drawn by :meth:`Potential.resample` and passed to
:meth:`Potential.forward`; with ``noise=None`` they draw a fresh one from the global RNG at
each call. The flow draws one token per integration step and can replay it (see flow.py).

Performance notes (the integrator calls a potential 4·n_steps times per sample): inside
:meth:`Potential.shared_constants`, which the flow opens around every integration, parameter-
only quantities (‖W_k‖², FFT of the quadratic kernel, symmetrised conv kernels) are computed
once; the MLP stage is one custom autograd node; a random symmetry element is applied to
the state once per step (:meth:`Potential.step_frame`) rather than twice per RK stage.

Symbols: B batch, N = dim sites, h hidden units, C channels, G group order, t time.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_batch, check_choice, check_size

__all__ = [
    "ACTIVATIONS",
    "Potential",
    "MLPPotential",
    "QuadraticPotential",
    "ConvPotential",
    "AutogradPotential",
    "SumPotential",
    "Symmetrized",
    "SymmetryDraw",
]

_LN2 = math.log(2.0)

Noise = Any  # opaque per-step randomness: None, an index tensor, probes, or a tuple of these
Evaluation = tuple[Tensor | None, Tensor, Tensor]  # (phi or None, grad, laplacian)
# (into, out_of, inner potential, inner noise): see Potential.step_frame
Frame = tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], "Potential", Any]


# ---------------------------------------------------------------------- activations
def _softplus(h: Tensor, value: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    s = torch.sigmoid(h)
    # softplus' = σ, softplus'' = σ(1 − σ)
    return (F.softplus(h) if value else None), s, s - s * s


def _lncosh(h: Tensor, value: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    th = torch.tanh(h)
    a = None
    if value:
        ah = h.abs()
        # ln cosh h = |h| + ln(1 + e^{−2|h|}) − ln 2: no overflow for large |h|
        a = ah + F.softplus(-2.0 * ah) - _LN2
    return a, th, 1.0 - th * th


def _tanh(h: Tensor, value: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    th = torch.tanh(h)
    d1 = 1.0 - th * th
    return (th if value else None), d1, -2.0 * th * d1


# Fused MLP path: each activation is computed from one "base" tensor per stage (σ(h) or
# tanh h). ``derivs(base, d2)`` returns (a', a'', a''') reusing a'' = d2 when the forward pass
# saved it; every op is out of place so the same code serves the double-backward branch.
def _softplus_derivs(s: Tensor, d2: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    if d2 is None:
        d2 = torch.addcmul(s, s, s, value=-1.0)  # σ(1 − σ)
    return s, d2, torch.addcmul(d2, s, d2, value=-2.0)  # σ(1−σ)(1−2σ)


def _lncosh_derivs(th: Tensor, d2: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    if d2 is None:
        d2 = 1.0 - th * th
    return th, d2, -2.0 * th * d2


def _tanh_derivs(th: Tensor, d2: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    t2 = th * th
    d1 = 1.0 - t2
    if d2 is None:
        d2 = -2.0 * th * d1
    return d1, d2, d1 * (6.0 * t2 - 2.0)


_Derivs = Callable[[Tensor, "Tensor | None"], tuple[Tensor, Tensor, Tensor]]
_FUSED: dict[str, tuple[Callable[[Tensor], Tensor], _Derivs]] = {
    "softplus": (torch.sigmoid, _softplus_derivs),
    "lncosh": (torch.tanh, _lncosh_derivs),
    "tanh": (torch.tanh, _tanh_derivs),
}

#: name -> a(h, value) returning (a(h) or None, a'(h), a''(h)), all elementwise.
ACTIVATIONS: dict[str, Callable[[Tensor, bool], tuple[Tensor | None, Tensor, Tensor]]] = {
    "softplus": _softplus,
    "lncosh": _lncosh,
    "tanh": _tanh,
}
#: activations with a(−h) = a(h): with no bias they make the MLP/conv potentials Z2-even.
EVEN_ACTIVATIONS = ("lncosh",)


# ---------------------------------------------------------------------- helpers
def _time_col(t: Tensor | float) -> Tensor | float:
    """t as a scalar or, for per-sample times of shape (B,), a column (B, 1) for broadcasting."""
    if isinstance(t, Tensor) and t.dim() == 1:
        return t[:, None]
    return t


def _is_scalar_time(t: Tensor | float) -> bool:
    return not (isinstance(t, Tensor) and t.dim() > 0)


def _check_time(t: object, batch: int) -> None:
    if isinstance(t, Tensor):
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != batch):
            raise ValueError(f"t must be a number, a 0-d tensor or shape ({batch},), got shape={tuple(t.shape)}")
    elif isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise TypeError(f"t must be a finite number or a tensor, got t={t!r}")


def _readout(w0: Tensor, w1: Tensor | None, t: Tensor | float) -> Tensor:
    """Readout weights w(t) = w0 + t·w1: (K,) for a scalar t, (B, K) for t of shape (B,)."""
    if w1 is None:
        return w0
    return w0 + _time_col(t) * w1


# ---------------------------------------------------------------------- base class
class Potential(nn.Module):
    """A scalar potential φ(x, t) on R^dim with analytic gradient and Laplacian.

    Subclasses implement :meth:`_evaluate`; :meth:`forward` checks its input and calls it,
    :meth:`grad_and_laplacian` is the unchecked hot path the integrator calls (it skips φ
    where that saves work).

    Attributes:
        dim: N, the number of variables.
    """

    dim: int
    # Parameter-only constants (e.g. ‖W_k‖²) shared by all stages of one integration; a dict
    # only inside ``shared_constants``, None otherwise (then every call recomputes them).
    _constants: dict[str, Tensor] | None = None

    @contextlib.contextmanager
    def shared_constants(self, enabled: bool = True) -> Iterator[None]:
        """Compute parameter-only constants once for all evaluations inside the block.

        The flow wraps each integration in it, so ‖W_k‖² is computed (differentiably) once
        instead of once per RK stage. Not for use across optimiser steps, nor with gradient
        checkpointing (the recomputation runs outside the block); ``enabled=False`` is a no-op.
        """
        mods = [m for m in self.modules() if isinstance(m, Potential)]
        for m in mods:
            m._constants = {} if enabled else None
        try:
            yield
        finally:
            for m in mods:
                m._constants = None

    def _shared(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, cached under ``key`` while ``shared_constants`` is active."""
        cache = self._constants
        if cache is None:
            return compute()
        value = cache.get(key)
        if value is None:
            value = cache[key] = compute()
        return value

    @property
    def stochastic(self) -> bool:
        """True if evaluations depend on a random ``noise`` token (see :meth:`resample`)."""
        return False

    def resample(self, batch: int, generator: torch.Generator | None = None) -> Noise:
        """Draw the randomness for one integration step of ``batch`` samples.

        Deterministic potentials return None. The flow calls this once per step (not per
        RK stage) and passes the token to every stage of that step.

        Args:
            batch: number of samples B.
            generator: torch.Generator for reproducible draws; None uses the global RNG.

        Returns:
            An opaque token for ``forward(..., noise=token)``, or None.
        """
        return None

    def step_frame(self, noise: Noise) -> Frame | None:
        """An orthogonal change of variables that turns this step's potential into a simpler one.

        For a noise token that fixes φ(x) = ψ(Q x) over a whole step, returns
        ``(into, out_of, ψ, ψ_noise)`` with into(x) = Q x and out_of(y) = Qᵀ y, so the
        integrator can take the step in y = Q x (see ode.FramedDrift); None when there is
        no such frame (the default).
        """
        return None

    def forward(self, x: Tensor, t: Tensor | float = 0.0, noise: Noise = None) -> tuple[Tensor, Tensor, Tensor]:
        """Value, gradient and Laplacian.

        Args:
            x: points, shape (B, N).
            t: time, a number or a tensor of shape () or (B,).
            noise: token from :meth:`resample` for stochastic potentials; None draws afresh.

        Returns:
            (phi (B,), grad (B, N), laplacian (B,)).

        Raises:
            TypeError: x is not a floating tensor.
            ValueError: x does not have shape (B, N).
        """
        x = check_batch(x, self.dim)
        _check_time(t, x.shape[0])
        phi, grad, lap = self._evaluate(x, t, noise, True)
        assert phi is not None
        return phi, grad, lap

    def grad_and_laplacian(self, x: Tensor, t: Tensor | float = 0.0, noise: Noise = None) -> tuple[Tensor, Tensor]:
        """(∇φ (B, N), ∇²φ (B,)) without input checks: the integrator's hot path."""
        _, grad, lap = self._evaluate(x, t, noise, False)
        return grad, lap

    def _evaluate(self, x: Tensor, t: Tensor | float, noise: Noise, value: bool) -> Evaluation:
        """(phi or None if not ``value``, grad, laplacian); x already checked."""
        raise NotImplementedError

    def __add__(self, other: "Potential") -> "SumPotential":
        if not isinstance(other, Potential):
            return NotImplemented
        return SumPotential(self, other)


def _check_potential(p: object, name: str = "potential") -> Potential:
    if not isinstance(p, Potential):
        raise TypeError(f"{name} must be a Potential, got {type(p).__name__}; wrap a plain nn.Module "
                        "in AutogradPotential(module, dim=N)")
    return p


# ---------------------------------------------------------------------- fused kernels
class _MLPDrift(torch.autograd.Function):
    """(∇φ, ∇²φ) of φ = Σ_k w_k a(W_k·x + b_k) with a hand-written backward.

    Autograd through the plain expression records about fifteen nodes per RK stage; this
    keeps two (B, h) tensors per stage (base(h) and a''(h)) and runs the backward as four
    matmuls and about ten elementwise ops on (B, h). ‖W_k‖² comes in as an input, computed
    once per integration by the caller, so no (h, N) elementwise work is done per stage. With h = Wx + b,
    u = a'(h)⊙w, c = w⊙‖W‖², grad = uW, lap = a''(h)·c and incoming gradients Ĝ (B, N),
    L̂ (B,):

        ∂/∂h = (ĜWᵀ)⊙w⊙a''(h) + L̂ ⊗ (c⊙a'''(h))
        ∂/∂x = (∂/∂h) W,        ∂/∂W = uᵀĜ + (∂/∂h)ᵀx,       ∂/∂b = Σ_batch ∂/∂h
        ∂/∂w = Σ_batch (ĜWᵀ)⊙a'(h) + ‖W‖² ⊙ a''(h)ᵀL̂,       ∂/∂‖W‖² = w ⊙ a''(h)ᵀL̂

    A backward run with create_graph=True (double backward) rebuilds a(h) from the saved
    inputs with recorded ops and evaluates the same formulas out of place, so higher
    derivatives stay exact.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W: Tensor, b: Tensor | None, w: Tensor, wsq: Tensor,
                activation: str) -> tuple[Tensor, Tensor]:
        base_fn, derivs = _FUSED[activation]
        h = x @ W.t() if b is None else torch.addmm(b, x, W.t())
        base = base_fn(h)
        if activation == "softplus":  # a' = σ is the base itself; the third derivative waits
            d1, d2 = base, torch.addcmul(base, base, base, value=-1.0)
        else:
            d1, d2, _ = derivs(base, None)
        grad = (d1 * w) @ W
        lap = d2 @ (w * wsq)
        ctx.activation = activation
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, W, b if b is not None else W.new_empty(0), w, wsq, base, d2)
        return grad, lap

    @staticmethod
    def backward(ctx: Any, dG: Tensor | None, dL: Tensor | None) -> tuple[Tensor | None, ...]:
        x, W, b, w, wsq, base, d2 = ctx.saved_tensors
        b = b if ctx.has_bias else None
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph=True: rebuild base(h) and a''(h) with recorded ops so that the second
            # derivative sees their dependence on x, W, b; everything below is then out of place
            h = x @ W.t() if b is None else torch.addmm(b, x, W.t())
            base = _FUSED[ctx.activation][0](h)
            return _mlp_drift_vjp(x, W, b, w, wsq, base, None, dG, dL, needs, ctx.activation, False)
        return _mlp_drift_vjp(x, W, b, w, wsq, base, d2, dG, dL, needs, ctx.activation, True)


def _mlp_drift_vjp(x: Tensor, W: Tensor, b: Tensor | None, w: Tensor, wsq: Tensor, base: Tensor,
                   d2: Tensor | None, dG: Tensor | None, dL: Tensor | None, needs: tuple[bool, ...],
                   activation: str, inplace: bool) -> tuple[Tensor | None, ...]:
    """The backward formulas of :class:`_MLPDrift` (see its docstring)."""
    d1, d2, d3 = _FUSED[activation][1](base, d2)
    dh = dW = dw = dwsq = None
    if dG is not None:
        du = dG @ W.t()  # (B, h)
        dh = du * (w * d2)
        if needs[1]:
            dW = (d1 * w).t() @ dG
        if needs[3]:
            dw = (du * d1).sum(0)
    if dL is not None:
        c3 = torch.outer(dL, w * wsq)
        if dh is None:
            dh = c3.mul_(d3) if inplace else c3 * d3
        else:
            dh = dh.addcmul_(c3, d3) if inplace else torch.addcmul(dh, c3, d3)
        dc = dL @ d2  # (h,): ∂/∂c
        if needs[3]:
            dw = dc * wsq if dw is None else dw + dc * wsq
        if needs[4]:
            dwsq = dc * w
    dx = db = None
    if dh is not None:
        if needs[0]:
            dx = dh @ W
        if needs[1]:
            dW = dh.t() @ x if dW is None else (dW.addmm_(dh.t(), x) if inplace else torch.addmm(dW, dh.t(), x))
        if needs[2] and b is not None:
            db = dh.sum(0)
    return dx, dW, db, dw, dwsq, None


class _SignedPermutation(torch.autograd.Function):
    """y = s ⊙ x[perm] row by row; its adjoint is s ⊙ y[inverse_perm], again a gather.

    Autograd's gather backward is a scatter_add into zeros; for a permutation the inverse
    gather is the same map, cheaper. The backward calls this Function again, so it is
    differentiable any number of times.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, perm: Tensor, inverse_perm: Tensor, sign: Tensor | None) -> Tensor:
        ctx.save_for_backward(perm, inverse_perm, sign if sign is not None else perm.new_empty(0))
        ctx.has_sign = sign is not None
        y = torch.gather(x, 1, perm)
        return y * sign if sign is not None else y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, None, None, None]:
        perm, inverse_perm, sign = ctx.saved_tensors
        return _SignedPermutation.apply(dy, inverse_perm, perm, sign if ctx.has_sign else None), None, None, None


# ---------------------------------------------------------------------- MLP
def _initial_readout(n: int, init_scale: float | str) -> Tensor:
    """Initial readout weights: init_scale·N(0, 1), or U(±1/√n) (nn.Linear's) for ``"linear"``."""
    if init_scale == "linear":
        return torch.empty(n).uniform_(-1.0 / math.sqrt(n), 1.0 / math.sqrt(n))
    if isinstance(init_scale, str) or not (math.isfinite(init_scale) and init_scale >= 0):
        raise ValueError(f"init_scale must be a finite number >= 0 or 'linear', got init_scale={init_scale!r}")
    return init_scale * torch.randn(n)


class MLPPotential(Potential):
    """The paper's one-hidden-layer potential φ(x) = Σ_k w_k a(W_k·x + b_k) (section 3).

    With pre-activations h = W x + b (one matmul, shared by all three outputs),

        ∇φ = (a'(h) ⊙ w) W,      ∇²φ = Σ_k w_k a''(h_k) ‖W_k‖²,

    so the Laplacian costs O(B·h) once h is known.

    Time dependence (``time_dependent=True``) enters linearly and cheaply: w(t) = w + t·u and
    b(t) = b + t·c, all initialised at zero. Without a bias only the readout depends on t, so
    the Z2 evenness of ``activation="lncosh", bias=False`` (φ(−x) = φ(x)) is kept.

    Initialisation: W and b as in nn.Linear; w ~ init_scale·N(0, 1), 1e-3 by default, so the
    initial flow is within ~1e-3 of the identity (``init_scale=0`` starts exactly at it; the
    first gradient step then only moves w). ``init_scale="linear"`` draws w ~ U(±1/√h) as
    nn.Linear(h, 1) does, which is what the original code does.

    Args:
        dim: N, number of inputs.
        hidden: h, number of hidden units.
        activation: ``"softplus"``, ``"lncosh"`` or ``"tanh"``.
        bias: include b (``False`` with ``"lncosh"`` gives a Z2-even potential).
        time_dependent: let φ depend on t as above.
        init_scale: standard deviation of the initial readout weights w, or ``"linear"``.
        fused: compute (∇φ, ∇²φ) in the integrator as one autograd node per stage with a
            hand-written backward (fewer elementwise passes and saved tensors); exact, also
            under double backward. ``False`` uses plain autograd ops (the reference the
            tests compare against).

    Example:
        >>> pot = MLPPotential(16, 32)
        >>> phi, grad, lap = pot(torch.randn(4, 16))
    """

    def __init__(self, dim: int, hidden: int, activation: str = "softplus", bias: bool = True,
                 time_dependent: bool = False, init_scale: float | str = 1e-3, fused: bool = True) -> None:
        super().__init__()
        self.dim = check_size("dim", dim)
        self.hidden = check_size("hidden", hidden)
        self.fused = bool(fused)
        self.activation = check_choice("activation", activation, tuple(ACTIVATIONS))
        self._act = ACTIVATIONS[activation]
        self.time_dependent = bool(time_dependent)
        bound = 1.0 / math.sqrt(self.dim)
        self.weight = nn.Parameter(torch.empty(self.hidden, self.dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(self.hidden).uniform_(-bound, bound)) if bias else None
        self.readout = nn.Parameter(_initial_readout(self.hidden, init_scale))
        if self.time_dependent:
            self.readout_t = nn.Parameter(torch.zeros(self.hidden))
            self.bias_t = nn.Parameter(torch.zeros(self.hidden)) if bias else None
        else:
            self.readout_t = None
            self.bias_t = None

    def _weight_norms(self) -> Tensor:
        """‖W_k‖², shape (h,): once per integration inside ``shared_constants``."""
        return self._shared("wsq", lambda: self.weight.square().sum(1))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, activation={self.activation!r}, "
                f"bias={self.bias is not None}, time_dependent={self.time_dependent}")

    def _evaluate(self, x: Tensor, t: Tensor | float, noise: Noise, value: bool) -> Evaluation:
        W = self.weight
        if self.fused and not value and _is_scalar_time(t):
            # hot path: one autograd node per stage (see _MLPDrift)
            b = self.bias if self.bias_t is None else self.bias + t * self.bias_t
            w = self.readout if self.readout_t is None else self.readout + t * self.readout_t
            grad, lap = _MLPDrift.apply(x, W, b, w, self._weight_norms(), self.activation)
            return None, grad, lap
        h = x @ W.t() if self.bias is None else torch.addmm(self.bias, x, W.t())
        if self.bias_t is not None:
            h = h + _time_col(t) * self.bias_t
        a, a1, a2 = self._act(h, value)
        w = _readout(self.readout, self.readout_t, t)
        wsq = self._weight_norms()
        grad = (a1 * w) @ W
        if w.dim() == 1:
            lap = a2 @ (w * wsq)
            phi = a @ w if value else None
        else:
            lap = (a2 * w) @ wsq
            phi = (a * w).sum(1) if value else None
        return phi, grad, lap


# ---------------------------------------------------------------------- lattice helpers
def _lattice_shape(shape: object) -> tuple[int, int]:
    if isinstance(shape, (tuple, list)) and len(shape) == 2:
        return check_size("L1", shape[0]), check_size("L2", shape[1])
    raise ValueError(f"lattice_shape must be an int N or a pair (L1, L2), got {shape!r}")


def _displacement_orbits(L1: int, L2: int, d4: bool) -> Tensor:
    """Orbit label of every displacement (dr, dc) mod (L1, L2), shape (L1, L2), labels 0..n-1.

    The orbits are under dr → −dr (always: A must be symmetric) and, with ``d4``, under the 8
    rotations and reflections of the square (L1 = L2).
    """
    r, c = torch.meshgrid(torch.arange(L1), torch.arange(L2), indexing="ij")
    if d4:
        images = [(r, c), (c, -r), (-r, -c), (-c, r), (r, -c), (-r, c), (c, r), (-c, -r)]
    else:
        images = [(r, c), (-r, -c)]
    codes = torch.stack([(a % L1) * L2 + (b % L2) for a, b in images]).amin(0)
    return torch.unique(codes.reshape(-1), return_inverse=True)[1].reshape(L1, L2)


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
    labels = torch.roll(_displacement_orbits(k, k, d4=True), (p, p), (0, 1)).reshape(-1)
    basis = F.one_hot(labels).t().to(torch.get_default_dtype())
    return basis / basis.sum(1, keepdim=True).sqrt()


def _d4_symmetrize(k: Tensor) -> Tensor:
    """Average of a stack of square kernels (..., k, k) over the 8 elements of D4."""
    kt = k.transpose(-1, -2)
    out = k + kt
    for r in (1, 2, 3):
        out = out + torch.rot90(k, r, (-2, -1)) + torch.rot90(kt, r, (-2, -1))
    return out / 8.0


# ---------------------------------------------------------------------- quadratic
class QuadraticPotential(Potential):
    """φ(x) = ½ xᵀAx + bᵀx with an exactly Gaussian flow (paper appendix A).

    ∇φ = Ax + b and ∇²φ = tr A, the same for every sample, so log p changes by exactly
    −t·tr A and x(t) = e^{At} x(0) + (e^{At} − 1)A⁻¹b.

    On an L1×L2 periodic lattice (``lattice_shape=(L1, L2)``) A is circulant,
    A_ij = a(r_i − r_j), with a kernel over displacement orbits: a(dr) = a(−dr) always
    (``symmetric="translation"``), and also D4-invariant with ``symmetric="d4"`` (square
    lattices). A is applied with a 2D real FFT in O(N log N), never as a dense matrix, and
    tr A = N·a(0). The linear term is b = c·1 (translation invariant); ``linear=False`` drops
    it, making φ Z2-even. ``symmetric="none"`` (the only choice when ``lattice_shape`` is an
    int N) uses a dense symmetric A = (M + Mᵀ)/2 and a free b: O(N²) per sample.

    Time dependence: every parameter θ becomes θ + t·θ', with θ' initialised at zero.
    All parameters start at zero: the initial flow is the identity.

    Args:
        lattice_shape: (L1, L2) for a lattice, or an int N for an unstructured vector.
        symmetric: ``"d4"``, ``"translation"`` or ``"none"``.
        linear: include the linear term b.
        time_dependent: parameters vary linearly in t.
    """

    def __init__(self, lattice_shape: int | tuple[int, int], symmetric: str = "d4", linear: bool = True,
                 time_dependent: bool = False) -> None:
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
            orbits = _displacement_orbits(*self.shape, d4=self.symmetric == "d4")
            self.register_buffer("orbits", orbits, persistent=False)
            n_a, b_shape = (int(orbits.max()) + 1,), ()
        self.a = nn.Parameter(torch.zeros(n_a))
        self.a_t = nn.Parameter(torch.zeros(n_a)) if self.time_dependent else None
        self.b = nn.Parameter(torch.zeros(b_shape)) if self.linear else None
        self.b_t = nn.Parameter(torch.zeros(b_shape)) if self.linear and self.time_dependent else None

    def extra_repr(self) -> str:
        shape = self.shape if self.shape is not None else self.dim
        return (f"lattice_shape={shape}, symmetric={self.symmetric!r}, linear={self.linear}, "
                f"time_dependent={self.time_dependent}")

    def _param(self, p: Tensor, p_t: Tensor | None, t: Tensor | float) -> Tensor:
        if p_t is None:
            return p
        if _is_scalar_time(t):
            return p + t * p_t
        return p + t.reshape((-1,) + (1,) * p.dim()) * p_t  # (B, ...)

    def kernel(self, t: Tensor | float = 0.0) -> Tensor:
        """The circulant kernel a(dr) as an (L1, L2) image (row 0 of A); (B, L1, L2) for t of shape (B,)."""
        if self.orbits is None:
            raise ValueError("kernel() exists only for lattice potentials (symmetric='d4' or 'translation')")
        return self._param(self.a, self.a_t, t)[..., self.orbits]

    def _kernel_and_transform(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        K = self.kernel(t)
        return K, torch.fft.rfft2(K).real

    def matrix(self, t: float = 0.0) -> Tensor:
        """The dense matrix A, shape (N, N) (for tests and inspection; O(N²) memory)."""
        if self.orbits is None:
            M = self._param(self.a, self.a_t, t)
            return 0.5 * (M + M.transpose(-1, -2))
        L1, L2 = self.shape
        K = self.kernel(t)
        r, c = torch.meshgrid(torch.arange(L1), torch.arange(L2), indexing="ij")
        r, c = r.reshape(-1), c.reshape(-1)
        return K[(r[:, None] - r[None, :]) % L1, (c[:, None] - c[None, :]) % L2]

    def _evaluate(self, x: Tensor, t: Tensor | float, noise: Noise, value: bool) -> Evaluation:
        B, N = x.shape
        if self.orbits is None:
            A = self.matrix(t)
            Ax = x @ A if A.dim() == 2 else torch.einsum("bij,bj->bi", A, x)
            lap = torch.diagonal(A, dim1=-2, dim2=-1).sum(-1).expand(B)
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
            b = self._param(self.b, self.b_t, t)
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


# ---------------------------------------------------------------------- convolutional
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
        return _d4_symmetrize(self.conv_weight) if self.d4 else self.conv_weight

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


# ---------------------------------------------------------------------- autograd
class AutogradPotential(Potential):
    """Any scalar network φ(x) (or φ(x, t)), differentiated by autograd.

    The gradient comes from torch.autograd.grad with create_graph=True (so the Laplacian and
    training can differentiate it again). The Laplacian is either

    - ``"exact"``: the Hessian diagonal from N batched Hessian-vector products against the
      identity basis (``is_grads_batched``, a vmap; a loop if the module does not vmap).
      O(N) backward passes: for small N.
    - ``"hutchinson"``: Hutchinson's estimator ∇²φ ≈ (1/P) Σ_p vₚᵀ H vₚ with P = n_probes
      Rademacher vectors. Unbiased, with variance 2 Σ_{i≠j} H_ij² / P per sample, so it is
      noisy: fine for training, not for exact log densities. The probes are this potential's
      noise token (drawn by :meth:`resample`, one set per integration step).

    Args:
        module: maps x (B, N) to φ (B,), or (x, t) to φ with ``time_dependent=True``.
        dim: N; inferred from ``module.dim`` or the first nn.Linear when omitted.
        laplacian: ``"exact"`` or ``"hutchinson"``.
        n_probes: P, Rademacher probes per evaluation (Hutchinson only).
        time_dependent: call ``module(x, t)`` instead of ``module(x)``.
    """

    def __init__(self, module: nn.Module, dim: int | None = None, laplacian: str = "exact", n_probes: int = 1,
                 time_dependent: bool = False) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        if dim is None:
            dim = getattr(module, "dim", None)
            if dim is None:
                lin = next((m for m in module.modules() if isinstance(m, nn.Linear)), None)
                if lin is None:
                    raise ValueError("cannot infer the input dimension of module; pass dim=N")
                dim = lin.in_features
        self.dim = check_size("dim", dim)
        self.laplacian = check_choice("laplacian", laplacian, ("exact", "hutchinson"))
        self.n_probes = check_size("n_probes", n_probes)
        self.time_dependent = bool(time_dependent)

    @property
    def stochastic(self) -> bool:
        return self.laplacian == "hutchinson"

    def resample(self, batch: int, generator: torch.Generator | None = None) -> Tensor | None:
        """Rademacher probes, shape (n_probes, batch, N), int8 ±1 (Hutchinson); None if exact."""
        if self.laplacian != "hutchinson":
            return None
        batch = check_size("batch", batch)
        dev = next((p.device for p in self.parameters()), None)
        r = torch.randint(0, 2, (self.n_probes, batch, self.dim), generator=generator, dtype=torch.int8, device=dev)
        return 2 * r - 1

    def _evaluate(self, x: Tensor, t: Tensor | float, noise: Noise, value: bool) -> Evaluation:
        outer = torch.is_grad_enabled()
        B, N = x.shape
        with torch.enable_grad():
            xi = x if x.requires_grad else x.detach().requires_grad_(True)
            phi = self.module(xi, t) if self.time_dependent else self.module(xi)
            if phi.shape != (B,):
                raise ValueError(f"module must return shape ({B},), got shape={tuple(phi.shape)}")
            (grad,) = torch.autograd.grad(phi.sum(), xi, create_graph=True)
            if self.laplacian == "exact":
                probes = torch.eye(N, dtype=x.dtype, device=x.device)[:, None, :].expand(N, B, N)
            else:
                probes = self.resample(B) if noise is None else noise
                if probes.shape[1:] != (B, N):
                    raise ValueError(f"Hutchinson probes must have shape (P, {B}, {N}), got {tuple(probes.shape)}")
                probes = probes.to(x.dtype)
            hv = self._hvp(grad, xi, probes, outer)  # (P, B, N)
            if self.laplacian == "exact":
                lap = torch.diagonal(hv, dim1=0, dim2=2).sum(-1)
            else:
                lap = (hv * probes).sum(-1).mean(0)
        if not outer:
            phi, grad, lap = phi.detach(), grad.detach(), lap.detach()
        return (phi if value else None), grad, lap

    @staticmethod
    def _hvp(grad: Tensor, x: Tensor, probes: Tensor, create_graph: bool) -> Tensor:
        try:
            (hv,) = torch.autograd.grad(grad, x, grad_outputs=probes, is_grads_batched=True,
                                        create_graph=create_graph, retain_graph=True)
            return hv
        except RuntimeError:  # the module does not support vmap: one backward pass per probe
            rows = [torch.autograd.grad(grad, x, grad_outputs=v, create_graph=create_graph, retain_graph=True)[0]
                    for v in probes]
            return torch.stack(rows)


# ---------------------------------------------------------------------- sums
class SumPotential(Potential):
    """φ = Σ_j φ_j: values, gradients and Laplacians add. Also written ``p + q``.

    Args:
        potentials: two or more potentials with the same ``dim`` (nested sums are flattened).

    Noise: a tuple with one token per part (None for deterministic parts), or None if no
    part is stochastic.
    """

    def __init__(self, *potentials: Potential) -> None:
        super().__init__()
        parts: list[Potential] = []
        for i, p in enumerate(potentials):
            _check_potential(p, f"potentials[{i}]")
            parts.extend(p.parts if isinstance(p, SumPotential) else [p])
        if not parts:
            raise ValueError("SumPotential needs at least one potential, got none")
        dims = [p.dim for p in parts]
        if len(set(dims)) != 1:
            raise ValueError(f"all potentials must have the same dim, got dims={dims}")
        self.dim = dims[0]
        self.parts = nn.ModuleList(parts)

    @property
    def stochastic(self) -> bool:
        return any(p.stochastic for p in self.parts)

    def resample(self, batch: int, generator: torch.Generator | None = None) -> tuple | None:
        if not self.stochastic:
            return None
        return tuple(p.resample(batch, generator) for p in self.parts)

    def _evaluate(self, x: Tensor, t: Tensor | float, noise: Noise, value: bool) -> Evaluation:
        noises = noise if noise is not None else (None,) * len(self.parts)
        if len(noises) != len(self.parts):
            raise ValueError(f"noise must have one entry per part ({len(self.parts)}), got {len(noises)}")
        phi = grad = lap = None
        for p, n in zip(self.parts, noises):
            f, g, l_ = p._evaluate(x, t, n, value)
            if grad is None:
                phi, grad, lap = f, g, l_
            else:
                grad, lap = grad + g, lap + l_
                if value:
                    phi = phi + f
        return phi, grad, lap


# ---------------------------------------------------------------------- symmetrisation
def _check_group(group: object, dim: int) -> Any:
    for attr in ("perms", "inverse_perms", "signs", "order", "dim"):
        if not hasattr(group, attr):
            raise TypeError(f"group must be a SymmetryGroup, got {type(group).__name__}; build one with "
                            "translation_group(lattice), space_group(lattice), ...")
    if group.dim != dim:
        raise ValueError(f"group acts on dim={group.dim} sites but the potential has dim={dim}")
    return group


class SymmetryDraw(NamedTuple):
    """The random group elements of one integration step (token of :class:`Symmetrized`).

    Attributes:
        index: element per sample, LongTensor (B,) (what to store to replay a run).
        perm: perms[index], (B, N): (g·x)_i = sign · x[perm[i]].
        inverse_perm: inverse_perms[index], (B, N).
        sign: signs[index] as a column (B, 1), or None when the group has no spin flip.
    """

    index: Tensor
    perm: Tensor
    inverse_perm: Tensor
    sign: Tensor | None


class Symmetrized(Potential):
    """Group average φ(x) = (1/|G|) Σ_g φ̃(g·x) of a potential φ̃ (paper section 4.2).

    A group element acts as (g·x)_i = s_g x_{p_g(i)}; the action is orthogonal, so
    ∇φ(x) = (1/|G|) Σ_g gᵀ ∇φ̃(g·x) and ∇²φ(x) = (1/|G|) Σ_g ∇²φ̃(g·x).

    Modes:

    - ``"exact"``: all G images in one batched call of φ̃ on (B·G, N) and an average; the
      gradients come back with one gather through ``inverse_perms``. Memory O(B·G·N).
    - ``"random"``: the paper's scheme. The noise token is a :class:`SymmetryDraw`: one group
      element per sample (index (B,) from torch.randint) with its rows of the (G, N) tables
      gathered once; a plain LongTensor of indices is accepted too. The flow draws it once
      per integration step, so each step integrates one smooth potential φ̃(g_b·x) and the
      symmetry holds on average. Each evaluation is then two gathers of shape (B, N). Without
      a token every call draws a fresh one from the global RNG. If φ̃ is itself stochastic
      the token is the pair (draw, token of φ̃).

    Args:
        potential: φ̃.
        group: a SymmetryGroup (latticeflow.symmetry) with perms, inverse_perms, signs.
        mode: ``"random"`` or ``"exact"``.
    """

    def __init__(self, potential: Potential, group: Any, mode: str = "random") -> None:
        super().__init__()
        self.potential = _check_potential(potential)
        self.dim = potential.dim
        group = _check_group(group, self.dim)
        self.mode = check_choice("mode", mode, ("random", "exact"))
        self.order = int(group.order)
        self.group_name = getattr(group, "name", "group")
        self.register_buffer("perms", group.perms.clone().long(), persistent=False)
        self.register_buffer("inverse_perms", group.inverse_perms.clone().long(), persistent=False)
        self.register_buffer("signs", group.signs.clone().to(torch.get_default_dtype()), persistent=False)
        self._has_flip = bool((group.signs < 0).any())

    def extra_repr(self) -> str:
        return f"group={self.group_name!r} (order {self.order}), mode={self.mode!r}"

    @property
    def stochastic(self) -> bool:
        return self.mode == "random" or self.potential.stochastic

    def _draw(self, index: Tensor, check: bool = True) -> "SymmetryDraw":
        """Gather the tables for element indices (B,); ``check=False`` skips the range check,
        which costs two device synchronisations, for indices drawn by :meth:`resample`."""
        if not isinstance(index, Tensor) or index.dtype != torch.long or index.dim() != 1:
            raise TypeError("symmetry noise must be a SymmetryDraw or a LongTensor (B,) of element indices, "
                            f"got {index!r}")
        if check and index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.order):
            raise ValueError(f"symmetry indices must lie in [0, {self.order}), got range "
                             f"[{int(index.min())}, {int(index.max())}]")
        # index_select: advanced indexing of the (G, N) tables is an order of magnitude slower
        sign = self.signs.index_select(0, index)[:, None] if self._has_flip else None
        return SymmetryDraw(index, self.perms.index_select(0, index), self.inverse_perms.index_select(0, index), sign)

    def resample(self, batch: int, generator: torch.Generator | None = None) -> Noise:
        """One group element per sample (random mode) as a :class:`SymmetryDraw`.

        Paired with φ̃'s token, ``(draw, token)``, if φ̃ is stochastic; None in exact mode
        with a deterministic φ̃.
        """
        batch = check_size("batch", batch)
        draw = None
        if self.mode == "random":
            draw = self._draw(torch.randint(self.order, (batch,), generator=generator, device=self.perms.device),
                              check=False)
        if self.potential.stochastic:
            return draw, self.potential.resample(batch if self.mode == "random" else batch * self.order, generator)
        return draw

    def step_frame(self, noise: Noise) -> Frame | None:
        """Random mode: φ(x) = φ̃(g_b·x) for the whole step, so step in y = g_b·x with φ̃.

        Two gathers per step instead of two per RK stage.
        """
        if self.mode != "random" or noise is None:
            return None
        inner = None
        if self.potential.stochastic:
            noise, inner = noise
        draw = noise if isinstance(noise, SymmetryDraw) else self._draw(noise)
        perm, inv, sign = draw.perm, draw.inverse_perm, draw.sign

        def into(x: Tensor) -> Tensor:
            s = sign if sign is None or sign.dtype == x.dtype else sign.to(x.dtype)
            return _SignedPermutation.apply(x, perm, inv, s)

        def out_of(y: Tensor) -> Tensor:
            s = sign if sign is None or sign.dtype == y.dtype else sign.to(y.dtype)
            return _SignedPermutation.apply(y, inv, perm, s)

        return into, out_of, self.potential, inner

    def _evaluate(self, x: Tensor, t: Tensor | float, noise: Noise, value: bool) -> Evaluation:
        B, N = x.shape
        inner = None
        if self.potential.stochastic:
            noise, inner = noise if noise is not None else (None, None)
        signs = self.signs if self.signs.dtype == x.dtype else self.signs.to(x.dtype)
        if self.mode == "exact":
            G = self.order
            y = x.index_select(1, self.perms.reshape(-1)).reshape(B, G, N)  # all images, (B, G, N)
            if self._has_flip:
                y = y * signs[None, :, None]
            if not _is_scalar_time(t):
                t = t.repeat_interleave(G)
            phi, gy, lap = self.potential._evaluate(y.reshape(B * G, N), t, inner, value)
            gx = torch.gather(gy.reshape(B, G, N), 2, self.inverse_perms[None].expand(B, G, N))
            if self._has_flip:
                gx = gx * signs[None, :, None]
            grad = gx.mean(1)
            lap = lap.reshape(B, G).mean(1)
            if value:
                phi = phi.reshape(B, G).mean(1)
            return phi, grad, lap
        draw = self._draw(torch.randint(self.order, (B,), device=x.device), check=False) if noise is None else noise
        if not isinstance(draw, SymmetryDraw):
            draw = self._draw(draw)
        if draw.index.shape != (B,):
            raise ValueError(f"symmetry index must have shape ({B},), got shape={tuple(draw.index.shape)}")
        sign = draw.sign
        if sign is not None and sign.dtype != x.dtype:
            sign = sign.to(x.dtype)
        y = _SignedPermutation.apply(x, draw.perm, draw.inverse_perm, sign)
        phi, gy, lap = self.potential._evaluate(y, t, inner, value)
        grad = _SignedPermutation.apply(gy, draw.inverse_perm, draw.perm, sign)
        return phi, grad, lap

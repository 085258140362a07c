"""The paper's one-hidden-layer potential φ(x) = Σ_k w_k a(W_k·x + b_k), with a fused drift.

"Monge-Ampère Flow for Generative Modeling" (Zhang, E, Wang, arXiv:1809.10188), section 3.
With pre-activations h = W x + b (B, h),

    ∇φ = (a'(h) ⊙ w) W,      ∇²φ = Σ_k w_k a''(h_k) ‖W_k‖²,

so the Laplacian costs O(B·h) once h is known. The integrator's hot path (∇φ, ∇²φ) is one
custom autograd node per RK stage, :class:`_MLPDrift`, whose backward is written out by hand
(and stays exact under double backward); ``fused=False`` uses plain autograd ops instead.

Symbols: B batch, N = dim inputs, h hidden units, t time.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_size
from ..native import step as native_step
from ..ode import rk4_step
from .activations import ACTIVATIONS, FUSED, _one_minus_square, fused_forward, pre_scale
from .base import Evaluation, Noise, Potential, _initial_readout, _is_scalar_time, _readout, _time_col

__all__ = ["MLPPotential"]


# ---------------------------------------------------------------------- fused drift
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
        s = pre_scale(activation, x.dtype, x.device)  # the matmul forms s·h (2h for tanh h = 2σ(2h) − 1)
        h = (x @ W.t()).mul_(s) if b is None else torch.addmm(b, x, W.t(), beta=s, alpha=s)
        base, d1, d2 = fused_forward(activation, h, s)
        # u W with u = a'(h)⊙w: with more samples than inputs (B > N) w goes into W, an (h, N) product,
        # instead of into the (B, h) derivatives
        grad = d1 @ (w[:, None] * W) if x.shape[0] > x.shape[1] else (d1 * w) @ W
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
            base = FUSED[ctx.activation][0](h)
            return _mlp_drift_vjp(x, W, b, w, wsq, base, None, dG, dL, needs, ctx.activation, False)
        return _mlp_drift_vjp(x, W, b, w, wsq, base, d2, dG, dL, needs, ctx.activation, True)


def _mlp_drift_vjp(x: Tensor, W: Tensor, b: Tensor | None, w: Tensor, wsq: Tensor, base: Tensor,
                   d2: Tensor | None, dG: Tensor | None, dL: Tensor | None, needs: tuple[bool, ...],
                   activation: str, inplace: bool) -> tuple[Tensor | None, ...]:
    """The backward formulas of :class:`_MLPDrift` (see its docstring).

    With more samples than inputs (B > N, the small lattices) the readout w is folded into the
    (h, N) weights instead of the (B, h) derivatives: (ĜWᵀ)⊙w = Ĝ(w⊙W)ᵀ, and with M = a'(h)ᵀĜ
    (h, N), uᵀĜ = w⊙M and Σ_batch (ĜWᵀ)⊙a'(h) = Σ_N W⊙M. For ln cosh (a' = tanh and the third
    derivative −2 a' a'') both terms of ∂/∂h share the factor a'':
    ∂/∂h = a''⊙((ĜWᵀ)⊙w − 2 tanh(h)⊙(L̂⊗c)). Each saves passes over (B, h) tensors, which
    dominate an L=4 iteration.
    """
    fold = x.shape[0] > x.shape[1]
    lncosh = activation == "lncosh"
    if lncosh:
        d1, d3 = base, None
        if d2 is None:
            d2 = _one_minus_square(base)
    else:
        d1, d2, d3 = FUSED[activation][1](base, d2)
    dh = dW = dw = dwsq = None  # for ln cosh, dh lacks the common factor a'' until the end
    if dG is not None:
        if fold:
            dh = dG @ (w[:, None] * W).t()  # (B, h): (ĜWᵀ)⊙w
            if needs[1] or needs[3]:
                M = d1.t() @ dG  # (h, N)
                dW = w[:, None] * M if needs[1] else None
                dw = (W * M).sum(1) if needs[3] else None
        else:
            du = dG @ W.t()  # (B, h)
            dh = du * w
            if needs[1]:
                dW = (d1 * w).t() @ dG
            if needs[3]:
                dw = (du * d1).sum(0)
        if not lncosh:
            dh = dh.mul_(d2) if inplace else dh * d2
    if dL is not None:
        dc = dL @ d2  # (h,): ∂/∂c
        if needs[3]:
            dw = dc * wsq if dw is None else dw + dc * wsq
        if needs[4]:
            dwsq = dc * w
        c3, d = (torch.outer(dL, -2.0 * (w * wsq)), d1) if lncosh else (torch.outer(dL, w * wsq), d3)
        if dh is None:
            dh = c3.mul_(d) if inplace else c3 * d
        else:
            dh = dh.addcmul_(c3, d) if inplace else torch.addcmul(dh, c3, d)
    if lncosh and dh is not None:
        dh = dh.mul_(d2) if inplace else dh * d2
    dx = db = None
    if dh is not None:
        if needs[0]:
            dx = dh @ W
        if needs[1]:
            dW = dh.t() @ x if dW is None else (dW.addmm_(dh.t(), x) if inplace else torch.addmm(dW, dh.t(), x))
        if needs[2] and b is not None:
            db = dh.sum(0)
    return dx, dW, db, dw, dwsq, None


# ---------------------------------------------------------------------- fused RK4 step (small lattices)
def _reference_rk4(y: Tensor, logp: Tensor, W: Tensor, b0: Tensor | None, b1: Tensor | None, w0: Tensor,
                   w1: Tensor | None, A0: Tensor | None, A1: Tensor | None, activation: str, t: float,
                   dt: float) -> tuple[Tensor, Tensor]:
    """The step :class:`_MLPRK4Step` computes, in plain autograd ops (the double backward's graph).

    The drift of φ(y) = Σ_k w_k a(W_k·y + b_k) + ½ yᵀA y with b = b0 + t b1, w = w0 + t w1,
    A = A0 + t A1: v = yA + (a'(h)⊙w)W, ℓ = −(tr A + a''(h)·(w⊙‖W‖²)), stepped as ode.rk4_step.
    """
    act = ACTIVATIONS[activation]
    wsq = W.square().sum(1)

    def drift(tau: float, s: Tensor) -> tuple[Tensor, Tensor]:
        h = s @ W.t()
        if b0 is not None:
            h = h + (b0 if b1 is None else b0 + tau * b1)
        w = w0 if w1 is None else w0 + tau * w1
        _, a1, a2 = act(h, False)
        v = (a1 * w) @ W
        lap = a2 @ (w * wsq)
        if A0 is not None:
            A = A0 if A1 is None else A0 + tau * A1
            v = v + s @ A
            lap = lap + torch.diagonal(A).sum()
        return v, -lap

    return rk4_step(drift, t, y, logp, dt)


class _MLPRK4Step(torch.autograd.Function):
    """One RK4 step of the MLP (+ quadratic) drift by a compiled step (latticeflow.native.step).

    Forward and backward are one kernel call each. The lanes step (small lattices) recomputes the
    step's four stages in the backward from its input y, the only tensor saved besides the
    parameters; the GEMM step (larger lattices) keeps its stage points and pre-activations when a
    gradient is wanted. A backward with create_graph=True (a second derivative, such as the gradient
    of ln|det ∂x/∂z|) differentiates :func:`_reference_rk4` instead, so higher derivatives stay exact.
    """

    @staticmethod
    def forward(ctx: Any, y: Tensor, logp: Tensor, W: Tensor, b0: Tensor | None, b1: Tensor | None, w0: Tensor,
                w1: Tensor | None, A0: Tensor | None, A1: Tensor | None, activation: str, t: float,
                dt: float, path: str = "lanes") -> tuple[Tensor, Tensor]:
        params = [None if q is None else q.contiguous() for q in (W, b0, b1, w0, w1, A0, A1)]
        y = y.contiguous()
        ctx.activation, ctx.t, ctx.dt, ctx.path = activation, t, dt, path
        ctx.absent = [q is None for q in params]
        # one step without a frame; the lanes step's backward needs only y, saved below anyway
        keep = any(ctx.needs_input_grad) and path != "lanes"
        y_out, logp_out, stages = native_step.integrate_forward(path, y, logp.contiguous(), None, None, *params,
                                                                activation, t, dt, 1, keep)
        ctx.n_stages = len(stages)
        ctx.save_for_backward(y, logp, *[q if q is not None else y.new_empty(0) for q in params], *stages)
        return y_out, logp_out

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None, glogp: Tensor | None) -> tuple[Tensor | None, ...]:
        y, logp, *saved = ctx.saved_tensors
        stages = saved[len(saved) - ctx.n_stages:]
        params = [None if gone else q for q, gone in zip(saved, ctx.absent)]
        gy = torch.zeros_like(y) if gy is None else gy.contiguous()
        glogp = torch.zeros_like(logp) if glogp is None else glogp.contiguous()
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: the same step in recorded ops
            # through views: a nested grad with respect to W itself would also run every earlier step
            # that used W (their paths reach W too), so each step's backward would run all before it
            ins = [q.view_as(q) if q is not None else None for q in (y, logp, *params)]
            inputs = [(i, q) for i, q in enumerate(ins) if q is not None and needs[i]]
            out = _reference_rk4(*ins, ctx.activation, ctx.t, ctx.dt)
            got = torch.autograd.grad(out, [q for _, q in inputs], (gy, glogp), create_graph=True, allow_unused=True)
            grads: list[Tensor | None] = [None] * 9
            for (i, q), g in zip(inputs, got):
                grads[i] = torch.zeros_like(q) if g is None else g
            return (*grads, None, None, None, None)
        kept = [y[None]] if ctx.path == "lanes" else list(stages)
        gy_in, *pgrads = native_step.integrate_backward(ctx.path, kept, None, None, gy, glogp, *params, ctx.activation,
                                                        ctx.t, ctx.dt, 1)
        grads = [gy_in if needs[0] else None, glogp if needs[1] else None]
        grads += [g if needs[2 + i] else None for i, g in enumerate(pgrads)]
        return (*grads, None, None, None, None)


class _MLPRK4Integration(torch.autograd.Function):
    """n RK4 steps of the MLP (+ quadratic) drift by a compiled step (``path``: lanes or GEMM) in one call
    each way, step k in the frame of its random symmetry element (``perm`` (n, B, N), ``sign`` (n, B); None:
    no frame).

    The integrator's per-step Python, autograd nodes and frame gathers are gone; the numbers are those
    of the steps one by one (the same kernel). A backward with create_graph=True differentiates the
    same integration written in autograd ops (:func:`_reference_rk4` between the frames).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, logp: Tensor, perm: Tensor | None, sign: Tensor | None, W: Tensor,
                b0: Tensor | None, b1: Tensor | None, w0: Tensor, w1: Tensor | None, A0: Tensor | None,
                A1: Tensor | None, activation: str, t0: float, dt: float, n: int,
                path: str) -> tuple[Tensor, Tensor]:
        params = [None if q is None else q.contiguous() for q in (W, b0, b1, w0, w1, A0, A1)]
        x = x.contiguous()
        ctx.activation, ctx.t0, ctx.dt, ctx.n, ctx.path = activation, t0, dt, n, path
        ctx.absent = [q is None for q in (perm, sign, *params)]
        x_out, logp_out, stages = native_step.integrate_forward(path, x, logp.contiguous(), perm, sign, *params,
                                                                activation, t0, dt, n, any(ctx.needs_input_grad))
        ctx.n_stages = len(stages)
        ctx.save_for_backward(x, logp, *[q if q is not None else x.new_empty(0) for q in (perm, sign, *params)],
                              *stages)
        return x_out, logp_out

    @staticmethod
    def backward(ctx: Any, gx: Tensor | None, glogp: Tensor | None) -> tuple[Tensor | None, ...]:
        x, logp, *saved = ctx.saved_tensors
        stages = saved[len(saved) - ctx.n_stages:]
        perm, sign, *params = [None if gone else q for q, gone in zip(saved, ctx.absent)]
        gx = torch.zeros_like(x) if gx is None else gx.contiguous()
        glogp = torch.zeros_like(logp) if glogp is None else glogp.contiguous()
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: the same integration in recorded ops
            ins = [q.view_as(q) if q is not None else None for q in (x, logp, *params)]
            inputs = [(i, q) for i, q in enumerate(ins) if q is not None and needs[i if i < 2 else i + 2]]
            out = _reference_integration(ins[0], ins[1], perm, sign, *ins[2:], ctx.activation, ctx.t0, ctx.dt, ctx.n)
            got = torch.autograd.grad(out, [q for _, q in inputs], (gx, glogp), create_graph=True, allow_unused=True)
            grads: list[Tensor | None] = [None] * 11
            for (i, q), g in zip(inputs, got):
                grads[i if i < 2 else i + 2] = torch.zeros_like(q) if g is None else g
            return (*grads, None, None, None, None, None)
        gx_in, *pgrads = native_step.integrate_backward(ctx.path, list(stages), perm, sign, gx, glogp, *params,
                                                        ctx.activation, ctx.t0, ctx.dt, ctx.n)
        grads = [gx_in if needs[0] else None, glogp if needs[1] else None, None, None]
        grads += [g if needs[4 + i] else None for i, g in enumerate(pgrads)]
        return (*grads, None, None, None, None, None)


def _reference_integration(x: Tensor, logp: Tensor, perm: Tensor | None, sign: Tensor | None, W: Tensor,
                           b0: Tensor | None, b1: Tensor | None, w0: Tensor, w1: Tensor | None, A0: Tensor | None,
                           A1: Tensor | None, activation: str, t0: float, dt: float,
                           n: int) -> tuple[Tensor, Tensor]:
    """What :class:`_MLPRK4Integration` computes, in autograd ops: per step, into the frame, one
    :func:`_reference_rk4` step, out of it (the double backward's graph)."""
    for k in range(n):
        s = sign[k][:, None] if sign is not None else 1.0
        y = torch.gather(x, 1, perm[k]) * s if perm is not None else x * s
        y, logp = _reference_rk4(y, logp, W, b0, b1, w0, w1, A0, A1, activation, t0 + k * dt, dt)
        x = torch.zeros_like(y).scatter(1, perm[k], y * s) if perm is not None else y * s
    return x, logp


# ---------------------------------------------------------------------- the potential
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

    def rk4_step(self, noise: Noise, others: Sequence[Potential] = ()) -> Callable | None:
        """The compiled RK4 step of this potential's drift (plus the quadratic parts ``others``) for
        the integrator (:mod:`latticeflow.native.step`), or None where it does not apply: the unfused
        path, a quadratic part it cannot take, or ``LATTICEFLOW_STEP_KERNEL=eager``. The step
        returned answers None for a state the kernel does not take (device, dtype, size), and the
        integrator then steps eagerly."""
        from .quadratic import QuadraticPotential

        if not self.fused or noise is not None or self.activation not in native_step.ACTIVATIONS:
            return None
        if native_step.kernel_mode() == "eager":
            return None
        quads = list(others)
        if len(quads) > 1 or not all(isinstance(q, QuadraticPotential) and q.dense_parts() is not None
                                     for q in quads):
            return None
        quad = quads[0] if quads else None

        def parameters() -> list[Tensor | None]:
            A0, A1 = quad.dense_parts() if quad is not None else (None, None)
            return [self.weight, self.bias, self.bias_t, self.readout, self.readout_t, A0, A1]

        def step(t: float, y: Tensor, logp: Tensor, dt: float) -> tuple[Tensor, Tensor] | None:
            params = parameters()
            path = native_step.available(y, self.hidden, self.activation, params)
            if path is None:
                return None
            return _MLPRK4Step.apply(y, logp, *params, self.activation, float(t), float(dt), path)

        def integrate(x: Tensor, logp: Tensor, perm: Tensor | None, sign: Tensor | None, t0: float, dt: float,
                      n: int) -> tuple[Tensor, Tensor] | None:
            """n steps at once (latticeflow.flow), or None where no compiled step takes this state."""
            params = parameters()
            path = native_step.available(x, self.hidden, self.activation, params, steps=n)
            if path is None:
                return None
            return _MLPRK4Integration.apply(x, logp, perm, sign, *params, self.activation, float(t0), float(dt),
                                            int(n), path)

        step.integrate = integrate  # type: ignore[attr-defined]
        step.owner = (self, quad)  # type: ignore[attr-defined]  # steps of one integration share it
        return step

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

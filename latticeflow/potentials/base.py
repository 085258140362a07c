"""The potential interface: φ(x, t) with its gradient and Laplacian, and sums of potentials.

"Monge-Ampère Flow for Generative Modeling" (Zhang, E, Wang, arXiv:1809.10188) moves samples
along dx/dt = ∇φ (eq. 2) while their log density changes as d ln p/dt = −∇²φ (eq. 3). A
:class:`Potential` therefore returns the triple (φ (B,), ∇φ (B, N), ∇²φ (B,)); a
:class:`SumPotential` φ = Σ_j φ_j adds the three term by term (the Laplacian is linear).

Stochastic potentials are stateless: their randomness is an explicit ``noise`` token drawn by
:meth:`Potential.resample` and passed to :meth:`Potential.forward`. Parameter-only constants
are computed once per integration inside :meth:`Potential.shared_constants`.

Also here: the small helpers the families share (time as a scalar or a column, readout
weights w(t) = w + t·u and their initialisation).

Symbols: B batch, N = dim sites, K readout size, t time.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_batch

__all__ = ["Evaluation", "Frame", "Noise", "Potential", "SumPotential"]

Noise = Any  # opaque per-step randomness: None, an index tensor, probes, or a tuple of these
Evaluation = tuple[Tensor | None, Tensor, Tensor]  # (phi or None, grad, laplacian)
# (into, out_of, inner potential, inner noise): see Potential.step_frame
Frame = tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], "Potential", Any]


# ---------------------------------------------------------------------- helpers
def _time_col(t: Tensor | float) -> Tensor | float:
    """t as a scalar or, for per-sample times of shape (B,), a column (B, 1) for broadcasting."""
    if isinstance(t, Tensor) and t.dim() == 1:
        return t[:, None]
    return t


def _is_scalar_time(t: Tensor | float) -> bool:
    """True for a number or a 0-d tensor, False for per-sample times (B,)."""
    return not (isinstance(t, Tensor) and t.dim() > 0)


def _check_time(t: object, batch: int) -> None:
    """t must be a finite number, a 0-d tensor or a tensor of shape (batch,)."""
    if isinstance(t, Tensor):
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != batch):
            raise ValueError(f"t must be a number, a 0-d tensor or shape ({batch},), got shape={tuple(t.shape)}")
    elif isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise TypeError(f"t must be a finite number or a tensor, got t={t!r}")


def _at_time(p: Tensor, p_t: Tensor | None, t: Tensor | float) -> Tensor:
    """θ(t) = θ + t·θ': the shape of θ for a scalar t, (B, ...) for t of shape (B,)."""
    if p_t is None:
        return p
    if _is_scalar_time(t):
        return p + t * p_t
    return p + t.reshape((-1,) + (1,) * p.dim()) * p_t  # (B, ...)


def _readout(w0: Tensor, w1: Tensor | None, t: Tensor | float) -> Tensor:
    """Readout weights w(t) = w0 + t·w1: (K,) for a scalar t, (B, K) for t of shape (B,)."""
    if w1 is None:
        return w0
    return w0 + _time_col(t) * w1


def _initial_readout(n: int, init_scale: float | str) -> Tensor:
    """Initial readout weights, shape (n,): init_scale·N(0, 1), or U(±1/√n) (nn.Linear's) for ``"linear"``."""
    if init_scale == "linear":
        return torch.empty(n).uniform_(-1.0 / math.sqrt(n), 1.0 / math.sqrt(n))
    if isinstance(init_scale, str) or not (math.isfinite(init_scale) and init_scale >= 0):
        raise ValueError(f"init_scale must be a finite number >= 0 or 'linear', got init_scale={init_scale!r}")
    return init_scale * torch.randn(n)


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

    def rk4_step(self, noise: Noise, others: Sequence["Potential"] = ()) -> Callable[..., Any] | None:
        """A fused RK4 step of the drift of this potential plus ``others`` (deterministic parts
        evaluated in the same frame), ``step(t, x, logp, dt) -> (x, logp)``, or None from the step
        for a state it does not take; the integrator uses it instead of four drift evaluations
        (:mod:`latticeflow.native.step`). None (the default) when there is none for this
        combination."""
        return None

    def frame_group(self) -> Any:
        """The symmetry group whose random element :meth:`step_frame` applies for a whole step, or
        None (the default: no such frame)."""
        return None

    def invariant_under(self, group: Any) -> bool:
        """True only if φ(g·x) = φ(x) for every element g of ``group`` and every value of the
        parameters (structurally, not by chance); False (the default) when not known. A sum steps
        in the frame of its symmetrised part only if every other part is invariant under its group."""
        return False

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
        """(phi or None if not ``value``, grad, laplacian); x (B, N) already checked."""
        raise NotImplementedError

    def __add__(self, other: "Potential") -> "SumPotential":
        if not isinstance(other, Potential):
            return NotImplemented
        return SumPotential(self, other)


def _check_potential(p: object, name: str = "potential") -> Potential:
    """p if it is a Potential; a TypeError naming ``name`` and pointing to AutogradPotential otherwise."""
    if not isinstance(p, Potential):
        raise TypeError(f"{name} must be a Potential, got {type(p).__name__}; wrap a plain nn.Module "
                        "in AutogradPotential(module, dim=N)")
    return p


# ---------------------------------------------------------------------- sums
class SumPotential(Potential):
    """φ = Σ_j φ_j: values, gradients and Laplacians add. Also written ``p + q``.

    Args:
        potentials: two or more potentials with the same ``dim`` (nested sums are flattened).

    Noise: a tuple with one token per part (None for deterministic parts), or None if no
    part is stochastic.

    Steps in a frame (:meth:`step_frame`) when exactly one part has one (a randomly symmetrised
    potential) and every other part is deterministic and invariant under that part's group
    (:meth:`Potential.invariant_under`, e.g. the D4-symmetric quadratic part under the space
    group × Z2): then φ(x) = ψ(g·x) + Σ_others φ_j(g·x) for the whole step, and the state is
    permuted twice per step instead of twice per RK stage.
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
        self._frame_index: int | None = None
        framed = [i for i, p in enumerate(parts) if p.frame_group() is not None]
        if len(framed) == 1:
            k = framed[0]
            group = parts[k].frame_group()
            if all(not p.stochastic and p.invariant_under(group) for i, p in enumerate(parts) if i != k):
                self._frame_index = k

    def step_frame(self, noise: Noise) -> Frame | None:
        """The frame of the symmetrised part, with the invariant parts evaluated in it (class docstring)."""
        k = self._frame_index
        if k is None or noise is None:
            return None
        frame = self.parts[k].step_frame(noise[k])
        if frame is None:
            return None
        into, out_of, inner, inner_noise = frame
        return into, out_of, _FramedSum([p for i, p in enumerate(self.parts) if i != k], inner), inner_noise

    def rk4_step(self, noise: Noise, others: Sequence[Potential] = ()) -> Callable[..., Any] | None:
        """Outside a frame: the fused RK4 step of the one part that offers one, with the other parts
        folded into it where it can take them (deterministic parts, no noise); else None."""
        if noise is not None or others:
            return None
        fusers = [p for p in self.parts if type(p).rk4_step is not Potential.rk4_step]
        if len(fusers) != 1:
            return None
        return fusers[0].rk4_step(None, [p for p in self.parts if p is not fusers[0]])

    @property
    def stochastic(self) -> bool:
        return any(p.stochastic for p in self.parts)

    def resample(self, batch: int, generator: torch.Generator | None = None) -> tuple | None:
        """One token per part (None for deterministic parts), or None if no part is stochastic."""
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


class _FramedSum:
    """The drift of a :class:`SumPotential` inside its frame: the invariant parts (deterministic)
    plus the framed part's inner potential, which alone takes the step's noise token."""

    def __init__(self, others: list[Potential], inner: Potential) -> None:
        self.others, self.inner = others, inner

    def rk4_step(self, noise: Noise) -> Callable[..., Any] | None:
        """The inner potential's fused RK4 step with the invariant parts folded in, where it has one."""
        return self.inner.rk4_step(noise, self.others)

    def grad_and_laplacian(self, x: Tensor, t: Tensor | float = 0.0, noise: Noise = None) -> tuple[Tensor, Tensor]:
        grad, lap = self.inner.grad_and_laplacian(x, t, noise)
        for p in self.others:
            g, l_ = p.grad_and_laplacian(x, t, None)
            grad, lap = grad + g, lap + l_
        return grad, lap

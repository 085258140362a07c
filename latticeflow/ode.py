"""Fixed-step integrators for the Monge-Ampère flow state (x, log p).

The flow of "Monge-Ampère Flow for Generative Modeling" (Zhang, E, Wang, arXiv:1809.10188)
moves samples and their log densities together,

    dx/dt = ∇φ(x, t),            (eq. 2)
    d ln p/dt = −∇²φ(x, t),      (eq. 3)

so the state is the pair (x, logp) with shapes (B, N) and (B,), and a drift is a function
``f(t, x) -> (v, dlogp)`` returning (∇φ, −∇²φ). Because d ln p/dt does not depend on ln p,
every stage of a step evaluates ``f`` once and the two components are advanced in lock step.

Following torchdiffeq, a solver is a tiny class with an ``order`` and one ``step`` function;
:func:`integrate` is the single fixed-grid loop they share. A negative ``dt`` integrates
backward in time (the flow's inverse map and ``log_prob``).

Symbols: B batch size, N dimension, t time, dt step (either sign).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Protocol

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

__all__ = [
    "Drift",
    "FramedDrift",
    "Solver",
    "Euler",
    "Midpoint",
    "RK4",
    "SOLVERS",
    "euler_step",
    "midpoint_step",
    "rk4_step",
    "get_solver",
    "integrate",
]


class Drift(Protocol):
    """``f(t, x) -> (v, dlogp)``: velocity (B, N) and log-density rate (B,) at time t."""

    def __call__(self, t: float, x: Tensor) -> tuple[Tensor, Tensor]: ...


class FramedDrift(NamedTuple):
    """A drift written in rotated coordinates y = Q x for one step, Q fixed and orthogonal.

    If dx/dt = Qᵀ v(Q x) then dy/dt = v(y), and Runge-Kutta methods commute with fixed linear
    maps, so a step can be taken on y = into(x) with ``drift`` and mapped back with
    ``out_of`` (= Qᵀ): the same result up to rounding, with the change of variables done
    once per step instead of twice per stage. log p is unchanged by an orthogonal map
    (|det Q| = 1). The flow uses it for the random symmetry element of a step.

    Attributes:
        drift: the drift in the rotated coordinates.
        into: x (B, N) -> Q x.
        out_of: y (B, N) -> Qᵀ y.
    """

    drift: Drift
    into: Callable[[Tensor], Tensor]
    out_of: Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------- single steps
def euler_step(f: Drift, t: float, x: Tensor, logp: Tensor, dt: float) -> tuple[Tensor, Tensor]:
    """One explicit Euler step (order 1).

    Args:
        f: drift, ``f(t, x) -> (v (B, N), dlogp (B,))``.
        t: time at the start of the step.
        x: positions, shape (B, N).
        logp: log densities, shape (B,).
        dt: step, either sign.

    Returns:
        (x, logp) at time t + dt, shapes (B, N) and (B,).
    """
    v, dl = f(t, x)
    return torch.add(x, v, alpha=dt), torch.add(logp, dl, alpha=dt)


def midpoint_step(f: Drift, t: float, x: Tensor, logp: Tensor, dt: float) -> tuple[Tensor, Tensor]:
    """One explicit midpoint step (order 2); arguments as :func:`euler_step`."""
    v1, _ = f(t, x)
    v2, dl2 = f(t + 0.5 * dt, torch.add(x, v1, alpha=0.5 * dt))
    return torch.add(x, v2, alpha=dt), torch.add(logp, dl2, alpha=dt)


def rk4_step(f: Drift, t: float, x: Tensor, logp: Tensor, dt: float) -> tuple[Tensor, Tensor]:
    """One classical fourth-order Runge-Kutta step, the paper's integrator (section 3).

    x ← x + dt/6 (k1 + 2k2 + 2k3 + k4) and the same weights for log p, with the log-density
    rates taken at the same four stage points as the velocities.

    Args:
        f: drift, ``f(t, x) -> (v (B, N), dlogp (B,))``.
        t: time at the start of the step.
        x: positions, shape (B, N).
        logp: log densities, shape (B,).
        dt: step, either sign.

    Returns:
        (x, logp) at time t + dt, shapes (B, N) and (B,).
    """
    half = 0.5 * dt
    v1, l1 = f(t, x)
    v2, l2 = f(t + half, torch.add(x, v1, alpha=half))
    v3, l3 = f(t + half, torch.add(x, v2, alpha=half))
    v4, l4 = f(t + dt, torch.add(x, v3, alpha=dt))
    # (k1 + k4) + 2 (k2 + k3): four adds per component instead of six
    v = torch.add(v1 + v4, v2 + v3, alpha=2.0)
    dl = torch.add(l1 + l4, l2 + l3, alpha=2.0)
    sixth = dt / 6.0
    return torch.add(x, v, alpha=sixth), torch.add(logp, dl, alpha=sixth)


# ---------------------------------------------------------------------- solver classes
class Solver:
    """A fixed-step one-step method: ``order`` and ``step(f, t, x, logp, dt)``."""

    name: str = ""
    order: int = 0

    def step(self, f: Drift, t: float, x: Tensor, logp: Tensor, dt: float) -> tuple[Tensor, Tensor]:
        """Advance (x (B, N), logp (B,)) from t to t + dt."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(order={self.order})"


class Euler(Solver):
    """Explicit Euler, order 1 (one drift evaluation per step)."""

    name, order = "euler", 1

    def step(self, f: Drift, t: float, x: Tensor, logp: Tensor, dt: float) -> tuple[Tensor, Tensor]:
        return euler_step(f, t, x, logp, dt)


class Midpoint(Solver):
    """Explicit midpoint rule, order 2 (two drift evaluations per step)."""

    name, order = "midpoint", 2

    def step(self, f: Drift, t: float, x: Tensor, logp: Tensor, dt: float) -> tuple[Tensor, Tensor]:
        return midpoint_step(f, t, x, logp, dt)


class RK4(Solver):
    """Classical Runge-Kutta, order 4 (four drift evaluations per step)."""

    name, order = "rk4", 4

    def step(self, f: Drift, t: float, x: Tensor, logp: Tensor, dt: float) -> tuple[Tensor, Tensor]:
        return rk4_step(f, t, x, logp, dt)


SOLVERS: dict[str, type[Solver]] = {"euler": Euler, "midpoint": Midpoint, "rk4": RK4}


def get_solver(method: str | Solver) -> Solver:
    """The solver named ``method`` (one of ``SOLVERS``), or ``method`` itself if it is a Solver.

    Raises:
        ValueError: an unknown name; the message lists the valid ones.
    """
    if isinstance(method, Solver):
        return method
    if not isinstance(method, str) or method not in SOLVERS:
        raise ValueError(f"method must be one of {', '.join(map(repr, SOLVERS))}; got method={method!r}")
    return SOLVERS[method]()


# ---------------------------------------------------------------------- argument checks
def _check_n_steps(n_steps: object) -> int:
    if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got n_steps={n_steps!r}")
    return int(n_steps)


def _check_dt(dt: object) -> float:
    if isinstance(dt, Tensor) and dt.numel() == 1:
        dt = dt.item()
    if isinstance(dt, bool) or not isinstance(dt, numbers.Real) or not math.isfinite(dt) or dt == 0:
        raise ValueError(f"dt must be a finite nonzero number (negative integrates backward), got dt={dt!r}")
    return float(dt)


def _check_state(x: object, logp: object) -> None:
    if not isinstance(x, Tensor) or not isinstance(logp, Tensor):
        raise TypeError(f"x and logp must be tensors, got {type(x).__name__} and {type(logp).__name__}")
    if x.dim() != 2 or logp.shape != x.shape[:1]:
        raise ValueError(f"x must have shape (B, N) and logp shape (B,), got {tuple(x.shape)} and {tuple(logp.shape)}")


def _solver_step(f: Drift, t: float, x: Tensor, logp: Tensor, dt: float, solver: Solver) -> tuple[Tensor, Tensor]:
    """``solver.step``, or the drift's fused RK4 step (an ``rk4_step(t, x, logp, dt)`` attribute, e.g.
    the compiled small-lattice step of latticeflow.native.step) when the solver is RK4 and that step
    takes this state (it answers None when not)."""
    fused = getattr(f, "rk4_step", None) if type(solver) is RK4 else None
    out = fused(t, x, logp, dt) if fused is not None else None
    return solver.step(f, t, x, logp, dt) if out is None else out


def _plain_step(f: Drift, t: float, x: Tensor, logp: Tensor, dt: float, solver: Solver) -> tuple[Tensor, Tensor]:
    return _solver_step(f, t, x, logp, dt, solver)


def _framed_step(fd: FramedDrift, t: float, x: Tensor, logp: Tensor, dt: float,
                 solver: Solver) -> tuple[Tensor, Tensor]:
    y, logp = _solver_step(fd.drift, t, fd.into(x), logp, dt, solver)
    return fd.out_of(y), logp


# ---------------------------------------------------------------------- the loop
def integrate(
    f: Drift | None,
    x: Tensor,
    logp: Tensor,
    t0: float,
    dt: float,
    n_steps: int,
    method: str | Solver = "rk4",
    checkpoint: bool = False,
    callback: Callable[[int, float, Tensor, Tensor], None] | None = None,
    step_drift: Callable[[int, float], Drift | FramedDrift] | None = None,
) -> tuple[Tensor, Tensor]:
    """Integrate (x, logp) over ``n_steps`` fixed steps of size ``dt`` starting at ``t0``.

    Args:
        f: drift ``f(t, x) -> (∇φ (B, N), −∇²φ (B,))`` (eqs. 2-3); may be None when
            ``step_drift`` is given.
        x: initial positions, shape (B, N).
        logp: initial log densities, shape (B,).
        t0: initial time.
        dt: step size; negative integrates backward in time.
        n_steps: number of steps, a positive integer; the final time is t0 + n_steps·dt.
        method: ``"euler"``, ``"midpoint"`` or ``"rk4"`` (or a :class:`Solver`).
        checkpoint: recompute each step in the backward pass instead of storing its
            intermediates (torch.utils.checkpoint, use_reentrant=False): memory O(n_steps·B·N)
            instead of O(n_steps·stages·B·h), for about one extra forward pass of compute.
        callback: called as ``callback(k, t, x, logp)`` after step k (0-based) with the new
            time and state, e.g. to record a trajectory.
        step_drift: optional factory ``step_drift(k, t) -> drift`` called once at the start of
            step k (before its first stage); the drift it returns (or a :class:`FramedDrift`)
            serves every stage of that step and its checkpoint recomputation. The flow uses it
            to apply one random symmetry element per sample per step (paper section 4.2), so
            each step integrates one smooth potential.

    Returns:
        (x, logp) at time t0 + n_steps·dt, shapes (B, N) and (B,).

    Raises:
        ValueError: non-positive or non-integer ``n_steps``, zero or non-finite ``dt``,
            unknown ``method``, mismatched shapes.
        TypeError: x or logp is not a tensor.
    """
    solver = get_solver(method)
    n_steps = _check_n_steps(n_steps)
    dt = _check_dt(dt)
    _check_state(x, logp)
    if f is None and step_drift is None:
        raise ValueError("integrate needs a drift f or a step_drift factory, got neither")
    t0 = float(t0)
    use_ckpt = checkpoint and torch.is_grad_enabled()
    for k in range(n_steps):
        t = t0 + k * dt  # multiply, not accumulate: no drift of the time grid
        drift = step_drift(k, t) if step_drift is not None else f
        step = _framed_step if isinstance(drift, FramedDrift) else _plain_step
        if use_ckpt:
            x, logp = _checkpoint(step, drift, t, x, logp, dt, solver, use_reentrant=False)
        else:
            x, logp = step(drift, t, x, logp, dt, solver)
        if callback is not None:
            callback(k, t0 + (k + 1) * dt, x, logp)
    return x, logp

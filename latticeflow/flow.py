"""The Monge-Ampère flow: a Gaussian pushed along the gradient of a learned potential.

"Monge-Ampère Flow for Generative Modeling" (Zhang, E, Wang, arXiv:1809.10188) models a
density p(x, T) by transporting the base p(x, 0) = N(0, I) with

    dx/dt = ∇φ(x, t),             (eq. 2)
    d ln p(x(t), t)/dt = −∇²φ,    (eq. 3)

integrated with RK4 over n_steps fixed steps of size ε, T = n_steps·ε. Sampling integrates
forward from Gaussian noise; the density of any x integrates backward from T to 0:

    ln p(x, T) = ln N(z) − ∫₀ᵀ ∇²φ(x(t), t) dt,   z = x(0).

Both maps return (output, delta_logp) with delta_logp = ln p(output) − ln p(input) along the
path, like zuko's (y, ladj) with the opposite sign.

Stochastic potentials (random symmetrisation, section 4.2; Hutchinson Laplacians) draw one
noise token per step through ``potential.resample``. Tokens are always drawn for all steps
up front and in forward-time order (token k belongs to the interval [kε, (k+1)ε]), whichever
direction is integrated; an inverse integration uses them in reverse. So a run is replayed
exactly either by passing ``noise=flow.last_noise`` (the tokens of the latest integration)
or by giving the inverse map a generator seeded like the forward one.

Every flow-like object (this flow, :class:`~latticeflow.mixture.SymmetricMixture`) implements
the small :class:`Flow` interface, which is all that training and the analysis use.

Symbols: B batch, N dimension, ε step size, T total time.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from . import ode
from ._checks import check_points, check_positive, check_size
from .potentials import Potential, _check_potential

__all__ = ["Flow", "MongeAmpereFlow", "finer_steps", "frozen_parameters", "standard_normal_log_prob"]

_LOG_2PI = math.log(2.0 * math.pi)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """ln N(z; 0, I) for z of shape (B, N); returns shape (B,)."""
    return -0.5 * (z.square().sum(1) + z.shape[1] * _LOG_2PI)


def derived_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """A fresh generator seeded by a hash of one 62-bit draw of ``generator`` (None stays None: the global RNG).

    For a second kind of random draw (noise tokens, per-sample couplings) next to the latent z:
    reproducible from ``generator``'s state, without sharing its stream."""
    if generator is None:
        return None
    raw = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    # hashed, so that the child's seed is not a plain output of the parent's stream
    seed = int.from_bytes(hashlib.blake2b(raw.to_bytes(8, "little"), digest_size=8).digest(), "little") >> 2
    return torch.Generator(device=generator.device).manual_seed(seed)


@contextlib.contextmanager
def frozen_parameters(module: nn.Module):
    """Within the block, ``module``'s parameters do not require grad (restored on exit).

    A graph built inside then depends on the input only: no parameter-gradient paths are
    recorded (nor computed by hand-written backwards), which is what a path-gradient score needs.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def finer_steps(module: nn.Module, factor: int = 2):
    """Within the block, every :class:`MongeAmpereFlow` in ``module`` takes ``factor`` times as many
    RK4 steps of 1/``factor`` the size (the same T); restored on exit.

    The check that a result is converged in the step: the integrated ln p is exact for the
    continuous flow only as ε → 0, and a flow trained at one ε can lean on its error.

    Raises:
        ValueError: factor not an integer >= 1, or no MongeAmpereFlow in ``module``.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got factor={factor!r}")
    flows = [m for m in module.modules() if isinstance(m, MongeAmpereFlow)]
    if not flows:
        raise ValueError(f"no MongeAmpereFlow in {type(module).__name__} to integrate with finer steps")
    saved = [(f.n_steps, f.step_size) for f in flows]
    for f, (n, eps) in zip(flows, saved):
        f.n_steps, f.step_size = n * factor, eps / factor
    try:
        yield
    finally:
        for f, (n, eps) in zip(flows, saved):
            f.n_steps, f.step_size = n, eps


#: integrate all steps of a flow in one compiled call where the drift offers it (``step.integrate``: the
#: compiled steps of latticeflow.native.step); False steps one by one (the tests compare the two)
WHOLE_INTEGRATION = True


@runtime_checkable
class Flow(Protocol):
    """The interface of every flow-like object: a normalised density that samples itself.

    Implemented by :class:`MongeAmpereFlow` and :class:`~latticeflow.mixture.SymmetricMixture`;
    variational training (:class:`~latticeflow.train.VariationalTrainer`) uses ``sample``, and
    the analysis (:mod:`analysis.latent`) uses the rest. ``isinstance(obj, Flow)`` checks
    that the members exist, not their signatures.

    Noise: a stochastic flow (random symmetrisation, Hutchinson Laplacians) integrates with one
    noise token per step; ``draw_noise`` draws them (None for a deterministic flow), and passing
    them as ``noise=`` replays one fixed map.

    Attributes:
        dim: N, the dimension of x.
        n_steps: integration steps of the transport.
        dtype: floating dtype of samples and parameters.
        device: device of samples and parameters.
        stochastic: whether the map depends on per-step noise tokens.
    """

    dim: int
    n_steps: int

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def stochastic(self) -> bool: ...

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Samples x, shape (n, N), and their log densities ln p(x), shape (n,) (reparametrised)."""
        ...

    def log_prob(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """ln p(x) for x of shape (B, N); returns shape (B,)."""
        ...

    def forward_map(self, z: Tensor, generator: torch.Generator | None = None,
                    noise: Sequence[Any] | None = None) -> tuple[Tensor, Tensor]:
        """Latent z (B, N) ↦ (x (B, N), delta_logp (B,) = ln p(x) − ln p(z)), a bijection."""
        ...

    def inverse_map(self, x: Tensor, generator: torch.Generator | None = None,
                    noise: Sequence[Any] | None = None) -> tuple[Tensor, Tensor]:
        """x (B, N) ↦ (z (B, N), delta_logp (B,) = ln p(z) − ln p(x)), the inverse of ``forward_map``."""
        ...

    def draw_noise(self, batch: int, generator: torch.Generator | None = None,
                   noise: Sequence[Any] | None = None) -> list[Any] | None:
        """Per-step noise tokens for ``batch`` rows (``noise`` checked and returned if given; None if deterministic)."""
        ...


class MongeAmpereFlow(nn.Module):
    """Continuous normalising flow driven by the gradient of a scalar potential.

    Args:
        potential: φ, a :class:`~latticeflow.potentials.Potential` (its ``dim`` is N).
        n_steps: integration steps, a positive integer (50 in the paper).
        step_size: ε > 0 (0.1 in the paper); T = n_steps·ε.
        method: ``"rk4"`` (default), ``"midpoint"`` or ``"euler"``.
        checkpoint: gradient checkpointing per step (less memory, about one extra forward).

    ``n_steps``, ``step_size``, ``method`` and ``checkpoint`` are attributes that may be
    changed at any time (e.g. a finer grid at inference); the setters validate them.

    dtype and device follow the potential's parameters (``flow.to(torch.float64)``). Implements
    :class:`Flow`.

    Example:
        >>> from latticeflow.potentials import MLPPotential
        >>> flow = MongeAmpereFlow(MLPPotential(16, 64), n_steps=10, step_size=0.1)
        >>> x, logp = flow.sample(8)
        >>> torch.allclose(flow.log_prob(x, noise=flow.last_noise), logp, atol=1e-4)
        True
    """

    def __init__(self, potential: Potential, n_steps: int = 50, step_size: float = 0.1, method: str = "rk4",
                 checkpoint: bool = False) -> None:
        super().__init__()
        self.potential = _check_potential(potential)
        self.dim = int(potential.dim)
        self.n_steps = n_steps
        self.step_size = step_size
        self.method = method
        self.checkpoint = bool(checkpoint)
        self.last_noise: list[Any] | None = None
        #: the per-step noise tokens of the latest :meth:`sample` (None for a deterministic potential)
        self.sample_noise: list[Any] | None = None

    # ------------------------------------------------------------------ settings
    @property
    def n_steps(self) -> int:
        """Number of integration steps."""
        return self._n_steps

    @n_steps.setter
    def n_steps(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"n_steps must be a positive integer, got n_steps={value!r}")
        self._n_steps = int(value)

    @property
    def step_size(self) -> float:
        """ε, the positive step size."""
        return self._step_size

    @step_size.setter
    def step_size(self, value: float) -> None:
        self._step_size = check_positive("step_size", value)

    @property
    def method(self) -> str:
        """Integrator name (see latticeflow.ode.SOLVERS)."""
        return self._solver.name

    @method.setter
    def method(self, value: str) -> None:
        self._solver = ode.get_solver(value)

    @property
    def total_time(self) -> float:
        """T = n_steps·ε."""
        return self.n_steps * self.step_size

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the parameters (the default dtype if there are none)."""
        for t in self.potential.parameters():
            if t.is_floating_point():
                return t.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        """Device of the parameters (cpu if there are none)."""
        for t in self.potential.parameters():
            return t.device
        return torch.device("cpu")

    @property
    def stochastic(self) -> bool:
        """Whether the potential draws per-step noise tokens (then pass ``noise=`` to replay a map)."""
        return bool(self.potential.stochastic)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_steps={self.n_steps}, step_size={self.step_size}, method={self.method!r}, "
                f"checkpoint={self.checkpoint}")

    # ------------------------------------------------------------------ noise
    def draw_noise(self, batch: int, generator: torch.Generator | None = None,
                   noise: Sequence[Any] | None = None) -> list[Any] | None:
        """Per-step noise tokens in forward-time order, or None for a deterministic potential.

        Passing the tokens as ``noise=`` to :meth:`forward_map`, :meth:`inverse_map`,
        :meth:`sample` or :meth:`log_prob` makes them use one fixed map (e.g. one fixed random
        symmetry element per step and row, as latent HMC needs).

        Args:
            batch: number of rows the tokens are for (a token holds one draw per row).
            generator: drives the draw.
            noise: tokens to use instead: checked (one per step) and returned as a list.

        Returns:
            a list of ``n_steps`` tokens, or None when the potential is deterministic.

        Raises:
            ValueError: ``noise`` does not hold one token per step.
        """
        if noise is not None:
            noise = list(noise)
            if len(noise) != self.n_steps:
                raise ValueError(f"noise must hold one token per step ({self.n_steps}), got {len(noise)}")
            return noise
        if not self.potential.stochastic:
            return None
        # the tokens come from a generator of their own, seeded from ``generator``
        generator = derived_generator(generator)
        return [self.potential.resample(batch, generator) for _ in range(self.n_steps)]

    # ------------------------------------------------------------------ integration
    def _integrate(self, x: Tensor, logp: Tensor, forward: bool, noise: list[Any] | None,
                   callback: Callable[[int, float, Tensor, Tensor], None] | None) -> tuple[Tensor, Tensor]:
        pot = self.potential
        eps = self.step_size
        n = self.n_steps
        t0, dt = (0.0, eps) if forward else (n * eps, -eps)

        def drift_of(p: Potential, token: Any) -> ode.Drift:
            def drift(t: float, y: Tensor) -> tuple[Tensor, Tensor]:
                g, lap = p.grad_and_laplacian(y, t, token)
                return g, -lap  # eqs. 2-3: (∇φ, −∇²φ)

            drift.rk4_step = p.rk4_step(token)  # type: ignore[attr-defined]  # the fused step, if any (ode.py)
            return drift

        def step_drift(k: int, t: float) -> ode.Drift | ode.FramedDrift:
            token = noise[k] if forward else noise[n - 1 - k]
            frame = pot.step_frame(token)
            if frame is None:
                return drift_of(pot, token)
            into, out_of, inner, inner_token = frame
            return ode.FramedDrift(drift_of(inner, inner_token), into, out_of)

        self.last_noise = noise
        # ‖W‖²-type constants once per integration; a checkpoint recomputation runs outside
        # this block and would rebuild them, so not with checkpointing
        share = not (self.checkpoint and torch.is_grad_enabled())
        with pot.shared_constants(share):
            whole = self._whole_integration(x, logp, t0, dt, forward, noise, callback) if share else None
            if whole is not None:
                return whole
            if noise is None:
                return ode.integrate(drift_of(pot, None), x, logp, t0, dt, n, method=self._solver,
                                     checkpoint=self.checkpoint, callback=callback)
            return ode.integrate(None, x, logp, t0, dt, n, method=self._solver, checkpoint=self.checkpoint,
                                 callback=callback, step_drift=step_drift)

    def _whole_integration(self, x: Tensor, logp: Tensor, t0: float, dt: float, forward: bool,
                           noise: list[Any] | None, callback: Any) -> tuple[Tensor, Tensor] | None:
        """All n RK4 steps in one compiled call (``step.integrate`` of the drift's fused step, the lanes or
        GEMM step of latticeflow.native.step), each in its step's symmetry frame; None where that does not
        apply: another solver, a callback, a potential without such a step, a frame it cannot pass (anything
        but a signed permutation per sample, as int64 tables on x's device), or a state the step does not
        take. Same numbers as step by step."""
        if not WHOLE_INTEGRATION or callback is not None or type(self._solver) is not ode.RK4:
            return None
        pot, n = self.potential, self.n_steps
        perms, signs, owner, first = [], [], None, None
        for k in range(n):
            token = None if noise is None else (noise[k] if forward else noise[n - 1 - k])
            frame = pot.step_frame(token) if noise is not None else None
            if frame is None:
                if noise is not None:
                    return None
                step = pot.rk4_step(None)
            else:
                into, _, inner, inner_token = frame
                signed = getattr(into, "signed", None)
                if signed is None:
                    return None
                perms.append(signed[0])
                signs.append(signed[1])
                step = inner.rk4_step(inner_token)
            if step is None or getattr(step, "integrate", None) is None:
                return None
            if first is None:
                first, owner = step, step.owner
            elif step.owner[0] is not owner[0] or step.owner[1] is not owner[1]:
                return None
            if noise is None:
                break  # one potential for every step
        if first is None:
            return None
        perm = sign = None
        if perms:
            if any(p.shape != x.shape or p.dtype != torch.int64 or p.device != x.device for p in perms) or any(
                    (s is None) != (signs[0] is None) for s in signs):
                return None
            perm = torch.stack(perms).contiguous()
            if signs[0] is not None:
                sign = torch.stack([s.reshape(-1).to(x.dtype) for s in signs]).contiguous()
        return first.integrate(x, logp, perm, sign, t0, dt, n)

    def forward_map(self, z: Tensor, generator: torch.Generator | None = None, noise: Sequence[Any] | None = None,
                    callback: Callable[[int, float, Tensor, Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
        """Transport latent points from t = 0 to T.

        Args:
            z: latent points, shape (B, N).
            generator: drives the per-step noise of a stochastic potential.
            noise: per-step tokens to replay (length n_steps, forward-time order).
            callback: ``callback(k, t, x, delta_logp)`` after every step.

        Returns:
            x: shape (B, N); delta_logp: ln p(x, T) − ln p(z, 0) = −∫∇²φ dt, shape (B,).
        """
        z = check_points(z, self.dim, self.dtype, "z")
        noise = self.draw_noise(z.shape[0], generator, noise)
        return self._integrate(z, z.new_zeros(z.shape[0]), True, noise, callback)

    def inverse_map(self, x: Tensor, generator: torch.Generator | None = None, noise: Sequence[Any] | None = None,
                    callback: Callable[[int, float, Tensor, Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
        """Transport points from t = T back to 0 (negative steps).

        Args:
            x: points, shape (B, N).
            generator: drives the per-step noise; seeded like the forward map's, it replays it.
            noise: per-step tokens in forward-time order (e.g. ``flow.last_noise``).
            callback: ``callback(k, t, z, delta_logp)`` after every step.

        Returns:
            z: shape (B, N); delta_logp: ln p(z, 0) − ln p(x, T) = +∫∇²φ dt, shape (B,).
        """
        x = check_points(x, self.dim, self.dtype, "x")
        noise = self.draw_noise(x.shape[0], generator, noise)
        return self._integrate(x, x.new_zeros(x.shape[0]), False, noise, callback)

    def sample(self, n: int, generator: torch.Generator | None = None,
               noise: Sequence[Any] | None = None) -> tuple[Tensor, Tensor]:
        """Draw samples and their log densities (reparametrised: differentiable in the parameters).

        Args:
            n: number of samples.
            generator: drives z ~ N(0, I) and then the per-step noise.
            noise: per-step tokens to use instead of fresh ones.

        Returns:
            x: samples, shape (n, N); logp: ln p(x, T), shape (n,).
        """
        n = check_size("n", n)
        # the tokens first (from a generator of their own), then z
        noise = self.draw_noise(n, generator, noise)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.dtype, device=self.device)
        self.sample_noise = noise
        return self._integrate(z, standard_normal_log_prob(z), True, noise, None)

    def log_prob(self, x: Tensor, generator: torch.Generator | None = None,
                 noise: Sequence[Any] | None = None) -> Tensor:
        """ln p(x, T) by integrating backward to t = 0 (paper section 4.1).

        Args:
            x: points, shape (B, N).
            generator / noise: as in :meth:`inverse_map`.

        Returns:
            Log densities, shape (B,).
        """
        z, dlogp = self.inverse_map(x, generator=generator, noise=noise)
        return standard_normal_log_prob(z) - dlogp

    def score(self, x: Tensor, noise: Sequence[Any] | None = None) -> tuple[Tensor, Tensor]:
        """ln p(x) and its gradient ∇ₓ ln p(x) at fixed parameters, by the backward integration.

        The path-gradient estimator (``VariationalTrainer(gradient_estimator="path")``) needs the
        score of the model density at a sample with the parameters treated as constants; this is
        ``log_prob`` differentiated with respect to x alone (no graph to the parameters, none
        returned). Pass the sample's noise tokens (``flow.sample_noise``) so that a stochastic
        flow evaluates the density of the same map that drew x.

        Discretisation: the density is that of the RK4 integration backward from x, which is the
        inverse of the forward RK4 map, and the forward ln p, only up to O(ε⁴); so this score is
        that of the sampled density up to O(ε⁴) too (measured in tests/test_path_gradient.py).

        Args:
            x: points, shape (B, N).
            noise: per-step tokens in forward-time order (required for a stochastic flow).

        Returns:
            (ln p(x) (B,), ∇ₓ ln p(x) (B, N)), both detached.
        """
        x = check_points(x, self.dim, self.dtype, "x")
        if self.stochastic and noise is None:
            raise ValueError("a stochastic flow needs the sample's noise tokens (noise=flow.sample_noise) for its score")
        with torch.enable_grad(), frozen_parameters(self):
            xr = x.detach().requires_grad_(True)
            lp = self.log_prob(xr, noise=noise)
            (g,) = torch.autograd.grad(lp.sum(), xr)
        return lp.detach(), g

    def forward(self, x: Tensor) -> Tensor:
        """Alias for :meth:`log_prob` (so ``flow(x)`` is a log density)."""
        return self.log_prob(x)

    @torch.no_grad()
    def reversibility_error(self, n: int, generator: torch.Generator | None = None) -> tuple[float, float]:
        """How far the discrete integrator is from exactly invertible.

        Samples n points (replaying the same noise backward), then returns
        max |z − inverse(forward(z))| and max |logp_sample − log_prob(x)|.

        Args:
            n: number of samples.
            generator: drives the latent draw and the noise.

        Returns:
            (max latent error, max log-density error) as floats.
        """
        n = check_size("n", n)
        noise = self.draw_noise(n, generator)  # before z, as in sample
        z = torch.randn(n, self.dim, generator=generator, dtype=self.dtype, device=self.device)
        logp0 = standard_normal_log_prob(z)
        x, d_fwd = self._integrate(z, z.new_zeros(n), True, noise, None)
        z2, d_bwd = self._integrate(x, x.new_zeros(n), False, noise, None)
        logp_model = standard_normal_log_prob(z2) - d_bwd
        return float((z - z2).abs().max()), float((logp0 + d_fwd - logp_model).abs().max())


class WrappedFlow(nn.Module):
    """Base of flows built around another flow ``self.flow`` (a symmetric mixture, an affine map in
    front): the integration settings, dtype, device and noise are the inner flow's.

    Subclasses define ``sample`` and ``log_prob`` (and, where they have their own, the maps).

    Args:
        flow: the inner flow (a :class:`Flow`); its parameters are this module's ``flow.*``.
    """

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow

    @property
    def dim(self) -> int:
        """Dimension of the points, the inner flow's."""
        return self.flow.dim

    @property
    def potential(self) -> Any:
        """The inner flow's potential φ."""
        return self.flow.potential

    @property
    def n_steps(self) -> int:
        """Integration steps of the inner flow (settable, like the flow's)."""
        return self.flow.n_steps

    @n_steps.setter
    def n_steps(self, value: int) -> None:
        self.flow.n_steps = value

    @property
    def stochastic(self) -> bool:
        """Whether the inner flow draws per-step noise tokens."""
        return self.flow.stochastic

    @property
    def dtype(self) -> torch.dtype:
        """The inner flow's dtype."""
        return self.flow.dtype

    @property
    def device(self) -> torch.device:
        """The inner flow's device."""
        return self.flow.device

    def draw_noise(self, batch: int, generator: torch.Generator | None = None,
                   noise: Sequence[Any] | None = None) -> list[Any] | None:
        """The inner flow's per-step noise tokens (see :meth:`MongeAmpereFlow.draw_noise`)."""
        return self.flow.draw_noise(batch, generator, noise)

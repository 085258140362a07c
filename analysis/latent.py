r"""Monte Carlo with a trained flow: latent-space HMC, the neural independence sampler, and
flow estimates of free energies and observables.

A trained Monge-Ampère flow x = f(z) (``flow.forward_map``) is used in three exact ways
("Monge-Ampère Flow for Generative Modeling", Zhang, E & Wang, arXiv:1809.10188, section 4.2;
latent-space HMC after Li & Wang, "Neural Network Renormalization Group", PRL 121, 260601
(2018), arXiv:1802.02840):

* **Latent HMC.** HMC runs on z with the target pulled back through the flow,

      ln π(z) = −E(f(z)) + ln|det ∂f/∂z| = −E(f(z)) − Δ(z) + const,

  where Δ(z) = ln p(x, T) − ln p(z, 0) is the ``delta_logp`` that ``forward_map`` returns
  (density decreases where the map expands: p_x(x) = p_z(z)/|det ∂f/∂z|, so
  ln|det ∂f/∂z| = −Δ). The x = f(z) of the chain are then distributed as e^{−E(x)}/Z for
  any bijection f; a good flow makes π(z) nearly the standard normal, so the chain
  decorrelates fast. The gradient is autograd through the integrator. Stochastic flows
  (random symmetrisation) draw one noise token per chain and per step once, at the start
  (:func:`frozen_noise`), so each chain uses one fixed bijection for the whole run.

  "Exact" means exact up to the integrator: Δ is the RK4 integral of −∇²φ along the
  discrete path, which differs from −ln|det| of the discrete RK4 map by O(ε⁴) (measured
  against the autograd Jacobian: ~1e-10 for an untrained flow, ~2e-4 for a trained L=4
  flow with 10 steps of ε = 0.1, while Δ itself is ~8). The sampled density is then off by
  a factor e^{O(1e-4)}, far below the statistical errors; the importance weights below
  carry the same tiny error.

* **Neural independence sampler.** Flow samples are proposals of an independence
  Metropolis chain (:func:`analysis.hmc.independence_metropolis`) with weights
  w = e^{−E(x)}/q(x). For a random-symmetrised flow, q is the density of x given its noise
  tokens; the chain is then exact on the space (x, tokens) and marginally in x.

* **Flow estimates.** Many flow samples give the variational free energy (eq. 7, an upper
  bound of −ln Z), the importance-sampled −ln Z with a jackknife error, the Kish effective
  sample size, and observables plain (biased by the flow's error) and reweighted with
  ln w = −E − ln q (exact as B → ∞).

Observables come from the HS field x through the improved (Rao-Blackwellised) spin
estimators tanh x (:mod:`analysis.observables`); e = H/N is the physical Ising energy per
site, H = −J Σ_bonds s_i s_j, comparable with Kaufman's U/N.

Cost accounting, for a fair speed-up: each HMC result records the sampling wall time (for
latent HMC including the z ↦ x mapping), the number of log-density-and-gradient
evaluations per stored sample, and the integrated autocorrelation times τ. The cost of one
effectively independent sample is τ × (seconds per sample); :func:`speedup` compares two
samplers by it.

Symbols: C chains, n stored samples per chain, N sites, B flow samples.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from latticeflow import exact
from latticeflow._checks import check_fraction, check_positive, check_size
from latticeflow.flow import Flow
from latticeflow.ising import improved_spins, sample_spins
from latticeflow.target import Target

from .autocorr import integrated_time
from .diagnostics import Verdict, chain_verdict, importance_diagnostics, influence_verdict, split_rhat
from .free_energy import (
    Estimate,
    effective_sample_size,
    importance_free_energy,
    log_weights,
    variational_free_energy,
)
from .hmc import from_energy, hmc, independence_metropolis
from .observables import energy_moments, influences, magnetisation_moments, measure, moments_of, summarize

__all__ = [
    "ChainResult",
    "FlowEstimates",
    "PulledBackDensity",
    "exact_reference",
    "flow_estimates",
    "frozen_noise",
    "integration_error",
    "latent_hmc",
    "latent_log_prob",
    "neural_independence_sampler",
    "overdispersed_start",
    "physical_hmc",
    "quiet_integrated_time",
    "speedup",
]

MAX_ENUMERATION_SITES = 16  # exact |m|, m², m⁴ by enumeration up to 2^16 states (~0.05 s)
TRACE_NAMES = ("abs_m", "energy", "m")
MIN_CHAINS_FOR_CHAIN_JACKKNIFE = 8  # from 8 chains on, errors come from the spread between chains


# ---------------------------------------------------------------------- checks
def _check_flow_target(flow: object, target: object) -> None:
    if not isinstance(flow, Flow):
        raise TypeError(f"flow must implement latticeflow.flow.Flow (a MongeAmpereFlow or SymmetricMixture), "
                        f"got {type(flow).__name__}")
    if not isinstance(target, Target):
        raise TypeError(f"target must implement latticeflow.target.Target (energy(x) and N), such as the Ising HS "
                        f"target of latticeflow.ising, got {type(target).__name__}")
    if int(flow.dim) != int(target.N):
        raise ValueError(f"flow and target dimensions differ: flow.dim={flow.dim}, target.N={target.N}")


def _check_lattice_target(target: object) -> None:
    for attr in ("lattice", "beta", "J"):
        if getattr(target, attr, None) is None:
            raise ValueError(f"target must be an Ising model on a lattice with known beta and J (build it with "
                             f"latticeflow.ising(L, beta, J)); its {attr} is None")


def _check_hmc_settings(n_chains: object, n_samples: object, n_leapfrog: object, n_warmup: object,
                        target_accept: object, step_size: object) -> tuple[int, int, int, int, float, float]:
    """Validate HMC settings up front, before any flow work; returns them cleaned."""
    return (check_size("n_chains", n_chains, 1),
            check_size("n_samples", n_samples, 2),  # τ needs at least two time steps
            check_size("n_leapfrog", n_leapfrog, 1),
            check_size("n_warmup", n_warmup, 0),
            check_fraction("target_accept", target_accept),
            check_positive("step_size", step_size))


def _check_start(start: object, n_chains: int, N: int) -> Tensor:
    if not torch.is_tensor(start) or tuple(start.shape) != (n_chains, N):
        shape = tuple(start.shape) if torch.is_tensor(start) else type(start).__name__
        raise ValueError(f"start must be a tensor of shape (n_chains, N) = ({n_chains}, {N}), got {shape}")
    return start.detach()


@contextlib.contextmanager
def _parameters_frozen(module: object) -> Iterator[None]:
    """Switch off requires_grad of the flow's parameters (gradients w.r.t. z only), then restore."""
    params = list(module.parameters()) if hasattr(module, "parameters") else []
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


# ---------------------------------------------------------------------- the pulled-back density
def frozen_noise(flow: Flow, batch: int, generator: torch.Generator | None = None) -> list[Any] | None:
    """Per-step noise tokens for ``batch`` samples, drawn once (None for a deterministic flow).

    Passing them as ``noise=`` to every ``forward_map`` call makes z ↦ x one fixed bijection
    per row of the batch (one fixed random symmetry element per step and chain), which is
    what latent HMC needs. The flow draws them (:meth:`~latticeflow.flow.Flow.draw_noise`),
    in forward-time order like its own integrations.

    Args:
        flow: the flow.
        batch: number of rows (chains) the tokens are for, >= 1.
        generator: torch.Generator for the draw.

    Returns:
        a list of ``flow.n_steps`` tokens, or None when the flow is deterministic.
    """
    return flow.draw_noise(check_size("batch", batch, 1), generator)


class PulledBackDensity:
    """ln π(z) = −E(f(z)) − Δ(z) and its gradient, for :func:`analysis.hmc.hmc`.

    Built by :func:`latent_log_prob`. Calling it with z of shape (C, N) returns
    (ln π (C,), ∇_z ln π (C, N)); ``calls`` counts those batched evaluations.

    Attributes:
        flow, target: the flow f and the HS target E.
        noise: frozen per-step tokens (stochastic flows) or None.
        calls: number of evaluations so far.
    """

    def __init__(self, flow: Flow, target: Target, noise: Sequence[Any] | None = None) -> None:
        self.flow, self.target = flow, target
        self.noise = list(noise) if noise is not None else None
        self.calls = 0

    def _forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        try:
            return self.flow.forward_map(z, noise=self.noise)
        except RuntimeError as e:  # a gather/shape failure deep in torch
            if self.noise is None:
                raise
            raise ValueError(f"the frozen noise tokens do not fit z of shape {tuple(z.shape)}: draw them with "
                             f"frozen_noise(flow, batch={z.shape[0]}) ({str(e).splitlines()[0]})") from None

    def log_prob(self, z: Tensor) -> Tensor:
        """ln π(z) up to a constant, shape (C,); differentiable in z."""
        x, delta = self._forward(z)
        # p_x(x) = p_z(z)/|det ∂x/∂z| and Δ = ln p_x(x) − ln p_z(z), so ln|det ∂x/∂z| = −Δ
        return -self.target.energy(x) - delta

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self.calls += 1
        with torch.enable_grad(), _parameters_frozen(self.flow):
            z = z.detach().requires_grad_(True)
            lp = self.log_prob(z)
            (g,) = torch.autograd.grad(lp.sum(), z)
        return lp.detach(), g.detach()

    @torch.no_grad()
    def transform(self, z: Tensor) -> Tensor:
        """x = f(z) with the same frozen noise, shape (C, N) → (C, N)."""
        return self._forward(z)[0]


def latent_log_prob(flow: Flow, target: Target, noise: Sequence[Any] | None = None) -> PulledBackDensity:
    """The target pulled back to the flow's latent space, as ``log_prob_and_grad(z)`` for HMC.

    ln π(z) = −E(x(z)) + ln|det ∂x/∂z| = −E(x(z)) − Δ(z), with x(z), Δ(z) from
    ``flow.forward_map(z)`` (Δ = ln p(x, T) − ln p(z, 0) = −∫∇²φ dt, eq. 3), up to the
    constant −ln Z. If z follows π, then x(z) follows e^{−E}/Z whatever the flow.

    Args:
        flow: a :class:`latticeflow.flow.Flow` (float64 recommended).
        target: a :class:`latticeflow.target.Target` with ``N`` equal to ``flow.dim``.
        noise: frozen per-step tokens from :func:`frozen_noise`; required when the flow's
            potential is stochastic (random symmetrisation), for the chain count used.

    Returns:
        a :class:`PulledBackDensity`: z (C, N) ↦ (ln π (C,), ∇ ln π (C, N)).

    Raises:
        TypeError: flow or target of the wrong kind.
        ValueError: dimensions differ, or a stochastic flow without frozen noise.

    Example:
        >>> density = latent_log_prob(flow, ising(4, 0.4))
        >>> res = hmc(density, torch.randn(8, 16, dtype=torch.float64), n_samples=100)
    """
    _check_flow_target(flow, target)
    if noise is None and flow.stochastic:
        raise ValueError("the flow's potential is stochastic (random symmetrisation): latent HMC needs one fixed "
                         "bijection per chain, so pass noise=frozen_noise(flow, n_chains, generator)")
    if noise is not None and len(list(noise)) != int(flow.n_steps):
        raise ValueError(f"noise must hold one token per step (n_steps={flow.n_steps}), got {len(list(noise))}")
    return PulledBackDensity(flow, target, noise)


# ---------------------------------------------------------------------- chains
@dataclass
class ChainResult:
    """A Monte Carlo run measured on the Ising model.

    Attributes:
        method: ``"latent HMC"``, ``"physical HMC"`` or ``"independence"``.
        x: HS field of every stored state, shape (n, C, N).
        spins: ±1 spins drawn from p(s | x), shape (n, C, N).
        m, abs_m, energy: traces of E[m | x], E[|m| | x] and E[H/N | x] (improved
            estimators), each shape (n, C).
        tau: integrated autocorrelation times of those traces (in stored samples), keys
            ``abs_m``, ``energy``, ``m``.
        observables: :func:`analysis.observables.measure` on the improved spins. With
            C >= 8 chains the jackknife leaves out one whole chain at a time (errors from the
            spread between independent chains, valid however long τ is, provided every chain
            is equilibrated); with fewer chains the blocks are time windows of at least 2τ.
        acceptance_rate: fraction of accepted proposals.
        step_size: the frozen leapfrog step (NaN for the independence sampler).
        n_leapfrog: leapfrog steps per trajectory (0 for the independence sampler).
        evals_per_sample: log-density evaluations per stored sample and chain (with gradient
            for HMC: n_leapfrog; a gradient-free flow pass for the independence sampler).
        seconds: wall time of the sampling phase (without warm-up), including the z ↦ x map.
        total_seconds: wall time of everything (warm-up and measurement included).
        z: latent states for latent HMC, shape (n, C, N); None otherwise.
        rhat: rank-normalised split-R̂ of the traces (same keys as ``tau``), across chains
            started from over-dispersed points (:mod:`analysis.diagnostics`).
        verdict: whether the estimates can be used (:class:`~analysis.diagnostics.Verdict`):
            R̂ ≤ 1.01 and a chain of at least 50τ for |m| and E (the independence sampler
            also needs usable importance weights).
        burn_in: stored iterations discarded after the step-size warm-up, when the chains
            were extended to converge (the first half of all iterations then).
    """

    method: str
    x: Tensor
    spins: Tensor
    m: np.ndarray
    abs_m: np.ndarray
    energy: np.ndarray
    tau: dict[str, float]
    observables: dict[str, Estimate]
    acceptance_rate: float
    step_size: float
    n_leapfrog: int
    evals_per_sample: float
    seconds: float
    total_seconds: float
    z: Tensor | None = field(default=None, repr=False)
    rhat: dict[str, float] = field(default_factory=dict)
    verdict: Verdict = field(default_factory=lambda: Verdict(False, "not diagnosed"))
    burn_in: int = 0

    @property
    def n_samples(self) -> int:
        """Stored samples per chain, n."""
        return int(self.m.shape[0])

    @property
    def n_chains(self) -> int:
        """Number of chains, C."""
        return int(self.m.shape[1])

    @property
    def improved_spins(self) -> Tensor:
        """tanh x, shape (n, C, N)."""
        return improved_spins(self.x)

    @property
    def seconds_per_sample(self) -> float:
        """Sampling wall time per stored sample of one chain."""
        return self.seconds / (self.n_samples * self.n_chains)

    def trace(self, name: str) -> np.ndarray:
        """The trace ``abs_m``, ``energy`` or ``m``, shape (n, C)."""
        if name not in TRACE_NAMES:
            raise ValueError(f"name must be one of {', '.join(map(repr, TRACE_NAMES))}; got name={name!r}")
        return getattr(self, name)

    def tau_is_lower_bound(self, name: str = "abs_m") -> bool:
        """True when the chain is shorter than 50τ: τ is then underestimated (emcee's rule)."""
        self.trace(name)  # validates the name
        return self.n_samples < 50 * self.tau[name]

    def effective_seconds(self, name: str = "abs_m") -> float:
        """τ × seconds per sample: wall time per effectively independent sample of ``name``."""
        self.trace(name)  # validates the name
        return self.tau[name] * self.seconds_per_sample

    def effective_evals(self, name: str = "abs_m") -> float:
        """τ × evaluations per sample: evaluations per effectively independent sample."""
        self.trace(name)  # validates the name
        return self.tau[name] * self.evals_per_sample


def _traces(x: Tensor, lattice: object, J: float) -> dict[str, np.ndarray]:
    """Improved-estimator traces m, |m|, e of x (n, C, N) → each (n, C)."""
    n, C, N = x.shape
    t = improved_spins(x.detach()).reshape(n * C, N).double().cpu().numpy()
    mag = magnetisation_moments(t)
    en = energy_moments(t, lattice, J)
    return {"m": mag["m"].reshape(n, C), "abs_m": mag["abs_m"].reshape(n, C), "energy": en["energy"].reshape(n, C)}


def quiet_integrated_time(series: np.ndarray) -> float:
    """:func:`analysis.autocorr.integrated_time` of a (n, C) trace without emcee's short-chain log warning.

    A chain shorter than 50τ makes emcee log a warning; :meth:`ChainResult.tau_is_lower_bound`
    and the report's samplers table say so instead.
    """
    log = logging.getLogger("emcee.autocorr")
    disabled, log.disabled = log.disabled, True
    try:
        return integrated_time(series)
    finally:
        log.disabled = disabled


def _n_blocks(n: int, tau: float) -> int:
    """Jackknife blocks of at least 2τ time steps (at most 50, at least 2)."""
    length = max(1, math.ceil(2.0 * tau)) if math.isfinite(tau) else n
    return int(min(50, max(2, n // length)))


def _diagnose(x: Tensor, target: Target) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float], Verdict]:
    """Traces, τ, split-R̂ and the chain verdict of stored states x (n, C, N)."""
    traces = _traces(x, target.lattice, target.J)
    tau = {k: quiet_integrated_time(v) for k, v in traces.items()}
    rhat = {k: split_rhat(v) for k, v in traces.items()}
    return traces, tau, rhat, chain_verdict(int(x.shape[0]), rhat, tau)


def _measure_chain(method: str, x: Tensor, target: Target, generator: torch.Generator | None,
                   extra_verdict: Verdict | None = None, **info: Any) -> ChainResult:
    n, C, N = x.shape
    traces, tau, rhat, verdict = _diagnose(x, target)
    if extra_verdict is not None:
        verdict = Verdict.combine(verdict, extra_verdict)
    t = improved_spins(x.detach())
    if C >= MIN_CHAINS_FOR_CHAIN_JACKKNIFE:
        # chain-major, one jackknife block per chain: honest errors for independent chains
        # without relying on τ, which short chains underestimate
        t, n_blocks = t.transpose(0, 1).reshape(C * n, N), C
    else:
        # time-major: a block is a window of all chains, at least 2τ long
        t, n_blocks = t.reshape(n * C, N), _n_blocks(n, max(tau["abs_m"], tau["energy"]))
    obs = measure(t, target.lattice, beta=target.beta, J=target.J, n_blocks=n_blocks)
    spins = sample_spins(x.detach(), generator)
    return ChainResult(method=method, x=x.detach(), spins=spins, m=traces["m"], abs_m=traces["abs_m"],
                       energy=traces["energy"], tau=tau, observables=obs, rhat=rhat, verdict=verdict, **info)


class _Timer:
    """HMC callback that notes when the sampling phase starts (after iteration 0)."""

    def __init__(self) -> None:
        self.t0: float | None = None

    def __call__(self, k: int, x: Tensor, lp: Tensor) -> None:  # noqa: ARG002
        if k == 0:
            self.t0 = time.perf_counter()

    def sampling_seconds(self, n: int) -> float:
        # the clock starts after the first of n iterations: scale the n − 1 timed ones up
        assert self.t0 is not None
        return (time.perf_counter() - self.t0) * n / (n - 1)


@dataclass
class _Sampled:
    x: Tensor  # kept states mapped to the HS field, (n, C, N)
    states: Tensor  # kept chain states (z for latent HMC, x for physical HMC)
    acceptance_rate: float
    step_size: float
    seconds: float  # sampling time, warm-up excluded, z ↦ x mapping included
    burn_in: int


def _hmc_until_converged(density: Any, start: Tensor, to_x: Any, target: Target, n_samples: int, n_leapfrog: int,
                         n_warmup: int, target_accept: float, generator: torch.Generator | None, step_size: float,
                         max_seconds: float | None) -> _Sampled:
    """HMC with step adaptation, then sampling; extended until the chains converge or time is up.

    After the first ``n_samples`` iterations the chains are diagnosed (:func:`_diagnose`).
    While the verdict fails and another round fits into ``max_seconds`` (a round doubles the
    iterations, so it costs about as much as all sampling so far), the chains continue from
    their last states with the frozen step, and the first half of all iterations becomes
    burn-in, up to :data:`MAX_EXTENSION` times the requested iterations. ``max_seconds=None``
    runs one round only.
    """
    timer = _Timer()
    res = hmc(density, start, n_samples=n_samples, n_leapfrog=n_leapfrog, step_size=step_size, n_warmup=n_warmup,
              target_accept=target_accept, generator=generator, callback=timer)
    seconds = timer.sampling_seconds(n_samples)
    t = time.perf_counter()
    states, xs = [res.samples], [to_x(res.samples)]
    seconds += time.perf_counter() - t
    accepted, total, step, final = res.acceptance_rate * n_samples, n_samples, res.step_size, res.final
    burn = 0
    while max_seconds is not None and 2 * seconds <= max_seconds and total < MAX_EXTENSION * n_samples:
        if _diagnose(torch.cat(xs)[burn:], target)[3].reliable:
            break
        t = time.perf_counter()
        more = hmc(density, final, n_samples=total, n_leapfrog=n_leapfrog, step_size=step, n_warmup=0,
                   target_accept=target_accept, generator=generator)
        states.append(more.samples)
        xs.append(to_x(more.samples))
        seconds += time.perf_counter() - t
        accepted += more.acceptance_rate * total
        final, total = more.final, 2 * total
        burn = total // 2
    return _Sampled(x=torch.cat(xs)[burn:], states=torch.cat(states)[burn:], acceptance_rate=accepted / total,
                    step_size=step, seconds=seconds, burn_in=burn)


MAX_EXTENSION = 64  # chains run on to at most 64× the requested iterations (6 doublings), whatever the time left
OVERDISPERSION = 2.0  # latent HMC: half the chains start from N(0, 2²I), the other half from N(0, I)


def latent_hmc(
    flow: Flow,
    target: Target,
    n_chains: int = 16,
    n_samples: int = 500,
    n_leapfrog: int = 10,
    n_warmup: int = 200,
    target_accept: float = 0.65,
    generator: torch.Generator | None = None,
    step_size: float = 0.1,
    max_seconds: float | None = None,
    start: Tensor | None = None,
) -> ChainResult:
    """HMC in the flow's latent space (Li & Wang 2018), measured on the Ising model.

    C chains start from over-dispersed points (z ~ N(0, I) for half of them and N(0, 2²I)
    for the others: the pulled-back density is close to N(0, I) for a good flow, so split-R̂
    can see chains that have not forgotten their start), adapt the step size during
    ``n_warmup`` iterations, then store n states; each is mapped to x = f(z) with the chain's
    frozen noise and to spins. With ``max_seconds`` the chains run on (doubling) until R̂ and
    τ pass (:mod:`analysis.diagnostics`) or the time is up.

    Args:
        flow: a :class:`latticeflow.flow.Flow` in the dtype to compute in (float64 recommended).
        target: the HS target (:func:`latticeflow.ising`), with lattice, beta and J.
        n_chains: C >= 1.
        n_samples: stored iterations per chain, >= 2 (the least; more when extended).
        n_leapfrog: leapfrog steps per trajectory, >= 1.
        n_warmup: step-size adaptation iterations, >= 0.
        target_accept: acceptance probability aimed at, in (0, 1).
        generator: torch.Generator for noise tokens, starts, momenta and spins.
        step_size: initial leapfrog step > 0.
        max_seconds: sampling-time budget for extending the chains (None: no extension).
        start: starting latent states (C, N) instead of the over-dispersed draw.

    Returns:
        a :class:`ChainResult` (method ``"latent HMC"``, with ``z``).

    Raises:
        ValueError: settings out of range, or a flow that does not fit the target.
    """
    n_chains, n_samples, n_leapfrog, n_warmup, target_accept, step_size = _check_hmc_settings(
        n_chains, n_samples, n_leapfrog, n_warmup, target_accept, step_size)
    max_seconds = None if max_seconds is None else check_positive("max_seconds", max_seconds)
    _check_flow_target(flow, target)
    _check_lattice_target(target)
    t_start = time.perf_counter()
    dtype, device = flow.dtype, flow.device
    noise = frozen_noise(flow, n_chains, generator)
    density = latent_log_prob(flow, target, noise)
    if start is None:
        z0 = torch.randn(n_chains, target.N, generator=generator, dtype=dtype, device=device)
        z0[::2] *= OVERDISPERSION
    else:
        z0 = _check_start(start, n_chains, target.N).to(dtype=dtype, device=device)

    def to_x(z: Tensor) -> Tensor:
        return torch.stack([density.transform(z[k]) for k in range(z.shape[0])])  # (n, C, N)

    run = _hmc_until_converged(density, z0, to_x, target, n_samples, n_leapfrog, n_warmup, target_accept,
                               generator, step_size, max_seconds)
    out = _measure_chain("latent HMC", run.x, target, generator, acceptance_rate=run.acceptance_rate,
                         step_size=run.step_size, n_leapfrog=n_leapfrog, evals_per_sample=float(n_leapfrog),
                         seconds=run.seconds, total_seconds=0.0, z=run.states, burn_in=run.burn_in)
    out.total_seconds = time.perf_counter() - t_start
    return out


def overdispersed_start(target: Target, n_chains: int, generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float64) -> Tensor:
    """Starting HS fields x = M s for physical HMC, over-dispersed with respect to e^{−E}.

    Chain c starts from the conditional mean M s = (K + αI) s of the spins s: all up (c ≡ 0 mod 4), all
    down (c ≡ 1 mod 4), or random ±1 (the others), so that the chains span both ordered
    states and the disordered one whatever β is. Needs ``target.couplings()`` (K) and
    ``target.alpha``.
    """
    K = torch.as_tensor(np.asarray(target.couplings()), dtype=dtype)
    K = K + float(target.alpha) * torch.eye(target.N, dtype=dtype)
    s = torch.randint(0, 2, (n_chains, target.N), generator=generator).to(dtype) * 2 - 1
    s[0::4] = 1.0
    s[1::4] = -1.0
    return s @ K


def physical_hmc(
    target: Target,
    n_chains: int = 16,
    n_samples: int = 500,
    n_leapfrog: int = 10,
    n_warmup: int = 200,
    target_accept: float = 0.65,
    generator: torch.Generator | None = None,
    step_size: float = 0.1,
    dtype: torch.dtype = torch.float64,
    max_seconds: float | None = None,
    start: Tensor | None = None,
) -> ChainResult:
    """The baseline: HMC directly on the HS energy E(x), with the analytic gradient.

    Same settings, measurements and extension rule as :func:`latent_hmc`; chains start from
    :func:`overdispersed_start` unless ``start`` (C, N) is given.

    Args:
        target: the HS target, with lattice, beta and J.
        n_chains, n_samples, n_leapfrog, n_warmup, target_accept, generator, step_size,
            max_seconds, start: as in :func:`latent_hmc`.
        dtype: floating dtype of the chains.

    Returns:
        a :class:`ChainResult` (method ``"physical HMC"``).

    Raises:
        ValueError: settings out of range or a target without lattice/beta/J.
    """
    n_chains, n_samples, n_leapfrog, n_warmup, target_accept, step_size = _check_hmc_settings(
        n_chains, n_samples, n_leapfrog, n_warmup, target_accept, step_size)
    max_seconds = None if max_seconds is None else check_positive("max_seconds", max_seconds)
    _check_lattice_target(target)
    t_start = time.perf_counter()
    if start is None:
        x0 = overdispersed_start(target, n_chains, generator, dtype)
    else:
        x0 = _check_start(start, n_chains, target.N).to(dtype)
    run = _hmc_until_converged(from_energy(target), x0, lambda x: x, target, n_samples, n_leapfrog, n_warmup,
                               target_accept, generator, step_size, max_seconds)
    out = _measure_chain("physical HMC", run.x, target, generator, acceptance_rate=run.acceptance_rate,
                         step_size=run.step_size, n_leapfrog=n_leapfrog, evals_per_sample=float(n_leapfrog),
                         seconds=run.seconds, total_seconds=0.0, burn_in=run.burn_in)
    out.total_seconds = time.perf_counter() - t_start
    return out


@torch.no_grad()
def _draw(flow: Flow, target: Target, n: int, batch: int,
          generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """n flow samples in batches without gradients: x (n, N), ln q (n,), E (n,)."""
    xs, lps, es = [], [], []
    done = 0
    while done < n:
        b = min(batch, n - done)
        x, lp = flow.sample(b, generator=generator)
        xs.append(x)
        lps.append(lp)
        es.append(target.energy(x))
        done += b
    return torch.cat(xs), torch.cat(lps), torch.cat(es)


def neural_independence_sampler(
    flow: Flow,
    target: Target,
    n: int,
    generator: torch.Generator | None = None,
    batch: int = 1024,
    n_chains: int = 4,
) -> ChainResult:
    """Independence Metropolis with flow samples as proposals (paper section 4.2).

    The n proposals are split into C = ``n_chains`` consecutive streams, each driving its own
    chain, so that split-R̂ can compare independent chains. The error bars come from
    jackknife blocks of at least 2τ across all chains; with C >= 8 from the spread between
    chains (which, with 8 blocks, gave heavier-tailed z-scores: std 1.24 against 1.07 for one
    chain over 30 seeds on a trained L=3 flow).

    Args:
        flow: the flow (its ``sample`` gives x and ln q).
        target: the HS target, with lattice, beta and J.
        n: total number of proposals (= C × chain length), >= 2.
        generator: torch.Generator for proposals, accept/reject draws and spins.
        batch: proposals drawn per flow call, >= 1.
        n_chains: C >= 1 (fewer when n/C < 2).

    Returns:
        a :class:`ChainResult` with C chains of n // C states, method ``"independence"``.

    Raises:
        ValueError: n < 2, batch < 1, n_chains < 1, or a flow that does not fit the target.
    """
    n = check_size("n", n, 2)
    batch = check_size("batch", batch, 1)
    C = min(check_size("n_chains", n_chains, 1), n // 2)
    _check_flow_target(flow, target)
    _check_lattice_target(target)
    start = time.perf_counter()
    x, lq, energy = _draw(flow, target, n, batch, generator)
    length = n // C
    chains, accepted = [], 0.0
    for c in range(C):
        part = slice(c * length, (c + 1) * length)
        chain = independence_metropolis(x[part], lq[part], -energy[part], generator)
        chains.append(chain.samples)
        accepted += chain.acceptance_rate
    seconds = time.perf_counter() - start
    weights = importance_diagnostics(log_weights(lq, energy)).verdict
    out = _measure_chain("independence", torch.stack(chains, 1), target, generator, extra_verdict=weights,
                         acceptance_rate=accepted / C, step_size=math.nan, n_leapfrog=0,
                         evals_per_sample=1.0, seconds=seconds, total_seconds=0.0)
    out.total_seconds = time.perf_counter() - start
    return out


def speedup(fast: ChainResult, slow: ChainResult, name: str = "abs_m") -> dict[str, float]:
    """How much cheaper an effectively independent sample of ``name`` is with ``fast``.

    Returns:
        dict with ``tau`` = τ_slow/τ_fast, ``seconds`` = (τ·s/sample)_slow / (τ·s/sample)_fast
        (the speed-up per unit of wall-clock compute), and ``evals`` the same ratio in
        log-density-gradient evaluations (which ignores that a latent evaluation is a whole
        flow pass).
    """
    for r in (fast, slow):
        if not isinstance(r, ChainResult):
            raise TypeError(f"speedup expects ChainResult objects, got {type(r).__name__}")
    return {
        "tau": slow.tau[name] / fast.tau[name],
        "seconds": slow.effective_seconds(name) / fast.effective_seconds(name),
        "evals": slow.effective_evals(name) / fast.effective_evals(name),
    }


# ---------------------------------------------------------------------- the integrator's density error
def _row_of(token: Any, i: int) -> Any:
    """Row i of a (nested) per-step noise token: tensors sliced along the batch axis."""
    if torch.is_tensor(token):
        return token[i:i + 1]
    if isinstance(token, tuple) and hasattr(token, "_fields"):  # a NamedTuple such as SymmetryDraw
        return type(token)(*(_row_of(t, i) for t in token))
    if isinstance(token, (list, tuple)):
        return type(token)(_row_of(t, i) for t in token)
    return token


def integration_error(flow: Flow, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The flow's integrated ln q against the exact density of its RK4 map, on n fresh samples.

    The flow's ln q(x) is the RK4 integral of −∇²φ along the path; the sample x is the RK4
    map z ↦ x, whose exact density (given the same per-step noise) is
    ln N(z) − ln|det ∂x/∂z|, computed here from the full Jacobian by autograd (N backward
    passes per sample). Their difference δ enters the importance weights as e^{−δ} and the
    variational free energy as ⟨δ⟩: every free energy is off by at most max|δ|/N.

    Args:
        flow: the flow (float64 recommended: the Jacobian's log-determinant is then exact to ~1e-12).
        n: number of samples, >= 1.
        generator: torch.Generator for z and the noise tokens.

    Returns:
        dict with ``x`` (n, N), ``logq_integrated`` (n,), ``logq_exact`` (n,) and ``delta``
        = integrated − exact (n,).
    """
    from latticeflow.flow import standard_normal_log_prob

    n = check_size("n", n, 1)
    noise = flow.draw_noise(n, generator)  # before z, as MongeAmpereFlow.sample draws them
    z = torch.randn(n, flow.dim, generator=generator, dtype=flow.dtype, device=flow.device)
    with torch.no_grad(), _parameters_frozen(flow):
        x, dlogp = flow.forward_map(z, noise=noise)
    logq_int = standard_normal_log_prob(z) + dlogp  # delta_logp = ln q(x) − ln N(z)
    logdet = torch.empty(n, dtype=z.dtype)
    with _parameters_frozen(flow):
        for i in range(n):  # one sample's Jacobian, with its own noise tokens
            tokens = None if noise is None else _row_of(noise, i)

            def one(zi: Tensor, tokens: Any = tokens) -> Tensor:
                return flow.forward_map(zi.unsqueeze(0), noise=tokens)[0].squeeze(0)

            jac = torch.autograd.functional.jacobian(one, z[i])
            logdet[i] = torch.linalg.slogdet(jac)[1]
    logq_exact = standard_normal_log_prob(z) - logdet
    return {"x": x, "logq_integrated": logq_int, "logq_exact": logq_exact, "delta": logq_int - logq_exact}


# ---------------------------------------------------------------------- the target side of the weights
@torch.no_grad()
def target_side_free_energy(flow: Flow, target: Target, chain: ChainResult, max_samples: int = 1024,
                            generator: torch.Generator | None = None, batch: int = 512) -> Estimate:
    """−ln Z/N from the target's own samples (a Markov chain), through the flow's density.

    For x ~ e^{−E}/Z (and, for a random-symmetrised flow, fresh noise tokens t ~ p(t)),
    E[q(x | t)·e^{E(x)}] = 1/Z exactly, whatever q, since q is normalised. So
    −ln Z = ln mean(e^{−ln w}) with ln w = −E − ln q evaluated on target samples: the
    mirror image of the importance-weighted estimate from flow samples. When the flow misses
    part of the target (mode collapse), flow samples never see it and their estimate is too
    high, with an error bar that looks fine; target samples do land there and this estimate
    is not fooled. :func:`analysis.report.compute_estimates` compares the two.

    Args:
        flow: the flow.
        target: the target the chain sampled.
        chain: a :class:`ChainResult` of the target (physical or latent HMC); up to
            ``max_samples`` states are used, evenly thinned, grouped by chain for the error.
        max_samples: states evaluated (each costs one backward flow pass).
        generator: torch.Generator for the noise tokens.
        batch: states per flow call.

    Returns:
        an :class:`Estimate` of −ln Z/N with a jackknife error over chains (over time blocks
        for fewer than 8 chains).
    """
    n, C, N = chain.x.shape
    step = max(1, math.ceil(n * C / max_samples))
    x = chain.x.transpose(0, 1)[:, ::step].reshape(-1, N)  # chain-major, each chain thinned alike
    lq = torch.cat([flow.log_prob(x[i:i + batch].to(flow.dtype), generator=generator) for i in range(0, len(x), batch)])
    lw = (-target.energy(x.to(flow.dtype)) - lq).double().cpu().numpy()
    blocks = C if C >= MIN_CHAINS_FOR_CHAIN_JACKKNIFE else min(20, max(2, len(lw) // 2))
    # −ln Z = ln ⟨e^{−ln w}⟩_p: the importance estimate of ln⟨e^{u}⟩ with u = −ln w, sign flipped
    est = importance_free_energy(np.zeros_like(lw), lw, n_blocks=blocks)  # −ln⟨e^{−lw}⟩
    return Estimate(-est.value / N, est.stderr / N)


# ---------------------------------------------------------------------- exact references
def exact_reference(target: Target) -> dict[str, float]:
    """Exact values to compare with, in the conventions of :func:`analysis.observables.measure`.

    Keys (each present when an exact method covers the system):
        ``free_energy_hs``: −ln Z_HS/N; ``free_energy_ising``: −ln Z_Ising/N;
        ``energy``: U/N (Kaufman on the periodic lattice with J > 0, else enumeration);
        ``specific_heat``: C/N = β² Var(H)/N; and for N <= 16 by enumeration ``m`` (0 by
        symmetry), ``abs_m``, ``m2``, ``m4``, ``binder``, ``susceptibility`` =
        βN(⟨m²⟩ − ⟨|m|⟩²), ``susceptibility_m2`` = βN⟨m²⟩.

    Args:
        target: an IsingHS target with lattice (or couplings), beta and J.

    Returns:
        dict name → float.
    """
    out: dict[str, float] = {}
    try:
        f_hs = float(target.exact_free_energy())
        out["free_energy_hs"] = f_hs
        out["free_energy_ising"] = float(target.to_ising_free_energy(f_hs))
    except (ValueError, AttributeError):
        pass
    lat, beta, J = getattr(target, "lattice", None), getattr(target, "beta", None), getattr(target, "J", None)
    if lat is not None and beta is not None and J is not None and lat.periodic and J > 0:
        out["energy"] = exact.kaufman_internal_energy(lat.L, beta, J)
        out["specific_heat"] = exact.kaufman_specific_heat(lat.L, beta, J)
    if target.N <= MAX_ENUMERATION_SITES and beta is not None and callable(getattr(target, "couplings", None)):
        en = exact.enumerate_ising(target.couplings())
        if "energy" not in out:
            out["energy"] = en.energy / beta  # enumeration's energy is ⟨−½sᵀKs⟩/N = β·U/N
            out["specific_heat"] = en.specific_heat
        out.update(m=0.0, abs_m=en.abs_m, m2=en.m2, m4=en.m4, binder=en.binder,
                   susceptibility=beta * target.N * (en.m2 - en.abs_m**2), susceptibility_m2=beta * target.N * en.m2)
    return out


# ---------------------------------------------------------------------- flow estimates
@dataclass
class FlowEstimates:
    """Free energies and observables from i.i.d. flow samples (all per site).

    Attributes:
        n_samples: B.
        free_energy_variational: F_q = ⟨ln q + E⟩/N, −ln Z_HS normalisation (eq. 7).
        free_energy_importance: −ln(⟨e^{−E}/q⟩)/N with a jackknife error, HS normalisation.
        free_energy_variational_ising, free_energy_importance_ising: the same as −ln Z_Ising/N.
        ess: normalised Kish effective sample size ∈ (0, 1].
        observables: plain averages over flow samples (improved spins); biased by the flow.
        observables_reweighted: self-normalised importance averages with ln w = −E − ln q.
        exact: :func:`exact_reference` of the target.
        m: magnetisation per site of spins drawn from p(s | x), shape (B,) (for histograms).
        log_weights: ln w = −E − ln q, shape (B,).
        spins: a few sampled spin configurations, shape (k, L, L), for figures.
        seconds: wall time of sampling and measuring.
        importance: :func:`analysis.diagnostics.importance_diagnostics` of the log-weights
            (Pareto k̂, Kish ESS, Var ln w and the verdict on every reweighted estimate).
        tails: observable name → (k̂, verdict) of its reweighted estimate's per-sample
            contributions (:func:`analysis.diagnostics.influence_verdict`): the weights'
            verdict judges ⟨w⟩, this one where large weights meet extreme values of the observable.
    """

    n_samples: int
    free_energy_variational: Estimate
    free_energy_importance: Estimate
    free_energy_variational_ising: Estimate
    free_energy_importance_ising: Estimate
    ess: float
    observables: dict[str, Estimate]
    observables_reweighted: dict[str, Estimate]
    exact: dict[str, float]
    m: np.ndarray = field(repr=False)
    log_weights: np.ndarray = field(repr=False)
    spins: np.ndarray = field(repr=False)
    seconds: float = 0.0
    importance: Any = None
    tails: dict[str, tuple[float, Verdict]] = field(default_factory=dict, repr=False)


def _shifted(e: Estimate, offset: float) -> Estimate:
    return Estimate(e.value + offset, e.stderr)


def flow_estimates(
    flow: Flow,
    target: Target,
    n_samples: int = 4096,
    batch: int = 512,
    generator: torch.Generator | None = None,
    n_spin_images: int = 16,
) -> FlowEstimates:
    """Variational and importance-sampled free energies, ESS and observables from the flow.

    Samples are drawn in batches without gradients. With ln w = −E − ln q:
    F_q = ⟨ln q + E⟩ ≥ −ln Z (eq. 7), F_IS = −ln⟨w⟩ (jackknife error), ESS = (Σw)²/(BΣw²);
    Ising free energies are the HS ones plus ``target.log_z_offset``/N. Observables use the
    improved spins tanh x, plain and reweighted by w.

    Args:
        flow: the flow.
        target: the HS target, with lattice, beta and J.
        n_samples: B >= 2.
        batch: samples per flow call, >= 1.
        generator: torch.Generator for the samples and spins.
        n_spin_images: sampled spin configurations kept for figures, >= 0.

    Returns:
        a :class:`FlowEstimates`.

    Raises:
        ValueError: n_samples < 2, batch < 1, or a flow that does not fit the target.
    """
    n_samples = check_size("n_samples", n_samples, 2)
    batch = check_size("batch", batch, 1)
    n_spin_images = check_size("n_spin_images", n_spin_images, 0)
    _check_flow_target(flow, target)
    _check_lattice_target(target)
    start = time.perf_counter()
    x, lq, energy = _draw(flow, target, n_samples, batch, generator)
    N = target.N
    lw = log_weights(lq, energy)
    f_var = variational_free_energy(lq, energy).per_site(N)
    f_is = importance_free_energy(lq, energy).per_site(N)
    offset = float(target.log_z_offset) / N
    moments = moments_of(improved_spins(x).double().cpu().numpy(), target.lattice, target.J)
    obs = summarize(moments, N, beta=target.beta)
    obs_w = summarize(moments, N, beta=target.beta, log_weights=lw)
    tails = {name: influence_verdict(psi) for name, psi in influences(moments, N, beta=target.beta,
                                                                      log_weights=lw).items()}
    spins = sample_spins(x, generator)
    L = int(round(math.sqrt(N)))
    k = min(n_spin_images, n_samples)
    return FlowEstimates(
        n_samples=n_samples,
        free_energy_variational=f_var,
        free_energy_importance=f_is,
        free_energy_variational_ising=_shifted(f_var, offset),
        free_energy_importance_ising=_shifted(f_is, offset),
        ess=effective_sample_size(lw),
        observables=obs,
        observables_reweighted=obs_w,
        exact=exact_reference(target),
        m=spins.mean(1).double().cpu().numpy(),
        log_weights=lw,
        spins=spins[:k].reshape(k, L, L).cpu().numpy() if L * L == N else np.empty((0, 0, 0)),
        seconds=time.perf_counter() - start,
        importance=importance_diagnostics(lw),
        tails=tails,
    )


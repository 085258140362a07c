"""Batched Hamiltonian Monte Carlo and the independence Metropolis sampler, in torch.

HMC (Duane, Kennedy, Pendleton & Roweth 1987; Neal, "MCMC using Hamiltonian dynamics", 2011)
samples π(x) ∝ exp(log π(x)) for C independent chains at once, x of shape (C, D). Each
iteration draws momenta p ~ N(0, I), integrates H(x, p) = −log π(x) + ½|p|² with
``n_leapfrog`` leapfrog steps of size ε, and accepts each chain's endpoint with probability
min(1, e^{−ΔH}). All chains share one step size.

Step-size adaptation (warm-up only), driven by ᾱ, the mean over chains of the acceptance
probability min(1, e^{−ΔH}) at each warm-up iteration:
  1. bracketing as in Hoffman & Gelman, "The No-U-Turn Sampler", JMLR 15 (2014),
     Algorithm 4: double (or halve) ε until ᾱ crosses ½, using at most n_warmup/4 iterations;
  2. Robbins-Monro stochastic approximation on the log step,
         ln ε_{m+1} = ln ε_m + (ᾱ_m − target_accept) · m^{−0.6};
  3. ε frozen at exp(mean of ln ε_m over the second half of step 2) (Polyak averaging), so
     the sampling phase is a fixed, reversible Markov chain.
With C chains ᾱ is a low-noise signal, which suits this simple scheme; Hoffman & Gelman's
dual averaging was tried first and froze ε well off target on stiff Gaussians, because its
averaged iterate remembers the transient of the first iterations.

Step-size jitter: each chain draws its own step ε·U(1 − j, 1 + j) per trajectory
(independently of the state, so detailed balance holds for each draw). Without it, a fixed
number of leapfrog steps on a (nearly) Gaussian target makes the acceptance rate a
non-monotone function of ε (the leapfrog energy error oscillates with the trajectory's phase),
which defeats any adaptation; j = 0.2 smooths this out.

The independence Metropolis sampler turns i.i.d. proposals from a normalised model q (a
trained flow) into a Markov chain for the target: a proposal x' replaces the current x with
probability min(1, w(x')/w(x)), w = exp(log_target − log_q). It is exact for any q that
covers the target and accepts every proposal when q equals the normalised target.

Reference for the application: Zhang, E & Wang, "Monge-Ampère Flow for Generative
Modeling", arXiv:1809.10188 (latent-space and independence Monte Carlo for the Ising model).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from latticeflow._checks import check_fraction, check_positive, check_size

__all__ = [
    "HMCResult",
    "IndependenceResult",
    "from_energy",
    "hmc",
    "independence_metropolis",
    "with_autograd",
]

LogProbAndGrad = Callable[[Tensor], tuple[Tensor, Tensor]]

_RM_KAPPA = 0.6  # Robbins-Monro gain m^(-κ), 1/2 < κ <= 1
_MAX_LOG_STEP = math.log(1e3)  # keeps ln ε finite when every trajectory is accepted


@dataclass
class HMCResult:
    """Output of :func:`hmc`.

    Attributes:
        samples: states after each sampling iteration, shape (n_samples, C, D); None when
            ``keep_samples=False`` (use the callback to reduce on the fly).
        log_prob: log π of those states, shape (n_samples, C).
        acceptance_rate: fraction of accepted proposals over chains and sampling iterations.
        acceptance_per_chain: the same per chain, shape (C,).
        mean_accept_prob: mean of min(1, e^{−ΔH}) over the sampling phase (the adapted quantity).
        step_size: the frozen step size used while sampling.
        warmup_accept_prob: mean acceptance probability over the second half of warm-up
            (NaN without warm-up).
        final: last state of every chain, shape (C, D).
    """

    samples: Tensor | None
    log_prob: Tensor
    acceptance_rate: float
    acceptance_per_chain: Tensor
    mean_accept_prob: float
    step_size: float
    warmup_accept_prob: float
    final: Tensor


@dataclass
class IndependenceResult:
    """Output of :func:`independence_metropolis`.

    Attributes:
        samples: the chain's states, shape (n, D) (rows of the proposals, repeated on rejection).
        indices: which proposal each state is, shape (n,), int64.
        acceptance_rate: accepted moves / (n − 1).
    """

    samples: Tensor
    indices: Tensor
    acceptance_rate: float


# ---------------------------------------------------------------------- helpers
def from_energy(target: object) -> LogProbAndGrad:
    """Wrap a target with ``energy(x) -> (C,)`` and ``grad(x) -> (C, D)`` as log π = −E.

    Example:
        >>> from latticeflow import ising
        >>> f = from_energy(ising(L=4, beta=0.3))  # for hmc(f, x0, ...)
    """
    for attr in ("energy", "grad"):
        if not callable(getattr(target, attr, None)):
            raise TypeError(f"from_energy expects an object with energy(x) and grad(x), got {type(target).__name__}")

    def log_prob_and_grad(x: Tensor) -> tuple[Tensor, Tensor]:
        return -target.energy(x), -target.grad(x)

    return log_prob_and_grad


def with_autograd(log_prob: Callable[[Tensor], Tensor]) -> LogProbAndGrad:
    """Turn ``log_prob(x) -> (C,)`` into ``x -> (log_prob, ∇ log_prob)`` by autograd."""

    def log_prob_and_grad(x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            lp = log_prob(x)
            (g,) = torch.autograd.grad(lp.sum(), x)
        return lp.detach(), g.detach()

    return log_prob_and_grad


def _check_x0(x0: object) -> Tensor:
    if not isinstance(x0, Tensor):
        raise TypeError(f"x0 must be a torch.Tensor of shape (C, D), got {type(x0).__name__}")
    if not x0.is_floating_point():
        raise TypeError(f"x0 must have a floating dtype, got dtype={x0.dtype}")
    if x0.dim() != 2 or x0.shape[0] < 1 or x0.shape[1] < 1:
        raise ValueError(f"x0 must have shape (C, D) with C, D >= 1, got shape={tuple(x0.shape)}")
    return x0.detach().clone()


def _evaluate(f: LogProbAndGrad, x: Tensor) -> tuple[Tensor, Tensor]:
    out = f(x)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            f"log_prob_and_grad must return a tuple (log_prob (C,), grad (C, D)), got {type(out).__name__}"
        )
    lp, g = out
    C, D = x.shape
    if not isinstance(lp, Tensor) or tuple(lp.shape) != (C,):
        got = tuple(getattr(lp, "shape", ()))
        raise ValueError(f"log_prob_and_grad must return log_prob of shape ({C},), got shape={got}")
    if not isinstance(g, Tensor) or tuple(g.shape) != (C, D):
        got = tuple(getattr(g, "shape", ()))
        raise ValueError(f"log_prob_and_grad must return grad of shape ({C}, {D}), got shape={got}")
    return lp.detach().to(x.dtype), g.detach().to(x.dtype)


# ---------------------------------------------------------------------- HMC
def _hmc_step(
    f: LogProbAndGrad,
    x: Tensor,
    lp: Tensor,
    g: Tensor,
    eps: float,
    n_leapfrog: int,
    generator: torch.Generator | None,
    jitter: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One HMC transition for all chains; returns (x, lp, g, accepted (C,), accept_prob (C,))."""
    p0 = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if jitter > 0:
        # per-chain step ε·U(1 − j, 1 + j), drawn independently of the state (keeps detailed balance)
        u = torch.rand((x.shape[0], 1), generator=generator, dtype=x.dtype, device=x.device)
        eps = eps * (1.0 + jitter * (2.0 * u - 1.0))
    xn, gn = x, g
    p = p0 + 0.5 * eps * gn
    for k in range(n_leapfrog):
        xn = xn + eps * p
        lpn, gn = _evaluate(f, xn)
        p = p + (eps if k < n_leapfrog - 1 else 0.5 * eps) * gn
    # log of min(1, e^{−ΔH}); a diverged trajectory (NaN/inf) is rejected
    log_ratio = (lpn - 0.5 * (p * p).sum(-1)) - (lp - 0.5 * (p0 * p0).sum(-1))
    log_ratio = torch.where(torch.isfinite(log_ratio) & torch.isfinite(gn).all(-1), log_ratio, -math.inf)
    accept_prob = torch.exp(torch.clamp(log_ratio, max=0.0))
    u = torch.rand(lp.shape, generator=generator, dtype=x.dtype, device=x.device)
    accepted = torch.log(u) < log_ratio
    x = torch.where(accepted[:, None], xn, x)
    g = torch.where(accepted[:, None], gn, g)
    lp = torch.where(accepted, lpn, lp)
    return x, lp, g, accepted, accept_prob


def hmc(
    log_prob_and_grad: LogProbAndGrad,
    x0: Tensor,
    n_samples: int,
    n_leapfrog: int = 10,
    step_size: float = 0.1,
    n_warmup: int = 0,
    target_accept: float = 0.65,
    generator: torch.Generator | None = None,
    keep_samples: bool = True,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
    jitter: float = 0.2,
) -> HMCResult:
    """Run C HMC chains in parallel with step-size adaptation during warm-up.

    Args:
        log_prob_and_grad: x of shape (C, D) ↦ (log π(x) of shape (C,), ∇ log π(x) of shape
            (C, D)); π need not be normalised. See :func:`from_energy` and :func:`with_autograd`.
        x0: initial states, shape (C, D) (C chains in D dimensions).
        n_samples: sampling iterations after warm-up, >= 1.
        n_leapfrog: leapfrog steps per trajectory, >= 1.
        step_size: initial leapfrog step ε0 > 0 (the sampling step when n_warmup = 0).
        n_warmup: adaptation iterations, >= 0, whose states are discarded.
        target_accept: mean acceptance probability aimed at by the warm-up adaptation, in (0, 1).
        generator: torch.Generator for momenta and accept/reject draws.
        keep_samples: store all states (n_samples·C·D numbers); False keeps only log π.
        callback: called as callback(k, x (C, D), log_prob (C,)) after sampling iteration k,
            e.g. to accumulate moments without storing samples.
        jitter: relative half-width j of the per-chain step-size jitter ε·U(1 − j, 1 + j),
            in [0, 1); 0 switches it off (see the module docstring).

    Returns:
        an :class:`HMCResult`.

    Raises:
        ValueError: step_size <= 0, n_leapfrog < 1, n_samples < 1, n_warmup < 0,
            target_accept outside (0, 1), jitter outside [0, 1), bad x0 shape, a start with
            non-finite log π or gradient, or log_prob_and_grad returning wrong shapes.
        TypeError: x0 not a floating torch.Tensor.

    Example:
        >>> f = with_autograd(lambda x: -0.5 * (x**2).sum(-1))
        >>> res = hmc(f, torch.zeros(8, 2), n_samples=100, n_warmup=100)
        >>> res.samples.shape
        torch.Size([100, 8, 2])
    """
    eps = check_positive("step_size", step_size)
    n_leapfrog = check_size("n_leapfrog", n_leapfrog, 1)
    n_samples = check_size("n_samples", n_samples, 1)
    n_warmup = check_size("n_warmup", n_warmup, 0)
    delta = check_fraction("target_accept", target_accept)
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float, np.floating)) or not 0 <= jitter < 1:
        raise ValueError(f"jitter must lie in [0, 1), got jitter={jitter!r}")
    x = _check_x0(x0)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    C, D = x.shape
    with torch.no_grad():
        lp, g = _evaluate(log_prob_and_grad, x)
        bad = ~(torch.isfinite(lp) & torch.isfinite(g).all(-1))
        if bad.any():
            raise ValueError(
                f"x0 must have finite log_prob and gradient in every chain, got {int(bad.sum())} of C={C} "
                f"chains non-finite (first: chain {int(bad.nonzero()[0, 0])})"
            )

        # ---- warm-up. (1) bracket: double or halve ε until the mean acceptance probability
        # crosses ½ (Hoffman & Gelman 2014, Algorithm 4, here with real transitions), at most a
        # quarter of the warm-up; (2) Robbins-Monro on ln ε with gain m^(−0.6); (3) freeze ε at
        # the geometric mean of the iterates of the second half of (2) (Polyak averaging).
        warm_probs: list[float] = []
        it = 0
        n_bracket = n_warmup // 4
        if n_bracket > 0:
            x, lp, g, _, prob = _hmc_step(log_prob_and_grad, x, lp, g, eps, n_leapfrog, generator, jitter)
            warm_probs.append(float(prob.mean()))
            it = 1
            grow = warm_probs[-1] > 0.5
            while it < n_bracket:
                eps = eps * 2.0 if grow else eps / 2.0
                x, lp, g, _, prob = _hmc_step(log_prob_and_grad, x, lp, g, eps, n_leapfrog, generator, jitter)
                warm_probs.append(float(prob.mean()))
                it += 1
                if (warm_probs[-1] > 0.5) != grow:
                    break
        log_eps, history = math.log(eps), []
        for m in range(1, n_warmup - it + 1):
            x, lp, g, _, prob = _hmc_step(log_prob_and_grad, x, lp, g, math.exp(log_eps), n_leapfrog, generator, jitter)
            alpha = float(prob.mean())
            warm_probs.append(alpha)
            log_eps = min(log_eps + (alpha - delta) * m**-_RM_KAPPA, _MAX_LOG_STEP)
            history.append(log_eps)
        if history:
            eps = math.exp(float(np.mean(history[len(history) // 2 :])))
        warmup_accept = float(np.mean(warm_probs[n_warmup // 2 :])) if n_warmup > 0 else math.nan

        # ---- sampling with ε frozen
        samples = torch.empty((n_samples, C, D), dtype=x.dtype, device=x.device) if keep_samples else None
        trace = torch.empty((n_samples, C), dtype=x.dtype, device=x.device)
        n_acc = torch.zeros(C, dtype=torch.float64)
        prob_sum = 0.0
        for k in range(n_samples):
            x, lp, g, acc, prob = _hmc_step(log_prob_and_grad, x, lp, g, eps, n_leapfrog, generator, jitter)
            n_acc += acc.to(torch.float64).cpu()
            prob_sum += float(prob.mean())
            if samples is not None:
                samples[k] = x
            trace[k] = lp
            if callback is not None:
                callback(k, x, lp)
    per_chain = n_acc / n_samples
    return HMCResult(
        samples=samples,
        log_prob=trace,
        acceptance_rate=float(per_chain.mean()),
        acceptance_per_chain=per_chain,
        mean_accept_prob=prob_sum / n_samples,
        step_size=eps,
        warmup_accept_prob=warmup_accept,
        final=x,
    )


# ---------------------------------------------------------------------- independence sampler
def independence_metropolis(
    x: Tensor,
    log_q: Tensor,
    log_target: Tensor,
    generator: torch.Generator | None = None,
) -> IndependenceResult:
    """Independence Metropolis chain over a batch of i.i.d. proposals.

    The chain starts at proposal 0; proposal t replaces the current state c with probability
    min(1, w_t / w_c), ln w = log_target − log_q. The target may be unnormalised.

    Args:
        x: proposals in the order drawn, shape (n, D).
        log_q: log density of each proposal under the proposal distribution, shape (n,).
        log_target: unnormalised log target density (e.g. −E), shape (n,).
        generator: torch.Generator for the uniform draws.

    Returns:
        an :class:`IndependenceResult` with samples (n, D), indices (n,) and the acceptance rate.

    Raises:
        ValueError: mismatched shapes, n < 2, NaN entries or +inf weights.
        TypeError: inputs that are not torch Tensors.
    """
    for name, t in (("x", x), ("log_q", log_q), ("log_target", log_target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or log_q.shape != (x.shape[0],) or log_target.shape != (x.shape[0],):
        raise ValueError(
            "independence_metropolis expects x (n, D), log_q (n,), log_target (n,), got "
            f"x.shape={tuple(x.shape)}, log_q.shape={tuple(log_q.shape)}, log_target.shape={tuple(log_target.shape)}"
        )
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"independence_metropolis needs at least 2 proposals, got n={n}")
    log_w = (log_target.detach().double() - log_q.detach().double()).cpu()
    if torch.isnan(log_w).any() or torch.isposinf(log_w).any():
        n_bad = int((torch.isnan(log_w) | torch.isposinf(log_w)).sum())
        raise ValueError(f"log_target − log_q must be free of NaN and +inf, got {n_bad} bad entries")
    log_u = torch.log(torch.rand(n, generator=generator, dtype=torch.float64)).tolist()
    lw = log_w.tolist()
    idx = [0] * n
    cur, accepted = 0, 0
    for t in range(1, n):
        # log u < ln w_t − ln w_c; from ln w_c = −inf any finite proposal is taken (difference +inf)
        if log_u[t] < lw[t] - lw[cur]:
            cur = t
            accepted += 1
        idx[t] = cur
    indices = torch.tensor(idx, dtype=torch.int64)
    return IndependenceResult(samples=x[indices.to(x.device)], indices=indices, acceptance_rate=accepted / (n - 1))

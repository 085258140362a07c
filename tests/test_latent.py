"""Latent-space HMC, the neural independence sampler and flow estimates (analysis/latent.py).

Everything in float64 with tiny real MongeAmpereFlows (N = 4 or 9, hidden 8, 4 RK4 steps).
Exactness checks compare with brute-force enumeration: any flow, trained or not, must give
unbiased chains; only their efficiency depends on the flow.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from analysis.hmc import from_energy, hmc
from analysis.latent import (
    ChainResult,
    exact_reference,
    flow_estimates,
    frozen_noise,
    latent_hmc,
    latent_log_prob,
    neural_independence_sampler,
    overdispersed_start,
    physical_hmc,
    quiet_integrated_time,
    speedup,
    target_side_free_energy,
)
from latticeflow import ising
from latticeflow.exact import enumerate_ising, kaufman_internal_energy, kaufman_specific_heat
from latticeflow.flow import MongeAmpereFlow
from latticeflow.mixture import SymmetricMixture
from latticeflow.potentials import MLPPotential, QuadraticPotential, Symmetrized
from latticeflow.symmetry import space_group, spin_flip_group

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp_flow(N: int, init_scale: float, seed: int = 0, n_steps: int = 4) -> MongeAmpereFlow:
    torch.manual_seed(seed)
    return MongeAmpereFlow(MLPPotential(N, 8, init_scale=init_scale), n_steps=n_steps, step_size=0.1).to(DT)


def symmetrized_flow(target, init_scale: float, seed: int = 0) -> MongeAmpereFlow:
    """A random-symmetrised MLP flow (the paper's scheme): stochastic, needs frozen noise."""
    torch.manual_seed(seed)
    group = space_group(target.lattice).with_spin_flip()
    pot = Symmetrized(MLPPotential(target.N, 8, init_scale=init_scale), group, mode="random")
    return MongeAmpereFlow(pot, n_steps=4, step_size=0.1).to(DT)


def linear_flow(A: torch.Tensor, n_steps: int = 4, step_size: float = 0.1) -> MongeAmpereFlow:
    """Flow of φ = ½ xᵀAx (dense A): dx/dt = Ax, a linear map."""
    pot = QuadraticPotential(A.shape[0], symmetric="none", linear=False)
    flow = MongeAmpereFlow(pot, n_steps=n_steps, step_size=step_size).to(DT)
    with torch.no_grad():
        pot.a.copy_(A)
    return flow


def fitted_gaussian_flow(target, mlp_scale: float = 0.0, seed: int = 0) -> MongeAmpereFlow:
    """A flow whose linear part maps N(0, I) to (nearly) the HS field's covariance.

    x | s ~ N(Ms, M) with M = K + αI, so Cov(x) = M + M⟨ssᵀ⟩M (⟨ssᵀ⟩ by enumeration);
    A = ln(Cov)/(2T) makes e^{TA} = Cov^{1/2}. An optional small MLP makes the flow nonlinear.
    """
    K = target.couplings()
    N = K.shape[0]
    S = np.array(list(itertools.product([-1.0, 1.0], repeat=N)))
    lw = 0.5 * np.einsum("bi,ij,bj->b", S, K, S)
    p = np.exp(lw - lw.max())
    p /= p.sum()
    C = (S * p[:, None]).T @ S
    M = K + target.alpha * np.eye(N)
    lam, Q = np.linalg.eigh(M + M @ C @ M)
    n_steps, eps = 4, 0.1
    A = torch.from_numpy((Q * np.log(lam)) @ Q.T / (2 * n_steps * eps))
    quad = QuadraticPotential(N, symmetric="none", linear=False)
    with torch.no_grad():
        quad.a.copy_(A)
    pot = quad
    if mlp_scale > 0:
        torch.manual_seed(seed)
        pot = quad + MLPPotential(N, 8, init_scale=mlp_scale)
    return MongeAmpereFlow(pot, n_steps=n_steps, step_size=eps).to(DT)


class GaussianTarget:
    """E(x) = ½ xᵀPx."""

    def __init__(self, P: torch.Tensor) -> None:
        self.P, self.N = P, P.shape[0]

    def energy(self, x):
        return 0.5 * ((x @ self.P) * x).sum(-1)

    def grad(self, x):
        return x @ self.P


def within(est, exact, k=4.0):
    """|estimate − exact| < k σ (σ > 0)."""
    assert est.stderr > 0, est
    assert abs(est.value - exact) < k * est.stderr, (est, exact, est.deviation(exact))


# ---------------------------------------------------------------------- the pulled-back density
@pytest.mark.parametrize("L", [2, 3])
def test_identity_flow_is_physical(L, generator):
    # φ ≡ 0 (readout weights zero): x = z and Δ = 0 exactly, so ln π(z) = −E(z) and the
    # latent chain is the physical chain, draw for draw
    target = ising(L, 0.4)
    flow = mlp_flow(target.N, init_scale=0.0)
    z = torch.randn(7, target.N, dtype=DT, generator=generator)
    lp, g = latent_log_prob(flow, target)(z)
    torch.testing.assert_close(lp, -target.energy(z), rtol=0, atol=1e-12)
    torch.testing.assert_close(g, -target.grad(z), rtol=0, atol=1e-12)

    kw = dict(n_chains=4, n_samples=20, n_leapfrog=3, n_warmup=8, start=overdispersed_start(target, 4, generator))
    lat = latent_hmc(flow, target, generator=torch.Generator().manual_seed(5), **kw)
    phy = physical_hmc(target, generator=torch.Generator().manual_seed(5), **kw)
    torch.testing.assert_close(lat.x, phy.x, rtol=0, atol=1e-9)
    torch.testing.assert_close(lat.z, lat.x, rtol=0, atol=0)
    assert lat.acceptance_rate == phy.acceptance_rate and lat.step_size == pytest.approx(phy.step_size)
    np.testing.assert_allclose(lat.abs_m, phy.abs_m, atol=1e-9)


def test_linear_flow_gaussian_closed_form(generator):
    # dx/dt = Ax: RK4 is the degree-4 Taylor polynomial R = Σ_k (hA)^k/k! per step, so
    # x = R^n z exactly, while Δ = −T·tr A (a constant Laplacian is integrated exactly).
    # Pulled back: ln π(z) = −½ (R^n z)ᵀ P (R^n z) + T·tr A, gradient −(R^n)ᵀ P R^n z.
    N, n, h = 4, 4, 0.1
    B = torch.randn(N, N, dtype=DT, generator=generator)
    A = 0.5 * (B + B.T) + 0.8 * torch.eye(N, dtype=DT)  # tr A far from 0: the sign of Δ matters
    C = torch.randn(N, N, dtype=DT, generator=generator)
    P = C @ C.T + 0.5 * torch.eye(N, dtype=DT)
    flow = linear_flow(A, n_steps=n, step_size=h)
    density = latent_log_prob(flow, GaussianTarget(P))
    hA = h * A
    R = torch.eye(N, dtype=DT) + hA + hA @ hA / 2 + hA @ hA @ hA / 6 + hA @ hA @ hA @ hA / 24
    Mmap = torch.linalg.matrix_power(R, n)
    z = torch.randn(6, N, dtype=DT, generator=generator)
    x = z @ Mmap.T
    T = n * h
    assert abs(T * torch.trace(A)) > 0.5
    lp, g = density(z)
    torch.testing.assert_close(lp, -0.5 * ((x @ P) * x).sum(1) + T * torch.trace(A), rtol=0, atol=1e-11)
    torch.testing.assert_close(g, -(x @ P) @ Mmap, rtol=0, atol=1e-11)
    torch.testing.assert_close(density.transform(z), x, rtol=0, atol=1e-12)


def test_nonlinear_flow_log_det_and_gradient(generator):
    # ln π(z) − ln π(z') must equal [−E(x) + ln|det ∂x/∂z|] differences with the Jacobian from
    # autograd (exact for the discrete map; Δ is its RK4 estimate, O(ε⁵) per step away),
    # and the gradient must match central finite differences
    target = ising(3, 0.4)
    flow = mlp_flow(target.N, init_scale=1.0, seed=3)
    density = latent_log_prob(flow, target)
    z = torch.randn(4, target.N, dtype=DT, generator=generator)
    lp, g = density(z)
    ref = []
    for zi in z:
        J = torch.autograd.functional.jacobian(lambda v: flow.forward_map(v[None])[0][0], zi)
        x = flow.forward_map(zi[None])[0]
        ref.append(-target.energy(x)[0] + torch.linalg.slogdet(J)[1])
    ref = torch.stack(ref).detach()
    assert float((lp - ref).abs().max()) < 1e-7
    assert float(g.abs().max()) > 0.1
    step = 1e-6
    fd = torch.empty_like(z)
    for i in range(target.N):
        e = torch.zeros_like(z)
        e[:, i] = step
        fd[:, i] = (density.log_prob(z + e) - density.log_prob(z - e)).detach() / (2 * step)
    torch.testing.assert_close(g, fd, rtol=0, atol=1e-6)
    # the parameters' requires_grad flags are restored
    assert all(p.requires_grad for p in flow.parameters())


def test_stochastic_flow_needs_frozen_noise(generator):
    target = ising(3, 0.4)
    flow = symmetrized_flow(target, init_scale=1.0)
    with pytest.raises(ValueError, match="frozen_noise"):
        latent_log_prob(flow, target)
    noise = frozen_noise(flow, 5, generator)
    assert len(noise) == flow.n_steps
    density = latent_log_prob(flow, target, noise)
    z = torch.randn(5, target.N, dtype=DT, generator=generator)
    lp1, g1 = density(z)
    lp2, g2 = density(z)  # same bijection every call
    assert torch.equal(lp1, lp2) and torch.equal(g1, g2)
    assert density.calls == 2
    # the frozen map is a smooth function of z: gradient against finite differences
    e = torch.zeros_like(z)
    e[:, 0] = 1e-6
    fd = (density.log_prob(z + e) - density.log_prob(z - e)).detach() / 2e-6
    torch.testing.assert_close(g1[:, 0], fd, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="batch=3"):
        density(z[:3])
    with pytest.raises(ValueError, match="one token per step"):
        latent_log_prob(flow, target, noise[:2])
    assert frozen_noise(mlp_flow(target.N, 0.1), 5) is None


# ---------------------------------------------------------------------- exactness of the chains
@pytest.fixture(scope="module")
def exact_l2():
    target = ising(2, 0.4)
    return target, enumerate_ising(target.couplings())


def test_latent_hmc_is_unbiased(exact_l2):
    # an untrained random-symmetrised flow (frozen noise per chain): a poor but valid
    # bijection; the chain must still reproduce the enumerated averages. The weights are
    # scaled up so that ln|det ∂x/∂z| varies (std ≈ 0.3): dropping the Jacobian term, or
    # flipping its sign, then biases ⟨m²⟩ by 7σ and 13σ (checked when writing this).
    target, en = exact_l2
    flow = symmetrized_flow(target, init_scale=1.0, seed=1)
    with torch.no_grad():
        flow.potential.potential.weight.mul_(3.0)
        _, delta = flow.forward_map(torch.randn(2000, 4, dtype=DT, generator=torch.Generator().manual_seed(0)))
    assert float(delta.std()) > 0.2
    res = latent_hmc(flow, target, n_chains=128, n_samples=200, n_leapfrog=4, n_warmup=50,
                     generator=torch.Generator().manual_seed(11))
    assert res.x.shape == res.spins.shape == (200, 128, 4) and res.abs_m.shape == (200, 128)
    assert set(res.spins.unique().tolist()) == {-1.0, 1.0}
    assert 0.4 < res.acceptance_rate < 0.9 and res.step_size > 0
    assert res.z is not None and not torch.allclose(res.z, res.x)
    within(res.observables["m2"], en.m2)
    within(res.observables["abs_m"], en.abs_m)
    within(res.observables["energy"], en.energy / target.beta)  # enumeration's energy is β·U/N
    # the sampled spins are Boltzmann distributed too
    s = res.spins.reshape(-1, 4)
    m2_plain = float(((s.mean(1)) ** 2).mean())
    assert abs(m2_plain - en.m2) < 0.03
    assert res.tau["abs_m"] >= 0.5 and res.seconds > 0 and res.evals_per_sample == 4


def test_physical_hmc_is_unbiased(exact_l2):
    target, en = exact_l2
    res = physical_hmc(target, n_chains=64, n_samples=300, n_leapfrog=5, n_warmup=100,
                       generator=torch.Generator().manual_seed(12))
    within(res.observables["m2"], en.m2)
    within(res.observables["energy"], en.energy / target.beta)
    within(res.observables["specific_heat"], en.specific_heat)


def test_independence_sampler_is_unbiased(exact_l2):
    target, en = exact_l2
    flow = fitted_gaussian_flow(target, mlp_scale=0.3)
    res = neural_independence_sampler(flow, target, 6000, generator=torch.Generator().manual_seed(13), batch=2000)
    assert res.n_chains == 4 and res.n_samples == 1500  # 6000 proposals in 4 independent chains
    assert 0.2 < res.acceptance_rate < 1.0
    one = neural_independence_sampler(flow, target, 6000, generator=torch.Generator().manual_seed(13), batch=2000,
                                      n_chains=1)
    assert one.n_chains == 1 and one.n_samples == 6000
    within(one.observables["m2"], en.m2)
    within(res.observables["m2"], en.m2)
    within(res.observables["energy"], en.energy / target.beta)
    assert res.tau["abs_m"] < 20


def test_mixture_in_latent_methods(exact_l2, generator):
    # a SymmetricMixture is a Flow: its noise and latent map are the underlying flow's, and its
    # density (not the flow's) weighs the independence sampler, which stays unbiased
    target, en = exact_l2
    flow = symmetrized_flow(target, init_scale=1.0, seed=2)
    mix = SymmetricMixture(flow, spin_flip_group(target.N))
    noise = frozen_noise(mix, 5, torch.Generator().manual_seed(3))
    assert len(noise) == flow.n_steps
    z = torch.randn(5, target.N, dtype=DT, generator=generator)
    lp_mix, g_mix = latent_log_prob(mix, target, noise)(z)
    lp_flow, g_flow = latent_log_prob(flow, target, frozen_noise(flow, 5, torch.Generator().manual_seed(3)))(z)
    assert torch.equal(lp_mix, lp_flow) and torch.equal(g_mix, g_flow)
    res = latent_hmc(mix, target, n_chains=4, n_samples=5, n_leapfrog=2, n_warmup=4,
                     generator=torch.Generator().manual_seed(4))
    assert res.x.shape == (5, 4, target.N)
    mix_g = SymmetricMixture(fitted_gaussian_flow(target, mlp_scale=0.3), spin_flip_group(target.N))
    res = neural_independence_sampler(mix_g, target, 4000, generator=torch.Generator().manual_seed(13), batch=2000)
    within(res.observables["m2"], en.m2)
    within(res.observables["energy"], en.energy / target.beta)


def test_quiet_integrated_time_is_public():
    from analysis.autocorr import integrated_time

    x = np.random.default_rng(0).normal(size=(200, 3))
    assert quiet_integrated_time(x) == integrated_time(x)


# ---------------------------------------------------------------------- flow estimates
@pytest.mark.parametrize("L, beta", [(2, 0.3), (3, 0.3)])
def test_importance_free_energy_matches_exact(L, beta):
    target = ising(L, beta)
    flow = fitted_gaussian_flow(target, mlp_scale=0.3, seed=L)
    fe = flow_estimates(flow, target, n_samples=8192, batch=4096, generator=torch.Generator().manual_seed(L))
    exact_hs = target.exact_free_energy()
    assert fe.exact["free_energy_hs"] == pytest.approx(exact_hs, abs=1e-12)
    assert fe.ess > 0.1
    within(fe.free_energy_importance, exact_hs)
    # the variational free energy is an upper bound (eq. 7), well above at this ESS
    assert fe.free_energy_variational.value > exact_hs + 2 * fe.free_energy_variational.stderr
    # Ising normalisation: shifted by ln Z_HS − ln Z_Ising per site, same errors
    off = target.log_z_offset / target.N
    assert fe.free_energy_importance_ising.value == pytest.approx(fe.free_energy_importance.value + off, abs=1e-12)
    assert fe.free_energy_importance_ising.stderr == fe.free_energy_importance.stderr
    assert fe.exact["free_energy_ising"] == pytest.approx(-target.exact_log_z_ising() / target.N, abs=1e-12)
    # reweighted observables are exact; plain ones carry the flow's bias
    within(fe.observables_reweighted["energy"], fe.exact["energy"])
    within(fe.observables_reweighted["m2"], fe.exact["m2"])
    assert fe.m.shape == fe.log_weights.shape == (8192,)
    assert fe.spins.shape == (16, L, L)


def test_exact_reference_values():
    target = ising(3, 0.35)
    ex = exact_reference(target)
    en = enumerate_ising(target.couplings())
    assert ex["energy"] == pytest.approx(kaufman_internal_energy(3, 0.35), abs=1e-12)
    assert ex["energy"] == pytest.approx(en.energy / 0.35, abs=1e-10)
    assert ex["specific_heat"] == pytest.approx(kaufman_specific_heat(3, 0.35), abs=1e-12)
    assert ex["specific_heat"] == pytest.approx(en.specific_heat, abs=1e-10)
    assert ex["m2"] == en.m2 and ex["binder"] == en.binder and ex["m"] == 0.0
    assert ex["susceptibility"] == pytest.approx(0.35 * 9 * (en.m2 - en.abs_m**2))
    # no enumeration for N > 16, Kaufman still there
    big = exact_reference(ising(5, 0.35))
    assert "m2" not in big and big["energy"] == pytest.approx(kaufman_internal_energy(5, 0.35))


# ---------------------------------------------------------------------- bookkeeping and bad input
def test_speedup_and_costs(exact_l2):
    target, _ = exact_l2
    flow = mlp_flow(target.N, init_scale=0.1)
    r = latent_hmc(flow, target, n_chains=2, n_samples=10, n_leapfrog=2, n_warmup=0,
                   generator=torch.Generator().manual_seed(0))
    assert isinstance(r, ChainResult) and r.step_size == 0.1
    assert r.seconds_per_sample == pytest.approx(r.seconds / 20)
    assert r.effective_seconds("energy") == pytest.approx(r.tau["energy"] * r.seconds_per_sample)
    assert r.effective_evals("abs_m") == pytest.approx(2 * r.tau["abs_m"])
    assert speedup(r, r) == {"tau": 1.0, "seconds": 1.0, "evals": 1.0}
    with pytest.raises(ValueError, match="name must be one of"):
        r.effective_seconds("magnetisation")
    with pytest.raises(TypeError, match="ChainResult"):
        speedup(r, 3.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_chains=0), "n_chains"),
    (dict(n_samples=1), "n_samples"),
    (dict(n_leapfrog=0), "n_leapfrog"),
    (dict(n_warmup=-1), "n_warmup"),
    (dict(target_accept=1.0), "target_accept"),
    (dict(step_size=-0.1), "step_size"),
    (dict(step_size=math.nan), "step_size"),
])
def test_bad_hmc_settings(kwargs, match):
    target = ising(2, 0.4)
    flow = mlp_flow(4, 0.1)
    with pytest.raises(ValueError, match=match):
        latent_hmc(flow, target, **kwargs)
    with pytest.raises(ValueError, match=match):
        physical_hmc(target, **kwargs)


def test_bad_flow_and_sizes():
    target = ising(3, 0.4)
    with pytest.raises(ValueError, match="flow.dim=4, target.N=9"):
        latent_log_prob(mlp_flow(4, 0.1), target)
    with pytest.raises(TypeError, match="MongeAmpereFlow"):
        latent_log_prob(torch.nn.Linear(9, 9), target)
    flow = mlp_flow(9, 0.1)
    with pytest.raises(ValueError, match="n=1"):
        neural_independence_sampler(flow, target, 1)
    with pytest.raises(ValueError, match="n_samples=1"):
        flow_estimates(flow, target, n_samples=1)
    with pytest.raises(ValueError, match="batch=0"):
        flow_estimates(flow, target, n_samples=10, batch=0)
    with pytest.raises(ValueError, match="lattice"):
        latent_hmc(mlp_flow(2, 0.1), GaussianTarget(torch.eye(2, dtype=DT)), n_samples=5)


def test_hmc_wrapper_matches_from_energy_for_identity(generator):
    # the same function objects plug into analysis.hmc.hmc directly
    target = ising(2, 0.4)
    flow = mlp_flow(4, 0.0)
    x0 = torch.randn(3, 4, dtype=DT, generator=generator)
    a = hmc(latent_log_prob(flow, target), x0, n_samples=5, generator=torch.Generator().manual_seed(1))
    b = hmc(from_energy(target), x0, n_samples=5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=1e-10)


def test_target_side_free_energy_matches_exact(exact_l2):
    # E_p[q(x) e^{E(x)}] = 1/Z for any normalised q: −ln Z from a chain of the target itself
    target, _ = exact_l2
    flow = fitted_gaussian_flow(target, mlp_scale=0.3)
    chain = physical_hmc(target, n_chains=8, n_samples=400, n_leapfrog=5, n_warmup=50,
                         generator=torch.Generator().manual_seed(2))
    est = target_side_free_energy(flow, target, chain, max_samples=2000, generator=torch.Generator().manual_seed(3))
    exact = target.exact_free_energy()
    assert 0 < est.stderr < 0.02
    assert abs(est.value - exact) < 4 * est.stderr

import math

import numpy as np
import pytest
import torch

from analysis.autocorr import mean_with_error
from analysis.hmc import from_energy, hmc, independence_metropolis, with_autograd
from analysis.observables import energy_moments, magnetisation_moments
from latticeflow import ising
from latticeflow.exact import enumerate_ising

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
COV = torch.tensor([[1.0, 1.8], [1.8, 4.0]], dtype=torch.float64)  # correlation 0.9
PREC = torch.linalg.inv(COV)


def gaussian(x):
    d = x - MU
    return -0.5 * ((d @ PREC) * d).sum(-1), -d @ PREC


def chain_mean_and_error(values):
    """Mean over chains of per-chain averages and its error from the spread across chains.

    values: shape (n_samples, C, ...). Independent chains make this error honest without
    an autocorrelation analysis.
    """
    per_chain = values.mean(0)
    C = per_chain.shape[0]
    return per_chain.mean(0), per_chain.std(0) / math.sqrt(C)


def test_correlated_gaussian_mean_and_covariance(generator):
    res = hmc(gaussian, torch.zeros(64, 2, dtype=torch.float64), n_samples=500, n_leapfrog=10,
              step_size=0.1, n_warmup=200, generator=generator)
    x = res.samples
    assert x.shape == (500, 64, 2) and res.log_prob.shape == (500, 64)
    mean, err = chain_mean_and_error(x)
    assert torch.all((mean - MU).abs() < 4 * err), (mean, err)
    d = x - x.mean((0, 1))
    outer = d[..., :, None] * d[..., None, :]  # (n, C, 2, 2)
    cov, cov_err = chain_mean_and_error(outer)
    assert torch.all((cov - COV).abs() < 4 * cov_err + 1e-3), (cov, cov_err)
    torch.testing.assert_close(res.log_prob, gaussian(x.reshape(-1, 2))[0].reshape(500, 64))


@pytest.mark.parametrize("target_accept", [0.65, 0.9])
@pytest.mark.parametrize("step_size", [1e-3, 5.0])
def test_warmup_reaches_target_acceptance(target_accept, step_size, generator):
    res = hmc(gaussian, torch.zeros(64, 2, dtype=torch.float64), n_samples=200, n_leapfrog=10,
              step_size=step_size, n_warmup=200, target_accept=target_accept, generator=generator)
    assert abs(res.acceptance_rate - target_accept) < 0.1
    assert abs(res.mean_accept_prob - target_accept) < 0.1
    assert res.acceptance_per_chain.shape == (64,)


def test_callback_reduction_equals_stored_samples():
    sums = torch.zeros(2, dtype=torch.float64)

    def accumulate(k, x, lp):
        sums.add_(x.sum(0))

    kw = dict(n_samples=50, n_leapfrog=5, step_size=0.3, n_warmup=20)
    kept = hmc(gaussian, torch.zeros(8, 2, dtype=torch.float64), generator=torch.Generator().manual_seed(5), **kw)
    lean = hmc(gaussian, torch.zeros(8, 2, dtype=torch.float64), generator=torch.Generator().manual_seed(5),
               keep_samples=False, callback=accumulate, **kw)
    assert lean.samples is None
    torch.testing.assert_close(sums, kept.samples.sum((0, 1)))
    torch.testing.assert_close(lean.log_prob, kept.log_prob)


def test_with_autograd_matches_analytic_gradient():
    x = torch.randn(5, 2, dtype=torch.float64)
    lp, g = with_autograd(lambda y: gaussian(y)[0])(x)
    lp_ref, g_ref = gaussian(x)
    torch.testing.assert_close(lp, lp_ref)
    torch.testing.assert_close(g, g_ref)


# ---------------------------------------------------------------------- HS Ising end to end
@pytest.mark.parametrize("L, beta", [(2, 0.3), (3, 0.3)])
def test_hs_ising_chain_matches_enumeration(L, beta, generator):
    # HMC on the continuous HS energy, spins recovered with the improved estimator tanh x:
    # ⟨m²⟩, ⟨m⁴⟩ and the Ising energy must equal the enumeration of Z = Σ_s exp(½ sᵀKs)
    target = ising(L, beta)
    ex = enumerate_ising(target.couplings())
    C, n = 128, 400
    x0 = torch.randn(C, target.N, dtype=torch.float64, generator=generator)
    res = hmc(from_energy(target), x0, n_samples=n, n_leapfrog=10, step_size=0.2, n_warmup=150, generator=generator)
    assert 0.55 < res.acceptance_rate < 0.75
    t = torch.tanh(res.samples).reshape(n * C, target.N).numpy()
    mag = magnetisation_moments(t)
    en = energy_moments(t, target.lattice)
    for name, values, exact in [
        ("m2", mag["m2"], ex.m2),
        ("m4", mag["m4"], ex.m4),
        ("energy", beta * en["energy"], ex.energy),  # enumerate's energy is ⟨−½ sᵀKs⟩/N with K = βA
    ]:
        mean, err = chain_mean_and_error(torch.from_numpy(values.reshape(n, C)))
        assert abs(float(mean) - exact) < 4 * float(err), (name, float(mean), float(err), exact)


# ---------------------------------------------------------------------- independence Metropolis
def normal_log_density(x, mean, std):
    return (-0.5 * ((x - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)


def test_independence_exact_proposal_accepts_everything(generator):
    x = torch.randn(1000, 3, dtype=torch.float64, generator=generator)
    log_q = normal_log_density(x, 0.0, 1.0)
    res = independence_metropolis(x, log_q, log_q - 7.3, generator)  # unnormalised target = q·e^{−7.3}
    assert res.acceptance_rate == 1.0
    torch.testing.assert_close(res.samples, x)
    assert torch.equal(res.indices, torch.arange(1000))


def test_independence_wrong_proposal_gives_correct_moments(generator):
    # target N(0, 1); proposals from N(0.5, 1.5²) — the chain must still have mean 0, variance 1
    n = 60_000
    x = 0.5 + 1.5 * torch.randn(n, 1, dtype=torch.float64, generator=generator)
    res = independence_metropolis(x, normal_log_density(x, 0.5, 1.5), -0.5 * (x**2).sum(-1), generator)
    assert 0.3 < res.acceptance_rate < 0.95
    chain = res.samples[:, 0].numpy()
    assert abs(mean_with_error(chain).deviation(0.0)) < 4
    assert abs(mean_with_error(chain**2).deviation(1.0)) < 4
    naive = x[:, 0].numpy()
    assert abs(mean_with_error(naive).deviation(0.0)) > 20  # the proposals alone are biased


def test_independence_handles_zero_weight_start(generator):
    x = torch.arange(4, dtype=torch.float64)[:, None]
    log_target = torch.tensor([-math.inf, 0.0, -math.inf, 0.0], dtype=torch.float64)
    res = independence_metropolis(x, torch.zeros(4, dtype=torch.float64), log_target, generator)
    assert res.indices[1:].tolist()[0] == 1 and 2 not in res.indices.tolist()


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(step_size=0.0), r"step_size must be a finite number > 0, got step_size=0.0"),
        (dict(step_size=float("nan")), r"step_size must be a finite number > 0, got step_size=nan"),
        (dict(n_leapfrog=0), r"n_leapfrog must be an integer >= 1, got n_leapfrog=0"),
        (dict(target_accept=1.0), r"target_accept must lie strictly between 0 and 1, got target_accept=1.0"),
        (dict(target_accept=0), r"target_accept must lie strictly between 0 and 1, got target_accept=0"),
        (dict(n_samples=0), r"n_samples must be an integer >= 1, got n_samples=0"),
        (dict(n_warmup=-1), r"n_warmup must be an integer >= 0, got n_warmup=-1"),
        (dict(jitter=1.0), r"jitter must lie in \[0, 1\), got jitter=1.0"),
    ],
)
def test_hmc_bad_settings(kwargs, match):
    args = dict(n_samples=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        hmc(gaussian, torch.zeros(2, 2, dtype=torch.float64), **args)


def test_hmc_bad_states_and_functions():
    with pytest.raises(ValueError, match=r"x0 must have shape \(C, D\) with C, D >= 1, got shape=\(2,\)"):
        hmc(gaussian, torch.zeros(2, dtype=torch.float64), n_samples=2)
    with pytest.raises(TypeError, match=r"x0 must have a floating dtype"):
        hmc(gaussian, torch.zeros(2, 2, dtype=torch.int64), n_samples=2)
    with pytest.raises(ValueError, match=r"log_prob of shape \(3,\), got shape=\(3, 1\)"):
        hmc(lambda x: (x[:, :1], x), torch.zeros(3, 2), n_samples=2)
    with pytest.raises(ValueError, match=r"finite log_prob and gradient in every chain, got 1 of C=2"):
        hmc(lambda x: (torch.log(x[:, 0]), 1 / x), torch.tensor([[1.0, 1.0], [0.0, 1.0]]), n_samples=2)
    with pytest.raises(TypeError, match=r"from_energy expects an object with energy\(x\) and grad\(x\)"):
        from_energy(object())


def test_independence_bad_input():
    x = torch.zeros(5, 2)
    with pytest.raises(ValueError, match=r"x.shape=\(5, 2\), log_q.shape=\(4,\), log_target.shape=\(5,\)"):
        independence_metropolis(x, torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError, match=r"NaN"):
        independence_metropolis(x, torch.zeros(5), torch.tensor([0.0, float("nan"), 0, 0, 0]))
    with pytest.raises(TypeError, match=r"log_q must be a torch.Tensor, got ndarray"):
        independence_metropolis(x, np.zeros(5), torch.zeros(5))

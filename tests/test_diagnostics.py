"""analysis.diagnostics: split-R̂, the τ rule, importance-weight diagnostics, and chains that run
on until they pass. Known answers: i.i.d. chains, shifted chains, Pareto weights of known tail index."""

import math

import numpy as np
import pytest
import torch

from analysis.diagnostics import (MIN_EFFECTIVE_SAMPLES, PARETO_K_MAX, RHAT_MAX, TAU_LENGTHS, Verdict, chain_verdict,
                                  importance_diagnostics, split_rhat)
from analysis.latent import overdispersed_start, physical_hmc
from latticeflow import ising


def test_split_rhat_of_iid_chains_is_one_and_of_shifted_chains_is_large():
    rng = np.random.default_rng(0)
    iid = rng.normal(size=(2000, 8))
    assert abs(split_rhat(iid) - 1) < 0.005
    shifted = iid + np.arange(8) * 0.3  # chains that sample different places
    assert split_rhat(shifted) > 1.1
    walk = np.cumsum(rng.normal(size=(2000, 1)), 0)  # one drifting chain: its halves disagree
    assert split_rhat(walk) > 1.1
    assert abs(split_rhat(rng.normal(size=(2000, 1))) - 1) < 0.01
    assert math.isnan(split_rhat(np.ones((100, 4))))  # nothing to compare
    with pytest.raises(ValueError, match="shape"):
        split_rhat(np.zeros((2, 3, 4)))


def test_chain_verdict_names_each_failure():
    ok = chain_verdict(1000, {"abs_m": 1.001, "energy": 1.002}, {"abs_m": 5.0, "energy": 3.0})
    assert ok == Verdict(True, "")
    bad = chain_verdict(100, {"abs_m": 1.05, "energy": 1.0}, {"abs_m": 5.0, "energy": 1.0})
    assert not bad.reliable
    assert f"R̂(abs_m) = 1.050 > {RHAT_MAX}" in bad.reason and f"100 < {TAU_LENGTHS}τ(abs_m) = 250" in bad.reason
    assert "energy" not in bad.reason  # 100 >= 50 × 1 and R̂ fine
    assert Verdict.combine(ok, bad, Verdict(False, "x")).reason == bad.reason + "; x"


def test_importance_diagnostics_known_tails():
    rng = np.random.default_rng(1)
    B = 20000
    good = importance_diagnostics(0.3 * rng.normal(size=B))  # log-normal weights: light tail, ESS/B ≈ e^(−0.09)
    assert good.verdict.reliable and good.pareto_k < 0.3
    w = rng.normal(size=B)
    assert good.ess == pytest.approx(np.exp(0.3 * w).sum() ** 2 / np.exp(0.6 * w).sum(), rel=0.05)
    for k in (0.6, 0.9):  # w = U^(−k) has a Pareto tail of index k
        d = importance_diagnostics(-k * np.log(rng.uniform(size=B)))
        assert d.pareto_k == pytest.approx(k, abs=0.12)
        assert not d.verdict.reliable and ("Pareto k̂" in d.verdict.reason) == (k > 0.7)
    assert importance_diagnostics(np.zeros(200)).verdict.reliable  # equal weights: a perfect proposal
    few = importance_diagnostics(np.zeros(20))
    assert not few.verdict.reliable and f"Kish ESS 20 < {MIN_EFFECTIVE_SAMPLES:.0f}" in few.verdict.reason
    assert not importance_diagnostics([0.0, math.inf, 1.0]).verdict.reliable
    wide = importance_diagnostics(1.0 * rng.normal(size=B))  # log-normal σ=1: light tail but ESS/B ≈ e^(−1)
    assert wide.pareto_k < 0.7 and wide.ess / B == pytest.approx(math.exp(-1), rel=0.1)
    assert not wide.verdict.reliable and "Kish ESS/B" in wide.verdict.reason
    assert wide.tail.reliable  # the tail rules alone (a sweep's): k̂ and Kish ESS ≥ 100 hold
    assert not few.tail.reliable and "Kish ESS" in few.tail.reason


def test_influence_verdict_reads_the_tail_of_an_estimates_contributions():
    """|ψ| with a Pareto tail of index k (U^(−k) times a random sign): k̂ recovers k and the verdict
    follows pareto_k_max(B); a Gaussian ψ (a light tail) is reliable; too few values cannot be judged."""
    from analysis.diagnostics import influence_verdict, pareto_k_max

    rng = np.random.default_rng(5)
    B = 20000
    assert pareto_k_max(B) == PARETO_K_MAX and pareto_k_max(100) == pytest.approx(0.5)
    k, v = influence_verdict(rng.normal(size=B))
    assert v.reliable and k < 0.3
    for true_k in (0.3, 0.9):
        psi = rng.choice([-1.0, 1.0], size=B) * rng.uniform(size=B) ** (-true_k)
        k, v = influence_verdict(psi)
        assert k == pytest.approx(true_k, abs=0.12)
        assert v.reliable == (true_k < PARETO_K_MAX) and ("heavy-tailed" in v.reason) == (true_k > PARETO_K_MAX)
    k, v = influence_verdict(np.ones(50))  # equal contributions: no tail at all
    assert k == -math.inf and v.reliable
    k, v = influence_verdict(rng.normal(size=20))  # fewer than 25 values: no tail fit
    assert math.isnan(k) and not v.reliable
    assert not influence_verdict([1.0, math.nan, 2.0])[1].reliable


def test_overdispersed_start_spans_both_ordered_states():
    target = ising(3, 0.3)
    x0 = overdispersed_start(target, 8, torch.Generator().manual_seed(0))
    M = torch.as_tensor(target.couplings()) + target.alpha * torch.eye(9, dtype=torch.float64)
    torch.testing.assert_close(x0[0], M.sum(0))  # all spins up: M·1
    torch.testing.assert_close(x0[1], -M.sum(0))
    s = torch.linalg.solve(M, x0[2:].T).T  # the others: M s with s = ±1
    torch.testing.assert_close(s.abs(), torch.ones_like(s))


def test_physical_hmc_runs_on_until_converged():
    target = ising(3, 0.4)
    kw = dict(n_chains=8, n_samples=200, n_leapfrog=4, n_warmup=20)
    once = physical_hmc(target, generator=torch.Generator().manual_seed(0), **kw)
    assert once.burn_in == 0 and once.n_samples == 200
    assert not once.verdict.reliable  # 200 samples are fewer than 50τ
    more = physical_hmc(target, generator=torch.Generator().manual_seed(0), max_seconds=60, **kw)
    assert more.verdict.reliable, more.verdict.reason
    assert more.burn_in == more.n_samples >= 200 * 2  # doubled at least once; the first half is burn-in
    assert more.n_samples >= TAU_LENGTHS * max(more.tau["abs_m"], more.tau["energy"])
    assert max(more.rhat["abs_m"], more.rhat["energy"]) <= RHAT_MAX

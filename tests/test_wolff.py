import numpy as np
import pytest

from analysis.wolff import ALGORITHMS, cluster_chain
from latticeflow import SquareLattice
from latticeflow.exact import CRITICAL_BETA, enumerate_ising, kaufman_internal_energy


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("L, beta", [(4, 0.4), (2, 0.3)])
def test_matches_enumeration(algorithm, L, beta):
    # L=2 checks that the doubled bonds of the small torus are two chances to bond
    ex = enumerate_ising(beta * SquareLattice(L).adjacency())
    run = cluster_chain(L, beta, n_sweeps=4000, n_thermalize=200, seed=0, algorithm=algorithm, n_chains=16)
    assert run.m.shape == run.energy.shape == (4000, 16)
    exact = {"energy": ex.energy / beta, "m2": ex.m2, "abs_m": ex.abs_m, "m4": ex.m4}
    for name, value in exact.items():
        est = run.estimate(name)  # error bar from the integrated autocorrelation time
        assert abs(est.deviation(value)) < 4, (name, est, value)
    obs = run.observables()  # derived observables with time-block jackknife errors
    assert abs(obs["binder"].deviation(1 - ex.m4 / (3 * ex.m2**2))) < 4
    assert abs(obs["specific_heat"].deviation(L * L * (ex.energy_sq - ex.energy**2))) < 4
    # cluster-size estimator: E[Σ_c |c|²]/N = N⟨m²⟩ for FK clusters (SW) and for the Wolff cluster
    assert run.mean_cluster_size / run.N == pytest.approx(ex.m2, rel=0.02)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_l16_critical_energy_matches_kaufman(algorithm):
    exact = kaufman_internal_energy(16, CRITICAL_BETA)
    run = cluster_chain(16, CRITICAL_BETA, n_sweeps=1500, n_thermalize=100, seed=1, algorithm=algorithm, n_chains=16)
    est = run.estimate("energy")
    assert est.stderr < 5e-3
    assert abs(est.deviation(exact)) < 4, (est, exact)
    # critical slowing down is mild for cluster updates: τ of the energy stays of order a few updates
    assert run.integrated_time("energy") < 15


def test_reproducible_and_ordered_start():
    a = cluster_chain(4, 0.3, n_sweeps=50, n_thermalize=0, seed=3)
    b = cluster_chain(4, 0.3, n_sweeps=50, n_thermalize=0, seed=3)
    np.testing.assert_array_equal(a.m, b.m)
    # deep in the ordered phase every chain sits at |m| ≈ 1 and e ≈ −2
    cold = cluster_chain(8, 2.0, n_sweeps=20, n_thermalize=20, seed=4, algorithm="wolff")
    assert np.all(cold.abs_m > 0.95) and np.all(cold.energy < -1.9)
    assert np.all(np.abs(cold.m) <= 1) and cold.final_spins.shape == (16, 64)


def test_bad_arguments():
    valid = r"algorithm must be one of 'swendsen-wang', 'wolff'; got algorithm='metropolis'"
    with pytest.raises(ValueError, match=valid):
        cluster_chain(4, 0.4, 10, algorithm="metropolis")
    with pytest.raises(ValueError, match=r"L must be an integer >= 2, got L=1"):
        cluster_chain(1, 0.4, 10)
    with pytest.raises(ValueError, match=r"beta must be a finite number > 0, got beta=0"):
        cluster_chain(4, 0, 10)
    with pytest.raises(ValueError, match=r"n_sweeps must be an integer >= 1, got n_sweeps=0"):
        cluster_chain(4, 0.4, 0)
    with pytest.raises(ValueError, match=r"name must be one of"):
        cluster_chain(4, 0.4, 10).series("susceptibility")

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from analysis.observables import energy_moments, influences, magnetisation_moments, measure, moments_of, summarize
from latticeflow import SquareLattice
from latticeflow.exact import enumerate_ising


def all_states(N: int) -> np.ndarray:
    """All 2^N spin configurations, shape (2^N, N), float64."""
    return np.array(list(itertools.product([-1.0, 1.0], repeat=N)))


# ---------------------------------------------------------------------- improved estimators
@pytest.mark.parametrize("L, boundary", [(2, "periodic"), (3, "periodic"), (3, "open")])
def test_conditional_moments_equal_brute_force(L, boundary):
    # independent spins with means t: average over all 2^N configurations with weights
    # Π (1 + s_i t_i)/2; L=2 exercises the doubled bonds of the small torus
    lat = SquareLattice(L, boundary)
    N, b, J = lat.N, lat.bonds.numpy(), 1.3
    rng = np.random.default_rng(0)
    t = rng.uniform(-1, 1, size=(4, N))
    t[0, 0], t[1, 1], t[2] = 1.0, 0.0, np.sign(t[2])  # an exact spin, a zero, a plain configuration
    S = all_states(N)
    m = S.sum(1) / N
    e = -J * (S[:, b[:, 0]] * S[:, b[:, 1]]).sum(1) / N
    mag = magnetisation_moments(t)
    en = energy_moments(t, lat, J=J)
    for k, row in enumerate(t):
        p = np.prod((1 + S * row) / 2, axis=1)
        np.testing.assert_allclose(
            [mag["m"][k], mag["abs_m"][k], mag["m2"][k], mag["m4"][k], en["energy"][k], en["energy_sq"][k]],
            [p @ m, p @ np.abs(m), p @ m**2, p @ m**4, p @ e, p @ e**2],
            rtol=0,
            atol=1e-13,
        )


def test_improved_m2_keeps_the_diagonal():
    # t = 0 (x = 0): E[m²] = 1/N from s_i² = 1, not the naive (Σt)²/N² = 0;
    # E[m⁴] = (3N² − 2N)/N⁴; E|Σs| is the mean of |2k − N| with k ~ Bin(N, ½)
    N = 16
    mag = magnetisation_moments(np.zeros((1, N)))
    k = np.arange(N + 1)
    assert mag["m2"][0] == pytest.approx(1 / N, abs=1e-15)
    assert mag["m4"][0] == pytest.approx((3 * N**2 - 2 * N) / N**4, abs=1e-15)
    assert mag["abs_m"][0] == pytest.approx(binom.pmf(k, N, 0.5) @ np.abs(2 * k - N) / N, abs=1e-14)
    assert energy_moments(np.zeros((1, N)), SquareLattice(4))["energy_sq"][0] == pytest.approx(2 * N / N**2)


# ---------------------------------------------------------------------- closed forms
def test_all_up_and_checkerboard():
    lat = SquareLattice(4)
    up = measure(np.ones((3, 16)), lat, beta=0.4, J=1.5)
    assert up["m"].value == up["abs_m"].value == up["m2"].value == up["m4"].value == 1.0
    assert up["energy"].value == -3.0  # −J·(2N bonds)/N
    assert up["binder"].value == pytest.approx(2 / 3)
    assert up["susceptibility"].value == 0.0 and up["specific_heat"].value == 0.0
    assert up["susceptibility_m2"].value == pytest.approx(0.4 * 16)
    assert all(v.stderr < 1e-12 for v in up.values())
    r, c = np.divmod(np.arange(16), 4)
    checker = np.where((r + c) % 2 == 0, 1.0, -1.0)[None, :].repeat(2, 0)
    ch = measure(torch.from_numpy(checker), lat)
    assert ch["energy"].value == 2.0 and ch["m"].value == 0.0 and ch["m2"].value == 0.0
    assert "susceptibility" not in ch and "specific_heat" not in ch  # no beta given


def test_l2_torus_counts_double_bonds():
    lat = SquareLattice(2)
    assert measure(np.ones((2, 4)), lat)["energy"].value == -2.0


# ---------------------------------------------------------------------- against enumeration at L = 4
def exact_observables(L: int, beta: float) -> dict[str, float]:
    lat = SquareLattice(L)
    ex = enumerate_ising(beta * lat.adjacency())
    N = lat.N
    return {
        "m": 0.0,
        "abs_m": ex.abs_m,
        "m2": ex.m2,
        "m4": ex.m4,
        "energy": ex.energy / beta,  # enumerate_ising's energy carries the β of K = βA
        "energy_sq": ex.energy_sq / beta**2,
        "binder": 1 - ex.m4 / (3 * ex.m2**2),
        "susceptibility": beta * N * (ex.m2 - ex.abs_m**2),
        "susceptibility_m2": beta * N * ex.m2,
        "specific_heat": N * (ex.energy_sq - ex.energy**2),
    }


def boltzmann_samples(L: int, beta: float, B: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact i.i.d. samples of e^{−βH} by enumeration; returns (spins (B, N), H (B,))."""
    lat = SquareLattice(L)
    b = lat.bonds.numpy()
    S = all_states(lat.N)
    H = -(S[:, b[:, 0]] * S[:, b[:, 1]]).sum(1)
    logw = -beta * H
    p = np.exp(logw - logw.max())
    idx = np.random.default_rng(seed).choice(len(S), size=B, p=p / p.sum())
    return S[idx], H[idx]


@pytest.fixture(scope="module")
def exact_l4():
    return exact_observables(4, 0.4)


def test_exact_samples_match_enumeration(exact_l4):
    spins, _ = boltzmann_samples(4, 0.4, 20_000, seed=1)
    obs = measure(spins, SquareLattice(4), beta=0.4)
    assert set(obs) == set(exact_l4)
    for name, value in exact_l4.items():
        assert abs(obs[name].deviation(value)) < 4, (name, obs[name], value)


def test_reweighted_samples_match_enumeration(exact_l4):
    # draw at β' = 0.35 and reweight to β = 0.4 with ln w = −(β − β') H
    spins, H = boltzmann_samples(4, 0.35, 40_000, seed=2)
    obs = measure(spins, SquareLattice(4), beta=0.4, log_weights=-(0.4 - 0.35) * H)
    for name, value in exact_l4.items():
        assert abs(obs[name].deviation(value)) < 4, (name, obs[name], value)
    plain = measure(spins, SquareLattice(4), beta=0.4)
    assert plain["energy"].value > exact_l4["energy"] + 5 * plain["energy"].stderr  # β' samples are hotter


def test_jackknife_error_of_a_mean_is_the_standard_error():
    spins, _ = boltzmann_samples(4, 0.4, 20_000, seed=3)
    e = energy_moments(spins, SquareLattice(4))["energy"]
    est = summarize({"energy": e}, 16, n_blocks=200)["energy"]
    assert est.value == pytest.approx(e.mean(), rel=1e-12)
    assert est.stderr == pytest.approx(e.std(ddof=1) / math.sqrt(e.size), rel=0.15)


# ---------------------------------------------------------------------- bad input
def test_bad_input():
    lat = SquareLattice(4)
    with pytest.raises(ValueError, match=r"max \|s\| = 2.5; pass tanh\(x\)"):
        measure(np.full((2, 16), 2.5), lat)
    with pytest.raises(ValueError, match=r"shape \(B, N\) with B, N >= 1, got shape=\(2, 2, 4\)"):
        measure(np.ones((2, 2, 4)), lat)
    with pytest.raises(ValueError, match=r"spins have N=9 sites but the lattice has N=16"):
        measure(np.ones((2, 9)), lat)
    with pytest.raises(ValueError, match=r"finite, got 1 NaN"):
        magnetisation_moments(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match=r"bond endpoints must lie in \[0, N=4\)"):
        energy_moments(np.ones((1, 4)), np.array([[0, 4]]))
    with pytest.raises(ValueError, match=r"log_weights must have shape \(B,\)=\(3,\)"):
        measure(np.ones((3, 16)), lat, log_weights=np.zeros(2))
    with pytest.raises(ValueError, match=r"one common shape"):
        summarize({"m": np.zeros(3), "m2": np.zeros(4)}, 16)
    with pytest.raises(ValueError, match=r"moments keys must be among"):
        summarize({"magnetisation": np.zeros(3)}, 16)
    with pytest.raises(ValueError, match=r"beta must be a finite number > 0 or None, got beta=-1"):
        measure(np.ones((3, 16)), lat, beta=-1)
    with pytest.raises(ValueError, match=r"at least 2 samples"):
        measure(np.ones((1, 16)), lat)


# ---------------------------------------------------------------------- per-sample contributions
def test_influences_are_the_leave_one_out_differences_behind_the_jackknife():
    """ψ_b = (B − 1)(θ − θ_(−b)): for a weighted mean exactly (B − 1) w_b (O_b − θ)/(W − w_b), and for
    every derived quantity the single-sample jackknife's variance is Σ(ψ − ψ̄)²/(B(B − 1))."""
    rng = np.random.default_rng(3)
    B, L = 500, 3
    t = np.tanh(rng.normal(0.3, 1.0, size=(B, L * L)))
    lw = rng.normal(size=B)
    moments = moments_of(t, SquareLattice(L), J=1.0)
    psi = influences(moments, L * L, beta=0.4, log_weights=lw)
    w = np.exp(lw - lw.max())
    e = moments["energy"]
    theta = np.sum(w * e) / w.sum()
    np.testing.assert_allclose(psi["energy"], (B - 1) * w * (e - theta) / (w.sum() - w), rtol=1e-9, atol=1e-12)
    one_out = summarize(moments, L * L, beta=0.4, log_weights=lw, n_blocks=B)
    for name in ("specific_heat", "binder", "susceptibility", "abs_m"):
        p = psi[name]
        assert one_out[name].stderr == pytest.approx(math.sqrt(np.sum((p - p.mean()) ** 2) / (B * (B - 1))),
                                                     rel=1e-9), name
    assert set(psi) == set(one_out)

import math

import numpy as np
import pytest
import torch

from analysis.free_energy import (
    Estimate,
    effective_sample_size,
    importance_free_energy,
    log_weights,
    variational_free_energy,
)

# Target e^{−E}, E(x) = |x|²/(2 s²) in D dims: Z = (2π s²)^{D/2}.
# Proposal q = N(0, r² I). Closed forms:
#   KL(q‖p)        = D/2 [r²/s² − 1 − ln(r²/s²)]
#   ESS/B → 1/E_q[(p/q)²] = (s/r · √(2 − s²/r²))^D   (finite for r² > s²/2)
D, S, R = 4, 1.3, 1.5


def log_z(s=S, d=D):
    return 0.5 * d * math.log(2 * math.pi * s**2)


def kl(r=R, s=S, d=D):
    u = r**2 / s**2
    return 0.5 * d * (u - 1 - math.log(u))


def gaussian_samples(B, r=R, seed=0):
    rng = np.random.default_rng(seed)
    x = r * rng.normal(size=(B, D))
    logp = -0.5 * (x**2).sum(1) / r**2 - 0.5 * D * math.log(2 * math.pi * r**2)
    energy = 0.5 * (x**2).sum(1) / S**2
    return logp, energy


def test_variational_is_free_energy_plus_kl():
    logp, energy = gaussian_samples(200_000)
    est = variational_free_energy(logp, energy)
    exact = -log_z() + kl()
    assert abs(est.deviation(exact)) < 4
    assert est.value > -log_z() + 10 * est.stderr  # the bound is strict here (KL ≈ 0.12)


def test_importance_recovers_free_energy():
    logp, energy = gaussian_samples(200_000, seed=1)
    est = importance_free_energy(logp, energy)
    assert abs(est.deviation(-log_z())) < 4
    assert est.stderr < 2e-3


def test_importance_error_is_calibrated():
    z = []
    for seed in range(60):
        logp, energy = gaussian_samples(2_000, seed=100 + seed)
        z.append(importance_free_energy(logp, energy, n_blocks=50).deviation(-log_z()))
    z = np.abs(z)
    assert 0.85 <= np.mean(z < 2) and np.max(z) < 5


def test_ess_closed_form():
    logp, energy = gaussian_samples(400_000, seed=2)
    exact = (S / R * math.sqrt(2 - S**2 / R**2)) ** D
    assert effective_sample_size(log_weights(logp, energy)) == pytest.approx(exact, abs=0.01)


def test_exact_proposal_has_zero_variance():
    logp, energy = gaussian_samples(10_000, r=S, seed=3)  # q = p exactly
    var = variational_free_energy(logp, energy)
    imp = importance_free_energy(logp, energy)
    assert var.value == pytest.approx(-log_z(), abs=1e-12) and var.stderr < 1e-12
    assert imp.value == pytest.approx(-log_z(), abs=1e-12) and imp.stderr < 1e-12
    assert effective_sample_size(log_weights(logp, energy)) == pytest.approx(1.0, abs=1e-12)


def test_importance_is_stable_for_huge_weights():
    # log weights around −1e4: a naive exp underflows to 0 and −ln 0 = inf
    logp, energy = gaussian_samples(1_000, seed=4)
    est = importance_free_energy(logp, energy + 1e4)
    ref = importance_free_energy(logp, energy)
    assert est.value == pytest.approx(ref.value + 1e4, rel=1e-12)
    assert est.stderr == pytest.approx(ref.stderr, rel=1e-6)


def test_ess_extremes():
    # equal weights: 1 up to one rounding (the shared latticeflow.stats.kish_ess, also used by
    # training, divides e^{ln B} by B; the former numpy copy happened to give exactly 1 here)
    for B in (1, 2, 7, 1000, 4096):
        assert 1.0 - 1e-14 <= effective_sample_size(np.zeros(B)) <= 1.0
    lw = np.array([0.0, -np.inf, -np.inf, -np.inf])  # one sample carries all the weight
    assert effective_sample_size(lw) == pytest.approx(0.25)


def test_torch_input():
    logp, energy = gaussian_samples(1_000, seed=5)
    a = variational_free_energy(torch.from_numpy(logp).float(), torch.from_numpy(energy))
    b = variational_free_energy(logp.astype(np.float32).astype(np.float64), energy)
    assert a.value == pytest.approx(b.value, rel=1e-12)


@pytest.mark.parametrize(
    "value, stderr, text",
    [
        (-2.315921, 4e-5, "-2.31592(4)"),
        (1.23456, 0.0014, "1.2346(14)"),
        (0.5, 0.26, "0.5(3)"),
        (12345.6, 37.0, "12350(40)"),
        (3.0, 0.0, "3(0)"),
    ],
)
def test_estimate_str(value, stderr, text):
    assert str(Estimate(value, stderr)) == text


def test_estimate_helpers():
    est = Estimate(-37.0, 0.32)
    assert est.per_site(16) == Estimate(-37.0 / 16, 0.02)
    assert est.deviation(-37.64) == pytest.approx(2.0)
    assert Estimate(1.0, 0.0).deviation(1.0) == 0.0
    with pytest.raises(ValueError, match="N must be a positive integer, got N=0"):
        est.per_site(0)


def test_bad_input():
    with pytest.raises(ValueError, match=r"logp.shape=\(3,\), energy.shape=\(4,\)"):
        variational_free_energy(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match=r"logp.shape=\(2, 3\)"):
        variational_free_energy(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"at least one sample, got shape=\(0,\)"):
        variational_free_energy(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match=r"energy must be finite, got 1 NaN/inf entries out of shape=\(3,\)"):
        importance_free_energy(np.zeros(3), np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match=r"n_blocks must be an integer in \[2, B=3\], got n_blocks=5"):
        importance_free_energy(np.zeros(3), np.zeros(3), n_blocks=5)
    with pytest.raises(ValueError, match=r"at least 2 samples"):
        importance_free_energy(np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match=r"log_w must be a non-empty 1-D array"):
        effective_sample_size(np.zeros(0))
    with pytest.raises(ValueError, match=r"NaN or \+inf"):
        effective_sample_size(np.array([0.0, np.inf]))

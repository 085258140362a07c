"""Tests for latticeflow.exact: Kaufman, Onsager, enumeration and transfer matrix, in float64.

Every exact route is checked against an independent one: Kaufman's closed form against
brute-force enumeration and the transfer matrix, autograd derivatives against finite
differences and enumerated fluctuations, Kaufman at large L against Onsager (plus the
conformal finite-size constant at β_c), Yang's magnetization against the low-temperature
series, and enumeration itself against a plain Python loop.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch
from scipy import integrate

from latticeflow.exact import (
    CRITICAL_BETA,
    EnumerationResult,
    enumerate_ising,
    enumerate_log_z,
    kaufman_free_energy,
    kaufman_internal_energy,
    kaufman_log_z,
    kaufman_log_z_torch,
    kaufman_specific_heat,
    onsager_internal_energy,
    onsager_log_z,
    onsager_magnetization,
    transfer_matrix_log_z,
)

BETAS = [0.1, 0.3, CRITICAL_BETA, 0.6, 1.5]  # both sides of β_c, and β_c itself


# ---------------------------------------------------------------------------------------------
# Helpers: the lattice module is written elsewhere, so the adjacency is built here.
# ---------------------------------------------------------------------------------------------


def adjacency(L: int, periodic: bool = True) -> np.ndarray:
    """Adjacency with multiplicity of the L×L lattice, site i = row·L + col.

    Each site contributes its right and down bond (2N bonds on the torus). On the periodic
    L = 2 torus the right and left neighbours coincide, so A_ij = 2.
    """
    n = L * L
    a = np.zeros((n, n))
    for r in range(L):
        for c in range(L):
            for dr, dc in ((0, 1), (1, 0)):
                rr, cc = r + dr, c + dc
                if not periodic and (rr >= L or cc >= L):
                    continue
                i, j = r * L + c, (rr % L) * L + cc % L
                a[i, j] += 1
                a[j, i] += 1
    return a


def assert_close(a: float, b: float, tol: float) -> None:
    assert abs(a - b) <= tol, f"{a!r} vs {b!r}: |diff| = {abs(a - b):.3g} > {tol:.3g}"


def cft_constant() -> float:
    """ln[(θ₂ + θ₃ + θ₄)/(2η)] at τ = i (nome q = e^{−π}): the O(1) term of ln Z at β_c on the
    square torus (critical Ising partition function, Ferdinand & Fisher 1969; Di Francesco et al.)."""
    q = math.exp(-math.pi)
    theta2 = 2.0 * sum(q ** ((n + 0.5) ** 2) for n in range(10))
    theta3 = 1.0 + 2.0 * sum(q ** (n * n) for n in range(1, 10))
    theta4 = 1.0 + 2.0 * sum((-1) ** n * q ** (n * n) for n in range(1, 10))
    eta = q ** (1.0 / 12.0) * math.prod(1.0 - q ** (2 * n) for n in range(1, 30))
    return math.log((theta2 + theta3 + theta4) / (2.0 * eta))


# ---------------------------------------------------------------------------------------------
# Constants and Kaufman's closed form
# ---------------------------------------------------------------------------------------------


def test_critical_beta_is_self_dual_point():
    assert_close(math.sinh(2.0 * CRITICAL_BETA), 1.0, 1e-15)
    assert_close(CRITICAL_BETA, 0.44068679350977147, 1e-16)


@pytest.mark.parametrize("beta", [0.05, 0.5, CRITICAL_BETA, 2.0])
def test_kaufman_l2_closed_form(beta):
    # 2×2 torus: 4 distinct pairs, each joined by 2 bonds (8 bonds). All equal (2 states)
    # weigh e^{8K}; one or three spins flipped (8) and an adjacent pair flipped (4) weigh 1;
    # a diagonal pair flipped (2) weighs e^{-8K}: Z = 2e^{8K} + 12 + 2e^{-8K}.
    K = beta
    expected = math.log(2.0 * math.exp(8.0 * K) + 12.0 + 2.0 * math.exp(-8.0 * K))
    assert_close(kaufman_log_z(2, beta), expected, 1e-13)
    assert_close(transfer_matrix_log_z(2, beta), expected, 1e-13)
    assert_close(enumerate_log_z(beta * adjacency(2)), expected, 1e-13)


@pytest.mark.parametrize("L", [2, 3, 4])
@pytest.mark.parametrize("beta", BETAS)
def test_kaufman_matches_enumeration(L, beta):
    exact = enumerate_log_z(beta * adjacency(L))
    assert_close(kaufman_log_z(L, beta), exact, 1e-13 * max(1.0, abs(exact)))


@pytest.mark.parametrize(("L", "beta", "J"), [(3, 0.5, 0.7), (4, 0.3, 2.5), (4, 2.0, 0.4)])
def test_kaufman_with_coupling_j(L, beta, J):
    exact = enumerate_log_z(beta * J * adjacency(L))
    assert_close(kaufman_log_z(L, beta, J), exact, 1e-13 * abs(exact))
    # Only the product βJ enters.
    assert_close(kaufman_log_z(L, beta, J), kaufman_log_z(L, beta * J), 1e-13 * abs(exact))


@pytest.mark.parametrize("L", [2, 5, 64, 512])
@pytest.mark.parametrize("beta", [0.01, 0.3, CRITICAL_BETA, 0.6, 5.0])
def test_torch_matches_numpy(L, beta):
    ref = kaufman_log_z(L, beta)
    value = kaufman_log_z_torch(L, beta)
    assert value.dtype == torch.float64 and value.shape == ()
    assert_close(float(value), ref, 1e-13 * abs(ref))


def test_kaufman_free_energy_is_minus_log_z_per_site():
    assert_close(kaufman_free_energy(6, 0.4), -kaufman_log_z(6, 0.4) / 36, 1e-15)


# ---------------------------------------------------------------------------------------------
# Transfer matrix
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [3, 4, 5, 6, 7, 8, 10])
@pytest.mark.parametrize("beta", [0.2, CRITICAL_BETA, 0.9])
def test_transfer_periodic_matches_kaufman(L, beta):
    ref = kaufman_log_z(L, beta)
    assert_close(transfer_matrix_log_z(L, beta), ref, 1e-13 * abs(ref))


def test_transfer_periodic_with_j():
    assert_close(transfer_matrix_log_z(5, 0.2, J=3.0), kaufman_log_z(5, 0.6), 1e-13 * kaufman_log_z(5, 0.6))


@pytest.mark.slow
def test_transfer_periodic_largest_size():
    # L = 12: 4096 × 4096 dense matrices, three normalised squarings (~5-8 s on 2 cores).
    ref = kaufman_log_z(12, CRITICAL_BETA)
    assert_close(transfer_matrix_log_z(12, CRITICAL_BETA), ref, 1e-13 * ref)


@pytest.mark.parametrize("L", [2, 3, 4])
@pytest.mark.parametrize("beta", [0.1, CRITICAL_BETA, 0.6, 1.5])
def test_transfer_open_matches_enumeration(L, beta):
    exact = enumerate_log_z(beta * adjacency(L, periodic=False))
    assert_close(transfer_matrix_log_z(L, beta, boundary="open"), exact, 1e-13 * max(1.0, abs(exact)))


def test_transfer_open_with_j_and_large_beta():
    # Large βJ: entries of T span e^{±100}; the per-step renormalisation must keep this finite.
    exact = enumerate_log_z(25.0 * 2.0 * adjacency(4, periodic=False))
    value = transfer_matrix_log_z(4, 25.0, J=2.0, boundary="open")
    assert_close(value, exact, 1e-13 * exact)
    # Ground states dominate: 2 configurations with all 2L(L−1) = 24 bonds satisfied.
    assert_close(value, 50.0 * 24 + math.log(2.0), 1e-9)


# ---------------------------------------------------------------------------------------------
# Derivatives: internal energy and specific heat
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [4, 16])
@pytest.mark.parametrize("beta", [0.3, CRITICAL_BETA, 0.7])
def test_autograd_matches_finite_differences(L, beta):
    n = L * L
    h1, h2 = 1e-5, 1e-4
    d1 = (kaufman_log_z(L, beta + h1) - kaufman_log_z(L, beta - h1)) / (2 * h1)
    d2 = (kaufman_log_z(L, beta + h2) - 2 * kaufman_log_z(L, beta) + kaufman_log_z(L, beta - h2)) / h2**2
    assert_close(kaufman_internal_energy(L, beta), -d1 / n, 1e-8)
    assert_close(kaufman_specific_heat(L, beta), beta**2 * d2 / n, 1e-5)


@pytest.mark.parametrize("L", [2, 3, 4])
@pytest.mark.parametrize(("beta", "J"), [(0.3, 1.0), (CRITICAL_BETA, 1.0), (0.6, 1.0), (0.25, 2.0)])
def test_autograd_matches_enumerated_fluctuations(L, beta, J):
    res = enumerate_ising(beta * J * adjacency(L))
    n = L * L
    # energy = ⟨−½sᵀKs⟩/N = β U/N;  C/N = β² Var(E)/N = N (energy_sq − energy²).
    assert_close(kaufman_internal_energy(L, beta, J), res.energy / beta, 1e-12)
    c_enum = n * (res.energy_sq - res.energy**2)
    assert_close(res.specific_heat, c_enum, 1e-15)
    assert_close(kaufman_specific_heat(L, beta, J), c_enum, 1e-10)


def test_derivatives_smooth_through_critical_point():
    # γ_0 changes sign at β_c; a wrong branch (|γ_0|, log|sinh|) would put a kink or NaN here.
    L = 64
    for f in (kaufman_internal_energy, kaufman_specific_heat):
        at = f(L, CRITICAL_BETA)
        below, above = f(L, CRITICAL_BETA - 1e-9), f(L, CRITICAL_BETA + 1e-9)
        assert math.isfinite(at)
        assert_close(at, 0.5 * (below + above), 1e-7)


def test_ground_state_limits():
    assert_close(kaufman_internal_energy(16, 5.0), -2.0, 1e-12)
    # Up to the documented limit βJ = 150 the derivatives stay exact (the ground state).
    assert_close(kaufman_internal_energy(8, 150.0), -2.0, 1e-12)
    assert abs(kaufman_specific_heat(8, 150.0)) < 1e-10
    assert_close(kaufman_internal_energy(16, 10.0, J=0.5), -1.0, 1e-12)
    assert 0.0 <= kaufman_specific_heat(16, 5.0) < 1e-10
    # ln Z → ln 2 + 2N K: two ground states, 2N satisfied bonds.
    assert_close(kaufman_log_z(16, 5.0), math.log(2.0) + 2 * 256 * 5.0, 1e-9)
    # High-temperature series with t = tanh K (closed loops on the square lattice):
    # ln Z/N = ln 2 + 2 ln cosh K + t⁴ + 2t⁶ + (9/2)t⁸ + ...; at K = 0.01 the t⁸ term is 5e-16.
    K = 0.01
    t = math.tanh(K)
    series = math.log(2.0) + 2 * math.log(math.cosh(K)) + t**4 + 2 * t**6
    assert_close(kaufman_log_z(16, K) / 256, series, 1e-15)
    assert_close(onsager_log_z(K), series, 1e-15)


# ---------------------------------------------------------------------------------------------
# Onsager
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.3, 0.7])
def test_onsager_matches_double_integral(beta):
    s, c2 = math.sinh(2 * beta), math.cosh(2 * beta) ** 2
    value, _ = integrate.dblquad(
        lambda t2, t1: math.log(c2 - s * (math.cos(t1) + math.cos(t2))),
        0.0, 2 * math.pi, 0.0, 2 * math.pi, epsabs=1e-12, epsrel=1e-12,
    )  # fmt: skip
    assert_close(onsager_log_z(beta), math.log(2.0) + value / (8 * math.pi**2), 1e-10)


@pytest.mark.parametrize("beta", [0.05, 0.3, CRITICAL_BETA, CRITICAL_BETA * (1 + 1e-7), 0.6, 3.0])
def test_onsager_matches_elliptic_form(beta):
    # Onsager's one-dimensional form: ln(2 cosh 2K) + (1/π)∫₀^{π/2} ln[½(1 + √(1 − k² sin² φ))] dφ,
    # with 1 − k² sin² φ = cos² φ + (1 − k²) sin² φ.
    s, c2 = math.sinh(2 * beta), math.cosh(2 * beta) ** 2
    p = (1 - s * s) ** 2 / (c2 * c2)
    value, _ = integrate.quad(
        lambda phi: math.log(0.5 * (1 + math.sqrt(math.cos(phi) ** 2 + p * math.sin(phi) ** 2))),
        0.0, math.pi / 2, points=[math.pi / 2 - math.sqrt(p)] if 0 < p < 1 else None, epsabs=1e-13, limit=200,
    )  # fmt: skip
    assert_close(onsager_log_z(beta), math.log(2 * math.cosh(2 * beta)) + value / math.pi, 1e-11)


@pytest.mark.parametrize("beta", [0.2, 0.4, 0.5, 0.9])
def test_onsager_energy_is_derivative_of_log_z(beta):
    h = 1e-5
    d1 = (onsager_log_z(beta + h) - onsager_log_z(beta - h)) / (2 * h)
    assert_close(onsager_internal_energy(beta), -d1, 1e-8)
    # Only K = βJ enters ln Z, so d/dβ at (β/2, J=2) is J d/dK = 2 d1.
    assert_close(onsager_internal_energy(beta / 2.0, J=2.0), -2.0 * d1, 2e-8)


def test_onsager_energy_at_critical_point():
    # The divergent K₁(k = 1) is multiplied by 2tanh²2K − 1 = 0: U/N = −J coth 2K_c = −√2 J.
    assert_close(onsager_internal_energy(CRITICAL_BETA), -math.sqrt(2.0), 1e-14)
    assert_close(onsager_internal_energy(CRITICAL_BETA / 3.0, J=3.0), -3.0 * math.sqrt(2.0), 1e-13)
    assert_close(onsager_internal_energy(CRITICAL_BETA * (1 + 1e-12)), -math.sqrt(2.0), 1e-9)


def test_onsager_magnetization_low_temperature_series():
    # Low-temperature series of the square lattice in u = e^{−4K} (Domb; Sykes et al.),
    # from counting overturned clusters, independent of Yang's closed form.
    coeffs = [1, 0, -2, -8, -34, -152, -714, -3472, -17318]
    for beta, tol in ((1.5, 1e-14), (1.0, 1e-9)):
        u = math.exp(-4 * beta)
        series = sum(c * u**k for k, c in enumerate(coeffs))
        assert_close(onsager_magnetization(beta), series, tol)


def test_onsager_magnetization_vanishes_at_and_below_critical_point():
    for beta in (0.01, 0.3, CRITICAL_BETA, CRITICAL_BETA * (1 - 1e-12)):
        assert onsager_magnetization(beta) == 0.0
    above = [onsager_magnetization(CRITICAL_BETA * (1 + e)) for e in (1e-8, 1e-4, 1e-2, 1e-1)]
    assert all(0.0 < m < 1.0 for m in above) and above == sorted(above)
    # Critical exponent 1/8: M ∝ (β − β_c)^{1/8}.
    ratio = onsager_magnetization(CRITICAL_BETA * (1 + 1e-9)) / onsager_magnetization(CRITICAL_BETA * (1 + 1e-7))
    assert_close(ratio, 100 ** (-1 / 8), 1e-6)
    assert_close(onsager_magnetization(0.5, J=2.0), onsager_magnetization(1.0), 1e-15)


# ---------------------------------------------------------------------------------------------
# Kaufman → Onsager
# ---------------------------------------------------------------------------------------------


def test_kaufman_approaches_onsager_away_from_criticality():
    L, n = 256, 256 * 256
    # High temperature: finite-size corrections are exponentially small in L.
    assert_close(kaufman_log_z(L, 0.3) / n, onsager_log_z(0.3), 1e-12)
    assert_close(kaufman_internal_energy(L, 0.3), onsager_internal_energy(0.3), 1e-12)
    # Ordered phase: the torus has two symmetry-broken states, so ln Z = N f + ln 2 up to
    # exponentially small terms; ln Z/N − Onsager is ln 2 / N = 1.06e-5 at L = 256, not 0.
    assert_close(kaufman_log_z(L, 0.6) / n, onsager_log_z(0.6) + math.log(2.0) / n, 1e-12)
    assert_close(kaufman_internal_energy(L, 0.6), onsager_internal_energy(0.6), 1e-12)


def test_kaufman_critical_finite_size_correction():
    # At β_c: ln Z_L − N ln z_∞ = ln[(θ₂+θ₃+θ₄)/(2η)] + a/L² with a ≈ 0.0813.
    c = cft_constant()
    assert_close(c, 0.6399119471916226, 1e-13)
    f_inf = onsager_log_z(CRITICAL_BETA)
    errors = {L: kaufman_log_z(L, CRITICAL_BETA) - L * L * f_inf - c for L in (32, 64, 128, 256)}
    for L, err in errors.items():
        assert 0.080 < err * L * L < 0.083, (L, err * L * L)
    for L in (32, 64, 128):
        assert_close(errors[L] / errors[2 * L], 4.0, 0.02)


# ---------------------------------------------------------------------------------------------
# Stability
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.01, CRITICAL_BETA, 5.0])
def test_large_lattice_is_finite(beta):
    L = 512
    values = [kaufman_log_z(L, beta), kaufman_internal_energy(L, beta), kaufman_specific_heat(L, beta)]
    assert all(math.isfinite(v) for v in values), values
    # Per-site ln Z lies between the β → 0 and β → ∞ bounds: ln 2 + 2K·(0..1)
    assert math.log(2.0) < values[0] / (L * L) < math.log(2.0) + 2 * beta
    assert -2.0 <= values[1] < 0.0 and values[2] >= 0.0


def test_no_nan_exactly_at_critical_point():
    for L in (2, 3, 8, 33, 512):
        b = torch.tensor(CRITICAL_BETA, dtype=torch.float64, requires_grad=True)
        log_z = kaufman_log_z_torch(L, b)
        (d1,) = torch.autograd.grad(log_z, b, create_graph=True)
        (d2,) = torch.autograd.grad(d1, b)
        assert all(torch.isfinite(t).item() for t in (log_z, d1, d2))
        assert math.isfinite(onsager_log_z(CRITICAL_BETA)) and math.isfinite(onsager_internal_energy(CRITICAL_BETA))


def test_critical_specific_heat_grows_logarithmically():
    # C/N ≈ (8/π) K_c² ln L + const on the torus: doubling L adds (8/π) K_c² ln 2 ≈ 0.343.
    slope = 8 / math.pi * CRITICAL_BETA**2 * math.log(2.0)
    c = {L: kaufman_specific_heat(L, CRITICAL_BETA) for L in (128, 256, 512)}
    assert_close(c[256] - c[128], slope, 1e-3)
    assert_close(c[512] - c[256], slope, 5e-4)


# ---------------------------------------------------------------------------------------------
# Enumeration
# ---------------------------------------------------------------------------------------------


def _naive(K: np.ndarray) -> tuple[float, list[float]]:
    """Plain Python loop over configurations: ln Z and [energy, energy_sq, |m|, m², m⁴]."""
    n = K.shape[0]
    weights, obs = [], []
    for spins in itertools.product((1.0, -1.0), repeat=n):
        s = np.array(spins)
        e = -0.5 * s @ K @ s
        m = s.mean()
        weights.append(-e)
        obs.append([e / n, (e / n) ** 2, abs(m), m**2, m**4])
    w = np.array(weights)
    shift = w.max()
    p = np.exp(w - shift)
    z = p.sum()
    return float(math.log(z) + shift), list(p @ np.array(obs) / z)


def test_enumeration_small_closed_forms():
    assert_close(enumerate_log_z(np.zeros((1, 1))), math.log(2.0), 1e-15)
    a = 0.7
    assert_close(enumerate_log_z(np.array([[0.0, a], [a, 0.0]])), math.log(2 * math.exp(a) + 2 * math.exp(-a)), 1e-14)
    # Free spins: ⟨m²⟩ = 1/N, ⟨m⁴⟩ = (3N − 2)/N³.
    res = enumerate_ising(np.zeros((6, 6)))
    assert_close(res.log_z, 6 * math.log(2.0), 1e-14)
    assert_close(res.m2, 1 / 6, 1e-15)
    assert_close(res.m4, (3 * 6 - 2) / 6**3, 1e-15)
    assert res.energy == 0.0 and res.energy_sq == 0.0


def test_enumeration_matches_naive_loop_for_spin_glass():
    rng = np.random.default_rng(7)
    n = 9
    K = rng.normal(size=(n, n))
    K = 0.5 * (K + K.T)
    np.fill_diagonal(K, 0.0)
    log_z, obs = _naive(K)
    res = enumerate_ising(K)
    assert_close(res.log_z, log_z, 1e-12)
    assert_close(enumerate_log_z(K), log_z, 1e-12)
    for got, want in zip((res.energy, res.energy_sq, res.abs_m, res.m2, res.m4), obs):
        assert_close(got, want, 1e-12)
    # A torch tensor is accepted too.
    assert_close(enumerate_log_z(torch.from_numpy(K)), log_z, 1e-12)


def test_enumeration_result_is_frozen_and_fast_at_16_sites():
    K = CRITICAL_BETA * adjacency(4)
    start = time.perf_counter()
    res = enumerate_ising(K)
    elapsed = time.perf_counter() - start
    assert isinstance(res, EnumerationResult)
    assert elapsed < 1.0, f"enumerate_ising took {elapsed:.2f} s at N=16"
    with pytest.raises(AttributeError):
        res.log_z = 0.0  # type: ignore[misc]
    assert 0 < res.m2**2 <= res.m4 <= res.m2 <= res.abs_m <= 1.0


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: kaufman_log_z(1.5, 0.4), ValueError, r"L must be an integer >= 2, got L=1\.5"),
        (lambda: kaufman_log_z(1, 0.4), ValueError, r"got L=1$"),
        (lambda: kaufman_log_z("4", 0.4), TypeError, r"got L='4'"),
        (lambda: kaufman_log_z(4, -1), ValueError, r"beta must be a finite number > 0, got beta=-1$"),
        (lambda: kaufman_log_z(4, 0.0), ValueError, r"got beta=0\.0"),
        (lambda: kaufman_log_z(4, float("nan")), ValueError, r"got beta=nan"),
        (lambda: kaufman_internal_energy(4, float("inf")), ValueError, r"got beta=inf"),
        (lambda: kaufman_specific_heat(4, 0.4, J=-1.0), ValueError, r"J must be a finite number > 0, got J=-1\.0"),
        (lambda: kaufman_log_z_torch(4, torch.ones(3)), ValueError, r"beta must be a scalar .*got shape=\(3,\)"),
        (lambda: onsager_log_z(-0.2), ValueError, r"got beta=-0\.2"),
        (lambda: kaufman_specific_heat(8, 200.0), ValueError, r"beta\*J must be <= 150 .*beta\*J=200"),
        (lambda: onsager_internal_energy(100.0, J=2.0), ValueError, r"got beta=100\.0, J=2\.0"),
        (lambda: onsager_magnetization(0.5, J=0), ValueError, r"got J=0"),
        (lambda: transfer_matrix_log_z(13, 0.4), ValueError, r"L must be an integer in \[2, 12\], got L=13"),
        (lambda: transfer_matrix_log_z(4, 0.4, boundary="twisted"), ValueError, r"got boundary='twisted'"),
        (lambda: enumerate_log_z(np.zeros((3, 4))), ValueError, r"got shape=\(3, 4\)"),
        (
            lambda: enumerate_log_z(np.array([[0.0, 1.0], [0.5, 0.0]])),
            ValueError,
            r"symmetric, got max \|K - K\^T\| = 0\.5",
        ),
        (lambda: enumerate_log_z(np.full((2, 2), np.nan)), ValueError, r"finite"),
        (lambda: enumerate_ising(np.zeros((21, 21))), ValueError, r"N <= 20 .*got N=21"),
        (lambda: enumerate_log_z(np.array([["a", "b"], ["c", "d"]])), TypeError, r"real \(N, N\) array"),
    ],
)
def test_bad_input_quotes_value(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_integer_valued_float_l_is_accepted():
    assert kaufman_log_z(4.0, 0.4) == kaufman_log_z(4, 0.4)
    assert kaufman_log_z(np.int64(4), 0.4) == kaufman_log_z(4, 0.4)

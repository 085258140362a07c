import numpy as np
import pytest
import torch
from scipy.signal import lfilter

from analysis.autocorr import autocorrelation_function, integrated_time, mean_with_error


def ar1(rho: float, n: int, chains: int, seed: int) -> np.ndarray:
    """Stationary AR(1) x_t = ρ x_{t−1} + ε_t, ε ~ N(0, 1), shape (n, chains)."""
    rng = np.random.default_rng(seed)
    eps = rng.normal(size=(n, chains))
    x0 = rng.normal(size=chains) / np.sqrt(1 - rho**2)  # start in the stationary law
    return lfilter([1.0], [1.0, -rho], eps, axis=0, zi=(rho * x0)[None, :])[0]


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_ar1_integrated_time(rho):
    # τ = 1 + 2 Σ ρ^k = (1 + ρ)/(1 − ρ): 1, 3, 19
    x = ar1(rho, 200_000, 4, seed=7)
    exact = (1 + rho) / (1 - rho)
    assert integrated_time(x) == pytest.approx(exact, rel=0.1)
    assert integrated_time(x[:, 0]) == pytest.approx(exact, rel=0.15)


def test_ar1_autocorrelation_function():
    x = ar1(0.8, 200_000, 2, seed=3)
    rho = autocorrelation_function(x, max_lag=6)
    assert rho.shape == (7,)
    assert rho[0] == 1.0
    np.testing.assert_allclose(rho, 0.8 ** np.arange(7), atol=0.02)


def test_mean_with_error_matches_theory_and_is_calibrated():
    rho = 0.9
    tau = (1 + rho) / (1 - rho)
    var = 1 / (1 - rho**2)
    # one long run: the error is √(Var τ / n)
    x = ar1(rho, 100_000, 4, seed=11)
    est = mean_with_error(x)
    assert est.stderr == pytest.approx(np.sqrt(var * tau / x.size), rel=0.1)
    # many short runs: about 95 % of the true means (0) lie within 2 errors
    runs = ar1(rho, 5_000, 200, seed=12)
    z = np.array([mean_with_error(runs[:, k]).deviation(0.0) for k in range(runs.shape[1])])
    assert 0.88 <= np.mean(np.abs(z) < 2) <= 0.995


def test_short_chain_does_not_raise(caplog):
    x = ar1(0.99, 100, 1, seed=5)[:, 0]  # τ ≈ 199 ≫ n/50
    tau = integrated_time(x)
    assert np.isfinite(tau) and tau > 1


def test_constant_series():
    x = np.full((50, 3), 0.7)
    assert integrated_time(x) == 1.0
    np.testing.assert_array_equal(autocorrelation_function(x, 2), [1.0, 0.0, 0.0])
    est = mean_with_error(x)
    assert est.value == pytest.approx(0.7) and est.stderr == 0.0


def test_torch_input_equals_numpy():
    x = ar1(0.5, 5_000, 2, seed=1)
    assert integrated_time(torch.from_numpy(x)) == integrated_time(x)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((4, 2, 2)), r"shape \(n,\) or \(n, chains\), got shape=\(4, 2, 2\)"),
        (np.zeros(1), r"at least 2 time steps"),
        (np.array([0.0, np.nan, 1.0]), r"finite"),
    ],
)
def test_bad_series(bad, match):
    with pytest.raises(ValueError, match=match):
        integrated_time(bad)


def test_bad_arguments():
    x = np.random.default_rng(0).normal(size=100)
    with pytest.raises(ValueError, match=r"max_lag must be an integer in \[0, n-1=99\], got max_lag=100"):
        autocorrelation_function(x, max_lag=100)
    with pytest.raises(ValueError, match=r"c must be a positive number, got c=0"):
        integrated_time(x, c=0)

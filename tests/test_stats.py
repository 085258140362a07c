"""Shared statistics (latticeflow/stats.py): closed forms, and one definition for training and the analysis."""

import math

import numpy as np
import pytest
import torch

from latticeflow import train
from latticeflow.stats import jackknife_stderr, kish_ess, standard_error


def test_standard_error_numpy_and_torch():
    x = np.array([1.0, 2.0, 4.0, 7.0])
    expected = math.sqrt(np.var(x, ddof=1) / 4)
    assert standard_error(x) == pytest.approx(expected, rel=1e-15)
    assert standard_error(torch.from_numpy(x)) == pytest.approx(expected, rel=1e-15)
    assert math.isnan(standard_error(np.array([3.0]))) and math.isnan(standard_error(torch.ones(1)))


def test_kish_ess_closed_forms():
    assert float(kish_ess(torch.zeros(10))) == 1.0  # clipped: rounding would give 1 + 2e-16
    assert float(kish_ess(torch.tensor([0.0, -math.inf, -math.inf, -math.inf]))) == pytest.approx(0.25, rel=1e-14)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert float(kish_ess(w.log())) == pytest.approx(36 / (3 * 14), rel=1e-14)
    # any scale of ln w: only ratios matter
    assert float(kish_ess(w.log() + 1e4)) == pytest.approx(36 / (3 * 14), rel=1e-12)
    assert kish_ess(w.log().float()).dtype == torch.float64


def test_one_kish_ess_for_training_and_analysis():
    from analysis.free_energy import effective_sample_size

    assert train.kish_ess is kish_ess
    lw = torch.randn(500, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    assert effective_sample_size(lw.numpy()) == float(kish_ess(lw))
    assert effective_sample_size(lw) == float(kish_ess(lw))


@pytest.mark.parametrize("n", [2, 5, 40])
def test_jackknife_of_the_mean_is_the_standard_error(n):
    # leave-one-out means θ_k = (Σx − x_k)/(n − 1): the jackknife error equals s/√n exactly
    x = np.random.default_rng(n).normal(size=n)
    theta = (x.sum() - x) / (n - 1)
    assert float(jackknife_stderr(theta)) == pytest.approx(standard_error(x), rel=1e-12)
    both = jackknife_stderr(np.stack([theta, 2 * theta], axis=1))  # column-wise for (n_b, K)
    np.testing.assert_allclose(both, [standard_error(x), 2 * standard_error(x)], rtol=1e-12)

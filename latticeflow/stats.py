"""Sample statistics shared by training and the analysis: standard error, Kish ESS, jackknife.

Notation: B samples; log importance weights ln w_b, shape (B,); for a jackknife, n_b
leave-one-block-out estimates θ_k, shape (n_b, ...).

* Standard error of a sample mean: s/√B with s the sample standard deviation (Bessel's
  correction, ddof = 1); NaN for B < 2, where it is undefined.
* Kish effective sample size, normalised: ESS/B = (Σ w)² / (B Σ w²) ∈ (0, 1], from log
  weights with logsumexp in float64 (no overflow whatever the scale of ln w); 1 exactly when
  all weights are equal, and 1/E_q[(p/q)²] as B → ∞ for w = p/q.
* Block jackknife error of an estimate θ from its n_b leave-one-block-out values θ_k:
  σ² = (n_b − 1)/n_b · Σ_k (θ_k − θ̄)² (Efron & Stein 1981; Efron, "The Jackknife, the
  Bootstrap and Other Resampling Plans", 1982).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["jackknife_stderr", "kish_ess", "standard_error"]


def standard_error(values: Tensor | np.ndarray) -> float:
    """Standard error s/√B of the mean of B samples (ddof = 1).

    Args:
        values: samples, shape (B,), a torch tensor (any device) or a numpy array.

    Returns:
        The standard error as a float; NaN for B < 2.
    """
    if isinstance(values, Tensor):
        n = values.numel()
        return float(values.std() / math.sqrt(n)) if n > 1 else math.nan
    values = np.asarray(values)
    return float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan


def kish_ess(log_w: Tensor) -> Tensor:
    """Normalised Kish effective sample size (Σw)² / (B Σw²) ∈ (0, 1], from log weights.

    Computed in float64 as exp(2 logsumexp(ln w) − logsumexp(2 ln w)) / B, so any scale of
    ln w is safe; −inf entries (zero weights) are allowed. Rounding can push equal weights a
    hair above 1, so the result is clipped at 1.

    Args:
        log_w: log importance weights ln w, shape (B,), any floating dtype and device.

    Returns:
        ESS/B, a float64 scalar tensor on the device of ``log_w``.

    Example:
        >>> float(kish_ess(torch.zeros(10)))
        1.0
    """
    log_w = log_w.double()
    ess = torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)) / log_w.numel()
    return ess.clamp(max=1.0)


def jackknife_stderr(theta: np.ndarray) -> np.ndarray:
    """Block-jackknife standard error from leave-one-block-out estimates.

    Args:
        theta: θ_k, the estimate recomputed without block k, shape (n_b, ...) with n_b >= 2.

    Returns:
        √((n_b − 1)/n_b · Σ_k (θ_k − θ̄)²), shape ``theta.shape[1:]`` (a numpy scalar for 1-D θ).
    """
    n = theta.shape[0]
    return np.sqrt((n - 1) / n * np.sum((theta - theta.mean(0)) ** 2, axis=0))

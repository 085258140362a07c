"""Free-energy estimators from samples of a normalised model density.

Notation: B samples x_b drawn from a model q with log density ``logp`` = ln q(x_b), shape (B,),
and the target energy ``energy`` = E(x_b), shape (B,), of the unnormalised target e^{−E}/Z.
The log importance weight of a sample is ln w_b = −E(x_b) − ln q(x_b), so that Z = E_q[w].

* Variational free energy (the training loss, paper eq. 7):
      F_q = E_q[ln q + E] = −ln Z + KL(q ‖ p) ≥ −ln Z.
* Importance-sampled free energy:
      F_IS = −ln (1/B Σ_b w_b)  →  −ln Z  as B → ∞,
  evaluated with logsumexp in float64; biased upwards by O(Var(w)/(B Z²)) at finite B
  (Jensen), which the jackknife error reflects only partly when the weights are heavy-tailed.
* Effective sample size (Kish), normalised: ESS = (Σ w)² / (B Σ w²) ∈ (0, 1]; it tends to
  1 / E_q[(p/q)²] and equals 1 exactly when q = p.

The statistics themselves (standard error, Kish ESS, jackknife error) are defined once, in
:mod:`latticeflow.stats`, which training uses too.

Per-site values (divide by N) come from :meth:`Estimate.per_site`.

Reference: Zhang, E & Wang, "Monge-Ampère Flow for Generative Modeling", arXiv:1809.10188.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import logsumexp

from latticeflow.stats import jackknife_stderr, kish_ess, standard_error

__all__ = [
    "Estimate",
    "effective_sample_size",
    "importance_free_energy",
    "log_weights",
    "variational_free_energy",
]


# ---------------------------------------------------------------------- result type
@dataclass(frozen=True)
class Estimate:
    """A Monte Carlo estimate with its standard error.

    ``str(Estimate(-2.315921, 4e-5))`` gives ``"-2.31592(4)"``: the digits in brackets are
    the one-sigma error on the last quoted digits (two digits when the error starts with 1).

    Attributes:
        value: the estimate.
        stderr: its standard error (0 for an exact, zero-variance estimate; NaN if unknown).
    """

    value: float
    stderr: float

    def __str__(self) -> str:
        return format_with_error(self.value, self.stderr)

    def per_site(self, N: int) -> "Estimate":
        """The estimate divided by the number of sites N (value and error)."""
        if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 1:
            raise ValueError(f"N must be a positive integer, got N={N!r}")
        return Estimate(self.value / N, self.stderr / N)

    def deviation(self, exact: float) -> float:
        """(value − exact) / stderr: the distance from an exact value in standard errors.

        Returns 0 when both the difference and the error vanish, ±inf for a nonzero
        difference with zero error.
        """
        diff = self.value - float(exact)
        if self.stderr == 0:
            return 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return diff / self.stderr


def format_with_error(value: float, stderr: float) -> str:
    """Format ``value`` with ``stderr`` in bracket notation, e.g. -2.31592(4) or 12340(40)."""
    value, stderr = float(value), float(stderr)
    if not math.isfinite(value) or not math.isfinite(stderr) or stderr < 0:
        return f"{value:.8g}(?)" if not math.isfinite(stderr) else f"{value:.8g}({stderr:.2g})"
    if stderr == 0:
        return f"{value:.12g}(0)"
    exponent = math.floor(math.log10(stderr))
    leading = stderr / 10.0**exponent
    digits = 2 if leading < 2 else 1  # 0.0014 -> (14), 0.004 -> (4)
    decimals = digits - 1 - exponent
    if decimals >= 0:
        err = round(stderr * 10.0**decimals)
        return f"{value:.{decimals}f}({err})"
    scale = 10.0 ** (-decimals)
    return f"{round(value / scale) * scale:.0f}({round(stderr / scale) * scale:.0f})"


# ---------------------------------------------------------------------- input checks
def _as_float64(x: object) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_samples(logp: object, energy: object) -> tuple[np.ndarray, np.ndarray]:
    """Return logp and energy as float64 (B,) arrays; both 1-D, same length, finite."""
    lp, en = _as_float64(logp), _as_float64(energy)
    if lp.ndim != 1 or en.ndim != 1 or lp.shape != en.shape:
        raise ValueError(
            f"logp and energy must be 1-D arrays of the same shape (B,), got logp.shape={lp.shape}, "
            f"energy.shape={en.shape}"
        )
    if lp.size == 0:
        raise ValueError(f"logp and energy must hold at least one sample, got shape={lp.shape}")
    for name, arr in (("logp", lp), ("energy", en)):
        bad = ~np.isfinite(arr)
        if bad.any():
            raise ValueError(
                f"{name} must be finite, got {int(bad.sum())} NaN/inf entries out of shape={arr.shape} "
                f"(first at index {int(np.argmax(bad))})"
            )
    return lp, en


def _check_log_weights(log_w: object) -> np.ndarray:
    lw = _as_float64(log_w)
    if lw.ndim != 1 or lw.size == 0:
        raise ValueError(f"log_w must be a non-empty 1-D array (B,), got shape={lw.shape}")
    if np.isnan(lw).any() or np.isposinf(lw).any():
        raise ValueError(f"log_w must not contain NaN or +inf, got {int((~np.isfinite(lw)).sum())} bad entries")
    if np.isneginf(lw).all():
        raise ValueError("log_w must have at least one finite entry (all weights are zero)")
    return lw


def _check_blocks(n_blocks: int | None, B: int) -> int:
    if n_blocks is None:
        return min(B, 100)
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, (int, np.integer)) or not 2 <= n_blocks <= B:
        raise ValueError(f"n_blocks must be an integer in [2, B={B}], got n_blocks={n_blocks!r}")
    return int(n_blocks)


# ---------------------------------------------------------------------- estimators
def log_weights(logp: object, energy: object) -> np.ndarray:
    """Log importance weights ln w = −E − ln q, float64, shape (B,).

    Args:
        logp: model log density ln q(x_b), shape (B,).
        energy: target energy E(x_b), shape (B,).
    """
    lp, en = _check_samples(logp, energy)
    return -en - lp


def variational_free_energy(logp: object, energy: object) -> Estimate:
    """F_q = mean(ln q + E), an upper bound of −ln Z (paper eq. 7), with its standard error.

    Args:
        logp: model log density of each sample, shape (B,) (numpy or torch).
        energy: target energy of each sample, shape (B,).

    Returns:
        Estimate(value, stderr) with stderr = std/√B of the i.i.d. samples (NaN for B = 1).

    Raises:
        ValueError: empty input, mismatched shapes or non-finite entries.
    """
    lp, en = _check_samples(logp, energy)
    f = lp + en
    return Estimate(float(f.mean()), standard_error(f))


def importance_free_energy(logp: object, energy: object, n_blocks: int | None = None) -> Estimate:
    """F_IS = −ln( (1/B) Σ_b e^{−E_b − ln q_b} ) with a block-jackknife standard error.

    The B samples are cut into ``n_blocks`` contiguous blocks; each leave-one-block-out
    estimate is a logsumexp over the other blocks, so the error is stable for weights that
    span many orders of magnitude. For correlated samples (e.g. a Markov chain) the blocks
    must be longer than the autocorrelation time.

    Args:
        logp: model log density ln q of each sample, shape (B,).
        energy: target energy E of each sample, shape (B,).
        n_blocks: number of jackknife blocks in [2, B]; default min(B, 100).

    Returns:
        Estimate of −ln Z (value uses all samples).

    Raises:
        ValueError: bad input (see :func:`variational_free_energy`), B < 2, or bad n_blocks.
    """
    lw = log_weights(logp, energy)
    B = lw.size
    if B < 2:
        raise ValueError(f"importance_free_energy needs at least 2 samples for an error, got shape={lw.shape}")
    nb = _check_blocks(n_blocks, B)
    value = -(logsumexp(lw) - math.log(B))
    blocks = np.array_split(np.arange(B), nb)
    block_lse = np.array([logsumexp(lw[idx]) for idx in blocks])  # (nb,)
    sizes = np.array([idx.size for idx in blocks], dtype=np.float64)
    mask = ~np.eye(nb, dtype=bool)
    loo = np.array([logsumexp(block_lse[mask[k]]) for k in range(nb)]) - np.log(B - sizes)
    return Estimate(float(value), float(jackknife_stderr(-loo)))


def effective_sample_size(log_w: object) -> float:
    """Normalised Kish effective sample size (Σ w)² / (B Σ w²) ∈ (0, 1]: :func:`latticeflow.stats.kish_ess`
    of checked numpy or torch log weights.

    Args:
        log_w: log importance weights, shape (B,); −inf (zero weight) is allowed.

    Returns:
        ESS / B as a float; 1 (to rounding, never above) for constant weights.

    Raises:
        ValueError: empty, not 1-D, NaN or +inf entries, or all weights zero.
    """
    return float(kish_ess(torch.from_numpy(_check_log_weights(log_w))))

"""The closed-form baseline: a full-covariance Gaussian in logit space, and its whitening map.

The maximum-likelihood Gaussian N(μ, Σ) of the logit training images is the reference every
flow must beat (README, Results: ≈ 1366 nats on the test set), and its symmetric whitening
y' = Σ^{-1/2}(y − μ) is the exact affine map that ``--whiten`` puts in front of the flow
(:class:`~latticeflow.mnist.model.AffineFlow`), so that the identity flow *is* this baseline.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from torch import Tensor

from .protocol import (
    PAPER_TEST_NLL,
    DequantizedBatches,
    _check_float_tensor,
    _check_int,
    nll_logit_to_bits_per_dim,
    protocol_splits,
)

__all__ = ["GaussianBaseline", "Whitening", "baseline_report", "fit_whitening"]


class GaussianBaseline:
    """Full-covariance Gaussian fitted by maximum likelihood to logit-space data (float64).

    The MLE is the sample mean and the covariance with divisor N. Dequantisation noise makes the
    covariance of MNIST logit data full rank (every pixel, even the always-black border ones,
    carries independent noise), but without dequantisation, or with fewer images than pixels, it
    is singular; a ridge ``ridge * (trace(S) / D) * I`` (relative to the mean variance) is
    therefore added before the Cholesky factorisation. Its effect on the log-likelihood of
    non-singular data is O(ridge * D), about 1e-6 * 784 nats with the default.

    Attributes:
        mean: shape (D,).
        covariance: shape (D, D), including the ridge.
        scale_tril: lower Cholesky factor of ``covariance``, shape (D, D).
    """

    def __init__(self, mean: Tensor, covariance: Tensor) -> None:
        self.mean = _check_float_tensor(mean, "mean").to(torch.float64)
        self.covariance = _check_float_tensor(covariance, "covariance").to(torch.float64)
        D = self.mean.shape[-1]
        if self.mean.shape != (D,) or self.covariance.shape != (D, D):
            raise ValueError(
                f"mean must have shape (D,) and covariance (D, D), got {tuple(self.mean.shape)} "
                f"and {tuple(self.covariance.shape)}"
            )
        L, info = torch.linalg.cholesky_ex(self.covariance)
        if int(info) != 0:
            raise ValueError("covariance is not positive definite; fit with a larger ridge")
        self.scale_tril = L

    @classmethod
    def fit(cls, y: Tensor, ridge: float = 1e-6) -> GaussianBaseline:
        """Maximum-likelihood fit to data y of shape (N, D), computed in float64.

        Args:
            y: logit-space training data, shape (N, D), N >= 2.
            ridge: relative ridge added to the diagonal (see the class docstring), >= 0.

        Returns:
            baseline: the fitted Gaussian.
        """
        y = _check_float_tensor(y, "y").to(torch.float64)
        if y.dim() != 2 or y.shape[0] < 2:
            raise ValueError(f"y must have shape (N, D) with N >= 2, got shape={tuple(y.shape)}")
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
            raise ValueError(f"ridge must be a number >= 0, got ridge={ridge!r}")
        mean = y.mean(0)
        centred = y - mean
        covariance = centred.T @ centred / y.shape[0]
        D = y.shape[1]
        covariance = covariance + ridge * (torch.trace(covariance) / D) * torch.eye(D, dtype=torch.float64)
        return cls(mean, covariance)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def log_prob(self, y: Tensor) -> Tensor:
        """log N(y; mean, covariance) in nats, float64.

        Args:
            y: shape (B, D) or (D,).

        Returns:
            logp: shape (B,) or ().
        """
        y = _check_float_tensor(y, "y").to(torch.float64)
        if y.shape[-1] != self.dim:
            raise ValueError(f"y must have last dimension D={self.dim}, got shape={tuple(y.shape)}")
        # one (D, B) right-hand side: a batched (B, D, 1) solve would broadcast L to (B, D, D)
        centred = (y - self.mean).reshape(-1, self.dim)
        z = torch.linalg.solve_triangular(self.scale_tril, centred.T, upper=False).T.reshape(y.shape)
        half_log_det = torch.log(torch.diagonal(self.scale_tril)).sum()
        return -0.5 * (z * z).sum(-1) - half_log_det - 0.5 * self.dim * math.log(2.0 * math.pi)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples, shape (n, D), float64."""
        n = _check_int("n", n, 1)
        z = torch.randn((n, self.dim), generator=generator, dtype=torch.float64)
        return self.mean + z @ self.scale_tril.T

    def whitening(self, floor: float = 1e-12) -> Whitening:
        """The symmetric whitening map ``y' = covariance^{-1/2} (y - mean)`` and its inverse, float64.

        From the eigendecomposition ``covariance = V diag(lam) V^T`` (``torch.linalg.eigh``):
        ``inv_sqrt = V diag(lam^{-1/2}) V^T`` and ``sqrt = V diag(lam^{1/2}) V^T``, both symmetric,
        and ``log_det = log|det inv_sqrt| = -1/2 sum log lam``. Eigenvalues below ``floor`` times
        the largest are raised to it before all three are formed, so the map stays exactly
        invertible and ``log_det`` is that of the matrix actually used. The floor guards against
        round-off in a near-singular covariance; the fit's ridge (relative 1e-6 of the mean
        variance, at least 1.3e-9 of the largest eigenvalue for D = 784) keeps every eigenvalue of
        a fitted covariance above the default 1e-12, so then it changes nothing and
        ``N(inv_sqrt (y - mean); 0, I) |det inv_sqrt|`` is :meth:`log_prob`'s density.

        Args:
            floor: relative eigenvalue floor, in (0, 1).

        Returns:
            whitening: ``mean`` (D,), ``inv_sqrt`` (D, D), ``sqrt`` (D, D), ``log_det`` (), float64.
        """
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 < floor < 1.0:
            raise ValueError(f"floor must be a number in (0, 1), got floor={floor!r}")
        lam, vectors = torch.linalg.eigh(self.covariance)
        lam = lam.clamp_min(floor * lam.max())
        inv_sqrt = (vectors * lam.rsqrt()) @ vectors.T
        sqrt = (vectors * lam.sqrt()) @ vectors.T
        # exactly symmetric (the products above are only so up to round-off)
        inv_sqrt, sqrt = 0.5 * (inv_sqrt + inv_sqrt.T), 0.5 * (sqrt + sqrt.T)
        return Whitening(self.mean.clone(), inv_sqrt, sqrt, -0.5 * torch.log(lam).sum())


class Whitening(NamedTuple):
    """The affine whitening map of :meth:`GaussianBaseline.whitening`, float64.

    Attributes:
        mean: mu, shape (D,).
        inv_sqrt: Sigma^{-1/2}, symmetric, shape (D, D); ``y' = (y - mean) @ inv_sqrt``.
        sqrt: Sigma^{1/2}, symmetric, shape (D, D); ``y = y' @ sqrt + mean``.
        log_det: log|det Sigma^{-1/2}|, shape ().
    """

    mean: Tensor
    inv_sqrt: Tensor
    sqrt: Tensor
    log_det: Tensor



def fit_whitening(train: Tensor, noise_seed: int) -> Whitening:
    """μ, Σ^{-1/2}, Σ^{1/2} and ln|det Σ^{-1/2}| of the logit training set: the Gaussian baseline's fit.

    One fixed dequantisation draw of ``train`` (``DequantizedBatches(..., seed=noise_seed)``,
    float64) is fitted by :meth:`GaussianBaseline.fit` and decomposed by
    :meth:`GaussianBaseline.whitening` (eigenvalue floor 1e-12 of the largest, see there). The
    training driver passes ``eval_seed``, the training-noise seed of ``python -m latticeflow.mnist
    --baseline`` and ``benchmarks/mnist_race.py``, so the whitened identity flow is exactly
    their Gaussian. One pass over the data; deterministic, so every rank computes the same tensors
    (and DDP broadcasts rank 0's buffers besides).

    Args:
        train: uint8 training pixels, shape (N, D), N >= 2.
        noise_seed: seed of the dequantisation draw.

    Returns:
        whitening: float64 tensors, see :class:`Whitening`.
    """
    y, _ = DequantizedBatches(train, seed=noise_seed, dtype=torch.float64).fixed()
    return GaussianBaseline.fit(y).whitening()


def baseline_report(data_dir: str | os.PathLike[str] | None, seed: int, noise_seed: int) -> str:
    """The Gaussian baseline on the paper's split: NLL and bits/dim of train, validation and test.

    Fitted to the training set under one fixed noise draw (seed ``noise_seed``); validation and
    test are scored with their own draws (``noise_seed + 1``, ``noise_seed + 2``, as the training
    driver's evaluation), and the paper's Table 1 is converted to bits/dim with the test set's
    mean logit log-Jacobian. What ``python -m latticeflow.mnist --baseline`` prints.

    Args:
        data_dir: as in :func:`~latticeflow.mnist.files.load_mnist`.
        seed: seed of the train/validation split.
        noise_seed: seed of the training set's noise draw.

    Returns:
        report: lines of text.
    """
    splits = protocol_splits(data_dir, seed=seed)
    train_y, _ = DequantizedBatches(splits["train"], seed=noise_seed, dtype=torch.float64).fixed()
    model = GaussianBaseline.fit(train_y)
    lines = [
        f"Gaussian baseline fitted to {len(train_y)} logit-space training images "
        f"(split seed {seed}, fixed noise seed {noise_seed})"
    ]
    test_log_det = float("nan")
    for k, name in enumerate(("train", "validation", "test")):
        # the train set is scored with the noise it was fitted on; the others with their own draw
        y, log_det = DequantizedBatches(splits[name], seed=noise_seed + k, dtype=torch.float64).fixed()
        logp = model.log_prob(y)
        bpd = nll_logit_to_bits_per_dim(logp, log_det, y.shape[1])
        stderr = logp.std().item() / math.sqrt(len(logp))
        lines.append(
            f"  {name:10s} NLL = {-logp.mean().item():8.1f} +- {stderr:.1f} nats (logit space), "
            f"{bpd.mean().item():.4f} bits/dim, mean log_det = {log_det.mean().item():.1f}"
        )
        test_log_det = log_det.mean().item()
    lines.append("Paper Table 1 converted to bits/dim with this mean test log_det:")
    for model_name, (nll, err) in PAPER_TEST_NLL.items():
        bpd = nll_logit_to_bits_per_dim(-nll, test_log_det)
        lines.append(f"  {model_name:9s} {nll:7.1f} +- {err} nats -> {bpd:.4f} bits/dim")
    return "\n".join(lines)

"""The paper's MNIST protocol: split, dequantisation, logit transform, bits/dim, batches.

The Monge-Ampère flow paper (Zhang, E, Wang, "Monge-Ampère Flow for Generative Modeling",
arXiv:1809.10188, section 4.1) follows Papamakarios, Pavlakou and Murray, "Masked Autoregressive
Flow for Density Estimation" (arXiv:1705.07057):

1. the 60,000 training images are split into 50,000 for training and 10,000 for validation;
   the 10,000 test images are held out;
2. each pixel value ``x`` in {0, ..., 255} is dequantised, ``u = (x + n) / 256`` with
   ``n ~ U[0, 1)``, so that ``u`` lies in [0, 1)^D with D = 784;
3. the logit transform ``y = logit(lam + (1 - 2 lam) u)`` with ``lam = 1e-6`` maps ``u`` to R^D,
   where the flow models the density ``p_Y(y)``.

Symbols used below: D pixels per image, B images in a batch, N images in a set, ``u`` the
dequantised image in [0, 1)^D, ``s = lam + (1 - 2 lam) u`` the squeezed image in (0, 1),
``y = log s - log(1 - s)`` the logit image, ``log_det = sum_i log|dy_i/du_i|`` per image.

Paper Table 1 reports the test negative log-likelihood ``-E[log p_Y(y)]`` in nats in logit space
(:data:`PAPER_TEST_NLL`); :func:`nll_logit_to_bits_per_dim` converts to bits per pixel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._checks import check_size
from . import files
from .config import MNISTConfig, as_config
from .files import MNISTFormatError, load_mnist

__all__ = [
    "LAMBDA",
    "PAPER_TEST_NLL",
    "DequantizedBatches",
    "MNISTData",
    "dequantize",
    "inverse_logit_transform",
    "load_data",
    "logit_to_pixels",
    "logit_transform",
    "nll_logit_to_bits_per_dim",
    "protocol_splits",
    "split_train_validation",
    "tile_images",
    "train_validation_indices",
]

#: lam of the logit transform y = logit(lam + (1 - 2 lam) u) (MAF, arXiv:1705.07057).
LAMBDA: float = 1e-6

#: Paper Table 1 (arXiv:1809.10188): average test NLL -log p_Y(y) in nats, logit space,
#: as (mean, error). MADE, Real NVP and MAF are quoted there from MAF's Table 2 (Gaussian base);
#: "MA flow" is the Monge-Ampère flow ("Present" in the table).
PAPER_TEST_NLL: dict[str, tuple[float, float]] = {
    "MADE": (1380.8, 4.8),
    "Real NVP": (1323.2, 6.6),
    "MAF": (1300.5, 1.7),
    "MA flow": (1255.5, 2.0),
}


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> int:
    return check_size(name, value, minimum=minimum)


def _check_lam(lam: object) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam < 0.5:
        raise ValueError(f"lam must be a number in [0, 0.5), got lam={lam!r}")
    return float(lam)


def _check_pixels(pixels: object, name: str = "pixels") -> Tensor:
    """Return pixel values as a uint8 tensor (accepts a uint8 tensor or numpy array)."""
    if isinstance(pixels, np.ndarray):
        pixels = torch.from_numpy(pixels)
    if not isinstance(pixels, Tensor):
        raise TypeError(f"{name} must be a uint8 torch.Tensor or numpy array, got {type(pixels).__name__}")
    if pixels.dtype != torch.uint8:
        raise TypeError(
            f"{name} must hold raw pixel values with dtype uint8 (0..255), got dtype={pixels.dtype}; "
            "load them with load_mnist()"
        )
    return pixels


def _check_float_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32 or float64), got dtype={x.dtype}")
    return x


# ---------------------------------------------------------------------------------------------
# The paper's protocol: split, dequantisation, logit transform
# ---------------------------------------------------------------------------------------------


def train_validation_indices(
    n: int, n_validation: int = 10000, seed: int | None = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a train / validation split of ``n`` items.

    Args:
        n: number of items (60000 for the MNIST training set).
        n_validation: how many go to validation.
        seed: seed of a ``numpy.random.default_rng`` permutation whose first ``n_validation``
            entries are the validation set; None takes the last ``n_validation`` items instead
            (the split of deeplearning.net's ``mnist.pkl.gz`` that the MAF code used).

    Returns:
        train: sorted int64 indices, shape (n - n_validation,).
        validation: sorted int64 indices, shape (n_validation,).
    """
    n = _check_int("n", n, 1)
    n_validation = _check_int("n_validation", n_validation, 0)
    if n_validation > n:
        raise ValueError(f"n_validation must be <= n={n}, got n_validation={n_validation}")
    if seed is None:
        order = np.arange(n)
        return order[: n - n_validation], order[n - n_validation :]
    order = np.random.default_rng(_check_int("seed", seed, 0)).permutation(n)
    return np.sort(order[n_validation:]), np.sort(order[:n_validation])


def split_train_validation(
    images: np.ndarray | Tensor, n_validation: int = 10000, seed: int | None = 0
) -> tuple[np.ndarray | Tensor, np.ndarray | Tensor]:
    """Split the training images into train and validation (MAF protocol: 50,000 / 10,000).

    Args:
        images: shape (N, ...), numpy array or tensor; labels split the same way with the same seed.
        n_validation: size of the validation set.
        seed: see :func:`train_validation_indices`.

    Returns:
        train: shape (N - n_validation, ...), same type as ``images``, original order kept.
        validation: shape (n_validation, ...).
    """
    if not isinstance(images, (np.ndarray, Tensor)):
        raise TypeError(f"images must be a numpy array or torch.Tensor, got {type(images).__name__}")
    train, validation = train_validation_indices(len(images), n_validation, seed)
    if isinstance(images, Tensor):
        return images[torch.from_numpy(train)], images[torch.from_numpy(validation)]
    return images[train], images[validation]


def protocol_splits(
    data_dir: str | os.PathLike[str] | None = None, n_validation: int = 10000, seed: int | None = 0
) -> dict[str, Tensor]:
    """The paper's three sets as uint8 pixel tensors, train / validation / test = 50000 / 10000 / 10000.

    Args:
        data_dir: as in :func:`load_mnist`.
        n_validation: size of the validation set carved out of the 60,000 training images.
        seed: see :func:`train_validation_indices`.

    Returns:
        splits: ``{"train", "validation", "test"}`` -> uint8 tensor of shape (N, 784).
    """
    data = load_mnist(data_dir)
    train, validation = split_train_validation(data.train_images, n_validation, seed)
    return {
        "train": torch.from_numpy(np.ascontiguousarray(train)),
        "validation": torch.from_numpy(np.ascontiguousarray(validation)),
        "test": torch.from_numpy(data.test_images),
    }


def _dequantize_with_noise(pixels: Tensor, noise: Tensor, dtype: torch.dtype) -> Tensor:
    u = ((pixels.to(torch.float64) + noise.to(torch.float64)) / 256.0).to(dtype)
    # Rounding can carry (pixel + n)/256 with n just below 1 up to (pixel + 1)/256 (for pixel 255 up
    # to 1.0, easily in float32): cap u just below its bin so that floor(256 u) == pixel, u < 1.
    upper = ((pixels.to(torch.float64) + 1.0) / 256.0).to(dtype)
    return torch.minimum(u, torch.nextafter(upper, torch.zeros((), dtype=dtype)))


def dequantize(
    pixels: Tensor | np.ndarray, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Uniform dequantisation u = (pixel + n) / 256, n ~ U[0, 1) independently per pixel.

    Args:
        pixels: uint8 pixel values 0..255, any shape (..., D).
        generator: source of the noise; pass the same generator on every epoch for fresh noise,
            or ``torch.Generator().manual_seed(seed)`` for a fixed, reproducible draw.
        dtype: floating dtype of the result.

    Returns:
        u: same shape as ``pixels``, values in [0, 1), with ``floor(256 u) == pixels`` exactly.
    """
    pixels = _check_pixels(pixels)
    noise = torch.rand(pixels.shape, generator=generator, dtype=torch.float64)
    return _dequantize_with_noise(pixels, noise, dtype)


def logit_transform(u: Tensor, lam: float = LAMBDA) -> tuple[Tensor, Tensor]:
    """y = logit(s), s = lam + (1 - 2 lam) u, with its log-Jacobian (MAF, arXiv:1705.07057).

    dy_i/du_i = (1 - 2 lam) / (s_i (1 - s_i)), so per image
    log_det = sum_i [log(1 - 2 lam) - log s_i - log(1 - s_i)] > 0, and
    log p_U(u) = log p_Y(y) + log_det.

    Args:
        u: dequantised images in [0, 1], shape (..., D).
        lam: squeeze towards 1/2 that keeps y finite at u = 0 and u = 1; in [0, 0.5).

    Returns:
        y: logit images, shape (..., D).
        log_det: sum over the last axis of log|dy_i/du_i|, shape (...).
    """
    u = _check_float_tensor(u, "u")
    lam = _check_lam(lam)
    s = lam + (1.0 - 2.0 * lam) * u
    log_s, log_1ms = torch.log(s), torch.log1p(-s)
    y = log_s - log_1ms
    log_det = (math.log1p(-2.0 * lam) - log_s - log_1ms).sum(-1)
    return y, log_det


def inverse_logit_transform(y: Tensor, lam: float = LAMBDA) -> Tensor:
    """u = (sigmoid(y) - lam) / (1 - 2 lam), the inverse of :func:`logit_transform`, clamped to [0, 1].

    Args:
        y: logit images, shape (..., D).
        lam: as in :func:`logit_transform`.

    Returns:
        u: images in [0, 1], shape (..., D).
    """
    y = _check_float_tensor(y, "y")
    lam = _check_lam(lam)
    return ((torch.sigmoid(y) - lam) / (1.0 - 2.0 * lam)).clamp(0.0, 1.0)


def logit_to_pixels(y: Tensor, lam: float = LAMBDA) -> Tensor:
    """Pixel values floor(256 u) of logit images, e.g. to show flow samples as a grid.

    The exact inverse of ``logit_transform(dequantize(pixels))`` (in float64); samples outside
    the data range are clamped to 0..255.

    Args:
        y: logit images, shape (..., D).
        lam: as in :func:`logit_transform`.

    Returns:
        pixels: uint8, shape (..., D).
    """
    u = inverse_logit_transform(y, lam)
    return torch.floor(u * 256.0).clamp(0, 255).to(torch.uint8)


def tile_images(
    pixels: Tensor | np.ndarray, n_cols: int = 10, image_shape: tuple[int, int] = (28, 28), pad: int = 1
) -> np.ndarray:
    """Arrange flattened images in a grid for ``matplotlib.pyplot.imshow(grid, cmap="gray")``.

    Args:
        pixels: shape (B, rows*cols), any dtype (uint8 from :func:`logit_to_pixels`).
        n_cols: images per row of the grid.
        image_shape: (rows, cols) of one image.
        pad: blank pixels between images.

    Returns:
        grid: shape (n_rows*(rows+pad)-pad, n_cols*(cols+pad)-pad), dtype of ``pixels``,
        image k at grid row k // n_cols, column k % n_cols.
    """
    x = pixels.detach().cpu().numpy() if isinstance(pixels, Tensor) else np.asarray(pixels)
    n_cols = _check_int("n_cols", n_cols, 1)
    pad = _check_int("pad", pad, 0)
    rows, cols = image_shape
    if x.ndim != 2 or x.shape[1] != rows * cols:
        raise ValueError(f"pixels must have shape (B, {rows * cols}) for images {image_shape}, got {x.shape}")
    n_rows = -(-len(x) // n_cols)
    grid = np.zeros((n_rows * (rows + pad) - pad, n_cols * (cols + pad) - pad), dtype=x.dtype)
    for k, image in enumerate(x):
        r, c = divmod(k, n_cols)
        top, left = r * (rows + pad), c * (cols + pad)
        grid[top : top + rows, left : left + cols] = image.reshape(rows, cols)
    return grid


class DequantizedBatches:
    """Minibatches ``(y, log_det)`` of dequantised, logit-transformed images.

    Two noise regimes, as in the protocol:

    * training, ``generator=`` a ``torch.Generator``: every pass draws fresh dequantisation
      noise (and a fresh shuffle) from it, so the model never sees the same u twice;
    * evaluation, ``seed=`` an int: the noise for the whole set is drawn once from
      ``torch.Generator().manual_seed(seed)``; every pass, and every instance with the same seed,
      yields the same y whatever the batch size. Batches come in data order unless ``shuffle``.

    Args:
        pixels: uint8, shape (N, D).
        batch_size: images per batch (the paper uses 100).
        generator: for fresh noise per pass; exactly one of generator and seed.
        seed: for fixed noise.
        shuffle: permute the images on each pass (default: True with a generator, False with a seed).
        lam: as in :func:`logit_transform`.
        dtype: floating dtype of the batches (the noise and transform are computed in float64).
        drop_last: drop a last batch smaller than batch_size.

    Yields:
        y: shape (b, D), logit images.
        log_det: shape (b,), sum_i log|dy_i/du_i|.

    Example::

        splits = protocol_splits()
        train = DequantizedBatches(splits["train"], 100, generator=torch.Generator().manual_seed(0))
        test = DequantizedBatches(splits["test"], 1000, seed=1)
        for y, log_det in train:  # one epoch, fresh noise
            loss = -model_log_prob(y).mean()
    """

    def __init__(
        self,
        pixels: Tensor | np.ndarray,
        batch_size: int = 100,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        shuffle: bool | None = None,
        lam: float = LAMBDA,
        dtype: torch.dtype = torch.float32,
        drop_last: bool = False,
    ) -> None:
        pixels = _check_pixels(pixels)
        if pixels.dim() != 2:
            raise ValueError(f"pixels must have shape (N, D), got shape={tuple(pixels.shape)}")
        if (generator is None) == (seed is None):
            raise ValueError(
                "pass exactly one of generator= (fresh noise each pass, for training) and seed= "
                f"(fixed noise, for evaluation), got generator={generator!r}, seed={seed!r}"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.pixels = pixels
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.generator = generator
        self.seed = None if seed is None else _check_int("seed", seed, 0)
        self.shuffle = (generator is not None) if shuffle is None else bool(shuffle)
        self.lam = _check_lam(lam)
        self.dtype = dtype
        self.drop_last = drop_last
        self._fixed: tuple[Tensor, Tensor] | None = None

    def __len__(self) -> int:
        n = len(self.pixels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _transform(self, pixels: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        y, log_det = logit_transform(_dequantize_with_noise(pixels, noise, torch.float64), self.lam)
        return y.to(self.dtype), log_det.to(self.dtype)

    def fixed(self) -> tuple[Tensor, Tensor]:
        """The whole set with the fixed noise: y shape (N, D), log_det shape (N,) (seed mode only)."""
        if self.seed is None:
            raise ValueError("fixed() needs seed= (fixed noise); this instance draws fresh noise per pass")
        if self._fixed is None:
            gen = torch.Generator().manual_seed(self.seed)
            noise = torch.rand(self.pixels.shape, generator=gen, dtype=torch.float64)
            self._fixed = self._transform(self.pixels, noise)
        return self._fixed

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.pixels)
        if self.seed is not None:
            y_all, log_det_all = self.fixed()
            gen = torch.Generator().manual_seed(self.seed + 1)  # fixed order too, if shuffled
            order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
            for start in range(0, len(self) * self.batch_size, self.batch_size):
                idx = order[start : start + self.batch_size]
                yield y_all[idx], log_det_all[idx]
            return
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = self.pixels[order[start : start + self.batch_size]]
            noise = torch.rand(batch.shape, generator=self.generator, dtype=torch.float64)
            yield self._transform(batch, noise)


# ---------------------------------------------------------------------------------------------
# Bits per dimension
# ---------------------------------------------------------------------------------------------


def nll_logit_to_bits_per_dim(
    logp_y: Tensor | float, log_det: Tensor | float, D: int = 784
) -> Tensor | float:
    """Bits per pixel of the dequantised model on pixel values 0..255, from log p_Y in logit space.

    Signs, all logs natural:

    * ``logp_y = log p_Y(y)``: the model's log density in logit space (nats, usually negative
      for MNIST; the paper's Table 1 reports ``-E[logp_y]``);
    * ``log_det = sum_i log|dy_i/du_i| = sum_i [log(1 - 2 lam) - log s_i - log(1 - s_i)]``, the
      second output of :func:`logit_transform` (positive);
    * ``log p_U(u) = logp_y + log_det`` is the density of u = (pixel + n) / 256 on [0, 1)^D;
    * the density of v = pixel + n on [0, 256)^D is ``p_U(v / 256) / 256^D``, and the discrete
      model ``P(pixel) = integral over n in [0, 1)^D of that density`` satisfies (Jensen)
      ``log P(pixel) >= E_n[log p_U(u)] - D ln 256``.

    Hence ``bits/dim = -(logp_y + log_det - D ln 256) / (D ln 2) = 8 - (logp_y + log_det) / (D ln 2)``,
    an upper bound on the discrete code length per pixel. A uniform density on u
    (``logp_y = -log_det``) gives exactly 8 bits/dim.

    Args:
        logp_y: log p_Y(y), shape (B,) or a float.
        log_det: shape (B,) or a float, for the same images and noise.
        D: pixels per image.

    Returns:
        bits_per_dim: shape (B,) or a float; average it over images and noise draws.
    """
    D = _check_int("D", D, 1)
    return -(logp_y + log_det - D * math.log(256.0)) / (D * math.log(2.0))


# ---------------------------------------------------------------------------------------------
# The three sets of a run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MNISTData:
    """The three protocol sets as raw pixels.

    Attributes:
        train: uint8, shape (N_train, D).
        validation: uint8, shape (N_validation, D).
        test: uint8, shape (N_test, D).
        image_shape: (rows, cols), rows·cols = D.
        directory: where the IDX files were read from.
    """

    train: Tensor
    validation: Tensor
    test: Tensor
    image_shape: tuple[int, int]
    directory: Path

    @property
    def dim(self) -> int:
        """D, pixels per image."""
        return int(self.train.shape[1])


def load_data(data_dir: str | os.PathLike[str] | None, config: MNISTConfig | dict[str, Any]) -> MNISTData:
    """Load MNIST and split it as in the paper (MAF protocol), with optional subsets.

    Args:
        data_dir: directory with the four IDX files; None tries ``data/`` (as
            :func:`~latticeflow.mnist.files.find_mnist_dir` does) and then
            :data:`~latticeflow.mnist.files.SHARED_DATA_DIR`.
        config: uses ``n_validation``, ``split_seed``, ``n_train`` (first images of the training
            split) and ``n_eval`` (first images of validation and of test).

    Returns:
        data: the three sets.

    Raises:
        FileNotFoundError: the files are not there; the message of :func:`find_mnist_dir` (where it
            looked and how to get them), plus the shared directory when that was tried too.
        MNISTFormatError: corrupt files, or fewer training images than n_validation + 2.
    """
    cfg = as_config(config)
    if data_dir is not None:
        mnist = load_mnist(data_dir)
    else:
        try:
            mnist = load_mnist(None)
        except FileNotFoundError as first:
            shared = files.SHARED_DATA_DIR  # looked up at call time (tests point it elsewhere)
            try:
                mnist = load_mnist(shared)
            except FileNotFoundError:
                raise FileNotFoundError(f"{first}\nAlso looked in {shared.resolve()} "
                                        "(the shared copy); pass --data-dir DIR.") from None
    n_total = len(mnist.train_images)
    if cfg.n_validation > n_total - 2:
        raise MNISTFormatError(f"{mnist.directory}: {n_total} training images cannot give n_validation="
                               f"{cfg.n_validation} and leave at least 2 for training; lower --n-validation")
    train, validation = split_train_validation(mnist.train_images, cfg.n_validation, cfg.split_seed)
    train, validation, test = (torch.from_numpy(a.copy()) for a in (train, validation, mnist.test_images))
    if cfg.n_train is not None:
        train = train[: cfg.n_train]
    if cfg.n_eval is not None:
        validation, test = validation[: cfg.n_eval], test[: cfg.n_eval]
    return MNISTData(train, validation, test, mnist.image_shape, mnist.directory)

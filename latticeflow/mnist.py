"""MNIST for density estimation: IDX files, checksums, download, and the MAF preprocessing.

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

Files: the four standard IDX files (``train-images-idx3-ubyte`` etc.), gzipped or not, in
``data/`` (or torchvision's ``data/MNIST/raw/``). Get them with
``python -m latticeflow.mnist --download``; check them with ``python -m latticeflow.mnist --verify``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import math
import os
import sys
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MIRRORS",
    "DequantizedBatches",
    "GaussianBaseline",
    "LAMBDA",
    "MNIST",
    "MNISTDownloadError",
    "MNISTFormatError",
    "MNIST_FILES",
    "MNIST_MD5",
    "PAPER_TEST_NLL",
    "Whitening",
    "default_data_dir",
    "dequantize",
    "download_mnist",
    "find_mnist_dir",
    "inverse_logit_transform",
    "load_idx",
    "load_mnist",
    "logit_to_pixels",
    "logit_transform",
    "main",
    "nll_logit_to_bits_per_dim",
    "protocol_splits",
    "split_train_validation",
    "tile_images",
    "train_validation_indices",
    "verify_checksums",
]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

#: The four standard files, by role (names without ``.gz``).
MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: MD5 of the *unpacked* IDX content. The .gz wrappers differ between mirrors (and may have been
#: recompressed), the unpacked bytes of the original 1998 release do not.
MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

#: Public mirrors of the gzipped files, tried in this order.
DEFAULT_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

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

_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions (n, rows, cols)
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension (n,)
_NDIM_OF_MAGIC = {_IMAGES_MAGIC: 3, _LABELS_MAGIC: 1}

_GET_FILES_HINT = (
    "Get them with `python -m latticeflow.mnist --download [--data-dir DIR]` (needs internet), "
    "or copy the four files {} (gzipped or not) into data/ at the repository root "
    "(see data/README.md)."
)


class MNISTFormatError(ValueError):
    """An IDX file is corrupt or inconsistent; the message names the file and the problem."""


class MNISTDownloadError(RuntimeError):
    """No mirror delivered a file with the expected content; the message lists every attempt."""


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
    return int(value)


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
# IDX files
# ---------------------------------------------------------------------------------------------


def _read_unpacked(path: Path) -> bytes:
    """The file's bytes, gunzipped when the name ends in .gz."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise MNISTFormatError(f"{path}: corrupt gzip stream ({type(err).__name__}: {err})") from err


def _parse_idx(data: bytes, path: Path, magic: int | None) -> np.ndarray:
    if len(data) < 4:
        raise MNISTFormatError(f"{path}: truncated header, file has only {len(data)} bytes")
    found = int.from_bytes(data[:4], "big")
    if found not in _NDIM_OF_MAGIC:
        raise MNISTFormatError(
            f"{path}: bad magic number 0x{found:08x}, expected 0x{_IMAGES_MAGIC:08x} (images) "
            f"or 0x{_LABELS_MAGIC:08x} (labels); is this an MNIST IDX file?"
        )
    if magic is not None and found != magic:
        kind = "images" if magic == _IMAGES_MAGIC else "labels"
        raise MNISTFormatError(
            f"{path}: magic number 0x{found:08x} but this file should hold {kind} (0x{magic:08x})"
        )
    ndim = _NDIM_OF_MAGIC[found]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MNISTFormatError(f"{path}: truncated header, {len(data)} bytes but the header needs {header}")
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = math.prod(shape)
    actual = len(data) - header
    if actual != expected:
        what = "truncated" if actual < expected else "trailing bytes"
        raise MNISTFormatError(
            f"{path}: {what}: header declares shape {shape} = {expected} bytes of data, file holds {actual}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def load_idx(path: str | os.PathLike[str], magic: int | None = None) -> np.ndarray:
    """Read one IDX file of unsigned bytes (MNIST images or labels), gzipped or not.

    The big-endian header is the magic number (0x00000803 for images, 0x00000801 for labels)
    followed by the sizes (n, rows, cols) or (n,); the data follow as uint8.

    Args:
        path: the file; a name ending in ``.gz`` is gunzipped.
        magic: the magic number the file must carry, or None to accept images or labels.

    Returns:
        array: uint8, shape (n, rows, cols) for images, (n,) for labels.

    Raises:
        FileNotFoundError: no such file.
        MNISTFormatError: corrupt gzip, bad magic number, truncated file or trailing bytes;
            the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist")
    return _parse_idx(_read_unpacked(path), path, magic)


@dataclass(frozen=True)
class MNIST:
    """The MNIST images and labels as loaded from the IDX files.

    Attributes:
        train_images: uint8, shape (60000, 784), row-major 28x28 pixels (site i = row*28 + col).
        train_labels: uint8, shape (60000,), digits 0..9.
        test_images: uint8, shape (10000, 784).
        test_labels: uint8, shape (10000,).
        directory: where the files were read from.
        image_shape: (rows, cols), (28, 28) for MNIST.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    directory: Path
    image_shape: tuple[int, int]


def default_data_dir() -> Path:
    """``data/`` at the repository root in a source checkout, else ``data/`` in the current directory."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():
        return root / "data"
    return Path.cwd() / "data"


def _candidate_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    bases = [Path(data_dir)] if data_dir is not None else [Path.cwd() / "data", default_data_dir()]
    out: list[Path] = []
    for base in bases:
        for d in (base, base / "MNIST" / "raw"):  # torchvision keeps the files in MNIST/raw
            if d.resolve() not in [c.resolve() for c in out]:
                out.append(d)
    return out


def _locate(directory: Path, name: str) -> Path | None:
    """The unpacked file if present (faster to read), else the .gz, else None."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_mnist_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The first directory holding all four MNIST files (each ``name`` or ``name.gz``).

    Args:
        data_dir: where to look (and in its ``MNIST/raw/``); None looks in ``./data`` and in
            ``data/`` at the repository root (see :func:`default_data_dir`), each with ``MNIST/raw/``.

    Returns:
        directory: the first complete directory.

    Raises:
        FileNotFoundError: no complete directory; the message lists where it looked, what was
            missing there, and how to get the files.
    """
    looked = []
    for d in _candidate_dirs(data_dir):
        if not d.is_dir():
            looked.append(f"  {d}  (no such directory)")
            continue
        missing = [name for name in MNIST_FILES.values() if _locate(d, name) is None]
        if not missing:
            return d
        looked.append(f"  {d}  (missing: {', '.join(n + '[.gz]' for n in missing)})")
    names = ", ".join(f"{n}.gz" for n in MNIST_FILES.values())
    raise FileNotFoundError(
        "MNIST IDX files not found. Looked in:\n" + "\n".join(looked) + "\n" + _GET_FILES_HINT.format(names)
    )


def load_mnist(data_dir: str | os.PathLike[str] | None = None, verify: bool = False) -> MNIST:
    """Load the four MNIST IDX files and check that they fit together.

    Args:
        data_dir: directory with the files (or with ``MNIST/raw/`` inside it); None searches
            ``./data`` and the repository's ``data/`` (see :func:`find_mnist_dir`).
        verify: also compare the MD5 of each unpacked file with :data:`MNIST_MD5`.

    Returns:
        mnist: images flattened to shape (n, rows*cols), uint8, with their uint8 labels.

    Raises:
        FileNotFoundError: the files are not there (the message says how to get them).
        MNISTFormatError: a corrupt file, image and label counts that differ, train and test
            images of different sizes, labels outside 0..9, or (verify=True) a wrong MD5.
    """
    directory = find_mnist_dir(data_dir)
    paths = {role: _locate(directory, name) for role, name in MNIST_FILES.items()}
    arrays: dict[str, np.ndarray] = {}
    for role, path in paths.items():
        assert path is not None  # find_mnist_dir guarantees all four
        data = _read_unpacked(path)
        if verify:
            name = MNIST_FILES[role]
            digest = hashlib.md5(data).hexdigest()
            if digest != MNIST_MD5[name]:
                raise MNISTFormatError(
                    f"{path}: MD5 of the unpacked content is {digest}, expected {MNIST_MD5[name]}"
                )
        arrays[role] = _parse_idx(data, path, _IMAGES_MAGIC if role.endswith("images") else _LABELS_MAGIC)

    for split in ("train", "test"):
        n_images, n_labels = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_images != n_labels:
            raise MNISTFormatError(
                f"{paths[f'{split}_images']} holds {n_images} images but {paths[f'{split}_labels']} "
                f"holds {n_labels} labels; the files do not belong together"
            )
        labels = arrays[f"{split}_labels"]
        if labels.size and labels.max() > 9:
            raise MNISTFormatError(
                f"{paths[f'{split}_labels']}: label {int(labels.max())} outside the digits 0..9"
            )
    image_shape = arrays["train_images"].shape[1:]
    if arrays["test_images"].shape[1:] != image_shape:
        raise MNISTFormatError(
            f"{paths['train_images']} holds {image_shape} images but {paths['test_images']} holds "
            f"{arrays['test_images'].shape[1:]} images"
        )
    flat = {k: (v.reshape(len(v), -1) if k.endswith("images") else v) for k, v in arrays.items()}
    return MNIST(directory=directory, image_shape=(int(image_shape[0]), int(image_shape[1])), **flat)


def verify_checksums(data_dir: str | os.PathLike[str] | None = None) -> dict[str, bool]:
    """Compare the MD5 of each unpacked file with :data:`MNIST_MD5`.

    Args:
        data_dir: as in :func:`load_mnist`.

    Returns:
        ok: file name (without .gz) -> whether its unpacked content has the expected MD5
        (False also for a corrupt gzip stream).

    Raises:
        FileNotFoundError: the four files are not all there.
    """
    directory = find_mnist_dir(data_dir)
    ok: dict[str, bool] = {}
    for name in MNIST_FILES.values():
        path = _locate(directory, name)
        assert path is not None
        try:
            ok[name] = hashlib.md5(_read_unpacked(path)).hexdigest() == MNIST_MD5[name]
        except MNISTFormatError as err:
            logger.warning("%s", err)
            ok[name] = False
    return ok


# ---------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, then rename (no half-written files)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fetch(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "latticeflow-mnist/0.1 (python urllib)"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def download_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    mirrors: Sequence[str] = DEFAULT_MIRRORS,
    timeout: float = 60.0,
    force: bool = False,
) -> Path:
    """Download the four gzipped MNIST files, checking the MD5 of their unpacked content.

    For each file the mirrors are tried in turn until one delivers content with the expected MD5
    (:data:`MNIST_MD5`); the .gz is written to a temporary file and renamed into place, so an
    interrupted download never leaves a half-written file. Files already present with the right
    content are kept unless ``force``. Only urllib is used; ``file://`` mirrors work too.

    Args:
        data_dir: target directory, created if missing; None means :func:`default_data_dir`.
        mirrors: base URLs, each followed by ``<name>.gz``.
        timeout: seconds per request.
        force: download even the files that are present and correct.

    Returns:
        directory: the directory now holding the four verified files.

    Raises:
        MNISTDownloadError: a file could not be fetched from any mirror with the right content;
            the message lists each mirror and its error.
    """
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    mirrors = [mirrors] if isinstance(mirrors, str) else list(mirrors)
    if not mirrors:
        raise ValueError("mirrors must name at least one base URL, got an empty list")
    directory.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES.values():
        expected = MNIST_MD5[name]
        present = _locate(directory, name)
        if present is not None and not force:
            try:
                if hashlib.md5(_read_unpacked(present)).hexdigest() == expected:
                    logger.info("%s: present and verified", present)
                    continue
            except MNISTFormatError:
                pass
            logger.info("%s: present but its content does not match, downloading again", present)
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + f"/{name}.gz"
            try:
                packed = _fetch(url, timeout)
                unpacked = gzip.decompress(packed)
            except (OSError, EOFError, zlib.error, ValueError) as err:  # URLError is an OSError
                errors.append(f"  {url}: {type(err).__name__}: {err}")
                continue
            digest = hashlib.md5(unpacked).hexdigest()
            if digest != expected:
                errors.append(f"  {url}: MD5 of the unpacked content is {digest}, expected {expected}")
                continue
            _atomic_write(directory / f"{name}.gz", packed)
            # An unpacked copy would shadow the .gz in _locate; refresh it with the verified bytes.
            if (directory / name).is_file():
                _atomic_write(directory / name, unpacked)
            logger.info("%s.gz: downloaded from %s and verified", name, mirror)
            break
        else:
            raise MNISTDownloadError(
                f"could not download {name}.gz into {directory}; tried these mirrors:\n"
                + "\n".join(errors)
                + "\nCheck the internet connection, or copy the four files into the directory by hand "
                "(see data/README.md)."
            )
    return directory


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
# Closed-form baseline
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _baseline_report(data_dir: str | None, seed: int, noise_seed: int) -> str:
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m latticeflow.mnist [--download] [--verify] [--baseline] [--data-dir DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m latticeflow.mnist", description=__doc__.split("\n")[0])
    parser.add_argument("--download", action="store_true", help="download the four files")
    parser.add_argument("--verify", action="store_true", help="check the MD5 of the unpacked files")
    parser.add_argument("--baseline", action="store_true", help="Gaussian baseline NLL and bits/dim")
    parser.add_argument("--data-dir", default=None, help="default: data/ at the repo root")
    parser.add_argument("--mirror", action="append", default=None, help="base URL to try (repeatable)")
    parser.add_argument("--force", action="store_true", help="download even present files")
    parser.add_argument("--seed", type=int, default=0, help="with --baseline: train/validation split seed")
    args = parser.parse_args(argv)
    if not (args.download or args.verify or args.baseline):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.download:
            mirrors = args.mirror or DEFAULT_MIRRORS
            directory = download_mnist(args.data_dir, mirrors=mirrors, force=args.force)
            print(f"MNIST files ready in {directory}")
        if args.verify:
            ok = verify_checksums(args.data_dir)
            directory = find_mnist_dir(args.data_dir)
            for name, good in ok.items():
                print(f"{'OK ' if good else 'BAD'} {directory / name}[.gz]  (expected MD5 {MNIST_MD5[name]})")
            if not all(ok.values()):
                return 1
        if args.baseline:
            print(_baseline_report(args.data_dir, args.seed, noise_seed=1))
    except (FileNotFoundError, MNISTFormatError, MNISTDownloadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

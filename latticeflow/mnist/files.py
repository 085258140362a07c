"""MNIST files: the four IDX files, their checksums, download, and the folder that holds them.

IDX (Y. LeCun's format of the MNIST release): a big-endian header, the magic number
(0x00000803 for images, 0x00000801 for labels) followed by the sizes (n, rows, cols) or (n,),
then the data as unsigned bytes. The files may be gzipped (``name.gz``).

Where the files are looked for: ``--data-dir`` when given, else ``./data`` and ``data/`` at the
repository root (each also with torchvision's ``MNIST/raw/``); the training drivers then try the
shared copy next to the checkout (:data:`SHARED_DATA_DIR`). Get the files with
``python -m latticeflow.mnist --download``; check them with ``python -m latticeflow.mnist --verify``.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_MIRRORS",
    "MNIST",
    "MNISTDownloadError",
    "MNISTFormatError",
    "MNIST_FILES",
    "MNIST_MD5",
    "SHARED_DATA_DIR",
    "default_data_dir",
    "download_mnist",
    "find_mnist_dir",
    "load_idx",
    "load_mnist",
    "verify_checksums",
]

logger = logging.getLogger("latticeflow.mnist")

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

#: The repository root of a source checkout (``latticeflow/mnist/files.py`` lies two folders down).
_REPO_ROOT = Path(__file__).resolve().parents[2]
#: Tried by :func:`latticeflow.mnist.load_data` after ``data/`` when no folder is given (the shared
#: copy next to the checkout).
SHARED_DATA_DIR = _REPO_ROOT / ".." / "shared" / "data" / "mnist"

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
    if (_REPO_ROOT / "pyproject.toml").is_file():
        return _REPO_ROOT / "data"
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

"""Tiny MNIST-format data for the tests: IDX files of 8x8 images written in a temporary folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """The IDX encoding of a uint8 array (magic 0x803 for images, 0x801 for labels)."""
    array = np.asarray(array, dtype=np.uint8)
    return magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape) + array.tobytes()


def blobs(rng: np.random.Generator, n: int) -> np.ndarray:
    """Dark 8x8 images with one bright 3x3 square: structured enough to learn something."""
    x = np.zeros((n, 8, 8), dtype=np.uint8)
    for i in range(n):
        r, c = rng.integers(0, 6, size=2)
        x[i, r : r + 3, c : c + 3] = rng.integers(120, 256)
    return x


def write_mnist(d: Path, n_train: int, n_test: int, seed: int) -> Path:
    """The four uncompressed IDX files of a tiny 8x8 'MNIST' in folder ``d``; returns ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (d / "train-images-idx3-ubyte").write_bytes(idx_bytes(blobs(rng, n_train), 0x803))
    (d / "train-labels-idx1-ubyte").write_bytes(idx_bytes(rng.integers(0, 10, n_train), 0x801))
    (d / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(blobs(rng, n_test), 0x803))
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(rng.integers(0, 10, n_test), 0x801))
    return d

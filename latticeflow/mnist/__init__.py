"""MNIST density estimation with a Monge-Ampère flow (paper section 4.1, Fig. 3, Table 1).

"Monge-Ampère Flow for Generative Modeling" (Zhang, E, Wang, arXiv:1809.10188) fits the flow to
MNIST by maximum likelihood under the data protocol of MAF (Papamakarios, Pavlakou, Murray,
arXiv:1705.07057). The package, one part per module:

- :mod:`~latticeflow.mnist.files`: the IDX files, their checksums, download, the data folder;
- :mod:`~latticeflow.mnist.protocol`: the 50k/10k/10k split, dequantisation, the logit transform
  (λ = 1e-6), bits/dim, minibatches, and the three sets of a run (:func:`load_data`);
- :mod:`~latticeflow.mnist.baseline`: the closed-form full-covariance Gaussian and its whitening;
- :mod:`~latticeflow.mnist.config`: :class:`MNISTConfig`, the paper's configuration as defaults;
- :mod:`~latticeflow.mnist.model`: the flow builder, and :class:`AffineFlow`, the whitening as an
  exact affine map in front of any flow (:class:`WhitenedDensity`: in front of any density model);
- :mod:`~latticeflow.mnist.train`: :class:`DensityTrainer`, maximum likelihood with early stopping.

``python -m latticeflow.mnist`` downloads and checks the files and prints the Gaussian baseline;
``python -m models.mnist`` trains.

Example:
    >>> from latticeflow.mnist import MNIST_PAPER, load_data, make_trainer
    >>> cfg = MNIST_PAPER.replace(n_train=2000, n_eval=500, hidden=128, n_steps=20, step_size=0.5)
    >>> trainer = make_trainer(cfg, load_data(None, cfg), progress=False)  # doctest: +SKIP
    >>> log = trainer.fit(2)                                                 # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from .baseline import GaussianBaseline, Whitening, baseline_report, fit_whitening
from .config import DTYPES, MNIST_PAPER, POTENTIALS, MNISTConfig, as_config
from .files import (
    DEFAULT_MIRRORS,
    MNIST,
    MNIST_FILES,
    MNIST_MD5,
    SHARED_DATA_DIR,
    MNISTDownloadError,
    MNISTFormatError,
    default_data_dir,
    download_mnist,
    find_mnist_dir,
    load_idx,
    load_mnist,
    verify_checksums,
)
from .model import AffineFlow, WhitenedDensity, build_flow, build_model, gaussianization_frames, inner_flow, log_prob
from .protocol import (
    LAMBDA,
    PAPER_TEST_NLL,
    DequantizedBatches,
    MNISTData,
    dequantize,
    inverse_logit_transform,
    load_data,
    logit_to_pixels,
    logit_transform,
    nll_logit_to_bits_per_dim,
    protocol_splits,
    split_train_validation,
    tile_images,
    train_validation_indices,
)
from .train import DensityTrainer, make_trainer

__all__ = [
    "DEFAULT_MIRRORS",
    "DTYPES",
    "LAMBDA",
    "MNIST",
    "MNIST_FILES",
    "MNIST_MD5",
    "MNIST_PAPER",
    "PAPER_TEST_NLL",
    "POTENTIALS",
    "SHARED_DATA_DIR",
    "AffineFlow",
    "DensityTrainer",
    "DequantizedBatches",
    "GaussianBaseline",
    "MNISTConfig",
    "MNISTData",
    "MNISTDownloadError",
    "MNISTFormatError",
    "WhitenedDensity",
    "Whitening",
    "as_config",
    "baseline_report",
    "build_flow",
    "build_model",
    "default_data_dir",
    "dequantize",
    "download_mnist",
    "find_mnist_dir",
    "fit_whitening",
    "gaussianization_frames",
    "inner_flow",
    "inverse_logit_transform",
    "load_data",
    "load_idx",
    "load_mnist",
    "log_prob",
    "logit_to_pixels",
    "logit_transform",
    "main",
    "make_trainer",
    "nll_logit_to_bits_per_dim",
    "protocol_splits",
    "split_train_validation",
    "tile_images",
    "train_validation_indices",
    "verify_checksums",
]


def __getattr__(name: str) -> Any:
    # main lives in __main__.py; importing it eagerly would make `python -m latticeflow.mnist`
    # find the module already loaded (runpy's RuntimeWarning)
    if name == "main":
        from .__main__ import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

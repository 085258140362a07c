"""Density estimation of MNIST with a Monge-Ampère flow (paper section 4.1, Fig. 3, Table 1).

"Monge-Ampère Flow for Generative Modeling" (Zhang, E, Wang, arXiv:1809.10188) fits the flow
by maximum likelihood: the negative log-likelihood (eq. 6)

    NLL = −E_{y∼π} [ln p_Y(y, T)],   ln p_Y(y, T) = ln N(z) − ∫₀ᵀ ∇²φ(y(t)) dt,  z = y(0),

is computed by integrating each (dequantised, logit-transformed) training image backward from
t = T to 0 (``MongeAmpereFlow.log_prob``) and minimised with Adam. The data protocol is MAF's
(``latticeflow.mnist``): 50,000 / 10,000 / 10,000 train / validation / test images, fresh
uniform dequantisation noise every training epoch, one fixed noise draw for validation and
test, y = logit(λ + (1 − 2λ) u) with λ = 1e-6. NLLs are in nats in logit space (the paper's
Table 1 convention); bits/dim are in pixel space (``nll_logit_to_bits_per_dim``).

The defaults are the paper's configuration (section 4.1, appendix C Table 2): MLP potential
with softplus and h = 1024 hidden units, 100 RK4 steps of ε = 0.1 (T = 10), minibatch 100,
Adam at 1e-3; early stopping on the validation NLL (patience 30 epochs, as in MAF) keeps the
best model in ``best.pt``. Gradient checkpointing through the integration is on by default.

``--whiten`` (off by default; not in the paper) puts a fixed affine map in front of the flow,
y' = Σ^{-1/2}(y − μ), with μ and Σ the mean and covariance of the logit training set under one
fixed dequantisation draw (seed ``eval_seed``), fitted by ``latticeflow.mnist.GaussianBaseline``
(one pass over the training data, identical on every rank). The density becomes
ln p_Y(y) = ln p_flow(y') + ln|det Σ^{-1/2}|, so the identity flow at initialisation *is* the
full-covariance Gaussian baseline (≈ 1366 nats on the test set instead of N(0, I)'s thousands)
and training starts from there. μ, Σ^{-1/2}, Σ^{1/2} and the log-determinant are buffers of the
model (``WhitenedFlow``), saved in every checkpoint; samples are mapped back, y = Σ^{1/2} y' + μ.

Outputs in ``--out``: ``log.csv`` (per epoch: train / validation / test NLL in nats and
bits/dim with standard errors), ``checkpoint.pt`` (every epoch, exact resume), ``best.pt``,
``config.json``, ``summary.json`` and the figures ``samples``, ``gaussianization`` (Fig. 3b)
and ``nll`` (Fig. 3a), each as PNG and PDF.

    python -m models.mnist                                  # paper configuration (days on a CPU)
    python -m models.mnist --n-train 2000 --n-eval 500 --hidden 128 --n-steps 20 --step-size 0.5
    python -m models.mnist --whiten --n-train 2000 --n-eval 500 --hidden 128 --n-steps 20 --step-size 0.5
    python -m models.mnist --resume runs/mnist/checkpoint.pt
    torchrun --nproc_per_node=8 models/mnist.py --device cuda --tf32   # data parallel

On a CPU shared with other busy processes use ``--threads 1``: torch's threads wait for each
other at every one of the thousands of small parallel regions of an iteration, and a descheduled
thread stalls them all (measured here: 70x slower with 2 threads on 2 busy cores).

An interruption (SIGINT/SIGTERM, ``--max-minutes``) in the middle of an epoch ends that epoch
early (its row records how many training images it saw), evaluates, checkpoints and stops;
resuming starts the next epoch. Resuming from an epoch boundary reproduces an uninterrupted run
exactly.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script (e.g. by torchrun): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from latticeflow import distributed as dist  # noqa: E402
from latticeflow.checkpoint import check_kind, load_checkpoint, save_checkpoint  # noqa: E402
from latticeflow.cli import (  # noqa: E402
    checkpoint_file,
    int_at_least,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    run_cli,
)
from latticeflow.flow import MongeAmpereFlow  # noqa: E402
from latticeflow.mnist import (  # noqa: E402
    PAPER_TEST_NLL,
    DequantizedBatches,
    GaussianBaseline,
    MNISTFormatError,
    Whitening,
    load_mnist,
    logit_to_pixels,
    nll_logit_to_bits_per_dim,
    split_train_validation,
)
from latticeflow.potentials import ConvPotential, MLPPotential, Potential  # noqa: E402
from latticeflow.runs import RunFolder, claim_on_main, default_folder, link_latest, provenance, write_json  # noqa: E402
from latticeflow.train import Trainer  # noqa: E402

__all__ = [
    "DEFAULT",
    "DTYPES",
    "POTENTIALS",
    "REPO_ROOT",
    "SHARED_DATA_DIR",
    "DensityTrainer",
    "MNISTData",
    "WhitenedFlow",
    "build_flow",
    "build_model",
    "cli",
    "config_from_args",
    "fit_whitening",
    "gaussianization_frames",
    "load_data",
    "log_prob",
    "main",
    "make_figures",
    "make_trainer",
    "parse_args",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Tried after ``data/`` when ``--data-dir`` is not given (the shared copy next to the checkout).
SHARED_DATA_DIR = REPO_ROOT / ".." / "shared" / "data" / "mnist"

POTENTIALS = ("mlp", "conv")
DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: The paper's configuration (section 4.1, appendix C Table 2) plus the MAF protocol.
DEFAULT: dict[str, Any] = {
    "potential": "mlp",
    "hidden": 1024,
    "activation": "softplus",
    "channels": 16,  # conv potential only
    "layers": 1,  # conv potential only
    "kernel_size": 5,  # conv potential only
    "init_scale": 1e-3,
    "n_steps": 100,
    "step_size": 0.1,
    "batch": 100,
    "lr": 1e-3,
    "grad_clip": None,
    "epochs": 1000,  # an upper bound: early stopping ends the run
    "patience": 30,
    "n_train": None,
    "n_validation": 10000,
    "n_eval": None,
    "split_seed": 0,
    "eval_seed": 1,
    "eval_batch": 500,
    "dtype": "float32",
    "grad_checkpoint": True,
    "whiten": False,  # not the paper's: a fixed Gaussian-baseline whitening in front of the flow
    "seed": 0,
}

#: Keys a resumed run may change; any other explicit flag must agree with the checkpoint.
RESUME_OVERRIDES = ("epochs", "patience", "eval_batch", "grad_checkpoint")
#: Files a run writes besides checkpoint, log, config and summary (removed by --force with them).
OUTPUTS = ("best.pt", *(f"{name}.{ext}" for name in ("samples", "gaussianization", "nll") for ext in ("png", "pdf")))


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate a config dict (once, at the boundary); return it completed with DEFAULT."""
    cfg = {**DEFAULT, **config}
    unknown = sorted(set(cfg) - set(DEFAULT))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(DEFAULT)}")
    if cfg["potential"] not in POTENTIALS:
        raise ValueError(f"potential must be one of {', '.join(map(repr, POTENTIALS))}; got potential={cfg['potential']!r}")
    if cfg["dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(repr, DTYPES))}; got dtype={cfg['dtype']!r}")
    for key in ("hidden", "channels", "layers", "kernel_size", "n_steps", "batch", "epochs", "eval_batch", "n_validation"):
        value = cfg[key]
        minimum = 0 if key == "n_validation" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{key} must be an integer >= {minimum}, got {key}={value!r}")
    for key in ("n_train", "n_eval"):
        value = cfg[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
            raise ValueError(f"{key} must be None (all images) or an integer >= 2, got {key}={value!r}")
    value = cfg["patience"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"patience must be None (no early stopping) or an integer >= 1, got patience={value!r}")
    for key in ("step_size", "lr"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{key} must be a finite number > 0, got {key}={value!r}")
    if cfg["grad_clip"] is not None and not cfg["grad_clip"] > 0:
        raise ValueError(f"grad_clip must be None or a number > 0, got grad_clip={cfg['grad_clip']!r}")
    if not isinstance(cfg["whiten"], bool):
        raise ValueError(f"whiten must be True or False, got whiten={cfg['whiten']!r}")
    return cfg


# ---------------------------------------------------------------------------------------------
# Data
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


def load_data(data_dir: str | Path | None, config: dict[str, Any]) -> MNISTData:
    """Load MNIST and split it as in the paper (MAF protocol), with optional subsets.

    Args:
        data_dir: directory with the four IDX files; None tries ``data/`` (as
            ``latticeflow.mnist.find_mnist_dir`` does) and then :data:`SHARED_DATA_DIR`.
        config: uses ``n_validation``, ``split_seed``, ``n_train`` (first images of the training
            split) and ``n_eval`` (first images of validation and of test).

    Returns:
        data: the three sets.

    Raises:
        FileNotFoundError: the files are not there; the data module's message (where it looked
            and how to get them), plus the shared directory when that was tried too.
        MNISTFormatError: corrupt files, or fewer training images than n_validation + 2.
    """
    cfg = _check_config(config)
    if data_dir is not None:
        mnist = load_mnist(data_dir)
    else:
        try:
            mnist = load_mnist(None)
        except FileNotFoundError as first:
            try:
                mnist = load_mnist(SHARED_DATA_DIR)
            except FileNotFoundError:
                raise FileNotFoundError(f"{first}\nAlso looked in {SHARED_DATA_DIR.resolve()} "
                                        "(the shared copy); pass --data-dir DIR.") from None
    n_total = len(mnist.train_images)
    if cfg["n_validation"] > n_total - 2:
        raise MNISTFormatError(f"{mnist.directory}: {n_total} training images cannot give n_validation="
                               f"{cfg['n_validation']} and leave at least 2 for training; lower --n-validation")
    train, validation = split_train_validation(mnist.train_images, cfg["n_validation"], cfg["split_seed"])
    train, validation, test = (torch.from_numpy(a.copy()) for a in (train, validation, mnist.test_images))
    if cfg["n_train"] is not None:
        train = train[: cfg["n_train"]]
    if cfg["n_eval"] is not None:
        validation, test = validation[: cfg["n_eval"]], test[: cfg["n_eval"]]
    return MNISTData(train, validation, test, mnist.image_shape, mnist.directory)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def build_flow(config: dict[str, Any], dim: int, image_shape: tuple[int, int] | None = None) -> MongeAmpereFlow:
    """The flow described by ``config`` for D = ``dim`` pixels, in the config's dtype.

    ``potential="mlp"`` is the paper's φ(y) = Σ_k w_k a(W_k·y + b_k) (section 3);
    ``potential="conv"`` is a translation-invariant convolutional potential on the periodic
    rows×cols image (no D4 or Z2 tying: digits have neither symmetry), which needs square images.

    Args:
        config: see :data:`DEFAULT`.
        dim: D.
        image_shape: (rows, cols); needed for the conv potential.

    Returns:
        flow: a :class:`~latticeflow.flow.MongeAmpereFlow` with RK4 steps.
    """
    cfg = _check_config(config)
    pot: Potential
    if cfg["potential"] == "mlp":
        pot = MLPPotential(dim, cfg["hidden"], activation=cfg["activation"], init_scale=cfg["init_scale"])
    else:
        if image_shape is None or image_shape[0] != image_shape[1] or image_shape[0] ** 2 != dim:
            raise ValueError(f"potential='conv' needs square images with rows*cols = dim={dim}, "
                             f"got image_shape={image_shape!r}")
        pot = ConvPotential(image_shape[0], channels=cfg["channels"], layers=cfg["layers"],
                            kernel_size=cfg["kernel_size"], activation=cfg["activation"],
                            init_scale=cfg["init_scale"])
    flow = MongeAmpereFlow(pot, n_steps=cfg["n_steps"], step_size=cfg["step_size"], method="rk4",
                           checkpoint=cfg["grad_checkpoint"])
    return flow.to(DTYPES[cfg["dtype"]])


def fit_whitening(train: Tensor, noise_seed: int) -> Whitening:
    """μ, Σ^{-1/2}, Σ^{1/2} and ln|det Σ^{-1/2}| of the logit training set: the Gaussian baseline's fit.

    One fixed dequantisation draw of ``train`` (``DequantizedBatches(..., seed=noise_seed)``,
    float64) is fitted by ``GaussianBaseline.fit`` and decomposed by
    ``GaussianBaseline.whitening`` (eigenvalue floor 1e-12 of the largest, see there). The driver
    passes ``eval_seed``, the training-noise seed of ``python -m latticeflow.mnist --baseline``
    and ``benchmarks/mnist_baselines.py``, so the whitened identity flow is exactly their
    Gaussian. One pass over the data; deterministic, so every rank computes the same tensors
    (and DDP broadcasts rank 0's buffers besides).

    Args:
        train: uint8 training pixels, shape (N, D), N >= 2.
        noise_seed: seed of the dequantisation draw.

    Returns:
        whitening: float64 tensors, see :class:`latticeflow.mnist.Whitening`.
    """
    y, _ = DequantizedBatches(train, seed=noise_seed, dtype=torch.float64).fixed()
    return GaussianBaseline.fit(y).whitening()


class WhitenedFlow(nn.Module):
    """A flow behind a fixed affine whitening: ln p(y) = ln p_flow(y') + ln|det Σ^{-1/2}|, y' = Σ^{-1/2}(y − μ).

    The map is exactly invertible (y = Σ^{1/2} y' + μ) and has no parameters: μ, Σ^{-1/2},
    Σ^{1/2} and the constant ln|det Σ^{-1/2}| are buffers (``mean``, ``inv_sqrt``, ``sqrt``,
    ``log_det``), so they are saved and restored with the state_dict, follow ``.to()``, and
    DDP broadcasts rank 0's. With an identity flow the model is N(μ, Σ).

    Args:
        flow: the Monge-Ampère flow, acting on whitened images.
        whitening: from :func:`fit_whitening` (any float dtype; stored in the flow's dtype and on
            its device), or None for the identity map as a placeholder that a checkpoint's
            state_dict then overwrites.
    """

    def __init__(self, flow: MongeAmpereFlow, whitening: Whitening | None = None) -> None:
        super().__init__()
        self.flow = flow
        D = flow.dim
        if whitening is None:
            eye = torch.eye(D, dtype=torch.float64)
            whitening = Whitening(torch.zeros(D, dtype=torch.float64), eye, eye.clone(),
                                  torch.zeros((), dtype=torch.float64))
        shapes = {"mean": (D,), "inv_sqrt": (D, D), "sqrt": (D, D), "log_det": ()}
        for name, shape in shapes.items():
            value = getattr(whitening, name)
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                raise ValueError(f"whitening.{name} must be a tensor of shape {shape} for the flow's D={D}, "
                                 f"got {tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}")
            self.register_buffer(name, value.detach().to(device=flow.device, dtype=flow.dtype).clone())

    # the flow's settings, so that the driver treats both models alike
    @property
    def dim(self) -> int:
        return self.flow.dim

    @property
    def potential(self) -> nn.Module:
        return self.flow.potential

    @property
    def n_steps(self) -> int:
        return self.flow.n_steps

    @property
    def step_size(self) -> float:
        return self.flow.step_size

    @property
    def total_time(self) -> float:
        return self.flow.total_time

    @property
    def dtype(self) -> torch.dtype:
        return self.flow.dtype

    @property
    def device(self) -> torch.device:
        return self.flow.device

    def whiten(self, y: Tensor) -> Tensor:
        """y' = Σ^{-1/2}(y − μ) for logit images y of shape (B, D) (row vectors; Σ^{-1/2} is symmetric)."""
        return (y - self.mean) @ self.inv_sqrt

    def unwhiten(self, y: Tensor) -> Tensor:
        """y = Σ^{1/2} y' + μ, the inverse of :meth:`whiten`."""
        return y @ self.sqrt + self.mean

    def log_prob(self, y: Tensor, generator: torch.Generator | None = None, noise: Any = None) -> Tensor:
        """ln p(y) = ln p_flow(Σ^{-1/2}(y − μ)) + ln|det Σ^{-1/2}|, shape (B,); y in the flow's dtype."""
        return self.flow.log_prob(self.whiten(y), generator=generator, noise=noise) + self.log_det

    def forward(self, y: Tensor) -> Tensor:
        """Alias for :meth:`log_prob`, as for the flow (DDP calls this)."""
        return self.log_prob(y)

    def sample(self, n: int, generator: torch.Generator | None = None, noise: Any = None) -> tuple[Tensor, Tensor]:
        """n samples in logit space, shape (n, D), and their ln p, shape (n,)."""
        x, logp = self.flow.sample(n, generator=generator, noise=noise)
        return self.unwhiten(x), logp + self.log_det


def build_model(config: dict[str, Any], data: MNISTData, fit: bool = True) -> MongeAmpereFlow | WhitenedFlow:
    """The model of ``config``: :func:`build_flow`, behind a :class:`WhitenedFlow` if ``whiten``.

    Args:
        config: see :data:`DEFAULT`.
        data: the sets (D, image shape, and with ``whiten`` the training pixels for the fit).
        fit: fit the whitening (:func:`fit_whitening` on ``data.train``, noise seed ``eval_seed``);
            False leaves identity placeholders for a checkpoint to fill (saves the pass on resume).

    Returns:
        model: in the config's dtype, on the CPU.
    """
    cfg = _check_config(config)
    flow = build_flow(cfg, data.dim, data.image_shape)
    if not cfg["whiten"]:
        return flow
    return WhitenedFlow(flow, fit_whitening(data.train, cfg["eval_seed"]) if fit else None)


@torch.no_grad()
def log_prob(flow: MongeAmpereFlow | WhitenedFlow, y: Tensor, batch_size: int = 500) -> Tensor:
    """ln p_Y(y, T) of logit images by backward integration, in batches, without gradients.

    Args:
        flow: the model (a :class:`WhitenedFlow` includes its whitening).
        y: logit images, shape (B, D), any floating dtype (converted to the flow's).
        batch_size: images per integration.

    Returns:
        logp: shape (B,), float64, nats.
    """
    out = [flow.log_prob(chunk.to(flow.device, flow.dtype)).double().cpu() for chunk in y.split(batch_size)]
    return torch.cat(out)


def _stats(total: Tensor) -> dict[str, float]:
    """Mean and standard error from [n, Σnll, Σnll², Σbpd, Σbpd²] (float64)."""
    n, s1, s2, b1, b2 = (float(v) for v in total)

    def stderr(sum1: float, sum2: float) -> float:
        if n < 2:  # undefined; 0 rather than NaN, which the Trainer would take for divergence
            return 0.0
        var = max(sum2 - sum1 * sum1 / n, 0.0) / (n - 1)
        return math.sqrt(var / n)

    return {"nll": s1 / n, "nll_stderr": stderr(s1, s2), "bpd": b1 / n, "bpd_stderr": stderr(b1, b2), "images": n}


def _sums(nll: Tensor, bpd: Tensor) -> Tensor:
    nll, bpd = nll.double(), bpd.double()
    return torch.stack([nll.new_tensor(float(nll.numel())), nll.sum(), nll.square().sum(), bpd.sum(),
                        bpd.square().sum()])


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class DensityTrainer(Trainer):
    """Maximum-likelihood training of a flow on MNIST (paper eq. 6) with early stopping.

    One epoch is one pass over the training set in minibatches with fresh dequantisation noise
    (drawn, like the shuffle, from the trainer's generator, so resume is exact), followed by
    the NLL of the validation and test sets with their fixed noise. Under torchrun, rank r
    trains on every world_size-th minibatch and evaluates every world_size-th evaluation batch;
    gradients are averaged by DDP and the sums behind the means and standard errors by
    all-reduce.

    The record of an epoch holds ``loss`` (the mean training NLL), and for ``train``,
    ``validation`` and ``test``: ``{set}_nll``, ``{set}_nll_stderr`` (nats, logit space),
    ``{set}_bpd``, ``{set}_bpd_stderr`` (bits/dim, pixel space), ``{set}_images``. The training
    numbers average over the epoch while the model changes (as in the paper's Fig. 3a).

    Early stopping: after ``patience`` epochs without a lower validation NLL, :meth:`fit`
    stops. Whenever the validation NLL improves, the model is saved to ``out_dir/best.pt``.
    The best epoch is read off the log, so a resumed run continues the count.

    Args:
        model: the flow (or :class:`WhitenedFlow`), or a DistributedDataParallel wrapper of it.
        optimizer: over the flow's parameters.
        data: the three sets.
        batch_size: global minibatch (the paper's 100).
        eval_batch: images per evaluation integration.
        patience: epochs without improvement before stopping; None never stops early.
        eval_seed: validation noise is drawn with seed eval_seed + 1, test with eval_seed + 2
            (as ``python -m latticeflow.mnist --baseline`` does, so the test y are the same).
        grad_clip: clip the gradient norm at this value (None: no clipping).
        device: where the model lives; batches are made on the CPU and moved there.
        progress: a tqdm bar over the minibatches of each epoch.
        **kwargs: passed to :class:`~latticeflow.train.Trainer` (config, out_dir, generator).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: MNISTData, *,
                 batch_size: int = 100, eval_batch: int = 500, patience: int | None = 30, eval_seed: int = 1,
                 grad_clip: float | None = None, device: torch.device | str = "cpu", progress: bool = True,
                 **kwargs: Any) -> None:
        if kwargs.get("generator") is not None and kwargs["generator"].device.type != "cpu":
            raise ValueError("the generator must be a CPU torch.Generator (dequantisation noise is drawn on the "
                             f"CPU), got one on {kwargs['generator'].device}")
        kwargs.setdefault("kind", "mnist")
        super().__init__(model, optimizer, progress=False, checkpoint_every=1, **kwargs)
        self.flow: MongeAmpereFlow | WhitenedFlow = model.module if hasattr(model, "module") else model
        self.data = data
        self.batch_size = int(batch_size)
        self.eval_batch = int(eval_batch)
        self.patience = patience
        self.grad_clip = grad_clip
        self.device = torch.device(device)
        self.show_progress = progress
        self.deadline: float | None = None
        self.stop_reason: str | None = None
        self.eval_sets = {
            name: DequantizedBatches(getattr(data, name), self.eval_batch, seed=eval_seed + k, dtype=torch.float64)
            for k, name in ((1, "validation"), (2, "test"))
        }

    # ------------------------------------------------------------------ early stopping
    @property
    def best_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "best.pt"

    @property
    def best_epoch(self) -> int | None:
        """Epoch (1-based) of the lowest validation NLL so far (the first one on ties), or None."""
        rows = [r for r in self.records if math.isfinite(r.get("validation_nll", float("nan")))]
        if not rows:
            return None
        return int(min(rows, key=lambda r: r["validation_nll"])["epoch"])

    def should_stop_early(self) -> bool:
        """True when ``patience`` epochs have passed since the best validation NLL."""
        best = self.best_epoch
        return self.patience is not None and best is not None and self.epoch - best >= self.patience

    def save_best(self, epoch: int, validation_nll: float) -> Path | None:
        """Write the flow's weights and config to ``best.pt`` (rank 0 only)."""
        if self.best_path is None or not dist.is_main():
            return None
        return save_checkpoint({"format": "latticeflow-mnist-best-1", "config": self.config, "epoch": epoch,
                                "validation_nll": validation_nll, "model": self.flow.state_dict()}, self.best_path)

    # ------------------------------------------------------------------ evaluation
    def _step_flags(self, loss: Tensor) -> tuple[bool, bool]:
        """(non-finite loss, signal or deadline), agreed by all ranks in one all-reduce, so that
        no rank leaves the epoch while the others wait for it in a collective."""
        flags = torch.tensor([float(not torch.isfinite(loss.detach()).item()),
                              float(self._stop_signal is not None
                                    or (self.deadline is not None and time.perf_counter() > self.deadline))])
        if dist.world_size() > 1:
            flags = dist.all_reduce_sum(flags.to(self.device)).cpu()
        return bool(flags[0] > 0), bool(flags[1] > 0)

    @torch.no_grad()
    def log_prob_set(self, name: str) -> tuple[Tensor, Tensor]:
        """ln p_Y and the logit log-Jacobian of the whole ``validation`` or ``test`` set (this rank).

        Returns:
            logp: shape (N,), float64; log_det: shape (N,), float64 (see ``logit_transform``).
        """
        y, log_det = self.eval_sets[name].fixed()
        return log_prob(self.flow, y, self.eval_batch), log_det

    @torch.no_grad()
    def evaluate(self, name: str) -> dict[str, float]:
        """NLL (nats, logit space) and bits/dim with standard errors on ``validation`` or ``test``.

        Returns:
            stats: ``nll``, ``nll_stderr``, ``bpd``, ``bpd_stderr``, ``images``.
        """
        if name not in self.eval_sets:
            raise ValueError(f"name must be one of {', '.join(map(repr, self.eval_sets))}; got name={name!r}")
        was_training = self.flow.training
        self.flow.eval()
        D = self.data.dim
        total = torch.zeros(5, dtype=torch.float64)
        rank, world = dist.rank(), dist.world_size()
        for k, (y, log_det) in enumerate(self.eval_sets[name]):
            if k % world != rank:
                continue
            logp = self.flow.log_prob(y.to(self.device, self.flow.dtype)).double().cpu()
            total += _sums(-logp, nll_logit_to_bits_per_dim(logp, log_det, D))
        self.flow.train(was_training)
        return _stats(dist.all_reduce_sum(total.to(self.device)).cpu())

    # ------------------------------------------------------------------ one epoch
    def run_epoch(self, epoch: int) -> dict[str, float]:
        self.flow.train()
        D = self.data.dim
        batches = DequantizedBatches(self.data.train, self.batch_size, generator=self.generator, dtype=torch.float64)
        rank, world = dist.rank(), dist.world_size()
        usable = len(batches) - len(batches) % world  # equal step counts on every rank
        if usable == 0:
            raise ValueError(f"{len(batches)} minibatch(es) of {self.batch_size} cannot be shared by {world} processes")
        bar = tqdm(total=usable // world, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True,
                   disable=not (self.show_progress and dist.is_main()))
        total = torch.zeros(5, dtype=torch.float64)
        t0 = time.perf_counter()
        try:
            for k, (y, log_det) in enumerate(batches):
                if k >= usable:
                    break
                if k % world != rank:
                    continue  # the noise of every batch is drawn on every rank: generators stay in step
                logp = self.model(y.to(self.device, self.flow.dtype))  # flow.forward is log_prob (eq. 6)
                loss = -logp.mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nonfinite, interrupted = self._step_flags(loss)
                if nonfinite:  # before the step: the parameters stay finite
                    return {"loss": float("nan")}
                if self.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.flow.parameters(), self.grad_clip)
                self.optimizer.step()
                logp = logp.detach().double().cpu()
                total += _sums(-logp, nll_logit_to_bits_per_dim(logp, log_det, D))
                bar.update(1)
                bar.set_postfix(nll=f"{-float(logp.mean()):.1f}")
                if interrupted:  # checked after a step, so a partial epoch has trained on something
                    break
        finally:
            bar.close()
        train_seconds = time.perf_counter() - t0
        train = _stats(dist.all_reduce_sum(total.to(self.device)).cpu())
        record = self._record(train, train_seconds)
        best = self.best_epoch
        best_nll = self.records[best - 1]["validation_nll"] if best is not None else math.inf
        if record["validation_nll"] < best_nll:
            self.save_best(epoch + 1, record["validation_nll"])
        return record

    def _record(self, train: dict[str, float], train_seconds: float) -> dict[str, float]:
        record: dict[str, float] = {"loss": train["nll"]}
        for name, stats in (("train", train), ("validation", self.evaluate("validation")), ("test", self.evaluate("test"))):
            for key, value in stats.items():
                record[f"{name}_{key}"] = int(value) if key == "images" else value
        record["train_seconds"] = train_seconds
        return record

    def postfix(self, record: dict[str, float]) -> dict[str, str]:
        return {"val": f"{record['validation_nll']:.1f}", "test": f"{record['test_nll']:.1f}"}

    #: an epoch's record ends with the validation of its final state, so the state at the start of
    #: the diverging epoch is the one a good loss vouches for (see Trainer.divergence)
    verified_lag = 1

    def loss_scale(self, record: dict[str, float]) -> float | None:
        """Per-image standard deviation of the training NLL (from its standard error)."""
        if "train_nll_stderr" not in record:
            return None
        return record["train_nll_stderr"] * math.sqrt(max(1, record.get("train_images", 1)))

    # ------------------------------------------------------------------ loop
    def fit(self, epochs: int, max_minutes: float | None = None) -> Any:
        """Train until ``epochs`` epochs in all, early stopping, ``max_minutes`` or a signal.

        Each epoch runs through :meth:`Trainer.fit`, so every epoch is checkpointed and logged;
        a signal or the wall-clock budget also ends the epoch in progress early.

        Returns:
            log: the training log (pandas DataFrame); ``self.stop_reason`` says why it ended.
        """
        start = time.perf_counter()
        self.deadline = None if max_minutes is None else start + 60.0 * max_minutes
        self.stop_reason = "epochs"
        restore_signals = self.catch_signals()  # also catch signals between epochs
        try:
            while self.epoch < epochs:
                if self.should_stop_early():
                    self.stop_reason = "early stopping"
                    if dist.is_main():
                        print(f"early stopping: no lower validation NLL for {self.epoch - self.best_epoch} epochs "
                              f"(patience {self.patience}); best epoch {self.best_epoch}")
                    break
                # collective: every rank takes the same branch (signal or deadline on any rank)
                stop_signal, late = self.agree_to_stop(self.deadline is not None and time.perf_counter() >= self.deadline)
                if stop_signal is not None:
                    self.stop_reason, self.stop_signal = "signal", stop_signal
                    break
                if late:
                    self.stop_reason = "time"
                    break
                # one epoch; it checkpoints (epoch == its target) and ends early itself on the deadline
                super().fit(self.epoch + 1)
                stop_signal, late = self.agree_to_stop(self.deadline is not None and time.perf_counter() > self.deadline)
                if stop_signal is not None:
                    self.stop_reason, self.stop_signal = "signal", stop_signal
                    break
                if late:
                    self.stop_reason = "time"
                    if dist.is_main():
                        print(f"wall-clock budget of {max_minutes:g} min reached after epoch {self.epoch}; "
                              f"checkpoint {self.last_checkpoint}")
                    break
        finally:
            restore_signals()
            self.deadline = None
        return self.log


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def gaussianization_frames(flow: MongeAmpereFlow | WhitenedFlow, y: Tensor,
                           n_times: int = 6) -> tuple[list[float], Tensor]:
    """Snapshots of images integrated backward from t = T to 0 (paper Fig. 3b).

    One backward integration (``inverse_map``) with a callback that keeps the state at
    ``n_times`` times evenly spaced on the step grid, T first and 0 last. For a
    :class:`WhitenedFlow` the flow integrates y' = Σ^{-1/2}(y − μ) and each state is shown in
    data coordinates, Σ^{1/2} y'(t) + μ: the first frame is the image, the last its latent point
    as the Gaussian baseline N(μ, Σ) would draw it.

    Args:
        flow: the model.
        y: logit images at t = T, shape (B, D).
        n_times: number of snapshots, >= 2.

    Returns:
        times: the n_times times, decreasing from T to 0.
        frames: shape (n_times, B, D), the logit-space states y(t), float64.
    """
    if isinstance(n_times, bool) or not isinstance(n_times, int) or n_times < 2:
        raise ValueError(f"n_times must be an integer >= 2, got n_times={n_times!r}")
    n = flow.n_steps
    keep = sorted({round(j * n / (n_times - 1)) for j in range(n_times)})  # steps taken at each snapshot
    x = y.to(flow.device, flow.dtype)
    frames = {0: x.double().cpu()}
    inner, to_data = flow, (lambda z: z)
    if isinstance(flow, WhitenedFlow):
        inner, to_data, x = flow.flow, flow.unwhiten, flow.whiten(x)

    def callback(k: int, t: float, z: Tensor, dlogp: Tensor) -> None:  # noqa: ARG001
        if k + 1 in keep:
            frames[k + 1] = to_data(z).double().cpu()

    inner.inverse_map(x, callback=callback)
    times = [flow.total_time - s * flow.step_size for s in keep]
    return times, torch.stack([frames[s] for s in keep])


@torch.no_grad()
def make_figures(flow: MongeAmpereFlow | WhitenedFlow, log: Any, test_y: Tensor, out_dir: str | Path,
                 image_shape: tuple[int, int], n_samples: int = 100, seed: int = 0,
                 reference: dict[str, tuple[float, float]] | None = None) -> list[Path]:
    """Samples, the Gaussianisation of test digits (Fig. 3b) and the NLL curves (Fig. 3a).

    Args:
        flow: the model.
        log: training log with the per-epoch NLL columns.
        test_y: logit test images to flow backward, shape (B, D) (the first 10 are used).
        out_dir: folder for ``samples``, ``gaussianization`` and ``nll`` (.png and .pdf).
        image_shape: (rows, cols).
        n_samples: number of generated images.
        seed: seed of the latent draw.
        reference: reference lines for the NLL plot (the paper's Table 1), None for none.

    Returns:
        the PNG paths.
    """
    from analysis.mnist_plots import plot_gaussianization, plot_nll_curves, plot_samples

    out = Path(out_dir)
    was_training = flow.training
    flow.eval()
    x, _ = flow.sample(n_samples, generator=torch.Generator(device=flow.device).manual_seed(seed))
    paths = [plot_samples(logit_to_pixels(x.double().cpu()), out / "samples", image_shape,
                          title=f"{n_samples} samples (T = {flow.total_time:g})")]
    times, frames = gaussianization_frames(flow, test_y[:10])
    paths.append(plot_gaussianization(logit_to_pixels(frames), times, out / "gaussianization", image_shape))
    paths.append(plot_nll_curves(log, out / "nll", reference=reference))
    flow.train(was_training)
    return paths


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Flags; config flags left out stay None (then the defaults, or the resumed checkpoint's, apply)."""
    d = DEFAULT
    p = argparse.ArgumentParser(prog="python -m models.mnist", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model (defaults: the paper's configuration)")
    g.add_argument("--potential", choices=POTENTIALS, help=f"potential network [{d['potential']}]")
    g.add_argument("--hidden", type=positive_int, help=f"hidden units of the mlp potential [{d['hidden']}]")
    g.add_argument("--activation", choices=("softplus", "lncosh", "tanh"), help=f"[{d['activation']}]")
    g.add_argument("--channels", type=positive_int, help=f"channels of the conv potential [{d['channels']}]")
    g.add_argument("--layers", type=int, choices=(1, 2), help=f"layers (1 or 2) of the conv potential [{d['layers']}]")
    g.add_argument("--kernel-size", type=positive_int, help=f"kernel of the conv potential [{d['kernel_size']}]")
    g.add_argument("--init-scale", type=nonnegative_float, help=f"std of the initial readout (0: identity flow) [{d['init_scale']}]")
    g.add_argument("--n-steps", type=positive_int, help=f"RK4 steps d [{d['n_steps']}]")
    g.add_argument("--step-size", type=positive_float, help=f"RK4 step ε [{d['step_size']}]")
    g.add_argument("--dtype", choices=tuple(DTYPES), help=f"[{d['dtype']}]")
    g.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction,
                   help=f"recompute each RK4 step in the backward pass [{d['grad_checkpoint']}]")
    g.add_argument("--whiten", action=argparse.BooleanOptionalAction,
                   help="put the fixed affine map y' = Σ^{-1/2}(y − μ) in front of the flow, μ and Σ the mean "
                        "and covariance of the logit training set (one noise draw, seed --eval-seed; the "
                        "Gaussian baseline's fit): the identity flow at initialisation is then the "
                        "full-covariance Gaussian instead of N(0, I); not in the paper "
                        f"[{d['whiten']}]")
    g = p.add_argument_group("training")
    g.add_argument("--batch", type=positive_int, help=f"global minibatch [{d['batch']}]")
    g.add_argument("--lr", type=positive_float, help=f"Adam learning rate [{d['lr']}]")
    g.add_argument("--grad-clip", type=positive_float, help="clip the gradient norm [none]")
    g.add_argument("--epochs", type=positive_int, help=f"maximum number of epochs [{d['epochs']}]")
    g.add_argument("--patience", type=nonnegative_int, help=f"early stopping after this many epochs without a lower "
                                                f"validation NLL; 0 disables [{d['patience']}]")
    g.add_argument("--seed", type=int, help=f"seed of the initialisation, shuffles and training noise [{d['seed']}]")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None, help="folder with the IDX files [data/, then ../shared/data/mnist]")
    g.add_argument("--n-train", type=int_at_least(2), help="train on the first N images of the training split (quick runs) [all]")
    g.add_argument("--n-eval", type=int_at_least(2), help="evaluate on the first N validation and test images [all]")
    g.add_argument("--n-validation", type=nonnegative_int, help=f"validation images split off the training file [{d['n_validation']}]")
    g.add_argument("--split-seed", type=int, help=f"seed of the train/validation split [{d['split_seed']}]")
    g.add_argument("--eval-seed", type=int, help=f"seed of the fixed validation/test noise [{d['eval_seed']}]")
    g.add_argument("--eval-batch", type=positive_int, help=f"images per evaluation integration [{d['eval_batch']}]")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:k [auto]")
    g.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on GPUs")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads [chosen from the idle CPUs, printed at start]")
    g.add_argument("--out", default=None, help="output folder [a new runs/mnist/<date>-<time>, linked as runs/mnist/latest; with --resume: the "
                        "checkpoint's folder]")
    g.add_argument("--resume", type=checkpoint_file, default=None,
                   help="continue the run of this checkpoint.pt (or run folder)")
    g.add_argument("--force", action="store_true", help="replace the run already in --out (its files are deleted)")
    g.add_argument("--max-minutes", type=positive_float, default=None, help="wall-clock budget (ends the epoch in progress)")
    g.add_argument("--n-samples", type=positive_int, default=100, help="generated images in the samples figure [100]")
    g.add_argument("--no-plot", action="store_true", help="skip the figures")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's config: ``base`` (DEFAULT, or a resumed checkpoint's config) updated by explicit flags.

    On resume only :data:`RESUME_OVERRIDES` may differ from the checkpoint.

    Raises:
        ValueError: an invalid value, or a resumed run given a conflicting model flag.
    """
    given = {k: v for k in DEFAULT if (v := getattr(args, k, None)) is not None}
    if given.get("patience") == 0:
        given["patience"] = None
    if base is None:
        return _check_config({**DEFAULT, **given})
    conflicts = {k: (v, base.get(k)) for k, v in given.items() if k not in RESUME_OVERRIDES and v != base.get(k)}
    if conflicts:
        text = ", ".join(f"--{k.replace('_', '-')} {v!r} (checkpoint: {old!r})" for k, (v, old) in conflicts.items())
        raise ValueError(f"{text}: a resumed run keeps the checkpoint's configuration; only "
                         f"{', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDES)} may change")
    return _check_config({**base, **{k: v for k, v in given.items() if k in RESUME_OVERRIDES}})


def make_trainer(config: dict[str, Any], data: MNISTData, device: torch.device | str = "cpu",
                 out_dir: str | Path | None = None, progress: bool = True, fit: bool = True) -> DensityTrainer:
    """Model, Adam and :class:`DensityTrainer` for a config (DDP-wrapped under torchrun).

    ``fit=False`` skips the whitening fit of a ``whiten`` config (see :func:`build_model`) for a
    trainer that will load a checkpoint.
    """
    cfg = _check_config(config)
    device = torch.device(device)
    torch.manual_seed(cfg["seed"])
    flow = build_model(cfg, data, fit=fit).to(device)
    model: torch.nn.Module = flow
    if dist.world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(flow, device_ids=[device] if device.type == "cuda" else None)
    opt = torch.optim.Adam(flow.parameters(), lr=cfg["lr"])
    local_batch = dist.local_share(cfg["batch"])
    return DensityTrainer(model, opt, data, batch_size=local_batch, eval_batch=cfg["eval_batch"],
                          patience=cfg["patience"], eval_seed=cfg["eval_seed"], grad_clip=cfg["grad_clip"],
                          device=device, progress=progress, config=cfg, out_dir=out_dir,
                          generator=torch.Generator().manual_seed(cfg["seed"]))


def _format_result(name: str, stats: dict[str, float]) -> str:
    return (f"{name}: NLL = {stats['nll']:.1f} ± {stats['nll_stderr']:.1f} nats (logit space), "
            f"{stats['bpd']:.4f} ± {stats['bpd_stderr']:.4f} bits/dim  ({int(stats['images'])} images)")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, evaluate the best model on the test set, and draw the figures.

    Returns:
        summary: test NLL and bits/dim of the best model (± standard errors), epochs, timings.

    Raises:
        FileNotFoundError: no MNIST files (the message says where it looked and how to get them).
        MNISTFormatError, CheckpointError, ValueError: bad data, checkpoint or flags.
    """
    args = parse_args(argv)
    base = None
    if args.resume:
        state = load_checkpoint(args.resume, required=("config",))
        check_kind(state, args.resume, "mnist")
        base = state["config"]
    # no --out: the checkpoint's own folder on resume, else a new dated folder runs/mnist/<date>-<time>
    out = Path(args.out) if args.out is not None else (args.resume.parent if args.resume else default_folder("mnist"))
    folder = RunFolder(out, resume=args.resume, force=args.force, outputs=OUTPUTS).check()
    config = config_from_args(args, base)
    if args.resume and config["epochs"] <= int(state.get("epoch", 0)):
        raise ValueError(f"{args.resume} is at epoch {state.get('epoch')} already; pass --epochs N with N > "
                         f"{state.get('epoch')} to train further")
    device = dist.setup_run(args.device, args.threads, args.tf32, verbose=not args.quiet)
    data = load_data(args.data_dir, config)
    # on resume the whitening buffers come from the checkpoint: no fit
    trainer = make_trainer(config, data, device, out, progress=not args.quiet, fit=not args.resume)
    if args.resume:
        trainer.load(args.resume)
    claim_on_main(folder)  # set-up succeeded: only now is anything written
    if args.out is None and not args.resume and dist.is_main():
        link_latest(out)
    try:
        return _train(args, config, data, trainer, device, out)
    finally:
        folder.release()


def _train(args: argparse.Namespace, config: dict[str, Any], data: MNISTData, trainer: "DensityTrainer",
           device: torch.device, out: Path) -> dict[str, Any]:
    flow = trainer.flow
    n_params = sum(p.numel() for p in flow.parameters())
    if dist.is_main():
        write_json(out / "config.json", {**config, "data_dir": str(data.directory)})
        print(f"MNIST from {data.directory}: {len(data.train)} / {len(data.validation)} / {len(data.test)} "
              f"train / validation / test images of {data.image_shape[0]}x{data.image_shape[1]}")
        print(f"Monge-Ampère flow{' behind the Gaussian-baseline whitening' if config['whiten'] else ''}: "
              f"{config['potential']} potential ({n_params} parameters), {config['n_steps']} RK4 "
              f"steps of {config['step_size']} (T = {flow.total_time:g}), batch {config['batch']}, lr {config['lr']}, "
              f"{config['dtype']}, grad checkpoint {config['grad_checkpoint']}, {device}, "
              f"{dist.world_size()} process(es)" + (f"; resumed at epoch {trainer.epoch}" if args.resume else ""))
    t0 = time.perf_counter()
    log = trainer.fit(config["epochs"], max_minutes=args.max_minutes)
    wall = time.perf_counter() - t0
    if len(log) == 0:
        raise RuntimeError("no epoch completed; nothing to evaluate")
    # the best model by validation NLL, as in the paper's protocol; its epoch's row already holds
    # its test and validation numbers (same weights, same fixed noise), so no second evaluation
    best_epoch = trainer.best_epoch
    if best_epoch is None:
        raise RuntimeError("no finite validation NLL in the log; nothing to report")
    if trainer.best_path is not None and trainer.best_path.is_file():
        flow.load_state_dict(load_checkpoint(trainer.best_path)["model"])
    row = log[log["epoch"] == best_epoch].iloc[0]
    keys = ("nll", "nll_stderr", "bpd", "bpd_stderr", "images")
    test = {k: float(row[f"test_{k}"]) for k in keys}
    validation = {k: float(row[f"validation_{k}"]) for k in keys}
    summary = {"best_epoch": best_epoch, "epochs": int(log["epoch"].iloc[-1]), "stop_reason": trainer.stop_reason,
               "stop_signal": trainer.stop_signal, "wall_s": wall, "parameters": n_params,
               "normalisation": "test_nll/validation_nll: nats per image in logit space (paper Table 1); "
                                "bpd: bits per pixel in pixel space [0, 256)",
               **{f"test_{k}": v for k, v in test.items()}, **{f"validation_{k}": v for k, v in validation.items()}}
    if dist.is_main():
        print(f"stopped: {trainer.stop_reason} after epoch {summary['epochs']} ({wall:.0f} s); "
              f"best validation epoch {best_epoch}")
        print(_format_result("validation", validation))
        print(_format_result("test      ", test))
        print("paper Table 1 (test NLL, nats, logit space): "
              + ", ".join(f"{k} {m} ± {e}" for k, (m, e) in PAPER_TEST_NLL.items()))
        write_json(out / "summary.json", {**summary, "provenance": provenance(device)})
        if not args.no_plot:
            test_y, _ = trainer.eval_sets["test"].fixed()
            reference = PAPER_TEST_NLL if data.dim == 784 else None
            for path in make_figures(flow, log, test_y, out, data.image_shape, n_samples=args.n_samples,
                                     seed=config["seed"], reference=reference):
                print(f"wrote {path} (+ .pdf)")
        resume = f"python -m models.mnist --resume {out / 'checkpoint.pt'}"
        if trainer.stop_reason == "signal":
            print(f"interrupted by signal {trainer.stop_signal}; resume with: {resume}", file=sys.stderr)
        elif trainer.stop_reason == "time":
            print(f"stopped by the --max-minutes {args.max_minutes:g} budget; continue with: {resume}")
    dist.cleanup()
    return summary


def cli(argv: Sequence[str] | None = None) -> int:
    """:func:`main` for the shell; the exit status as in :mod:`latticeflow.cli` (user errors: one
    ``error:`` line and status 2; divergence 1; SIGINT 130, SIGTERM 143)."""
    return run_cli(main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())

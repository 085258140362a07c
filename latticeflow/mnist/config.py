"""The configuration of an MNIST density-estimation run, and the flags generated from it.

:class:`MNISTConfig` is a frozen dataclass built with :mod:`latticeflow.config` (one field per
setting, each with its flag's help and parser): its defaults are the paper's configuration
(Zhang, E, Wang, "Monge-Ampère Flow for Generative Modeling", arXiv:1809.10188, section 4.1 and
appendix C Table 2; preset :data:`MNIST_PAPER`) plus MAF's data protocol (Papamakarios et al.,
arXiv:1705.07057): MLP potential with softplus and h = 1024, 100 RK4 steps of ε = 0.1 (T = 10),
minibatch 100, Adam at 1e-3, early stopping with patience 30 on the validation NLL.

A config is validated once, on construction (``__post_init__``). Checkpoints written before the
conv setting was renamed store ``layers``; :attr:`MNISTConfig.RENAMED` maps it to ``conv_layers``
(the name of the Ising config), so :meth:`~latticeflow.config.Config.from_dict` reads them.

Example:
    >>> cfg = MNIST_PAPER.replace(hidden=128, n_steps=20, step_size=0.5)
    >>> cfg.total_time
    10.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import cli
from ..config import DTYPE_NAMES, Config, option

__all__ = ["ACTIVATIONS", "DTYPES", "MNIST_PAPER", "MNISTConfig", "POTENTIALS", "as_config", "resume_conflicts"]

#: the potential: one network, or a network plus the separable per-pixel part (``sitewise``)
POTENTIALS = ("mlp", "conv", "sitewise", "mlp+sitewise", "conv+sitewise")
ACTIVATIONS = ("softplus", "lncosh", "tanh")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
assert tuple(DTYPES) == DTYPE_NAMES

_WHITEN_HELP = ("put the fixed affine map y' = Σ^{-1/2}(y − μ) in front of the flow, μ and Σ the mean and "
                "covariance of the logit training set (one noise draw, seed --eval-seed; the Gaussian baseline's "
                "fit): the identity flow at initialisation is then the full-covariance Gaussian instead of N(0, I); "
                "not in the paper")


@dataclass(frozen=True)
class MNISTConfig(Config):
    """An MNIST run: flow, training and data protocol (the flags of ``python -m models.mnist``).

    The defaults are the paper's configuration (:data:`MNIST_PAPER`); ``whiten`` (off) is ours.
    ``n_train``/``n_eval`` None mean all images; ``patience`` None never stops early (the flag's
    0); ``grad_clip`` None does not clip.

    Raises:
        ValueError: on construction, a value outside its range, quoting it.
    """

    RENAMED: ClassVar[dict[str, str]] = {"layers": "conv_layers"}

    # the flow
    potential: str = option("mlp", "potential network", choices=POTENTIALS)
    hidden: int = option(1024, "hidden units of the mlp potential", parse=cli.positive_int)
    activation: str = option("softplus", "activation of the potential", choices=ACTIVATIONS)
    channels: int = option(16, "channels of the conv potential", parse=cli.positive_int)
    conv_layers: int = option(1, "layers (1 or 2) of the conv potential", parse=int, choices=(1, 2))
    kernel_size: int = option(5, "kernel of the conv potential", parse=cli.positive_int)
    sitewise_units: int = option(8, "one-variable units per pixel of the sitewise potential", parse=cli.positive_int)
    init_scale: float = option(1e-3, "std of the initial readout (0: identity flow)", parse=cli.nonnegative_float)
    n_steps: int = option(100, "RK4 steps d", parse=cli.positive_int)
    step_size: float = option(0.1, "RK4 step ε", parse=cli.positive_float)
    dtype: str = option("float32", "floating-point precision", choices=DTYPE_NAMES)
    grad_checkpoint: bool = option(True, "recompute each RK4 step in the backward pass")
    whiten: bool = option(False, _WHITEN_HELP)
    # training
    batch: int = option(100, "global minibatch", parse=cli.positive_int, group="training")
    lr: float = option(1e-3, "Adam learning rate", parse=cli.positive_float, group="training")
    grad_clip: float | None = option(None, "clip the gradient norm", parse=cli.positive_float, group="training",
                                     show="none")
    epochs: int = option(1000, "maximum number of epochs", parse=cli.positive_int, group="training")
    patience: int | None = option(30, "early stopping after this many epochs without a lower validation NLL; "
                                  "0 disables", parse=cli.nonnegative_int, group="training")
    seed: int = option(0, "seed of the initialisation, shuffles and training noise", parse=int, group="training")
    # the data protocol
    n_train: int | None = option(None, "train on the first N images of the training split (quick runs)",
                                 parse=cli.int_at_least(2), group="data", show="all")
    n_eval: int | None = option(None, "evaluate on the first N validation and test images",
                                parse=cli.int_at_least(2), group="data", show="all")
    n_validation: int = option(10000, "validation images split off the training file", parse=cli.nonnegative_int,
                               group="data")
    split_seed: int = option(0, "seed of the train/validation split", parse=int, group="data")
    eval_seed: int = option(1, "seed of the fixed validation/test noise", parse=int, group="data")
    eval_batch: int = option(500, "images per evaluation integration", parse=cli.positive_int, group="data")

    def __post_init__(self) -> None:
        if self.potential not in POTENTIALS:
            raise ValueError(f"potential must be one of {', '.join(map(repr, POTENTIALS))}; "
                             f"got potential={self.potential!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(map(repr, DTYPES))}; got dtype={self.dtype!r}")
        for key in ("hidden", "channels", "conv_layers", "kernel_size", "sitewise_units", "n_steps", "batch", "epochs",
                    "eval_batch", "n_validation"):
            value = getattr(self, key)
            minimum = 0 if key == "n_validation" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{key} must be an integer >= {minimum}, got {key}={value!r}")
        for key in ("n_train", "n_eval"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
                raise ValueError(f"{key} must be None (all images) or an integer >= 2, got {key}={value!r}")
        value = self.patience
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"patience must be None (no early stopping) or an integer >= 1, got patience={value!r}")
        for key in ("step_size", "lr"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{key} must be a finite number > 0, got {key}={value!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be None or a number > 0, got grad_clip={self.grad_clip!r}")
        if not isinstance(self.whiten, bool):
            raise ValueError(f"whiten must be True or False, got whiten={self.whiten!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by ``dtype``."""
        return DTYPES[self.dtype]

    @property
    def total_time(self) -> float:
        """T = n_steps·ε."""
        return self.n_steps * self.step_size


#: The paper's configuration (section 4.1, appendix C Table 2) with the MAF protocol: the defaults.
MNIST_PAPER = MNISTConfig()


def as_config(config: MNISTConfig | dict[str, Any]) -> MNISTConfig:
    """``config`` itself, or the config of a plain dict (a checkpoint's; missing keys take the defaults).

    Raises:
        ValueError: unknown keys (naming the closest valid one) or invalid values.
        TypeError: neither an MNISTConfig nor a dict.
    """
    if isinstance(config, MNISTConfig):
        return config
    if isinstance(config, dict):
        return MNISTConfig.from_dict(config)
    raise TypeError(f"config must be an MNISTConfig or a dict, got {type(config).__name__}")


def resume_conflicts(base: MNISTConfig, flags: dict[str, Any], may_change: tuple[str, ...]) -> str | None:
    """On resume: a message naming each explicit flag that differs from the checkpoint's config, or None.

    Args:
        base: the checkpoint's config.
        flags: the config values given on the command line (field name → value).
        may_change: the fields a resumed run may change.
    """
    bad = {k: (v, getattr(base, k)) for k, v in flags.items() if k not in may_change and v != getattr(base, k)}
    if not bad:
        return None
    text = ", ".join(f"--{k.replace('_', '-')} {v!r} (checkpoint: {old!r})" for k, (v, old) in bad.items())
    return (f"{text}: a resumed run keeps the checkpoint's configuration; only "
            f"{', '.join('--' + k.replace('_', '-') for k in may_change)} may change")

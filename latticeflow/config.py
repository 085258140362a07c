"""One configuration: typed dataclasses with strict keys, named presets, and the flags made from them.

A run is described by one frozen dataclass (:class:`IsingConfig` here; the MNIST configuration
lives with the MNIST code and uses the same machinery). Each field carries its command-line
help and parser in its metadata (:func:`option`), so :func:`add_arguments` generates the flags
and the API and the command line cannot disagree about a default. A config is validated once,
on construction; :meth:`Config.from_dict` refuses unknown keys (naming the closest valid one),
and :meth:`Config.to_dict` gives the plain dict that checkpoints and ``config.json`` store.

Presets are plain instances: :data:`ISING_DEFAULT` (the built-in default, ``make run``) and
:data:`ISING_PAPER` (the paper's appendix C configuration, as the original code builds it).

Example:
    >>> cfg = IsingConfig(L=4, hidden=64)          # the default with two changes
    >>> cfg.replace(epochs=100).epochs
    100
    >>> IsingConfig.from_dict({"hiden": 8})
    Traceback (most recent call last):
    ...
    ValueError: unknown config key(s) 'hiden' (did you mean 'hidden'?); valid keys: ...
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

from . import cli
from ._checks import check_auto_or_positive, check_choice, check_grad_clip

C = TypeVar("C", bound="Config")

DTYPE_NAMES = ("float32", "float64")


def option(default: Any, help: str, *, parse: Callable[[str], Any] | None = None,  # noqa: A002
           choices: tuple | None = None, group: str = "model", show: str | None = None) -> Any:
    """A config field with its command-line flag: help text, value parser, choices and flag group.

    Args:
        default: the field's default (the built-in preset's value).
        help: what the flag sets; the default is appended as ``[default]``.
        parse: argparse ``type`` for the flag (None: a string, or a --x/--no-x switch for bools).
        choices: the valid values.
        group: the help section ("model", "training").
        show: how to print the default in the help (when ``str(default)`` would mislead).
    """
    meta = {"help": help, "parse": parse, "choices": choices, "group": group, "show": show}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    """Base of the run configurations: strict construction from dicts, flags, replace."""

    #: keys that older checkpoints used, mapped to today's
    RENAMED: ClassVar[dict[str, str]] = {}

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any], strict: bool = True) -> C:
        """A config from a plain dict (a checkpoint's or config.json's); missing keys take defaults.

        Raises:
            ValueError: unknown keys (with ``strict``), naming the closest valid ones; invalid values.
        """
        d = {cls.RENAMED.get(k, k): v for k, v in d.items()}
        unknown = sorted(set(d) - set(cls.keys()))
        if unknown and strict:
            valid = sorted(cls.keys())
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, valid, n=1)) else repr(k)
                     for k in unknown]
            raise ValueError(f"unknown config key(s) {', '.join(hints)}; valid keys: {', '.join(valid)}")
        return cls(**{k: v for k, v in d.items() if k in cls.keys()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:  # read access like the plain dicts checkpoints hold
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Flags from fields
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, cls: type[Config], titles: dict[str, str]) -> None:
    """Add one flag per field of ``cls`` (``--name-with-dashes``), grouped by the fields' ``group``.

    Every flag defaults to None, so :func:`given` can tell an explicit flag from a default; the
    help shows the preset's default.
    """
    groups = {name: parser.add_argument_group(title) for name, title in titles.items()}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        flag = "--" + f.name.replace("_", "-")
        shown = meta["show"] if meta["show"] is not None else f.default
        kwargs: dict[str, Any] = {"default": None, "dest": f.name, "help": f"{meta['help']} [{shown}]"}
        if isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if meta["parse"] is not None:
                kwargs["type"] = meta["parse"]
            if meta["choices"] is not None:
                kwargs["choices"] = meta["choices"]
        groups[meta["group"]].add_argument(flag, **kwargs)


def given(args: argparse.Namespace, cls: type[Config]) -> dict[str, Any]:
    """The config values set explicitly on the command line (flags left out are None)."""
    return {k: v for k in cls.keys() if (v := getattr(args, k, None)) is not None}


def conflicts(base: Config, flags: dict[str, Any], may_change: tuple[str, ...]) -> str | None:
    """On resume: a message naming each explicit flag that differs from the checkpoint's config, or None."""
    new = base.replace(**flags)
    bad = {k: (getattr(new, k), getattr(base, k)) for k in flags if k not in may_change and getattr(new, k) != getattr(base, k)}
    if not bad:
        return None
    text = ", ".join(f"--{k.replace('_', '-')} {v} (checkpoint: {old})" for k, (v, old) in bad.items())
    return (f"{text}: a resumed run keeps the checkpoint's configuration; only "
            f"{', '.join('--' + k.replace('_', '-') for k in may_change)} and the run flags (--max-minutes, "
            f"--threads, --device, ...) may change")


# ---------------------------------------------------------------------------------------------
# The Ising run
# ---------------------------------------------------------------------------------------------

POTENTIAL_PARTS = ("mlp", "quadratic", "conv")
ACTIVATIONS = ("softplus", "lncosh", "tanh")
SYMMETRIZE = ("none", "random", "exact")
GROUPS = ("space+z2", "space", "translation+z2", "translation", "d4+z2", "d4", "z2")
MIXTURES = ("none", "z2", "d4", "d4+z2")
#: ``gradient_estimator``: see :class:`latticeflow.train.VariationalTrainer`
GRADIENT_ESTIMATORS = ("total", "path")
#: ``train_precision``: the products of a training iteration's GEMM steps (latticeflow.native.step.products)
TRAIN_PRECISIONS = ("float32", "bfloat16")


def _init_scale(value: Any) -> float | str:
    """``"linear"`` or a number >= 0 (from a config or the command line)."""
    if value == "linear":
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"init_scale must be a number >= 0 or 'linear', got init_scale={value!r}") from None
    if not v >= 0:
        raise ValueError(f"init_scale must be a number >= 0 or 'linear', got init_scale={value!r}")
    return v


def _as_flag(check: Callable[[Any], Any], text: str) -> Any:
    """``check(text)`` for argparse: its ValueError becomes an ArgumentTypeError (a usage error, exit 2)."""
    try:
        return check(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _init_scale_flag(text: str) -> float | str:
    return _as_flag(_init_scale, text)


#: ``extensive_lr="auto"``: the extensive parameters learn at lr·min(1, REFERENCE_SITES/N), N the
#: number of sites. Adam moves every parameter by about lr per step; for the MLP's h×N input
#: weights and the quadratic part's kernel (one value per displacement orbit, about N/8 of them)
#: such a step moves each pre-activation, or the spectrum of A at some momentum, by up to ~lr·N.
#: The Ising recipe (Adam 1e-2) was tuned at L=16, N=256; at L=64 the same rate on every
#: parameter blew up at the end of the warm-up (README, "Training that holds at every size").
REFERENCE_SITES = 256


def _extensive_lr(value: Any) -> float | str:
    return check_auto_or_positive("extensive_lr", value)


def _extensive_lr_flag(text: str) -> float | str:
    return _as_flag(_extensive_lr, text)


def extensive_learning_rate(config: Any, N: int) -> float:
    """The learning rate of the extensive parameters for ``config`` (its ``extensive_lr``) on N sites."""
    value = config.get("extensive_lr", "auto") if isinstance(config, dict) else getattr(config, "extensive_lr", "auto")
    return config["lr"] * min(1.0, REFERENCE_SITES / N) if value == "auto" else float(value)


def grad_clip_flag(text: str) -> float | str:
    """An argparse ``type`` for ``--grad-clip``: a number > 0 or ``auto``."""
    return _as_flag(check_grad_clip, text)


#: ``schedule_minutes``: the cosine decay spans minutes of training instead of epochs
#: (:class:`latticeflow.train.WallClockCosine`); a fresh run given it without ``epochs`` gets
#: ``epochs = UNCAPPED_EPOCHS`` (:func:`uncapped`), so the minutes alone end it.
SCHEDULE_MINUTES_HELP = ("spread the cosine learning-rate decay over this many minutes of training (wall time, "
                         "summed over resumes) instead of over --epochs, and stop when they have passed, so a "
                         "time budget always ends its decay; --epochs then only caps the run (no cap unless given)")
UNCAPPED_EPOCHS = 10**9


def uncapped(flags: dict[str, Any]) -> dict[str, Any]:
    """A fresh run's explicit flags, with ``epochs = UNCAPPED_EPOCHS`` added when ``schedule_minutes``
    is given and ``epochs`` is not (the minutes end the run, not the default epoch count)."""
    if flags.get("schedule_minutes") is not None and "epochs" not in flags:
        return {**flags, "epochs": UNCAPPED_EPOCHS}
    return flags


def check_schedule_minutes(config: Any) -> float | None:
    """``config.schedule_minutes`` checked: None, or a finite number > 0 with the cosine schedule and
    no β anneal (which runs over epochs).

    Raises:
        ValueError: naming the value or the setting it conflicts with.
    """
    m = config.schedule_minutes
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not (math.isfinite(m) and m > 0):
        raise ValueError(f"schedule_minutes must be a number > 0, got schedule_minutes={m!r}")
    if config.schedule != "cosine":
        raise ValueError(f"schedule_minutes={m:g} spreads the cosine decay over time; it needs schedule='cosine', "
                         f"got schedule={config.schedule!r}")
    if getattr(config, "anneal_from", None) is not None:
        raise ValueError(f"schedule_minutes={m:g}: the β anneal (anneal_from) runs over epochs; give epochs instead")
    return float(m)


def refuse_schedule_minutes(config: Any) -> None:
    """For the β sweeps, whose learning-rate schedules run over epochs.

    Raises:
        ValueError: ``config.schedule_minutes`` is set.
    """
    if config.schedule_minutes is not None:
        raise ValueError(f"schedule_minutes={config.schedule_minutes:g}: a sweep's learning-rate schedules run over "
                         "epochs (--epochs, --warm-epochs); give those instead")


def kernel_size_for(value: int | None, L: int) -> int:
    """The conv kernel size: ``value``, or for None 5 (the largest odd size <= L when L < 5)."""
    return int(value) if value is not None else min(5, L if L % 2 else L - 1)


@dataclass(frozen=True)
class IsingConfig(Config):
    """A variational Ising run: target, flow and training (the flags of ``python -m models.ising``).

    The defaults are the built-in default (:data:`ISING_DEFAULT`), the configuration that reached
    the exact F/N best in our measurements (README, Results): a D4-symmetric quadratic part that
    carries the Gaussian part of the HS energy exactly, a translation-invariant D4/Z2-symmetric
    convolutional potential (16 channels, 5×5 kernels: the local part of the energy, with an exact
    Laplacian), and a ln cosh MLP averaged over the space group × Z2 (the global part), all linear
    in t; a short flow (T = 1), a large batch and Adam at 1e-2 with a cosine decay. L=8 takes about
    5 minutes on 2 cores (error 3e-3); on L=4 the conv part does not pay for its cost.
    """

    # the target
    L: int = option(8, "linear lattice size", parse=cli.int_at_least(2))
    beta: float | str = option("critical", "inverse temperature: a number > 0 or 'critical'", parse=cli.beta_value)
    J: float = option(1.0, "ferromagnetic coupling > 0", parse=cli.positive_float)
    # the flow
    potential: str = option("quadratic+conv+mlp", "'+'-joined parts: mlp, quadratic, conv")
    hidden: int = option(256, "hidden width of the mlp potential", parse=cli.positive_int)
    activation: str = option("lncosh", "activation of the mlp potential", choices=ACTIVATIONS)
    bias: bool = option(True, "biases in the mlp potential (--no-bias with lncosh: exactly Z2-even)")
    channels: int = option(16, "channels of the conv potential", parse=cli.positive_int)
    kernel_size: int | None = option(None, "odd kernel size of the conv potential, <= L", parse=cli.positive_int,
                                     show="5, or the largest odd size <= L when L < 5")
    conv_layers: int = option(1, "layers of the conv potential", parse=int, choices=(1, 2))
    init_scale: float | str = option(1e-3, "std of the networks' initial readout weights (0: the flow starts at the "
                                     "identity), or 'linear': U(±1/√h) like nn.Linear, as the original code",
                                     parse=_init_scale_flag)
    quadratic_init: str = option("gaussian", "start of the quadratic part: 'gaussian' (the best Gaussian for the "
                                 "target in closed form, IsingHS.best_gaussian) or 'zero' (the identity map)",
                                 choices=("zero", "gaussian"))
    time_dependent: bool = option(True, "potentials depend linearly on t (paper section 6)")
    n_steps: int = option(10, "RK4 steps d", parse=cli.positive_int)
    step_size: float = option(0.1, "RK4 step ε", parse=cli.positive_float)
    symmetrize: str = option("random", "group averaging of the network parts", choices=SYMMETRIZE)
    group: str = option("space+z2", "symmetry group", choices=GROUPS)
    mixture: str = option("none", "exact density symmetrisation by a group mixture (|G| times the cost)",
                          choices=MIXTURES)
    dtype: str = option("float32", "floating-point precision", choices=DTYPE_NAMES)
    grad_checkpoint: bool = option(False, "recompute each RK4 step in backward (less memory)")
    # training
    batch: int | None = option(None, "global batch size", parse=cli.positive_int, group="training",
                               show="256·min(1, 256/N), at least 16: the same sites per batch from L=16 up")
    lr: float = option(1e-2, "Adam learning rate", parse=cli.positive_float, group="training")
    extensive_lr: float | str = option("auto", "Adam learning rate of the extensive parameters (one step moves every "
                                       "site: the MLP's h×N input weights, the quadratic part's kernel), or 'auto': "
                                       "lr·min(1, 256/N)", parse=_extensive_lr_flag, group="training")
    weight_decay: float = option(0.0, "Adam weight decay", parse=cli.nonnegative_float, group="training")
    epochs: int = option(600, "optimiser steps in all (on resume: may be raised)", parse=cli.positive_int,
                         group="training")
    grad_clip: float | str | None = option(None, "clip the gradient norm at this value, or 'auto': at 3× its median "
                                           "over the last 50 epochs", parse=grad_clip_flag,
                                     group="training", show="none")
    warmup: int = option(20, "learning-rate warm-up steps", parse=cli.nonnegative_int, group="training")
    gradient_estimator: str = option("total", "reverse-KL gradient: 'total' (through the sampling path, ln q's "
                                     "parameter dependence included) or 'path' (path gradient: the zero-mean score "
                                     "term dropped; zero variance at q = p; one more backward integration per step)",
                                     choices=GRADIENT_ESTIMATORS, group="training")
    train_precision: str = option("float32", "products of the training iterations' RK4 steps: 'bfloat16' rounds "
                                  "their operands to bfloat16 with float32 sums (the GEMM step, float32 flows above "
                                  "25 sites; elsewhere float32). Only the gradients' descent sees it: every reported "
                                  "estimate is computed afterwards in --dtype on fresh samples. The per-epoch log's "
                                  "F/N comes from the training samples, so in bfloat16 too",
                                  choices=TRAIN_PRECISIONS, group="training")
    max_rollbacks: int = option(5, "recoveries from a diverged epoch: back to the last good state in memory, "
                                "learning rate halved (0: stop at the first divergence)", parse=cli.nonnegative_int,
                                group="training")
    schedule: str = option("cosine", "learning-rate schedule", choices=("cosine", "constant"), group="training")
    schedule_minutes: float | None = option(None, SCHEDULE_MINUTES_HELP, parse=cli.positive_float, group="training",
                                            show="none: the decay spans --epochs")
    anneal_from: float | None = option(None, "anneal β: train at this β first and move it linearly to --beta over "
                                       "--anneal-epochs (start hot, where the target is nearly Gaussian), then hold "
                                       "it; the log's beta column gives each epoch's β", parse=cli.beta_value,
                                       group="training", show="none: no annealing")
    anneal_epochs: int | None = option(None, "epochs of the β anneal (with --anneal-from)", parse=cli.positive_int,
                                       group="training", show="half of --epochs")
    seed: int = option(0, "seed of the initialisation and the samples", parse=int, group="training")
    #: set from beta: "critical" when beta is β_c given by name (kept for config.json)
    beta_name: str | None = None

    def __post_init__(self) -> None:
        from ._checks import BETA_NAMES, check_beta, check_positive, check_size
        from .exact import CRITICAL_BETA as critical

        set_ = object.__setattr__  # frozen: normalise once, here
        name = self.beta_name
        if isinstance(self.beta, str) and self.beta.lower() in BETA_NAMES:
            name = "critical"
        beta = check_beta(self.beta)
        set_(self, "beta", beta)
        set_(self, "beta_name", "critical" if name == "critical" and beta == critical else None)
        set_(self, "L", check_size("L", self.L, minimum=2))
        set_(self, "J", check_positive("J", self.J))
        for p in str(self.potential).split("+"):
            check_choice("potential part", p, POTENTIAL_PARTS)
        for key in ("hidden", "channels", "n_steps", "epochs"):
            set_(self, key, check_size(key, getattr(self, key)))
        if self.batch is not None:
            set_(self, "batch", check_size("batch", self.batch))
        set_(self, "warmup", check_size("warmup", self.warmup, minimum=0))
        set_(self, "max_rollbacks", check_size("max_rollbacks", self.max_rollbacks, minimum=0))
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("symmetrize", self.symmetrize, SYMMETRIZE)
        check_choice("group", self.group, GROUPS)
        check_choice("mixture", self.mixture, MIXTURES)
        check_choice("dtype", self.dtype, DTYPE_NAMES)
        check_choice("schedule", self.schedule, ("cosine", "constant"))
        set_(self, "schedule_minutes", check_schedule_minutes(self))
        check_choice("gradient_estimator", self.gradient_estimator, GRADIENT_ESTIMATORS)
        check_choice("train_precision", self.train_precision, TRAIN_PRECISIONS)
        check_choice("conv_layers", self.conv_layers, (1, 2))
        set_(self, "step_size", check_positive("step_size", self.step_size))
        set_(self, "lr", check_positive("lr", self.lr))
        set_(self, "extensive_lr", _extensive_lr(self.extensive_lr))
        set_(self, "grad_clip", check_grad_clip(self.grad_clip))
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got weight_decay={self.weight_decay!r}")
        set_(self, "init_scale", _init_scale(self.init_scale))
        if self.kernel_size is not None:
            set_(self, "kernel_size", check_size("kernel_size", self.kernel_size))
        set_(self, "anneal_from", check_beta(self.anneal_from, optional=True))
        if self.anneal_epochs is not None and self.anneal_from is None:
            raise ValueError(f"anneal_epochs={self.anneal_epochs!r} needs anneal_from (the β to start from)")
        if self.anneal_from is not None:  # resolved here, so that a resume with more epochs keeps the schedule
            set_(self, "anneal_epochs", check_size("anneal_epochs", self.anneal_epochs if self.anneal_epochs is not None
                                                   else max(1, self.epochs // 2)))
            if self.anneal_epochs >= self.epochs:
                raise ValueError(f"anneal_epochs={self.anneal_epochs} must be < epochs={self.epochs}: the run must "
                                 "train at the target β after the anneal")
        for key in ("bias", "time_dependent", "grad_checkpoint"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be True or False, got {key}={getattr(self, key)!r}")


    def to_dict(self) -> dict[str, Any]:
        """The plain dict stored in checkpoints and config.json, with resolved values: β as a number
        (``beta_name`` says "critical"), and the conv kernel size actually used."""
        d = super().to_dict()
        if "conv" in self.potential.split("+"):
            d["kernel_size"] = kernel_size_for(self.kernel_size, self.L)
        d["batch"] = self.batch_size
        return d

    def anneal_beta(self, epoch: int) -> float:
        """β of training epoch ``epoch`` (0-based): ``anneal_from`` at 0, linearly to ``beta`` at
        ``anneal_epochs`` (default: half of ``epochs``), ``beta`` from there on and without annealing."""
        if self.anneal_from is None:
            return self.beta
        f = min(1.0, max(0, epoch) / self.anneal_epochs)
        return self.beta if f >= 1.0 else self.anneal_from + f * (self.beta - self.anneal_from)

    @property
    def batch_size(self) -> int:
        """``batch``, or for None the recipe :func:`batch_for` of this lattice."""
        return self.batch if self.batch is not None else batch_for(self.L)


def batch_for(L: int) -> int:
    """The default batch on L×L: 256 up to L=16, then 256·256/N (at least 16).

    The loss is extensive: its per-sample standard deviation grows like √N while its gradient
    grows like N, so the gradient's relative noise goes like 1/√(N·B). Holding N·B fixed from
    L=16 on keeps that noise, and the cost of an epoch, the same at every size: batch 64 at L=32,
    16 at L=64 (README, "Training that holds at every size").
    """
    return max(16, min(256, REFERENCE_SITES * 256 // (L * L)))


#: The built-in default (``make run``): L=8 at β_c, quadratic + conv + ln cosh MLP.
ISING_DEFAULT = IsingConfig()
#: The paper's configuration (appendix C) as the original code builds it: a ln cosh MLP without
#: biases (exactly Z2-even), nn.Linear's readout initialisation, h=512, 50 RK4 steps of 0.1,
#: batch 64, Adam 1e-3 constant, one random space-group × Z2 element per step.
ISING_PAPER = IsingConfig(L=16, hidden=512, n_steps=50, step_size=0.1, batch=64, lr=1e-3, activation="lncosh",
                          bias=False, time_dependent=False, init_scale="linear", potential="mlp", symmetrize="random",
                          group="space+z2", epochs=2000, warmup=0, schedule="constant")

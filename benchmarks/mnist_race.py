"""A fair MNIST race: density models at one training wall-clock budget, the same start and the same data.

Every trained model of a race gets exactly the same conditions (issue 17):

- the data: MAF's protocol (Papamakarios, Pavlakou, Murray, "Masked Autoregressive Flow for
  Density Estimation", arXiv:1705.07057; ``latticeflow.mnist``): 50,000 / 10,000 / 10,000 images,
  uniform dequantisation, logit transform with λ = 1e-6, density in logit space;
- the training noise: minibatches of ``--batch`` images from :class:`~latticeflow.mnist.DequantizedBatches`
  driven by a generator seeded with ``--seed``, reseeded for each model, so every model sees the
  same images in the same order with the same dequantisation noise (and the initialisation is
  seeded with ``--seed`` too);
- the evaluation noise: validation noise seed eval_seed + 1, test noise seed eval_seed + 2 (as
  ``models/mnist.py`` and ``python -m latticeflow.mnist --baseline``); the learning curve is the
  NLL of a fixed subset of the validation set (the first ``--val-images`` images), the final
  number the full test set;
- the start (``--start``): ``whitened``, the closed-form full-covariance Gaussian (fitted to one
  noise draw of the training set, seed eval_seed, the same fit for every model) as the fixed
  affine map y' = Σ^{-1/2}(y − μ) in front of every model
  (:class:`~latticeflow.mnist.WhitenedDensity`: ln p(y) = ln q(y') + ln|det Σ^{-1/2}|), so
  every model starts at the Gaussian; or ``normal``, every model from N(0, I) without the map;
  ``both`` runs the two one after the other. "Starts at": the zuko flows' readouts are zeroed
  (``--zuko-init identity``, the default; :func:`identity_init`), so each begins as the identity
  map, as the MA flow does (readout std ``--ma-init-scale`` 1e-3); ``--zuko-init default`` keeps
  zuko's random initialisation;
- the threads (``--threads``, default 1) and the budget: ``--minutes`` of *training* time per
  model. The clock runs over the training steps only (batch preparation included); every
  ``--eval-every`` seconds of training, at the start and at the end it stops while the model is
  evaluated on the validation subset.

The rows (``--only``):

======== ================================================================================
gaussian the closed-form full-covariance Gaussian N(μ, Σ) (:class:`~latticeflow.mnist.GaussianBaseline`);
         no training, the floor every model must beat
maf      zuko MAF (arXiv:1705.07057): ``--maf-transforms`` 5 MADEs of ``--maf-layers`` 1 ×
         ``--maf-hidden`` 1024 units, affine, alternating orders, Adam ``--maf-lr`` 1e-4 (the MAF
         paper's MNIST settings)
nsf      zuko NSF (Durkan et al., "Neural Spline Flows", arXiv:1906.04032), autoregressive with
         monotonic rational-quadratic splines of ``--nsf-bins`` 8 bins on [-5, 5]: 5 transforms of
         1 × 128 units (each MADE outputs 23 numbers per pixel, so 12.1 M parameters, the MAF's
         12.0 M; a step costs about 3.5 times the MAF's on a CPU), Adam 5e-4 (their tabular default)
realnvp  zuko RealNVP (Dinh et al., arXiv:1605.08803), affine couplings on alternating pixel
         masks: 5 couplings of 2 × 1024 units (11.3 M parameters; a step about 0.6 times the
         MAF's), Adam 1e-4 (the MAF paper's)
ma       the Monge-Ampère flow (Zhang, E, Wang, arXiv:1809.10188) built by
         :func:`latticeflow.mnist.build_model` from an :class:`~latticeflow.mnist.MNISTConfig`
         whose flow settings are the ``--ma-*`` flags: by default the MLP potential with h = 256
         and softplus, 20 RK4 steps of 0.5 (the paper's T = 10), Adam 1e-3; the README's
         winner adds the separable per-pixel part: ``--ma-potential mlp+sitewise
         --ma-sitewise-units 8 --ma-lr 1e-2``
======== ================================================================================

All trained models share one loop (:func:`train`: Adam, maximum likelihood, the budget) and
one evaluation. A model whose loss turns non-finite is recorded as diverged, its training stops
and it is scored at its last finite evaluation; the others carry on. For the MA flow the final
test NLL is evaluated a second time with twice the steps at half the step size (the same T) on
the same images and noise: the paired difference and its standard error say whether the
reported density is converged in the step size.

Outputs in ``--out`` (default ``benchmarks/results/mnist_race/<start>_<minutes>min``; an
occupied folder needs ``--force``): ``curves.csv`` (model, start, train_seconds, steps, images,
val_nll, val_nll_stderr), ``results.csv`` (model, start, params, train_seconds, steps, test_nll,
stderr, bpd, bpd_stderr, the half-step check, status), ``results.json`` (the settings: argv,
every flag with its value, threads, versions, load averages; the rows and curves), ``table.md`` and the figure
``curves.png``/``.pdf`` (validation NLL against training seconds). NLLs are in nats per image in
logit space (the paper's Table 1 convention), bits/dim in pixel space.

``--merge DIR ... --out DIR`` combines finished races (e.g. the two starts run as two
processes, one per core) into one table, figure and CSV pair, and prints the markdown table
sorted by test NLL with the paper's Table 1 below.

    python benchmarks/mnist_race.py --start whitened --minutes 15 --threads 1
    python benchmarks/mnist_race.py --start normal --minutes 15 --threads 1
    python benchmarks/mnist_race.py --merge benchmarks/results/mnist_race/whitened_15min \\
        benchmarks/results/mnist_race/normal_15min --out benchmarks/results/mnist_race/15min
    python benchmarks/mnist_race.py --only gaussian ma --ma-potential conv --tag conv --minutes 15
    python benchmarks/mnist_race.py --minutes 0.2 --n-train 2000 --n-eval 500 --out /tmp/race  # smoke run

zuko is the optional ``bench`` extra (``pip install -e '.[bench]'``); without it the zuko rows
are skipped with one line saying so and the other rows run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from latticeflow.cli import (  # noqa: E402
    int_at_least,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    run_cli,
)
from latticeflow.flow import finer_steps  # noqa: E402
from latticeflow.mnist import (  # noqa: E402
    MNIST_PAPER,
    PAPER_TEST_NLL,
    DequantizedBatches,
    GaussianBaseline,
    MNISTConfig,
    MNISTData,
    Whitening,
    WhitenedDensity,
    build_model,
    load_data,
    nll_logit_to_bits_per_dim,
)
from latticeflow.mnist.config import ACTIVATIONS, DTYPES, POTENTIALS  # noqa: E402
from latticeflow.stats import standard_error  # noqa: E402

__all__ = ["MODELS", "STARTS", "Entrant", "EvalSet", "RaceSettings", "TrainOutcome", "ZukoDensity", "build_entrant",
           "build_parser", "cli", "evaluate", "half_step_check", "identity_init", "ma_config", "main",
           "markdown_table", "merge", "nll_stats", "parse_args", "plot_curves", "settings_from_args", "train",
           "zuko_flow"]

MODELS = ("gaussian", "maf", "nsf", "realnvp", "ma")
ZUKO_MODELS = ("maf", "nsf", "realnvp")
STARTS = ("whitened", "normal")
#: The start label of the closed-form Gaussian (it has no start: it is the whitened start itself).
CLOSED_FORM = "closed form"
INSTALL_HINT = "pip install -e '.[bench]' (or pip install zuko)"
DEFAULT_ROOT = REPO / "benchmarks" / "results" / "mnist_race"
OUTPUT_FILES = ("curves.csv", "results.csv", "results.json", "table.md", "curves.png", "curves.pdf")
#: Settings that must agree between merged races (they define the data, noise and batches).
MERGE_MUST_AGREE = ("batch", "seed", "eval_seed", "n_validation", "split_seed", "n_train", "n_eval", "val_images")
#: Settings that may differ between merged races (a warning is printed).
MERGE_MAY_DIFFER = ("minutes", "threads", "dtype", "eval_every")

RESULT_COLUMNS = ["model", "start", "params", "train_seconds", "steps", "images", "test_nll", "stderr", "bpd",
                  "bpd_stderr", "half_step_nll", "half_step_stderr", "half_step_diff", "half_step_diff_stderr",
                  "half_step_sigmas", "status", "note"]
CURVE_COLUMNS = ["model", "start", "train_seconds", "steps", "images", "val_nll", "val_nll_stderr"]


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RaceSettings:
    """The conditions every model of a race shares (from the flags, :func:`settings_from_args`).

    Attributes:
        minutes: training wall-clock budget per trained model.
        threads: torch intra-op threads.
        batch: training minibatch.
        seed: initialisation and training-noise seed (the same stream for every model).
        eval_seed: Gaussian fit noise seed; validation eval_seed + 1, test eval_seed + 2.
        eval_every: seconds of training between validation evaluations.
        val_images: size of the fixed validation subset of the learning curve.
        eval_batch: images per evaluation batch.
        dtype: floating dtype of the trained models ("float32" or "float64").
        n_validation, split_seed, n_train, n_eval: the data protocol (MNISTConfig's meaning).
    """

    minutes: float = 15.0
    threads: int = 1
    batch: int = 100
    seed: int = 0
    eval_seed: int = 1
    eval_every: float = 60.0
    val_images: int = 1000
    eval_batch: int = 500
    dtype: str = "float32"
    n_validation: int = 10000
    split_seed: int = 0
    n_train: int | None = None
    n_eval: int | None = None

    @property
    def budget_seconds(self) -> float:
        """The training budget in seconds."""
        return 60.0 * self.minutes

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by ``dtype``."""
        return DTYPES[self.dtype]

    def data_config(self) -> MNISTConfig:
        """The :class:`MNISTConfig` of the data protocol (for :func:`~latticeflow.mnist.load_data`)."""
        return MNIST_PAPER.replace(n_validation=self.n_validation, split_seed=self.split_seed, n_train=self.n_train,
                                   n_eval=self.n_eval, eval_seed=self.eval_seed, seed=self.seed, batch=self.batch,
                                   eval_batch=self.eval_batch, dtype=self.dtype)


def settings_from_args(args: argparse.Namespace) -> RaceSettings:
    """The shared conditions named by the flags."""
    return RaceSettings(minutes=args.minutes, threads=args.threads, batch=args.batch, seed=args.seed,
                        eval_seed=args.eval_seed, eval_every=args.eval_every, val_images=args.val_images,
                        eval_batch=args.eval_batch, dtype=args.dtype, n_validation=args.n_validation,
                        split_seed=args.split_seed, n_train=args.n_train, n_eval=args.n_eval)


def ma_config(args: argparse.Namespace) -> MNISTConfig:
    """The Monge-Ampère flow's :class:`MNISTConfig`: the ``--ma-*`` flags and the shared settings.

    ``whiten`` is False: the race puts the same :class:`WhitenedDensity` in front of every model.

    Raises:
        ValueError: a value outside its range (from MNISTConfig).
    """
    return settings_from_args(args).data_config().replace(
        potential=args.ma_potential, hidden=args.ma_hidden, activation=args.ma_activation,
        channels=args.ma_channels, conv_layers=args.ma_conv_layers, kernel_size=args.ma_kernel_size,
        sitewise_units=args.ma_sitewise_units, init_scale=args.ma_init_scale, n_steps=args.ma_n_steps, step_size=args.ma_step_size, lr=args.ma_lr,
        grad_checkpoint=args.ma_grad_checkpoint, whiten=False)


# ---------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------


class ZukoDensity(nn.Module):
    """A zuko lazy flow as a density module: log_prob(y) = flow().log_prob(y).

    Args:
        flow: an unconditional ``zuko.flows.Flow`` (MAF, NSF, RealNVP, ...).
    """

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def log_prob(self, y: Tensor) -> Tensor:
        """ln p(y) for y of shape (B, D); returns shape (B,)."""
        return self.flow().log_prob(y)

    def forward(self, y: Tensor) -> Tensor:
        """Alias for :meth:`log_prob`."""
        return self.log_prob(y)


@dataclass
class Entrant:
    """One trained model of a race.

    Attributes:
        model: the name in ``MODELS`` ("maf", "ma", ...).
        label: the row's name (``model``, or ``model[tag]`` with ``--tag``).
        start: "whitened" or "normal".
        density: the module whose ``log_prob`` (B, D) → (B,) is trained, whitening included.
        lr: Adam's learning rate.
        note: the hyperparameters in words.
    """

    model: str
    label: str
    start: str
    density: nn.Module
    lr: float
    note: str

    @property
    def params(self) -> int:
        """Trainable parameters."""
        return sum(p.numel() for p in self.density.parameters() if p.requires_grad)


def _import_zuko() -> Any | None:
    try:
        import zuko
    except ImportError:
        return None
    return zuko


def identity_init(flow: nn.Module) -> int:
    """Zero the readout (last affine layer) of every network of a zuko flow: the flow starts as the identity.

    A zero readout gives each affine transform shift 0 and log-scale 0, and each rational-quadratic
    spline equal bins and unit knot slopes (zuko's derivatives are exp of the raw outputs): the
    identity map, so the flow's density is its N(0, I) base, and behind the whitening exactly
    the closed-form Gaussian, the start of the Monge-Ampère flow (whose readout starts at
    ``--ma-init-scale`` 1e-3). The zero-initialised last layer is the usual choice of Glow
    (Kingma, Dhariwal, arXiv:1807.03039); gradients reach the earlier layers from the first step.

    Args:
        flow: a zuko flow whose transforms have hyper networks (``hyper``: MAF, NSF, RealNVP).

    Returns:
        count: the readouts zeroed.
    """
    count = 0
    for module in flow.modules():
        hyper = getattr(module, "hyper", None)
        if not isinstance(hyper, nn.Module):
            continue
        # zuko's own Linear is no torch.nn.Linear: the affine layers are those with a matrix weight
        layers = [m for m in hyper.modules()
                  if isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() == 2]
        with torch.no_grad():
            layers[-1].weight.zero_()
            if getattr(layers[-1], "bias", None) is not None:
                layers[-1].bias.zero_()
        count += 1
    return count


def zuko_flow(name: str, args: argparse.Namespace, dim: int) -> tuple[nn.Module, float, str]:
    """The zuko flow of row ``name`` ("maf", "nsf" or "realnvp") with its ``--{name}-*`` flags.

    Args:
        name: the row.
        args: the flags.
        dim: D.

    Returns:
        density: a :class:`ZukoDensity`, float32.
        lr: its learning rate.
        note: its hyperparameters in words.

    Raises:
        ImportError: zuko is not installed.
    """
    import zuko

    transforms, hidden, layers = (getattr(args, f"{name}_{k}") for k in ("transforms", "hidden", "layers"))
    lr = getattr(args, f"{name}_lr")
    features = [hidden] * layers
    if name == "maf":
        flow = zuko.flows.MAF(dim, transforms=transforms, hidden_features=features)
        note = f"{transforms} MADEs of {layers}x{hidden}, affine"
    elif name == "nsf":
        flow = zuko.flows.NSF(dim, bins=args.nsf_bins, transforms=transforms, hidden_features=features)
        note = f"{transforms} autoregressive RQ splines ({args.nsf_bins} bins) of {layers}x{hidden}"
    elif name == "realnvp":
        flow = zuko.flows.RealNVP(dim, transforms=transforms, hidden_features=features)
        note = f"{transforms} affine couplings of {layers}x{hidden}"
    else:
        raise ValueError(f"name must be one of {', '.join(map(repr, ZUKO_MODELS))}, got name={name!r}")
    if args.zuko_init == "identity":
        identity_init(flow)
        note += ", identity init"
    return ZukoDensity(flow), lr, f"{note}, Adam {lr:g}"


def build_entrant(name: str, start: str, args: argparse.Namespace, data: MNISTData,
                  whitening: Whitening) -> Entrant:
    """Row ``name`` at ``start``: its model (seeded with ``--seed``), behind the whitening if whitened.

    Args:
        name: a trained row of ``MODELS``.
        start: "whitened" (the :class:`WhitenedDensity` of ``whitening`` in front) or "normal".
        args: the flags.
        data: the sets (D and the image shape).
        whitening: the shared Gaussian fit.

    Returns:
        entrant: in the race's dtype.

    Raises:
        ImportError: a zuko row without zuko.
    """
    settings = settings_from_args(args)
    torch.manual_seed(settings.seed)  # the same initialisation stream for every row
    if name == "ma":
        cfg = ma_config(args)
        inner: nn.Module = build_model(cfg, data)
        lr = cfg.lr
        described = {"mlp": f"mlp h={cfg.hidden}", "sitewise": f"sitewise {cfg.sitewise_units} units/pixel",
                     "conv": f"conv {cfg.channels} channels x {cfg.conv_layers} layer(s), kernel {cfg.kernel_size}"}
        shape = " + ".join(described[p] for p in cfg.potential.split("+")) + " potential"
        note = (f"{shape}, {cfg.activation}, init {cfg.init_scale:g}, {cfg.n_steps} RK4 steps of {cfg.step_size:g} "
                f"(T={cfg.total_time:g}), Adam {lr:g}")
    else:
        inner, lr, note = zuko_flow(name, args, data.dim)
    inner = inner.to(settings.torch_dtype)
    density = WhitenedDensity(inner, whitening, dtype=settings.torch_dtype) if start == "whitened" else inner
    label = f"{name}[{args.tag}]" if args.tag else name
    return Entrant(name, label, start, density, lr, note)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(density: nn.Module, y: Tensor, dtype: torch.dtype, batch_size: int = 500) -> Tensor:
    """ln p(y) of each image, without gradients, in batches.

    Args:
        density: a module with ``log_prob``.
        y: logit images, shape (B, D), any float dtype (cast to ``dtype``).
        dtype: the model's dtype.
        batch_size: images per call.

    Returns:
        logp: shape (B,), float64, nats.
    """
    was_training = density.training
    density.eval()
    try:
        return torch.cat([density.log_prob(chunk.to(dtype)).double() for chunk in y.split(batch_size)])
    finally:
        density.train(was_training)


def nll_stats(logp: Tensor, log_det: Tensor, D: int) -> dict[str, float]:
    """Mean NLL (nats, logit space) and bits/dim (pixel space), each ± standard error.

    Args:
        logp: ln p_Y(y) per image, shape (B,).
        log_det: the logit transform's log-Jacobian per image, shape (B,).
        D: pixels per image.

    Returns:
        stats: nll, nll_stderr, bpd, bpd_stderr, images.
    """
    logp, log_det = logp.double(), log_det.double()
    bpd = nll_logit_to_bits_per_dim(logp, log_det, D)
    return {"nll": float(-logp.mean()), "nll_stderr": standard_error(logp), "bpd": float(bpd.mean()),
            "bpd_stderr": standard_error(bpd), "images": int(logp.numel())}


@dataclass
class EvalSet:
    """Fixed-noise logit images of an evaluation.

    Attributes:
        y: shape (B, D), float64.
        log_det: shape (B,), float64.
    """

    y: Tensor
    log_det: Tensor

    @property
    def dim(self) -> int:
        """D, pixels per image."""
        return int(self.y.shape[1])


# ---------------------------------------------------------------------------------------------
# The shared training loop
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainOutcome:
    """What :func:`train` returns.

    Attributes:
        curve: one dict per evaluation: train_seconds, steps, images, val_nll, val_nll_stderr.
        train_seconds, steps, images: at the state that is scored (the last finite evaluation).
        status: "budget" or "diverged at ... ".
    """

    curve: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    steps: int = 0
    images: int = 0
    status: str = "budget"


def _batches(pixels: Tensor, batch: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Training minibatches (b, D), float64, fresh noise each pass, passes without end."""
    while True:
        for y, _ in DequantizedBatches(pixels, batch, generator=generator, dtype=torch.float64):
            yield y


def train(entrant: Entrant, train_pixels: Tensor, validation: EvalSet, settings: RaceSettings,
          say: Any = print) -> TrainOutcome:
    """Maximum likelihood with Adam for ``settings.minutes`` of training time, evaluating on the way.

    The clock runs over each minibatch's preparation, forward, backward and update only; at
    t = 0, every ``eval_every`` seconds of it and at the end it stops while the validation subset
    is scored. Training noise and order come from a generator seeded with ``settings.seed``, the
    same for every model. A non-finite loss or validation NLL stops the training: the model is
    put back to its last finite evaluation, which is what gets scored.

    Args:
        entrant: the model (trained in place).
        train_pixels: uint8 training images, shape (N, D).
        validation: the fixed validation subset.
        settings: the shared conditions.
        say: where progress lines go.

    Returns:
        outcome: the learning curve and the state scored.
    """
    density, dtype = entrant.density, settings.torch_dtype
    opt = torch.optim.Adam(density.parameters(), lr=entrant.lr)
    batches = _batches(train_pixels, settings.batch, torch.Generator().manual_seed(settings.seed))
    budget, clock, steps, images = settings.budget_seconds, 0.0, 0, 0
    out = TrainOutcome()
    snapshot: dict[str, Tensor] | None = None

    def checkpoint() -> bool:
        """Score the validation subset; keep the state if finite. False when it is not."""
        nonlocal snapshot
        t0 = time.perf_counter()
        stats = nll_stats(evaluate(density, validation.y, dtype, settings.eval_batch), validation.log_det,
                          validation.dim)
        if not math.isfinite(stats["nll"]):
            return False
        out.curve.append({"train_seconds": clock, "steps": steps, "images": images, "val_nll": stats["nll"],
                          "val_nll_stderr": stats["nll_stderr"]})
        out.train_seconds, out.steps, out.images = clock, steps, images
        snapshot = copy.deepcopy(density.state_dict())
        say(f"  {entrant.label:>12s} {entrant.start:8s} t={clock:7.1f} s  step {steps:6d}  validation NLL "
            f"{stats['nll']:9.2f} ± {stats['nll_stderr']:.2f}  (eval {time.perf_counter() - t0:.1f} s)")
        return True

    def diverged(what: str) -> None:
        out.status = f"diverged at {clock:.1f} s (step {steps}, {what}); scored at {out.train_seconds:.1f} s"
        say(f"  {entrant.label} {entrant.start}: {out.status}")
        if snapshot is not None:
            density.load_state_dict(snapshot)

    if not checkpoint():
        diverged("non-finite validation NLL at the start")
        return out
    next_eval = settings.eval_every
    density.train()
    while clock < budget:
        t0 = time.perf_counter()
        y = next(batches)
        loss = -density.log_prob(y.to(dtype)).mean()
        if not torch.isfinite(loss):
            clock += time.perf_counter() - t0
            diverged(f"loss {float(loss)}")
            return out
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clock += time.perf_counter() - t0
        steps += 1
        images += len(y)
        if clock >= next_eval or clock >= budget:
            while next_eval <= clock:
                next_eval += settings.eval_every
            if not checkpoint():
                diverged("non-finite validation NLL")
                return out
    return out


def half_step_check(density: nn.Module, test: EvalSet, logp: Tensor, settings: RaceSettings) -> dict[str, float]:
    """The test NLL of the MA flow at twice the steps of half the size (same T), paired with ``logp``.

    Args:
        density: the trained MA density (whitened or not).
        test: the test set (same images and noise as ``logp``).
        logp: ln p at the trained step size, shape (B,).
        settings: the shared conditions.

    Returns:
        check: half_step_nll, half_step_stderr, half_step_diff (NLL at ε/2 minus at ε),
        half_step_diff_stderr (standard error of the per-image difference), half_step_sigmas.
    """
    with finer_steps(density, 2):
        half = evaluate(density, test.y, settings.torch_dtype, settings.eval_batch)
    diff = -(half - logp)  # per-image NLL difference: same image, same noise
    diff_se = standard_error(diff)
    mean = float(diff.mean())
    return {"half_step_nll": float(-half.mean()), "half_step_stderr": standard_error(half), "half_step_diff": mean,
            "half_step_diff_stderr": diff_se,
            "half_step_sigmas": mean / diff_se if diff_se > 0 else (0.0 if mean == 0 else math.inf)}


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"--out {out} is not empty (an earlier race?); pass --force to overwrite its "
                                  "results or choose another --out")
        for name in OUTPUT_FILES:  # no stale figure or table of the race replaced
            (out / name).unlink(missing_ok=True)


def _fmt_pm(value: float, err: float, digits: int) -> str:
    return f"{value:.{digits}f} ± {err:.{digits}f}" if math.isfinite(value) else "–"


def markdown_table(results: pd.DataFrame, paper: bool = True) -> str:
    """The results as a markdown table sorted by test NLL, the paper's Table 1 below.

    Args:
        results: rows as in ``results.csv``.
        paper: append :data:`~latticeflow.mnist.PAPER_TEST_NLL`.

    Returns:
        table: markdown text.
    """
    lines = ["| model | start | params | train s | steps | test NLL (nats, logit) | bits/dim "
             "| NLL at ε/2 (Δ, paired) |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for _, r in results.sort_values("test_nll").iterrows():
        check = ""
        if pd.notna(r.get("half_step_nll")):
            check = (f"{r['half_step_nll']:.1f} (Δ {r['half_step_diff']:+.1e} ± {r['half_step_diff_stderr']:.1e}, "
                     f"{r['half_step_sigmas']:+.1f}σ)")
        status = "" if r["status"] in ("budget", CLOSED_FORM) else f" ({r['status']})"
        lines.append(f"| {r['model']}{status} | {r['start']} | {int(r['params']):,} | {r['train_seconds']:.0f} | "
                     f"{int(r['steps'])} | {_fmt_pm(r['test_nll'], r['stderr'], 1)} | "
                     f"{_fmt_pm(r['bpd'], r['bpd_stderr'], 4)} | {check} |")
    if paper:
        lines += ["", "Paper Table 1 (arXiv:1809.10188), test NLL in nats, logit space (GPU-trained to convergence):",
                  "", "| model | test NLL |", "|---|---:|"]
        lines += [f"| {name} | {nll:.1f} ± {err:.1f} |" for name, (nll, err) in PAPER_TEST_NLL.items()]
    return "\n".join(lines)


def plot_curves(curves: pd.DataFrame, results: pd.DataFrame, path: Path) -> Path:
    """Validation NLL against training seconds, one line per (model, start), the Gaussian as a horizontal line.

    Two panels: every curve (log scale when all values are positive: the N(0, I) starts begin
    thousands of nats up), and a zoom on the band from the best value to a little above the
    Gaussian, where the models compete. Solid lines: whitened start; dashed: N(0, I).

    Args:
        curves: rows as in ``curves.csv``.
        results: rows as in ``results.csv`` (for the labels' final test NLL).
        path: where to write (``.png`` and ``.pdf``).

    Returns:
        path: of the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"whitened": "-", "normal": "--"}
    trained = curves[curves["start"] != CLOSED_FORM]
    gauss = curves[curves["start"] == CLOSED_FORM]
    colours: dict[str, str] = {}
    for (label, start), rows in trained.groupby(["model", "start"], sort=False):
        colour = colours.setdefault(label, f"C{len(colours) % 10}")
        final = results[(results["model"] == label) & (results["start"] == start)]
        test = f", test {final['test_nll'].iloc[0]:.1f}" if len(final) else ""
        rows = rows.sort_values("train_seconds")
        for k, ax in enumerate(axes):
            ax.errorbar(rows["train_seconds"], rows["val_nll"], yerr=rows["val_nll_stderr"], color=colour,
                        ls=styles.get(start, ":"), marker="o", ms=3, capsize=2, lw=1.2,
                        label=f"{label}, {start}{test}" if k == 1 else None)
    for _, g in gauss.iterrows():
        for k, ax in enumerate(axes):
            ax.axhline(g["val_nll"], color="k", lw=1, ls=":", label=f"{g['model']} (closed form)" if k == 1 else None)
    values = pd.concat([trained["val_nll"], gauss["val_nll"]])
    values = values[values.map(math.isfinite)]
    if len(values) and (values > 0).all():
        axes[0].set_yscale("log")
    if len(gauss) and len(values):
        low, top = float(values.min()), float(gauss["val_nll"].max())
        span = max(top - low, 1e-3 * abs(top), 1.0)
        axes[1].set_ylim(low - 0.1 * span, top + 0.5 * span)
    images = int(results["val_images"].iloc[0]) if "val_images" in results and len(results) else None
    for ax, title in zip(axes, ("all curves", "near the Gaussian")):
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("validation NLL (nats, logit space)" + (f", {images} images" if images else ""))
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("MNIST race: equal training time, the same data, noise and batches")
    path = Path(path)
    fig.savefig(path.with_suffix(".png"), dpi=150, bbox_inches="tight")
    fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    return path.with_suffix(".png")


def _write(out: Path, results: list[dict[str, Any]], curves: list[dict[str, Any]], meta: dict[str, Any],
           figure: bool = True) -> None:
    """results.csv, curves.csv, results.json, table.md and (with ``figure``) the figure, in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    res = pd.DataFrame(results, columns=[*RESULT_COLUMNS, "val_images"])
    cur = pd.DataFrame(curves, columns=CURVE_COLUMNS)
    res[RESULT_COLUMNS].to_csv(out / "results.csv", index=False)
    cur.to_csv(out / "curves.csv", index=False)
    (out / "results.json").write_text(json.dumps({**meta, "results": results, "curves": curves}, indent=2,
                                                 default=str) + "\n")
    if len(res):
        (out / "table.md").write_text(markdown_table(res) + "\n")
        if figure:
            plot_curves(cur, res, out / "curves")


def _meta(argv: Sequence[str] | None, settings: RaceSettings, data: MNISTData | None) -> dict[str, Any]:
    zuko = _import_zuko()
    return {"argv": list(sys.argv[1:] if argv is None else argv), "settings": asdict(settings),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "zuko": getattr(zuko, "__version__", None), "python": platform.python_version(),
            "host": platform.node(), "cpus": os.cpu_count(), "load_average_start": list(os.getloadavg()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "data": None if data is None else {"directory": str(data.directory), "train": len(data.train),
                                               "validation": len(data.validation), "test": len(data.test),
                                               "dim": data.dim},
            "normalisation": "nll: nats per image in logit space (paper Table 1); bpd: bits per pixel in pixel "
                             "space [0, 256); half_step_*: the MA flow at 2x steps of half the size, same T"}


# ---------------------------------------------------------------------------------------------
# Merging races
# ---------------------------------------------------------------------------------------------


def merge(dirs: Sequence[str | os.PathLike[str]], out: Path, say: Any = print, figure: bool = True) -> pd.DataFrame:
    """Combine finished races into one results.csv, curves.csv, results.json, table.md and figure.

    The closed-form Gaussian, in every race, is kept once. Races must agree on the data, noise
    and batch settings (:data:`MERGE_MUST_AGREE`); other differences are printed as warnings.

    Args:
        dirs: race folders (each with results.csv, curves.csv, results.json).
        out: the merged folder.
        say: where the warnings go.
        figure: draw ``curves.png``/``.pdf``.

    Returns:
        results: the merged rows.

    Raises:
        FileNotFoundError: a folder without a race's files.
        ValueError: races with different data settings, or the same (model, start) twice.
    """
    results, curves, metas = [], [], []
    for d in map(Path, dirs):
        for name in ("results.csv", "curves.csv", "results.json"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} not found: --merge takes folders written by this script")
        res = pd.read_csv(d / "results.csv")
        meta = json.loads((d / "results.json").read_text())
        res["val_images"] = meta.get("settings", {}).get("val_images")
        results.append(res)
        curves.append(pd.read_csv(d / "curves.csv"))
        metas.append((d, meta))
    first_dir, first = metas[0]
    for d, meta in metas[1:]:
        for key in MERGE_MUST_AGREE:
            a, b = first["settings"].get(key), meta["settings"].get(key)
            if a != b:
                raise ValueError(f"cannot merge {first_dir} and {d}: {key} differs ({a!r} and {b!r}); their data "
                                 "or noise are not the same")
        for key in MERGE_MAY_DIFFER:
            a, b = first["settings"].get(key), meta["settings"].get(key)
            if a != b:
                say(f"warning: {key} differs between {first_dir} ({a!r}) and {d} ({b!r})")
    res = pd.concat(results, ignore_index=True)
    cur = pd.concat(curves, ignore_index=True)
    closed = res["start"] == CLOSED_FORM
    dup = res[~closed].duplicated(["model", "start"], keep=False)
    if dup.any():
        names = sorted({f"{m} ({s})" for m, s in res[~closed][dup][["model", "start"]].itertuples(index=False)})
        raise ValueError(f"{', '.join(names)} appear in more than one race; run them with different --tag")
    res = res.drop_duplicates(["model", "start"], keep="first")
    cur = cur.drop_duplicates(["model", "start", "train_seconds", "steps"], keep="first")
    meta = {"merged": [str(d) for d, _ in metas], "settings": first["settings"],
            "sources": {str(d): m for d, m in metas}}
    _write(out, res.to_dict("records"), cur.to_dict("records"), meta, figure=figure)
    return res


# ---------------------------------------------------------------------------------------------
# Flags and the race
# ---------------------------------------------------------------------------------------------


_at_least_two = int_at_least(2)


def build_parser() -> argparse.ArgumentParser:
    """The flags: the race's shared conditions, then each model's hyperparameters."""
    p = argparse.ArgumentParser(prog="python benchmarks/mnist_race.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("race")
    g.add_argument("--only", nargs="+", choices=MODELS, default=list(MODELS), help="rows")
    g.add_argument("--start", choices=(*STARTS, "both"), default="whitened",
                   help="whitened: the Gaussian fit as a fixed affine map in front of every model; normal: N(0, I)")
    g.add_argument("--minutes", type=positive_float, default=15.0, help="training wall-clock budget per model")
    g.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    g.add_argument("--batch", type=positive_int, default=100, help="training minibatch")
    g.add_argument("--seed", type=int, default=0, help="initialisation and training-noise seed (every model)")
    g.add_argument("--eval-seed", type=nonnegative_int, default=1,
                   help="Gaussian fit noise seed; validation noise eval_seed + 1, test eval_seed + 2")
    g.add_argument("--eval-every", type=positive_float, default=60.0, help="seconds of training between evaluations")
    g.add_argument("--val-images", type=_at_least_two, default=1000, help="the fixed validation subset of the curve")
    g.add_argument("--eval-batch", type=positive_int, default=500, help="images per evaluation batch")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of the trained models")
    g.add_argument("--tag", default="", help="appended to the trained models' names in this race: maf[TAG], "
                                             "ma[TAG] (the closed-form gaussian is the same in every race)")
    g.add_argument("--out", default=None, help="output folder [benchmarks/results/mnist_race/<start>_<minutes>min]")
    g.add_argument("--force", action="store_true", help="overwrite the results in an occupied --out")
    g.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="combine these finished races into --out (nothing is trained)")
    g.add_argument("--no-plot", action="store_true", help="skip the figure")
    d = p.add_argument_group("data (the MAF protocol; --n-train/--n-eval for smoke runs only)")
    d.add_argument("--data-dir", default=None, help="folder with the IDX files [data/, then ../shared/data/mnist]")
    d.add_argument("--n-validation", type=nonnegative_int, default=10000, help="validation images split off")
    d.add_argument("--split-seed", type=nonnegative_int, default=0, help="seed of the train/validation split")
    d.add_argument("--n-train", type=_at_least_two, default=None, help="first N training images [all]")
    d.add_argument("--n-eval", type=_at_least_two, default=None, help="first N validation and test images [all]")
    g.add_argument("--zuko-init", choices=("identity", "default"), default="identity",
                   help="identity: the zuko flows' readouts start at zero, so every model starts exactly at the "
                        "start's density (the Gaussian, or N(0, I)), as the MA flow does; default: zuko's own")
    for name, (transforms, hidden, layers, lr, ref) in {
            "maf": (5, 1024, 1, 1e-4, "MAF paper"), "nsf": (5, 128, 1, 5e-4, "NSF paper, tabular"),
            "realnvp": (5, 1024, 2, 1e-4, "MAF paper")}.items():
        z = p.add_argument_group(f"zuko {name}")
        z.add_argument(f"--{name}-transforms", type=positive_int, default=transforms, help="transforms")
        z.add_argument(f"--{name}-hidden", type=positive_int, default=hidden, help="units per hidden layer")
        z.add_argument(f"--{name}-layers", type=positive_int, default=layers, help="hidden layers per network")
        z.add_argument(f"--{name}-lr", type=positive_float, default=lr, help=f"Adam learning rate ({ref})")
        if name == "nsf":
            z.add_argument("--nsf-bins", type=positive_int, default=8, help="spline bins")
    m = p.add_argument_group("Monge-Ampère flow (MNISTConfig's fields)")
    m.add_argument("--ma-potential", choices=POTENTIALS, default="mlp", help="potential network")
    m.add_argument("--ma-hidden", type=positive_int, default=256, help="hidden units of the mlp potential")
    m.add_argument("--ma-activation", choices=ACTIVATIONS, default="softplus", help="activation")
    m.add_argument("--ma-channels", type=positive_int, default=16, help="channels of the conv potential")
    m.add_argument("--ma-conv-layers", type=int, choices=(1, 2), default=1, help="layers of the conv potential")
    m.add_argument("--ma-kernel-size", type=positive_int, default=5, help="kernel of the conv potential")
    m.add_argument("--ma-sitewise-units", type=positive_int, default=8,
                   help="one-variable units per pixel of the sitewise potential (--ma-potential mlp+sitewise)")
    m.add_argument("--ma-init-scale", type=nonnegative_float, default=1e-3,
                   help="std of the initial readout (0: identity)")
    m.add_argument("--ma-n-steps", "--ma-steps", dest="ma_n_steps", type=positive_int, default=20, help="RK4 steps")
    m.add_argument("--ma-step-size", type=positive_float, default=0.5, help="RK4 step ε")
    m.add_argument("--ma-lr", type=positive_float, default=1e-3, help="Adam learning rate")
    m.add_argument("--ma-grad-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each RK4 step in the backward pass (less memory, slower)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags of ``argv`` (None: the command line)."""
    return build_parser().parse_args(argv)


def _default_out(args: argparse.Namespace) -> Path:
    if args.merge:
        return DEFAULT_ROOT / "merged"
    return DEFAULT_ROOT / f"{args.start}_{args.minutes:g}min{'_' + args.tag if args.tag else ''}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the race (or merge races) and write its outputs.

    Returns:
        summary: ``{"out": folder, "results": rows}``.

    Raises:
        FileNotFoundError, MNISTFormatError: missing or corrupt MNIST files.
        FileExistsError: an occupied ``--out`` without ``--force``.
        ValueError: invalid flags (from MNISTConfig) or incompatible races to merge.
    """
    args = parse_args(argv)
    out = Path(args.out) if args.out else _default_out(args)
    _check_out(out, args.force)
    if args.merge:
        res = merge(args.merge, out, figure=not args.no_plot)
        print(markdown_table(res))
        print(f"wrote {out}")
        return {"out": str(out), "results": res.to_dict("records")}
    settings = settings_from_args(args)
    if "ma" in args.only:
        ma_config(args)  # bad --ma-* values fail here, before the data is loaded
    torch.set_num_threads(settings.threads)
    data = load_data(args.data_dir, settings.data_config())
    meta = _meta(argv, settings, data)
    meta["flags"] = vars(args)  # every hyperparameter, defaults included
    print(f"MNIST from {data.directory}: {len(data.train)} / {len(data.validation)} / {len(data.test)} images; "
          f"budget {settings.minutes:g} min of training per model, {torch.get_num_threads()} thread(s), batch "
          f"{settings.batch}, {settings.dtype}; load average {os.getloadavg()[0]:.2f}")
    zuko_rows = [m for m in args.only if m in ZUKO_MODELS]
    if zuko_rows and _import_zuko() is None:
        print(f"skipping {', '.join(zuko_rows)}: zuko is not installed; {INSTALL_HINT}")
    rows = [m for m in args.only if m not in ZUKO_MODELS or _import_zuko() is not None]

    # the shared fixed-noise sets and the Gaussian fit (the same for every model)
    t0 = time.perf_counter()
    train_y, _ = DequantizedBatches(data.train, seed=settings.eval_seed, dtype=torch.float64).fixed()
    gaussian = GaussianBaseline.fit(train_y)
    del train_y
    whitening = gaussian.whitening()
    fit_seconds = time.perf_counter() - t0
    val_y, val_ld = DequantizedBatches(data.validation, seed=settings.eval_seed + 1, dtype=torch.float64).fixed()
    validation = EvalSet(val_y[: settings.val_images], val_ld[: settings.val_images])
    test = EvalSet(*DequantizedBatches(data.test, seed=settings.eval_seed + 2, dtype=torch.float64).fixed())
    meta["settings"]["val_images"] = len(validation.y)
    n_val = len(validation.y)

    results: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    starts = list(STARTS) if args.start == "both" else [args.start]
    for name in rows:
        if name != "gaussian":
            continue
        stats = nll_stats(gaussian.log_prob(test.y), test.log_det, test.dim)
        val = nll_stats(gaussian.log_prob(validation.y), validation.log_det, validation.dim)
        D = data.dim
        results.append({"model": "gaussian", "start": CLOSED_FORM, "params": D + D * (D + 1) // 2,
                        "train_seconds": fit_seconds, "steps": 0, "images": len(data.train),
                        "test_nll": stats["nll"], "stderr": stats["nll_stderr"], "bpd": stats["bpd"],
                        "bpd_stderr": stats["bpd_stderr"], "status": CLOSED_FORM, "val_images": n_val,
                        "note": f"full covariance, one noise draw (seed {settings.eval_seed})"})
        curves.append({"model": "gaussian", "start": CLOSED_FORM, "train_seconds": 0.0, "steps": 0, "images": 0,
                       "val_nll": val["nll"], "val_nll_stderr": val["nll_stderr"]})
        print(f"[gaussian] test NLL {stats['nll']:.2f} ± {stats['nll_stderr']:.2f} nats, {stats['bpd']:.4f} "
              f"bits/dim; validation subset {val['nll']:.2f}")
        _write(out, results, curves, meta, figure=False)
    for start in starts:
        for name in rows:
            if name == "gaussian":
                continue
            entrant = build_entrant(name, start, args, data, whitening)
            print(f"[{entrant.label}, {start} start] {entrant.params:,} parameters; {entrant.note}")
            load_before = os.getloadavg()[0]
            outcome = train(entrant, data.train, validation, settings)
            t0 = time.perf_counter()
            logp = evaluate(entrant.density, test.y, settings.torch_dtype, settings.eval_batch)
            stats = nll_stats(logp, test.log_det, test.dim)
            row: dict[str, Any] = {
                "model": entrant.label, "start": start, "params": entrant.params,
                "train_seconds": outcome.train_seconds, "steps": outcome.steps, "images": outcome.images,
                "test_nll": stats["nll"], "stderr": stats["nll_stderr"], "bpd": stats["bpd"],
                "bpd_stderr": stats["bpd_stderr"], "status": outcome.status, "note": entrant.note,
                "val_images": n_val, "load_average": [load_before, os.getloadavg()[0]]}
            if name == "ma" and math.isfinite(stats["nll"]):
                row.update(half_step_check(entrant.density, test, logp, settings))
            row["test_eval_seconds"] = time.perf_counter() - t0
            results.append(row)
            curves += [{"model": entrant.label, "start": start, **point} for point in outcome.curve]
            check = (f"; at ε/2: {row['half_step_nll']:.2f} (Δ {row['half_step_diff']:+.1e} ± "
                     f"{row['half_step_diff_stderr']:.1e}, {row['half_step_sigmas']:+.1f}σ)"
                     if "half_step_nll" in row else "")
            print(f"  test NLL {stats['nll']:.2f} ± {stats['nll_stderr']:.2f} nats, {stats['bpd']:.4f} ± "
                  f"{stats['bpd_stderr']:.4f} bits/dim after {outcome.train_seconds:.0f} s, {outcome.steps} steps "
                  f"({outcome.status}){check}")
            meta["load_average_end"] = list(os.getloadavg())
            _write(out, results, curves, meta, figure=False)  # a killed race keeps its finished rows
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    meta["load_average_end"] = list(os.getloadavg())
    _write(out, results, curves, meta, figure=not args.no_plot)
    print(markdown_table(pd.DataFrame(results, columns=[*RESULT_COLUMNS, "val_images"])))
    print(f"wrote {out}")
    return {"out": str(out), "results": results}


def cli(argv: Sequence[str] | None = None) -> int:
    """:func:`main` for the shell: user errors (missing or corrupt files, occupied ``--out``, bad
    values) print one ``error:`` line and exit with status 2."""
    return run_cli(main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())

"""Every temperature: one flow per β on a grid, warm-started from its neighbour, against Kaufman.

A sweep trains the Ising flow of one :class:`~latticeflow.config.IsingConfig` at every β of a
grid (fixed L), from high temperature (small β) down. The first β trains from scratch for
``config.epochs``; each next β starts from the previous β's trained weights and trains for
``warm_epochs`` (fewer; ``cold_epochs`` in the ordered phase, β > β_c, where the flow must
learn the two magnetised modes and the gap to exact grows) with a fresh optimiser and schedule:
neighbouring β have similar densities, so most of the work is shared. With ``cold_mixture`` the
β > β_c train another flow family: a potential without the Z2 symmetry inside the exact Z2 mixture
(1/2)[q(x) + q(−x)] (:func:`cold_config`), so that the flow needs to carry the Gaussian to one
magnetised mode only, instead of tearing it in two (:func:`load_warm_state` carries the
neighbour's weights across the switch). A warm start must not make things worse: when the
mean F/N of its last epochs lies more than 3σ above that of its first epochs (the neighbour's
flow at the new β; :func:`warm_regression`), or its measured gap to the exact F/N is more than
twice its neighbour's by over 3σ (:func:`gap_regression`: a flow lost during an anneal, which the
first test does not see), or its training diverges, the β is trained again from the neighbour's weights
at half the learning rate (at most twice), and every colder β keeps the halved rate (below T_c a
fresh Adam at the first β's rate can push a flow out of the ordered phase; measured at L=16).
The table's ``lr_scale``, ``warm_retries`` and ``warm_rise_sigma`` columns and each β's
``summary.json`` (``earlier_attempts``) record it. After training, each β is measured from i.i.d. flow
samples (:func:`analysis.thermo.estimate_rows`: variational and importance-weighted F/N in both
normalisations, ESS, reweighted U/N, C/N, ⟨|m|⟩, ⟨m²⟩, U₄, χ) next to Kaufman's exact values
of the same L.

Folder layout (``out``):

    sweep.json                 the manifest: config, grid, warm and cold epochs, samples, β folders
    sweep.csv                  tidy table, one row per (β, quantity, method) (rewritten after each β)
    sweep.png / sweep.pdf      F/N, U/N, C/N against β with the exact curves and residuals in σ
    b00_0.300000/ ...          one ordinary run per β: checkpoint.pt, log.csv, config.json,
                               summary.json, and estimates.csv once measured (a finished β)

Nothing is lost on interruption: each β is a run with its own checkpoint; resuming (``resume=True``,
or ``python -m models.ising --resume OUT``) skips the finished β, continues an unfinished one from
its checkpoint and warm-starts the rest. The ``max_minutes`` budget covers the whole sweep; a
sweep stopped by it, or by SIGINT/SIGTERM, keeps every finished β.

The other ways of sharing work across β live beside this one: a β-conditioned flow trained once
for the whole range (:mod:`latticeflow.conditioned`, ``--conditioned``) and β annealing within each
run (``IsingConfig.anneal_from``; in a sweep each warm start anneals from its neighbour's β).
Left out: data-parallel (torchrun) sweeps.

Example:
    >>> from latticeflow import IsingConfig
    >>> from latticeflow.sweep import parse_beta_grid, sweep
    >>> table = sweep(IsingConfig(L=4, potential="quadratic+mlp", epochs=300),
    ...               parse_beta_grid("0.3:0.5:3,critical"), out="runs/sweep_l4")
    >>> table[table.quantity == "energy"][["beta", "method", "value", "stderr", "exact"]]
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from ._checks import check_size
from .build import make_trainer
from .checkpoint import load_checkpoint
from .config import IsingConfig, refuse_schedule_minutes
from .exact import CRITICAL_BETA
from .runs import RunFolder, RunFolderError, provenance, write_json
from .train import TrainingDiverged, VariationalTrainer

__all__ = ["MANIFEST", "BetaGrid", "beta_folder", "beta_or_grid", "cold_config", "load_warm_state", "parse_beta_grid",
           "read_manifest", "sweep"]

#: The sweep's own files in its folder (``--force`` removes them and the β folders the manifest names).
MANIFEST = "sweep.json"
SWEEP_FILES = (MANIFEST, "sweep.csv", "sweep.png", "sweep.pdf")
#: A finished β: its estimates are written last.
ESTIMATES = "estimates.csv"
_CRITICAL_NAMES = ("critical", "c", "beta_c")
#: i.i.d. flow samples measured per β
DEFAULT_SAMPLES = 4096
#: a β whose importance or reweighted rows fail the tail rules is measured again with this many
#: times the samples (``max_samples``), once
TAIL_SAMPLES_FACTOR = 4
#: each β's free energies are measured again with every RK4 step split in this many
DEFAULT_STEP_CHECK = 2
_MAX_POINTS = 1000


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


def _grid_number(text: str, where: str) -> float:
    t = text.strip()
    if t.lower() in _CRITICAL_NAMES:
        return CRITICAL_BETA
    try:
        value = float(t)
    except ValueError:
        raise ValueError(f"β grid {where}: {text.strip()!r} is not a number or 'critical'") from None
    if not math.isfinite(value):
        raise ValueError(f"β grid {where}: β must be finite, got {text.strip()!r}")
    if value <= 0:
        raise ValueError(f"β grid {where}: β must be > 0, got {text.strip()!r}")
    return value


def parse_beta_grid(spec: str | float | Iterable[float | str]) -> tuple[float, ...]:
    """The β grid of a sweep, sorted increasing (high temperature first).

    A string holds comma-separated items, each a number > 0, ``critical`` (β_c = ½ ln(1+√2)), or
    a range ``start:stop:n`` of n evenly spaced points from start to stop inclusive (start and
    stop may be ``critical``). A sequence of numbers or ``"critical"`` is checked the same way.

    Args:
        spec: e.g. ``"0.30:0.60:16"``, ``"0.3,0.4,critical,0.5"``, ``"0.3:0.4:3,critical"``,
            ``[0.3, "critical"]``.

    Returns:
        the distinct β values, increasing; β_c appears as exactly :data:`latticeflow.critical`.

    Raises:
        ValueError: an empty grid, an item that does not parse, β ≤ 0 or not finite, a range with
            n < 1 (or n > 1 points all equal), a duplicated β (naming it), more than 1000 points.

    Example:
        >>> parse_beta_grid("0.3:0.5:3,critical")
        (0.3, 0.4, 0.44068679350977147, 0.5)
    """
    if isinstance(spec, str):
        items = [s for s in spec.split(",")]
        if not spec.strip() or all(not s.strip() for s in items):
            raise ValueError(f"β grid is empty, got {spec!r}; give e.g. 0.30:0.60:16 or 0.3,0.4,critical")
        values: list[float] = []
        for k, item in enumerate(items):
            where = f"item {k + 1} of {spec!r}"
            if not item.strip():
                raise ValueError(f"β grid {where} is empty (a stray comma?)")
            if ":" in item:
                parts = item.split(":")
                if len(parts) != 3:
                    raise ValueError(f"β grid {where}: a range is start:stop:n, got {item.strip()!r}")
                start, stop = _grid_number(parts[0], where), _grid_number(parts[1], where)
                try:
                    n = int(parts[2])
                except ValueError:
                    raise ValueError(f"β grid {where}: the number of points n in start:stop:n must be an "
                                     f"integer >= 1, got {parts[2].strip()!r}") from None
                if not 1 <= n <= _MAX_POINTS:
                    raise ValueError(f"β grid {where}: the number of points n in start:stop:n must be in "
                                     f"[1, {_MAX_POINTS}], got {n}")
                # 12 significant digits: 0.4, not 0.39999999999999997 (β_c, an end point, stays exact)
                values.extend(float(v) if v == CRITICAL_BETA else float(f"{v:.12g}") for v in np.linspace(start, stop, n))
                if n > 1 and start == stop:
                    raise ValueError(f"β grid {where}: a range of {n} points from {start:g} to {stop:g} repeats β")
                if n == 1 and start != stop:
                    raise ValueError(f"β grid {where}: one point from {start:g} to {stop:g} is ambiguous; "
                                     f"give the point itself")
            else:
                values.append(_grid_number(item, where))
    else:
        if isinstance(spec, (int, float)):
            spec = [spec]
        values = []
        for k, v in enumerate(spec):
            where = f"item {k + 1}"
            if isinstance(v, str):
                values.append(_grid_number(v, where))
            elif isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise ValueError(f"β grid {where}: expected a number or 'critical', got {v!r}")
            else:
                values.append(_grid_number(repr(float(v)), where))
        if not values:
            raise ValueError("β grid is empty; give at least one β > 0")
    if len(values) > _MAX_POINTS:
        raise ValueError(f"β grid has {len(values)} points, more than {_MAX_POINTS}")
    ordered = sorted(values)
    for a, b in zip(ordered, ordered[1:]):
        if math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0):
            raise ValueError(f"β grid repeats β = {a:.10g}" + (" (critical)" if a == CRITICAL_BETA or b == CRITICAL_BETA else "")
                             + "; every β may appear once")
    return tuple(ordered)


class BetaGrid(tuple):
    """A parsed β grid (increasing floats): what ``--beta`` gives for a grid instead of one β."""


def beta_or_grid(text: str) -> float | str | BetaGrid:
    """An argparse ``type`` for ``--beta``: one β exactly as :func:`latticeflow.cli.beta_value` reads
    it, or, for text with ``,`` or ``:``, a :class:`BetaGrid` (see :func:`parse_beta_grid`)."""
    import argparse

    from .cli import beta_value

    if "," not in text and ":" not in text:
        return beta_value(text)
    try:
        return BetaGrid(parse_beta_grid(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def beta_folder(index: int, beta: float) -> str:
    """The folder name of the ``index``-th β of a sweep, e.g. ``b03_0.440687``."""
    return f"b{index:02d}_{beta:.6f}"


# ---------------------------------------------------------------------------------------------
# Building one β's run
# ---------------------------------------------------------------------------------------------

#: ``make_trainer(config, device, out_dir, progress=..., checkpoint_every=...) -> (trainer, target)``,
#: as :func:`models.ising.make_trainer` (the command line passes that one).
TrainerFactory = Callable[..., tuple[VariationalTrainer, Any]]


def _make_trainer(config: IsingConfig, device: torch.device, out_dir: str | None, progress: bool = False,
                  checkpoint_every: int = 100) -> tuple[VariationalTrainer, Any]:
    """The library's trainer of one β (:func:`latticeflow.build.make_trainer`)."""
    return make_trainer(config, device, out_dir, progress=progress, checkpoint_every=checkpoint_every)


def cold_config(config: IsingConfig) -> IsingConfig:
    """The flow of the ordered phase with ``cold_mixture``: the same potential without the Z2
    symmetry (the group without ``+z2``; the conv part then has biases), wrapped in the exact Z2
    mixture (``mixture="z2"``, twice the cost of an epoch).

    Below T_c the HS target has two magnetised modes far apart (at L=16, β=0.6, some 70 standard
    deviations along the zero mode), and a Z2-symmetric flow from one Gaussian must tear it in two;
    a flow that carries it to one mode, mirrored by the mixture, need not. Measured (README, "Every
    temperature"): L=8, β=0.6, annealed from 0.3, 600 epochs: 9.4e-3 → 7.3e-4.

    Raises:
        ValueError: a config that already has a mixture, or whose group is Z2 alone.
    """
    if config.mixture != "none":
        raise ValueError(f"cold_mixture sets the Z2 mixture of the ordered phase itself; the config has "
                         f"mixture={config.mixture!r} already")
    if config.group == "z2":
        raise ValueError("cold_mixture needs a lattice symmetry group to keep (group='z2' has none but Z2)")
    return config.replace(group=config.group.removesuffix("+z2"), mixture="z2")


def load_warm_state(flow: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load the neighbour's weights ``state`` into a β's ``flow``, also across the switch to the
    ordered phase's flow of :func:`cold_config` (a symmetric flow's weights into the Z2 mixture).

    The keys gain the mixture's ``flow.`` prefix where needed, and the only parameters the
    symmetric flow lacks, the conv part's biases, start at zero: the conv part is then the
    neighbour's (an odd pre-activation under an even activation), and the flow differs from the
    neighbour's only through the MLP part's odd half, which the Z2 average hid.

    Raises:
        ValueError: other keys missing or left over (not a neighbour of this flow's family).
    """
    own = flow.state_dict()
    if any(k.startswith("flow.") for k in own) and not any(k.startswith("flow.") for k in state):
        state = {f"flow.{k}": v for k, v in state.items()}
    missing, unexpected = flow.load_state_dict(state, strict=False)
    other = [k for k in missing if not k.endswith(".conv_bias")]
    if other or unexpected:
        raise ValueError(f"the neighbour's weights do not fit this β's flow (missing {other}, "
                         f"unexpected {list(unexpected)})")
    with torch.no_grad():
        for k in missing:
            flow.get_parameter(k).zero_()


def _beta_config(config: IsingConfig, beta: float, warm: bool, warm_epochs: int, lr_scale: float = 1.0,
                 from_beta: float | None = None, index: int = 0, cold_mixture: bool = False) -> IsingConfig:
    """The config of one β: β by name when critical; warm starts train ``warm_epochs`` with a short
    warm-up, at the learning rates times ``lr_scale`` (halved by each regressed warm start), and with
    the seed ``config.seed + index`` (the β's place in the grid). With ``anneal_from`` set, the first
    β anneals from it as a single run would, and a warm start from its neighbour's β ``from_beta``
    over half its epochs.

    The seed matters: a warm start with its neighbour's seed replays the neighbour's training
    samples, on which the neighbour's flow was fitted, so its first epochs' F/N came out low by up to
    7e-3 per site at L=8 (in-sample) and the warm-start guard read the fading of that bias as a rise
    (README, "In-sample samples"). With ``cold_mixture`` a β > β_c gets :func:`cold_config`."""
    cfg = config.replace(beta="critical" if beta == CRITICAL_BETA else beta, beta_name=None)
    if cold_mixture and beta > CRITICAL_BETA:
        cfg = cold_config(cfg)
    if warm:
        cfg = cfg.replace(seed=config.seed + index)
        anneal: dict[str, Any] = {}
        if cfg.anneal_from is not None:  # from the neighbour's β, not the first β's start
            ok = from_beta is not None and warm_epochs >= 2
            anneal = {"anneal_from": from_beta if ok else None, "anneal_epochs": warm_epochs // 2 if ok else None}
        cfg = cfg.replace(epochs=warm_epochs, warmup=min(cfg.warmup, warm_epochs // 4), **anneal)
    if lr_scale != 1.0:
        ext = cfg.extensive_lr
        cfg = cfg.replace(lr=cfg.lr * lr_scale, extensive_lr=ext if isinstance(ext, str) else ext * lr_scale)
    return cfg


#: the warm-start guard: a warm start "regressed" when its last epochs' mean F/N lies this many
#: standard errors above its first epochs' (the neighbour's flow at the new β)
REGRESSION_SIGMAS = 3.0
#: retries of a regressed warm start, each from the neighbour's weights at half the learning rate
WARM_RETRIES = 2
#: the warm-start guard on the measured gap to the exact F/N: a warm start "regressed" when its
#: variational F/N − exact (fresh samples) exceeds this many times its neighbour's by more than
#: ``REGRESSION_SIGMAS`` standard errors. The gap grows toward T_c: between neighbours of the L=16
#: sweep on the issue's grid by at most 1.7× (β = 0.386 → 0.407); the warm start that lost the
#: flow at β = 0.514 during its anneal (ESS 0.001) grew it 2.9×, unseen by the F/N rise test,
#: which compares only the epochs at the final β.
GAP_GROWTH = 2.0


def warm_regression(log: pd.DataFrame, window: int | None = None) -> tuple[float, float, float]:
    """How much a warm start's F/N rose from its first to its last epochs, and whether significantly.

    A warm start begins from the neighbouring β's trained flow; training should only lower the
    variational F/N (HS normalisation, a bound). The mean per-epoch F/N over the first ``window``
    epochs (the neighbour's flow at the new β, barely moved during the warm-up) is compared with
    the mean over the last ``window`` epochs; their standard errors come from the epoch-to-epoch
    scatter in each window.

    Args:
        log: the trainer's log, with a ``free_energy_hs`` column (one row per epoch); with a ``beta``
            column (annealed from the neighbour's β) only the epochs at the final β count.
        window: epochs at each end (default: a tenth of the epochs, at least 5).

    Returns:
        (rise = last mean − first mean, its standard error, rise / error in σ; NaN where the log is
        shorter than two windows).
    """
    if "beta" in log and len(log):  # an annealed warm start: only the epochs at the β of its last epoch compare
        log = log[log["beta"] == log["beta"].iloc[-1]]
    f = log["free_energy_hs"].to_numpy(dtype=float) if "free_energy_hs" in log else np.array([])
    w = window if window is not None else max(5, len(f) // 10)
    if len(f) < 2 * w or w < 2:
        return math.nan, math.nan, math.nan
    first, last = f[:w], f[-w:]
    rise = float(last.mean() - first.mean())
    err = float(math.sqrt(first.var(ddof=1) / w + last.var(ddof=1) / w))
    return rise, err, rise / err if err > 0 else (math.inf if rise > 0 else 0.0)


def variational_gap(table: pd.DataFrame) -> tuple[float, float]:
    """(variational F/N − exact, its standard error) in the HS normalisation from a β's measured
    table; NaN where the table has no exact reference (no Kaufman value, e.g. open boundaries)."""
    row = table[(table["quantity"] == "free_energy") & (table["normalisation"] == "hs")
                & (table["method"] == "variational")]
    if row.empty or not math.isfinite(float(row["exact"].iloc[0])):
        return math.nan, math.nan
    return float(row["value"].iloc[0] - row["exact"].iloc[0]), float(row["stderr"].iloc[0])


def gap_regression(table: pd.DataFrame, previous: pd.DataFrame) -> tuple[float, float, float]:
    """How far a warm start's measured gap to the exact F/N exceeds ``GAP_GROWTH`` times its neighbour's.

    Returns:
        (excess = gap − GAP_GROWTH·max(neighbour's gap, 0), its standard error, excess / error in σ);
        NaN without exact references.
    """
    gap, err = variational_gap(table)
    prev_gap, prev_err = variational_gap(previous)
    if not (math.isfinite(gap) and math.isfinite(prev_gap)):
        return math.nan, math.nan, math.nan
    excess = gap - GAP_GROWTH * max(prev_gap, 0.0)
    sigma = math.hypot(err, GAP_GROWTH * prev_err)
    return excess, sigma, excess / sigma if sigma > 0 else (math.inf if excess > 0 else 0.0)


# ---------------------------------------------------------------------------------------------
# Stop requests between β
# ---------------------------------------------------------------------------------------------


class _Signals:
    """SIGINT/SIGTERM noted (not raised) while the sweep runs outside a trainer's fit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Signals":
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._note)
        except ValueError:  # not the main thread
            pass
        return self

    def _note(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------


def _manifest(config: IsingConfig, betas: Sequence[float], warm_epochs: int, samples: int,
              step_check: int = 1, cold_epochs: int | None = None, cold_mixture: bool = False,
              max_samples: int | None = None) -> dict[str, Any]:
    return {"kind": "ising-sweep", "config": config.to_dict(), "betas": list(betas),
            "beta_names": ["critical" if b == CRITICAL_BETA else None for b in betas],
            "warm_epochs": warm_epochs, "cold_epochs": warm_epochs if cold_epochs is None else cold_epochs,
            "cold_mixture": bool(cold_mixture),
            "samples": samples, "max_samples": samples if max_samples is None else max_samples,
            "step_check": step_check,
            "runs": [beta_folder(k, b) for k, b in enumerate(betas)],
            "order": "increasing β (high temperature first); each β after the first starts from the previous "
                     "one's weights"}


def _cold_epochs(manifest: dict[str, Any]) -> int:
    """The warm epochs of a β > β_c in this sweep (sweeps written before ``cold_epochs``: ``warm_epochs``)."""
    return int(manifest.get("cold_epochs", manifest["warm_epochs"]))


def _cold_mixture(manifest: dict[str, Any]) -> bool:
    """Whether this sweep trains the β > β_c as a Z2 mixture (sweeps written before the option: no)."""
    return bool(manifest.get("cold_mixture", False))


def _max_samples(manifest: dict[str, Any]) -> int:
    """The manifest's ``max_samples``; sweeps written before the tail rule have none: their ``samples``."""
    return int(manifest.get("max_samples", manifest["samples"]))


def warm_epochs_of(beta: float, warm_epochs: int, cold_epochs: int) -> int:
    """The epochs of a warm-started β: ``cold_epochs`` in the ordered phase (β > β_c), else ``warm_epochs``."""
    return cold_epochs if beta > CRITICAL_BETA else warm_epochs


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of the sweep in ``folder``.

    Raises:
        ValueError: no sweep there, or an unreadable manifest (naming the file).
    """
    path = Path(folder)
    path = path if path.name == MANIFEST else path / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path.parent} holds no sweep (no {MANIFEST})")
    try:
        m = json.loads(path.read_text())
        IsingConfig.from_dict(m["config"])
        parse_beta_grid(m["betas"])
        if m.get("kind") != "ising-sweep":
            raise KeyError("kind")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a readable sweep manifest ({type(e).__name__}: {e})") from None
    return m


def resumed_manifest(folder: Path | None) -> dict[str, Any]:
    """The manifest of the sweep to resume in ``folder`` (ValueError without a folder or a sweep there)."""
    if folder is None:
        raise ValueError("resume needs the sweep's folder (out)")
    return read_manifest(folder)


def _check_resume(manifest: dict[str, Any], config: IsingConfig | None, betas: Sequence[float] | None, path: Path,
                  **given: Any) -> None:
    """Refuse a resume whose settings differ from the manifest's (naming each): ``config``, ``betas``
    and the sweep settings ``given`` (warm_epochs, cold_epochs, cold_mixture, samples, max_samples,
    step_check; None: not given)."""
    bad = []
    if config is not None and config.to_dict() != IsingConfig.from_dict(manifest["config"]).to_dict():
        old = IsingConfig.from_dict(manifest["config"]).to_dict()
        bad += [f"{k}={v!r} (sweep: {old[k]!r})" for k, v in config.to_dict().items() if old.get(k) != v]
    if betas is not None and list(betas) != list(manifest["betas"]):
        bad.append(f"β grid {list(betas)} (sweep: {manifest['betas']})")
    saved = {"warm_epochs": manifest["warm_epochs"], "cold_epochs": _cold_epochs(manifest),
             "samples": manifest["samples"], "step_check": manifest.get("step_check", 1),
             "cold_mixture": _cold_mixture(manifest), "max_samples": _max_samples(manifest)}
    bad += [f"{k}={v} (sweep: {saved[k]})" for k, v in given.items() if v is not None and v != saved[k]]
    if bad:
        raise ValueError(f"{', '.join(bad)}: a resumed sweep keeps the settings of {path / MANIFEST}")


def _default_measure(flow: torch.nn.Module, target: Any, n_samples: int, generator: torch.Generator,
                     step_check: int = 1) -> list[dict]:
    # the analysis layer measures; the library only orchestrates
    from analysis.thermo import estimate_rows, step_check_rows

    rows = estimate_rows(flow, target, n_samples=n_samples, generator=generator)
    if step_check > 1:
        rows += step_check_rows(flow, target, refine=step_check, n_samples=n_samples, generator=generator)
    return rows


def heavy_tailed(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The importance and reweighted rows (at the trained step) whose error bars fail the tail rules
    (``reliable`` False: :func:`analysis.thermo.estimate_rows`), as "quantity (k̂ …)" labels."""
    out = []
    for r in rows:
        if r["method"] in ("importance", "reweighted") and r.get("normalisation") != "ising" and not r.get("reliable", True):
            why = [f"k̂ {r['pareto_k']:.2f}"] if "Pareto" in str(r.get("reason", "")) else []
            why += ["Kish ESS < 100"] if "Kish ESS" in str(r.get("reason", "")) else []
            out.append(f"{r['quantity']} ({', '.join(why) or r.get('reason', '')})")
    return out


def measure_beta(flow: torch.nn.Module, target: Any, k: int, config: IsingConfig, samples: int, step_check: int,
                 run: Path | None, max_samples: int | None = None, verbose: bool = False,
                 **columns: Any) -> pd.DataFrame:
    """Measure the ``k``-th β of a sweep (fresh samples from a seed of its own) into its tidy table, with
    ``columns`` added; written atomically to ``run/estimates.csv`` (a β is finished exactly when it exists).

    When an importance or reweighted estimate fails the tail rules (:func:`heavy_tailed`) and
    ``max_samples`` > ``samples``, the β is measured again with ``max_samples`` fresh samples, which
    replace the first (the step check's rows are kept); column ``extended_from`` holds the first
    count (0: not measured again). Below T_c at L=16 the weights of rare configurations between the
    two magnetised modes made χ, U₄ and C/N miss by 3–4σ with 16384 samples and agree within 1.4σ
    with 65536 (README, "Every temperature"); the rows keep their verdict either way."""
    beta = float(target.beta)
    where = next(flow.parameters()).device
    gen = torch.Generator(device=where).manual_seed(1_000_003 * (config.seed + 1) + k)
    rows = _default_measure(flow, target, samples, gen, step_check)
    extended_from = 0
    heavy = heavy_tailed(rows)
    if heavy and max_samples is not None and max_samples > samples:
        if verbose:
            print(f"  β = {beta:.6f}: heavy tails with {samples} samples ({', '.join(heavy)}); measured again "
                  f"with {max_samples}", flush=True)
        refined = [r for r in rows if r["method"].endswith("_refined")]
        rows = _default_measure(flow, target, max_samples, gen, 1) + refined
        extended_from = samples
    table = pd.DataFrame(rows)
    table["extended_from"] = extended_from
    table.insert(0, "beta", beta)
    table.insert(1, "beta_name", "critical" if beta == CRITICAL_BETA else "")
    table.insert(2, "L", config.L)
    for name, value in columns.items():
        table[name] = value
    if run is not None:
        run.mkdir(parents=True, exist_ok=True)
        tmp = run / f"{ESTIMATES}.tmp"
        table.to_csv(tmp, index=False)
        tmp.replace(run / ESTIMATES)
    return table


def collect_and_plot(folder: Path | None, done: dict[int, pd.DataFrame], config: IsingConfig, plot: bool,
                     what: str) -> pd.DataFrame:
    """The sweep's table of the measured β (written to ``sweep.csv``), and its figure when ``plot``."""
    table = _collect(folder, done)
    if folder is not None and plot and len(table):
        from analysis.thermo import plot_sweep

        plot_sweep(table, folder / "sweep.png", L=config.L, J=config.J, title=f"Ising L={config.L}: {what} against Kaufman")
    return table


def _saved_lr_scale(run: Path, default: float) -> float:
    """The learning-rate scale a β folder's ``config.json`` records (``default`` if none)."""
    try:
        return float(json.loads((run / "config.json").read_text()).get("lr_scale", default))
    except (OSError, ValueError, TypeError):
        return default


def _collect(folder: Path | None, done: dict[int, pd.DataFrame]) -> pd.DataFrame:
    frames = [done[k] for k in sorted(done)]
    if not frames:
        from analysis.thermo import COLUMNS

        return pd.DataFrame(columns=list(COLUMNS))
    table = pd.concat(frames, ignore_index=True)
    if folder is not None:
        tmp = folder / f"sweep.csv.{id(table)}.tmp"
        table.to_csv(tmp, index=False)
        tmp.replace(folder / "sweep.csv")
    return table


def sweep(config: IsingConfig | None, betas: str | Sequence[float | str] | None, *, out: str | Path | None = None,
          warm_epochs: int | None = None, cold_epochs: int | None = None, samples: int | None = None,
          max_minutes: float | None = None, resume: bool = False, force: bool = False,
          device: str | torch.device = "cpu", progress: bool = False,
          verbose: bool = False, plot: bool = True, checkpoint_every: int = 100,
          make_trainer: TrainerFactory | None = None, step_check: int | None = None,
          cold_mixture: bool | None = None, max_samples: int | None = None) -> pd.DataFrame:
    """Train and measure the flow at every β of a grid (fixed L), warm-starting each β from the last.

    Args:
        config: the run's configuration (its ``beta`` is ignored; ``epochs`` trains the first β).
        betas: the grid, as :func:`parse_beta_grid` takes it (a string or a sequence).
        out: the sweep's folder (see the module docstring); None: nothing is written, no resume.
        warm_epochs: epochs of each warm-started β (default: a quarter of ``config.epochs``, at least 1).
        cold_epochs: epochs of each warm-started β above β_c (the ordered phase; default ``warm_epochs``).
        samples: i.i.d. flow samples measured per β, >= 2 (default 4096).
        max_minutes: wall-clock budget of the whole sweep, counted from the end of set-up (None: none;
            like a single run, at least one epoch runs). A β cut off by it keeps its checkpoint and
            is continued on resume; a β whose training ended is still measured.
        resume: continue the sweep in ``out`` (its manifest's settings; ``config``, ``betas``,
            ``warm_epochs``, ``cold_epochs``, ``samples`` and the others must be None or agree).
            Finished β are read back.
        force: replace a sweep (or run) already in ``out``: the sweep's files and the β folders its
            manifest names are deleted first.
        device: torch device.
        progress: tqdm bars while training.
        verbose: print one line per β.
        plot: write ``sweep.png``/``.pdf`` (needs ``out``).
        checkpoint_every: epochs between checkpoints of each β.
        make_trainer: how a β's trainer is built (default: as ``models.ising`` builds it, one process).
        step_check: also measure the free energies with each RK4 step split in this many
            (:func:`analysis.thermo.step_check_rows`, fresh samples; methods ``*_refined``), the
            check that an estimate is converged in the step (default 2; 1: no check).
        cold_mixture: train the β > β_c as a Z2 mixture of a flow without the Z2 symmetry
            (:func:`cold_config`; default False).
        max_samples: a β whose importance or reweighted error bars fail the tail rules with
            ``samples`` is measured again with this many (:func:`measure_beta`; default
            :data:`TAIL_SAMPLES_FACTOR` × ``samples``; ``samples``: never).

    Returns:
        the tidy table of :data:`analysis.thermo.COLUMNS` (one row per β, quantity, method; the β
        measured so far), with ``attrs``: ``stop_reason`` ("finished", "time", "signal"),
        ``stop_signal``, ``out`` (the folder or None), ``betas`` (the grid), ``finished`` (β measured),
        ``wall_s``.

    Raises:
        ValueError: a bad grid or setting, an occupied ``out`` (nothing written), a resume without a
            sweep there or with other settings.
        TrainingDiverged: a β diverged (every finished β is kept, and the β's log and checkpoint).
    """
    t0 = time.perf_counter()
    folder = Path(out) if out is not None else None
    if resume:
        manifest = resumed_manifest(folder)
        if manifest.get("method") == "conditioned":  # one β-conditioned flow: its own resume
            from .conditioned import conditioned_sweep

            return conditioned_sweep(None, None, out=folder, resume=True, max_minutes=max_minutes, device=device,
                                     progress=progress, verbose=verbose, plot=plot, checkpoint_every=checkpoint_every)
        grid = None if betas is None else parse_beta_grid(betas)
        _check_resume(manifest, config, grid, folder, warm_epochs=warm_epochs, cold_epochs=cold_epochs,
                      cold_mixture=cold_mixture, samples=samples, step_check=step_check, max_samples=max_samples)
        config = IsingConfig.from_dict(manifest["config"])
        grid = tuple(float(b) for b in manifest["betas"])
        warm_epochs, samples = int(manifest["warm_epochs"]), int(manifest["samples"])
        cold_epochs = _cold_epochs(manifest)
        cold_mixture = _cold_mixture(manifest)
        max_samples = _max_samples(manifest)
        step_check = int(manifest.get("step_check", 1))  # sweeps written before the check had none
    else:
        if not isinstance(config, IsingConfig):
            raise TypeError(f"config must be an IsingConfig, got {type(config).__name__}")
        if betas is None:
            raise ValueError("a sweep needs a β grid (betas)")
        refuse_schedule_minutes(config)
        grid = parse_beta_grid(betas)
        warm_epochs = check_size("warm_epochs", warm_epochs) if warm_epochs is not None else max(1, config.epochs // 4)
        cold_epochs = check_size("cold_epochs", cold_epochs) if cold_epochs is not None else warm_epochs
        samples = check_size("samples", samples if samples is not None else DEFAULT_SAMPLES, 2)
        max_samples = check_size("max_samples", max_samples if max_samples is not None
                                 else TAIL_SAMPLES_FACTOR * samples, samples)
        step_check = check_size("step_check", step_check if step_check is not None else DEFAULT_STEP_CHECK)
        cold_mixture = bool(cold_mixture)
        if cold_mixture:
            cold_config(config)  # a config it cannot apply to fails here
        manifest = _manifest(config, grid, warm_epochs, samples, step_check, cold_epochs, cold_mixture,
                             max_samples)
    if max_minutes is not None and not (isinstance(max_minutes, (int, float)) and max_minutes > 0):
        raise ValueError(f"max_minutes must be a number > 0 or None, got max_minutes={max_minutes!r}")
    device = torch.device(device)
    make = make_trainer or _make_trainer
    runs = [folder / name for name in manifest["runs"]] if folder is not None else [None] * len(grid)

    if not resume:  # a config that cannot build its flow fails here, before anything is written
        make(_beta_config(config, grid[0], False, warm_epochs, cold_mixture=cold_mixture), device, None,
             progress=False)
    root: RunFolder | None = None
    if folder is not None:
        old = folder / MANIFEST
        root = RunFolder(folder, resume=old if resume else None, force=force, outputs=SWEEP_FILES).check()
        old_runs = []
        if not resume:
            if force and old.is_file():
                try:
                    old_runs = [folder / n for n in json.loads(old.read_text()).get("runs", [])]
                except (OSError, ValueError):
                    old_runs = []
            # a fresh sweep never continues β folders it did not write (a sweep without its manifest)
            clash = [r for r in runs if r.is_dir() and any(r.iterdir())]
            if clash and not force:
                raise RunFolderError(f"{folder} already holds β runs ({', '.join(r.name for r in clash)}): continue "
                                     f"a sweep with --resume {folder}, choose another --out, or replace it with --force")
            old_runs += [r for r in clash if r not in old_runs]
        root.claim()  # set-up succeeded: only now is anything written
        for path in old_runs:  # --force: the old sweep's β runs (only the folders its manifest names)
            if path.is_dir() and path.parent == folder:
                shutil.rmtree(path)
        if not resume:
            write_json(folder / MANIFEST, manifest)
    done: dict[int, pd.DataFrame] = {}
    stop_reason, stop_signal = "finished", None
    deadline = None if max_minutes is None else time.perf_counter() + 60.0 * max_minutes  # after set-up
    trained = False
    try:
        with _Signals() as sigs:
            prev_state: dict[str, torch.Tensor] | None = None
            prev_name: str | None = None
            lr_scale = 1.0  # halved by each regressed warm start, and kept for the colder β
            for k, (beta, run) in enumerate(zip(grid, runs)):
                name = manifest["runs"][k]
                if run is not None and (run / ESTIMATES).is_file():  # finished before: read back
                    done[k] = pd.read_csv(run / ESTIMATES)
                    prev_name = name
                    prev_state = None  # loaded lazily from its checkpoint if the next β needs it
                    lr_scale = _saved_lr_scale(run, lr_scale)
                    continue
                if sigs.signum is not None:
                    stop_reason, stop_signal = "signal", sigs.signum
                    break
                warm = k > 0
                ckpt = run / "checkpoint.pt" if run is not None else None
                if ckpt is not None and ckpt.is_file():  # an interrupted β continues at its own learning rate
                    lr_scale = _saved_lr_scale(run, lr_scale)
                retries: list[dict[str, float]] = []
                while True:  # one pass, plus one per regressed warm start (at most WARM_RETRIES)
                    remaining = None if deadline is None else (deadline - time.perf_counter()) / 60.0
                    if remaining is not None and remaining <= 0:
                        if trained:
                            stop_reason = "time"
                            break
                        remaining = 1e-9  # like a single run, a sweep trains at least one epoch per invocation
                    cfg = _beta_config(config, beta, warm, warm_epochs_of(beta, warm_epochs, cold_epochs),
                                       lr_scale if warm else 1.0,
                                       from_beta=grid[k - 1] if warm else None, index=k,
                                       cold_mixture=cold_mixture)
                    sub: RunFolder | None = None
                    if run is not None:
                        # a β folder without a checkpoint holds nothing worth keeping (killed before its first one)
                        sub = RunFolder(run, resume=ckpt if ckpt.is_file() else None, force=True).claim()
                    try:
                        trainer, target = make(cfg, device, str(run) if run is not None else None, progress=progress,
                                               checkpoint_every=checkpoint_every)
                        if ckpt is not None and ckpt.is_file():
                            trainer.load(ckpt)
                            how = f"resumed at epoch {trainer.epoch}"
                        elif warm:
                            if prev_state is None:
                                prev_state = load_checkpoint(runs[k - 1] / "checkpoint.pt", required=("model",))["model"]
                            load_warm_state(trainer.flow, prev_state)
                            how = f"warm start from {prev_name}"
                        else:
                            how = "from scratch"
                        if run is not None:
                            write_json(run / "config.json", {**cfg.to_dict(), "warm_start_from": prev_name if warm else None,
                                                             "lr_scale": lr_scale if warm else 1.0})
                        if verbose:
                            print(f"β = {beta:.6f}{' (critical)' if beta == CRITICAL_BETA else ''} [{k + 1}/{len(grid)}]: "
                                  f"{cfg.epochs} epochs, {how}" + (f", lr ×{lr_scale:g}" if warm and lr_scale != 1 else ""),
                                  flush=True)
                        redo: dict[str, Any] | None = None  # why this warm start is done again, if it is
                        try:
                            log = trainer.fit(cfg.epochs, max_minutes=remaining)
                        except TrainingDiverged as e:
                            if not warm or len(retries) >= WARM_RETRIES:
                                raise
                            # a warm start that diverges (below T_c: a fresh Adam at the full rate can
                            # push the flow out of the ordered phase faster than rollbacks undo it) is
                            # a regression too
                            redo = {"diverged": str(e),
                                    "train_s": float(trainer.log["wall_time"].iloc[-1]) if len(trainer.log) else 0.0}
                            said = f"the warm start diverged ({e})"
                        trained = True
                        if redo is None:
                            train_s = float(log["wall_time"].iloc[-1]) if len(log) else 0.0
                            rise, rise_err, rise_sigma = warm_regression(log) if warm else (math.nan,) * 3
                            if run is not None:
                                write_json(run / "summary.json", {"beta": beta, "epochs": trainer.epoch,
                                                                  "stop_reason": trainer.stop_reason,
                                                                  "warm_start_from": prev_name if warm else None,
                                                                  "lr_scale": lr_scale if warm else 1.0,
                                                                  "warm_rise": rise, "warm_rise_stderr": rise_err,
                                                                  "earlier_attempts": retries,
                                                                  "train_s": train_s, "provenance": provenance(device)})
                            if trainer.stop_reason == "signal":
                                stop_reason, stop_signal = "signal", trainer.stop_signal
                                break
                            if trainer.stop_reason == "time":
                                stop_reason = "time"
                                break
                            if rise_sigma > REGRESSION_SIGMAS and len(retries) < WARM_RETRIES:
                                # training made the flow worse than the neighbour's at this β
                                redo = {"rise": rise, "rise_stderr": rise_err, "train_s": train_s}
                                said = (f"F/N rose by {rise:.2e} ± {rise_err:.1e} ({rise_sigma:.1f}σ) during the "
                                        f"warm start")
                        if redo is not None:
                            # start the β again from the neighbour's weights at half the learning rate
                            retries.append({"lr_scale": lr_scale, **redo})
                            if verbose:
                                print(f"  β = {beta:.6f}: {said}; again from {prev_name} at lr ×{lr_scale / 2:g}",
                                      flush=True)
                            lr_scale /= 2
                            if ckpt is not None:
                                for n in ("checkpoint.pt", "log.csv"):
                                    (run / n).unlink(missing_ok=True)
                            continue
                        table = measure_beta(trainer.flow, target, k, config, samples, step_check, run,
                                             max_samples=max_samples, verbose=verbose,
                                             epochs=trainer.epoch, warm_start_from=prev_name if warm else "",
                                             train_s=train_s + sum(r["train_s"] for r in retries),
                                             lr_scale=lr_scale if warm else 1.0, warm_retries=len(retries),
                                             warm_rise_sigma=rise_sigma)
                        excess, excess_err, excess_sigma = (gap_regression(table, done[k - 1])
                                                            if warm and (k - 1) in done else (math.nan,) * 3)
                        if excess_sigma > REGRESSION_SIGMAS and len(retries) < WARM_RETRIES:
                            # fresh samples show a flow far worse than the neighbour's (lost during an anneal)
                            gap, _ = variational_gap(table)
                            retries.append({"lr_scale": lr_scale, "gap": gap, "gap_excess": excess,
                                            "gap_excess_stderr": excess_err, "train_s": train_s})
                            if verbose:
                                print(f"  β = {beta:.6f}: variational F/N − exact {gap:.2e} is more than "
                                      f"{GAP_GROWTH:g}× the neighbour's ({excess_sigma:.1f}σ); again from {prev_name} "
                                      f"at lr ×{lr_scale / 2:g}", flush=True)
                            lr_scale /= 2
                            if run is not None:
                                for n in ("checkpoint.pt", "log.csv", ESTIMATES):
                                    (run / n).unlink(missing_ok=True)
                            continue
                        done[k] = table
                        prev_state = {n: v.detach().clone() for n, v in trainer.flow.state_dict().items()}
                        prev_name = name
                        if verbose:
                            _say(table, beta)
                        _collect(folder, done)
                        break
                    finally:
                        if sub is not None:
                            sub.release()
                if stop_reason != "finished":
                    break
        table = collect_and_plot(folder, done, config, plot, "flow (warm-started sweep)")
    finally:
        if root is not None:
            root.release()
    table.attrs.update(stop_reason=stop_reason, stop_signal=stop_signal, out=str(folder) if folder else None,
                       finished=[grid[k] for k in sorted(done)], betas=list(grid), wall_s=time.perf_counter() - t0)
    return table


def _say(table: pd.DataFrame, beta: float) -> None:
    """One line per finished β: F/N (importance), U/N, C/N with errors and deviations in σ."""
    parts = []
    for q, label, method, norm in (("free_energy", "F/N", "importance", "ising"), ("energy", "U/N", "reweighted", ""),
                                   ("specific_heat", "C/N", "reweighted", "")):
        r = table[(table.quantity == q) & (table.method == method) & (table.normalisation.fillna("") == norm)].iloc[0]
        parts.append(f"{label} {r.value:.5f}±{r.stderr:.5f} (exact {r.exact:.5f}, {r.deviation_sigma:+.1f}σ)")
    ess = float(table["ess"].iloc[0])
    heavy = heavy_tailed(table.to_dict("records"))
    if heavy:
        parts.append(f"error bars not reliable (heavy tails at {int(table['n_samples'].iloc[0])} samples): "
                     + ", ".join(heavy))
    fine = table[(table.quantity == "free_energy") & (table.method == "importance_refined")
                 & (table.normalisation == "ising")]
    if len(fine):
        r = fine.iloc[0]
        parts.append(f"F/N at ε/{int(r.step_refine)} {r.value:.5f}±{r.stderr:.5f} ({r.deviation_sigma:+.1f}σ)")
    print(f"  β = {beta:.6f}: " + "; ".join(parts) + f"; ESS {ess:.3f}", flush=True)

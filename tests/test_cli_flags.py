"""Every flag of every command line reaches the object it configures.

From the issue: "a flag that does nothing or crashes cannot ship again". For each driver:

* config flags: a table of cases. Each case parses ``--flag value`` (after a tiny base command
  line and an optional ``control`` prefix), and asserts that the config key changed from the
  control's AND that a probe of the built object (target, flow, trainer, data, settings) gives the
  expected value, which the control's object does not give;
* run flags (output folder, resume, threads, ...): tiny ``main([...])`` runs in ``tmp_path``;
* bad values: exit status 2 and no output folder;
* coverage: the flags named by the tests of a driver are exactly the option strings of its parser
  (a new flag without a test fails ``test_*_every_flag_is_tested``).

Sections: 0 shared helpers, 1 ``python -m models.ising``, 2 ``python -m models.mnist``,
3 run flags shared by both training drivers, 4 ``python -m analysis``,
5 ``python -m latticeflow.mnist``, 6 help texts and coverage.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pandas as pd
import pytest
import torch

import analysis.__main__ as am
import analysis.mnist_plots as amp
import latticeflow.distributed as lfdist
import latticeflow.mnist as lfm
import latticeflow.mnist.__main__ as lfm_cli
import latticeflow.train as lftrain
import models.ising as mi
import models.mnist as mm
from analysis.report import ReportSettings
from latticeflow.distributed import rank_seed
from latticeflow.exact import CRITICAL_BETA
from latticeflow.ising import ising
from latticeflow.mixture import SymmetricMixture
from latticeflow.potentials import ConvPotential, MLPPotential, QuadraticPotential, Symmetrized
from mnist_helpers import write_mnist

# =============================================================================================
# 0. Shared helpers
# =============================================================================================

#: flags covered by this file, per driver (filled at import by the tables and by @covers)
COVERED: dict[str, set[str]] = collections.defaultdict(set)

#: a case's expected probe value meaning "anything but the control's"
CHANGED = object()


def covers(driver: str | tuple[str, ...], *flags: str) -> Callable:
    """Register the flags a test function checks (for the coverage test of section 6)."""
    for name in (driver,) if isinstance(driver, str) else driver:
        COVERED[name].update(flags)
    return lambda fn: fn


@dataclass(frozen=True)
class Case:
    """One config flag: ``argv`` (after the base and ``control``) must set ``config`` and make
    ``probe(built)`` equal ``expected``; the control's config and probe must differ."""

    flag: str
    argv: tuple[str, ...]
    config: dict
    probe: Callable[[Any], Any]
    expected: Any
    control: tuple[str, ...] = ()


def table(driver: str, *rows: Case | tuple[Case, str]) -> list:
    """pytest params of the cases; a ``(case, reason)`` pair is a strict xfail (a known broken flag)."""
    params = []
    for row in rows:
        case, reason = row if isinstance(row, tuple) else (row, None)
        COVERED[driver].add(case.flag)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(case, marks=marks, id=" ".join((case.flag, *case.argv[1:]))))
    return params


def check_case(case: Case, got: Any, control: Any) -> None:
    for key, value in case.config.items():
        assert got.cfg[key] == value, f"{case.flag}: config[{key!r}] = {got.cfg[key]!r}, expected {value!r}"
        assert control.cfg[key] != value, f"{case.flag}: the control already has config[{key!r}] = {value!r}"
    value, before = case.probe(got), case.probe(control)
    if case.expected is CHANGED:
        assert value != before, f"{case.flag} did not change the built object ({value!r})"
    else:
        assert value == case.expected, f"{case.flag}: built object gives {value!r}, expected {case.expected!r}"
        assert before != case.expected, f"{case.flag}: the control already gives {before!r}"


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def exit_status(fn: Callable[[list[str]], Any], argv: list[str]) -> Any:
    """``fn(argv)``'s return value, or the code of the SystemExit it raised (argparse errors)."""
    try:
        return fn(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # drivers without --threads take OMP_NUM_THREADS (no 0.25 s probe of the idle CPUs; 2 cores here)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# =============================================================================================
# 1. python -m models.ising: config flags → config dict, target, flow, optimiser, trainer
# =============================================================================================

ISING_BASE = ("--L", "4", "--hidden", "4", "--n-steps", "2", "--batch", "8", "--epochs", "3")


def ising_build(argv: tuple[str, ...]) -> SimpleNamespace:
    """Config, trainer and target of a command line, and the flow's parts."""
    cfg = mi.config_from_args(mi.parse_args(list(argv)))
    trainer, target = mi.make_trainer(cfg, torch.device("cpu"), None, progress=False)
    flow = trainer.flow.flow if isinstance(trainer.flow, SymmetricMixture) else trainer.flow
    pot = flow.potential
    parts = list(pot.parts) if hasattr(pot, "parts") else [pot]
    inner = [p.potential if isinstance(p, Symmetrized) else p for p in parts]
    return SimpleNamespace(
        cfg=cfg, trainer=trainer, target=target, flow=flow, inner=inner,
        mlp=next((p for p in inner if isinstance(p, MLPPotential)), None),
        conv=next((p for p in inner if isinstance(p, ConvPotential)), None),
        quad=next((p for p in inner if isinstance(p, QuadraticPotential)), None),
        sym=next((p for p in parts if isinstance(p, Symmetrized)), None))


def _lr_factor(step: int) -> Callable[[Any], float]:
    return lambda b: b.trainer.scheduler.lr_lambdas[0](step)


ISING_CASES = table(
    "ising",
    # target
    Case("--L", ("--L", "3"), {"L": 3}, lambda b: b.target.N, 9),
    # regression: a numeric --beta used to be rejected
    Case("--beta", ("--beta", "0.3"), {"beta": 0.3, "beta_name": None}, lambda b: b.target.beta, 0.3),
    Case("--J", ("--J", "0.5"), {"J": 0.5}, lambda b: b.target.J, 0.5),
    # potential (the base is the built-in quadratic+conv+mlp)
    Case("--potential", ("--potential", "mlp"), {"potential": "mlp"},
         lambda b: sorted(type(p).__name__ for p in b.inner), ["MLPPotential"]),
    Case("--hidden", ("--hidden", "6"), {"hidden": 6}, lambda b: b.mlp.hidden, 6),
    Case("--activation", ("--activation", "tanh"), {"activation": "tanh"}, lambda b: b.mlp.activation, "tanh"),
    Case("--bias", ("--bias",), {"bias": True}, lambda b: b.mlp.bias is not None, True, control=("--no-bias",)),
    Case("--no-bias", ("--no-bias",), {"bias": False}, lambda b: b.mlp.bias is None, True),
    Case("--channels", ("--channels", "3"), {"channels": 3}, lambda b: b.conv.channels, 3),
    Case("--conv-layers", ("--conv-layers", "2"), {"conv_layers": 2}, lambda b: b.conv.layers, 2),
    Case("--kernel-size", ("--kernel-size", "1"), {"kernel_size": 1}, lambda b: b.conv.kernel_size, 1),
    Case("--init-scale", ("--init-scale", "0"), {"init_scale": 0.0},  # 0: zero readouts (identity flow)
         lambda b: (not b.mlp.readout.any().item(), not b.conv.readout.any().item()), (True, True)),
    Case("--init-scale", ("--init-scale", "linear"), {"init_scale": "linear"},  # U(±1/√4), not 1e-3·N(0, 1)
         lambda b: b.mlp.readout.abs().max().item() > 0.05, True),
    Case("--quadratic-init", ("--quadratic-init", "zero"), {"quadratic_init": "zero"},
         lambda b: float(b.quad.a.detach().abs().max()), 0.0, control=("--quadratic-init", "gaussian")),
    Case("--quadratic-init", ("--quadratic-init", "gaussian"), {"quadratic_init": "gaussian"},
         # A = ln(Σ*)/(2T): the top eigenvalue of A·2T is ln of the best Gaussian's top variance (zero: A = 0)
         lambda b: round(float(torch.linalg.eigvalsh(b.quad.matrix().detach().double()).max()) * 2 * b.flow.n_steps
                         * b.flow.step_size, 6),
         round(math.log(float(ising(4, "critical").best_gaussian()["spectrum"].max())), 6),
         control=("--quadratic-init", "zero")),
    Case("--time-dependent", ("--time-dependent",), {"time_dependent": True},
         lambda b: (b.mlp.readout_t is not None, b.conv.readout_t is not None), (True, True),
         control=("--no-time-dependent",)),
    Case("--no-time-dependent", ("--no-time-dependent",), {"time_dependent": False},
         lambda b: (b.mlp.time_dependent, b.conv.time_dependent), (False, False)),
    # flow
    Case("--n-steps", ("--n-steps", "3"), {"n_steps": 3}, lambda b: b.flow.n_steps, 3),
    Case("--step-size", ("--step-size", "0.05"), {"step_size": 0.05}, lambda b: b.flow.step_size, 0.05),
    Case("--symmetrize", ("--symmetrize", "exact"), {"symmetrize": "exact"}, lambda b: b.sym.mode, "exact"),
    Case("--symmetrize", ("--symmetrize", "none"), {"symmetrize": "none"}, lambda b: b.sym is None, True),
    Case("--group", ("--group", "d4"), {"group": "d4"}, lambda b: b.sym.order, 8),
    Case("--mixture", ("--mixture", "z2"), {"mixture": "z2"},
         lambda b: (type(b.trainer.flow).__name__, getattr(b.trainer.flow, "order", None)), ("SymmetricMixture", 2)),
    Case("--dtype", ("--dtype", "float64"), {"dtype": "float64"},
         lambda b: {p.dtype for p in b.trainer.flow.parameters()}, {torch.float64}),
    Case("--grad-checkpoint", ("--grad-checkpoint",), {"grad_checkpoint": True}, lambda b: b.flow.checkpoint, True),
    Case("--no-grad-checkpoint", ("--no-grad-checkpoint",), {"grad_checkpoint": False},
         lambda b: b.flow.checkpoint, False, control=("--grad-checkpoint",)),
    # training
    Case("--batch", ("--batch", "6"), {"batch": 6}, lambda b: b.trainer.batch_size, 6),
    Case("--lr", ("--lr", "0.005"), {"lr": 0.005},
         lambda b: b.trainer.optimizer.param_groups[0]["initial_lr"], 0.005),  # before the schedule's factor
    Case("--weight-decay", ("--weight-decay", "0.01"), {"weight_decay": 0.01},
         lambda b: b.trainer.optimizer.param_groups[0]["weight_decay"], 0.01),
    # the MLP's input weights (and the quadratic kernel) in a group of their own at that rate (the base lattice is too small for 'auto' to differ)
    Case("--extensive-lr", ("--extensive-lr", "0.002"), {"extensive_lr": 0.002},
         lambda b: [(g["initial_lr"], any(p is b.mlp.weight for p in g["params"]))
                    for g in b.trainer.optimizer.param_groups], [(0.01, False), (0.002, True)]),
    Case("--extensive-lr", ("--extensive-lr", "0.002"), {"extensive_lr": 0.002},
         lambda b: [any(p is b.quad.a for p in g["params"]) for g in b.trainer.optimizer.param_groups], [False, True]),
    Case("--epochs", ("--epochs", "7"), {"epochs": 7}, _lr_factor(3),  # the cosine decay spans the epochs
         pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 3 / 7))), control=("--warmup", "0")),
    Case("--warmup", ("--warmup", "2"), {"warmup": 2}, _lr_factor(0), 0.5),
    Case("--schedule", ("--schedule", "constant"), {"schedule": "constant"}, lambda b: b.trainer.scheduler is None, True),
    Case("--schedule-minutes", ("--schedule-minutes", "0.5"), {"schedule_minutes": 0.5},  # the decay spans 30 s
         lambda b: getattr(b.trainer.scheduler, "seconds", None), 30.0),
    Case("--grad-clip", ("--grad-clip", "0.5"), {"grad_clip": 0.5}, lambda b: b.trainer.grad_clip, 0.5),
    Case("--grad-clip", ("--grad-clip", "auto"), {"grad_clip": "auto"}, lambda b: b.trainer.grad_clip, "auto"),
    Case("--gradient-estimator", ("--gradient-estimator", "path"), {"gradient_estimator": "path"},
         lambda b: b.trainer.gradient_estimator, "path"),
    Case("--gradient-estimator", ("--gradient-estimator", "total"), {"gradient_estimator": "total"},
         lambda b: b.trainer.gradient_estimator, "total", control=("--gradient-estimator", "path")),
    # β annealing: epoch 0 trains at 0.2, the last of the anneal (half of the 3 epochs: 1) at the target β
    Case("--anneal-from", ("--anneal-from", "0.2"), {"anneal_from": 0.2, "anneal_epochs": 1},
         lambda b: (b.trainer.target_at(0).beta, b.trainer.target_at(1) is b.target) if b.trainer.target_at else None,
         (0.2, True)),
    Case("--anneal-epochs", ("--anneal-epochs", "2"), {"anneal_epochs": 2},
         lambda b: round(b.trainer.target_at(1).beta, 9), round(0.2 + 0.5 * (CRITICAL_BETA - 0.2), 9),
         control=("--anneal-from", "0.2")),
    Case("--train-precision", ("--train-precision", "bfloat16"), {"train_precision": "bfloat16"},
         lambda b: b.trainer.train_precision, "bfloat16"),
    Case("--max-rollbacks", ("--max-rollbacks", "2"), {"max_rollbacks": 2}, lambda b: b.trainer.max_rollbacks, 2),
    Case("--seed", ("--seed", "3"), {"seed": 3},  # the generator from SeedSequence([3]), not 3 itself
         lambda b: (b.trainer.seed, b.trainer.generator.initial_seed()), (3, rank_seed(3, 0))),
    Case("--seed", ("--seed", "4"), {"seed": 4}, lambda b: b.mlp.weight.flatten()[:4].tolist(), CHANGED),
    # the paper's preset (explicit flags of the base still win)
    Case("--paper", ("--paper",), {"bias": False, "schedule": "constant", "init_scale": "linear", "time_dependent": False},
         lambda b: (b.mlp.bias is None, b.trainer.scheduler is None, b.mlp.time_dependent), (True, True, False)),
)


@pytest.mark.parametrize("case", ISING_CASES)
def test_ising_config_flag_reaches_the_built_objects(case: Case) -> None:
    control = ising_build(ISING_BASE + case.control)
    check_case(case, ising_build(ISING_BASE + case.control + case.argv), control)


def test_ising_paper_preset_is_the_papers_configuration() -> None:
    from latticeflow.config import ISING_PAPER

    cfg = mi.config_from_args(mi.parse_args(["--paper"]))
    assert cfg == ISING_PAPER
    # appendix C and the original code: ln cosh MLP without biases, h=512, 50 RK4 steps of 0.1, batch 64, Adam 1e-3
    assert (cfg.L, cfg.hidden, cfg.n_steps, cfg.step_size, cfg.batch, cfg.lr, cfg.activation, cfg.bias,
            cfg.init_scale, cfg.schedule) == (16, 512, 50, 0.1, 64, 1e-3, "lncosh", False, "linear", "constant")


@covers("ising", "--checkpoint-every")
def test_ising_checkpoint_every(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved: list[int] = []
    real = lftrain.Trainer.save
    monkeypatch.setattr(lftrain.Trainer, "save", lambda self, *a, **k: (saved.append(self.epoch), real(self, *a, **k))[1])
    mi.main(ISING.argv(tmp_path / "control", "--epochs", "3"))
    assert saved == [3]  # default 100: only the last epoch
    saved.clear()
    mi.main(ISING.argv(tmp_path / "run", "--epochs", "3", "--checkpoint-every", "2"))
    assert saved == [2, 3]


def test_ising_schedule_minutes_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from latticeflow.config import UNCAPPED_EPOCHS

    base = ["--L", "3", "--hidden", "4", "--n-steps", "2", "--potential", "mlp", "--batch", "8"]
    cfg = mi.config_from_args(mi.parse_args([*base, "--schedule-minutes", "2"]))
    assert (cfg.schedule_minutes, cfg.epochs) == (2.0, UNCAPPED_EPOCHS)  # the minutes end the run, not 600 epochs
    assert mi.config_from_args(mi.parse_args([*base, "--schedule-minutes", "2", "--epochs", "9"])).epochs == 9
    assert mi.config_from_args(mi.parse_args(base)).epochs == 600
    for extra, why in ((["--schedule", "constant"], "needs schedule='cosine'"),
                       (["--anneal-from", "0.3"], "runs over epochs"),
                       (["--beta", "0.3,0.4"], "a sweep's learning-rate schedules run over epochs")):
        with pytest.raises(ValueError, match=why):
            mi.main([*base, "--schedule-minutes", "1", *extra, "--out", str(tmp_path / "refused"), "--quiet"])
    assert not (tmp_path / "refused").exists()
    # a real run of 0.6 s: stopped by its schedule, each epoch's rate the cosine of the time before it
    summary = mi.main([*base, "--schedule-minutes", "0.01", "--warmup", "0", "--out", str(tmp_path / "run"),
                       "--quiet", "--no-plot"])
    assert summary["stop_reason"] == "schedule"
    assert "the learning-rate schedule ran its 0.01 minutes" in capsys.readouterr().out
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert log["wall_time"].iloc[-1] >= 0.6 and (log["wall_time"].iloc[:-1] < 0.6).all()
    p = [min(1.0, t / 0.6) for t in [0.0, *log["wall_time"].iloc[:-1]]]
    assert log["lr"].tolist() == pytest.approx([1e-2 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * q))) for q in p],
                                               rel=1e-9)


@covers("ising", "--warm-epochs", "--samples", "--step-check")
def test_ising_sweep_flags(tmp_path: Path) -> None:
    # a β grid makes the run a sweep (latticeflow.sweep; more in tests/test_sweep.py)
    def sweep(out: Path, *extra: str) -> tuple[list[int], set[int]]:
        mi.main(ISING.argv(out, "--epochs", "4", "--beta", "0.3,0.4", *extra))
        logs = [len(pd.read_csv(out / d / "log.csv")) for d in ("b00_0.300000", "b01_0.400000")]
        table = pd.read_csv(out / "sweep.csv")
        return logs, set(table["n_samples"]) | set(table["extended_from"]) - {0}

    # defaults: --epochs / 4, 4096 samples (this 4-epoch flow has ESS ≈ 0 and fails the tail rules, so its β
    # are measured again with 4 × 4096: --max-samples)
    assert sweep(tmp_path / "control") == ([4, 1], {4096, 16384})
    assert sweep(tmp_path / "run", "--warm-epochs", "2", "--samples", "16", "--max-samples", "16") == ([4, 2], {16})
    assert exit_status(mi.cli, ISING.argv(tmp_path / "single", "--samples", "16")) == 2  # a sweep's flag, one β
    assert not (tmp_path / "single").exists()
    # --step-check: the free energies measured again with each RK4 step split (default 2, 1: none)
    for out, extra, refine in (("control", (), 2), ("nocheck", ("--step-check", "1"), 1), ("three", ("--step-check", "3"), 3)):
        if out != "control":
            sweep(tmp_path / out, "--samples", "16", *extra)
        table = pd.read_csv(tmp_path / out / "sweep.csv")
        fine = table[table["method"] == "importance_refined"]
        assert len(fine) == (0 if refine == 1 else 4)
        assert ("step_refine" in table) == (refine > 1) and (fine.get("step_refine", fine.index) == refine).all()
        assert json.loads((tmp_path / out / "sweep.json").read_text())["step_check"] == refine


@covers("ising", "--max-samples")
def test_ising_max_samples_flag(tmp_path: Path) -> None:
    # a β whose importance-weighted error bars fail the tail rules is measured again with --max-samples
    # fresh samples (default 4 × --samples); 16 samples always fail them (no tail fit below 25 values,
    # Kish ESS < 100), so every β is measured again here
    def measured(out: Path, *extra: str) -> tuple[set[int], set[int], int]:
        mi.main(ISING.argv(out, "--epochs", "2", "--beta", "0.3,0.4", "--samples", "16", *extra))
        table = pd.read_csv(out / "sweep.csv")
        first = table[~table["method"].str.endswith("_refined")]
        assert (table[table["method"].str.endswith("_refined")]["n_samples"] == 16).all()  # the step check: not again
        return (set(first["n_samples"]), set(table["extended_from"]),
                json.loads((out / "sweep.json").read_text())["max_samples"])

    assert measured(tmp_path / "control") == ({64}, {16}, 64)
    assert measured(tmp_path / "run", "--max-samples", "40") == ({40}, {16}, 40)
    assert measured(tmp_path / "never", "--max-samples", "16") == ({16}, {0}, 16)
    rows = pd.read_csv(tmp_path / "never" / "sweep.csv")
    judged = rows[rows["method"].isin(["importance", "reweighted"])]
    assert not judged["reliable"].any() and judged["reason"].str.contains("Kish ESS").all()  # said, not hidden
    assert (~rows[rows["method"].isin(["variational", "flow"])]["reliable"]).all()  # a bound, plain averages
    # a resume keeps it; fewer than --samples, a single β and --conditioned refuse it
    assert exit_status(mi.cli, ["--resume", str(tmp_path / "run"), "--max-samples", "80", "--quiet"]) == 2
    for name, extra in (("few", ("--beta", "0.3,0.4", "--samples", "16", "--max-samples", "8")),
                        ("single", ("--max-samples", "64")),
                        ("cond", ("--beta", "0.3,0.4", "--conditioned", "1", "--max-samples", "64"))):
        assert exit_status(mi.cli, ISING.argv(tmp_path / name, *extra)) == 2
        assert not (tmp_path / name).exists()


@covers("ising", "--cold-epochs")
def test_ising_cold_epochs_flag(tmp_path: Path) -> None:
    # the warm starts above β_c (the ordered phase) train --cold-epochs, those at or below it --warm-epochs
    from latticeflow.sweep import beta_folder

    grid = (0.3, CRITICAL_BETA, 0.5)
    def epochs(out: Path, *extra: str) -> list[int]:
        mi.main(ISING.argv(out, "--epochs", "4", "--beta", "0.3,critical,0.5", "--warm-epochs", "2",
                           "--samples", "16", "--step-check", "1", "--no-plot", *extra))
        return [len(pd.read_csv(out / beta_folder(k, b) / "log.csv")) for k, b in enumerate(grid)]

    assert epochs(tmp_path / "control") == [4, 2, 2]
    assert json.loads((tmp_path / "control" / "sweep.json").read_text())["cold_epochs"] == 2
    assert epochs(tmp_path / "run", "--cold-epochs", "3") == [4, 2, 3]
    assert json.loads((tmp_path / "run" / "sweep.json").read_text())["cold_epochs"] == 3
    # a resume keeps it, and refuses another value; a single β refuses the flag
    assert exit_status(mi.cli, ["--resume", str(tmp_path / "run"), "--cold-epochs", "5", "--quiet"]) == 2
    assert exit_status(mi.cli, ISING.argv(tmp_path / "single", "--cold-epochs", "3")) == 2
    assert not (tmp_path / "single").exists()


@covers("ising", "--cold-mixture")
def test_ising_cold_mixture_flag(tmp_path: Path) -> None:
    # the β above β_c train the Z2 mixture of a flow without the Z2 symmetry; the others are untouched
    from latticeflow.checkpoint import load_checkpoint
    from latticeflow.sweep import beta_folder

    grid = (0.3, CRITICAL_BETA, 0.5)
    def flows(out: Path, *extra: str) -> list[tuple[str, str]]:
        mi.main(ISING.argv(out, "--epochs", "4", "--beta", "0.3,critical,0.5", "--warm-epochs", "2",
                           "--samples", "16", "--step-check", "1", "--no-plot", *extra))
        runs = [out / beta_folder(k, b) for k, b in enumerate(grid)]
        cfgs = [json.loads((r / "config.json").read_text()) for r in runs]
        # the flow that was trained: a SymmetricMixture's weights sit under "flow."
        mixed = [all(k.startswith("flow.") for k in load_checkpoint(r / "checkpoint.pt")["model"]) for r in runs]
        assert mixed == [c["mixture"] != "none" for c in cfgs]
        return [(c["group"], c["mixture"]) for c in cfgs]

    group = "space+z2"  # the default
    assert flows(tmp_path / "control") == [(group, "none")] * 3
    assert json.loads((tmp_path / "control" / "sweep.json").read_text())["cold_mixture"] is False
    assert flows(tmp_path / "run", "--cold-mixture") == [(group, "none")] * 2 + [(group.removesuffix("+z2"), "z2")]
    assert json.loads((tmp_path / "run" / "sweep.json").read_text())["cold_mixture"] is True
    # a resume keeps it and refuses to add it; a single β and --conditioned refuse the flag
    assert exit_status(mi.cli, ["--resume", str(tmp_path / "control"), "--cold-mixture", "--quiet"]) == 2
    assert exit_status(mi.cli, ISING.argv(tmp_path / "single", "--cold-mixture")) == 2
    assert exit_status(mi.cli, ISING.argv(tmp_path / "cond", "--beta", "0.3,0.5", "--conditioned", "1",
                                          "--cold-mixture")) == 2
    assert not (tmp_path / "single").exists() and not (tmp_path / "cond").exists()


@covers("ising", "--conditioned")
def test_ising_conditioned_flag(tmp_path: Path) -> None:
    # one flow conditioned on β over the grid (latticeflow.conditioned; more in tests/test_conditioned.py)
    mi.main(ISING.argv(tmp_path / "c", "--epochs", "3", "--beta", "0.3,0.4", "--samples", "16", "--step-check", "1",
                       "--conditioned", "2"))
    manifest = json.loads((tmp_path / "c" / "sweep.json").read_text())
    assert (manifest["method"], manifest["degree"]) == ("conditioned", 2)
    ckpt = torch.load(tmp_path / "c" / "conditioned_flow" / "checkpoint.pt", weights_only=False)
    assert ckpt["config"]["conditioned"] == {"low": 0.3, "high": 0.4, "degree": 2}
    assert len(pd.read_csv(tmp_path / "c" / "conditioned_flow" / "log.csv")) == 3
    assert set(pd.read_csv(tmp_path / "c" / "sweep.csv")["beta"]) == {0.3, 0.4}
    assert exit_status(mi.cli, ISING.argv(tmp_path / "bad", "--beta", "0.3,0.4", "--conditioned", "-1")) == 2
    assert not (tmp_path / "bad").exists()


# =============================================================================================
# 2. python -m models.mnist: config and data flags → config, data sets, model, trainer
# =============================================================================================

N_TRAIN, N_TEST, N_VALIDATION = 200, 50, 50


_write_mnist = write_mnist  # tiny 8x8 IDX files (tests/mnist_helpers.py)


@pytest.fixture(scope="module")
def mnist_dirs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Tiny IDX files: ``main`` (200 train / 50 test images of 8x8) and ``other`` (120 / 30)."""
    root = tmp_path_factory.mktemp("mnist_flags")
    return SimpleNamespace(main=_write_mnist(root / "main", N_TRAIN, N_TEST, 7),
                           other=_write_mnist(root / "other", 120, 30, 8))


def mnist_base(dirs: SimpleNamespace) -> tuple[str, ...]:
    return ("--data-dir", str(dirs.main), "--n-validation", str(N_VALIDATION), "--hidden", "4", "--n-steps", "2",
            "--step-size", "0.5", "--batch", "8", "--eval-batch", "8")


OTHER_DATA = "<other data dir>"  # replaced by mnist_dirs.other


def mnist_build(argv: tuple[str, ...], dirs: SimpleNamespace) -> SimpleNamespace:
    """Config, data, trainer and model of a command line."""
    argv = tuple(str(dirs.other) if a == OTHER_DATA else a for a in argv)
    args = mm.parse_args(list(argv))
    cfg = mm.config_from_args(args)
    data = lfm.load_data(args.data_dir, cfg)
    trainer = lfm.make_trainer(cfg, data, "cpu", None, progress=False)
    model = trainer.flow
    flow = lfm.inner_flow(model)  # the ODE flow, behind the whitening with --whiten
    return SimpleNamespace(cfg=cfg, data=data, trainer=trainer, model=model, flow=flow, pot=flow.potential)


CONV = ("--potential", "conv")

MNIST_CASES = table(
    "mnist",
    # model
    Case("--potential", ("--potential", "conv"), {"potential": "conv"}, lambda b: type(b.pot).__name__, "ConvPotential"),
    Case("--hidden", ("--hidden", "6"), {"hidden": 6}, lambda b: b.pot.hidden, 6),
    Case("--activation", ("--activation", "tanh"), {"activation": "tanh"}, lambda b: b.pot.activation, "tanh"),
    Case("--channels", ("--channels", "3"), {"channels": 3}, lambda b: b.pot.channels, 3, control=CONV),
    Case("--conv-layers", ("--conv-layers", "2"), {"conv_layers": 2}, lambda b: b.pot.layers, 2, control=CONV),
    Case("--layers", ("--layers", "2"), {"conv_layers": 2}, lambda b: b.pot.layers, 2, control=CONV),  # the old name
    Case("--kernel-size", ("--kernel-size", "3"), {"kernel_size": 3}, lambda b: b.pot.kernel_size, 3, control=CONV),
    Case("--sitewise-units", ("--sitewise-units", "3"), {"sitewise_units": 3}, lambda b: b.pot.parts[1].units, 3,
         control=("--potential", "mlp+sitewise")),
    Case("--init-scale", ("--init-scale", "0"), {"init_scale": 0.0}, lambda b: not b.pot.readout.any().item(), True),
    Case("--n-steps", ("--n-steps", "3"), {"n_steps": 3}, lambda b: b.flow.n_steps, 3),
    Case("--step-size", ("--step-size", "0.25"), {"step_size": 0.25}, lambda b: b.flow.step_size, 0.25),
    Case("--dtype", ("--dtype", "float64"), {"dtype": "float64"},
         lambda b: {p.dtype for p in b.model.parameters()}, {torch.float64}),
    Case("--grad-checkpoint", ("--grad-checkpoint",), {"grad_checkpoint": True}, lambda b: b.flow.checkpoint, True,
         control=("--no-grad-checkpoint",)),
    Case("--no-grad-checkpoint", ("--no-grad-checkpoint",), {"grad_checkpoint": False},
         lambda b: b.flow.checkpoint, False),
    Case("--whiten", ("--whiten",), {"whiten": True},
         lambda b: (isinstance(b.model, lfm.AffineFlow), bool(getattr(b.model, "log_det", 0) != 0)), (True, True)),
    Case("--no-whiten", ("--no-whiten",), {"whiten": False}, lambda b: isinstance(b.model, lfm.AffineFlow), False,
         control=("--whiten",)),
    # training
    Case("--batch", ("--batch", "10"), {"batch": 10}, lambda b: b.trainer.batch_size, 10),
    Case("--lr", ("--lr", "0.005"), {"lr": 0.005}, lambda b: b.trainer.optimizer.param_groups[0]["lr"], 0.005),
    Case("--grad-clip", ("--grad-clip", "0.5"), {"grad_clip": 0.5}, lambda b: b.trainer.grad_clip, 0.5),
    Case("--patience", ("--patience", "5"), {"patience": 5}, lambda b: b.trainer.patience, 5),
    Case("--patience", ("--patience", "0"), {"patience": None}, lambda b: b.trainer.patience, None),  # 0: never stop
    Case("--seed", ("--seed", "3"), {"seed": 3},
         lambda b: (b.trainer.seed, b.trainer.generator.initial_seed()), (3, 3)),
    Case("--seed", ("--seed", "4"), {"seed": 4}, lambda b: b.pot.weight.flatten()[:4].tolist(), CHANGED),
    # data
    Case("--data-dir", ("--data-dir", OTHER_DATA), {},
         lambda b: (b.data.directory.name, len(b.data.train) + len(b.data.validation)), ("other", 120)),
    Case("--n-train", ("--n-train", "20"), {"n_train": 20}, lambda b: len(b.data.train), 20),
    Case("--n-eval", ("--n-eval", "10"), {"n_eval": 10}, lambda b: (len(b.data.validation), len(b.data.test)), (10, 10)),
    Case("--n-validation", ("--n-validation", "40"), {"n_validation": 40},
         lambda b: (len(b.data.train), len(b.data.validation)), (N_TRAIN - 40, 40)),
    Case("--split-seed", ("--split-seed", "3"), {"split_seed": 3}, lambda b: b.data.validation.sum(1).tolist(), CHANGED),
    Case("--eval-seed", ("--eval-seed", "3"), {"eval_seed": 3},
         lambda b: (b.trainer.eval_sets["validation"].seed, b.trainer.eval_sets["test"].seed), (4, 5)),
    Case("--eval-batch", ("--eval-batch", "7"), {"eval_batch": 7},
         lambda b: (b.trainer.eval_batch, b.trainer.eval_sets["test"].batch_size), (7, 7)),
)


@pytest.mark.parametrize("case", MNIST_CASES)
def test_mnist_config_flag_reaches_the_built_objects(case: Case, mnist_dirs: SimpleNamespace) -> None:
    base = mnist_base(mnist_dirs)
    control = mnist_build(base + case.control, mnist_dirs)
    check_case(case, mnist_build(base + case.control + case.argv, mnist_dirs), control)


@covers("mnist", "--epochs")
def test_mnist_epochs(tmp_path: Path, mnist_dirs: SimpleNamespace) -> None:
    summary = mm.main(MNIST(mnist_dirs).argv(tmp_path, "--epochs", "2"))
    assert summary["epochs"] == 2 and len(pd.read_csv(tmp_path / "log.csv")) == 2


@covers("mnist", "--n-samples")
def test_mnist_n_samples(tmp_path: Path, mnist_dirs: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(amp, "make_figures", lambda *a, **k: calls.append(k) or [])  # no drawing
    mm.main(MNIST(mnist_dirs).argv(tmp_path / "control", plot=True))
    mm.main(MNIST(mnist_dirs).argv(tmp_path / "run", "--n-samples", "5", plot=True))
    assert [c["n_samples"] for c in calls] == [100, 5]


# =============================================================================================
# 3. Run flags of both training drivers, by tiny main() runs
# =============================================================================================


@dataclass
class Driver:
    name: str
    module: Any
    base: tuple[str, ...]
    figure: str  # a file the figures write

    def argv(self, out: Path | None, *extra: str, plot: bool = False, quiet: bool = True) -> list[str]:
        return [*self.base, *(["--out", str(out)] if out is not None else []), *extra,
                *([] if plot else ["--no-plot"]), *(["--quiet"] if quiet else [])]


ISING = Driver("ising", mi, ("--L", "3", "--hidden", "4", "--n-steps", "2", "--potential", "mlp", "--batch", "8",
                             "--epochs", "2"), "convergence.png")


def MNIST(dirs: SimpleNamespace) -> Driver:  # noqa: N802 (reads like the constant ISING)
    return Driver("mnist", mm, (*mnist_base(dirs), "--n-train", "16", "--n-eval", "8", "--epochs", "1"), "samples.png")


@pytest.fixture(params=["ising", "mnist"])
def driver(request: pytest.FixtureRequest) -> Driver:
    return ISING if request.param == "ising" else MNIST(request.getfixturevalue("mnist_dirs"))


BOTH = ("ising", "mnist")
RUN_FILES = ("checkpoint.pt", "log.csv", "config.json", "summary.json")


@covers(BOTH, "--out")
def test_out(driver: Driver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    driver.module.main(driver.argv(tmp_path / "elsewhere"))
    assert all((tmp_path / "elsewhere" / f).is_file() for f in RUN_FILES) and not (tmp_path / "runs").exists()
    driver.module.main(driver.argv(None))  # control: a new dated folder runs/<driver>/<date>-<time>, linked as latest
    latest = tmp_path / "runs" / driver.name / "latest"
    assert latest.is_symlink() and all((latest / f).is_file() for f in RUN_FILES)
    driver.module.main(driver.argv(None))  # an ordinary re-run gets its own folder: nothing is overwritten
    assert len([p for p in (tmp_path / "runs" / driver.name).iterdir() if not p.is_symlink()]) == 2


@covers(BOTH, "--resume")
def test_resume(driver: Driver, tmp_path: Path) -> None:
    first = driver.module.main(driver.argv(tmp_path / "a"))
    n = first["epochs"]
    # no --out: the run continues in the checkpoint's folder; a run folder works as well as its file
    resumed = driver.module.main(driver.argv(None, "--resume", str(tmp_path / "a" / "checkpoint.pt"), "--epochs", str(n + 1)))
    assert resumed["epochs"] == n + 1 and len(pd.read_csv(tmp_path / "a" / "log.csv")) == n + 1
    again = driver.module.main(driver.argv(None, "--resume", str(tmp_path / "a"), "--epochs", str(n + 2)))
    assert again["epochs"] == n + 2


@covers(BOTH, "--force")
def test_force(driver: Driver, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    driver.module.main(driver.argv(out))
    before = (out / "log.csv").read_bytes()
    assert driver.module.cli(driver.argv(out, "--epochs", "3")) == 2  # control: the folder holds a run
    assert "--force" in capsys.readouterr().err and (out / "log.csv").read_bytes() == before
    assert driver.module.cli(driver.argv(out, "--epochs", "3", "--force")) == 0
    assert len(pd.read_csv(out / "log.csv")) == 3


@covers(BOTH, "--max-minutes")
def test_max_minutes(driver: Driver, tmp_path: Path) -> None:
    summary = driver.module.main(driver.argv(tmp_path, "--epochs", "1000", "--max-minutes", "0.0001"))
    assert summary["stop_reason"] == "time" and summary["epochs"] < 1000
    assert (tmp_path / "checkpoint.pt").is_file()


@covers(BOTH, "--device")
def test_device(driver: Driver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple] = []
    real = lfdist.setup_run

    def spy(device: str = "auto", *args: Any, **kwargs: Any) -> torch.device:
        seen.append((device, real(device, *args, **kwargs)))
        return seen[-1][1]

    monkeypatch.setattr(lfdist, "setup_run", spy)
    driver.module.main(driver.argv(tmp_path / "control"))
    driver.module.main(driver.argv(tmp_path / "run", "--device", "cpu"))
    assert seen == [("auto", torch.device("cpu")), ("cpu", torch.device("cpu"))]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["provenance"]["device"] == "cpu"


@covers(BOTH, "--threads")
def test_threads(driver: Driver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    driver.module.main(driver.argv(tmp_path / "control"))
    assert torch.get_num_threads() == 2  # control: the default from OMP_NUM_THREADS
    driver.module.main(driver.argv(tmp_path / "run", "--threads", "1", quiet=False))
    assert torch.get_num_threads() == 1  # conftest restores the count after the test
    assert "threads: 1 (--threads" in capsys.readouterr().out


@covers(BOTH, "--tf32")
def test_tf32(driver: Driver, tmp_path: Path) -> None:
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32  # (monkeypatch cannot restore cuBLASModule attributes)
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        driver.module.main(driver.argv(tmp_path / "control"))
        assert not matmul.allow_tf32 and not cudnn.allow_tf32
        driver.module.main(driver.argv(tmp_path / "run", "--tf32"))
        assert matmul.allow_tf32 and cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


@covers(BOTH, "--no-plot")
def test_no_plot(driver: Driver, tmp_path: Path) -> None:
    driver.module.main(driver.argv(tmp_path / "run"))  # argv() adds --no-plot unless plot=True
    assert not list((tmp_path / "run").glob("*.png")) and not list((tmp_path / "run").glob("*.pdf"))
    driver.module.main(driver.argv(tmp_path / "control", plot=True))
    assert (tmp_path / "control" / driver.figure).stat().st_size > 1000


@covers(BOTH, "--quiet")
def test_quiet(driver: Driver, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    driver.module.main(driver.argv(tmp_path / "control", quiet=False))
    loud = capsys.readouterr()
    assert "threads:" in loud.out and "it/s" in loud.err  # thread line and progress bar
    driver.module.main(driver.argv(tmp_path / "run"))
    quiet = capsys.readouterr()
    assert "threads:" not in quiet.out and "it/s" not in quiet.err


# bad values: exit status 2 (argparse: SystemExit(2); after parsing: cli returns 2), no output folder
EMPTY, MISSING = "<empty folder>", "<missing folder>"
BAD_VALUES = [
    *(("ising", argv) for argv in (["--L", "0"], ["--epochs", "0"], ["--batch", "0"], ["--threads", "0"],
                                   ["--max-minutes", "-1"], ["--J", "-1"], ["--beta", "hot"], ["--resume", EMPTY],
                                   ["--hidden", "0"], ["--conv-layers", "3"], ["--init-scale", "big"],
                                   ["--potential", "conv", "--kernel-size", "2"],  # after parsing: even kernel
                                   ["--potential", "mlp+cnn"], ["--device", "tpu"], ["--grad-clip", "often"],
                                   ["--grad-clip", "0"], ["--gradient-estimator", "reinforce"], ["--train-precision", "float16"],
                                   ["--anneal-from", "-0.1"], ["--anneal-epochs", "0", "--anneal-from", "0.2"],
                                   ["--anneal-epochs", "5"],  # after parsing: no --anneal-from
                                   ["--anneal-from", "0.2", "--anneal-epochs", "9", "--epochs", "9"])),  # no epoch at β
    *(("mnist", argv) for argv in (["--epochs", "0"], ["--batch", "0"], ["--threads", "0"], ["--max-minutes", "-1"],
                                   ["--resume", EMPTY], ["--n-train", "1"], ["--conv-layers", "3"], ["--layers", "3"],
                                   ["--init-scale", "-1"],
                                   ["--data-dir", MISSING],  # after parsing
                                   ["--n-validation", "1000"], ["--device", "tpu"])),
]


@pytest.mark.parametrize(("name", "bad"), BAD_VALUES, ids=[f"{n} {' '.join(a)}" for n, a in BAD_VALUES])
def test_bad_value_exits_2_and_writes_nothing(name: str, bad: list[str], tmp_path: Path,
                                              request: pytest.FixtureRequest) -> None:
    drv = ISING if name == "ising" else MNIST(request.getfixturevalue("mnist_dirs"))
    (tmp_path / "empty").mkdir()
    bad = [str(tmp_path / "empty") if a == EMPTY else str(tmp_path / "missing") if a == MISSING else a for a in bad]
    out = tmp_path / "out"
    assert exit_status(drv.module.cli, drv.argv(out, *bad)) == 2
    assert not out.exists()


# =============================================================================================
# 4. python -m analysis: every flag → the ReportSettings (and checkpoint, out) given to run_report
# =============================================================================================


@pytest.fixture
def report_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SimpleNamespace:
    """A stand-in checkpoint file, and run_report replaced by a recorder of its arguments."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not read")
    calls: list[tuple] = []
    monkeypatch.setattr(am, "run_report", lambda checkpoint, out, settings: calls.append((checkpoint, out, settings)) or {})
    return SimpleNamespace(checkpoint=tmp_path / "run" / "checkpoint.pt", calls=calls)


ANALYSIS_FLAGS = [  # flag, argv, ReportSettings field, expected (the default differs)
    ("--samples", ["--samples", "64"], "samples", 64),
    ("--batch", ["--batch", "32"], "batch", 32),
    ("--hmc-samples", ["--hmc-samples", "10"], "hmc_samples", 10),
    ("--hmc-chains", ["--hmc-chains", "2"], "hmc_chains", 2),
    ("--hmc-leapfrog", ["--hmc-leapfrog", "3"], "hmc_leapfrog", 3),
    ("--latent-leapfrog", ["--latent-leapfrog", "7"], "latent_leapfrog", 7),
    ("--hmc-warmup", ["--hmc-warmup", "5"], "hmc_warmup", 5),
    ("--target-accept", ["--target-accept", "0.8"], "target_accept", 0.8),
    ("--step-size", ["--step-size", "0.2"], "step_size", 0.2),
    ("--skip-hmc", ["--skip-hmc"], "skip_hmc", True),
    ("--skip-latent-hmc", ["--skip-latent-hmc"], "skip_latent_hmc", True),
    ("--chain-seconds", ["--chain-seconds", "0"], "chain_seconds", 0.0),
    ("--rk4-check", ["--rk4-check", "0"], "rk4_check", 0),
    ("--independence", ["--independence", "0"], "independence", 0),
    ("--sw-sweeps", ["--sw-sweeps", "0"], "sw_sweeps", 0),
    ("--sw-chains", ["--sw-chains", "2"], "sw_chains", 2),
    ("--seed", ["--seed", "3"], "seed", 3),
    ("--L", ["--L", "4"], "L", 4),
    ("--dtype", ["--dtype", "float32"], "dtype", "float32"),
    ("--no-plots", ["--no-plots"], "plots", False),
    ("--quiet", ["--quiet"], "verbose", False),
]
COVERED["analysis"].update(f for f, *_ in ANALYSIS_FLAGS)


@pytest.mark.parametrize(("flag", "argv", "field", "value"), ANALYSIS_FLAGS, ids=[f[0] for f in ANALYSIS_FLAGS])
def test_analysis_flag_reaches_the_report_settings(flag: str, argv: list[str], field: str, value: Any,
                                                   report_calls: SimpleNamespace) -> None:
    am.main([str(report_calls.checkpoint), *argv])
    settings = report_calls.calls[-1][2]
    assert isinstance(settings, ReportSettings)
    assert getattr(settings, field) == value and getattr(ReportSettings(), field) != value
    assert settings == ReportSettings(**{field: value})  # and nothing else changed


@covers("analysis", "--out")
def test_analysis_out_and_checkpoint(report_calls: SimpleNamespace, tmp_path: Path) -> None:
    am.main([str(report_calls.checkpoint.parent)])  # a run folder: its checkpoint.pt
    am.main([str(report_calls.checkpoint), "--out", str(tmp_path / "r")])
    (ckpt, out, _), (ckpt2, out2, _) = report_calls.calls
    assert Path(ckpt) == Path(ckpt2) == report_calls.checkpoint
    assert Path(out) == report_calls.checkpoint.parent / "report" and Path(out2) == tmp_path / "r"


@covers("analysis", "--threads")
def test_analysis_threads(report_calls: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    am.main([str(report_calls.checkpoint), "--quiet"])
    assert torch.get_num_threads() == 2  # control
    am.main([str(report_calls.checkpoint), "--quiet", "--threads", "1"])
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("bad", [["--samples", "1"], ["--target-accept", "1.5"], ["--sw-sweeps", "1"],
                                 ["--threads", "0"], ["--dtype", "float16"], ["--independence", "1"],
                                 ["--chain-seconds", "-1"], ["--rk4-check", "-2"]],
                         ids=lambda a: " ".join(a))
def test_analysis_bad_value_exits_2(bad: list[str], report_calls: SimpleNamespace) -> None:
    assert exit_status(am.cli, [str(report_calls.checkpoint), *bad]) == 2
    assert report_calls.calls == []


def test_analysis_missing_checkpoint_exits_2(tmp_path: Path) -> None:
    assert exit_status(am.cli, [str(tmp_path / "nothing.pt")]) == 2


# =============================================================================================
# 5. python -m latticeflow.mnist: every flag → the arguments of download / verify / baseline
# =============================================================================================


@pytest.fixture
def data_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The data module's actions replaced by recorders (no network, no files), where its command line calls them."""
    calls: list[tuple] = []
    monkeypatch.setattr(lfm_cli, "download_mnist", lambda data_dir, mirrors, force: calls.append(
        ("download", data_dir, list(mirrors), force)) or Path("d"))
    monkeypatch.setattr(lfm_cli, "verify_checksums", lambda data_dir: calls.append(("verify", data_dir))
                        or dict.fromkeys(lfm.MNIST_MD5, True))
    monkeypatch.setattr(lfm_cli, "find_mnist_dir", lambda data_dir: Path(data_dir or "data"))
    monkeypatch.setattr(lfm_cli, "baseline_report", lambda data_dir, seed, noise_seed: calls.append(
        ("baseline", data_dir, seed, noise_seed)) or "baseline")
    monkeypatch.setattr(lfm_cli.logging, "basicConfig", lambda **kwargs: None)
    return calls


MIRRORS = list(lfm.DEFAULT_MIRRORS)
DATA_FLAGS = [  # flag, argv, control argv, the calls expected (the control's differ)
    ("--download", ["--download"], [], [("download", None, MIRRORS, False)]),
    ("--verify", ["--verify"], [], [("verify", None)]),
    ("--baseline", ["--baseline"], [], [("baseline", None, 0, 1)]),
    ("--data-dir", ["--download", "--verify", "--baseline", "--data-dir", "D"], ["--download", "--verify", "--baseline"],
     [("download", "D", MIRRORS, False), ("verify", "D"), ("baseline", "D", 0, 1)]),
    ("--mirror", ["--download", "--mirror", "a", "--mirror", "b"], ["--download"], [("download", None, ["a", "b"], False)]),
    ("--force", ["--download", "--force"], ["--download"], [("download", None, MIRRORS, True)]),
    ("--seed", ["--baseline", "--seed", "5"], ["--baseline"], [("baseline", None, 5, 1)]),
]
COVERED["latticeflow.mnist"].update(f for f, *_ in DATA_FLAGS)


@pytest.mark.parametrize(("flag", "argv", "control", "expected"), DATA_FLAGS, ids=[f[0] for f in DATA_FLAGS])
def test_data_module_flag_reaches_its_action(flag: str, argv: list[str], control: list[str], expected: list,
                                             data_calls: list[tuple], capsys: pytest.CaptureFixture) -> None:
    assert lfm.main(control) == (0 if control else 2)  # no action: the help, status 2
    before = list(data_calls)
    data_calls.clear()
    assert lfm.main(argv) == 0
    assert data_calls == expected and before != expected


def test_data_module_bad_checksum_exits_1(data_calls: list[tuple], monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(lfm_cli, "verify_checksums", lambda data_dir: {**dict.fromkeys(lfm.MNIST_MD5, True),
                                                                   next(iter(lfm.MNIST_MD5)): False})
    assert lfm.main(["--verify"]) == 1 and "BAD" in capsys.readouterr().out


def _data_module_parser(monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser of ``python -m latticeflow.mnist``."""
    return lfm_cli.build_parser()


# =============================================================================================
# 6. Help texts and coverage: the tested flags are exactly each parser's flags
# =============================================================================================

PARSERS: dict[str, Callable[..., argparse.ArgumentParser]] = {
    "ising": lambda mp: mi.build_parser(), "mnist": lambda mp: mm.build_parser(),
    "analysis": lambda mp: am.build_parser(), "latticeflow.mnist": _data_module_parser}
HELP: dict[str, Callable[[list[str]], Any]] = {"ising": mi.cli, "mnist": mm.cli, "analysis": am.cli,
                                               "latticeflow.mnist": lfm.main}
for _name in PARSERS:
    COVERED[_name].update({"-h", "--help"})  # by test_help_lists_every_flag


@pytest.mark.parametrize("name", list(PARSERS))
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_lists_every_flag(name: str, flag: str, data_calls: list[tuple], monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture) -> None:
    parser = PARSERS[name](monkeypatch)
    capsys.readouterr()
    assert exit_status(HELP[name], [flag]) == 0
    text = capsys.readouterr().out
    listed = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))
    flags = option_strings(parser)
    assert not flags - listed, f"not in the help: {sorted(flags - listed)}"
    if name == "latticeflow.mnist":  # its help names exactly its flags
        assert {s for s in listed if s.startswith("--")} == {s for s in flags if s.startswith("--")}


@pytest.mark.parametrize("name", list(PARSERS))
def test_every_flag_is_tested(name: str, data_calls: list[tuple], monkeypatch: pytest.MonkeyPatch) -> None:
    flags = option_strings(PARSERS[name](monkeypatch))
    assert not flags - COVERED[name], f"{name}: flags without a test here: {sorted(flags - COVERED[name])}"
    assert not COVERED[name] - flags, f"{name}: tests of flags the parser lacks: {sorted(COVERED[name] - flags)}"

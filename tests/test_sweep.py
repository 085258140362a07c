"""β sweeps (latticeflow.sweep, analysis.thermo, python -m models.ising --beta GRID).

The physics check is end to end on L=3 (N = 9: 512 states), where brute-force enumeration gives
every exact value: a small flow trained for a few hundred steps, importance-reweighted, must land
within 4 standard errors of the enumeration's F/N, U/N, C/N, ⟨|m|⟩ and ⟨m²⟩ at each β, and the
Kaufman column of the table must equal the enumeration.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import latticeflow.train as lftrain
import models.ising as mi
from latticeflow import IsingConfig, critical, enumerate_ising, ising
from latticeflow.build import build_flow
from latticeflow.checkpoint import load_checkpoint
from latticeflow.sweep import ESTIMATES, MANIFEST, beta_folder, parse_beta_grid, sweep


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# a tiny flow: these tests are about the sweep's bookkeeping, not accuracy
TINY = IsingConfig(L=3, potential="mlp", hidden=4, n_steps=2, batch=16, epochs=6, warmup=0, symmetrize="none")
TINY_ARGV = ["--L", "3", "--potential", "mlp", "--hidden", "4", "--n-steps", "2", "--batch", "16", "--epochs", "6",
             "--warmup", "0", "--symmetrize", "none", "--quiet", "--threads", "1"]


# ---------------------------------------------------------------------- the grid
@pytest.mark.parametrize(("spec", "expected"), [
    ("0.30:0.60:4", (0.3, 0.4, 0.5, 0.6)),  # 0.4, not 0.39999999999999997
    ("0.3,0.4,critical,0.5", (0.3, 0.4, critical, 0.5)),
    ("0.5, 0.3", (0.3, 0.5)),  # sorted: high temperature first
    ("0.3:0.4:2,critical", (0.3, 0.4, critical)),
    ("0.3:critical:2", (0.3, critical)),  # β_c as an end point stays exactly β_c
    ("0.25", (0.25,)),
    ([0.6, "critical"], (critical, 0.6)),
])
def test_parse_beta_grid(spec: object, expected: tuple) -> None:
    got = parse_beta_grid(spec)
    assert got == expected and all(type(b) is float for b in got)


@pytest.mark.parametrize(("spec", "message"), [
    ("", "empty"), (",", "empty"), ("0.3,,0.4", "stray comma"), ([], "empty"),
    ("0,0.3", "> 0"), ("-0.2", "> 0"), ("inf", "finite"), ("nan", "finite"), ([0.3, float("nan")], "finite"),
    ("0.3,0.3", "repeats"), ("critical,0.44068679350977147", "repeats"), ("0.3:0.3:2", "repeats"),
    ("0.3:0.6", "start:stop:n"), ("0.3:0.6:x", "integer"), ("0.3:0.6:0", "number of points"), ("hot", "not a number"),
    ("0.3;0.4", "not a number"),
])
def test_bad_beta_grid_is_one_clear_line(spec: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        parse_beta_grid(spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", ["0.3,0.3", "0,0.4", "0.3:0.6", "inf,0.3", "0.3,,", ",", "0.3:0.6:-2", "0.3,hot"])
def test_bad_grid_on_the_command_line_exits_2_and_writes_nothing(bad: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    try:
        status = mi.cli([*TINY_ARGV, "--beta", bad, "--out", str(out)])
    except SystemExit as e:  # argparse rejects the value
        status = e.code
    assert status == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert "error:" in err[-1] and "--beta" in err[-1]


def test_single_beta_is_unchanged_and_refuses_sweep_flags(tmp_path: Path) -> None:
    args = mi.parse_args(["--beta", "0.3"])
    assert args.beta == 0.3 and mi.parse_args(["--beta", "critical"]).beta == "critical"
    assert mi.cli([*TINY_ARGV, "--beta", "0.3", "--warm-epochs", "2", "--out", str(tmp_path / "x")]) == 2
    assert mi.cli([*TINY_ARGV, "--beta", "0.3", "--step-check", "2", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("refine", [1, 3])
def test_step_check_flag_reaches_the_sweep(refine: int, tmp_path: Path) -> None:
    out = tmp_path / "s"
    assert mi.cli([*TINY_ARGV, "--beta", "0.3,0.4", "--warm-epochs", "2", "--samples", "16", "--no-plot",
                   "--step-check", str(refine), "--out", str(out)]) == 0
    assert json.loads((out / MANIFEST).read_text())["step_check"] == refine
    table = pd.read_csv(out / "sweep.csv")
    fine = table[table["method"].str.endswith("_refined")]
    assert len(fine) == (0 if refine == 1 else 2 * 4)  # 2 β × {variational, importance} × {hs, ising}
    if refine > 1:
        assert (fine["step_refine"] == refine).all() and fine["value"].notna().all()
    with pytest.raises(ValueError, match="step_check"):  # a resume keeps the sweep's own check
        sweep(None, None, out=out, resume=True, step_check=refine + 1)


def test_step_check_rows_leave_the_flow_alone() -> None:
    from analysis.thermo import step_check_rows

    torch.manual_seed(0)
    cfg = TINY.replace(beta=0.3)
    flow = build_flow(cfg, ising(3, 0.3).lattice)
    before = (flow.n_steps, flow.step_size)
    rows = step_check_rows(flow, ising(3, 0.3), refine=4, n_samples=64, generator=torch.Generator().manual_seed(0))
    assert (flow.n_steps, flow.step_size) == before and next(flow.parameters()).dtype == torch.float32
    assert {r["method"] for r in rows} == {"variational_refined", "importance_refined"}
    assert all(r["step_refine"] == 4 and math.isfinite(r["deviation_sigma"]) for r in rows)
    with pytest.raises(ValueError, match="refine"):
        step_check_rows(flow, ising(3, 0.3), refine=1)


# ---------------------------------------------------------------------- physics, end to end
def test_sweep_l3_agrees_with_enumeration(tmp_path: Path) -> None:
    """L=3, two β: reweighted U/N, C/N, |m|, m² and the importance-weighted F/N within 4σ of enumeration."""
    torch.set_num_threads(1)
    cfg = IsingConfig(L=3, potential="quadratic+mlp", hidden=16, batch=256, epochs=150, symmetrize="none", seed=1)
    betas = (0.3, critical)
    table = sweep(cfg, betas, out=tmp_path / "s", warm_epochs=60, samples=2048)
    assert table.attrs["stop_reason"] == "finished" and table.attrs["finished"] == list(betas)
    assert set(table["beta"]) == set(betas)
    for beta in betas:
        en = enumerate_ising(ising(3, beta).couplings())  # the Boltzmann averages of all 512 states
        exact = {"energy": en.energy / beta, "specific_heat": en.specific_heat, "abs_m": en.abs_m, "m2": en.m2,
                 "free_energy": -en.log_z / 9}
        rows = table[table["beta"] == beta]
        for q, value in exact.items():
            method = "importance" if q == "free_energy" else "reweighted"
            sel = rows[(rows["quantity"] == q) & (rows["method"] == method)]
            if q == "free_energy":
                sel = sel[sel["normalisation"] == "ising"]
            r = sel.iloc[0]
            assert r["exact"] == pytest.approx(value, rel=1e-9, abs=1e-12), (beta, q)  # Kaufman = enumeration
            assert abs(r["value"] - value) < 4 * r["stderr"], (beta, q, r["value"], r["stderr"], value)
            assert r["stderr"] < 0.05 * max(abs(value), 0.1), (beta, q, r["stderr"])  # and not vacuous
        var = rows[(rows["quantity"] == "free_energy") & (rows["method"] == "variational")]
        assert (var["value"] > var["exact"] - 3 * var["stderr"]).all()  # the variational bound
        # the step check (default: every RK4 step split in two): unbiased too, fresh samples
        fine = rows[(rows["quantity"] == "free_energy") & (rows["method"] == "importance_refined")]
        assert len(fine) == 2 and (fine["step_refine"] == 2).all()
        assert (abs(fine["value"] - fine["exact"]) < 4 * fine["stderr"]).all(), fine
    # the figure and the tidy table
    for name in ("sweep.png", "sweep.pdf", "sweep.csv", MANIFEST):
        assert (tmp_path / "s" / name).stat().st_size > 500, name
    csv = pd.read_csv(tmp_path / "s" / "sweep.csv")
    assert len(csv) == len(table) and {"beta", "quantity", "method", "value", "stderr", "exact",
                                       "deviation_sigma", "ess"} <= set(csv.columns)
    assert set(csv["quantity"]) >= {"free_energy", "energy", "specific_heat", "abs_m", "m2", "binder",
                                    "susceptibility"}


# ---------------------------------------------------------------------- warm starts
def test_warm_start_reuses_the_previous_betas_weights(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = TINY.replace(init_scale=0.0, epochs=8, lr=1e-2)  # zero readouts at initialisation
    sweep(cfg, (0.3, 0.5), out=tmp_path, warm_epochs=1, samples=16, plot=False)
    first = load_checkpoint(tmp_path / beta_folder(0, 0.3) / "checkpoint.pt")["model"]
    second = load_checkpoint(tmp_path / beta_folder(1, 0.5) / "checkpoint.pt")["model"]
    torch.manual_seed(cfg.seed)
    fresh = build_flow(cfg.replace(beta=0.5), ising(3, 0.5).lattice).state_dict()
    # one Adam step moves each weight by at most about lr from where it started ...
    step = max(float((second[k] - first[k]).abs().max()) for k in first)
    assert step <= 1.01e-2
    # ... and training the first β moved its weights much further from a fresh start
    assert max(float((first[k] - fresh[k]).abs().max()) for k in first) > 3e-2
    cfg1 = json.loads((tmp_path / beta_folder(1, 0.5) / "config.json").read_text())
    assert cfg1["warm_start_from"] == beta_folder(0, 0.3) and cfg1["epochs"] == 1 and cfg1["beta"] == 0.5


def test_warm_regression_separates_a_rising_loss_from_noise() -> None:
    from latticeflow.sweep import warm_regression

    rng = np.random.default_rng(0)
    flat = pd.DataFrame({"free_energy_hs": -2.3 + 1e-3 * rng.standard_normal(100)})
    falling = pd.DataFrame({"free_energy_hs": np.linspace(-2.2, -2.3, 100) + 1e-3 * rng.standard_normal(100)})
    rising = pd.DataFrame({"free_energy_hs": np.linspace(-2.3, -2.29, 100) + 1e-3 * rng.standard_normal(100)})
    assert abs(warm_regression(flat)[2]) < 3
    assert warm_regression(falling)[2] < -3
    rise, err, sigma = warm_regression(rising)
    assert sigma > 3 and rise == pytest.approx(0.009, abs=1.5e-3)  # the windows' means: 10 epochs at each end
    assert np.isnan(warm_regression(flat.iloc[:9])[2])  # too short for two windows of 5


def test_regressed_warm_start_is_retried_at_half_the_learning_rate(tmp_path: Path) -> None:
    """A warm start whose F/N rises is trained again from the neighbour at lr/2; colder β keep lr/2."""
    from latticeflow.sweep import _make_trainer

    cfg = TINY.replace(lr=1e-2)
    seen: list[tuple[float, float]] = []

    def make(config: IsingConfig, *a: object, **kw: object) -> tuple:
        trainer, target = _make_trainer(config, *a, **kw)
        seen.append((config.beta, config.lr))
        # the first attempt at β = 0.5 "regresses", every other warm start is flat (the guard's verdict is
        # then the test's, not the noise of a 10-epoch run of a 4-unit flow)
        rise = 1.0 if (config.beta == 0.5 and config.lr == 1e-2) else 0.0
        fit = trainer.fit

        def scripted_fit(epochs: int, max_minutes: float | None = None) -> pd.DataFrame:
            log = fit(epochs, max_minutes).copy()
            log["free_energy_hs"] = np.linspace(0.0, rise, len(log)) + 1e-3 * np.sin(np.arange(len(log)))
            return log

        trainer.fit = scripted_fit
        return trainer, target

    table = sweep(cfg, (0.3, 0.5, 0.6), out=tmp_path, warm_epochs=10, samples=16, plot=False, make_trainer=make)
    assert seen[1:] == [(0.3, 1e-2), (0.5, 1e-2), (0.5, 5e-3), (0.6, 5e-3)]  # seen[0]: the set-up check
    by_beta = table.groupby("beta")[["warm_retries", "lr_scale"]].first()
    assert by_beta.loc[0.5].tolist() == [1, 0.5] and by_beta.loc[0.6].tolist() == [0, 0.5]
    summary = json.loads((tmp_path / beta_folder(1, 0.5) / "summary.json").read_text())
    assert len(summary["earlier_attempts"]) == 1 and summary["earlier_attempts"][0]["lr_scale"] == 1.0
    assert json.loads((tmp_path / beta_folder(1, 0.5) / "config.json").read_text())["lr"] == 5e-3
    # the retry started again from the neighbour: its log holds only its own 10 epochs
    assert len(pd.read_csv(tmp_path / beta_folder(1, 0.5) / "log.csv")) == 10
    # a resumed sweep reads the halved learning rate back from the finished β
    (tmp_path / beta_folder(2, 0.6) / ESTIMATES).unlink()
    for n in ("checkpoint.pt", "log.csv"):
        (tmp_path / beta_folder(2, 0.6) / n).unlink()
    seen.clear()
    sweep(None, None, out=tmp_path, resume=True, plot=False, make_trainer=make)
    assert seen == [(0.6, 5e-3)]


def _gap_table(gap: float, stderr: float, exact: float = -2.0) -> pd.DataFrame:
    return pd.DataFrame({"quantity": ["free_energy", "free_energy"], "normalisation": ["hs", "hs"],
                         "method": ["variational", "importance"], "value": [exact + gap, exact],
                         "stderr": [stderr, stderr], "exact": [exact, exact]})


def test_gap_regression_flags_a_gap_more_than_doubled() -> None:
    from latticeflow.sweep import GAP_GROWTH, gap_regression

    prev = _gap_table(5.7e-3, 1e-5)
    assert gap_regression(_gap_table(1.7 * 5.7e-3, 1e-5), prev)[2] < 0  # the largest growth seen on a good sweep
    excess, err, sigma = gap_regression(_gap_table(1.6e-2, 1e-5), prev)  # the flow lost at β = 0.514
    assert excess == pytest.approx(1.6e-2 - GAP_GROWTH * 5.7e-3) and err == pytest.approx(np.hypot(1e-5, 2e-5))
    assert sigma > 100
    # within its errors a doubled gap is not flagged
    assert gap_regression(_gap_table(2 * 5.7e-3 + 2e-5, 1e-5), prev)[2] < 3
    # a negative neighbour's gap (noise below exact) counts as zero; no exact reference: no verdict
    assert gap_regression(_gap_table(1e-4, 1e-5), _gap_table(-1e-5, 1e-5))[2] > 3
    assert np.isnan(gap_regression(_gap_table(1e-2, 1e-5, exact=float("nan")), prev)[2])


def test_warm_start_whose_measured_gap_doubles_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm start whose fresh-sample F/N gap to Kaufman is far beyond twice its neighbour's is trained
    again from the neighbour at lr/2, and its first measurement is not kept."""
    import latticeflow.sweep as lfsweep

    real = lfsweep.measure_beta
    calls: list[tuple[float, float]] = []

    def measure(flow, target, k, config, *a, **kw):  # noqa: ANN001, ANN202
        table = real(flow, target, k, config, *a, **kw)
        calls.append((k, kw["lr_scale"]))
        if len(calls) == 2:  # β = 0.5, first attempt: a flow "lost" during its warm start
            table = table.copy()
            hs = (table["quantity"] == "free_energy") & (table["normalisation"] == "hs") & (table["method"] == "variational")
            table.loc[hs, "value"] += 20.0
        return table

    monkeypatch.setattr(lfsweep, "measure_beta", measure)
    # the F/N-rise guard stays quiet (its verdict on a 10-epoch run of a tiny flow is noise)
    monkeypatch.setattr(lfsweep, "warm_regression", lambda log, window=None: (0.0, 1.0, 0.0))
    table = sweep(TINY.replace(lr=1e-2), (0.3, 0.5), out=tmp_path, warm_epochs=10, samples=16, plot=False)
    assert calls == [(0, 1.0), (1, 1.0), (1, 0.5)], calls
    assert table.groupby("beta")["warm_retries"].first().loc[0.5] == 1
    summary = json.loads((tmp_path / beta_folder(1, 0.5) / "summary.json").read_text())
    attempt = summary["earlier_attempts"][0]
    assert attempt["lr_scale"] == 1.0 and attempt["gap"] > 19
    kept = pd.read_csv(tmp_path / beta_folder(1, 0.5) / ESTIMATES)
    assert lfsweep.variational_gap(kept)[0] < 10 and kept["lr_scale"].iloc[0] == 0.5


def test_diverged_warm_start_is_retried_and_a_second_divergence_still_raises(tmp_path: Path) -> None:
    """A warm start whose training diverges is redone at half the rate; without retries left it raises."""
    from latticeflow.sweep import WARM_RETRIES, _make_trainer
    from latticeflow.train import TrainingDiverged

    cfg = TINY.replace(lr=1e-2)
    seen: list[tuple[float, float]] = []

    def make(limit: float) -> object:
        def factory(config: IsingConfig, *a: object, **kw: object) -> tuple:
            trainer, target = _make_trainer(config, *a, **kw)
            seen.append((config.beta, config.lr))
            if config.beta == 0.5 and config.lr > limit:
                def diverging_fit(epochs: int, max_minutes: float | None = None) -> pd.DataFrame:
                    raise TrainingDiverged("training diverged at epoch 3 (a test)")

                trainer.fit = diverging_fit
            return trainer, target
        return factory

    table = sweep(cfg, (0.3, 0.5), out=tmp_path / "a", warm_epochs=4, samples=16, plot=False, make_trainer=make(6e-3))
    assert seen[1:] == [(0.3, 1e-2), (0.5, 1e-2), (0.5, 5e-3)]
    assert table.groupby("beta")["warm_retries"].first().loc[0.5] == 1
    attempts = json.loads((tmp_path / "a" / beta_folder(1, 0.5) / "summary.json").read_text())["earlier_attempts"]
    assert "diverged at epoch 3" in attempts[0]["diverged"]
    seen.clear()
    with pytest.raises(TrainingDiverged):  # every retry diverges: the sweep stops, the first β is kept
        sweep(cfg, (0.3, 0.5), out=tmp_path / "b", warm_epochs=4, samples=16, plot=False, make_trainer=make(0.0))
    assert len(seen[1:]) == 2 + WARM_RETRIES and (tmp_path / "b" / beta_folder(0, 0.3) / ESTIMATES).is_file()


# ---------------------------------------------------------------------- interruption, resume, budget
def test_interrupted_sweep_resumes_without_losing_a_beta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "sweep"
    real = lftrain.VariationalTrainer.run_epoch

    def interrupt_second_beta(self, epoch):  # Ctrl-C during the 2nd epoch of β = critical
        if self.target.beta == critical and epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, epoch)

    monkeypatch.setattr(lftrain.VariationalTrainer, "run_epoch", interrupt_second_beta)
    argv = [*TINY_ARGV, "--beta", "0.3,critical,0.6", "--warm-epochs", "4", "--samples", "32", "--out", str(out),
            "--no-plot"]
    assert mi.cli(argv) == 130
    first = out / beta_folder(0, 0.3)
    assert (first / ESTIMATES).is_file() and not (out / beta_folder(1, critical) / ESTIMATES).exists()
    assert load_checkpoint(out / beta_folder(1, critical) / "checkpoint.pt")["epoch"] == 2
    kept = (first / ESTIMATES).read_bytes(), (first / "checkpoint.pt").read_bytes()
    assert len(pd.read_csv(out / "sweep.csv")["beta"].unique()) == 1

    monkeypatch.setattr(lftrain.VariationalTrainer, "run_epoch", real)
    assert mi.cli(["--out", str(out), "--beta", "0.3,0.6", "--quiet"]) == 2  # occupied: --resume or --force
    assert mi.cli(["--resume", str(out), "--hidden", "8", "--quiet"]) == 2  # another model: refused
    assert mi.cli(["--resume", str(out), "--quiet", "--threads", "1"]) == 0
    assert ((first / ESTIMATES).read_bytes(), (first / "checkpoint.pt").read_bytes()) == kept  # not redone
    log = pd.read_csv(out / beta_folder(1, critical) / "log.csv")
    assert log["epoch"].tolist() == [1, 2, 3, 4]  # continued from its checkpoint: no epoch lost or repeated
    table = pd.read_csv(out / "sweep.csv")
    assert sorted(table["beta"].unique()) == [0.3, critical, 0.6]
    assert (out / "sweep.png").is_file()


def test_budget_stops_the_sweep_and_resume_finishes_it(tmp_path: Path) -> None:
    table = sweep(TINY.replace(epochs=2000), (0.3, 0.4), out=tmp_path, samples=16, max_minutes=1e-4, plot=False)
    assert table.attrs["stop_reason"] == "time" and table.attrs["finished"] == []
    epoch = load_checkpoint(tmp_path / beta_folder(0, 0.3) / "checkpoint.pt")["epoch"]
    assert 1 <= epoch < 2000
    with pytest.raises(ValueError, match="keeps the settings"):
        sweep(None, (0.3, 0.5), out=tmp_path, resume=True)
    assert json.loads((tmp_path / MANIFEST).read_text())["betas"] == [0.3, 0.4]


def test_force_replaces_a_sweep_and_only_its_folders(tmp_path: Path) -> None:
    sweep(TINY.replace(epochs=2), (0.3, 0.4), out=tmp_path, samples=16, plot=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--force"):
        sweep(TINY.replace(epochs=2), (0.5,), out=tmp_path, samples=16, plot=False)
    table = sweep(TINY.replace(epochs=2), (0.5,), out=tmp_path, samples=16, plot=False, force=True)
    assert list(table["beta"].unique()) == [0.5] and (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [beta_folder(0, 0.5)]
    # β runs without their manifest are not continued by a fresh sweep (another config may have written them)
    for name in (MANIFEST, "sweep.csv"):
        (tmp_path / name).unlink()
    with pytest.raises(ValueError, match="already holds β runs"):
        sweep(TINY.replace(epochs=2), (0.5,), out=tmp_path, samples=16, plot=False)


def test_in_memory_sweep_returns_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    table = sweep(TINY.replace(epochs=2), "0.3,0.4", samples=16)
    assert table.attrs["out"] is None and not list(tmp_path.iterdir())
    assert np.isfinite(table["exact"][table["quantity"] == "energy"]).all()
    assert set(table["warm_start_from"].fillna("")) == {"", beta_folder(0, 0.3)}
    assert math.isfinite(float(table["onsager"][table["quantity"] == "energy"].iloc[0]))


# ---------------------------------------------------------------------- exact curves and the figure
def test_exact_curves_are_kaufman_and_onsager() -> None:
    from analysis.thermo import exact_curves
    from latticeflow import kaufman_free_energy, kaufman_specific_heat, onsager_internal_energy

    curves = exact_curves(4, np.array([0.3, 0.6]))
    assert curves["free_energy"].tolist() == [kaufman_free_energy(4, 0.3), kaufman_free_energy(4, 0.6)]
    assert curves["specific_heat"].iloc[1] == kaufman_specific_heat(4, 0.6)
    # Onsager's C/N = −β² dU/dβ by a centred difference: check against a coarser one
    h = 1e-3
    coarse = -0.36 * (onsager_internal_energy(0.6 + h) - onsager_internal_energy(0.6 - h)) / (2 * h)
    assert curves["onsager_specific_heat"].iloc[1] == pytest.approx(coarse, rel=1e-4)  # O(h²) apart


def test_plot_sweep_reads_the_verdicts_of_old_and_new_tables() -> None:
    """Open residual markers for rows whose verdict is "not reliable"; a row without one (a table written
    before the verdicts, or its old β in a resumed sweep) counts as reliable, as it was drawn then."""
    from analysis.thermo import _reliable

    mixed = pd.DataFrame({"reliable": [True, False, np.nan, "False", "True"]})
    assert _reliable(mixed).tolist() == [True, False, True, False, True]
    assert _reliable(pd.DataFrame({"value": [1.0, 2.0]})).tolist() == [True, True]


def test_plot_sweep_refuses_an_empty_table(tmp_path: Path) -> None:
    from analysis.thermo import COLUMNS, plot_sweep

    with pytest.raises(ValueError, match="at least one β"):
        plot_sweep(pd.DataFrame(columns=list(COLUMNS)), tmp_path / "f.png", L=4)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------- the Swendsen-Wang reference (N > 16)
def test_magnetisation_reference_is_swendsen_wang_where_enumeration_cannot_reach() -> None:
    """L=6 (N=36, no enumeration): ⟨|m|⟩, ⟨m²⟩, U₄ and χ are compared with a Swendsen-Wang run, its error in
    the deviation; the Gaussian-started flow at β=0.3, reweighted, agrees with it within 4σ."""
    from analysis.thermo import estimate_rows
    from latticeflow.build import start_at_best_gaussian

    torch.set_num_threads(1)
    target = ising(6, 0.3)
    flow = build_flow(IsingConfig(L=6, beta=0.3, potential="quadratic", symmetrize="none"), target.lattice)
    start_at_best_gaussian(flow, target)
    rows = pd.DataFrame(estimate_rows(flow, target, n_samples=4096, generator=torch.Generator().manual_seed(0),
                                      sw_sweeps=1500))
    rw = rows[rows["method"] == "reweighted"].set_index("quantity")
    for q in ("abs_m", "m2", "binder", "susceptibility"):
        r = rw.loc[q]
        assert r["exact_source"] == "swendsen-wang" and 0 < r["exact_stderr"] < 0.05 * abs(r["exact"]), q
        assert abs(r["deviation_sigma"]) < 4, (q, r["value"], r["stderr"], r["exact"], r["exact_stderr"])
        assert r["deviation_sigma"] == pytest.approx((r["value"] - r["exact"]) / math.hypot(r["stderr"],
                                                                                         r["exact_stderr"]))
    assert rw.loc["energy", "exact_source"] == "exact" and rw.loc["energy", "exact_stderr"] == 0  # Kaufman
    # every error bar carries a verdict. This untrained Gaussian flow (ESS/B 0.04) passes the weights' own
    # tail rule (k̂ 0.61, F within 1σ), but the contributions to the reweighted observables are heavier-tailed
    # (k̂ 0.78-0.88 for these four): their rows say so. The bound and the plain averages are never estimates.
    imp = rows[rows["method"] == "importance"]
    assert imp["reliable"].all() and (imp["pareto_k"] < 0.67).all()
    for q in ("energy", "specific_heat", "abs_m", "m2"):
        assert not rw.loc[q, "reliable"] and rw.loc[q, "pareto_k"] > 0.74 and "heavy-tailed" in rw.loc[q, "reason"]
    assert (rows[rows["method"].isin(["variational", "flow"])]["reliable"] == False).all()  # noqa: E712
    none = pd.DataFrame(estimate_rows(flow, target, n_samples=256, generator=torch.Generator().manual_seed(0),
                                      sw_sweeps=0)).set_index(["quantity", "method"])
    assert np.isnan(none.loc[("abs_m", "reweighted"), "exact"]) and none.loc[("abs_m", "reweighted"), "exact_source"] == ""
    small_flow = build_flow(IsingConfig(L=3, potential="quadratic", symmetrize="none"), ising(3, 0.3).lattice)
    small = pd.DataFrame(estimate_rows(small_flow, ising(3, 0.3), n_samples=64))
    assert (small[small["quantity"] == "abs_m"]["exact_source"] == "exact").all()  # N = 9: enumeration, no SW run


def test_finite_size_figure_from_two_sweeps(tmp_path: Path) -> None:
    """Two tiny finished sweeps (L=3 and L=4) → the benchmark's --finite-size figure, PNG and PDF."""
    import benchmarks.ising_sweep as bench

    from analysis.thermo import plot_finite_size

    for L in (3, 4):
        sweep(TINY.replace(L=L), (0.3, 0.5), out=tmp_path / f"s{L}", warm_epochs=2, samples=64)
    bench.main(["--finite-size", str(tmp_path / "s3"), str(tmp_path / "s4"), "--out", str(tmp_path / "fss")])
    for suffix in ("png", "pdf"):
        assert (tmp_path / "fss" / f"finite_size.{suffix}").stat().st_size > 5000
    table = bench.main(["--table", str(tmp_path / "s4")])  # the per-β table of a finished sweep
    assert list(table["beta"]) == [0.3, 0.5] and {"F_IS_sigma", "U_sigma", "abs_m_sigma"} <= set(table.columns)
    assert table["abs_m_sigma"].notna().all()  # L=4: against enumeration
    with pytest.raises(SystemExit, match="two sweeps at L=3"):
        bench.main(["--finite-size", str(tmp_path / "s3"), str(tmp_path / "s3"), "--out", str(tmp_path / "x")])
    # --step-check --from-beta: the finished β from 0.4 on, again at ε/2, written beside the sweep
    check = bench.main(["--step-check", str(tmp_path / "s4"), "--from-beta", "0.4"])
    assert set(check["beta"]) == {0.5} and (check["step_refine"] == 2).all()
    assert set(check["method"]) == {"variational_refined", "importance_refined"} and check["value"].notna().all()
    assert len(pd.read_csv(tmp_path / "s4" / "step_check.csv")) == 4
    # --remeasure: the finished β again with today's verdicts, from the sweep's seeds. With the sweep's own
    # settings (64 samples, Kish ESS < 100: measured again with its max_samples, 256) it repeats the sweep's
    # measurement sample for sample; --max-samples 64: the first 64 only
    first = bench.main(["--remeasure", str(tmp_path / "s4"), "--only", "1", "--max-samples", "64"])
    assert set(first["beta"]) == {0.5} and set(first["n_samples"]) == {64} and set(first["extended_from"]) == {0}
    same = bench.main(["--remeasure", str(tmp_path / "s4"), "--only", "1"])
    assert len(pd.read_csv(tmp_path / "s4" / "remeasured_1.csv")) == len(same)
    main_rows = same[~same["method"].str.endswith("_refined")]  # the step check keeps its first 64
    assert set(main_rows["n_samples"]) == {256} and set(same["extended_from"]) == {64}
    sweep_rows = pd.read_csv(tmp_path / "s4" / "sweep.csv")
    key = ["beta", "quantity", "normalisation", "method"]
    both = same.fillna({"normalisation": ""}).merge(sweep_rows[sweep_rows["beta"] == 0.5].fillna({"normalisation": ""}),
                                                    on=key, suffixes=("", "_sweep"))
    assert len(both) == len(same) and np.allclose(both["value"], both["value_sweep"], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least one"):
        plot_finite_size({3: pd.DataFrame()}, tmp_path / "e.png")


def test_each_warm_start_draws_samples_of_its_own(tmp_path: Path) -> None:
    """A warm start replaying its neighbour's training samples (the same seed) evaluates the neighbour's
    flow in-sample; each β's run gets the seed ``seed + k`` (k its place in the grid)."""
    from latticeflow.sweep import _beta_config

    cfg = TINY.replace(seed=5)
    assert [_beta_config(cfg, b, k > 0, 2, index=k).seed for k, b in enumerate((0.3, 0.4, 0.5))] == [5, 6, 7]
    sweep(cfg, (0.3, 0.5), out=tmp_path, warm_epochs=1, samples=16, plot=False, step_check=1)
    seeds = [json.loads((tmp_path / beta_folder(k, b) / "config.json").read_text())["seed"]
             for k, b in enumerate((0.3, 0.5))]
    assert seeds == [5, 6]


def test_load_warm_state_carries_a_symmetric_flow_into_the_cold_mixture() -> None:
    """The switch to the ordered phase's flow (cold_config) keeps the neighbour's flow where it can.

    With an MLP without biases every part of the symmetric flow is Z2-even, so the cold flow
    (group without Z2, conv biases started at zero) must carry exactly the same potential, and its
    Z2 mixture of a symmetric density is that density: ln q equal to float64 rounding. With biases
    the MLP's odd half, hidden by the Z2 average, shows: the weights still carry over unchanged."""
    from latticeflow.sweep import cold_config, load_warm_state

    torch.manual_seed(0)
    lattice = ising(4, 0.6).lattice
    for bias in (False, True):
        cfg = IsingConfig(L=4, beta=0.6, hidden=8, channels=3, kernel_size=3, n_steps=3, init_scale=0.3, bias=bias,
                          symmetrize="exact", dtype="float64")
        sym, cold = build_flow(cfg, lattice), build_flow(cold_config(cfg), lattice)
        assert cold_config(cfg).group == "space" and cold_config(cfg).mixture == "z2"
        with torch.no_grad():
            for p in sym.parameters():
                p.add_(0.2 * torch.randn_like(p))
        load_warm_state(cold, sym.state_dict())
        own = cold.state_dict()
        assert torch.count_nonzero(own["flow.potential.parts.1.conv_bias"]) == 0
        for k, v in sym.state_dict().items():
            assert torch.equal(own[f"flow.{k}"], v), k
        x = 2.0 * torch.randn(64, lattice.N, dtype=torch.float64)
        with torch.no_grad():
            lp_sym, lp_cold = sym.log_prob(x), cold.log_prob(x)
        if not bias:
            torch.testing.assert_close(lp_cold, lp_sym, rtol=0, atol=1e-10)
        else:
            assert (lp_cold - lp_sym).abs().max() > 1e-6  # the odd half is no longer averaged away
    # a flow of another family is refused, naming the keys
    other = build_flow(IsingConfig(L=4, potential="quadratic+mlp", hidden=8), lattice)
    with pytest.raises(ValueError, match="do not fit"):
        load_warm_state(build_flow(cold_config(IsingConfig(L=4)), lattice), other.state_dict())


def test_cold_mixture_refuses_what_it_cannot_apply_to(tmp_path: Path) -> None:
    from latticeflow.sweep import cold_config

    with pytest.raises(ValueError, match="mixture='d4' already"):
        cold_config(TINY.replace(mixture="d4"))
    with pytest.raises(ValueError, match="group='z2'"):
        cold_config(TINY.replace(group="z2"))
    with pytest.raises(ValueError, match="already"):  # before anything is written
        sweep(TINY.replace(mixture="z2"), (0.3, 0.6), out=tmp_path / "s", cold_mixture=True)
    assert not (tmp_path / "s").exists()
    assert cold_config(TINY.replace(group="translation")).group == "translation"  # no Z2 to drop: the mixture only

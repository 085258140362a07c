"""β annealing (``--anneal-from``): each epoch trains against its own β, the summary only reads the
epochs at the target β, and a sweep's warm start anneals from its neighbour's β."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import models.ising as mi
from latticeflow import IsingConfig, ising
from latticeflow.build import make_trainer
from latticeflow.sweep import _beta_config, beta_folder, sweep, warm_regression

TINY = IsingConfig(L=3, beta=0.6, potential="quadratic+mlp", hidden=4, n_steps=2, batch=16, epochs=8, warmup=0,
                   symmetrize="none", anneal_from=0.2, anneal_epochs=4)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def test_schedule_is_linear_then_holds_and_resolves_its_length() -> None:
    assert [round(TINY.anneal_beta(e), 12) for e in range(7)] == [0.2, 0.3, 0.4, 0.5, 0.6, 0.6, 0.6]
    assert TINY.anneal_beta(4) == 0.6  # exactly the target β, not a rounding of it
    half = IsingConfig(L=3, anneal_from=0.3, epochs=11)
    assert half.anneal_epochs == 5 and half.replace(epochs=40).anneal_epochs == 5  # a resume keeps the schedule
    assert IsingConfig(L=3).anneal_beta(0) == IsingConfig(L=3).beta and IsingConfig(L=3).anneal_epochs is None
    with pytest.raises(ValueError, match="needs anneal_from"):
        IsingConfig(L=3, anneal_epochs=3)
    with pytest.raises(ValueError, match="must be < epochs"):
        IsingConfig(L=3, anneal_from=0.3, anneal_epochs=8, epochs=8)


def test_each_epoch_trains_against_its_own_beta() -> None:
    """The log's β follows the schedule, and each epoch's two normalisations differ by that epoch's
    ln Z_HS − ln Z_Ising (so its F/N is of that β's target); the flow starts at the hot target's Gaussian."""
    trainer, target = make_trainer(TINY, progress=False)
    log = trainer.fit(TINY.epochs)
    assert log["beta"].tolist() == [TINY.anneal_beta(e) for e in range(TINY.epochs)]
    for beta, hs, isg in zip(log["beta"], log["free_energy_hs"], log["free_energy_ising"]):
        assert isg - hs == pytest.approx(ising(3, beta).log_z_offset / 9, abs=1e-12)
    # the best-Gaussian start is the first epoch's (β = 0.2): its F/N is near that target's exact value,
    # far from the target β's (the two exact values differ by 0.27 per site)
    f0, exact_hot, exact_cold = log["free_energy_hs"][0], ising(3, 0.2).exact_free_energy(), target.exact_free_energy()
    assert abs(f0 - exact_hot) < 0.05 < abs(exact_hot - exact_cold) / 4


def test_summary_reads_only_the_epochs_at_the_target_beta(tmp_path: Path) -> None:
    out = mi.main(["--L", "3", "--beta", "0.6", "--potential", "quadratic+mlp", "--hidden", "4", "--n-steps", "2",
                   "--batch", "16", "--epochs", "8", "--warmup", "0", "--symmetrize", "none", "--anneal-from", "0.2",
                   "--anneal-epochs", "4", "--quiet", "--no-plot", "--threads", "1", "--out", str(tmp_path / "r")])
    log = pd.read_csv(tmp_path / "r" / "log.csv")
    at_beta = log[log["beta"] == 0.6]
    assert out["window"]["n"] == 4 == len(at_beta) and out["window"]["epochs"] == [5, 8]
    assert out["free_energy_hs"] == pytest.approx(at_beta["free_energy_hs"].mean(), abs=1e-12)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["anneal_from"] == 0.2
    # a run stopped during its anneal has no epoch at β: NaN, said so
    early = mi.summarize(log.iloc[:3], ising(3, 0.6))
    assert math.isnan(early["free_energy_hs"]) and early["window"]["n"] == 0 and "annealing" in early["window"]["statistic"]


def test_warm_start_anneals_from_its_neighbour_and_the_guard_reads_the_final_beta(tmp_path: Path) -> None:
    warm = _beta_config(TINY, 0.5, True, 6, from_beta=0.4)
    assert (warm.anneal_from, warm.anneal_epochs, warm.epochs) == (0.4, 3, 6)
    assert _beta_config(TINY, 0.3, False, 6).anneal_from == 0.2  # the first β anneals as a single run would
    assert _beta_config(TINY.replace(anneal_from=None, anneal_epochs=None), 0.5, True, 6, from_beta=0.4).anneal_from is None
    # the guard: early epochs at the neighbour's β (another F/N) must not count as a regression
    rng = np.random.default_rng(0)
    log = pd.DataFrame({"beta": [0.4] * 50 + [0.5] * 100,
                        "free_energy_hs": np.r_[np.full(50, -2.40), np.full(100, -2.30)] + 1e-3 * rng.standard_normal(150)})
    assert warm_regression(log.drop(columns="beta"))[2] > 3  # read blindly: a rise of 0.1
    assert abs(warm_regression(log)[2]) < 3
    sweep(TINY.replace(epochs=6, anneal_epochs=2), (0.3, 0.5), out=tmp_path, warm_epochs=4, samples=16, plot=False)
    second = pd.read_csv(tmp_path / beta_folder(1, 0.5) / "log.csv")
    assert second["beta"].tolist() == [0.3, 0.4, 0.5, 0.5]

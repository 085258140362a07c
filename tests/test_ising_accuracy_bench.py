"""benchmarks/ising_accuracy.py: its presets are valid driver flags, and --seed reaches the run it names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import benchmark_module

import models.ising as mi


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("ising_accuracy.py", "ising_accuracy_bench")


def test_every_preset_is_a_valid_configuration(bench) -> None:
    for name, (flags, minutes, goal) in bench.RUNS.items():
        cfg = mi.config_from_args(mi.parse_args(flags))
        assert minutes > 0 and goal > 0 or goal != goal, name  # nan: no target
        if cfg.schedule_minutes is not None:  # the decay ends inside the budget
            assert cfg.schedule_minutes < minutes, name


def test_seed_and_threads_reach_the_run_and_its_row(bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    tiny = ["--L", "3", "--hidden", "4", "--n-steps", "2", "--potential", "mlp", "--batch", "8",
            "--schedule-minutes", "0.005", "--no-plot"]
    monkeypatch.setitem(bench.RUNS, "tiny", (tiny, 1.0, 1e-3))
    rows = bench.main(["--runs", "tiny", "--seed", "2", "--threads", "1", "--out", str(tmp_path)])
    run = tmp_path / "tiny_seed2"
    assert json.loads((run / "config.json").read_text())["seed"] == 2
    assert rows[0]["seed"] == 2 and rows[0]["stop_reason"] == "schedule"
    assert json.loads((tmp_path / "results.json").read_text())[0]["seed"] == 2
    assert "| tiny | `" in capsys.readouterr().out


@pytest.mark.slow
def test_procs_runs_the_preset_under_torchrun(bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = ["--L", "3", "--hidden", "4", "--n-steps", "2", "--potential", "mlp", "--batch", "8",
            "--schedule-minutes", "0.005", "--no-plot"]
    monkeypatch.setitem(bench.RUNS, "tiny", (tiny, 1.0, 1e-3))
    rows = bench.main(["--runs", "tiny", "--procs", "2", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert rows[0]["procs"] == 2 and rows[0]["threads"] == 1  # one thread per rank by default
    assert summary["provenance"]["processes"] == 2 and summary["provenance"]["threads"] == 1
    assert rows[0]["epochs"] == summary["epochs"] >= 1 and rows[0]["stop_reason"] == "schedule"
    with pytest.raises(SystemExit):
        bench.main(["--runs", "tiny", "--procs", "0", "--out", str(tmp_path)])

"""benchmarks/precision_training.py: its flags reach the trainings, on two epochs of the paper configuration."""

from __future__ import annotations

import math

import pytest
from conftest import benchmark_module

from latticeflow.native import step as native_step


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("precision_training.py", "precision_training_bench")


def test_the_config_is_the_papers_and_takes_the_precision(bench):
    cfg = bench.paper_training(7, 2e-3, 5, "bfloat16")
    assert (cfg.L, cfg.hidden, cfg.n_steps, cfg.step_size, cfg.batch) == (16, 512, 50, 0.1, 64)
    assert (cfg.epochs, cfg.lr, cfg.seed, cfg.train_precision, cfg.schedule) == (7, 2e-3, 5, "bfloat16", "constant")


@pytest.mark.parametrize("equal_time", [False, True])
def test_same_epochs_or_same_wall_time(bench, capsys, equal_time):
    argv = ["--epochs", "2", "--seeds", "0", "1", "--eval", "32", "--threads", "1"] + (["--equal-time"] * equal_time)
    res = bench.main(argv)
    out = capsys.readouterr().out
    if native_step.gemm_choice("bfloat16") is None:
        assert "nothing to compare" in out and res == {}
        return
    assert set(res) == {0, 1}
    for seed in (0, 1):
        a, b = res[seed]["float32"], res[seed]["bfloat16"]
        assert a["epochs"] == 2
        assert a["bf16_eval_steps"] == 0 and b["bf16_eval_steps"] == 0  # every evaluation in float32
        assert all(math.isfinite(r[k]) for r in (a, b) for k in ("F/N", "stderr", "ess"))
        if equal_time:  # bfloat16 trains until float32's wall time has passed, for at most 4x the epochs
            assert b["epochs"] == 8 or b["seconds"] >= 0.9 * a["seconds"]
            assert 1 <= b["epochs"] <= 8
        else:
            assert b["epochs"] == 2
    assert "over 2 seeds: mean bfloat16 − float32" in out and "epochs bfloat16 / float32" in out

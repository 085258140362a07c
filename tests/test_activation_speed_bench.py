"""benchmarks/activation_speed.py: both forms are timed on every shape and dtype asked for, and agree."""

from __future__ import annotations

import pytest
from conftest import benchmark_module


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("activation_speed.py", "activation_speed_bench")


def test_rows_for_every_shape_and_dtype(bench, capsys: pytest.CaptureFixture) -> None:
    rows = bench.main(["--dtype", "float32", "float64", "--rounds", "1", "--iters", "1", "--scale", "0.01",
                       "--threads", "1"])
    assert [(r["shape"], r["dtype"]) for r in rows] == [(s, d) for d in ("float32", "float64") for s in bench.SHAPES]
    assert all(r["torch_s"] > 0 and r["sigmoid_s"] > 0 and r["ratio"] == r["torch_s"] / r["sigmoid_s"] for r in rows)
    # the two forms are one function: float32 rounding, float64 rounding
    assert all(r["max_diff"] < (2e-7 if r["dtype"] == "float32" else 4e-16) for r in rows)
    assert all(r["max_diff"] > 0 for r in rows if r["dtype"] == "float32")  # really two different computations
    assert "| conv, L=16" in capsys.readouterr().out

"""benchmarks/noise_stream.py on a tiny trained run: the training stream and a fresh one, finite and paired."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import benchmark_module

import models.ising as mi


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("noise_stream.py", "noise_stream_bench")


def test_both_streams_on_a_tiny_run(bench, tmp_path: Path, capsys) -> None:
    mi.main(["--L", "3", "--potential", "mlp", "--hidden", "4", "--n-steps", "2", "--batch", "16", "--epochs", "2",
             "--quiet", "--no-plot", "--threads", "1", "--out", str(tmp_path / "r")])
    rows = bench.main([str(tmp_path / "r" / "checkpoint.pt"), "--seeds", "0", "3", "--epochs", "3", "--batch", "16"])
    assert [r["seed"] for r in rows] == [0, 3]
    for r in rows:
        assert all(math.isfinite(v) for v in (*r["shared"], *r["own"], r["sigma"]))
        assert r["shared"][0] > -0.05 and r["own"][0] > -0.05  # an upper bound, within noise
    assert "training stream" in capsys.readouterr().out

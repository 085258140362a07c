"""benchmarks/gpu_graphs.py on the CPU: its eager parts run and say that the graph parts need CUDA."""

from __future__ import annotations

import math

import pytest
from conftest import benchmark_module


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("gpu_graphs.py", "gpu_graphs_bench")


def test_eager_parts_on_the_cpu(bench, capsys) -> None:
    rows = bench.main(["--device", "cpu", "--quick", "--rounds", "1", "--reps", "1"])
    assert [r["part"].split()[0] for r in rows] == ["sampling", "training"]
    assert all(math.isfinite(r["eager_s"]) and r["eager_s"] > 0 and r["graph"] == "needs CUDA" for r in rows)
    assert "| part | batch |" in capsys.readouterr().out

"""benchmarks/quadratic_speed.py: both paths run on the same weights and its flags reach what they set."""

from __future__ import annotations

import pytest
from conftest import benchmark_module


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("quadratic_speed.py", "quadratic_speed_bench")


def test_rows_for_part_and_flow(bench, capsys: pytest.CaptureFixture) -> None:
    rows = bench.main(["--sizes", "3", "--batch", "4", "--flow", "--rounds", "1", "--iters", "1", "--threads", "1",
                       "--driver-flags", "--hidden 4 --potential quadratic+mlp --n-steps 2 --batch 8"])
    assert [r["what"] for r in rows] == ["part", "flow (batch 8)"]  # --batch of --driver-flags reached the flow
    assert all(r["fft_s"] > 0 and r["dense_s"] > 0 and r["ratio"] == r["fft_s"] / r["dense_s"] for r in rows)
    assert "| 3 | 9 | part |" in capsys.readouterr().out


def test_a_flow_without_a_quadratic_part_is_refused(bench) -> None:
    with pytest.raises(SystemExit, match="no quadratic part"):
        bench.main(["--sizes", "3", "--flow", "--rounds", "1", "--iters", "1",
                    "--driver-flags", "--hidden 4 --potential mlp --n-steps 2 --batch 8"])

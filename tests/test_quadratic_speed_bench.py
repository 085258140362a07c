"""benchmarks/quadratic_speed.py: both paths of each comparison run, and its flags reach what they set."""

from __future__ import annotations

import pytest
from conftest import benchmark_module


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("quadratic_speed.py", "quadratic_speed_bench")


def test_rows_for_part_and_flow(bench, capsys: pytest.CaptureFixture) -> None:
    rows = bench.main(["--sizes", "3", "--batch", "4", "--flow", "--rounds", "1", "--iters", "1", "--threads", "1",
                       "--driver-flags", "--hidden 4 --potential quadratic+mlp --n-steps 2 --batch 8"])
    # --batch of --driver-flags reached the flow; quadratic + MLP (space group × Z2) steps in the MLP's frame
    assert [r["what"] for r in rows] == ["part", "flow (batch 8)", "flow, frame (batch 8)"]
    assert [(r["a"], r["b"]) for r in rows] == [("fft", "dense")] * 2 + [("unframed", "framed")]
    assert all(r["a_s"] > 0 and r["b_s"] > 0 and r["ratio"] == r["a_s"] / r["b_s"] for r in rows)
    assert "| 3 | 9 | part |" in capsys.readouterr().out


def test_a_flow_without_a_quadratic_part_is_refused(bench) -> None:
    with pytest.raises(SystemExit, match="no quadratic part"):
        bench.main(["--sizes", "3", "--flow", "--rounds", "1", "--iters", "1",
                    "--driver-flags", "--hidden 4 --potential mlp --n-steps 2 --batch 8"])


def test_the_frame_switch_changes_the_path_not_the_flow(bench) -> None:
    steps, framed, _ = bench.flow_steps(3, "--hidden 4 --potential quadratic+mlp --n-steps 2 --batch 8")
    assert set(framed) == {"unframed", "framed"}
    _, none, _ = bench.flow_steps(3, "--hidden 4 --potential quadratic+conv+mlp --kernel-size 3 --n-steps 2 --batch 8")
    assert none == {}  # the conv part's invariance is not checked: no frame

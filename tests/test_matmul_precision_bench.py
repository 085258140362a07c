"""benchmarks/matmul_precision.py: flags reach the run, every shape and dtype is measured, no timing asserted."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.matmul_precision as bench  # noqa: E402


def test_flags_and_a_tiny_run(capsys: pytest.CaptureFixture) -> None:
    threads = torch.get_num_threads()
    try:
        args = bench.parse_args(["--threads", "1", "--repeats", "2"])
        assert (args.threads, args.repeats) == ([1], 2)
        assert bench.parse_args([]).threads == [1, 2]
        results = bench.main(["--threads", "1", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    assert set(results) == {(1, s) for s in bench.SHAPES}
    for rates in results.values():
        assert set(rates) == set(bench.DTYPES) and all(math.isfinite(r) and r > 0 for r in rates.values())
    out = capsys.readouterr().out
    assert out.count("thread(s)") == len(bench.SHAPES) and "bfloat16" in out and "(1.00×)" in out
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])


def test_iterations_flag_times_both_precisions_and_restores_the_setting(capsys: pytest.CaptureFixture) -> None:
    threads = torch.get_num_threads()
    before = torch.get_float32_matmul_precision()
    try:
        args = bench.parse_args(["--iterations", "--rounds", "3"])
        assert args.iterations and args.rounds == 3
        assert not bench.parse_args([]).iterations
        results = bench.main(["--threads", "1", "--repeats", "1", "--iterations", "--rounds", "1"])
    finally:
        torch.set_num_threads(threads)
    assert torch.get_float32_matmul_precision() == before
    ratios = results[(1, "iterations")]
    assert set(ratios) == {"paper configuration", "driver's default at L=16"}
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())
    out = capsys.readouterr().out
    assert "highest ÷ medium" in out and "medium changes a matmul by up to" in out
    with bench.float32_matmul_precision("medium"):
        assert torch.get_float32_matmul_precision() == "medium"
    assert torch.get_float32_matmul_precision() == before

"""benchmarks/step_speed.py: both sides run, the eager side really steps eagerly, and the setting is restored."""

from __future__ import annotations

import math
import os

import pytest
from conftest import benchmark_module

from latticeflow.native import step as native_step
from latticeflow.potentials.mlp import _MLPRK4Integration, _MLPRK4Step


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("step_speed.py", "step_speed_bench")


def test_both_sides_and_the_kernel_rate(bench, capsys, monkeypatch) -> None:
    if native_step.load() is None:
        pytest.skip(f"the step kernel could not be built here: {native_step._load_error}")
    calls = {"native": 0, "eager": 0}

    def counted(real):
        def call(*a):
            calls[os.environ.get("LATTICEFLOW_STEP_KERNEL", "auto")] += 1
            return real(*a)

        return call

    # a step at a time or a whole integration at once: both compiled
    monkeypatch.setattr(_MLPRK4Step, "apply", counted(_MLPRK4Step.apply))
    monkeypatch.setattr(_MLPRK4Integration, "apply", counted(_MLPRK4Integration.apply))
    flags = "--L 3 --hidden 8 --potential quadratic+mlp --n-steps 2 --batch 8"
    ratios = bench.main(["--flags", flags, "--rounds", "1", "--iters", "1", "--kernel"])
    assert set(ratios) == {flags} and math.isfinite(ratios[flags]) and ratios[flags] > 0
    out = capsys.readouterr().out
    assert "eager / compiled" in out and "the kernel alone" in out
    assert calls["native"] > 0 and calls["eager"] == 0  # the eager side never reached the kernel
    assert "LATTICEFLOW_STEP_KERNEL" not in os.environ


def test_without_the_kernel_it_says_so(bench, capsys, monkeypatch) -> None:
    monkeypatch.setenv("LATTICEFLOW_STEP_KERNEL", "eager")
    assert bench.main(["--flags", "--L 3", "--rounds", "1", "--iters", "1"]) == {}
    assert "unavailable" in capsys.readouterr().out

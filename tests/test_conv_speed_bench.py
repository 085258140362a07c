"""benchmarks/conv_speed.py: every candidate runs, and the eager stage really runs eager."""

from __future__ import annotations

import os

import pytest
from conftest import benchmark_module

from latticeflow.potentials.conv import _ConvDrift, _ConvDriftNative


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("conv_speed.py", "conv_speed_bench")


def test_candidates_and_flow(bench, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    used = {"eager": 0, "native": 0}
    for name, cls in (("eager", _ConvDrift), ("native", _ConvDriftNative)):
        monkeypatch.setattr(cls, "apply", lambda *a, _f=cls.apply, _n=name: used.__setitem__(_n, used[_n] + 1) or _f(*a))
    out = bench.main(["--L", "6", "--k", "3", "--channels", "2", "--batch", "4", "--hidden", "8", "--repeats", "1",
                      "--flow", "--flow-repeats", "1"])
    assert set(out["stage"]) == {"conv direct", "conv fft", "conv eager", "mlp h=8", "matmul 6x conv FLOPs"}
    assert set(out["flow"]) == {"direct", "eager", "fft"}
    assert all(v > 0 for part in out.values() for v in part.values())
    text = capsys.readouterr().out
    assert "conv direct / conv direct eager" in text and "conv part direct / direct eager" in text
    assert used["eager"] > 0  # the eager timers ran the eager stage
    from latticeflow import native

    assert (used["native"] > 0) == (native.load() is not None)
    assert "LATTICEFLOW_CONV_KERNEL" not in os.environ  # the setting is restored after each call


def test_conv_kernel_restores_a_setting(bench, monkeypatch) -> None:
    monkeypatch.setenv("LATTICEFLOW_CONV_KERNEL", "native")
    with bench.conv_kernel("eager"):
        assert os.environ["LATTICEFLOW_CONV_KERNEL"] == "eager"
    assert os.environ["LATTICEFLOW_CONV_KERNEL"] == "native"
    with bench.conv_kernel(None):
        assert os.environ["LATTICEFLOW_CONV_KERNEL"] == "native"

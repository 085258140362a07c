"""benchmarks/device_agreement.py: its tolerances on the CPU, and its noise tokens moved whole between devices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import benchmark_module

import latticeflow as lf
from latticeflow.potentials.symmetrized import SymmetryDraw


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("device_agreement.py", "device_agreement_bench")


def test_float32_error_is_rounding_sized_and_float64_exact(bench, tmp_path: Path) -> None:
    rows = bench.main(["--device", "cpu", "--quick", "--batch", "16", "--json", str(tmp_path / "a.json")])
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads(json.dumps(rows))
    by = {(r["config"], r["precision"]): r for r in rows}
    for config in ("ising4", "mnist64"):
        f32, f64 = by[(config, "float32")], by[(config, "float64")]
        assert f64["verdict"] == "pass" and max(f64[k] for k in ("x", "dlogp", "logp", "grad")) == 0.0
        # float32 rounding: u = 6e-8, a few RK4 stages of sums lose at most a couple of digits
        assert 0 < max(f32[k] for k in ("x", "dlogp", "logp", "grad")) < 1e-5


def test_a_wrong_precision_is_caught(bench) -> None:
    """The relative error of float16 arithmetic against float64 is far beyond the float32 bound."""
    ref = torch.linspace(-3, 3, 101, dtype=torch.float64)
    assert bench.rel_error(ref.half().double(), ref) > bench.F32_FACTOR * 1e-7 + bench.F32_FLOOR
    assert bench.rel_error(ref.float().double(), ref) < bench.F32_FLOOR


def test_tokens_move_with_their_types(bench) -> None:
    flow = lf.build.build_flow({"L": 4, "n_steps": 3, "dtype": "float64"}, lf.ising(4, 0.4).lattice)
    noise = flow.draw_noise(5, torch.Generator().manual_seed(0))
    out = bench.moved(noise, torch.device("cpu"))
    assert len(out) == 3
    draws = [t for t in out[0] if isinstance(t, SymmetryDraw)]
    assert draws and all(isinstance(d.index, torch.Tensor) for d in draws)
    assert bench.moved((None, [torch.ones(2)]), torch.device("cpu"))[0] is None

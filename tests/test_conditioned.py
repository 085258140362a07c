"""The β-conditioned flow (latticeflow.conditioned): one flow for a range of β, against enumeration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import models.ising as mi
from conftest import benchmark_module
from latticeflow import IsingConfig, enumerate_ising, ising
from latticeflow.conditioned import (AtBeta, IsingFamily, build_conditioned_flow, conditioned_sweep,
                                     start_at_best_gaussians)
from latticeflow.exact import kaufman_free_energy
from latticeflow.sweep import sweep
from latticeflow.potentials import MLPPotential, QuadraticPotential
from latticeflow.potentials.conditioned import Conditioned, legendre_basis


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def test_legendre_basis_is_numpys() -> None:
    u = torch.linspace(-1, 1, 11, dtype=torch.float64)
    assert torch.allclose(legendre_basis(u, 4), torch.from_numpy(np.polynomial.legendre.legvander(u.numpy(), 3)),
                          atol=1e-14)


def _parts(k: int, dim: int = 9) -> list:
    torch.manual_seed(0)
    parts = [MLPPotential(dim, 5, activation="softplus", time_dependent=True, init_scale=0.5).double() for _ in range(k)]
    parts[0] = parts[0] + QuadraticPotential((3, 3), time_dependent=True).double()
    with torch.no_grad():
        parts[0].parts[1].a.normal_()
    return parts


def test_conditioned_potential_is_the_legendre_series_with_exact_derivatives() -> None:
    """φ = Σ_j P_j(u(c)) φ_j per sample; its gradient and Laplacian against float64 autograd."""
    parts = _parts(3)
    pot = Conditioned(parts, 0.3, 0.6)
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([0.3, 0.41, 0.5, 0.6], dtype=torch.float64)
    t = 0.7
    with pot.condition(c):
        phi, grad, lap = pot(x, t)
    u = (2 * c - 0.9) / 0.3
    P = legendre_basis(u, 3)
    series = sum(P[:, j] * p(x, t)[0] for j, p in enumerate(parts))
    assert torch.allclose(phi, series, atol=1e-12)
    g = torch.autograd.grad(phi.sum(), x, create_graph=True)[0]
    assert torch.allclose(grad, g, atol=1e-12)
    hess_trace = sum(torch.autograd.grad(g[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(9))
    assert torch.allclose(lap, hess_trace, atol=1e-10)


def test_condition_is_required_checked_and_carried_by_the_token() -> None:
    pot = Conditioned(_parts(2), 0.3, 0.6)
    with pytest.raises(RuntimeError, match="needs its condition"):
        pot.resample(3)
    with pytest.raises(ValueError, match="outside the trained range"):
        with pot.condition(0.61):
            pass
    with pot.condition(0.45):
        c, tokens = pot.resample(3)
    assert c.tolist() == [0.45] * 3 and len(tokens) == 2
    x = torch.randn(3, 9, dtype=torch.float64)
    _, g_token, _ = pot(x, 0.0, noise=(c, tokens))  # outside the block: the token's β is used
    with pot.condition(0.45):
        _, g_block, _ = pot(x, 0.0)
    assert torch.equal(g_token, g_block)
    with pytest.raises(ValueError, match="low < high"):
        Conditioned(_parts(1), 0.5, 0.5)


def test_family_energy_exact_values_and_stratified_draws() -> None:
    fam = IsingFamily(4, 0.3, 0.6)
    beta = torch.tensor([0.3, 0.37, 0.52, 0.6], dtype=torch.float64)
    x = 2 * torch.randn(4, 16, dtype=torch.float64)
    per_beta = torch.stack([ising(4, float(b)).energy(x[i:i + 1])[0] for i, b in enumerate(beta)])
    assert torch.allclose(fam.energy(x, beta), per_beta, rtol=1e-13, atol=1e-12)
    for b in (0.3, 0.4123, 0.5555, 0.6):
        assert fam.exact_free_energy(b) == pytest.approx(ising(4, b).exact_free_energy(), abs=1e-9)
    with pytest.raises(ValueError, match="outside"):
        fam.exact_free_energy(0.65)
    d = fam.draw(8, torch.Generator().manual_seed(0))
    slot = ((d - 0.3) / (0.3 / 8)).floor()
    assert slot.tolist() == list(range(8))  # one β in each eighth of the range


def test_flow_at_beta_is_a_flow_and_starts_at_each_betas_best_gaussian() -> None:
    cfg = IsingConfig(L=3, potential="quadratic+mlp", hidden=4, n_steps=5, init_scale=0.0, symmetrize="none",
                      dtype="float64")
    fam = IsingFamily(3, 0.3, 0.6)
    flow = build_conditioned_flow(cfg, 0.3, 0.6, degree=2)
    assert len(flow.potential.parts) == 3
    assert start_at_best_gaussians(flow, fam) < 0.05  # the kernels' fit by the quadratic series
    gen = torch.Generator().manual_seed(0)
    for b in (0.3, 0.45, 0.6):
        at = AtBeta(flow, b)
        with torch.no_grad():
            x, logp = at.sample(4096, generator=gen)
            # the density of its own samples (backward RK4 inverts the forward map to O(ε⁴)), and not another β's
            assert (at.log_prob(x) - logp).abs().mean() < 1e-3
            assert (AtBeta(flow, 0.9 - b if b != 0.45 else 0.3).log_prob(x) - logp).abs().mean() > 0.5
            f = (logp + ising(3, b).energy(x)) / 9
        best = ising(3, b).best_gaussian()["free_energy"]
        assert abs(float(f.mean()) - best) < 4 * float(f.std()) / 64 + 2e-3, b
    with pytest.raises(ValueError, match="outside the trained range"):
        AtBeta(flow, 0.7)


def test_conditioned_sweep_l3_agrees_with_enumeration(tmp_path: Path) -> None:
    """One conditioned flow on [0.3, 0.5]: importance F/N and reweighted U/N within 4σ of enumeration at each β."""
    cfg = IsingConfig(L=3, potential="quadratic+mlp", hidden=8, batch=128, epochs=100, n_steps=5, symmetrize="none",
                      seed=1)
    betas = (0.3, 0.4, 0.5)
    table = conditioned_sweep(cfg, betas, degree=2, out=tmp_path / "c", samples=1024, step_check=1)
    assert table.attrs["stop_reason"] == "finished" and table.attrs["finished"] == list(betas)
    manifest = json.loads((tmp_path / "c" / "sweep.json").read_text())
    assert manifest["method"] == "conditioned" and manifest["degree"] == 2
    log = pd.read_csv(tmp_path / "c" / "conditioned_flow" / "log.csv")
    assert len(log) == 100 and log["gap"].iloc[-20:].mean() < log["gap"].iloc[:20].mean()  # it learned
    for beta in betas:
        en = enumerate_ising(ising(3, beta).couplings())
        rows = table[table["beta"] == beta]
        for q, value, method, norm in (("free_energy", -en.log_z / 9, "importance", "ising"),
                                       ("energy", en.energy / beta, "reweighted", "")):
            r = rows[(rows.quantity == q) & (rows.method == method) & (rows.normalisation.fillna("") == norm)].iloc[0]
            assert r["exact"] == pytest.approx(value, rel=1e-9)
            assert abs(r["value"] - value) < 4 * r["stderr"] and r["stderr"] < 0.05, (beta, q, r["value"], value)
    # resume: the measured β are read back, nothing is retrained
    again = sweep(None, None, out=tmp_path / "c", resume=True)  # the sweep's resume hands it on
    assert again.attrs["finished"] == list(betas) and len(pd.read_csv(tmp_path / "c" / "conditioned_flow" / "log.csv")) == 100
    assert kaufman_free_energy(3, 0.4) == pytest.approx(-enumerate_ising(ising(3, 0.4).couplings()).log_z / 9)


def test_conditioned_flag_budget_and_resume(tmp_path: Path) -> None:
    """--conditioned DEGREE through the parser into the flow; a budget stops training, --resume finishes."""
    argv = ["--L", "3", "--potential", "quadratic+mlp", "--hidden", "4", "--n-steps", "2", "--batch", "16",
            "--epochs", "150", "--symmetrize", "none", "--quiet", "--threads", "1", "--no-plot", "--samples", "64",
            "--step-check", "1", "--beta", "0.3,0.5", "--conditioned", "1"]
    out = tmp_path / "s"
    first = mi.main(argv + ["--out", str(out), "--max-minutes", "0.005"])
    assert first["stop_reason"] == "time" and not list(out.glob("b*/estimates.csv"))
    stopped = len(pd.read_csv(out / "conditioned_flow" / "log.csv"))
    assert 0 < stopped < 150
    final = mi.main(["--resume", str(out / "sweep.json"), "--quiet", "--threads", "1", "--no-plot"])
    assert final["stop_reason"] == "epochs" and len(pd.read_csv(out / "conditioned_flow" / "log.csv")) == 150
    ckpt = torch.load(out / "conditioned_flow" / "checkpoint.pt", weights_only=False)
    assert sum(k.endswith("readout") for k in ckpt["model"]) == 2  # degree 1: two MLP parts
    assert json.loads((out / "sweep.json").read_text())["degree"] == 1
    from analysis.report import load_model
    from latticeflow.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="β-conditioned flow"):  # python -m analysis says what to do instead
        load_model(out / "conditioned_flow" / "checkpoint.pt")
    bench = next(benchmark_module("ising_sweep.py", "ising_sweep_bench_conditioned"))
    with pytest.raises(SystemExit, match="β-conditioned sweep"):  # its step check ran with it
        bench.step_check(str(out), 0.0)
    for bad in ({"mixture": "z2"}, {"gradient_estimator": "path"}, {"anneal_from": 0.2}):
        with pytest.raises(ValueError, match="β-conditioned sweep"):
            conditioned_sweep(IsingConfig(L=3, **bad), (0.3, 0.4), out=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ValueError, match="at least two distinct"):
        conditioned_sweep(IsingConfig(L=3), (0.4,), degree=1, out=tmp_path / "one")
    assert not (tmp_path / "one").exists()
    with pytest.raises(ValueError, match="warm-epochs"):
        mi.main(argv + ["--warm-epochs", "3", "--out", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()

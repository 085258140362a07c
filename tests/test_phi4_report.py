"""φ⁴ estimates from a flow (analysis/phi4_report.py): checked on the free theory, where the flow
started at the closed-form Gaussian is exact, against autocorrelated series of known τ, against the
closed-form χ for HMC, and through ``python -m analysis`` on a φ⁴ checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import analysis.__main__ as amain
import models.phi4 as mp
from analysis.phi4_report import (REFERENCE_CSV, SCALARS, flow_estimates, hmc_baseline, propagator_deviation, reference,
                                  trace_estimates)
from latticeflow.build import build_flow, start_at_best_gaussian
from latticeflow.config import batch_for
from latticeflow.phi4 import phi4, phi4_hopping
from latticeflow.phi4_config import Phi4Config


def exact_gaussian_flow(target):
    """The quadratic potential started at the best Gaussian: for λ = 0 the exact distribution."""
    cfg = Phi4Config(L=target.L, m2=target.m2, lam=target.lam, potential="quadratic", time_dependent=False)
    flow = build_flow(cfg.flow_config(), target.lattice).double()
    start_at_best_gaussian(flow, target)
    return flow.eval()


def test_exact_flow_gives_exact_free_energy_unit_weights_and_the_propagator():
    t = phi4(4, 0.7, 0.0)
    est = flow_estimates(exact_gaussian_flow(t), t, 2048, 512, torch.Generator().manual_seed(0), seed=1)
    f = t.exact_free_energy()
    # every weight is the same: Var(ln w) ~ 1e-10; both estimates sit 1.9e-6 per site above exact, the gap
    # between the integrated ln q (RK4 of the trace, ε = 0.1) and the log-det of the RK4 map itself
    assert est["weights"].log_weight_variance < 1e-8
    assert est["importance"].value == pytest.approx(f, abs=1e-5)
    assert est["variational"].value == pytest.approx(f, abs=1e-5)
    assert est["weights"].ess / est["weights"].n > 0.999 and est["weights"].verdict.reliable
    assert est["mcmc"]["acceptance"] > 0.99
    assert 0.8 < est["mcmc"]["tau_abs_m"] < 1.25  # i.i.d. exact samples, all accepted
    pg = propagator_deviation(est)
    assert pg["reweighted_max_sigma"] < 4.5 and pg["chain_max_sigma"] < 4.5  # 16 correlated points
    for k in ("chi", "xi", "abs_m", "action_density"):
        assert abs(est["reweighted"][k] - est["exact"][k]) < 4 * est["reweighted"][k + "_err"], k


def test_importance_estimate_corrects_a_wrong_flow_and_the_verdict_sees_it():
    t = phi4(4, 0.7, 0.0)
    flow = exact_gaussian_flow(t)
    with torch.no_grad():  # scale the quadratic kernel by 1.1: the bound rises, the importance estimate stays exact
        for p in flow.parameters():
            p.mul_(1.1)
    est = flow_estimates(flow, t, 8192, 1024, torch.Generator().manual_seed(0), seed=3)
    f = t.exact_free_energy()
    assert est["variational"].value - f > 5 * est["variational"].stderr
    assert abs(est["importance"].deviation(f)) < 4  # six seeds of 4096 gave −1.5 … +3.5σ
    assert est["mcmc"]["acceptance"] < 0.8 and 0.5 < est["weights"].ess / est["weights"].n < 0.8


def test_trace_estimates_recover_tau_of_an_ar1_series_and_chi():
    rng = np.random.default_rng(0)
    rho, n, C = 0.8, 20000, 4
    m = np.empty((n, C))
    m[0] = rng.normal(size=C)
    for i in range(1, n):
        m[i] = rho * m[i - 1] + math.sqrt(1 - rho**2) * rng.normal(size=C)
    r = trace_estimates(0.1 * m, N=10)
    # τ(m²) of an AR(1) Gaussian series is (1 + ρ²)/(1 − ρ²); |m| is close to it
    assert r["tau_m2"] == pytest.approx((1 + rho**2) / (1 - rho**2), rel=0.15)
    assert r["chi"] == pytest.approx(10 * 0.01, abs=4 * r["chi_err"])
    assert r["abs_m"] == pytest.approx(0.1 * math.sqrt(2 / math.pi), abs=4 * r["abs_m_err"])
    assert r["rhat_abs_m"] < 1.01 and r["chains"] == C and r["n"] == n


def test_hmc_baseline_reproduces_the_free_susceptibility():
    t = phi4(4, 1.0, 0.0)
    r = hmc_baseline(t, chains=16, n_samples=600, n_warmup=100, seed=0)
    assert r["n"] == 600 and r["chains"] == 16 and 0.5 < r["acceptance"] <= 1
    assert abs(r["chi"] - 0.5) < 4 * r["chi_err"]  # χ = 1/(2m²)
    s = hmc_baseline(t, chains=4, seconds=0.2, n_warmup=10, seed=1, chunk=5)
    assert s["seconds"] >= 0.2 and s["n"] % 5 == 0
    with pytest.raises(ValueError, match="exactly one"):
        hmc_baseline(t)


def test_reference_table_is_read_for_its_points_only(tmp_path):
    path = tmp_path / "ref.csv"
    rows = [{"L": 6, "m2": -4.0, "lam": 6.975, **{f"obs_{k}": 1.0 + i for k in SCALARS},
             **{f"obs_{k}_err": 1.0 for k in SCALARS}} for i in range(2)]
    rows[1]["obs_chi_err"] = 0.5  # inverse-variance weights 1 and 4
    pd.DataFrame(rows).to_csv(path, index=False)
    ref = reference(phi4(6, -4.0, 6.975), path)
    assert ref["chi"][0] == pytest.approx((1 * 1 + 4 * 2) / 5) and ref["chi"][1] == pytest.approx(5 ** -0.5)
    assert reference(phi4(8, -4.0, 6.975), path) is None
    assert reference(phi4_hopping(6, 0.26774, 0.5), path) is None  # other field normalisation


def test_shipped_reference_table_has_r_hat_tau_and_its_command():
    df = pd.read_csv(REFERENCE_CSV)
    assert {"command", "rhat_abs_m", "tau_abs_m", "tau_m2", "obs_chi", "obs_xi"} <= set(df.columns)
    assert (df["rhat_abs_m"] < 1.05).all() and (df["samples"] > 50 * df["tau_m2"]).all()
    ref = reference(phi4(6, -4.0, 6.975))
    assert ref is not None and ref["chi"][0] == pytest.approx(1.06, abs=0.02)


def test_phi4_batch_default_follows_the_ising_recipe_and_the_flag_overrides_it():
    assert Phi4Config(L=6).batch_size == 256 == batch_for(6)
    assert Phi4Config(L=32).batch_size == batch_for(32) == 64
    assert Phi4Config(L=32).to_dict()["batch"] == 64
    args = mp.build_parser().parse_args(["--L", "32", "--batch", "48"])
    assert mp.config_from_args(args).batch_size == 48


@pytest.mark.slow
def test_analysis_cli_reports_on_a_phi4_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert mp.cli(["--L", "3", "--m2", "1", "--lam", "0", "--potential", "quadratic", "--epochs", "20",
                   "--mcmc-samples", "256", "--out", str(out), "--quiet", "--no-plot", "--threads", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())["neural_mcmc"]
    assert {"tau_abs_m", "tau_m2", "free_energy_reweighted_err", "weights", "propagator"} <= set(summary)
    assert summary["exact"]["chi"] == pytest.approx(0.5)
    capsys.readouterr()
    assert amain.cli([str(out), "--out", str(tmp_path / "rep"), "--samples", "512", "--hmc-chains", "8",
                      "--hmc-warmup", "20", "--quiet"]) == 0
    est = pd.read_csv(tmp_path / "rep" / "estimates.csv")
    assert set(est["method"]) >= {"importance", "reweighted", "neural MCMC", "HMC"}
    fe = est[(est["quantity"] == "free_energy") & (est["method"] == "importance")].iloc[0]
    assert fe["exact"] == pytest.approx(phi4(3, 1.0, 0.0).exact_free_energy())
    samplers = pd.read_csv(tmp_path / "rep" / "samplers.csv")
    assert list(samplers["sampler"]) == ["neural MCMC", "HMC"] and (samplers["ess_per_s_m2"] > 0).all()
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["reference"] == "closed form"
    assert amain.cli([str(out), "--L", "4", "--out", str(tmp_path / "r2"), "--quiet"]) == 2
    assert "L=3" in capsys.readouterr().err

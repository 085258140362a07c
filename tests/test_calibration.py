"""Calibration: the report's error bars cover the exact values, or the report says not to use them.

At L=3 and L=4 every observable is exact (enumeration, Kaufman). One flow per lattice is trained
in memory and frozen barely, partly and well trained; the report runs with several seeds on each
(24 repeats in all, small settings). The z-scores of the estimates marked reliable must behave
like a standard normal: ≥ 90 % within 2σ and none beyond 4σ. The larger study behind the
README's coverage table is benchmarks/calibration.py.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from analysis.calibration import coverage, trained_stages, zscores
from analysis.report import ReportSettings
from latticeflow.config import ISING_DEFAULT

STAGES = {"barely trained": 3, "partly trained": 40, "well trained": 300}
SEEDS = range(4)
# chain_seconds never binds here (chains stop on convergence or at 64× their length), so the
# numbers do not depend on the machine's load
SETTINGS = ReportSettings(samples=2048, batch=1024, hmc_chains=8, hmc_samples=100, hmc_warmup=50, hmc_leapfrog=5,
                          skip_latent_hmc=True, chain_seconds=600.0, independence=2048, sw_sweeps=400, sw_chains=4,
                          sw_thermalize=50, rk4_check=2, plots=False, verbose=False)


@pytest.fixture(scope="module")
def z():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same numbers on every machine
    try:
        frames = []
        for L in (3, 4):
            config = ISING_DEFAULT.replace(L=L, potential="quadratic+mlp", hidden=32, epochs=max(STAGES.values()),
                                           seed=L)
            for stage, _, flow, target in trained_stages(config, STAGES):
                frames.append(zscores(flow, target, SEEDS, SETTINGS, L=L, stage=stage))
    finally:
        torch.set_num_threads(threads)
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def test_reliable_error_bars_cover_the_exact_values(z):
    assert z["seed"].nunique() * z.groupby(["L", "stage"]).ngroups >= 20  # ≥ 20 repeats
    ok = z[z["reliable"]]
    a = np.abs(ok["z"].to_numpy())
    assert len(a) >= 200
    assert (a < 2).mean() >= 0.90, coverage(z)
    assert (a > 4).sum() == 0, ok.loc[ok["z"].abs() > 4]


def test_the_verdicts_are_needed_and_not_blanket(z):
    by_method = coverage(z, "method")
    # Monte Carlo with converged chains is usable nearly always...
    for method in ("physical HMC", "Swendsen-Wang"):
        assert by_method.loc[method, "reliable"] >= 0.75 * (by_method.loc[method, ["reliable", "unreliable"]].sum())
    # ...a barely trained flow's importance weights never are...
    barely = z[(z["stage"] == "barely trained") & z["method"].isin(["flow reweighted", "flow importance"])]
    assert len(barely) and not barely["reliable"].any()
    assert barely["reason"].str.contains("Kish ESS/B").all()
    # ...and the flags catch estimates whose error bars would mislead: some flagged rows lie beyond 4σ
    assert (z.loc[~z["reliable"], "z"].abs() > 4).any()
    # a flow that misses part of the target passes every test on its own samples; the target side
    # catches it. Whether one of these trained flows does so depends on the CPU's arithmetic (on the
    # machine this test was written on the L=4 flow at 300 epochs did: ESS/B 0.61, k̂ 0.30, reweighted
    # |m| 15σ off; on an AMD EPYC it did not), so the flagging is tested deterministically below; when the
    # check fired, only importance rows carry its reason.
    missed = z[z["reason"].str.contains("misses part of the target")]
    assert not missed["method"].isin(["physical HMC", "Swendsen-Wang", "flow plain", "flow variational"]).any()


def test_a_target_side_disagreement_marks_every_importance_estimate(monkeypatch):
    # the wiring of compute_estimates: a target-side −ln Z/N more than CROSS_CHECK_SIGMA from the flow
    # side's must mark every importance estimate unusable, and nothing else
    import analysis.report as rep
    from analysis.free_energy import Estimate

    torch.manual_seed(0)
    config = ISING_DEFAULT.replace(L=3, potential="quadratic+mlp", hidden=8, epochs=1)
    _, _, flow, target = next(iter(trained_stages(config, {"barely trained": 1})))
    settings = replace(SETTINGS, samples=256, independence=256, sw_sweeps=50, hmc_samples=40, seed=0)
    seen = {}

    def far(flow, target, chain, generator=None, batch=512, **kw):
        seen["chain"] = chain.method
        return Estimate(-1e3, 1e-3)  # far below any flow-side value

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with monkeypatch.context() as m:
            m.setattr(rep, "target_side_free_energy", far)
            res = rep.compute_estimates(flow, target, settings)
            if "chain" not in seen:
                pytest.skip("no converged HMC chain to check against at these settings")
            flagged = [r for r in res["rows"] if "misses part of the target" in (r["reason"] or "")]
            assert flagged and all(not r["reliable"] for r in flagged)
            assert {r["method"] for r in flagged} >= {"flow importance"}
            assert not {r["method"] for r in flagged} & {"physical HMC", "Swendsen-Wang", "flow plain"}
            assert abs(res["cross_check"]["deviation_sigma"]) > rep.CROSS_CHECK_SIGMA
            # and with the target side agreeing, no row carries the reason
            m.setattr(rep, "target_side_free_energy",
                      lambda *a, **k: res["flow"].free_energy_importance)
            res = rep.compute_estimates(flow, target, settings)
            assert not any("misses part of the target" in (r["reason"] or "") for r in res["rows"])
    finally:
        torch.set_num_threads(threads)



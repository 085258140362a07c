"""The report CLI (python -m analysis): end to end on a freshly trained tiny checkpoint, and
clear errors for bad input."""

import csv
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis.__main__ import cli, main
from analysis.report import ReportSettings, estimate_rows, load_model, run_report, write_csv
from latticeflow import ising
from latticeflow.checkpoint import CheckpointError, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--samples", "256", "--batch", "128", "--hmc-samples", "30", "--hmc-chains", "4", "--hmc-leapfrog", "3",
         "--hmc-warmup", "10", "--independence", "256", "--sw-sweeps", "100", "--quiet", "--threads", "1",
         "--chain-seconds", "0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 20-epoch models.ising run on L=3 (tiny flow): checkpoint.pt with config, model and log."""
    from models.ising import main as train

    out = tmp_path_factory.mktemp("ising_l3")
    threads = torch.get_num_threads()
    try:
        train(["--L", "3", "--epochs", "20", "--hidden", "8", "--n-steps", "4", "--batch", "32", "--out", str(out),
               "--no-plot", "--quiet", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    path = out / "checkpoint.pt"
    assert path.is_file()
    return path


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_end_to_end(checkpoint, tmp_path):
    out = tmp_path / "report"
    res = main([str(checkpoint), "--out", str(out), *SMALL])
    for name in ("report.md", "estimates.csv", "samplers.csv", "magnetisation.png", "magnetisation.pdf",
                 "spins.png", "hmc_abs_m.png", "hmc_energy.pdf", "convergence.png"):
        assert (out / name).is_file(), name
    rows = read_csv(out / "estimates.csv")
    assert list(rows[0]) == ["quantity", "method", "value", "stderr", "systematic", "exact", "deviation_sigma",
                             "reliable", "reason"]
    target = ising(3, "critical")
    exact_hs = target.exact_free_energy()
    fe_is = next(r for r in rows if r["quantity"] == "free_energy_hs" and r["method"] == "flow importance")
    assert float(fe_is["exact"]) == pytest.approx(exact_hs, abs=1e-9)
    value, err = float(fe_is["value"]), float(fe_is["stderr"])
    assert value == pytest.approx(res["flow"].free_energy_importance.value)
    # the RK4 check's max |δ|/N is the free energies' systematic error, added in quadrature
    sys_err = float(fe_is["systematic"])
    assert sys_err == pytest.approx(res["rk4"]["max_abs"] / target.N) and 0 < sys_err < 1e-3
    assert float(fe_is["deviation_sigma"]) == pytest.approx((value - exact_hs) / math.hypot(err, sys_err))
    fe_var = next(r for r in rows if r["quantity"] == "free_energy_hs" and r["method"] == "flow variational")
    assert float(fe_var["value"]) > exact_hs  # variational bound (eq. 7)
    # a bound and plain flow averages never count as estimates of the target; the others carry their verdict
    assert fe_var["reliable"] == "False" and "upper bound" in fe_var["reason"]
    assert all(r["reliable"] == "False" and "biased" in r["reason"] for r in rows if r["method"] == "flow plain")
    for r in rows:
        assert (r["reliable"] == "True") == (r["reason"] == ""), r
    weights = res["flow"].importance.verdict
    assert {r["reliable"] for r in rows if r["method"] == "flow reweighted"} == {str(weights.reliable)}
    for name, chain in res["chains"].items():
        assert {r["reason"] for r in rows if r["method"] == name} == {chain.verdict.reason}
    ising_row = next(r for r in rows if r["quantity"] == "free_energy_ising" and r["method"] == "flow importance")
    assert float(ising_row["value"]) - value == pytest.approx(target.log_z_offset / target.N, abs=1e-9)
    energy_methods = {r["method"] for r in rows if r["quantity"] == "energy"}
    assert energy_methods == {"flow plain", "flow reweighted", "latent HMC", "physical HMC", "independence",
                              "Swendsen-Wang"}
    u_exact = {float(r["exact"]) for r in rows if r["quantity"] == "energy"}
    assert len(u_exact) == 1 and math.isclose(u_exact.pop(), res["flow"].exact["energy"])
    samplers = {r["method"]: r for r in read_csv(out / "samplers.csv")}
    assert set(samplers) == {"latent HMC", "physical HMC", "independence", "Swendsen-Wang"}
    lat = samplers["latent HMC"]
    assert 0 < float(lat["acceptance"]) <= 1 and float(lat["tau_abs_m"]) > 0
    chain = res["chains"]["latent HMC"]
    assert float(lat["speedup_seconds_abs_m"]) == pytest.approx(
        res["chains"]["physical HMC"].effective_seconds() / chain.effective_seconds(), rel=1e-6)
    md = (out / "report.md").read_text()
    assert "| quantity | method | estimate ± error | systematic | exact | deviation (σ) | use? |" in md
    unusable = [r for r in rows if r["reliable"] == "False" and r["method"] not in ("flow plain", "flow variational")]
    assert ("**Do not use**" in md) == bool(unusable)  # 30 HMC samples of 4 chains: some are unusable
    assert unusable and all(f"{r['method']}: {r['reason']}" in md for r in unusable)
    assert f"{exact_hs:.10g}" in md and "## Samplers" in md and "![magnetisation](magnetisation.png)" in md
    # every Markdown table row has as many cells as its header (|m| must not split a cell)
    tables = [[ln for ln in block.splitlines() if ln.startswith("|")] for block in md.split("\n\n")]
    for table in filter(None, tables):
        assert len({len(re.split(r"(?<!\\)\|", ln)) for ln in table}) == 1, table[0]


def test_report_skip_hmc_is_reproducible(checkpoint, tmp_path):
    args = [str(checkpoint), "--samples", "200", "--skip-hmc", "--independence", "0", "--sw-sweeps", "0",
            "--no-plots", "--quiet", "--threads", "1", "--seed", "3"]
    main([*args, "--out", str(tmp_path / "a")])
    main([*args, "--out", str(tmp_path / "b")])
    a, b = (tmp_path / "a" / "estimates.csv").read_text(), (tmp_path / "b" / "estimates.csv").read_text()
    assert a == b
    assert not (tmp_path / "a" / "samplers.csv").exists()
    assert not list((tmp_path / "a").glob("*.png"))
    md = (tmp_path / "a" / "report.md").read_text()
    assert "## Samplers" not in md and "flow reweighted" in md
    methods = {r["method"] for r in read_csv(tmp_path / "a" / "estimates.csv")}
    assert methods == {"flow variational", "flow importance", "flow plain", "flow reweighted"}


def test_load_model_round_trip(checkpoint):
    flow, target, state = load_model(checkpoint, L=3)
    assert flow.dtype == torch.float64 and target.N == 9 and state["epoch"] == 20
    assert not flow.training
    flow32, _, _ = load_model(checkpoint, dtype=torch.float32)
    for (k, p), q in zip(flow32.state_dict().items(), state["model"].values()):
        assert torch.equal(p, q), k


@pytest.fixture(scope="module")
def mixture_checkpoint(tmp_path_factory):
    """A 3-epoch ``models.ising --mixture z2`` run on L=2 (tiny flow): its model is a SymmetricMixture."""
    from models.ising import main as train

    out = tmp_path_factory.mktemp("ising_mixture")
    threads = torch.get_num_threads()
    try:
        train(["--L", "2", "--epochs", "3", "--hidden", "4", "--n-steps", "2", "--batch", "16", "--mixture", "z2",
               "--out", str(out), "--no-plot", "--quiet", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    return out / "checkpoint.pt"


def test_report_on_a_mixture_checkpoint(mixture_checkpoint, tmp_path):
    # regression: python -m analysis refused a --mixture checkpoint ("flow must be a
    # MongeAmpereFlow (with forward_map and dim), got SymmetricMixture"): the mixture had no
    # forward_map, n_steps or public noise draw, which latent HMC needs
    from latticeflow.flow import Flow
    from latticeflow.mixture import SymmetricMixture

    flow, target, state = load_model(mixture_checkpoint)
    assert isinstance(flow, SymmetricMixture) and isinstance(flow, Flow) and flow.dtype == torch.float64
    assert target.N == 4 and state["config"]["mixture"] == "z2"
    out = tmp_path / "report"
    res = main([str(mixture_checkpoint), "--out", str(out), "--samples", "64", "--batch", "32", "--hmc-samples", "4",
                "--hmc-chains", "2", "--hmc-leapfrog", "2", "--hmc-warmup", "4", "--independence", "64",
                "--sw-sweeps", "10", "--quiet", "--no-plots", "--threads", "1", "--chain-seconds", "0"])
    rows = read_csv(out / "estimates.csv")
    assert {r["method"] for r in rows if r["quantity"] == "energy"} == {
        "flow plain", "flow reweighted", "latent HMC", "physical HMC", "independence", "Swendsen-Wang"}
    fe = res["flow"]
    assert fe.free_energy_variational.value > target.exact_free_energy()  # the mixture's bound (eq. 7)
    assert 0 < fe.ess <= 1


# ---------------------------------------------------------------------- bad input
def test_wrong_lattice_size(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=rf"checkpoint {checkpoint} was trained for L=3, but L=4"):
        main([str(checkpoint), "--out", str(tmp_path), "--L", "4", "--quiet"])


def test_bad_files(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_report(tmp_path / "nope.pt", tmp_path, verbose=False)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"checkpoint {junk} is unreadable"):
        main([str(junk), "--out", str(tmp_path), "--quiet"])
    state = torch.load(checkpoint, weights_only=True)
    no_cfg = save_checkpoint({"model": state["model"]}, tmp_path / "no_cfg.pt")
    with pytest.raises(CheckpointError, match="lacks config"):
        load_model(no_cfg)
    bad_cfg = save_checkpoint({"model": state["model"], "config": {"hidden": 8}}, tmp_path / "bad_cfg.pt")
    with pytest.raises(CheckpointError, match="needs at least L and beta"):
        load_model(bad_cfg)
    other = save_checkpoint({"model": state["model"], "config": {**state["config"], "hidden": 16}},
                            tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not fit the flow"):
        load_model(other)
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("flag, value, match", [
    ("--hmc-leapfrog", "0", "hmc_leapfrog=0"),
    ("--hmc-samples", "1", "hmc_samples=1"),
    ("--hmc-chains", "0", "hmc_chains=0"),
    ("--hmc-warmup", "-5", "hmc_warmup=-5"),
    ("--target-accept", "1.5", "target_accept=1.5"),
    ("--step-size", "0", "step_size=0.0"),
    ("--samples", "1", "samples=1"),
    ("--independence", "1", "independence=1"),
    ("--L", "1", "L=1"),
])
def test_bad_settings_fail_before_loading(tmp_path, capsys, flag, value, match):
    # the checkpoint is not a checkpoint at all: settings are checked first (by the parser, or by
    # ReportSettings), one error line and exit status 2
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    try:
        status = cli([str(junk), "--out", str(tmp_path), flag, value, "--quiet"])
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and "unreadable" not in err
    assert flag in err or match in err, err


def test_api_errors(tmp_path):
    with pytest.raises(TypeError, match="FlowEstimates"):
        estimate_rows({"free_energy": 1.0})
    with pytest.raises(ValueError, match="no rows"):
        write_csv([], tmp_path / "x.csv")
    with pytest.raises(TypeError, match="unknown report settings"):
        run_report(tmp_path / "x.pt", tmp_path, hmc_steps=3)
    with pytest.raises(ValueError, match="dtype"):
        ReportSettings(dtype="float16")


def test_cli_prints_error_and_exits(checkpoint, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "analysis", str(checkpoint), "--out", str(tmp_path), "--L", "5"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("python -m analysis: error: checkpoint") and "L=3" in proc.stderr and "L=5" in proc.stderr
    assert "Traceback" not in proc.stderr

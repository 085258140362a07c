"""benchmarks/mnist_race.py (issue 17) and latticeflow.mnist.WhitenedDensity, on tiny IDX files (8x8 images).

The race's promises: the flags reach the settings and models; the whitened start is exactly the
closed-form Gaussian; one shared loop respects the training budget, evaluates on the way and
records a divergence instead of crashing; occupied folders are refused; races merge; a missing
zuko skips its rows only.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import benchmark_module
import torch
from torch import Tensor, nn

from latticeflow.flow import standard_normal_log_prob
from latticeflow.mnist import MNIST_PAPER, AffineFlow, GaussianBaseline, WhitenedDensity, build_flow
from mnist_helpers import write_mnist

N_TRAIN, N_TEST, N_VALIDATION = 300, 60, 60
TINY = ["--n-validation", str(N_VALIDATION), "--val-images", "40", "--eval-batch", "50", "--batch", "50",
        "--maf-transforms", "2", "--maf-hidden", "16", "--ma-hidden", "8", "--ma-n-steps", "2"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def race():
    yield from benchmark_module("mnist_race.py", "mnist_race_bench")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("mnist_race"), N_TRAIN, N_TEST, seed=3)


@pytest.fixture(scope="module")
def whitened_race(race, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A 1.2-second whitened race of the Gaussian, a tiny MAF (with zuko) and a tiny MA flow."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("race") / "whitened"
    only = ["gaussian", "maf", "ma"] if importlib.util.find_spec("zuko") else ["gaussian", "ma"]
    summary = race.main(["--data-dir", str(data_dir), "--out", str(out), "--minutes", "0.02", "--eval-every", "0.4",
                         "--only", *only, *TINY])
    return out, summary


class StandardNormal(nn.Module):
    """N(0, I) as a density module (an identity flow)."""

    def log_prob(self, x: Tensor) -> Tensor:
        return standard_normal_log_prob(x)


def _linears(module: nn.Module) -> list[nn.Module]:
    """The affine layers of a network (zuko's own Linear is not a torch.nn.Linear)."""
    return [m for m in module.modules() if isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() == 2]


def _gaussian(D: int = 6, n: int = 200) -> tuple[GaussianBaseline, Tensor]:
    gen = torch.Generator().manual_seed(5)
    a = torch.eye(D, dtype=torch.float64) + 0.3 * torch.randn(D, D, generator=gen, dtype=torch.float64)
    y = torch.randn(n + 17, D, generator=gen, dtype=torch.float64) @ a + 3.0
    return GaussianBaseline.fit(y[:n]), y[n:]


# ---------------------------------------------------------------------------------------------
# The whitened start is the closed-form Gaussian
# ---------------------------------------------------------------------------------------------


def test_whitened_standard_normal_is_the_gaussian_baseline() -> None:
    g, y = _gaussian()
    model = WhitenedDensity(StandardNormal(), g.whitening())
    assert model.mean.dtype == torch.float64 and model.dim == 6
    assert torch.allclose(model.log_prob(y), g.log_prob(y), rtol=1e-12, atol=1e-10)
    assert list(dict(model.named_parameters())) == []  # the map is fixed


@pytest.mark.parametrize("init", ["identity", "default"])
@pytest.mark.parametrize("name", ["maf", "nsf", "realnvp"])
def test_whitened_identity_zuko_flow_is_the_gaussian_baseline(race, name: str, init: str) -> None:
    pytest.importorskip("zuko")
    g, y = _gaussian()
    args = race.parse_args([f"--{name}-transforms", "2", f"--{name}-hidden", "8", "--zuko-init", init])
    torch.manual_seed(0)
    density, _, note = race.zuko_flow(name, args, 6)
    model = WhitenedDensity(density.double(), g.whitening())
    assert model.inv_sqrt.dtype == torch.float64
    close = torch.allclose(model.log_prob(y), g.log_prob(y), rtol=1e-12, atol=1e-10)
    # zero readouts: shift 0, log-scale 0, equal spline bins with unit slopes: the identity flow
    assert close == (init == "identity") and ("identity init" in note) == (init == "identity")
    if init == "identity":
        assert race.identity_init(density) == 2


def test_whitened_density_equals_affine_flow_for_the_ma_flow() -> None:
    g, y = _gaussian(D=16)
    cfg = MNIST_PAPER.replace(hidden=8, n_steps=3, step_size=0.3, dtype="float64", init_scale=0.1)
    torch.manual_seed(0)
    flow = build_flow(cfg, 16, (4, 4))
    w = g.whitening()
    assert torch.equal(WhitenedDensity(flow, w).log_prob(y), AffineFlow(flow, w).log_prob(y))


def test_whitened_density_bad_input() -> None:
    g, _ = _gaussian()
    with pytest.raises(TypeError, match="log_prob"):
        WhitenedDensity(nn.Linear(6, 6), g.whitening())
    w = g.whitening()
    with pytest.raises(ValueError, match=r"inv_sqrt must be a tensor of shape \(6, 6\)"):
        WhitenedDensity(StandardNormal(), w._replace(inv_sqrt=w.inv_sqrt[:5]))


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------


def test_flags_reach_the_settings_and_models(race, data_dir: Path) -> None:
    args = race.parse_args(["--minutes", "2.5", "--threads", "3", "--batch", "64", "--seed", "9", "--eval-seed", "4",
                            "--eval-every", "30", "--val-images", "500", "--dtype", "float64", "--n-train", "100",
                            "--ma-potential", "conv", "--ma-channels", "4", "--ma-kernel-size", "3",
                            "--ma-activation", "tanh", "--ma-init-scale", "0", "--ma-steps", "7",
                            "--ma-step-size", "0.25", "--ma-lr", "2e-3", "--ma-grad-checkpoint",
                            "--maf-hidden", "12", "--maf-layers", "2", "--maf-transforms", "3", "--maf-lr", "3e-4",
                            "--start", "normal", "--tag", "x"])
    s = race.settings_from_args(args)
    assert (s.minutes, s.threads, s.batch, s.seed, s.eval_seed, s.eval_every, s.val_images, s.dtype, s.n_train) == \
        (2.5, 3, 64, 9, 4, 30.0, 500, "float64", 100)
    assert s.budget_seconds == 150.0 and s.torch_dtype == torch.float64
    cfg = race.ma_config(args)
    assert (cfg.potential, cfg.channels, cfg.kernel_size, cfg.activation, cfg.init_scale, cfg.n_steps,
            cfg.step_size, cfg.lr, cfg.grad_checkpoint, cfg.whiten, cfg.batch, cfg.eval_seed, cfg.dtype) == \
        ("conv", 4, 3, "tanh", 0.0, 7, 0.25, 2e-3, True, False, 64, 4, "float64")
    assert race._default_out(args) == race.DEFAULT_ROOT / "normal_2.5min_x"
    defaults = race.parse_args([])
    assert (defaults.ma_hidden, defaults.ma_n_steps, defaults.ma_step_size, defaults.ma_lr) == (256, 20, 0.5, 1e-3)
    site = race.ma_config(race.parse_args(["--ma-potential", "mlp+sitewise", "--ma-sitewise-units", "5"]))
    assert (site.potential, site.sitewise_units) == ("mlp+sitewise", 5)
    assert (defaults.maf_transforms, defaults.maf_hidden, defaults.maf_layers, defaults.maf_lr) == (5, 1024, 1, 1e-4)
    assert defaults.threads == 1 and defaults.batch == 100 and defaults.start == "whitened"
    if importlib.util.find_spec("zuko"):
        density, lr, note = race.zuko_flow("maf", args, 64)
        widths = sorted({m.weight.shape[0] for m in _linears(density)})
        assert 12 in widths and lr == 3e-4 and "3 MADEs of 2x12" in note
        assert len(density.flow.transform.transforms) == 3


@pytest.mark.parametrize("flag", [["--minutes", "0"], ["--minutes", "-1"], ["--threads", "0"], ["--val-images", "1"],
                                  ["--eval-every", "0"], ["--only", "glow"], ["--start", "sideways"]])
def test_bad_flags_are_argparse_errors(race, flag: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as err:
        race.parse_args(flag)
    assert err.value.code == 2 and "error:" in capsys.readouterr().err


def test_missing_data_is_one_error_line(race, tmp_path: Path, capsys) -> None:
    code = race.cli(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--only", "gaussian"])
    err = capsys.readouterr().err
    # the driver's message: one error line, then where it looked and how to get the files; no traceback
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert err.startswith("python benchmarks/mnist_race.py: error: MNIST IDX files not found")
    assert str(tmp_path / "nowhere") in err and "--download" in err


def test_corrupt_data_is_one_error_line(race, data_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in data_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 9)
    code = race.cli(["--data-dir", str(bad), "--out", str(tmp_path / "out"), "--only", "gaussian"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err and "t10k-images" in err


# ---------------------------------------------------------------------------------------------
# The race
# ---------------------------------------------------------------------------------------------


def test_tiny_race_writes_finite_results_within_budget(whitened_race) -> None:
    out, summary = whitened_race
    for name in ("curves.csv", "results.csv", "results.json", "table.md", "curves.png", "curves.pdf"):
        assert (out / name).is_file(), name
    res = pd.read_csv(out / "results.csv").set_index("model")
    cur = pd.read_csv(out / "curves.csv")
    budget = 0.02 * 60
    trained = [m for m in ("maf", "ma") if m in res.index]
    assert res.loc["gaussian", "start"] == "closed form"
    for m in trained:
        r = res.loc[m]
        assert r["start"] == "whitened" and r["status"] == "budget"
        for key in ("test_nll", "stderr", "bpd", "bpd_stderr"):
            assert math.isfinite(r[key]) and (key in ("test_nll", "bpd") or r[key] > 0), (m, key)
        assert r["steps"] > 0 and r["params"] > 0
        # the budget counts training only; one last step may overshoot it, by far less than a second
        assert budget <= r["train_seconds"] < budget + 0.5
        c = cur[cur["model"] == m]
        assert c["train_seconds"].iloc[0] == 0 and c["steps"].iloc[0] == 0 and len(c) >= 3
        assert c["train_seconds"].is_monotonic_increasing and (c["val_nll_stderr"] > 0).all()
        assert c["train_seconds"].iloc[-1] == r["train_seconds"] and c["steps"].iloc[-1] == r["steps"]
        assert 40 * r["steps"] <= r["images"] <= 50 * r["steps"]  # 240 images: batches of 50, 50, 50, 50, 40
    # the MA flow is evaluated again at twice the steps of half the size: paired difference and its error
    ma = res.loc["ma"]
    assert math.isfinite(ma["half_step_nll"]) and ma["half_step_diff_stderr"] >= 0
    assert ma["half_step_diff"] == pytest.approx(ma["half_step_nll"] - ma["test_nll"], abs=1e-9)
    for m in ("maf",) if "maf" in res.index else ():
        assert pd.isna(res.loc[m, "half_step_nll"])
    # the whitened start is the Gaussian: the MA flow (near-identity at init) starts at its validation NLL
    g = cur[cur["model"] == "gaussian"]["val_nll"].iloc[0]
    assert cur[cur["model"] == "ma"]["val_nll"].iloc[0] == pytest.approx(g, abs=0.05)
    meta = json.loads((out / "results.json").read_text())
    assert meta["threads"] == 1 and meta["torch"] == torch.__version__ and len(meta["load_average_start"]) == 3
    assert meta["settings"]["minutes"] == 0.02 and "--minutes" in meta["argv"]
    assert meta["data"]["train"] == N_TRAIN - N_VALIDATION and meta["data"]["test"] == N_TEST
    assert "| ma |" in (out / "table.md").read_text() and "MA flow | 1255.5" in (out / "table.md").read_text()
    assert len(summary["results"]) == len(res)


def test_occupied_out_is_refused(race, whitened_race, capsys) -> None:
    out, _ = whitened_race
    before = (out / "results.csv").read_bytes()
    code = race.cli(["--out", str(out), "--only", "gaussian", "--data-dir", str(out / "unused")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) >= 1 and "error:" in err[-1] and "--force" in err[-1] and str(out) in err[-1]
    assert (out / "results.csv").read_bytes() == before


def test_divergence_is_recorded_and_scored_at_the_last_finite_state(race) -> None:
    class Diverging(nn.Module):
        """A Gaussian with a learnable shift whose loss turns NaN after 3 steps."""

        def __init__(self) -> None:
            super().__init__()
            self.shift = nn.Parameter(torch.zeros(4, dtype=torch.float64))
            self.calls = 0

        def log_prob(self, y: Tensor) -> Tensor:
            if self.training:
                self.calls += 1
                if self.calls > 3:
                    return torch.full(y.shape[:1], math.nan, dtype=y.dtype)
            return standard_normal_log_prob(y - self.shift)

    pixels = torch.randint(0, 256, (40, 4), dtype=torch.uint8)
    y = torch.randn(10, 4, dtype=torch.float64)
    settings = race.RaceSettings(minutes=1.0, eval_every=1e-9, batch=10, dtype="float64")
    entrant = race.Entrant("toy", "toy", "normal", Diverging(), 0.1, "toy")
    lines: list[str] = []
    outcome = race.train(entrant, pixels, race.EvalSet(y, torch.zeros(10, dtype=torch.float64)), settings,
                         say=lines.append)
    assert outcome.status.startswith("diverged") and outcome.steps == 3 and len(outcome.curve) == 4
    assert outcome.train_seconds < 60 and any("diverged" in line for line in lines)
    # the state scored is that of the last finite evaluation (after step 3)
    assert torch.isfinite(entrant.density.shift).all() and entrant.density.shift.abs().sum() > 0


def test_missing_zuko_skips_its_rows_only(race, data_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "zuko", None)  # import zuko now raises ImportError
    out = tmp_path / "nozuko"
    race.main(["--data-dir", str(data_dir), "--out", str(out), "--only", "gaussian", "maf", "nsf", "--no-plot",
               *TINY])
    text = capsys.readouterr().out
    assert "skipping maf, nsf: zuko is not installed; pip install -e '.[bench]'" in text
    assert list(pd.read_csv(out / "results.csv")["model"]) == ["gaussian"]


def test_merge_combines_races(race, whitened_race, data_dir: Path, tmp_path: Path, capsys) -> None:
    first, _ = whitened_race
    second = tmp_path / "normal"
    race.main(["--data-dir", str(data_dir), "--out", str(second), "--minutes", "0.005", "--eval-every", "1",
               "--start", "normal", "--only", "gaussian", "ma", "--no-plot", *TINY])
    capsys.readouterr()
    merged = tmp_path / "merged"
    race.main(["--merge", str(first), str(second), "--out", str(merged)])
    text = capsys.readouterr().out
    res = pd.read_csv(merged / "results.csv")
    pairs = set(zip(res["model"], res["start"]))
    assert ("gaussian", "closed form") in pairs and ("ma", "whitened") in pairs and ("ma", "normal") in pairs
    assert (res["model"] == "gaussian").sum() == 1  # the same closed form in both races, kept once
    cur = pd.read_csv(merged / "curves.csv")
    assert set(zip(cur["model"], cur["start"])) == pairs
    assert (merged / "curves.png").is_file()
    # the printed table is sorted by test NLL, with the paper's Table 1 below
    rows = [line for line in text.split("Paper Table 1")[0].splitlines() if line.startswith("| ")][1:]  # no header
    nlls = [float(line.split("|")[6].split("±")[0]) for line in rows]
    assert len(nlls) == len(res)
    assert nlls == sorted(nlls) and "| MA flow | 1255.5 ± 2.0 |" in text
    # the same trained row twice, and races with different data, are refused
    with pytest.raises(ValueError, match=r"ma \(whitened\).*--tag"):
        race.merge([first, first], tmp_path / "twice")
    meta = json.loads((second / "results.json").read_text())
    meta["settings"]["eval_seed"] = 99
    (second / "results.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="eval_seed differs"):
        race.merge([first, second], tmp_path / "other")

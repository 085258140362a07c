"""Tests of MNIST training (latticeflow.mnist: config, model, trainer) and its driver models/mnist.py,
on tiny IDX files (8x8 images, h=16, 4 RK4 steps)."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm

import latticeflow.mnist as lfm
import models.mnist as mm
from latticeflow.checkpoint import load_checkpoint, save_checkpoint
from latticeflow.flow import Flow, standard_normal_log_prob
from latticeflow.mnist import AffineFlow, DensityTrainer, MNISTConfig
from mnist_helpers import write_mnist

D = 64  # 8x8 images
N_TRAIN, N_TEST, N_VALIDATION = 200, 50, 50


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("mnist_tiny"), N_TRAIN, N_TEST, seed=7)


def _argv(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data_dir), "--n-validation", str(N_VALIDATION), "--hidden", "16", "--n-steps", "4",
            "--step-size", "0.5", "--batch", "50", "--eval-batch", "20", "--lr", "3e-3", "--dtype", "float64",
            "--out", str(out), "--quiet", *extra]


def _config(**kw: object) -> MNISTConfig:
    return lfm.MNIST_PAPER.replace(**{"n_validation": N_VALIDATION, "hidden": 16, "n_steps": 4, "step_size": 0.5,
                                      "batch": 50, "eval_batch": 20, "lr": 3e-3, "dtype": "float64", **kw})


def _trainer(data_dir: Path, out: Path | None = None, **kw: object) -> DensityTrainer:
    cfg = _config(**kw)
    return lfm.make_trainer(cfg, lfm.load_data(data_dir, cfg), "cpu", out, progress=False)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def test_two_epoch_run_writes_log_checkpoints_and_figures(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = mm.main(_argv(data_dir, out, "--epochs", "2", "--n-samples", "12"))
    for name in ("log.csv", "checkpoint.pt", "best.pt", "config.json", "summary.json"):
        assert (out / name).is_file(), name
    for fig in ("samples", "gaussianization", "nll"):
        assert (out / f"{fig}.png").stat().st_size > 1000 and (out / f"{fig}.pdf").is_file(), fig
    log = pd.read_csv(out / "log.csv")
    assert list(log["epoch"]) == [1, 2]
    assert (log["train_images"] == N_TRAIN - N_VALIDATION).all()
    assert (log["validation_images"] == N_VALIDATION).all() and (log["test_images"] == N_TEST).all()
    for s in ("train", "validation", "test"):
        assert (log[f"{s}_nll_stderr"] > 0).all() and (log[f"{s}_bpd_stderr"] > 0).all()
    assert (log["loss"] == log["train_nll"]).all()
    # training lowers the NLL from the near-identity start
    assert log["train_nll"].iloc[1] < log["train_nll"].iloc[0]
    best = int(log["validation_nll"].idxmin())
    assert summary["best_epoch"] == best + 1
    assert summary["test_nll"] == log["test_nll"].iloc[best] and summary["test_bpd"] == log["test_bpd"].iloc[best]
    # re-evaluating best.pt in a fresh model reproduces the logged numbers of the best epoch
    fresh = _trainer(data_dir)
    fresh.flow.load_state_dict(load_checkpoint(out / "best.pt")["model"])
    for name in ("test", "validation"):
        stats = fresh.evaluate(name)
        for key in ("nll", "nll_stderr", "bpd", "bpd_stderr"):
            assert stats[key] == pytest.approx(log[f"{name}_{key}"].iloc[best], rel=1e-12), (name, key)
    assert json.loads((out / "summary.json").read_text())["test_nll"] == pytest.approx(summary["test_nll"])
    assert load_checkpoint(out / "best.pt")["epoch"] == best + 1
    assert json.loads((out / "config.json").read_text())["hidden"] == 16


def test_resume_reproduces_an_uninterrupted_run(data_dir: Path, tmp_path: Path) -> None:
    mm.main(_argv(data_dir, tmp_path / "a", "--epochs", "3", "--no-plot"))
    mm.main(_argv(data_dir, tmp_path / "b", "--epochs", "1", "--no-plot"))
    mm.main(_argv(data_dir, tmp_path / "b", "--epochs", "3", "--no-plot", "--resume", str(tmp_path / "b" / "checkpoint.pt")))
    timing = ["wall_time", "train_seconds"]
    a = pd.read_csv(tmp_path / "a" / "log.csv").drop(columns=timing)
    b = pd.read_csv(tmp_path / "b" / "log.csv").drop(columns=timing)
    assert len(a) == 3
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    sa, sb = (load_checkpoint(tmp_path / r / "checkpoint.pt")["model"] for r in "ab")
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_refuses_a_conflicting_model_flag(data_dir: Path, tmp_path: Path) -> None:
    mm.main(_argv(data_dir, tmp_path, "--epochs", "1", "--no-plot"))
    argv = _argv(data_dir, tmp_path, "--epochs", "2", "--no-plot", "--resume", str(tmp_path / "checkpoint.pt"))
    argv[argv.index("--hidden") + 1] = "32"
    with pytest.raises(ValueError, match=r"--hidden 32 \(checkpoint: 16\)"):
        mm.main(argv)


# ---------------------------------------------------------------------------------------------
# Likelihoods against closed forms
# ---------------------------------------------------------------------------------------------


def test_identity_flow_gives_the_gaussian_log_density_and_bits_per_dim(data_dir: Path) -> None:
    # init_scale=0: w = 0, so φ = 0, the flow is the identity and ln p_Y(y) = ln N(y; 0, I) exactly
    trainer = _trainer(data_dir, init_scale=0.0)
    y, log_det = trainer.eval_sets["test"].fixed()
    logp, log_det2 = trainer.log_prob_set("test")
    expected = norm.logpdf(y.numpy()).sum(1)
    np.testing.assert_allclose(logp.numpy(), expected, rtol=1e-13)
    assert torch.equal(log_det, log_det2)
    # logit Jacobian: sum_i log((1 - 2 lam) / (s_i (1 - s_i))) with s = sigmoid(y)
    s = 1.0 / (1.0 + np.exp(-y.numpy()))
    lam = lfm.LAMBDA
    np.testing.assert_allclose(log_det.numpy(), np.log((1 - 2 * lam) / (s * (1 - s))).sum(1), rtol=1e-9)
    stats = trainer.evaluate("test")
    nll = -expected
    assert stats["images"] == N_TEST
    assert stats["nll"] == pytest.approx(nll.mean(), rel=1e-13)
    assert stats["nll_stderr"] == pytest.approx(nll.std(ddof=1) / math.sqrt(N_TEST), rel=1e-9)
    bpd = 8.0 - (expected + log_det.numpy()) / (D * math.log(2.0))  # bits per pixel value 0..255
    assert stats["bpd"] == pytest.approx(bpd.mean(), rel=1e-13)
    assert stats["bpd_stderr"] == pytest.approx(bpd.std(ddof=1) / math.sqrt(N_TEST), rel=1e-9)


def test_driver_log_prob_equals_the_flows(data_dir: Path) -> None:
    trainer = _trainer(data_dir, init_scale=0.3)  # a non-trivial flow
    y, _ = trainer.eval_sets["validation"].fixed()
    direct = trainer.flow.log_prob(y).detach()
    assert not torch.allclose(direct, standard_normal_log_prob(y))  # really not the identity
    batched = lfm.log_prob(trainer.flow, y, batch_size=7)  # uneven batches
    torch.testing.assert_close(batched, direct, rtol=1e-12, atol=1e-9)
    logp, _ = trainer.log_prob_set("validation")
    torch.testing.assert_close(logp, direct, rtol=1e-12, atol=1e-9)
    assert trainer.evaluate("validation")["nll"] == pytest.approx(-direct.mean().item(), rel=1e-12)


def test_logged_bits_per_dim_follow_from_the_logged_nats(data_dir: Path, tmp_path: Path) -> None:
    # per image bpd = 8 - (logp + log_det)/(D ln 2) is affine in logp, so the means obey
    # bpd = 8 - (-nll + mean(log_det))/(D ln 2) with the fixed noise's mean log_det
    mm.main(_argv(data_dir, tmp_path, "--epochs", "2", "--no-plot"))
    log = pd.read_csv(tmp_path / "log.csv")
    trainer = _trainer(data_dir)
    for name in ("validation", "test"):
        mean_log_det = trainer.eval_sets[name].fixed()[1].mean().item()
        expected = 8.0 - (-log[f"{name}_nll"] + mean_log_det) / (D * math.log(2.0))
        np.testing.assert_allclose(log[f"{name}_bpd"], expected, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# --whiten: the Gaussian baseline's whitening in front of the flow
# ---------------------------------------------------------------------------------------------


def _baseline(trainer: DensityTrainer) -> lfm.GaussianBaseline:
    """The Gaussian baseline as benchmarks/mnist_race.py fits it: training noise seed eval_seed."""
    train_y, _ = lfm.DequantizedBatches(trainer.data.train, seed=trainer.config["eval_seed"],
                                                dtype=torch.float64).fixed()
    return lfm.GaussianBaseline.fit(train_y)


def test_gaussian_baseline_whitening_is_the_symmetric_inverse_square_root(data_dir: Path) -> None:
    g = _baseline(_trainer(data_dir))
    w = g.whitening()
    eye = torch.eye(D, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in w) and w.log_det.shape == ()
    assert torch.equal(w.inv_sqrt, w.inv_sqrt.T) and torch.equal(w.sqrt, w.sqrt.T) and torch.equal(w.mean, g.mean)
    torch.testing.assert_close(w.inv_sqrt @ g.covariance @ w.inv_sqrt, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(w.sqrt @ w.sqrt, g.covariance, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w.inv_sqrt @ w.sqrt, eye, rtol=0, atol=1e-10)
    assert w.log_det.item() == pytest.approx(torch.linalg.slogdet(w.inv_sqrt)[1].item(), rel=1e-12)
    assert w.log_det.item() == pytest.approx(-0.5 * torch.linalg.slogdet(g.covariance)[1].item(), rel=1e-12)
    # a singular covariance: the floor keeps the map invertible and log_det is that of the clamped map
    v = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    singular = lfm.GaussianBaseline.__new__(lfm.GaussianBaseline)
    singular.mean, singular.covariance = torch.zeros(4, dtype=torch.float64), v @ torch.diag(
        torch.tensor([4.0, 1.0, 0.0, -1e-17], dtype=torch.float64)) @ v.T
    ws = singular.whitening(floor=1e-6)
    lam = torch.linalg.eigvalsh(ws.sqrt @ ws.sqrt)
    torch.testing.assert_close(lam, torch.tensor([4e-6, 4e-6, 1.0, 4.0], dtype=torch.float64), rtol=1e-8, atol=0)
    assert ws.log_det.item() == pytest.approx(-0.5 * math.log(4e-6 * 4e-6 * 1.0 * 4.0), rel=1e-12)
    with pytest.raises(ValueError, match="floor must be a number in"):
        g.whitening(floor=0.0)


def test_whitened_identity_flow_is_the_gaussian_baseline(data_dir: Path) -> None:
    # init_scale=0: the flow is the identity, so the whitened model is N(mu, Sigma), the baseline
    trainer = _trainer(data_dir, whiten=True, init_scale=0.0)
    assert isinstance(trainer.flow, AffineFlow)
    baseline = _baseline(trainer)
    for name in ("test", "validation"):
        y, log_det = trainer.eval_sets[name].fixed()  # the driver's fixed noise (eval_seed + 2 for test)
        expected = baseline.log_prob(y)
        logp, _ = trainer.log_prob_set(name)
        torch.testing.assert_close(logp, expected, rtol=1e-12, atol=1e-10)
        stats = trainer.evaluate(name)
        assert stats["nll"] == pytest.approx(-expected.mean().item(), rel=1e-12)
        assert stats["nll_stderr"] == pytest.approx(expected.std().item() / math.sqrt(len(y)), rel=1e-9)
        bpd = lfm.nll_logit_to_bits_per_dim(expected, log_det, D)
        assert stats["bpd"] == pytest.approx(bpd.mean().item(), rel=1e-12)
    # far better than the unwhitened identity flow's N(0, I) on the same images
    plain = _trainer(data_dir, init_scale=0.0)
    assert plain.evaluate("test")["nll"] > 5 * trainer.evaluate("test")["nll"]


def test_whitened_log_prob_is_the_flows_at_the_whitened_point_plus_the_log_det(data_dir: Path) -> None:
    trainer = _trainer(data_dir, whiten=True, init_scale=0.3)  # a non-trivial flow
    model = trainer.flow
    w = _baseline(trainer).whitening()
    for name in ("mean", "inv_sqrt", "sqrt", "log_det"):
        torch.testing.assert_close(getattr(model, name), getattr(w, name), rtol=0, atol=0)
        assert name in model.state_dict()
    y, _ = trainer.eval_sets["validation"].fixed()
    y_white = (y - w.mean) @ w.inv_sqrt
    expected = model.flow.log_prob(y_white).detach() + w.log_det
    assert not torch.allclose(model.flow.log_prob(y_white), standard_normal_log_prob(y_white))
    torch.testing.assert_close(model.log_prob(y).detach(), expected, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(lfm.log_prob(model, y, batch_size=7), expected, rtol=1e-12, atol=1e-10)
    assert trainer.evaluate("validation")["nll"] == pytest.approx(-expected.mean().item(), rel=1e-12)
    # the constant is log|det dy'/dy| of the affine map, by autograd
    jac = torch.autograd.functional.jacobian(lambda v: model.whiten(v[None])[0], y[0])
    assert torch.linalg.slogdet(jac)[1].item() == pytest.approx(model.log_det.item(), rel=1e-12)
    torch.testing.assert_close(model.unwhiten(model.whiten(y)), y, rtol=0, atol=1e-10)
    # gradients reach the flow's parameters through the whitening
    model.zero_grad()
    (-model(y).mean()).backward()
    readout = model.flow.potential.readout
    assert readout.grad is not None and readout.grad.abs().sum() > 0
    # samples: the flow's, mapped back by y = Sigma^{1/2} y' + mu, with log p shifted by the constant
    x, logp = model.sample(6, generator=torch.Generator().manual_seed(3))
    x_flow, logp_flow = model.flow.sample(6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, x_flow @ w.sqrt + w.mean, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(logp, logp_flow + w.log_det, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(model.log_prob(x).detach(), logp.detach(), rtol=0, atol=1e-6)
    # the Gaussianisation frames run in whitened space and are shown in data coordinates
    _, frames = lfm.gaussianization_frames(model, y[:3], n_times=3)
    torch.testing.assert_close(frames[0], y[:3])
    z, _ = model.flow.inverse_map(y_white[:3])
    torch.testing.assert_close(frames[-1], z @ w.sqrt + w.mean, rtol=0, atol=1e-10)


def test_affine_flow_implements_the_flow_interface(data_dir: Path) -> None:
    # the whitening is a composable map in front of any flow, not a list of re-exported settings
    model = _trainer(data_dir, whiten=True, init_scale=0.3).flow
    assert isinstance(model, Flow) and isinstance(model.flow, Flow)
    assert (model.dim, model.n_steps, model.dtype, model.device, model.stochastic) == (
        D, 4, torch.float64, torch.device("cpu"), False)
    assert model.draw_noise(3) is None and lfm.inner_flow(model) is model.flow
    with torch.no_grad():
        z = torch.randn(5, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        y, dlogp = model.forward_map(z)
        z_back, dlogp_back = model.inverse_map(y)
        y_flow, dlogp_flow = model.flow.forward_map(z)
        # forward: y = A⁻¹(flow(z)), ln p(y) − ln N(z) = the flow's change + ln|det Σ^{-1/2}|
        torch.testing.assert_close(y, model.unwhiten(y_flow), rtol=0, atol=1e-12)
        torch.testing.assert_close(dlogp, dlogp_flow + model.log_det, rtol=0, atol=1e-12)
        # a round trip returns the input, and the two changes of ln p cancel
        torch.testing.assert_close(z_back, z, rtol=0, atol=1e-8)
        torch.testing.assert_close(dlogp_back, -dlogp, rtol=0, atol=1e-8)
        torch.testing.assert_close(model.log_prob(y), standard_normal_log_prob(z) + dlogp, rtol=0, atol=1e-8)
    # the callback sees the path in data coordinates: its last state is A⁻¹(z)
    seen: list[torch.Tensor] = []
    model.inverse_map(y, callback=lambda k, t, x, d: seen.append(x))
    assert len(seen) == 4
    torch.testing.assert_close(seen[-1], model.unwhiten(z_back), rtol=0, atol=1e-12)


def test_old_whitened_checkpoint_keys_load(data_dir: Path) -> None:
    # regression: the affine model was WhitenedFlow with the inner flow under "flow."; checkpoints keep those keys
    model = _trainer(data_dir, whiten=True).flow
    keys = set(model.state_dict())
    assert {"mean", "inv_sqrt", "sqrt", "log_det"} <= keys
    assert {k for k in keys if k not in ("mean", "inv_sqrt", "sqrt", "log_det")} == {
        f"flow.{k}" for k in model.flow.state_dict()}


def test_a_checkpoint_with_the_old_name_layers_resumes(data_dir: Path, tmp_path: Path) -> None:
    # regression: the conv setting "layers" became "conv_layers"; checkpoints written before keep "layers"
    mm.main(_argv(data_dir, tmp_path, "--epochs", "1", "--no-plot"))
    path = tmp_path / "checkpoint.pt"
    state = load_checkpoint(path)
    state["config"] = {("layers" if k == "conv_layers" else k): v for k, v in state["config"].items()}
    save_checkpoint(state, path)
    assert MNISTConfig.from_dict(state["config"]).conv_layers == 1
    summary = mm.main(_argv(data_dir, tmp_path, "--epochs", "2", "--no-plot", "--resume", str(path)))
    assert summary["epochs"] == 2 and load_checkpoint(path)["config"]["conv_layers"] == 1
    with pytest.raises(ValueError, match=r"--conv-layers 2 \(checkpoint: 1\)"):
        mm.main(_argv(data_dir, tmp_path, "--epochs", "3", "--no-plot", "--layers", "2", "--resume", str(path)))


def test_whitened_training_lowers_the_validation_nll(data_dir: Path, tmp_path: Path) -> None:
    trainer = _trainer(data_dir, tmp_path, whiten=True)
    start = trainer.evaluate("validation")["nll"]  # epoch 0: the (near-)Gaussian baseline
    log = trainer.fit(2)
    assert log["validation_nll"].iloc[-1] < log["validation_nll"].iloc[0] < start
    # training moved the flow, never the fixed whitening
    w = _baseline(trainer).whitening()
    assert torch.equal(trainer.flow.inv_sqrt, w.inv_sqrt) and torch.equal(trainer.flow.mean, w.mean)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["config"]["whiten"] is True and torch.equal(saved["model"]["inv_sqrt"], w.inv_sqrt)


def test_whitened_resume_reproduces_an_uninterrupted_run_and_draws_the_figures(data_dir: Path, tmp_path: Path) -> None:
    mm.main(_argv(data_dir, tmp_path / "a", "--whiten", "--epochs", "3", "--no-plot"))
    mm.main(_argv(data_dir, tmp_path / "b", "--whiten", "--epochs", "1", "--no-plot"))
    # the resumed run takes --whiten from the checkpoint and its buffers too (no refit)
    mm.main(_argv(data_dir, tmp_path / "b", "--epochs", "3", "--n-samples", "4",
                  "--resume", str(tmp_path / "b" / "checkpoint.pt")))
    timing = ["wall_time", "train_seconds"]
    a = pd.read_csv(tmp_path / "a" / "log.csv").drop(columns=timing)
    b = pd.read_csv(tmp_path / "b" / "log.csv").drop(columns=timing)
    assert len(a) == 3
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    sa, sb = (load_checkpoint(tmp_path / r / "checkpoint.pt")["model"] for r in "ab")
    assert {"mean", "inv_sqrt", "sqrt", "log_det"} <= set(sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert json.loads((tmp_path / "b" / "config.json").read_text())["whiten"] is True
    for fig in ("samples", "gaussianization", "nll"):
        assert (tmp_path / "b" / f"{fig}.png").stat().st_size > 1000, fig
    # best.pt holds the whitening too: a fresh whitened model reproduces the best epoch's test NLL
    fresh = _trainer(data_dir, whiten=True)
    fresh.flow.load_state_dict(load_checkpoint(tmp_path / "b" / "best.pt")["model"])
    best = int(b["validation_nll"].idxmin())
    assert fresh.evaluate("test")["nll"] == pytest.approx(b["test_nll"].iloc[best], rel=1e-12)


def test_whiten_is_off_by_default_and_fixed_on_resume(data_dir: Path) -> None:
    cfg = _config()
    assert cfg.whiten is False and mm.config_from_args(mm.parse_args([])).whiten is False
    data = lfm.load_data(data_dir, cfg)
    assert type(lfm.build_model(cfg, data)) is lfm.build_flow(cfg, D).__class__  # the paper's bare flow
    placeholder = lfm.build_model(cfg.replace(whiten=True), data, fit=False)
    assert torch.equal(placeholder.inv_sqrt, torch.eye(D, dtype=torch.float64)) and placeholder.log_det == 0
    with pytest.raises(ValueError, match=r"--whiten True \(checkpoint: False\)"):
        mm.config_from_args(mm.parse_args(["--whiten"]), base=cfg)
    assert mm.config_from_args(mm.parse_args([]), base=cfg.replace(whiten=True).to_dict()).whiten is True


# ---------------------------------------------------------------------------------------------
# Early stopping, interruption
# ---------------------------------------------------------------------------------------------


def test_early_stopping_on_a_rising_validation_curve(data_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    curve = [10.0, 8.0, 9.0, 9.5, 11.0, 12.0, 13.0, 14.0]  # minimum at epoch 2, then rising
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    real_evaluate = DensityTrainer.evaluate

    def scripted(self: DensityTrainer, name: str) -> dict[str, float]:
        stats = real_evaluate(self, name)
        if name == "validation":
            epoch = self.epoch + 1  # evaluated at the end of this epoch, before the counter moves
            snapshots[epoch] = {k: v.clone() for k, v in self.flow.state_dict().items()}
            stats["nll"] = curve[epoch - 1]
        return stats

    monkeypatch.setattr(DensityTrainer, "evaluate", scripted)
    trainer = _trainer(data_dir, tmp_path, patience=2)
    log = trainer.fit(8)
    assert list(log["validation_nll"]) == curve[:4]  # stopped 2 epochs after the best
    assert trainer.stop_reason == "early stopping" and trainer.best_epoch == 2
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 2 and best["validation_nll"] == 8.0
    for k, v in best["model"].items():
        assert torch.equal(v, snapshots[2][k]), k
    assert not torch.equal(snapshots[2]["potential.readout"], snapshots[4]["potential.readout"])
    # a resumed run that is already past its patience trains no further
    again = _trainer(data_dir, tmp_path, patience=2)
    again.load(tmp_path / "checkpoint.pt")
    assert len(again.fit(8)) == 4 and again.stop_reason == "early stopping"


def test_deadline_ends_the_epoch_after_one_minibatch(data_dir: Path) -> None:
    trainer = _trainer(data_dir)
    trainer.deadline = time.perf_counter() - 1.0
    record = trainer.run_epoch(0)
    assert record["train_images"] == 50  # one minibatch, then the budget check stops the epoch
    assert record["validation_images"] == N_VALIDATION and math.isfinite(record["test_nll"])


def test_non_finite_loss_stops_with_the_epoch_named_and_keeps_the_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    from latticeflow.train import TrainingDiverged

    trainer = _trainer(data_dir, tmp_path)
    trainer.fit(1)
    with torch.no_grad():
        trainer.flow.potential.readout[0] = float("nan")
    # regression: the message named epoch 1, the last good one, as the failing epoch
    with pytest.raises(TrainingDiverged, match=r"diverged at epoch 2 \(non-finite loss.*last good epoch 1"):
        trainer.fit(2)
    assert len(trainer.records) == 1
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["epoch"] == 1 and all(torch.isfinite(v).all() for v in saved["model"].values())


# ---------------------------------------------------------------------------------------------
# Pieces: Gaussianisation frames, conv potential, data, errors
# ---------------------------------------------------------------------------------------------


def test_gaussianization_frames_run_from_data_to_latent(data_dir: Path) -> None:
    trainer = _trainer(data_dir, init_scale=0.3, n_steps=10, step_size=0.2)
    y, _ = trainer.eval_sets["test"].fixed()
    times, frames = lfm.gaussianization_frames(trainer.flow, y[:5], n_times=6)
    assert times == pytest.approx([2.0, 1.6, 1.2, 0.8, 0.4, 0.0])
    assert frames.shape == (6, 5, D)
    torch.testing.assert_close(frames[0], y[:5])
    z, _ = trainer.flow.inverse_map(y[:5])
    torch.testing.assert_close(frames[-1], z.detach(), rtol=0, atol=1e-12)
    trainer.flow.n_steps = 4  # half-way snapshot: 2 of 4 steps
    z2, _ = trainer.flow.inverse_map(y[:5])
    _, f3 = lfm.gaussianization_frames(trainer.flow, y[:5], n_times=3)
    assert not torch.allclose(f3[1], f3[2])
    torch.testing.assert_close(f3[2], z2.detach(), rtol=0, atol=1e-12)


def test_conv_potential_option_trains(data_dir: Path, tmp_path: Path) -> None:
    cfg = _config(potential="conv", channels=4, kernel_size=3, init_scale=0.1)
    data = lfm.load_data(data_dir, cfg)
    flow = lfm.build_flow(cfg, data.dim, data.image_shape)
    assert type(flow.potential).__name__ == "ConvPotential" and flow.potential.L == 8
    summary = mm.main(_argv(data_dir, tmp_path, "--epochs", "1", "--no-plot", "--potential", "conv",
                            "--channels", "4", "--kernel-size", "3"))
    assert math.isfinite(summary["test_nll"])
    with pytest.raises(ValueError, match="square images"):
        lfm.build_flow(cfg, 60, (6, 10))


def test_subsets_and_split(data_dir: Path) -> None:
    data = lfm.load_data(data_dir, _config(n_train=30, n_eval=10))
    assert (len(data.train), len(data.validation), len(data.test)) == (30, 10, 10)
    assert data.image_shape == (8, 8) and data.train.dtype == torch.uint8
    full = lfm.load_data(data_dir, _config())
    assert torch.equal(data.train, full.train[:30]) and torch.equal(data.test, full.test[:10])
    assert (len(full.train), len(full.validation)) == (N_TRAIN - N_VALIDATION, N_VALIDATION)


def test_bad_data_dir_gives_the_data_modules_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="MNIST IDX files not found") as err:
        mm.main(["--data-dir", str(missing), "--out", str(tmp_path / "o")])
    assert str(missing) in str(err.value) and "--download" in str(err.value)
    # a user error: one line and exit status 2, as for a bad flag
    assert mm.cli(["--data-dir", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("python -m models.mnist: error: MNIST IDX files not found")


def test_default_data_dir_falls_back_to_the_shared_copy(data_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    monkeypatch.setattr(lfm.files, "default_data_dir", lambda: empty / "data")
    monkeypatch.setattr(lfm.files, "SHARED_DATA_DIR", data_dir)
    assert lfm.load_data(None, _config()).directory == data_dir
    monkeypatch.setattr(lfm.files, "SHARED_DATA_DIR", tmp_path / "no_shared")
    with pytest.raises(FileNotFoundError, match="(?s)MNIST IDX files not found.*Also looked in"):
        lfm.load_data(None, _config())


@pytest.mark.parametrize("bad, match", [
    ({"potential": "rnn"}, "potential must be one of 'mlp', 'conv', 'sitewise', 'mlp+sitewise', 'conv+sitewise'; got potential='rnn'"),
    ({"hidden": 0}, "hidden must be an integer >= 1, got hidden=0"),
    ({"step_size": -0.1}, "step_size must be a finite number > 0"),
    ({"dtype": "float16"}, "dtype must be one of"),
    ({"n_train": 1}, "n_train must be None"),
    ({"bogus": 1}, "unknown config key(s) 'bogus'"),
    ({"whiten": 1}, "whiten must be True or False, got whiten=1"),
])
def test_config_errors_quote_the_bad_value(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        lfm.build_flow({**lfm.MNIST_PAPER.to_dict(), **bad}, D)
    if "bogus" not in bad:  # the config itself checks on construction
        with pytest.raises(ValueError, match=re.escape(match)):
            lfm.MNIST_PAPER.replace(**bad)


def test_paper_defaults() -> None:
    args = mm.parse_args([])
    cfg = mm.config_from_args(args)
    assert cfg == lfm.MNIST_PAPER
    assert (cfg.potential, cfg.activation, cfg.hidden, cfg.n_steps, cfg.step_size, cfg.batch, cfg.lr,
            cfg.grad_checkpoint, cfg.patience) == ("mlp", "softplus", 1024, 100, 0.1, 100, 1e-3, True, 30)
    flow = lfm.build_flow(cfg, 784)
    assert flow.total_time == pytest.approx(10.0) and flow.checkpoint and flow.method == "rk4"
    assert mm.config_from_args(mm.parse_args(["--patience", "0", "--no-grad-checkpoint"])).patience is None


@pytest.mark.slow
@pytest.mark.parametrize("whiten", [[], ["--whiten"]], ids=["plain", "whiten"])
def test_two_process_data_parallel_run_equals_one_process(data_dir: Path, tmp_path: Path, whiten: list[str]) -> None:
    # global batch 50 = two ranks x 25: rank r takes every 2nd minibatch of 25, whose noise comes from
    # the same generator stream, and DDP averages the gradients, so the run is the single-process run;
    # with --whiten every rank fits the same whitening (and DDP broadcasts rank 0's buffers)
    import os
    import subprocess
    import sys

    repo = Path(mm.__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(repo / "models" / "mnist.py"), *_argv(data_dir, tmp_path / "ddp", "--epochs", "2", "--no-plot",
                                                      "--device", "cpu", *whiten)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the one-process run on one thread too, like each rank (OMP_NUM_THREADS=1): a BLAS/LAPACK call splits
    # its sums differently on another thread count, so the reference must not depend on this machine's cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mm.main(_argv(data_dir, tmp_path / "one", "--epochs", "2", "--no-plot", *whiten))
    finally:
        torch.set_num_threads(threads)
    timing = ["wall_time", "train_seconds"]
    a = pd.read_csv(tmp_path / "ddp" / "log.csv").drop(columns=timing)
    b = pd.read_csv(tmp_path / "one" / "log.csv").drop(columns=timing)
    # what still differs is the order of the batch sums: DDP averages two per-rank mean gradients over 25
    # images where the one process takes one mean over 50, a few ulps per gradient component, carried
    # through 6 Adam steps into NLLs of ~140 nats; the *_stderr columns, from the one-pass variance
    # (Σx² − (Σx)²/n), amplify that by mean²/variance ≈ 60. Measured: <= 1e-14 relative (1.4e-11 even with
    # the ranks forced onto other MKL/ATen kernels, SSE4.2/scalar instead of AVX-512); a DDP fault (wrong
    # shard, generators out of step) moves them by 1e-3 or more
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-10)
    if whiten:
        # rank 0 fits the whitening with the same code on the same images, but in another process, where MKL
        # may pick other kernels (CPU dispatch, memory alignment): not bitwise, but to float64 round-off.
        # eps = 2.2e-16, n = 150 training images, D = 64 pixels:
        #   mean = a sum of n terms in another order: |δμ| <= n·eps·max|y|, |y| <= ln((1 − λ)/λ) (logit space);
        #   Σ = YᵀY/n (sums of n products) and its eigh: relative backward error ‖δΣ‖/‖Σ‖ <~ (n + D)·eps;
        #   Σ^{±1/2} then move by <= max|f'|·‖δΣ‖ (f(λ) = λ^{±1/2}), i.e. relative to their norm by
        #   <= cond(Σ)·(n + D)·eps / 2, and log_det = −½ Σ ln λ_i by <= D·cond(Σ)·(n + D)·eps / 2.
        # The tolerances below drop the ½ (a factor 2 to spare). cond(Σ) ≈ 470 here: ~2e-11 relative,
        # against ~5e-15 measured between MKL's SSE4.2 and AVX-512 kernels; fitting on one rank's shard or
        # with another noise seed changes them by O(1)
        sa, sb = (load_checkpoint(tmp_path / r / "checkpoint.pt")["model"] for r in ("ddp", "one"))
        eps, n = torch.finfo(torch.float64).eps, N_TRAIN - N_VALIDATION
        root_lam = torch.linalg.eigvalsh(sb["sqrt"])  # λ(Σ)^{1/2}
        rel = float((root_lam.max() / root_lam.min()) ** 2) * (n + D) * eps
        atol = {"mean": n * eps * math.log((1 - lfm.LAMBDA) / lfm.LAMBDA),
                "inv_sqrt": rel * float(torch.linalg.matrix_norm(sb["inv_sqrt"], 2)),
                "sqrt": rel * float(torch.linalg.matrix_norm(sb["sqrt"], 2)),
                "log_det": D * rel}
        for k, tol in atol.items():
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=tol, msg=lambda m, k=k: f"{k}: {m}")

"""Training loop: exact resume, checkpoints, divergence, and the variational bound on a Gaussian."""

import copy
import math

import pandas as pd
import pytest
import torch

from latticeflow.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from latticeflow.train import TrainingDiverged, VariationalTrainer, cosine_schedule, kish_ess


class DiagonalGaussian(torch.nn.Module):
    """x = μ + e^s z: a reparametrised sampler with exact log density (a stand-in flow)."""

    def __init__(self, n):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
        self.log_s = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def sample(self, n, generator=None):
        z = torch.randn(n, self.mu.numel(), generator=generator, dtype=torch.float64)
        x = self.mu + self.log_s.exp() * z
        logp = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi) - self.log_s).sum(1)
        return x, logp


class GaussianTarget:
    """E(x) = ½ Σ (x − 1)² / σ², ln Z = N ln(σ √(2π))."""

    def __init__(self, n, sigma=0.5, poison_after=None):
        self.N, self.sigma, self.calls, self.poison_after = n, sigma, 0, poison_after

    def energy(self, x):
        self.calls += 1
        e = 0.5 * ((x - 1) ** 2).sum(1) / self.sigma**2
        if self.poison_after is not None and self.calls > self.poison_after:
            e = e * float("nan")
        return e


def _trainer(tmp_path, target=None, epochs=40, **kw):
    torch.manual_seed(0)
    flow = DiagonalGaussian(3)
    opt = torch.optim.Adam(flow.parameters(), lr=0.05)
    return VariationalTrainer(flow, target or GaussianTarget(3), opt, batch_size=32, out_dir=tmp_path,
                              scheduler=cosine_schedule(opt, epochs, warmup=3), progress=False,
                              generator=torch.Generator().manual_seed(1), checkpoint_every=5, **kw)


def test_converges_to_exact_free_energy_and_bound(tmp_path):
    tr = _trainer(tmp_path, epochs=400)
    log = tr.fit(400)
    exact = -math.log(0.5 * math.sqrt(2 * math.pi))  # −ln Z / N
    last = log.iloc[-20:]
    assert abs(last["free_energy"].mean() - exact) < 1e-3
    assert last["ess"].mean() > 0.99
    # the variational estimate is an upper bound: never below exact by more than 4 standard errors
    assert ((log["free_energy"] - exact) > -4 * log["stderr"] - 1e-12).all()
    assert (tmp_path / "log.csv").exists() and (tmp_path / "checkpoint.pt").exists()


def test_resume_is_exact(tmp_path):
    full = _trainer(tmp_path / "a").fit(40)
    part = _trainer(tmp_path / "b")
    part.fit(20)
    resumed = _trainer(tmp_path / "c")
    resumed.load(tmp_path / "b" / "checkpoint.pt")
    log = resumed.fit(40)
    cols = ["free_energy", "stderr", "ess", "lr"]
    torch.testing.assert_close(torch.tensor(log[cols].to_numpy()), torch.tensor(full[cols].to_numpy()),
                               rtol=0, atol=0)


def test_nan_stops_with_epoch_named_and_checkpoint_kept(tmp_path):
    # regression: the message named epoch 12, the last good one, as the failing epoch (13)
    tr = _trainer(tmp_path, target=GaussianTarget(3, poison_after=12))
    with pytest.raises(TrainingDiverged, match=r"diverged at epoch 13 \(non-finite loss.*last good epoch 12"):
        tr.fit(40)
    assert tr.stop_reason == "diverged"
    # the checkpoint holds the state after epoch 11, whose step produced epoch 12's good loss
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 11 and len(state["log"]) == 11
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert len(pd.read_csv(tmp_path / "log.csv")) == 12  # every good epoch


def test_nan_before_the_first_checkpoint_still_leaves_the_log(tmp_path):
    # regression: a NaN before the first checkpoint left no log at all
    tr = _trainer(tmp_path, target=GaussianTarget(3, poison_after=3))
    with pytest.raises(TrainingDiverged, match="diverged at epoch 4"):
        tr.fit(40)
    assert len(pd.read_csv(tmp_path / "log.csv")) == 3
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2


class BlowUpTarget(GaussianTarget):
    """The energy is multiplied by ``factor`` from call ``after`` on: a finite blow-up."""

    def __init__(self, n, after, factor):
        super().__init__(n)
        self.after, self.factor = after, factor

    def energy(self, x):
        e = super().energy(x)
        return e * self.factor if self.calls > self.after else e


@pytest.mark.parametrize("after, factor, rule", [(30, 1e6, "jumped above its range"), (2, 30.0, "rose above the first")])
def test_finite_blow_up_is_divergence(tmp_path, after, factor, rule):
    # regression: --lr 10 drove F/N to 2e20 and the run ended with exit status 0 and the diverged weights
    tr = _trainer(tmp_path, target=BlowUpTarget(3, after, factor), epochs=100)
    with pytest.raises(TrainingDiverged, match=f"diverged at epoch {after + 1} .*{rule}"):
        tr.fit(100)
    assert len(tr.records) <= after and pd.read_csv(tmp_path / "log.csv")["loss"].max() < 100


class OneBadEpochTarget(GaussianTarget):
    """The energy is multiplied by 1e6 on call ``at`` only: a transient blow-up."""

    def __init__(self, n, at):
        super().__init__(n)
        self.at = at

    def energy(self, x):
        e = super().energy(x)
        return e * 1e6 if self.calls == self.at else e


def test_a_transient_blow_up_is_rolled_back_and_training_goes_on(tmp_path, capsys):
    # regression (L=32 at the L=16 recipe): F/N jumped to 8e6, nothing stopped it, the diverged weights were saved
    tr = _trainer(tmp_path, target=OneBadEpochTarget(3, at=30), epochs=60, max_rollbacks=2)
    lr_before = None
    log = tr.fit(60)
    assert tr.stop_reason == "epochs" and len(log) == 60 and log["epoch"].tolist() == list(range(1, 61))
    assert len(tr.rollbacks) == 1
    rb = tr.rollbacks[0]
    # epoch 30 blew up: back to the state after epoch 28, whose step produced epoch 29's good loss
    assert rb["epoch"] == 30 and rb["back_to"] == 28 and rb["lr_factor"] == 0.5 and "jumped" in rb["reason"]
    assert log["loss"].max() < 100 and log["rollbacks"].iloc[-1] == 1 and log["rollbacks"].iloc[27] == 0
    assert "rollback 1 of 2: epoch 30 diverged" in capsys.readouterr().out
    # the learning rate is halved from there on: the same schedule step gives half the rate
    ref = _trainer(tmp_path / "ref", epochs=60)
    ref_log = ref.fit(60)
    assert log["lr"].iloc[40] == pytest.approx(0.5 * ref_log["lr"].iloc[40], rel=1e-12)
    assert lr_before is None
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["rollbacks"] == tr.rollbacks


def test_recovery_that_keeps_failing_stops_with_a_clear_message(tmp_path):
    tr = _trainer(tmp_path, target=BlowUpTarget(3, 30, 1e6), epochs=100, max_rollbacks=3)
    with pytest.raises(TrainingDiverged, match=r"after 3 rollback\(s\)"):
        tr.fit(100)
    assert len(tr.rollbacks) == 3 and tr.stop_reason == "diverged"
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "checkpoint.pt")["model"].values())


@pytest.mark.parametrize("bad", [{"max_rollbacks": -1}, {"max_rollbacks": 1.5}, {"rollback_lr_factor": 1.0},
                                 {"rollback_lr_factor": 0.0}])
def test_rollback_settings_are_checked(bad):
    flow = DiagonalGaussian(3)
    with pytest.raises(ValueError, match=next(iter(bad))):
        VariationalTrainer(flow, GaussianTarget(3), torch.optim.Adam(flow.parameters()), **bad)


def test_ordinary_training_is_not_divergence(tmp_path):
    # noisy but healthy: 400 epochs at a high learning rate, never flagged
    tr = _trainer(tmp_path, epochs=400)
    tr.fit(400)
    assert tr.stop_reason == "epochs" and len(tr.records) == 400


def test_batch_of_one_is_not_divergence(tmp_path):
    # regression: --batch 1 was reported as divergence (the std of one sample is NaN)
    torch.manual_seed(0)
    flow = DiagonalGaussian(3)
    opt = torch.optim.Adam(flow.parameters(), lr=0.01)
    tr = VariationalTrainer(flow, GaussianTarget(3), opt, batch_size=1, progress=False)
    log = tr.fit(5)
    assert len(log) == 5 and log["std"].isna().all() and log["free_energy"].notna().all()


@pytest.mark.parametrize("bad", [2.5, 0, -3, "8"])
def test_batch_size_is_checked_not_truncated(bad):
    flow = DiagonalGaussian(3)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        VariationalTrainer(flow, GaussianTarget(3), torch.optim.Adam(flow.parameters()), batch_size=bad)


def test_checkpoint_has_the_mode_of_other_new_files(tmp_path):
    # regression: checkpoint.pt was 0600 (mkstemp) beside 0644 outputs
    import os
    import stat

    tr = _trainer(tmp_path)
    tr.fit(5)
    (tmp_path / "other").write_text("x")
    mode = lambda name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)  # noqa: E731
    assert mode("checkpoint.pt") == mode("other") == mode("log.csv")


def test_bad_checkpoints(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt is unreadable"):
        load_checkpoint(bad)
    good = save_checkpoint({"model": {"w": torch.zeros(2)}, "optimizer": {}, "epoch": 1}, tmp_path / "c.pt")
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="t.pt is unreadable"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="lacks rng, log"):
        _trainer(tmp_path).load(good)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    # a checkpoint of another model shape
    tr = _trainer(tmp_path / "x")
    tr.fit(5)
    other = DiagonalGaussian(4)
    opt = torch.optim.Adam(other.parameters())
    tr2 = VariationalTrainer(other, GaussianTarget(4), opt, progress=False)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        tr2.load(tmp_path / "x" / "checkpoint.pt")


def test_kish_ess():
    assert float(kish_ess(torch.zeros(10))) == pytest.approx(1.0)
    assert float(kish_ess(torch.tensor([0.0, -1e4, -1e4, -1e4]))) == pytest.approx(0.25)
    w = torch.tensor([1.0, 2.0, 3.0])
    assert float(kish_ess(w.log())) == pytest.approx(36 / (3 * 14))


def test_grad_norm_is_the_logged_gradients_norm(tmp_path):
    # the logged grad_norm is the norm of ∂ mean(ln p + E)/∂θ at the epoch's samples, recomputed here
    tr = _trainer(tmp_path, epochs=3)
    gen_state = tr.generator.get_state()
    log = tr.fit(1)
    flow = DiagonalGaussian(3)  # the same initial parameters (zeros)
    x, logp = flow.sample(32, generator=torch.Generator().set_state(gen_state))
    (logp + GaussianTarget(3).energy(x)).mean().backward()
    expected = torch.cat([p.grad.flatten() for p in flow.parameters()]).norm()
    assert log["grad_norm"].iloc[0] == pytest.approx(float(expected), rel=1e-12)


class GradientKickTarget(GaussianTarget):
    """The Gaussian target whose energy at call ``at`` has an unchanged value but a gradient kicked by 1e4."""

    def __init__(self, n, at):
        super().__init__(n)
        self.at = at

    def energy(self, x):
        e = super().energy(x)
        return e + 1e4 * (x - x.detach()).sum(1) if self.calls == self.at else e


def test_auto_clip_limits_steps_at_three_medians_and_resumes_exactly(tmp_path):
    from latticeflow.train import AUTO_CLIP, AUTO_CLIP_MIN, AUTO_CLIP_WINDOW

    tr = _trainer(tmp_path / "a", target=GradientKickTarget(3, at=30), epochs=80, grad_clip="auto")
    assert tr.clip_limit() == math.inf  # nothing logged yet: no limit
    steps = []
    orig = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        norm = orig(params, max_norm, *a, **k)
        after = torch.cat([p.grad.flatten() for p in params]).norm()
        steps.append((float(norm), float(max_norm), float(after)))
        return norm

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        log = tr.fit(80)
    finally:
        torch.nn.utils.clip_grad_norm_ = orig
    norms = log["grad_norm"].tolist()
    for e, (norm, limit, after) in enumerate(steps):
        prior = norms[max(0, e - AUTO_CLIP_WINDOW):e]
        want = AUTO_CLIP * float(pd.Series(prior).median()) if len(prior) >= AUTO_CLIP_MIN else math.inf
        assert limit == pytest.approx(want, rel=1e-12)
        assert after <= min(norm, limit) * (1 + 1e-6)
    kicked = steps[29]  # the kicked epoch: its gradient is clipped to the limit
    assert kicked[0] > 100 * kicked[1] and kicked[2] == pytest.approx(kicked[1], rel=1e-6)
    # the history is the log: a resumed run clips exactly as the uninterrupted one
    part = _trainer(tmp_path / "b", target=GradientKickTarget(3, at=30), epochs=80, grad_clip="auto")
    part.fit(37)
    resumed = _trainer(tmp_path / "c", target=GradientKickTarget(3, at=30 - 37), epochs=80, grad_clip="auto")
    resumed.load(tmp_path / "b" / "checkpoint.pt")
    cols = ["free_energy", "grad_norm", "lr"]
    torch.testing.assert_close(torch.tensor(resumed.fit(80)[cols].to_numpy()), torch.tensor(log[cols].to_numpy()),
                               rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, "often", True])
def test_grad_clip_values_are_checked(bad):
    flow = DiagonalGaussian(3)
    with pytest.raises(ValueError, match="grad_clip must be None, 'auto' or a finite number > 0"):
        VariationalTrainer(flow, GaussianTarget(3), torch.optim.Adam(flow.parameters()), grad_clip=bad)


def _timed_trainer(tmp_path, monkeypatch, minutes=1.0, warmup=0):
    """A trainer with a WallClockCosine whose clock reads 10 s per finished epoch (no real time)."""
    from latticeflow import train as lftrain

    torch.manual_seed(0)
    flow = DiagonalGaussian(3)
    opt = torch.optim.Adam(flow.parameters(), lr=0.05)
    tr = VariationalTrainer(flow, GaussianTarget(3), opt, batch_size=32, out_dir=tmp_path, progress=False,
                            scheduler=lftrain.WallClockCosine(opt, minutes, warmup=warmup),
                            generator=torch.Generator().manual_seed(1), checkpoint_every=2)
    monkeypatch.setattr(lftrain.time, "perf_counter", lambda: 10.0 * tr.epoch)
    return tr


def _cosine(p, f=0.01):
    return f + (1 - f) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def test_wall_clock_cosine_decays_over_the_training_time_and_stops_there(tmp_path, monkeypatch):
    tr = _timed_trainer(tmp_path, monkeypatch, minutes=1.0, warmup=2)
    log = tr.fit(100)  # the epoch cap is far; the 60 s of the schedule end the run
    assert tr.stop_reason == "schedule" and len(log) == 6  # 10 s per epoch
    assert log["wall_time"].tolist() == [10.0 * k for k in range(1, 7)]
    # the rate of epoch k+1 is lr·cos-factor(wall time after epoch k) once the warm-up (epochs 1, 2) is over
    expected = [0.05 * 0.5, 0.05 * 1.0] + [0.05 * _cosine(10.0 * k / 60) for k in range(2, 6)]
    assert log["lr"].tolist() == pytest.approx(expected, rel=1e-12)
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.01)  # decayed to the final fraction
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 6  # the last epoch is saved


def test_wall_clock_cosine_resumes_where_its_time_left_off(tmp_path, monkeypatch):
    whole = _timed_trainer(tmp_path / "whole", monkeypatch).fit(100)
    first = _timed_trainer(tmp_path / "parts", monkeypatch)
    first.fit(3)  # stopped by the epoch cap after 30 s
    second = _timed_trainer(tmp_path / "parts", monkeypatch)
    second.load(tmp_path / "parts" / "checkpoint.pt")
    log = second.fit(100)
    assert second.stop_reason == "schedule"
    pd.testing.assert_frame_equal(log, whole)  # the same rates and the same samples: an exact resume
    third = _timed_trainer(tmp_path / "parts", monkeypatch)
    third.load(tmp_path / "parts" / "checkpoint.pt")
    assert len(third.fit(100)) == 6 and third.stop_reason == "schedule"  # nothing left to run


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "10"])
def test_wall_clock_cosine_minutes_are_checked(bad):
    from latticeflow.train import WallClockCosine

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="minutes must be a number > 0"):
        WallClockCosine(opt, bad)


def test_state_copy_is_a_deep_copy_of_a_training_state():
    from latticeflow.train import _state_copy

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "rng": [1, (2, 3.5), None]}
    snap = _state_copy(state)
    ref = copy.deepcopy(state)
    with torch.no_grad():  # the live state moves on; the snapshot must not
        for p in model.parameters():
            p.add_(1.0)
        for s in opt.state.values():
            s["exp_avg"].add_(1.0)
            s["step"].add_(1.0)

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return (type(a) is type(b) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
                    and same(getattr(a, "_metadata", None), getattr(b, "_metadata", None)))
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        return a == b

    assert same(snap, ref) and not same(snap["model"], model.state_dict())
    assert snap["optimizer"]["param_groups"] is not state["optimizer"]["param_groups"]

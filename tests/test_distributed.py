"""Data-parallel variational training (models/ising.py under torchrun) against one process.

The reference below runs W ranks' worth of work in one process: every epoch it draws rank r's
share of the global batch with rank r's generator (seeded as latticeflow.distributed.rank_seed
says), concatenates the shares in rank order, and takes one Adam step on the mean of ln p + E
over the global batch. DDP averages the per-rank mean gradients, which is the same gradient, so
a torchrun run must reproduce it to float64 rounding, parameters and logged statistics alike.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import numpy as np
import pytest
import torch

import models.ising as mi
from latticeflow import distributed as dist
from latticeflow import ising
from latticeflow.build import build_flow, start_at_best_gaussian
from latticeflow.checkpoint import load_checkpoint
from latticeflow.train import VariationalTrainer, kish_ess

REPO = Path(mi.__file__).resolve().parents[1]
# a small lattice with the paper's random space-group x Z2 symmetrisation (per-sample noise),
# float64, constant learning rate; batch 12 splits over 1, 2 and 3 ranks
ARGS = ["--L", "3", "--hidden", "8", "--n-steps", "3", "--step-size", "0.2", "--batch", "12", "--lr", "0.01",
        "--schedule", "constant", "--symmetrize", "random", "--group", "space+z2", "--dtype", "float64",
        "--seed", "5", "--device", "cpu", "--no-plot", "--quiet"]
SEED = 5
STATS = ["loss", "free_energy_hs", "stderr", "std", "ess"]


def _config(**kw: object) -> dict:
    return mi.config_from_args(mi.parse_args([*ARGS, *[str(a) for kv in kw.items() for a in (f"--{kv[0]}", kv[1])]]))


def reference(config: dict, worlds: list[int]) -> tuple[dict[str, torch.Tensor], pd.DataFrame]:
    """One process doing what ``len(worlds)`` epochs on worlds[e] ranks do; (state_dict, log)."""
    target = ising(config["L"], config["beta"], J=config["J"])
    torch.manual_seed(config["seed"])
    flow = build_flow(config, target.lattice)
    if config["quadratic_init"] == "gaussian":
        start_at_best_gaussian(flow, target)  # as make_trainer does
    opt = torch.optim.Adam(flow.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    gens: dict[int, torch.Generator] = {}
    rows = []
    for epoch, world in enumerate(worlds):
        xs, logps = [], []
        for r in range(world):
            if r not in gens:  # a new run's stream, or a rank that joins at a resume
                gens[r] = torch.Generator().manual_seed(dist.rank_seed(config["seed"], r, None if epoch == 0 else epoch))
            x, logp = flow.sample(config["batch"] // world, generator=gens[r])
            xs.append(x)
            logps.append(logp)
        f = torch.cat(logps) + target.energy(torch.cat(xs))
        opt.zero_grad(set_to_none=True)
        f.mean().backward()
        opt.step()
        fd, N = f.detach(), target.N
        rows.append({"epoch": epoch + 1, "loss": float(fd.mean()), "free_energy_hs": float(fd.mean()) / N,
                     "stderr": float(fd.std() / math.sqrt(fd.numel())) / N, "std": float(fd.std()) / N,
                     "ess": float(kish_ess(-fd))})
    return {k: v.detach().clone() for k, v in flow.state_dict().items()}, pd.DataFrame(rows)


def _assert_same_params(state: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], **tol: float) -> None:
    assert list(state) == list(ref)  # the bare flow's keys: no "module." / "flow." prefixes
    for k in ref:
        torch.testing.assert_close(state[k], ref[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------
# In one process
# ---------------------------------------------------------------------------------------------


def test_rank_seeds():
    # rank 0 is the single-process stream, mixed by SeedSequence like every other rank
    assert dist.rank_seed(7, 0) == int(np.random.SeedSequence([7]).generate_state(1, np.uint64)[0]) != 7
    assert dist.rank_seed(0, 0) not in (0, dist.rank_seed(0, 1))
    seeds = {dist.rank_seed(7, r) for r in range(4)} | {dist.rank_seed(7, r, 10) for r in range(4)}
    assert len(seeds) == 8  # all streams distinct, also from those started at a resume
    assert dist.rank_seed(7, 3) == dist.rank_seed(7, 3) != dist.rank_seed(8, 3)
    assert dist.rank_seed(-1, 1) == dist.rank_seed(2**64 - 1, 1)
    g = dist.rank_generator(7, "cpu", rank_=0)
    assert torch.equal(torch.randn(3, generator=g),
                       torch.randn(3, generator=torch.Generator().manual_seed(dist.rank_seed(7, 0))))


def test_sample_module_and_unwrap():
    config = _config()
    flow = build_flow(config, ising(3, "critical").lattice)
    wrapped = dist.SampleModule(flow)
    assert dist.unwrap(wrapped) is flow and dist.unwrap(flow) is flow
    assert dist.wrap_sampler(flow) is flow  # one process: no DDP
    a = wrapped(4, generator=torch.Generator().manual_seed(1))
    b = flow.sample(4, generator=torch.Generator().manual_seed(1))
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert list(wrapped.state_dict()) == [f"flow.{k}" for k in flow.state_dict()]


def test_one_process_run_is_unchanged(tmp_path):
    # rank 0's stream is the plain Generator().manual_seed(seed): bit-for-bit the old single-process run
    config = _config(epochs=3)
    trainer, _ = mi.make_trainer(config, torch.device("cpu"), tmp_path, progress=False)
    log = trainer.fit(3)
    ref_state, ref_log = reference(config, [1, 1, 1])
    pd.testing.assert_frame_equal(log[["epoch", *STATS]], ref_log, check_exact=True)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    _assert_same_params(state["model"], ref_state, rtol=0, atol=0)
    assert state["world_size"] == 1 and len(state["rng"]["rank_generators"]) == 1
    assert torch.equal(state["rng"]["rank_generators"][0], state["rng"]["generator"])


def test_resume_starts_fresh_streams_for_new_ranks(tmp_path, monkeypatch):
    config = _config(epochs=2)
    trainer, _ = mi.make_trainer(config, torch.device("cpu"), tmp_path, progress=False)
    trainer.fit(2)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")["rng"]["rank_generators"]
    for r in (0, 1, 2):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        resumed, _ = mi.make_trainer(config, torch.device("cpu"), None, progress=False)
        resumed.load(tmp_path / "checkpoint.pt")
        expected = saved[0] if r == 0 else torch.Generator().manual_seed(dist.rank_seed(SEED, r, 2)).get_state()
        assert torch.equal(resumed.generator.get_state(), expected), r


def test_ddp_of_a_bare_flow_is_refused():
    # DDP(flow) would route nothing through DDP's forward (a flow's forward is log_prob)
    class FakeDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # no process group needed to test the type check
            torch.nn.Module.__init__(self)
            self.module = module

    flow = build_flow(_config(), ising(3, "critical").lattice)
    opt = torch.optim.Adam(flow.parameters())
    with pytest.raises(TypeError, match="SampleModule"):
        VariationalTrainer(FakeDDP(flow), ising(3, "critical"), opt, progress=False)


# ---------------------------------------------------------------------------------------------
# Under torchrun (gloo, CPU)
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *args: str, script: Path = REPO / "models" / "ising.py") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{_free_port()}", str(script), *ARGS, *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_data_parallel_runs_equal_one_process_with_the_same_noise(tmp_path):
    # 2 ranks for 2 epochs; that checkpoint resumed on 3 ranks (ranks 0, 1 continue their streams,
    # rank 2 starts a fresh one) and on 1 process; each against the one-process reference
    _run(_torchrun(2, "--epochs", "2", "--out", str(tmp_path / "two")))
    _run(_torchrun(3, "--epochs", "4", "--resume", str(tmp_path / "two" / "checkpoint.pt"), "--out",
                   str(tmp_path / "three")))
    # the in-process run and the reference on one thread too, like each rank (OMP_NUM_THREADS=1): on another
    # thread count a kernel may split its sums differently, and this run amplifies such round-off (below)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mi.main([*ARGS, "--epochs", "3", "--resume", str(tmp_path / "two" / "checkpoint.pt"), "--out",
                 str(tmp_path / "one")])
        config = _config(epochs=4)
        # same kernels, same thread count; what differs is the order of the batch sums: DDP all-reduces the
        # average of per-rank mean gradients (6 or 4 samples each) where the reference takes one mean over 12,
        # a few ulps per gradient component. Measured after 4 epochs: <= 1.1e-16 absolute on the parameters
        # (all |p| > 7e-4), <= 5e-16 relative on the logged statistics, so rtol=1e-9 leaves 1e4 or more to
        # spare, while a DDP fault (wrong shard, rank streams out of step) changes them at O(1) (other samples).
        # It would not cover other kernels: with ATen's scalar kernels instead of AVX-512 the samples of the
        # first epoch already differ by 1e-10 relative, its gradient by 1e-7 and the parameters by 4.5e-7,
        # hence the equal thread counts above (same machine, same kernels in every process).
        tol = {"rtol": 1e-9, "atol": 1e-12}
        for name, worlds in (("two", [2, 2]), ("three", [2, 2, 3, 3]), ("one", [2, 2, 1])):
            ref_state, ref_log = reference(config, worlds)
            state = load_checkpoint(tmp_path / name / "checkpoint.pt")
            assert state["epoch"] == len(worlds) and state["world_size"] == worlds[-1], name
            assert len(state["rng"]["rank_generators"]) == worlds[-1]
            _assert_same_params(state["model"], ref_state, **tol)
            log = pd.read_csv(tmp_path / name / "log.csv")
            pd.testing.assert_frame_equal(log[["epoch", *STATS]], ref_log, check_exact=False, **tol)
    finally:
        torch.set_num_threads(threads)
    # only rank 0 writes: one set of outputs, and the header is printed once
    assert sorted(p.name for p in (tmp_path / "three").iterdir()) == ["checkpoint.pt", "config.json", "log.csv",
                                                                      "summary.json"]


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _worker_pid(agent: int, rank: int) -> int | None:
    for pid in _children(agent):
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env):
            return pid
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker by its /proc environment")
def test_signal_to_one_rank_stops_all_ranks_after_the_same_epoch(tmp_path):
    out, console = tmp_path / "run", tmp_path / "console.txt"
    with open(console, "w") as f:
        proc = subprocess.Popen(_torchrun(2, "--epochs", "100000", "--checkpoint-every", "1", "--out", str(out)),
                                stdout=f, stderr=subprocess.STDOUT, text=True, env=_env(),
                                start_new_session=True)  # its own process group, so a failure kills the workers too
    try:
        deadline = time.monotonic() + 60
        while not (out / "log.csv").exists():  # written after the first epoch: both ranks are in fit
            assert proc.poll() is None and time.monotonic() < deadline, console.read_text()[-3000:]
            time.sleep(0.2)
        pid = _worker_pid(proc.pid, rank=1)
        assert pid is not None, console.read_text()[-3000:]
        os.kill(pid, signal.SIGINT)  # rank 1 only: rank 0 learns of it through the collective flag
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = console.read_text()
    # every rank exits 130 (128 + SIGINT), so torchrun reports the run as interrupted, not finished
    assert proc.returncode != 0 and "exitcode: 130" in text, text[-3000:]
    assert "stopped by signal 2" in text and text.count("stopped by signal") == 1, text[-3000:]
    state = load_checkpoint(out / "checkpoint.pt")
    log = pd.read_csv(out / "log.csv")
    assert 1 <= state["epoch"] == len(log) < 100000
    assert len(state["rng"]["rank_generators"]) == 2


@pytest.mark.slow
def test_signal_just_after_the_stop_decision_is_acted_on_at_the_next_epoch(tmp_path):
    # the race behind the intermittent hang: rank 1 caught SIGINT right after the epoch-3 all-reduce
    # and, reading its own flag, left the loop alone while rank 0 waited for it in epoch 4
    out = tmp_path / "run"
    proc = subprocess.run(_torchrun(2, "--epochs", "100", "--checkpoint-every", "1000", "--out", str(out),
                                    script=REPO / "tests" / "late_signal_worker.py"),
                          capture_output=True, text=True, env={**_env(), "LATE_SIGNAL_EPOCH": "3"}, timeout=90,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("stopped by signal 2 after epoch 4;") == 1, proc.stdout[-2000:]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 4 == len(pd.read_csv(out / "log.csv"))
    assert len(state["rng"]["rank_generators"]) == 2


@pytest.mark.slow
def test_wall_clock_budget_stops_all_ranks_together(tmp_path):
    out = tmp_path / "run"
    # 0.05 s of budget: the ranks' clocks differ, the decision (any rank out of time) does not
    proc = _run(_torchrun(2, "--epochs", "100000", "--checkpoint-every", "100000", "--max-minutes", "0.0008",
                          "--out", str(out)))
    assert proc.stdout.count("wall-clock budget of 0.0008 min reached") == 1, proc.stdout[-2000:]
    state = load_checkpoint(out / "checkpoint.pt")
    assert 1 <= state["epoch"] == len(pd.read_csv(out / "log.csv")) < 100000


@pytest.mark.slow
def test_wall_clock_schedule_ends_all_ranks_together(tmp_path):
    out = tmp_path / "run"
    # 0.3 s of schedule: each rank measures its own time; they step with the largest and stop after the same
    # epoch (a rank leaving alone would leave the other waiting in the next all-reduce until the timeout)
    proc = _run(_torchrun(2, "--schedule", "cosine", "--schedule-minutes", "0.005", "--warmup", "0", "--checkpoint-every", "100000",
                          "--out", str(out)))
    assert proc.stdout.count("the learning-rate schedule ran its 0.005 minutes") == 1, proc.stdout[-2000:]
    state = load_checkpoint(out / "checkpoint.pt")
    log = pd.read_csv(out / "log.csv")
    assert state["epoch"] == len(log) >= 1 and state["config"]["schedule_minutes"] == 0.005
    # rank 0's rates follow the cosine of an agreed time (the largest over the ranks) no earlier than its own
    # clock; the schedule ends when that agreed time passes 0.3 s, so rank 0's own last wall time may be less
    assert state["scheduler"]["elapsed"] >= 0.3
    assert state["scheduler"]["elapsed"] >= log["wall_time"].iloc[-1] > 0
    assert (log["lr"].diff().iloc[1:] <= 1e-15).all()

"""Runs never lose work: output folders, locks, resume rules, exit statuses and what the outputs say.

Each test names the failure it guards against (measured on the code before the fix).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import models.ising as mi
from latticeflow import critical, ising
from latticeflow.build import build_flow
from latticeflow.checkpoint import load_checkpoint, save_checkpoint
from latticeflow.distributed import default_threads
from latticeflow.runs import LOCK_NAME, RunFolder, RunFolderError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--L", "3", "--hidden", "4", "--n-steps", "2", "--batch", "8", "--potential", "quadratic+mlp",
        "--no-plot", "--quiet", "--threads", "1"]


def _run(out: Path, *flags: str) -> int:
    return mi.cli([*TINY, "--out", str(out), *flags])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------- output folders
def test_a_fresh_run_refuses_a_folder_holding_a_run(tmp_path, capsys):
    # regression: a second run into the same folder replaced checkpoint, log and summary with exit code 0
    out = tmp_path / "run"
    assert _run(out, "--epochs", "2") == 0
    before = _files(out)
    capsys.readouterr()
    assert _run(out, "--epochs", "3", "--seed", "5") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run" in err and "--resume" in err and "--force" in err
    assert _files(out) == before  # nothing touched, config.json included


def test_force_replaces_the_old_run_and_only_its_files(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "--epochs", "3") == 0
    (out / "notes.txt").write_text("mine")
    assert _run(out, "--epochs", "2", "--force") == 0
    assert len(pd.read_csv(out / "log.csv")) == 2 and load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / LOCK_NAME).exists()


def test_a_failed_invocation_writes_nothing(tmp_path):
    # regression: `--batch 0` rewrote config.json of the run in the folder
    out = tmp_path / "run"
    assert _run(out, "--epochs", "2") == 0
    before = _files(out)
    with pytest.raises(SystemExit) as e:  # a parse error: argparse's one line and status 2
        _run(out, "--batch", "0", "--force")
    assert e.value.code == 2
    assert _run(out, "--potential", "bogus", "--force") == 2  # fails in set-up, after parsing
    assert _files(out) == before
    assert _run(tmp_path / "new", "--potential", "bogus") == 2
    assert not (tmp_path / "new").exists()


def test_resume_continues_in_the_checkpoints_own_folder(tmp_path, monkeypatch):
    # regression: `--resume path/checkpoint.pt` without --out wrote into ./runs/ising
    out = tmp_path / "run"
    assert _run(out, "--epochs", "2") == 0
    monkeypatch.chdir(tmp_path)
    assert mi.cli(["--resume", str(out / "checkpoint.pt"), "--epochs", "4", "--quiet", "--no-plot"]) == 0
    assert len(pd.read_csv(out / "log.csv")) == 4 and not (tmp_path / "runs").exists()
    # a run folder is accepted for its checkpoint
    assert mi.cli(["--resume", str(out), "--epochs", "5", "--quiet", "--no-plot"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 5


def test_resume_into_another_folder_holding_a_run_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(a, "--epochs", "2") == 0 and _run(b, "--epochs", "2") == 0
    assert mi.cli(["--resume", str(a / "checkpoint.pt"), "--out", str(b), "--epochs", "3", "--quiet"]) == 2
    assert mi.cli(["--resume", str(a / "checkpoint.pt"), "--out", str(tmp_path / "c"), "--epochs", "3",
                   "--quiet", "--no-plot"]) == 0
    assert len(pd.read_csv(tmp_path / "c" / "log.csv")) == 3


# ---------------------------------------------------------------------- locks
def _lock(folder: Path, pid: int, started: str | None, host: str | None = None) -> None:
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": started,
                                                "time": "then", "command": "python -m models.ising"}))


def test_a_live_lock_is_never_broken(tmp_path):
    from latticeflow.runs import _process_start

    _lock(tmp_path, os.getpid(), _process_start(os.getpid()))
    for force in (False, True):
        with pytest.raises(RunFolderError, match="in use by a live run"):
            RunFolder(tmp_path, force=force).claim()


def test_a_stale_lock_is_reported_then_replaced_by_force(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _lock(tmp_path, int(proc.stdout), "1")  # that process has ended
    with pytest.raises(RunFolderError, match=f"stale lock {tmp_path / LOCK_NAME}.*--force"):
        RunFolder(tmp_path).claim()
    # a pid that now belongs to another process (a different start time) is stale too
    _lock(tmp_path, os.getpid(), "0")
    with pytest.raises(RunFolderError, match="stale lock"):
        RunFolder(tmp_path).check()
    folder = RunFolder(tmp_path, force=True).claim()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    folder.release()
    assert not (tmp_path / LOCK_NAME).exists()


def _start(out: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "models.ising", *TINY, "--out", str(out), *flags], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_two_live_runs_cannot_share_a_folder_and_signals_exit_non_zero(tmp_path, sig, status):
    # regression: two runs started at once into one folder mixed one's config.json with the other's
    # checkpoint and log; runs interrupted by SIGINT/SIGTERM exited 0, like finished ones
    out = tmp_path / "run"
    first = _start(out, "--epochs", "1000000", "--checkpoint-every", "5")
    _wait_for(out / "log.csv", first)
    config = (out / "config.json").read_text()
    second = _start(out, "--epochs", "3", "--seed", "7", "--force")
    _, err = second.communicate(timeout=60)
    assert second.returncode == 2 and "in use by a live run" in err, err
    assert (out / "config.json").read_text() == config
    first.send_signal(sig)
    stdout, err = first.communicate(timeout=60)
    assert first.returncode == status, err
    assert f"resume with: python -m models.ising --resume {out / 'checkpoint.pt'}" in err
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == len(pd.read_csv(out / "log.csv")) >= 1
    assert json.loads((out / "summary.json").read_text())["stop_reason"] == "signal"
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_killed_run_leaves_a_stale_lock_that_is_detected(tmp_path):
    out = tmp_path / "run"
    first = _start(out, "--epochs", "1000000")
    _wait_for(out / "log.csv", first)
    first.kill()
    first.wait()
    assert (out / LOCK_NAME).exists()
    assert mi.cli([*TINY, "--resume", str(out / "checkpoint.pt"), "--epochs", "1000000"]) == 2
    state = load_checkpoint(out / "checkpoint.pt")
    assert mi.cli(["--resume", str(out / "checkpoint.pt"), "--epochs", str(state["epoch"] + 2), "--force",
                   "--quiet", "--no-plot"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == state["epoch"] + 2


# ---------------------------------------------------------------------- resume
def test_resume_refuses_conflicting_model_flags(tmp_path, capsys):
    # regression: resuming an L=4 checkpoint with --L 8 --hidden 64 --lr 0.5 silently trained the L=4 model
    out = tmp_path / "run"
    assert _run(out, "--epochs", "2") == 0
    capsys.readouterr()
    assert mi.cli(["--resume", str(out), "--epochs", "3", "--L", "8", "--hidden", "64", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--L 8 (checkpoint: 3)" in err and "--hidden 64 (checkpoint: 4)" in err and "--lr 0.5" in err
    # flags equal to the checkpoint's are fine, and 'critical' equals the number it stands for
    assert mi.cli(["--resume", str(out), "--epochs", "3", "--L", "3", "--beta", "critical", "--quiet", "--no-plot"]) == 0


@pytest.mark.parametrize("flag", [["--epochs=6"], ["--epoch", "6"], ["--epochs", "6"]])
def test_resume_takes_epochs_in_every_spelling(tmp_path, flag):
    # regression: `--epochs=9` and `--epoch 11` were ignored on resume (argv was searched for "--epochs")
    out = tmp_path / "run"
    assert _run(out, "--epochs", "2") == 0
    assert mi.cli(["--resume", str(out), *flag, "--quiet", "--no-plot"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 6


def test_resume_with_too_few_epochs_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--epochs", "3") == 0
    capsys.readouterr()
    assert mi.cli(["--resume", str(out), "--quiet"]) == 2
    assert "at epoch 3 already" in capsys.readouterr().err


def test_a_checkpoint_of_the_other_driver_is_named(tmp_path, capsys):
    # regression: an MNIST checkpoint in the Ising driver crashed with KeyError: 'L'
    mnist = save_checkpoint({"format": "latticeflow-checkpoint-1", "config": {"hidden": 8, "n_validation": 10},
                             "model": {}, "epoch": 1}, tmp_path / "mnist" / "checkpoint.pt")
    assert mi.cli(["--resume", str(mnist), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{mnist} is an MNIST checkpoint (written by python -m models.mnist" in err
    out = tmp_path / "ising"
    assert _run(out, "--epochs", "1") == 0
    import models.mnist as mm

    capsys.readouterr()
    assert mm.cli(["--resume", str(out / "checkpoint.pt")]) == 2
    assert "is an Ising checkpoint (written by python -m models.ising" in capsys.readouterr().err
    from analysis.report import load_model

    with pytest.raises(ValueError, match="is an MNIST checkpoint"):
        load_model(mnist)


# ---------------------------------------------------------------------- exit statuses
def test_divergence_exits_1_and_keeps_a_good_checkpoint(tmp_path, capsys):
    # regression: --lr 10 drove F/N to 2e20 and ended with exit code 0 and the diverged weights saved
    out = tmp_path / "run"
    status = mi.cli(["--L", "4", "--hidden", "16", "--potential", "quadratic+mlp", "--lr", "10", "--epochs", "300",
                     "--out", str(out), "--quiet", "--no-plot", "--threads", "1", "--max-rollbacks", "0"])
    err = capsys.readouterr().err
    assert status == 1 and "training diverged at epoch" in err
    bad = int(err.split("diverged at epoch ")[1].split()[0])
    log = pd.read_csv(out / "log.csv")
    assert len(log) == bad - 1 and log["free_energy_hs"].abs().max() < 10
    state = load_checkpoint(out / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "summary.json").exists() and not (out / LOCK_NAME).exists()


def test_lr_10_is_rolled_back_instead_of_ruining_the_run(tmp_path, capsys):
    # the same --lr 10 run with the default recovery: every rollback printed and logged; it either
    # recovers (exit 0, finite F/N, rollbacks in summary.json) or stops as diverged after the last one
    out = tmp_path / "run"
    status = mi.cli(["--L", "4", "--hidden", "16", "--potential", "quadratic+mlp", "--lr", "10", "--epochs", "150",
                     "--out", str(out), "--quiet", "--no-plot", "--threads", "1"])
    text = capsys.readouterr()
    assert "rollback 1 of 5" in text.out
    log = pd.read_csv(out / "log.csv")
    assert log["free_energy_hs"].abs().max() < 10 and log["rollbacks"].iloc[-1] >= 1
    if status == 0:
        s = json.loads((out / "summary.json").read_text())
        assert len(s["rollbacks"]) == log["rollbacks"].iloc[-1] and s["epochs"] == 150
    else:
        assert status == 1 and "after 5 rollback(s)" in text.err


def test_budget_stop_says_so_and_exits_0(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--epochs", "1000000", "--max-minutes", "0.002") == 0
    text = capsys.readouterr().out
    assert "stopped by the --max-minutes 0.002 budget" in text and "--resume" in text
    assert json.loads((out / "summary.json").read_text())["stop_reason"] == "time"


# ---------------------------------------------------------------------- what the outputs say
def test_outputs_name_normalisations_and_resolved_values(tmp_path):
    out = tmp_path / "run"
    assert mi.cli(["--L", "4", "--hidden", "4", "--n-steps", "2", "--batch", "8", "--epochs", "3", "--out", str(out),
                   "--quiet", "--threads", "1"]) == 0
    target = ising(4)
    offset = target.log_z_offset / target.N
    log = pd.read_csv(out / "log.csv")
    assert math.isclose((log["free_energy_ising"] - log["free_energy_hs"]).mean(), offset, rel_tol=1e-6)
    config = json.loads((out / "config.json").read_text())
    # the word and the number, and the kernel actually used (3: the largest odd size <= L=4)
    assert config["beta"] == pytest.approx(0.5 * math.log(1 + math.sqrt(2)), rel=1e-15)
    assert config["beta"] == critical and config["beta_name"] == "critical"  # JSON round-trips a float exactly
    assert config["kernel_size"] == 3
    s = json.loads((out / "summary.json").read_text())
    assert s["exact_hs"] == pytest.approx(target.exact_free_energy(), abs=1e-12)
    assert s["exact_ising"] == pytest.approx(-target.exact_log_z_ising() / target.N, abs=1e-12)
    assert s["free_energy_ising"] - s["free_energy_hs"] == pytest.approx(offset, abs=1e-9)
    assert s["window"]["epochs"] == [1, 3] and s["window"]["n"] == 3
    prov = s["provenance"]
    assert prov["torch"] == torch.__version__ and prov["threads"] == 1 and prov["device"] == "cpu"
    assert {"latticeflow", "python", "git_commit", "host"} <= set(prov)
    # the tanh form the fused stages used (timed per process) and the CPU kernels torch dispatched to
    assert prov["tanh"] in ("torch", "sigmoid") and prov["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    # the conv stage the run's conv part ran on (the default flow at L=4 has one)
    from latticeflow import native

    assert prov["conv_kernel"] == native.status() and prov["conv_kernel"].startswith(("compiled (conv_stage-", "eager ("))
    # and the small-lattice RK4 step's (not loaded when no step asked for it: this flow has a conv part)
    from latticeflow.native import step as native_step

    assert prov["step_kernel"] == native_step.status()
    assert prov["step_kernel"].startswith(("compiled (mlp_step-", "eager (", "not loaded"))
    # this process's peak RSS (the test process: at least the torch it imported, well under the machine)
    assert 50 < prov["peak_rss_mib"] < 1e6
    assert (out / "convergence.png").is_file() and (out / "convergence.pdf").is_file()


def test_build_flow_refuses_unknown_keys():
    # regression: {"hiden": 8} silently built the default width 512
    with pytest.raises(ValueError, match=r"unknown config key\(s\) 'hiden' \(did you mean 'hidden'\?\); valid keys:"):
        build_flow({"hiden": 8}, ising(3).lattice)


# ---------------------------------------------------------------------- threads
def test_default_threads_follow_the_idle_cpus(monkeypatch):
    import latticeflow.distributed as d

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(d, "usable_cpus", lambda: 4)
    for busy, want in ((0.0, 4), (0.2, 4), (1.0, 3), (2.6, 1), (7.0, 1)):
        monkeypatch.setattr(d, "busy_cpus", lambda seconds=0.25, b=busy: b)
        assert default_threads()[0] == want, busy
    monkeypatch.setattr(d, "busy_cpus", lambda seconds=0.25: 0.0)
    assert default_threads(local_processes=2)[0] == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == (3, "OMP_NUM_THREADS")


def test_busy_cpus_sees_a_busy_cpu():
    from latticeflow.distributed import busy_cpus, usable_cpus

    if not Path("/proc/stat").exists():
        pytest.skip("reads /proc/stat")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = busy_cpus(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.7 <= busy <= usable_cpus() + 1e-9


def test_the_thread_count_is_printed_at_start(tmp_path, capsys):
    assert mi.cli(["--L", "3", "--hidden", "4", "--n-steps", "2", "--batch", "8", "--epochs", "1", "--out",
                   str(tmp_path / "r"), "--no-plot"]) == 0
    assert "threads: " in capsys.readouterr().out


def test_a_phi4_checkpoint_is_named_by_the_ising_tools(tmp_path, capsys):
    phi4 = save_checkpoint({"format": "latticeflow-checkpoint-1", "kind": "phi4", "config": {"L": 3}, "model": {},
                            "epoch": 1}, tmp_path / "p" / "checkpoint.pt")
    assert mi.cli(["--resume", str(phi4), "--epochs", "5", "--quiet"]) == 2
    assert "is a φ⁴ checkpoint (written by python -m models.phi4" in capsys.readouterr().err


def test_provenance_names_the_commit_that_was_imported(monkeypatch):
    # a long run outlives commits made beside it: its files name the code that ran, and say when the
    # checkout moved on
    import latticeflow.runs as runs

    monkeypatch.setattr(runs, "_IMPORTED_COMMIT", "a" * 40)
    monkeypatch.setattr(runs, "_git_commit", lambda: "b" * 40)
    prov = runs.provenance()
    assert prov["git_commit"] == "a" * 40 and prov["git_commit_at_end"] == "b" * 40
    monkeypatch.setattr(runs, "_git_commit", lambda: "a" * 40)
    prov = runs.provenance()
    assert prov["git_commit"] == "a" * 40 and "git_commit_at_end" not in prov

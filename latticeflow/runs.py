"""Run folders that never lose work: one run per folder, a lock against concurrent runs, provenance.

Every driver writes its outputs (checkpoint, log, config, summary, figures) into one folder.
:class:`RunFolder` enforces the rules that keep a week of runs safe:

- A fresh run refuses a folder that already holds a run (any of its output files), unless it
  is told ``resume`` (continue the run whose checkpoint lies in that folder) or ``force``
  (delete that run's files first, and only those).
- A lock file (``.lock``: pid, host, process start time, command) stops two live runs from
  sharing a folder. A lock left by a killed run is detected (its process is gone, or the pid
  now belongs to a younger process) and reported, naming the file; ``force`` replaces such a
  stale lock, never a live one.
- The folder is claimed only after the run's set-up succeeded, so a failed invocation
  (a bad flag, an unreadable checkpoint) writes nothing.

:func:`provenance` records the software and machine a result came from (for summary.json).
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

LOCK_NAME = ".lock"
#: Files every driver writes (a β sweep: its manifest and table); a folder holding any of them holds a run.
RUN_FILES = ("checkpoint.pt", "log.csv", "config.json", "summary.json", "sweep.json", "sweep.csv")


class RunFolderError(ValueError):
    """An output folder that holds another run, or is locked by one."""


def _process_start(pid: int) -> str | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after its last ')'
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    """Whether process ``pid`` runs and is the one that wrote the lock (same start time)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _process_start(pid)
    return started is None or now is None or now == started


class RunFolder:
    """One run's output folder.

    Args:
        path: the folder.
        resume: the checkpoint this run resumes from, or None for a fresh run. A resumed run may
            use the checkpoint's own folder; another folder must not hold a run.
        force: delete the files of the run already in the folder (``outputs``) and replace a
            stale lock. A live run's lock is never broken.
        outputs: names of the files this kind of run writes (besides :data:`RUN_FILES`); with
            ``force`` they are the files removed.

    Example:
        >>> folder = RunFolder("runs/ising").check()   # before set-up: no side effects
        >>> ...                                        # build the model, load the checkpoint
        >>> folder.claim()                             # lock, then write config.json etc.
    """

    def __init__(self, path: str | os.PathLike, *, resume: str | os.PathLike | None = None, force: bool = False,
                 outputs: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self.resume = Path(resume) if resume is not None else None
        self.force = bool(force)
        self.outputs = tuple(dict.fromkeys((*RUN_FILES, *outputs)))
        self.lock_path = self.path / LOCK_NAME
        self._owned = False

    # ------------------------------------------------------------------ checks
    def existing(self) -> list[str]:
        """Names of the run files already in the folder."""
        return [n for n in self.outputs if (self.path / n).exists()]

    def _is_own_folder(self) -> bool:
        return self.resume is not None and self.resume.resolve().parent == self.path.resolve()

    def check(self) -> "RunFolder":
        """Refuse a folder that is a file, or holds another run; no side effects.

        Raises:
            RunFolderError: with one line that says what to do instead.
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"output folder {self.path} is a file")
        self._check_lock(break_stale=False)
        found = self.existing()
        if found and not self._is_own_folder() and not self.force:
            ckpt = self.path / "checkpoint.pt"
            how = f"continue it with --resume {ckpt}, " if ckpt.exists() else ""
            raise RunFolderError(f"{self.path} already holds a run ({', '.join(found)}): {how}choose another "
                                 f"--out, or replace it with --force")
        return self

    def _read_lock(self) -> dict[str, Any]:
        try:
            return json.loads(self.lock_path.read_text())
        except (OSError, ValueError):
            return {}

    def _check_lock(self, break_stale: bool) -> None:
        if not self.lock_path.exists():
            return
        info = self._read_lock()
        pid, host = info.get("pid"), info.get("host")
        if not info and time.time() - self.lock_path.stat().st_mtime < 10:
            # a run has just created the lock and not yet written it: treat as live
            raise RunFolderError(f"{self.path} is being claimed by another run just now ({self.lock_path})")
        who = f"pid {pid} on {host}, started {info.get('time', '?')}: {info.get('command', '?')}"
        if isinstance(pid, int) and host == socket.gethostname() and _alive(pid, info.get("started")):
            raise RunFolderError(f"{self.path} is in use by a live run ({who}); wait for it or choose another --out")
        if host not in (None, socket.gethostname()) and isinstance(pid, int):
            if not self.force:
                raise RunFolderError(f"{self.lock_path} is held by a run on another machine ({who}); if that run "
                                     f"has ended, pass --force (or delete the lock)")
        elif not self.force:
            raise RunFolderError(f"stale lock {self.lock_path} from a run that no longer runs ({who}; killed?): "
                                 f"check its files, then pass --force or delete the lock")
        if break_stale:
            print(f"replacing the stale lock {self.lock_path} ({who})", file=sys.stderr)
            self.lock_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ claim / release
    def claim(self) -> "RunFolder":
        """Create the folder, take the lock atomically, and (with ``force``) remove the old run's files.

        Raises:
            RunFolderError: the folder holds another run, or another run holds the lock.
        """
        self.check()
        self.path.mkdir(parents=True, exist_ok=True)
        self._check_lock(break_stale=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid()),
                "time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        try:  # O_EXCL: of two runs starting at once, exactly one creates the lock
            fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            self._check_lock(break_stale=False)
            raise RunFolderError(f"{self.path} was claimed by another run just now") from None
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        self._owned = True
        atexit.register(self.release)
        # re-check under the lock: a run that finished between check() and here left its files
        found = self.existing()
        if found and not self._is_own_folder():
            if not self.force:
                self.release()
                self.check()
            for name in found:
                (self.path / name).unlink()
        return self

    def release(self) -> None:
        """Remove the lock if this process holds it (also called at exit)."""
        if self._owned and self._read_lock().get("pid") == os.getpid():
            self.lock_path.unlink(missing_ok=True)
        self._owned = False

    def __enter__(self) -> "RunFolder":
        return self.claim()

    def __exit__(self, *exc: object) -> None:
        self.release()


def default_folder(kind: str, root: str | os.PathLike = "runs") -> Path:
    """A new folder for a run given no ``--out``: ``runs/<kind>/<date>-<time>`` (with ``-2``, ``-3``
    ... when that exists), so that an ordinary re-run never meets an earlier run's files."""
    base = Path(root) / kind / time.strftime("%Y%m%d-%H%M%S")
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def link_latest(folder: Path) -> None:
    """Point ``<parent>/latest`` at ``folder`` (best effort: a symlink, skipped where unsupported)."""
    link = folder.parent / "latest"
    try:
        if link.is_symlink() or not link.exists():
            tmp = folder.parent / f".latest.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(folder.name)
            os.replace(tmp, link)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# Provenance and file modes
# ---------------------------------------------------------------------------------------------


def _git_commit() -> str | None:
    """The repository's commit (with '+dirty' for local changes), or None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


#: the commit of the code this process imported: a run's provenance names the code that ran, not
#: what the checkout holds when the run ends (a 30-minute run outlives commits made beside it)
_IMPORTED_COMMIT = _git_commit()


def provenance(device: Any = None) -> dict[str, Any]:
    """Software and machine of a run: versions, device, threads, processes, host, time, and the git
    commit of the code this process imported (``git_commit``; ``git_commit_at_end`` as well when
    the checkout has moved on since)."""
    import torch

    from . import __version__
    from . import distributed as dist
    from . import native
    from .native import step as native_step
    from .potentials.activations import tanh_via_sigmoid

    # the form of tanh the fused stages used (timed per process unless LATTICEFLOW_TANH fixes it):
    # results differ by rounding between the two
    tanh_form = "sigmoid" if tanh_via_sigmoid(torch.get_default_dtype(), device or "cpu") else "torch"
    return {"latticeflow": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "machine": platform.machine(), "host": socket.gethostname(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "tanh": tanh_form,
            # the conv stage's implementation (latticeflow.native): results differ by rounding between them
            "conv_kernel": native.status(),
            # the small-lattice RK4 step's (latticeflow.native.step): likewise
            "step_kernel": native_step.status(),
            # GEMM steps (larger lattices) with bfloat16 and with full-precision products (--train-precision)
            "gemm_steps": dict(native_step.counts),
            # which gemm those took, by precision ("native": the library's AVX-512 tiles, "mkl"), where any ran
            "gemm": {"float32": native_step.gemm_choice("float32") if native_step.counts["float32"] else None,
                     "bfloat16": native_step.gemm_choice("bfloat16") if native_step.counts["bfloat16"] else None},
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "threads": torch.get_num_threads(), "processes": dist.world_size(),
            "device": str(device) if device is not None else "cpu", "git_commit": _IMPORTED_COMMIT,
            **_commit_changed(), "peak_rss_mib": peak_rss_mib(), "finished": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def _commit_changed() -> dict[str, str | None]:
    """``{"git_commit_at_end": ...}`` when the checkout moved on (or changed) while this process ran, else {}."""
    now = _git_commit()
    return {} if now == _IMPORTED_COMMIT else {"git_commit_at_end": now}


def peak_rss_mib() -> float | None:
    """This process's peak resident memory in MiB so far (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def umask_mode() -> int:
    """The mode a plain new file gets under this process's umask (0o666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (temporary file, rename), mode as any new file."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.chmod(tmp, umask_mode())
    os.replace(tmp, path)
    return path


def claim_on_main(folder: RunFolder) -> None:
    """Claim ``folder`` on rank 0 and share the outcome, so that no rank trains when the claim failed.

    Raises:
        RunFolderError: on every rank, when rank 0 could not claim the folder.
    """
    from . import distributed as dist

    error: RunFolderError | None = None
    if dist.is_main():
        try:
            folder.claim()
        except RunFolderError as e:
            error = e
    failed = dist.all_reduce_max([1.0 if error else 0.0])[0]
    if error is not None:
        raise error
    if failed:
        raise RunFolderError(f"rank 0 could not claim the output folder {folder.path}")


# ---------------------------------------------------------------------------------------------
# What every training driver does around its run
# ---------------------------------------------------------------------------------------------


class RunStart:
    """The output folder and resumed checkpoint of a run, before anything is written.

    Attributes:
        out: the output folder (``--out``; on resume without it, the checkpoint's folder; else a new
            ``runs/<kind>/<date>-<time>``).
        folder: its :class:`RunFolder`, checked (claim it once set-up succeeded).
        state: the resumed checkpoint (None for a fresh run); ``base`` its config.
        default_out: whether ``out`` is a new default folder (linked as ``latest`` when claimed).
    """

    def __init__(self, kind: str, *, out: str | os.PathLike | None, resume: Path | None, force: bool,
                 outputs: Iterable[str] = ()) -> None:
        from .checkpoint import check_kind, load_checkpoint

        self.kind, self.resume = kind, resume
        self.state: dict[str, Any] | None = None
        if resume is not None:
            self.state = load_checkpoint(resume, required=("config",))
            check_kind(self.state, resume, kind)
        self.base: dict[str, Any] | None = self.state["config"] if self.state is not None else None
        self.default_out = out is None and resume is None
        self.out = Path(out) if out is not None else (resume.parent if resume is not None else default_folder(kind))
        self.folder = RunFolder(self.out, resume=resume, force=force, outputs=outputs).check()

    def check_epochs(self, epochs: int) -> None:
        """On resume, refuse an epoch target the checkpoint has already reached.

        Raises:
            ValueError: naming the checkpoint's epoch.
        """
        done = int(self.state.get("epoch", 0)) if self.state is not None else 0
        if self.state is not None and epochs <= done:
            raise ValueError(f"{self.resume} is at epoch {done} already; pass --epochs N with N > {done} to train further")

    def claim(self) -> None:
        """Take the folder (rank 0; every rank learns the outcome) and link a default one as ``latest``."""
        from . import distributed as dist

        claim_on_main(self.folder)
        if self.default_out and dist.is_main():
            link_latest(self.out)

    def release(self) -> None:
        self.folder.release()

    @staticmethod
    def warn_if_bound_broken(error: float | None, stderr: float) -> bool:
        """Warn (stderr) when a variational F/N lies below the exact value by more than 3 standard
        errors: an upper bound cannot, so the integration is too coarse to trust. Returns whether it did."""
        broken = error is not None and error < -3 * stderr
        if broken:
            print("warning: F/N lies below the exact value by more than 3 standard errors: the variational "
                  "bound is broken (RK4 steps too coarse?); do not use this number", file=sys.stderr)
        return broken

    def say_how_it_ended(self, trainer: Any, max_minutes: float | None) -> None:
        """Print why a run stopped early and the command that continues it (signals on stderr)."""
        resume = f"python -m models.{self.kind} --resume {self.out / 'checkpoint.pt'}"
        if trainer.stop_reason == "signal":
            print(f"interrupted by signal {trainer.stop_signal}; resume with: {resume}", file=sys.stderr)
        elif trainer.stop_reason == "time":
            print(f"stopped by the --max-minutes {max_minutes:g} budget after epoch {trainer.epoch}; "
                  f"continue with: {resume}")
        elif trainer.stop_reason == "schedule":
            print(f"the learning-rate schedule ran its {trainer.scheduler.seconds / 60:g} minutes (--schedule-minutes) "
                  f"after epoch {trainer.epoch}")

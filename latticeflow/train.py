"""Training loops: a generic epoch loop with checkpoints, and reverse-KL variational training.

Variational training (paper eq. 7) minimises

    L = E_{x∼p(x,T)} [ln p(x,T) + E(x)] ≥ −ln Z,

an upper bound of the free energy, with the reparametrised (pathwise) gradient: samples are
drawn by integrating the flow forward from Gaussian noise, so gradients flow through the
integrator. One "epoch" of variational training is one optimiser step on a fresh batch, as
in the paper's Fig. 4.

The generic :class:`Trainer` owns the things every run needs: a pandas log written to CSV,
atomic checkpoints with model, optimiser, scheduler, RNG states and the log, exact resume,
a tqdm bar, a wall-clock budget, a clean stop on SIGINT/SIGTERM, and a hard stop on a
non-finite loss that keeps the last good checkpoint.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed as dist
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state


class TrainingDiverged(RuntimeError):
    """Raised when the loss becomes NaN or infinite."""


class Target(Protocol):
    """What variational training needs from a physical target."""

    N: int

    def energy(self, x: Tensor) -> Tensor:  # (B, N) -> (B,)
        ...


class Sampler(Protocol):
    """What variational training needs from a model: reparametrised samples with log density."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        ...


def kish_ess(log_w: Tensor) -> Tensor:
    """Normalised Kish effective sample size (Σw)² / (B Σw²) ∈ (0, 1], from log weights (B,)."""
    log_w = log_w.double()
    return torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)) / log_w.numel()


class Trainer:
    """Epoch loop with logging, checkpoints, resume and interruption handling.

    Subclasses implement :meth:`run_epoch`, returning a dict of numbers for the log (it must
    contain ``"loss"``). The log is a pandas DataFrame (``trainer.log``), written to
    ``out_dir/log.csv``; checkpoints go to ``out_dir/checkpoint.pt``.

    Args:
        model: the module being trained.
        optimizer: its optimiser.
        scheduler: optional learning-rate scheduler, stepped once per epoch.
        config: plain dict saved in checkpoints (enough to rebuild the model).
        out_dir: folder for log and checkpoints; None keeps everything in memory.
        checkpoint_every: epochs between checkpoints.
        generator: the torch.Generator driving the run's own randomness (saved and restored).
        progress: show a tqdm bar.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        config: dict[str, Any] | None = None,
        out_dir: str | Path | None = None,
        checkpoint_every: int = 100,
        generator: torch.Generator | None = None,
        progress: bool = True,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.config = dict(config or {})
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_every = max(1, int(checkpoint_every))
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.progress = progress
        self.epoch = 0
        self.records: list[dict[str, float]] = []
        self._stop_signal: int | None = None
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------ hooks
    def run_epoch(self, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def postfix(self, record: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{record['loss']:.5g}"}

    # ------------------------------------------------------------------ log
    @property
    def log(self) -> pd.DataFrame:
        return pd.DataFrame.from_records(self.records)

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "checkpoint.pt"

    def _write_log(self) -> None:
        if self.out_dir is not None and dist.is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.log.to_csv(self.out_dir / "log.csv", index=False)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        model = self.model.module if hasattr(self.model, "module") else self.model
        return {
            "format": "latticeflow-checkpoint-1",
            "config": self.config,
            "epoch": self.epoch,
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": rng_state(self.generator),
            "log": self.records,
        }

    def save(self, path: str | Path | None = None) -> Path | None:
        """Write a checkpoint (rank 0 only); returns its path."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None or not dist.is_main():
            return None
        self.last_checkpoint = save_checkpoint(self.state_dict(), path)
        return self.last_checkpoint

    def load(self, path: str | Path) -> None:
        """Resume from a checkpoint: model, optimiser, scheduler, RNG states, epoch and log.

        Raises:
            CheckpointError: unreadable file or one written for a different model.
        """
        state = load_checkpoint(path, required=("model", "optimizer", "epoch", "rng", "log"))
        model = self.model.module if hasattr(self.model, "module") else self.model
        try:
            model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this model: {str(e).splitlines()[0]}") from None
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], self.generator)
        self.epoch = int(state["epoch"])
        self.records = list(state["log"])

    # ------------------------------------------------------------------ loop
    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signum

    def fit(self, epochs: int, max_minutes: float | None = None) -> pd.DataFrame:
        """Train until ``epochs`` epochs in total have run (counting resumed ones).

        Stops early, with a checkpoint, when ``max_minutes`` of wall time pass or on
        SIGINT/SIGTERM. Raises :class:`TrainingDiverged` on a non-finite loss, keeping the
        last good checkpoint on disk.
        """
        start = time.perf_counter()
        wall0 = self.records[-1]["wall_time"] if self.records else 0.0
        handlers = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not in the main thread: no signal handling
            handlers = {}
        bar = tqdm(total=epochs, initial=self.epoch, disable=not (self.progress and dist.is_main()),
                   dynamic_ncols=True, leave=False)
        try:
            while self.epoch < epochs:
                record = self.run_epoch(self.epoch)
                if not all(math.isfinite(v) for v in record.values() if isinstance(v, float)):
                    kept = f"; last good checkpoint kept at {self.last_checkpoint}" if self.last_checkpoint else ""
                    raise TrainingDiverged(f"non-finite loss at epoch {self.epoch} ({record}){kept}")
                self.epoch += 1
                record = {"epoch": self.epoch, **record, "lr": self.optimizer.param_groups[0]["lr"],
                          "wall_time": wall0 + time.perf_counter() - start}
                self.records.append(record)
                if self.scheduler is not None:
                    self.scheduler.step()
                bar.update(1)
                bar.set_postfix(self.postfix(record))
                out_of_time = max_minutes is not None and time.perf_counter() - start > 60 * max_minutes
                if self.epoch % self.checkpoint_every == 0 or self.epoch == epochs or out_of_time or self._stop_signal:
                    self.save()
                    self._write_log()
                if self._stop_signal is not None:
                    where = self.last_checkpoint or "(no out_dir, nothing saved)"
                    print(f"\nstopped by signal {self._stop_signal} after epoch {self.epoch}; checkpoint {where}; "
                          f"resume with --resume {where}")
                    break
                if out_of_time:
                    print(f"\nwall-clock budget of {max_minutes} min reached after epoch {self.epoch}")
                    break
        finally:
            bar.close()
            for sig, h in handlers.items():
                signal.signal(sig, h)
        return self.log


class VariationalTrainer(Trainer):
    """Reverse-KL training of a flow against a target energy (paper eq. 7).

    Each epoch draws ``batch_size`` samples, minimises mean(ln p + E) and logs per site:
    ``free_energy`` (the batch mean of ln p + E, divided by N), its standard error, the std,
    and the normalised Kish ESS of the importance weights w = e^{−E−ln p}.

    Args:
        flow: a model with ``sample(n, generator) -> (x (n, N), logp (n,))``.
        target: an energy with ``N`` and ``energy(x) -> (B,)``.
        optimizer: optimiser over the flow's parameters.
        batch_size: samples per step (the global batch; each rank draws its share).
        grad_clip: clip the gradient norm at this value (None: no clipping).
        **kwargs: passed to :class:`Trainer`.
    """

    def __init__(self, flow: torch.nn.Module, target: Target, optimizer: torch.optim.Optimizer, *,
                 batch_size: int = 64, grad_clip: float | None = None, **kwargs: Any) -> None:
        super().__init__(flow, optimizer, **kwargs)
        self.flow, self.target = flow, target
        self.batch_size = int(batch_size)
        self.grad_clip = grad_clip
        self.local_batch = dist.local_share(self.batch_size)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        self.flow.train()
        x, logp = self.flow.sample(self.local_batch, generator=self.generator)
        f = logp + self.target.energy(x)  # (B,) per-sample ln p + E, whose mean is eq. 7
        loss = dist.global_mean(f)  # DDP averages gradients; the loss itself is per-rank here
        self.optimizer.zero_grad(set_to_none=True)
        f.mean().backward()
        if not torch.isfinite(f.detach()).all():
            return {"loss": float("nan")}
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.flow.parameters(), self.grad_clip)
        self.optimizer.step()
        fd = dist.all_gather(f.detach())
        N = self.target.N
        return {
            "loss": float(loss),
            "free_energy": float(fd.mean()) / N,
            "stderr": float(fd.std() / math.sqrt(fd.numel())) / N,
            "std": float(fd.std()) / N,
            "ess": float(kish_ess(-fd)),
        }

    def postfix(self, record: dict[str, float]) -> dict[str, str]:
        return {"F/N": f"{record['free_energy']:.5f}", "ess": f"{record['ess']:.3f}"}


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int, warmup: int = 0,
                    final_fraction: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``final_fraction`` of the initial rate at ``epochs``."""

    def factor(e: int) -> float:
        if warmup and e < warmup:
            return (e + 1) / warmup
        p = min(1.0, (e - warmup) / max(1, epochs - warmup))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * p))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


Callback = Callable[[Trainer, dict[str, float]], None]

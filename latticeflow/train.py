"""Training loops: a generic epoch loop with checkpoints, and reverse-KL variational training.

Variational training (paper eq. 7) minimises

    L = E_{x∼p(x,T)} [ln p(x,T) + E(x)] ≥ −ln Z,

an upper bound of the free energy, with the reparametrised (pathwise) gradient: samples are
drawn by integrating the flow forward from Gaussian noise, so gradients flow through the
integrator. ``gradient_estimator="path"`` drops the zero-mean score term of that gradient
(:func:`path_gradient_surrogate`): unbiased, and zero variance where the flow is the target.
One "epoch" of variational training is one optimiser step on a fresh batch, as in the
paper's Fig. 4.

The generic :class:`Trainer` owns the things every run needs: a pandas log written to CSV,
atomic checkpoints with model, optimiser, scheduler, RNG states and the log, exact resume,
a tqdm bar, a wall-clock budget, a clean stop on SIGINT/SIGTERM, and a hard stop on a
non-finite loss that keeps the last good checkpoint.

Under ``torchrun`` (see :mod:`latticeflow.distributed`) only rank 0 writes the log and the
checkpoints, and every stop decision is collective: a signal received by any rank, or the
wall-clock budget running out on any rank, stops all ranks after the same epoch (one
all-reduce per epoch), so no rank is left waiting in a collective. Variational training draws
each rank's share of the batch through ``DDP(SampleModule(flow))`` with the rank's own
random stream, and its checkpoints hold every rank's generator state.
"""

from __future__ import annotations

import collections
import copy
import math
import signal
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import distributed as dist
from ._checks import check_choice, check_grad_clip, check_size
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import GRADIENT_ESTIMATORS, TRAIN_PRECISIONS
from .native import step as native_step
from .stats import kish_ess  # one definition for training and the analysis; importable from here as before
from .target import Target


class TrainingDiverged(RuntimeError):
    """Raised when the loss becomes NaN or infinite, or blows up (see :meth:`Trainer.divergence`)."""


#: The divergence rule's parameters (see :meth:`Trainer.divergence`).
DIVERGENCE_WINDOW = 50
DIVERGENCE_MIN_HISTORY = 10
DIVERGENCE_FACTOR = 10.0


class Trainer:
    """Epoch loop with logging, checkpoints, resume and interruption handling.

    Subclasses implement :meth:`run_epoch`, returning a dict of numbers for the log (it must
    contain ``"loss"``). The log is a pandas DataFrame (``trainer.log``), written to
    ``out_dir/log.csv``; checkpoints go to ``out_dir/checkpoint.pt``. Hooks: :meth:`postfix`
    (the bar's numbers), :meth:`before_epoch` (a stopping rule of the subclass, checked before
    every epoch), :meth:`loss_scale` and :attr:`verified_lag` (the divergence rule), and
    :attr:`deadline` (the budget, for ending an epoch early).

    Args:
        model: the module being trained.
        optimizer: its optimiser.
        scheduler: optional learning-rate scheduler, stepped once per epoch.
        config: plain dict saved in checkpoints (enough to rebuild the model).
        out_dir: folder for log and checkpoints; None keeps everything in memory.
        checkpoint_every: epochs between checkpoints.
        generator: the torch.Generator driving the run's own randomness (saved and restored).
        progress: show a tqdm bar.
        rank_streams: every rank has its own random stream (``generator`` differs between
            ranks). Checkpoints then hold all ranks' generator states (``rng["rank_generators"]``,
            gathered to rank 0 by :meth:`save`, which every rank must call), and :meth:`load`
            restores rank r's state if the checkpoint has one; a rank beyond the ranks that
            wrote it starts a fresh stream seeded with ``rank_seed(seed, r, epoch)`` (see
            :func:`latticeflow.distributed.rank_seed`). So a checkpoint written by N ranks
            resumes on M ranks, exactly when M = N. Without it (the default), all ranks share
            one stream and every rank restores the saved one.
        seed: the run's seed, for such fresh streams (default: ``config["seed"]``, else 0).
        kind: what the checkpoints hold ("ising", "mnist"), recorded so that a driver handed the
            other driver's checkpoint can say so.
        max_rollbacks: recoveries allowed per run: when an epoch meets the divergence rule, go back
            to the last state a good loss vouches for (kept in memory), multiply the learning rate
            by ``rollback_lr_factor``, draw fresh samples and go on; every rollback is printed, kept
            in ``rollbacks`` (and the checkpoint) and counted in the log's ``rollbacks`` column.
            Once they are used up, the run stops as diverged. 0: stop at the first divergence.
        rollback_lr_factor: the learning-rate factor of each rollback, in (0, 1).
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
        rank_streams: bool = False,
        seed: int | None = None,
        kind: str | None = None,
        max_rollbacks: int = 0,
        rollback_lr_factor: float = 0.5,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.config = dict(config or {})
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_every = max(1, int(checkpoint_every))
        self.generator = generator if generator is not None else dist.rank_generator(0, rank_=0)
        self.progress = progress
        self.rank_streams = bool(rank_streams)
        self.seed = int(seed if seed is not None else self.config.get("seed", 0))
        self.epoch = 0
        self.records: list[dict[str, float]] = []
        self.kind = kind
        self._stop_signal: int | None = None
        self.last_checkpoint: Path | None = None
        #: why the last :meth:`fit` ended: "epochs", "time", "schedule" (a :class:`WallClockCosine` ran
        #: its minutes), "signal", "diverged" (subclasses add theirs)
        self.stop_reason: str | None = None
        #: the signal that stopped it (SIGINT 2, SIGTERM 15), for the exit status 128 + signal
        self.stop_signal: int | None = None
        self._snapshots: collections.deque = collections.deque(maxlen=2)
        self.max_rollbacks = check_size("max_rollbacks", max_rollbacks, minimum=0)
        if not 0 < rollback_lr_factor < 1:
            raise ValueError(f"rollback_lr_factor must lie in (0, 1), got rollback_lr_factor={rollback_lr_factor!r}")
        self.rollback_lr_factor = float(rollback_lr_factor)
        #: every rollback: {"epoch": the diverged epoch, "back_to": the epoch resumed from, "reason", "lr_factor"}
        self.rollbacks: list[dict[str, Any]] = []
        self._rolled_back_to: dict[str, Any] | None = None
        #: ``time.perf_counter()`` value at which the running :meth:`fit`'s ``max_minutes`` run out
        #: (None without a budget and outside fit): :meth:`run_epoch` may end a long epoch early on it
        self.deadline: float | None = None

    # ------------------------------------------------------------------ hooks
    def run_epoch(self, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def postfix(self, record: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{record['loss']:.5g}"}

    def before_epoch(self) -> str | None:
        """A reason to stop before the next epoch runs (it becomes ``stop_reason``), or None to run it.

        :meth:`fit` calls it before every epoch, the first one too (a resumed run may have met a
        stopping rule already, e.g. early stopping). It must give the same verdict on every rank:
        read it off the log, or take a collective decision with :meth:`agree_to_stop` (and then
        set ``stop_signal`` when returning "signal"). The default never stops.
        """
        return None

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
    def gather_rank_generators(self) -> list[Tensor]:
        """Every rank's generator state, in rank order (a collective: call it on all ranks)."""
        return dist.all_gather_object(self.generator.get_state())

    def state_dict(self, rank_generators: list[Tensor] | None = None) -> dict[str, Any]:
        """The checkpoint dict. The model entry is the bare model's ``state_dict`` (no DDP or
        SampleModule prefixes), the same keys as a single-process run.

        Args:
            rank_generators: all ranks' generator states (from :meth:`gather_rank_generators`);
                with ``rank_streams`` and None, they are gathered here, which is a collective
                under torchrun.
        """
        rng = rng_state(self.generator)
        if self.rank_streams:
            rng["rank_generators"] = rank_generators if rank_generators is not None else self.gather_rank_generators()
        return {
            "format": "latticeflow-checkpoint-1",
            "kind": self.kind,
            "config": self.config,
            "epoch": self.epoch,
            "world_size": dist.world_size(),
            "model": dist.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": rng,
            "log": self.records,
            "rollbacks": self.rollbacks,
        }

    def save(self, path: str | Path | None = None) -> Path | None:
        """Write a checkpoint (rank 0 writes; with ``rank_streams`` every rank must call this,
        as it gathers the generator states); returns its path on rank 0, None elsewhere."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            return None
        gathered = self.gather_rank_generators() if self.rank_streams else None
        if not dist.is_main():
            return None
        self.last_checkpoint = save_checkpoint(self.state_dict(rank_generators=gathered), path)
        return self.last_checkpoint

    def _restore_generator(self, rng: dict[str, Any], epoch: int) -> None:
        """This rank's saved stream if the checkpoint has one, else a fresh one from (seed, rank, epoch)."""
        saved = rng.get("rank_generators")
        if saved is None:  # a checkpoint written before per-rank streams, or by one rank
            saved = [rng["generator"]] if "generator" in rng else []
        r = dist.rank()
        if r < len(saved):
            try:
                self.generator.set_state(saved[r])
                return
            except RuntimeError as e:  # e.g. a CUDA generator's state into a CPU generator
                print(f"rank {r}: saved generator state does not fit this generator ({str(e).splitlines()[0]}); "
                      f"starting a fresh stream")
        self.generator.manual_seed(dist.rank_seed(self.seed, r, epoch))

    def load(self, path: str | Path) -> None:
        """Resume from a checkpoint: model, optimiser, scheduler, RNG states, epoch and log.

        Every rank reads the file (under torchrun on several nodes it must be readable on all).
        With ``rank_streams``, rank r restores rank r's generator if the checkpoint holds it and
        otherwise starts a fresh stream seeded with ``rank_seed(seed, r, epoch)``; the global
        torch/numpy/python RNG states are rank 0's on every rank.

        Raises:
            CheckpointError: unreadable file or one written for a different model.
        """
        state = load_checkpoint(path, required=("model", "optimizer", "epoch", "rng", "log"))
        model = dist.unwrap(self.model)
        try:
            model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this model: {str(e).splitlines()[0]}") from None
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.rank_streams:
            set_rng_state(state["rng"])
            self._restore_generator(state["rng"], int(state["epoch"]))
        else:
            set_rng_state(state["rng"], self.generator)
        self.epoch = int(state["epoch"])
        self.records = list(state["log"])
        self.rollbacks = list(state.get("rollbacks") or [])

    # ------------------------------------------------------------------ loop
    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signum

    @property
    def schedule_finished(self) -> bool:
        """True when the scheduler is a :class:`WallClockCosine` whose minutes have passed."""
        return isinstance(self.scheduler, WallClockCosine) and self.scheduler.finished

    def _advance_schedule(self, wall_time: float) -> None:
        """Step the scheduler after an epoch; a :class:`WallClockCosine` first learns the training
        time so far, the largest over the ranks (one all-reduce), so that every rank sets the
        same rate and stops after the same epoch."""
        if isinstance(self.scheduler, WallClockCosine):
            if dist.world_size() > 1:
                wall_time = dist.all_reduce_max([wall_time])[0]
            self.scheduler.elapsed = float(wall_time)
        self.scheduler.step()

    def agree_to_stop(self, out_of_time: bool) -> tuple[int | None, bool]:
        """Share the stop decision with all ranks (one all-reduce; nothing in one process).

        Returns ``(signal, late)``: the signal any rank had caught before this call (None if
        none) and whether any rank is out of time, the same on every rank. Callers must act on
        these returned values, never on ``_stop_signal`` read afterwards: a signal landing on one
        rank just after the all-reduce would otherwise make that rank alone leave the loop while
        the others wait for it in the next collective. Such a late signal is acted on at the next
        call. Every rank must call this at the same point of every epoch.
        """
        local = self._stop_signal or 0
        if dist.world_size() == 1:
            signum, late = local, float(out_of_time)
        else:
            signum, late = dist.all_reduce_max([local, float(out_of_time)])
        if signum > 0 and self._stop_signal is None:
            self._stop_signal = int(signum)
        return (int(signum) if signum > 0 else None), late > 0

    def catch_signals(self) -> Callable[[], None]:
        """Route SIGINT/SIGTERM to ``_stop_signal`` (acted on after the epoch); returns a function
        that restores the previous handlers. Nests (an outer loop and :meth:`fit` may both call it);
        does nothing outside the main thread, where handlers cannot be set.
        """
        handlers = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
                # restart interrupted system calls (SA_RESTART): a signal landing while a rank waits in a
                # gloo/nccl collective must not fail that call
                signal.siginterrupt(sig, False)
        except ValueError:  # not in the main thread
            pass

        def restore() -> None:
            for sig, h in handlers.items():
                signal.signal(sig, h)

        return restore

    # ------------------------------------------------------------------ divergence
    def divergence(self, record: dict[str, float]) -> str | None:
        """Why ``record`` (the epoch just run) counts as diverged, or None. The documented rule:

        1. the loss is NaN or infinite;
        2. a jump: with at least :data:`DIVERGENCE_MIN_HISTORY` finite losses among the last
           :data:`DIVERGENCE_WINDOW` epochs, spanning [lo, hi], the loss exceeds
           hi + :data:`DIVERGENCE_FACTOR` · max(hi − lo, 1e-3·|hi|);
        3. a rise: the loss exceeds the first epoch's loss by :data:`DIVERGENCE_FACTOR` times that
           epoch's per-sample standard deviation (``loss_std`` of the record, see
           :meth:`loss_scale`; |first loss| when the trainer logs none), taken as at least 1 nat:
           a flow that starts exact (a Gaussian target and the closed-form Gaussian start) has
           a standard deviation of 0, and Adam's first steps away from the optimum are no
           divergence.

        Only the loss is tested: other columns may legitimately be NaN (a standard deviation of
        a batch of one). The rule reads the log, so it continues across resumes, and every rank
        reaches the same verdict (the logged statistics are global).
        """
        loss = record.get("loss", float("nan"))
        if not math.isfinite(loss):
            return "non-finite loss"
        history = [r["loss"] for r in self.records[-DIVERGENCE_WINDOW:] if math.isfinite(r.get("loss", math.nan))]
        if len(history) >= DIVERGENCE_MIN_HISTORY:
            lo, hi = min(history), max(history)
            limit = hi + DIVERGENCE_FACTOR * max(hi - lo, 1e-3 * abs(hi))
            if loss > limit:
                return (f"loss {loss:.6g} jumped above its range [{lo:.6g}, {hi:.6g}] over the last {len(history)} "
                        f"epochs (limit hi + {DIVERGENCE_FACTOR:g}·(hi − lo) = {limit:.6g})")
        if self.records:
            first = self.records[0]
            scale = self.loss_scale(first)
            scale = scale if scale is not None and math.isfinite(scale) and scale > 0 else abs(first["loss"])
            scale = max(scale, 1.0)
            limit = first["loss"] + DIVERGENCE_FACTOR * scale
            if loss > limit:
                return (f"loss {loss:.6g} rose above the first epoch's {first['loss']:.6g} by more than "
                        f"{DIVERGENCE_FACTOR:g} standard deviations ({scale:.4g} each; limit {limit:.6g})")
        return None

    def loss_scale(self, record: dict[str, float]) -> float | None:
        """The per-sample standard deviation of the loss in ``record`` (None if not logged)."""
        return record.get("loss_std")

    #: Epochs back from the diverging one to the start of the last epoch whose own loss vouches for
    #: its state: 2 when an epoch's loss is measured before its step (variational training: the
    #: state after epoch k−2 produced epoch k−1's good loss), 1 when it is measured after its
    #: updates (a validation loss at the end of the epoch).
    verified_lag = 2

    def _snapshot(self) -> dict[str, Any]:
        """This rank's training state in memory (model, optimiser, scheduler, RNG, epoch, log length)."""
        return {
            "model": _state_copy(dist.unwrap(self.model).state_dict()),
            "optimizer": _state_copy(self.optimizer.state_dict()),
            "scheduler": _state_copy(self.scheduler.state_dict()) if self.scheduler is not None else None,
            "rng": rng_state(self.generator),  # fresh objects already
            "epoch": self.epoch,
        }

    def _restore_snapshot(self, snap: dict[str, Any]) -> None:
        dist.unwrap(self.model).load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        if self.scheduler is not None and snap["scheduler"] is not None:
            self.scheduler.load_state_dict(snap["scheduler"])
        set_rng_state(snap["rng"], self.generator)
        self.epoch = int(snap["epoch"])
        del self.records[self.epoch:]

    def _verified_snapshot(self) -> dict[str, Any] | None:
        """The in-memory state a good loss vouches for (see :attr:`verified_lag`), if finite."""
        snaps = self._snapshots
        if len(snaps) < self.verified_lag:
            # just after a rollback: the state rolled back to is vouched for (with the lowered rate)
            return self._rolled_back_to
        snap = snaps[-self.verified_lag]
        ok = all(torch.isfinite(v).all() for v in snap["model"].values() if v.is_floating_point())
        return snap if ok else None

    def _scale_lr(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [b * factor for b in self.scheduler.base_lrs]

    def _roll_back(self, reason: str) -> bool:
        """Recover from a divergence (see ``max_rollbacks``); False when no recovery is left."""
        snap = self._verified_snapshot()
        if len(self.rollbacks) >= self.max_rollbacks or snap is None:
            return False
        bad = self.epoch + 1
        fresh = self.generator.get_state()  # go on with new samples, not the ones that led here
        self._restore_snapshot(snap)
        self.generator.set_state(fresh)
        self._scale_lr(self.rollback_lr_factor)
        self._snapshots.clear()
        self._rolled_back_to = self._snapshot()
        factor = self.rollback_lr_factor ** (len(self.rollbacks) + 1)
        self.rollbacks.append({"epoch": bad, "back_to": self.epoch, "reason": reason, "lr_factor": factor})
        if dist.is_main():
            print(f"\nrollback {len(self.rollbacks)} of {self.max_rollbacks}: epoch {bad} diverged ({reason}); "
                  f"back to the state after epoch {self.epoch}, learning rate x{factor:g} of the schedule's")
        return True

    def _diverged(self, reason: str, record: dict[str, float]) -> None:
        """Keep the log up to the last good epoch and a verified checkpoint, then raise."""
        bad = self.epoch + 1
        self._write_log()  # every good epoch, whether or not a checkpoint was written since
        where = f"the log up to epoch {self.epoch} is in {self.out_dir / 'log.csv'}" if self.out_dir else ""
        snap = self._verified_snapshot()
        if self.out_dir is not None and snap is not None:
            self._restore_snapshot(snap)
            self.save()
            where += (f"; {self.last_checkpoint} holds the state after epoch {self.epoch}, the last one a good "
                      f"loss vouches for")
        elif self.last_checkpoint is not None:
            where += f"; last good checkpoint kept at {self.last_checkpoint}"
        self.stop_reason = "diverged"
        shown = {k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}
        tried = f"; after {len(self.rollbacks)} rollback(s)" if self.rollbacks else ""
        raise TrainingDiverged(f"training diverged at epoch {bad} ({reason}; {shown}){tried}; last good epoch "
                               f"{bad - 1}" + (f"; {where}" if where else ""))

    # ------------------------------------------------------------------ loop
    def fit(self, epochs: int, max_minutes: float | None = None) -> pd.DataFrame:
        """Train until ``epochs`` epochs in total have run (counting resumed ones).

        Stops early, with a checkpoint, when ``max_minutes`` of wall time pass
        (``stop_reason = "time"``), when a :class:`WallClockCosine` schedule has run its minutes
        (``"schedule"``; at once for a resumed run whose schedule had) or on SIGINT/SIGTERM
        (``"signal"``, the signal number in ``stop_signal``); ``"epochs"`` when all epochs ran.
        Subclasses stop for reasons of their own through :meth:`before_epoch` (e.g. ``"early stopping"``), and may end a long epoch
        early once ``time.perf_counter()`` passes :attr:`deadline`.

        Raises:
            TrainingDiverged: the loss met the rule of :meth:`divergence`. The message names the
                epoch; the log keeps every good epoch and the checkpoint a state that a good loss
                vouches for (never the diverged weights).
        """
        start = time.perf_counter()
        self.deadline = None if max_minutes is None else start + 60.0 * max_minutes
        wall0 = self.records[-1]["wall_time"] if self.records else 0.0
        restore_signals = self.catch_signals()
        timed = isinstance(self.scheduler, WallClockCosine)  # its epochs are a cap, not a count to show
        bar = tqdm(total=None if timed else epochs, initial=self.epoch, disable=not (self.progress and dist.is_main()),
                   dynamic_ncols=True, leave=False)
        self.stop_reason = "epochs"
        self._snapshots: collections.deque = collections.deque(maxlen=2)
        self._rolled_back_to: dict[str, Any] | None = None
        try:
            while self.epoch < epochs:
                if self.schedule_finished:  # a resumed run whose wall-clock schedule has run out
                    self.stop_reason = "schedule"
                    break
                reason = self.before_epoch()
                if reason is not None:
                    self.stop_reason = reason
                    break
                self._snapshots.append(self._snapshot())
                record = self.run_epoch(self.epoch)
                reason = self.divergence(record)
                if reason is not None:
                    if self._roll_back(reason):
                        continue
                    self._diverged(reason, record)
                self.epoch += 1
                record = {"epoch": self.epoch, **record, "lr": self.optimizer.param_groups[0]["lr"],
                          "wall_time": wall0 + time.perf_counter() - start}
                if self.max_rollbacks:
                    record["rollbacks"] = len(self.rollbacks)
                self.records.append(record)
                if self.scheduler is not None:
                    self._advance_schedule(record["wall_time"])
                bar.update(1)
                bar.set_postfix(self.postfix(record))
                out_of_time = max_minutes is not None and time.perf_counter() - start > 60 * max_minutes
                stop_signal, out_of_time = self.agree_to_stop(out_of_time)  # the same on every rank
                schedule_done = self.schedule_finished
                if (self.epoch % self.checkpoint_every == 0 or self.epoch == epochs or out_of_time or stop_signal
                        or schedule_done):
                    self.save()
                    self._write_log()
                if stop_signal is not None:
                    self.stop_reason, self.stop_signal = "signal", stop_signal
                    if dist.is_main():
                        where = self.last_checkpoint or "(no out_dir, nothing saved)"
                        print(f"\nstopped by signal {stop_signal} after epoch {self.epoch}; checkpoint {where}")
                    break
                if out_of_time:
                    self.stop_reason = "time"
                    if dist.is_main():
                        print(f"\nwall-clock budget of {max_minutes:g} min reached after epoch {self.epoch}; "
                              f"checkpoint {self.last_checkpoint}")
                    break
                if schedule_done:
                    self.stop_reason = "schedule"
                    break
        finally:
            bar.close()
            restore_signals()
            self.deadline = None
        return self.log


class VariationalTrainer(Trainer):
    """Reverse-KL training of a flow against a target energy (paper eq. 7).

    Each epoch draws ``batch_size`` samples, minimises mean(ln p + E) and logs per site:
    ``free_energy`` (the batch mean of ln p + E, divided by N), its standard error, the std,
    and the normalised Kish ESS of the importance weights w = e^{−E−ln p}.

    Under torchrun each rank draws ``batch_size / world_size`` samples with its own generator
    (``rank_streams``, on by default here), through ``DDP(SampleModule(flow))`` so that DDP
    averages the gradients; the logged statistics are those of the gathered global batch (rank
    order), so they equal one process drawing the same samples.

    Args:
        flow: a model with ``sample(n, generator) -> (x (n, N), logp (n,))``, or such a model
            wrapped by :func:`latticeflow.distributed.wrap_sampler` (``DDP(SampleModule(flow))``).
        target: an energy with ``N`` and ``energy(x) -> (B,)``.
        optimizer: optimiser over the flow's parameters.
        batch_size: samples per step (the global batch; each rank draws its share).
        grad_clip: clip the gradient norm at this value (None: no clipping).
        gradient_estimator: ``"total"`` (default) differentiates ln p(x) + E(x), x = T(z), through
            the sampling path, ln p's explicit parameter dependence included; ``"path"`` is the
            path-gradient ("sticking the landing") estimator, see :func:`path_gradient_surrogate`.
        target_at: the target of each epoch, ``target_at(epoch)`` (0-based), for annealing; the log
            then has a ``beta`` column and its free energies are those of each epoch's target.
            None (default): ``target`` throughout.
        train_precision: ``"float32"`` (default) or ``"bfloat16"``: the products of each epoch's
            GEMM steps (sampling and backward) in bfloat16 with float32 sums, see
            :func:`latticeflow.native.step.products`. Nothing outside :meth:`run_epoch` sees it; the
            log's free energies are then those of the bfloat16-stepped training samples.
        **kwargs: passed to :class:`Trainer`.
    """

    def __init__(self, flow: torch.nn.Module, target: Target, optimizer: torch.optim.Optimizer, *,
                 batch_size: int = 64, grad_clip: float | None = None, gradient_estimator: str = "total",
                 target_at: Callable[[int], Target] | None = None, train_precision: str = "float32",
                 **kwargs: Any) -> None:
        if isinstance(flow, DistributedDataParallel) and not isinstance(flow.module, dist.SampleModule):
            raise TypeError("DistributedDataParallel only averages gradients of calls through its forward, and a "
                            "flow's forward is log_prob: wrap the flow as DDP(SampleModule(flow)), e.g. with "
                            "latticeflow.distributed.wrap_sampler(flow, device)")
        kwargs.setdefault("rank_streams", True)
        super().__init__(flow, optimizer, **kwargs)
        self.flow = dist.unwrap(flow)  # the bare flow (parameters, state_dict, sample for evaluation)
        self.target = target
        #: the target of each epoch (annealing: a β schedule); None trains against ``target`` throughout
        self.target_at = target_at
        # draws through DDP's forward when wrapped, so its backward all-reduces the gradients
        self._draw = flow if isinstance(flow, (DistributedDataParallel, dist.SampleModule)) else self.flow.sample
        self.batch_size = check_size("batch_size", batch_size)
        self.grad_clip = check_grad_clip(grad_clip)
        self.gradient_estimator = check_choice("gradient_estimator", gradient_estimator, GRADIENT_ESTIMATORS)
        if self.gradient_estimator == "path" and not callable(getattr(self.flow, "score", None)):
            raise TypeError(f"gradient_estimator='path' needs a flow with a score(x, noise) method "
                            f"(MongeAmpereFlow, SymmetricMixture), got {type(self.flow).__name__}")
        self.local_batch = dist.local_share(self.batch_size)
        self.train_precision = check_choice("train_precision", train_precision, TRAIN_PRECISIONS)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        target = self.target if self.target_at is None else self.target_at(epoch)
        with native_step.products(self.train_precision):  # the iteration's steps only, never an estimate
            x, logp = self._draw(self.local_batch, generator=self.generator)
            f = logp + target.energy(x)  # (B,) per-sample ln p + E, whose mean is eq. 7
            fd = f.detach()
            # global sum, count and number of non-finite values in one all-reduce: the loss and the
            # decision to stop on a non-finite value are the same on every rank
            s = dist.all_reduce_sum(torch.stack([fd.sum(), fd.new_tensor(float(fd.numel())),
                                                 (~torch.isfinite(fd)).sum().to(fd.dtype)]))
            loss = s[0] / s[1]
            self.optimizer.zero_grad(set_to_none=True)
            # the total gradient backpropagates ln p + E itself; the path gradient a surrogate with the
            # score term left out (its value is not the loss)
            surrogate = path_gradient_surrogate(self.flow, target, x) if self.gradient_estimator == "path" else f
            surrogate.mean().backward()  # under DDP: the average over ranks of the local mean = the global mean
        if s[2] > 0:
            return {"loss": float("nan")}
        # the norm before clipping, logged as the gradient scale (clipping at inf changes nothing)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.flow.parameters(), self.clip_limit())
        self.optimizer.step()
        fd = dist.all_gather(fd)
        N = target.N
        f = float(fd.mean()) / N
        # a batch of one has no standard deviation: NaN in the log, not a divergence
        std = float(fd.std()) / N if fd.numel() > 1 else float("nan")
        annealed = {} if self.target_at is None else {"beta": float(target.beta)}
        return {
            "loss": float(loss),
            **annealed,
            **{name: f + offset for name, offset in free_energy_columns(target).items()},
            "stderr": float(fd.std() / math.sqrt(fd.numel())) / N if fd.numel() > 1 else float("nan"),
            "std": std,
            "ess": float(kish_ess(-fd)),
            "grad_norm": float(grad_norm),
        }

    def clip_limit(self) -> float:
        """The gradient-norm limit of this step: ``grad_clip``, inf for None, and for ``"auto"``
        :data:`AUTO_CLIP` times the median gradient norm of the last :data:`AUTO_CLIP_WINDOW`
        logged epochs (inf until :data:`AUTO_CLIP_MIN` epochs are logged). The history is the log,
        which checkpoints keep and rollbacks trim, so a resumed run clips as the uninterrupted one."""
        if self.grad_clip is None:
            return math.inf
        if self.grad_clip != "auto":
            return float(self.grad_clip)
        norms = [r["grad_norm"] for r in self.records[-AUTO_CLIP_WINDOW:]
                 if math.isfinite(r.get("grad_norm", math.nan))]
        return AUTO_CLIP * statistics.median(norms) if len(norms) >= AUTO_CLIP_MIN else math.inf

    def loss_scale(self, record: dict[str, float]) -> float | None:
        return record["std"] * self.target.N if "std" in record else None

    def postfix(self, record: dict[str, float]) -> dict[str, str]:
        name = next(iter(free_energy_columns(self.target)))
        return {"F/N": f"{record[name]:.5f}", "ess": f"{record['ess']:.3f}"}


def _state_copy(obj: Any) -> Any:
    """A deep copy of a state dict (dicts, lists and tuples of tensors and plain values): tensors
    cloned, containers rebuilt, anything else through ``copy.deepcopy``. The same result as
    ``copy.deepcopy`` at a fraction of its cost: the trainer snapshots its state every epoch, and at
    L=4 (h=128) deepcopy took 1.3–1.5 ms of a ~60 ms epoch for the model and Adam states, this
    0.2–0.4 ms (measured in one run, 1 thread)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        out = {k: _state_copy(v) for k, v in obj.items()}
        if type(obj) is dict:
            return out
        new = type(obj)(out)  # a state_dict's OrderedDict, with its _metadata (module versions)
        new.__dict__.update(copy.deepcopy(vars(obj)))
        return new
    if isinstance(obj, (list, tuple)):
        items = [_state_copy(v) for v in obj]
        return items if type(obj) is list else tuple(items) if type(obj) is tuple else copy.deepcopy(obj)
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return obj
    return copy.deepcopy(obj)


def path_gradient_surrogate(flow: Any, target: Target, x: Tensor, noise: Any = None) -> Tensor:
    """Per-sample surrogate whose parameter gradient is the path gradient of ln q(x) + E(x).

    The reverse-KL gradient ∇_θ E_z[ln q_θ(x) + E(x)], x = T_θ(z), is the total derivative of
    ln q_θ(T_θ(z)) + E(T_θ(z)): a path term g_x·∂_θx with g_x = ∇ₓ[ln q_θ(x) + E(x)], plus the
    score ∂_θ ln q_θ(x) at fixed x, whose expectation is zero (q_θ is normalised). The path
    gradient ("sticking the landing", Roeder et al. 2017; for continuous flows Vaitl et al.
    2022) keeps the path term only: unbiased, and zero per sample where q = p (g_x = 0).

    Here g_x comes from ``flow.score(x, noise)`` (the backward integration with the parameters
    held fixed) plus the autograd gradient of the energy, and the surrogate is g_x·x with g_x
    detached, whose backward runs through the sampling path only. Its value is not the loss.

    Discretisation: the flow's score is that of its integrated density, which matches the
    exact density of the RK4 map only to O(ε⁴) (the RK4 of d ln q/dt is not the log-det of
    the RK4 step, and backward RK4 is not the exact inverse of forward RK4): so the estimator
    is unbiased and zero-variance at the optimum up to O(ε⁴) (measured in
    tests/test_path_gradient.py: relative error of g_x about 1e-6 at ε = 0.1).

    Args:
        flow: the bare flow that drew x (with ``score`` and ``sample_noise``).
        target: the energy E.
        x: the samples with their graph to the parameters, shape (B, N).
        noise: the sample's per-step noise tokens (default: ``flow.sample_noise``).

    Returns:
        shape (B,), differentiable in the parameters through x.
    """
    if noise is None:
        noise = getattr(flow, "sample_noise", None)
    _, g = flow.score(x.detach(), noise=noise)
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        (ge,) = torch.autograd.grad(target.energy(xr).sum(), xr)
    return ((g + ge) * x).sum(1)


#: ``grad_clip="auto"`` clips the gradient norm at this multiple of its recent median ...
AUTO_CLIP = 3.0
#: ... over this many logged epochs ...
AUTO_CLIP_WINDOW = 50
#: ... once this many are logged (before: no clipping)
AUTO_CLIP_MIN = 10


def free_energy_columns(target: Any) -> dict[str, float]:
    """Log columns of the variational F/N and the offset per site added to the target's F/N in each.

    A target that knows several normalisations of its free energy says so in
    ``free_energy_offsets`` (name → offset per site, the first being its own, offset 0): the
    Ising HS target gives ``{"hs": 0, "ising": (ln Z_HS − ln Z_Ising)/N}``, logged as
    ``free_energy_hs`` and ``free_energy_ising``. Other targets log ``free_energy``.
    """
    offsets = getattr(target, "free_energy_offsets", None)
    if not offsets:
        return {"free_energy": 0.0}
    return {f"free_energy_{name}": float(off) for name, off in offsets.items()}


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int, warmup: int = 0,
                    final_fraction: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``final_fraction`` of the initial rate at ``epochs``."""

    def factor(e: int) -> float:
        if warmup and e < warmup:
            return (e + 1) / warmup
        return _cosine(min(1.0, (e - warmup) / max(1, epochs - warmup)), final_fraction)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _cosine(p: float, final_fraction: float) -> float:
    """The cosine decay's factor at progress p in [0, 1]: from 1 down to ``final_fraction``."""
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * p))


class WallClockCosine(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up over ``warmup`` epochs, then a cosine decay over ``minutes`` of training time.

    The cosine of :func:`cosine_schedule` with its progress measured in wall time instead of
    epochs: at the end of an epoch that finishes ``elapsed`` seconds of training (summed over
    resumes: the log's ``wall_time``), the rate is lr·(f + (1 − f)·½(1 + cos(π·min(1, elapsed/T))))
    with T = 60·minutes and f = ``final_fraction``. A run given a time budget then always ends
    its decay at the budget, on a fast machine or a slow one, instead of being cut off part way
    through a decay sized in epochs (or finishing it early). :class:`Trainer` sets
    :attr:`elapsed` before each step (agreed across ranks under torchrun: the largest) and
    stops once :attr:`finished`. The rate of each epoch is logged (``lr``), so a run's schedule
    can be read back, though not replayed on another machine.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, minutes: float, warmup: int = 0,
                 final_fraction: float = 0.01) -> None:
        if not (isinstance(minutes, (int, float)) and math.isfinite(minutes) and minutes > 0):
            raise ValueError(f"minutes must be a number > 0, got minutes={minutes!r}")
        self.seconds = 60.0 * float(minutes)
        self.warmup = check_size("warmup", warmup, minimum=0)
        self.final_fraction = float(final_fraction)
        #: seconds of training when the next rate is computed (set by the trainer before each step)
        self.elapsed = 0.0
        super().__init__(optimizer)

    @property
    def finished(self) -> bool:
        """True once the decay has run its minutes."""
        return self.elapsed >= self.seconds

    def factor(self) -> float:
        """The multiplier of the base rates for the next epoch (``last_epoch`` epochs done)."""
        e = self.last_epoch
        if self.warmup and e < self.warmup:
            return (e + 1) / self.warmup
        return _cosine(min(1.0, self.elapsed / self.seconds), self.final_fraction)

    def get_lr(self) -> list[float]:
        f = self.factor()
        return [base * f for base in self.base_lrs]

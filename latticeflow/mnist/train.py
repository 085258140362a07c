"""Maximum-likelihood training on MNIST (paper eq. 6) with the MAF protocol's early stopping.

"Monge-Ampère Flow for Generative Modeling" (Zhang, E, Wang, arXiv:1809.10188, section 4.1)
minimises the negative log-likelihood NLL = −E_{y∼π}[ln p_Y(y, T)] of the dequantised,
logit-transformed training images with Adam. :class:`DensityTrainer` is a configuration of
:class:`latticeflow.train.Trainer`: its :meth:`~DensityTrainer.run_epoch` is one pass over the
training set followed by the validation and test NLL, its
:meth:`~DensityTrainer.before_epoch` hook is the early-stopping rule (MAF's: ``patience`` epochs
without a lower validation NLL), and the generic loop supplies the log, the checkpoints, exact
resume, the wall-clock budget (also ending an epoch early through ``Trainer.deadline``), the
collective stop on SIGINT/SIGTERM and the divergence rule.

NLLs are in nats in logit space (the paper's Table 1 convention); bits/dim are in pixel space
(:func:`~latticeflow.mnist.protocol.nll_logit_to_bits_per_dim`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import distributed as dist
from ..checkpoint import load_checkpoint, save_checkpoint
from ..train import Trainer
from .config import MNISTConfig, as_config
from .model import build_model, log_prob
from .protocol import DequantizedBatches, MNISTData, nll_logit_to_bits_per_dim

__all__ = ["DensityTrainer", "make_trainer"]


def _stats(total: Tensor) -> dict[str, float]:
    """Mean and standard error from [n, Σnll, Σnll², Σbpd, Σbpd²] (float64)."""
    n, s1, s2, b1, b2 = (float(v) for v in total)

    def stderr(sum1: float, sum2: float) -> float:
        if n < 2:  # undefined; 0 rather than NaN, which the Trainer would take for divergence
            return 0.0
        var = max(sum2 - sum1 * sum1 / n, 0.0) / (n - 1)
        return math.sqrt(var / n)

    return {"nll": s1 / n, "nll_stderr": stderr(s1, s2), "bpd": b1 / n, "bpd_stderr": stderr(b1, b2), "images": n}


def _sums(nll: Tensor, bpd: Tensor) -> Tensor:
    """[n, Σnll, Σnll², Σbpd, Σbpd²] of per-image values (B,), float64: what ranks all-reduce."""
    nll, bpd = nll.double(), bpd.double()
    return torch.stack([nll.new_tensor(float(nll.numel())), nll.sum(), nll.square().sum(), bpd.sum(),
                        bpd.square().sum()])


class DensityTrainer(Trainer):
    """Maximum-likelihood training of a flow on MNIST (paper eq. 6) with early stopping.

    One epoch is one pass over the training set in minibatches with fresh dequantisation noise
    (drawn, like the shuffle, from the trainer's generator, so resume is exact), followed by
    the NLL of the validation and test sets with their fixed noise. Under torchrun, rank r
    trains on every world_size-th minibatch and evaluates every world_size-th evaluation batch;
    gradients are averaged by DDP and the sums behind the means and standard errors by
    all-reduce.

    The record of an epoch holds ``loss`` (the mean training NLL), and for ``train``,
    ``validation`` and ``test``: ``{set}_nll``, ``{set}_nll_stderr`` (nats, logit space),
    ``{set}_bpd``, ``{set}_bpd_stderr`` (bits/dim, pixel space), ``{set}_images``. The training
    numbers average over the epoch while the model changes (as in the paper's Fig. 3a).

    :meth:`~latticeflow.train.Trainer.fit` checkpoints every epoch. Early stopping: after
    ``patience`` epochs without a lower validation NLL it stops (``stop_reason = "early
    stopping"``); whenever the validation NLL improves, the model is saved to
    ``out_dir/best.pt``. The best epoch is read off the log, so a resumed run continues the
    count. A signal or the wall-clock budget also ends the epoch in progress early (after a
    minibatch, decided by all ranks together); its row records how many images it saw.

    Args:
        model: the flow (or :class:`~latticeflow.mnist.model.AffineFlow`), or a
            DistributedDataParallel wrapper of it.
        optimizer: over the flow's parameters.
        data: the three sets.
        batch_size: this rank's minibatch (the paper's global 100 over world_size ranks).
        eval_batch: images per evaluation integration.
        patience: epochs without improvement before stopping; None never stops early.
        eval_seed: validation noise is drawn with seed eval_seed + 1, test with eval_seed + 2
            (as ``python -m latticeflow.mnist --baseline`` does, so the test y are the same).
        grad_clip: clip the gradient norm at this value (None: no clipping).
        device: where the model lives; batches are made on the CPU and moved there.
        progress: a tqdm bar over the minibatches of each epoch.
        **kwargs: passed to :class:`~latticeflow.train.Trainer` (config, out_dir, generator).

    Raises:
        ValueError: a generator that is not on the CPU.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: MNISTData, *,
                 batch_size: int = 100, eval_batch: int = 500, patience: int | None = 30, eval_seed: int = 1,
                 grad_clip: float | None = None, device: torch.device | str = "cpu", progress: bool = True,
                 **kwargs: Any) -> None:
        if kwargs.get("generator") is not None and kwargs["generator"].device.type != "cpu":
            raise ValueError("the generator must be a CPU torch.Generator (dequantisation noise is drawn on the "
                             f"CPU), got one on {kwargs['generator'].device}")
        kwargs.setdefault("kind", "mnist")
        super().__init__(model, optimizer, progress=False, checkpoint_every=1, **kwargs)
        self.flow: torch.nn.Module = dist.unwrap(model)
        self.data = data
        self.batch_size = int(batch_size)
        self.eval_batch = int(eval_batch)
        self.patience = patience
        self.grad_clip = grad_clip
        self.device = torch.device(device)
        self.show_progress = progress
        self.eval_sets = {
            name: DequantizedBatches(getattr(data, name), self.eval_batch, seed=eval_seed + k, dtype=torch.float64)
            for k, name in ((1, "validation"), (2, "test"))
        }

    # ------------------------------------------------------------------ early stopping
    @property
    def best_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "best.pt"

    @property
    def best_epoch(self) -> int | None:
        """Epoch (1-based) of the lowest validation NLL so far (the first one on ties), or None."""
        rows = [r for r in self.records if math.isfinite(r.get("validation_nll", float("nan")))]
        if not rows:
            return None
        return int(min(rows, key=lambda r: r["validation_nll"])["epoch"])

    def should_stop_early(self) -> bool:
        """True when ``patience`` epochs have passed since the best validation NLL."""
        best = self.best_epoch
        return self.patience is not None and best is not None and self.epoch - best >= self.patience

    def before_epoch(self) -> str | None:
        """The hook of :meth:`Trainer.fit`: early stopping, then the collective stop decision.

        Before every epoch (so also when a resumed run has met its patience already): "early
        stopping" when :meth:`should_stop_early`; else "signal" or "time" when any rank caught a
        signal or is past the deadline (one all-reduce, the same verdict on every rank).
        """
        if self.should_stop_early():
            if dist.is_main():
                print(f"early stopping: no lower validation NLL for {self.epoch - self.best_epoch} epochs "
                      f"(patience {self.patience}); best epoch {self.best_epoch}")
            return "early stopping"
        stop_signal, late = self.agree_to_stop(self.deadline is not None and time.perf_counter() >= self.deadline)
        if stop_signal is not None:
            self.stop_signal = stop_signal
            return "signal"
        return "time" if late else None

    def save_best(self, epoch: int, validation_nll: float) -> Path | None:
        """Write the flow's weights and config to ``best.pt`` (rank 0 only)."""
        if self.best_path is None or not dist.is_main():
            return None
        return save_checkpoint({"format": "latticeflow-mnist-best-1", "config": self.config, "epoch": epoch,
                                "validation_nll": validation_nll, "model": self.flow.state_dict()}, self.best_path)

    def best_record(self) -> dict[str, float]:
        """The log's row of the best validation epoch (its test and validation numbers were measured
        with the best weights and the fixed noise, so they need no second evaluation).

        Raises:
            RuntimeError: no epoch in the log, or none with a finite validation NLL.
        """
        if not self.records:
            raise RuntimeError("no epoch completed; nothing to evaluate")
        best = self.best_epoch
        if best is None:
            raise RuntimeError("no finite validation NLL in the log; nothing to report")
        return next(r for r in self.records if r["epoch"] == best)

    def restore_best(self) -> None:
        """Load ``best.pt`` into the flow (the model the paper's protocol reports), if it was written."""
        if self.best_path is not None and self.best_path.is_file():
            self.flow.load_state_dict(load_checkpoint(self.best_path)["model"])

    # ------------------------------------------------------------------ evaluation
    def _step_flags(self, loss: Tensor) -> tuple[bool, bool]:
        """(non-finite loss, signal or deadline), agreed by all ranks in one all-reduce, so that
        no rank leaves the epoch while the others wait for it in a collective."""
        flags = torch.tensor([float(not torch.isfinite(loss.detach()).item()),
                              float(self._stop_signal is not None
                                    or (self.deadline is not None and time.perf_counter() > self.deadline))])
        if dist.world_size() > 1:
            flags = dist.all_reduce_sum(flags.to(self.device)).cpu()
        return bool(flags[0] > 0), bool(flags[1] > 0)

    @torch.no_grad()
    def log_prob_set(self, name: str) -> tuple[Tensor, Tensor]:
        """ln p_Y and the logit log-Jacobian of the whole ``validation`` or ``test`` set (this rank).

        Returns:
            logp: shape (N,), float64; log_det: shape (N,), float64 (see ``logit_transform``).
        """
        y, log_det = self.eval_sets[name].fixed()
        return log_prob(self.flow, y, self.eval_batch), log_det

    @torch.no_grad()
    def evaluate(self, name: str) -> dict[str, float]:
        """NLL (nats, logit space) and bits/dim with standard errors on ``validation`` or ``test``.

        Returns:
            stats: ``nll``, ``nll_stderr``, ``bpd``, ``bpd_stderr``, ``images``.
        """
        if name not in self.eval_sets:
            raise ValueError(f"name must be one of {', '.join(map(repr, self.eval_sets))}; got name={name!r}")
        was_training = self.flow.training
        self.flow.eval()
        D = self.data.dim
        total = torch.zeros(5, dtype=torch.float64)
        rank, world = dist.rank(), dist.world_size()
        for k, (y, log_det) in enumerate(self.eval_sets[name]):
            if k % world != rank:
                continue
            logp = self.flow.log_prob(y.to(self.device, self.flow.dtype)).double().cpu()
            total += _sums(-logp, nll_logit_to_bits_per_dim(logp, log_det, D))
        self.flow.train(was_training)
        return _stats(dist.all_reduce_sum(total.to(self.device)).cpu())

    # ------------------------------------------------------------------ one epoch
    def run_epoch(self, epoch: int) -> dict[str, float]:
        self.flow.train()
        D = self.data.dim
        batches = DequantizedBatches(self.data.train, self.batch_size, generator=self.generator, dtype=torch.float64)
        rank, world = dist.rank(), dist.world_size()
        usable = len(batches) - len(batches) % world  # equal step counts on every rank
        if usable == 0:
            raise ValueError(f"{len(batches)} minibatch(es) of {self.batch_size} cannot be shared by {world} processes")
        bar = tqdm(total=usable // world, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True,
                   disable=not (self.show_progress and dist.is_main()))
        total = torch.zeros(5, dtype=torch.float64)
        t0 = time.perf_counter()
        try:
            for k, (y, log_det) in enumerate(batches):
                if k >= usable:
                    break
                if k % world != rank:
                    continue  # the noise of every batch is drawn on every rank: generators stay in step
                logp = self.model(y.to(self.device, self.flow.dtype))  # flow.forward is log_prob (eq. 6)
                loss = -logp.mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nonfinite, interrupted = self._step_flags(loss)
                if nonfinite:  # before the step: the parameters stay finite
                    return {"loss": float("nan")}
                if self.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.flow.parameters(), self.grad_clip)
                self.optimizer.step()
                logp = logp.detach().double().cpu()
                total += _sums(-logp, nll_logit_to_bits_per_dim(logp, log_det, D))
                bar.update(1)
                bar.set_postfix(nll=f"{-float(logp.mean()):.1f}")
                if interrupted:  # checked after a step, so a partial epoch has trained on something
                    break
        finally:
            bar.close()
        train_seconds = time.perf_counter() - t0
        train = _stats(dist.all_reduce_sum(total.to(self.device)).cpu())
        record = self._record(train, train_seconds)
        best = self.best_epoch
        best_nll = self.records[best - 1]["validation_nll"] if best is not None else math.inf
        if record["validation_nll"] < best_nll:
            self.save_best(epoch + 1, record["validation_nll"])
        return record

    def _record(self, train: dict[str, float], train_seconds: float) -> dict[str, float]:
        record: dict[str, float] = {"loss": train["nll"]}
        for name, stats in (("train", train), ("validation", self.evaluate("validation")), ("test", self.evaluate("test"))):
            for key, value in stats.items():
                record[f"{name}_{key}"] = int(value) if key == "images" else value
        record["train_seconds"] = train_seconds
        return record

    def postfix(self, record: dict[str, float]) -> dict[str, str]:
        return {"val": f"{record['validation_nll']:.1f}", "test": f"{record['test_nll']:.1f}"}

    #: an epoch's record ends with the validation of its final state, so the state at the start of
    #: the diverging epoch is the one a good loss vouches for (see Trainer.divergence)
    verified_lag = 1

    def loss_scale(self, record: dict[str, float]) -> float | None:
        """Per-image standard deviation of the training NLL (from its standard error)."""
        if "train_nll_stderr" not in record:
            return None
        return record["train_nll_stderr"] * math.sqrt(max(1, record.get("train_images", 1)))


def make_trainer(config: MNISTConfig | dict[str, Any], data: MNISTData, device: torch.device | str = "cpu",
                 out_dir: str | Path | None = None, progress: bool = True, fit: bool = True) -> DensityTrainer:
    """Model, Adam and :class:`DensityTrainer` for a config (DDP-wrapped under torchrun).

    Args:
        config: an :class:`MNISTConfig` (or its dict).
        data: the three sets.
        device: where the model lives.
        out_dir: folder for log, checkpoints and ``best.pt``; None keeps everything in memory.
        progress: a bar over the minibatches.
        fit: fit the whitening of a ``whiten`` config (see :func:`~latticeflow.mnist.model.build_model`);
            False for a trainer that will load a checkpoint.

    Returns:
        trainer: its ``config`` is the config's plain dict (as checkpoints store it).
    """
    cfg = as_config(config)
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    flow = build_model(cfg, data, fit=fit).to(device)
    model: torch.nn.Module = flow
    if dist.world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(flow, device_ids=[device] if device.type == "cuda" else None)
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr)
    local_batch = dist.local_share(cfg.batch)
    return DensityTrainer(model, opt, data, batch_size=local_batch, eval_batch=cfg.eval_batch,
                          patience=cfg.patience, eval_seed=cfg.eval_seed, grad_clip=cfg.grad_clip,
                          device=device, progress=progress, config=cfg.to_dict(), out_dir=out_dir,
                          generator=torch.Generator().manual_seed(cfg.seed))

"""One flow for a range of β: a β-conditioned potential trained on the whole range at once.

The alternative to a sweep's one-flow-per-β (``latticeflow.sweep``): the potential is a Legendre
series in β (:class:`latticeflow.potentials.conditioned.Conditioned`, each coefficient a potential
of the configured family), each training sample draws its own β from the range (stratified:
one β per slice of width (hi − lo)/B, so every batch covers the range), and the loss is the
reverse KL averaged over β, Σ_b [ln q(x_b|β_b) + E_β_b(x_b)]/B. Each β has its own HS target:
M(β) = β·J·A + α(β)I with α(β) = 0.1 − β·J·λ_min(A), applied per sample by FFT
(:class:`IsingFamily`). The log reports the mean variational gap per site, F_var/N − F_exact/N
averaged over the batch's β (Kaufman's exact value, per sample, from a spline of a 401-point
table; ≥ 0 in expectation): the training curve of the whole range.

Measurement: :class:`AtBeta` fixes β and turns the conditioned flow into an ordinary flow
(``sample``, ``log_prob``) that ``analysis.thermo`` measures like a sweep's β; a β outside the
trained range is refused (the series does not extrapolate).

Reference: the β-conditioning of flows for lattice field theory (e.g. Gerdes et al. 2023,
"Learning lattice quantum field theories with equivariant continuous flows") — here with the
exact HS Ising target and Kaufman's finite-L values to check it.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ._checks import check_batch, check_beta, check_size
from .build import DTYPES, as_config, build_potential, lattice_quadratics, parameter_groups
from .config import IsingConfig, refuse_schedule_minutes
from .distributed import rank_generator
from .flow import MongeAmpereFlow, WrappedFlow, derived_generator
from .ising import MIN_EIGENVALUE, ising
from .lattice import SquareLattice
from .potentials.activations import log_cosh
from .potentials.conditioned import Conditioned
from .stats import kish_ess
from .train import VariationalTrainer, cosine_schedule

__all__ = ["AtBeta", "ConditionedTrainer", "IsingFamily", "build_conditioned_flow", "make_conditioned_trainer",
           "start_at_best_gaussians"]

#: points of the exact-F/N table the log's gap interpolates (a cubic spline: error < 1e-9 per site)
EXACT_TABLE_POINTS = 401


class IsingFamily:
    """The HS targets of the L×L periodic Ising model for β in [low, high], one β per sample.

    Attributes:
        N, lattice, J, low, high; ``at(beta)`` gives the ordinary :class:`~latticeflow.ising.IsingHS`.
    """

    def __init__(self, L: int, low: float, high: float, J: float = 1.0) -> None:
        low, high = check_beta(low), check_beta(high)
        if not low < high:
            raise ValueError(f"the β range must have low < high, got [{low!r}, {high!r}]")
        self.low, self.high, self.J = low, high, float(J)
        self.lattice = SquareLattice(check_size("L", L, minimum=2))
        self.N = self.lattice.N
        self._L = self.lattice.L
        lam = torch.fft.fft2(self.J * self.lattice.coupling_kernel()).real  # (L, L) eigenvalues of J·A
        self._lam = lam
        self._lam_min = float(lam.min())
        grid = np.linspace(low, high, EXACT_TABLE_POINTS)
        f = np.array([self.at(float(b)).exact_free_energy() for b in grid])
        from scipy.interpolate import CubicSpline

        self._exact = CubicSpline(grid, f)

    def __repr__(self) -> str:
        return f"IsingFamily(L={self._L}, beta=[{self.low:g}, {self.high:g}], J={self.J:g})"

    def at(self, beta: float) -> Any:
        """The ordinary HS target at one β (any β > 0: references are not limited to the range)."""
        return ising(self._L, beta, J=self.J)

    def alpha(self, beta: Tensor) -> Tensor:
        """The shift α(β) = 0.1 − β·λ_min(J·A), so that M(β) has smallest eigenvalue 0.1."""
        return MIN_EIGENVALUE - beta * self._lam_min

    def energy(self, x: Tensor, beta: Tensor) -> Tensor:
        """E_β(x) = ½ xᵀM(β)⁻¹x − Σ ln cosh x_i per sample: x (B, N), β (B,) → (B,)."""
        x = check_batch(x, self.N)
        L = self._L
        b = beta.to(x).reshape(-1, 1, 1)
        mu = b * self._lam.to(x) + self.alpha(b)  # (B, L, L)
        y = torch.fft.irfft2(torch.fft.rfft2(x.reshape(-1, L, L)) / mu[..., : L // 2 + 1], s=(L, L))
        return 0.5 * (x * y.reshape(x.shape)).sum(-1) - log_cosh(x).sum(-1)

    def exact_free_energy(self, beta: Tensor | np.ndarray | float) -> np.ndarray:
        """Kaufman's −ln Z_HS/N at each β of the range (spline of the exact table)."""
        b = np.asarray(beta.detach().cpu() if isinstance(beta, Tensor) else beta, dtype=np.float64)
        if b.size and (b.min() < self.low - 1e-12 or b.max() > self.high + 1e-12):
            raise ValueError(f"β outside the family's range [{self.low:g}, {self.high:g}]")
        return self._exact(b)

    def draw(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """β for a batch, stratified: one uniform draw in each of ``batch`` equal slices of the range, float64 (B,)."""
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
        return self.low + (torch.arange(batch, dtype=torch.float64) + u) * ((self.high - self.low) / batch)


class AtBeta(WrappedFlow):
    """A β-conditioned flow at one fixed β: a :class:`~latticeflow.flow.Flow` like any other
    (``sample``, ``log_prob``, the maps and noise tokens, which carry the β).

    Raises:
        ValueError: β outside the flow's trained range.
    """

    def __init__(self, flow: MongeAmpereFlow, beta: float) -> None:
        super().__init__(flow)
        self.beta = check_beta(beta)
        _conditioned(flow).check_range(self.beta)

    def _at(self) -> Any:
        return _conditioned(self.flow).condition(self.beta)

    def draw_noise(self, batch: int, generator: torch.Generator | None = None,
                   noise: Sequence[Any] | None = None) -> list[Any] | None:
        with self._at():
            return self.flow.draw_noise(batch, generator, noise)

    def sample(self, n: int, generator: torch.Generator | None = None, **kw: Any) -> tuple[Tensor, Tensor]:
        with self._at():
            return self.flow.sample(n, generator=generator, **kw)

    def log_prob(self, x: Tensor, generator: torch.Generator | None = None, **kw: Any) -> Tensor:
        with self._at():
            return self.flow.log_prob(x, generator=generator, **kw)

    def forward_map(self, z: Tensor, generator: torch.Generator | None = None,
                    noise: Sequence[Any] | None = None, **kw: Any) -> tuple[Tensor, Tensor]:
        with self._at():
            return self.flow.forward_map(z, generator=generator, noise=noise, **kw)

    def inverse_map(self, x: Tensor, generator: torch.Generator | None = None,
                    noise: Sequence[Any] | None = None, **kw: Any) -> tuple[Tensor, Tensor]:
        with self._at():
            return self.flow.inverse_map(x, generator=generator, noise=noise, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.log_prob(x)


def _conditioned(flow: Any) -> Conditioned:
    pot = getattr(flow, "potential", None)
    if not isinstance(pot, Conditioned):
        raise TypeError(f"expected a flow with a Conditioned potential, got {type(pot).__name__}")
    return pot


def build_conditioned_flow(config: IsingConfig | dict[str, Any], low: float, high: float,
                           degree: int = 2) -> MongeAmpereFlow:
    """The flow of ``config`` with its potential replaced by a degree-``degree`` Legendre series in β
    on [low, high] whose coefficients are ``degree + 1`` independent potentials of the config's family."""
    lattice = SquareLattice(int(config["L"]))
    cfg = as_config(config, lattice)
    degree = check_size("degree", degree, minimum=0)
    parts = [build_potential(cfg, lattice) for _ in range(degree + 1)]
    flow = MongeAmpereFlow(Conditioned(parts, low, high), n_steps=cfg.n_steps, step_size=cfg.step_size,
                           checkpoint=cfg.grad_checkpoint)
    return flow.to(DTYPES[cfg.dtype])


@torch.no_grad()
def start_at_best_gaussians(flow: MongeAmpereFlow, family: IsingFamily, points: int = 17) -> float:
    """Set the quadratic parts so that the flow starts at each β's best Gaussian (to the series' degree).

    The best Gaussian's kernel a*(β) (``IsingHS.best_gaussian`` and
    ``QuadraticPotential.set_covariance``) at ``points`` Chebyshev nodes of the range is fitted by
    least squares with the Legendre series Σ_j P_j(u) a_j; part j's quadratic kernel is set to a_j.

    Returns:
        the largest fit residual of the kernels (0 for an exact fit); NaN when the parts have no
        quadratic potential (nothing changed).
    """
    pot = _conditioned(flow)
    found = [lattice_quadratics(part) for part in pot.parts]
    if not all(found):
        return math.nan
    quads = [q[0] for q in found]
    T = float(flow.n_steps * flow.step_size)
    nodes = 0.5 * (family.low + family.high) + 0.5 * (family.high - family.low) * np.cos(
        np.pi * (np.arange(points) + 0.5) / points)
    probe = copy.deepcopy(quads[0]).double()
    kernels = []
    for b in nodes:
        probe.set_covariance(family.at(float(b)).best_gaussian()["spectrum"], T)
        kernels.append(probe.a.detach().clone())
    A = torch.stack(kernels)  # (points, orbits)
    P = pot.basis(torch.as_tensor(nodes, dtype=torch.float64)).double()  # (points, k)
    coef = torch.linalg.lstsq(P, A).solution  # (k, orbits)
    for q, a in zip(quads, coef):
        q.a.copy_(a.to(q.a))
        for extra in (q.a_t, q.b, q.b_t):
            if extra is not None:
                extra.zero_()
    return float((P @ coef - A).abs().max())


class ConditionedTrainer(VariationalTrainer):
    """Reverse KL averaged over β: each sample draws β (stratified over the range) and its own target.

    Logs per epoch ``loss`` (the mean of ln q + E_β per sample), ``gap`` (the mean over the batch
    of F_var/N − F_exact(β)/N, whose expectation is the β-averaged KL per site, ≥ 0), its
    ``stderr`` and ``std``, the Kish ``ess`` of the exactly normalised weights e^{−(f − F_exact(β))},
    and the mean ``free_energy_hs`` of the batch (over its β, for the divergence rule's scale).
    """

    def __init__(self, flow: MongeAmpereFlow, family: IsingFamily, optimizer: torch.optim.Optimizer,
                 **kwargs: Any) -> None:
        if kwargs.get("gradient_estimator", "total") != "total":
            raise ValueError("the β-conditioned trainer supports gradient_estimator='total' only")
        super().__init__(flow, family.at(0.5 * (family.low + family.high)), optimizer, **kwargs)
        self.family = family
        self._conditioned = _conditioned(self.flow)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        beta = self.family.draw(self.local_batch, generator=derived_generator(self.generator))  # apart from z
        with self._conditioned.condition(beta):
            x, logp = self.flow.sample(self.local_batch, generator=self.generator)
        f = logp + self.family.energy(x, beta)
        self.optimizer.zero_grad(set_to_none=True)
        fd = f.detach()
        if not bool(torch.isfinite(fd).all()):
            return {"loss": float("nan")}
        f.mean().backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.flow.parameters(), self.clip_limit())
        self.optimizer.step()
        N = self.family.N
        exact = torch.as_tensor(self.family.exact_free_energy(beta), dtype=torch.float64)
        gap = fd.double() / N - exact  # per sample, per site
        n = gap.numel()
        return {
            "loss": float(fd.mean()),
            "gap": float(gap.mean()),
            "free_energy_hs": float(fd.mean()) / N,
            "stderr": float(gap.std() / math.sqrt(n)) if n > 1 else float("nan"),
            "std": float(gap.std()) if n > 1 else float("nan"),
            "ess": float(kish_ess(-gap * N)),
            "grad_norm": float(grad_norm),
        }

    def postfix(self, record: dict[str, float]) -> dict[str, str]:
        return {"gap/N": f"{record['gap']:.5f}", "ess": f"{record['ess']:.3f}"}


def make_conditioned_trainer(config: IsingConfig, low: float, high: float, degree: int = 2,
                             device: torch.device | str = "cpu", out_dir: Any = None, progress: bool = True,
                             checkpoint_every: int = 100) -> tuple[ConditionedTrainer, IsingFamily]:
    """Family, β-conditioned flow (started at each β's best Gaussian), Adam, schedule and trainer."""
    family = IsingFamily(config.L, low, high, J=config.J)
    torch.manual_seed(config.seed)
    flow = build_conditioned_flow(config, low, high, degree)
    if config.quadratic_init == "gaussian":
        start_at_best_gaussians(flow, family)
    flow = flow.to(device)
    opt = torch.optim.Adam(parameter_groups(flow, config, family.N), lr=config.lr, weight_decay=config.weight_decay)
    sched = cosine_schedule(opt, config.epochs, warmup=config.warmup) if config.schedule == "cosine" else None
    gen = rank_generator(config.seed, device)  # mixed by SeedSequence, never the raw small seed
    trainer = ConditionedTrainer(flow, family, opt, batch_size=config.batch_size, scheduler=sched,
                                 config={**config.to_dict(), "conditioned": {"low": low, "high": high,
                                                                             "degree": degree}},
                                 grad_clip=config.grad_clip, out_dir=out_dir, generator=gen, progress=progress,
                                 checkpoint_every=checkpoint_every, seed=config.seed, kind="ising",
                                 max_rollbacks=config.max_rollbacks, rank_streams=False)
    return trainer, family


def grid_range(betas: Sequence[float]) -> tuple[float, float]:
    """The trained range of a β grid: [min, max] (a conditioned flow is measured only inside it)."""
    lo, hi = float(min(betas)), float(max(betas))
    if not lo < hi:
        raise ValueError("a β-conditioned flow needs a grid of at least two distinct β")
    return lo, hi


# ---------------------------------------------------------------------------------------------
# The sweep with one conditioned flow
# ---------------------------------------------------------------------------------------------

#: the folder of the conditioned flow's training run inside a sweep folder
FLOW_FOLDER = "conditioned_flow"


def conditioned_sweep(config: IsingConfig | None, betas: Any, *, degree: int | None = 2, out: Any = None,
                      samples: int | None = None, step_check: int | None = None, max_minutes: float | None = None,
                      resume: bool = False, force: bool = False, device: str | torch.device = "cpu",
                      progress: bool = False, verbose: bool = False, plot: bool = True,
                      checkpoint_every: int = 100) -> Any:
    """Train one β-conditioned flow on [min β, max β] for ``config.epochs``, then measure every β of the grid.

    The same tidy table, folder layout of measured β (``b{k}_{β}/estimates.csv``), manifest
    (``sweep.json``, with ``"method": "conditioned"`` and the ``degree``) and figure as
    :func:`latticeflow.sweep.sweep`; the flow trains in ``conditioned_flow/`` (log.csv, checkpoint).
    Resumable: an interrupted training continues from its checkpoint, measured β are read back.
    Arguments as :func:`latticeflow.sweep.sweep` (``degree``: of the Legendre series in β).
    """
    import shutil
    import time
    from pathlib import Path

    import pandas as pd

    from .runs import RunFolder, RunFolderError, write_json
    from .sweep import (DEFAULT_SAMPLES, DEFAULT_STEP_CHECK, ESTIMATES, MANIFEST, SWEEP_FILES, _manifest, _say,
                        collect_and_plot, measure_beta, parse_beta_grid, resumed_manifest)

    t0 = time.perf_counter()
    folder = Path(out) if out is not None else None
    if resume:
        manifest = resumed_manifest(folder)
        if manifest.get("method") != "conditioned":
            raise ValueError(f"{folder} holds a warm-started sweep, not a β-conditioned one")
        config = IsingConfig.from_dict(manifest["config"])
        grid = tuple(float(b) for b in manifest["betas"])
        samples, step_check, degree = int(manifest["samples"]), int(manifest["step_check"]), int(manifest["degree"])
    else:
        if not isinstance(config, IsingConfig):
            raise TypeError(f"config must be an IsingConfig, got {type(config).__name__}")
        if config.anneal_from is not None:
            raise ValueError("anneal_from does not apply to a β-conditioned sweep (it trains every β at once)")
        refuse_schedule_minutes(config)
        if config.mixture != "none" or config.gradient_estimator != "total":
            raise ValueError("a β-conditioned sweep supports neither --mixture nor --gradient-estimator path yet")
        grid = parse_beta_grid(betas)
        degree = check_size("degree", degree, minimum=0)
        samples = check_size("samples", samples if samples is not None else DEFAULT_SAMPLES, 2)
        step_check = check_size("step_check", step_check if step_check is not None else DEFAULT_STEP_CHECK)
        manifest = {**_manifest(config, grid, 0, samples, step_check), "method": "conditioned", "degree": degree,
                    "order": f"one flow conditioned on β in [{min(grid):g}, {max(grid):g}] (Legendre degree "
                             f"{degree}), trained for config.epochs, then measured at every β"}
    low, high = grid_range(grid)
    if max_minutes is not None and not (isinstance(max_minutes, (int, float)) and max_minutes > 0):
        raise ValueError(f"max_minutes must be a number > 0 or None, got max_minutes={max_minutes!r}")
    device = torch.device(device)
    flow_dir = folder / FLOW_FOLDER if folder is not None else None
    root = None
    stale: list[Path] = []
    if folder is not None:
        root = RunFolder(folder, resume=folder / MANIFEST if resume else None, force=force, outputs=SWEEP_FILES).check()
        if not resume:  # a fresh sweep never continues a flow or β folders it did not write
            stale = [p for p in [flow_dir, *(folder / n for n in manifest["runs"])] if p.is_dir() and any(p.iterdir())]
            if stale and not force:
                raise RunFolderError(f"{folder} already holds runs ({', '.join(p.name for p in stale)}): continue a "
                                     f"sweep with --resume {folder}, choose another --out, or replace it with --force")
    trainer, family = make_conditioned_trainer(config, low, high, degree, device, None if flow_dir is None
                                               else str(flow_dir), progress=progress,
                                               checkpoint_every=checkpoint_every)
    done: dict[int, pd.DataFrame] = {}
    try:
        if root is not None:
            root.claim()
            for p in stale:  # --force
                shutil.rmtree(p)
            if not resume:
                write_json(folder / MANIFEST, manifest)
        ckpt = flow_dir / "checkpoint.pt" if flow_dir is not None else None
        if ckpt is not None and ckpt.is_file():
            trainer.load(ckpt)
        if trainer.epoch < config.epochs:
            if verbose:
                print(f"β-conditioned flow on [{low:g}, {high:g}] (degree {degree}): {config.epochs} epochs"
                      + (f", resumed at epoch {trainer.epoch}" if trainer.epoch else ""), flush=True)
            trainer.fit(config.epochs, max_minutes=max_minutes)
        log = trainer.log
        train_s = float(log["wall_time"].iloc[-1]) if len(log) else 0.0
        stop_reason = "finished" if trainer.epoch >= config.epochs else trainer.stop_reason
        if stop_reason == "finished":
            for k, beta in enumerate(grid):
                run = folder / manifest["runs"][k] if folder is not None else None
                if run is not None and (run / ESTIMATES).is_file():
                    done[k] = pd.read_csv(run / ESTIMATES)
                    continue
                table = measure_beta(AtBeta(trainer.flow, beta), family.at(beta), k, config, samples, step_check,
                                     run, epochs=trainer.epoch, warm_start_from=f"conditioned (degree {degree})",
                                     train_s=train_s)
                done[k] = table
                if verbose:
                    _say(table, beta)
        table = collect_and_plot(folder, done, config, plot, "one β-conditioned flow")
    finally:
        if root is not None:
            root.release()
    table.attrs.update(stop_reason=stop_reason, stop_signal=trainer.stop_signal, out=str(folder) if folder else None,
                       finished=[grid[k] for k in sorted(done)], betas=list(grid), wall_s=time.perf_counter() - t0)
    return table

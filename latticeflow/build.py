"""Build flows from a configuration, so a checkpoint's config rebuilds its model.

A config is an :class:`~latticeflow.config.IsingConfig` (the flags of ``models/ising.py``) or a
plain dict of its keys, completed by the built-in default. The
potential is named by a ``+``-separated list of parts, e.g. ``"quadratic+mlp"``:

    mlp        the paper's one-hidden-layer network Σ_k w_k a(W_k·x + b_k) (section 3)
    quadratic  ½ xᵀAx with a translation- and D4-invariant A (an exactly Gaussian flow)
    conv       translation-invariant convolutional potential on the periodic lattice

Symmetrisation (``symmetrize``) averages the network parts over a group:
``none``, ``random`` (the paper's one random element per sample per step) or ``exact``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._checks import check_choice
from .config import GROUPS, IsingConfig
from .flow import MongeAmpereFlow
from .lattice import SquareLattice
from .mixture import SymmetricMixture
from .potentials import ConvPotential, MLPPotential, Potential, QuadraticPotential, Symmetrized
from .symmetry import SymmetryGroup, point_group, space_group, spin_flip_group, translation_group

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def as_config(config: IsingConfig | dict[str, Any], lattice: SquareLattice) -> IsingConfig:
    """``config`` as an :class:`IsingConfig`; a dict is completed by the built-in default (with the
    lattice's L when it names none).

    Raises:
        ValueError: an unknown key (naming the closest valid one), an invalid value, or a config
            for another L than ``lattice``'s.
    """
    cfg = config if isinstance(config, IsingConfig) else IsingConfig.from_dict({"L": lattice.L, **config})
    if cfg.L != lattice.L:
        raise ValueError(f"the config is for L={cfg.L}, the lattice has L={lattice.L}")
    return cfg


def make_group(name: str, lattice: SquareLattice) -> SymmetryGroup:
    """Group by name: 'space+z2' (16L² elements), 'space', 'translation(+z2)', 'd4(+z2)', 'z2'."""
    check_choice("group", name, GROUPS)
    base, _, flip = name.partition("+")
    if base == "z2":
        return spin_flip_group(lattice.N)
    g = {"space": space_group, "translation": translation_group, "d4": point_group}[base](lattice)
    return g.with_spin_flip() if flip else g


def build_potential(config: IsingConfig | dict[str, Any], lattice: SquareLattice) -> Potential:
    """The potential described by ``config`` on ``lattice`` (see the module docstring).

    Raises:
        ValueError: an unknown key (see :func:`check_config_keys`) or value.
    """
    cfg = as_config(config, lattice).to_dict()
    parts = cfg["potential"].split("+")
    group = make_group(cfg["group"], lattice) if cfg["symmetrize"] != "none" else None
    z2 = group is not None and bool((group.signs < 0).any())
    pots: list[Potential] = []
    for p in parts:
        if p == "quadratic":
            # translation/D4 invariant by construction; no linear term, so also Z2-even
            pots.append(QuadraticPotential((lattice.L, lattice.L), symmetric="d4", linear=False,
                                           time_dependent=cfg["time_dependent"]))
        elif p == "conv":
            pots.append(ConvPotential(lattice.L, channels=cfg["channels"], layers=int(cfg["conv_layers"]),
                                      kernel_size=cfg["kernel_size"], activation="lncosh" if z2 else cfg["activation"],
                                      d4=True, z2=z2, time_dependent=cfg["time_dependent"],
                                      init_scale=cfg["init_scale"]))
        else:
            net = MLPPotential(lattice.N, cfg["hidden"], activation=cfg["activation"], bias=bool(cfg["bias"]),
                               time_dependent=cfg["time_dependent"], init_scale=cfg["init_scale"])
            pots.append(Symmetrized(net, group, mode=cfg["symmetrize"]) if group is not None else net)
    total = pots[0]
    for p in pots[1:]:
        total = total + p
    return total


def build_flow(config: IsingConfig | dict[str, Any], lattice: SquareLattice) -> MongeAmpereFlow | SymmetricMixture:
    """A :class:`MongeAmpereFlow` from ``config`` (an :class:`~latticeflow.config.IsingConfig`, or a
    dict completed by the built-in default: see :func:`as_config`), in the config's dtype.

    With ``mixture`` other than ``"none"`` the flow is wrapped in a
    :class:`~latticeflow.mixture.SymmetricMixture` over that group, which makes the density
    exactly invariant (at |G| times the cost).
    """
    cfg = as_config(config, lattice).to_dict()
    flow = MongeAmpereFlow(build_potential(cfg, lattice), n_steps=int(cfg["n_steps"]),
                           step_size=float(cfg["step_size"]), checkpoint=bool(cfg["grad_checkpoint"]))
    if cfg["mixture"] != "none":
        flow = SymmetricMixture(flow, make_group(cfg["mixture"], lattice))
    return flow.to(DTYPES[cfg["dtype"]])


# ---------------------------------------------------------------------------------------------
# The whole variational run
# ---------------------------------------------------------------------------------------------

#: the largest RK4 step measured to keep the variational bound (README, Results: 0.2 broke it at L=4)
MAX_SAFE_STEP = 0.1


def lattice_quadratics(potential: Any) -> list[QuadraticPotential]:
    """The lattice quadratic parts (circulant kernels, which ``set_covariance`` can set) of a potential or sum."""
    parts = getattr(potential, "parts", [potential])
    return [p for p in parts if isinstance(p, QuadraticPotential) and p.orbits is not None]


def start_at_best_gaussian(flow: Any, target: Any) -> dict[str, Any] | None:
    """Set the flow's quadratic part so that the flow starts at the target's best Gaussian.

    The other parts start near zero (``init_scale``), so the initial flow is close to the map
    N(0, I) → N(0, Σ*) with Σ* from ``target.best_gaussian()`` (closed form; for the Ising HS
    target at β_c its F/N is about 0.14 above exact, against about 0.95 for the identity map).

    Measured at L=8, β_c (default recipe, 600 epochs, same wall time): final error 2.28e-3 and
    1.44e-3 against 3.03e-3 and 3.39e-3 from the identity map (seeds 0 and 1).

    Returns:
        the ``best_gaussian`` dict, or None (nothing changed) when the flow has no quadratic
        part or the target no ``best_gaussian`` (e.g. φ⁴, dense couplings).
    """
    flow = getattr(flow, "flow", flow)  # a wrapped flow (SymmetricMixture): the ODE flow inside
    quads = lattice_quadratics(getattr(flow, "potential", None))
    if not quads or not callable(getattr(target, "best_gaussian", None)):
        return None
    try:
        best = target.best_gaussian()
    except ValueError:  # no closed form for this target (dense couplings)
        return None
    quads[0].set_covariance(best["spectrum"], float(flow.n_steps * flow.step_size))
    return best


def parameter_groups(flow: torch.nn.Module, config: IsingConfig, N: int) -> list[dict[str, Any]]:
    """Adam's parameter groups: everything at ``config.lr``, and the extensive parameters (the MLP
    parts' h×N input weights, the quadratic parts' displacement kernels a and a') at
    :func:`~latticeflow.config.extensive_learning_rate` when that differs (one group otherwise, as
    checkpoints written before the rule have)."""
    from .config import extensive_learning_rate

    lr_ext = extensive_learning_rate(config, N)
    wide = [m.weight for m in flow.modules() if isinstance(m, MLPPotential)]
    wide += [p for m in flow.modules() if isinstance(m, QuadraticPotential) and m.symmetric != "none"
             for p in (m.a, m.a_t) if p is not None]
    if not wide or lr_ext == config.lr:
        return [{"params": list(flow.parameters())}]
    ids = {id(p) for p in wide}
    return [{"params": [p for p in flow.parameters() if id(p) not in ids]}, {"params": wide, "lr": lr_ext}]


def annealed_targets(config: IsingConfig, target: Any) -> Callable[[int], Any]:
    """epoch ↦ the Ising target at ``config.anneal_beta(epoch)`` (``target`` itself once at β); the latest
    one is kept (0.05 ms to build at L=16, 16 ms at L=64)."""
    from .ising import ising

    latest = {config.beta: target}

    def target_at(epoch: int) -> Any:
        beta = config.anneal_beta(epoch)
        if beta not in latest:
            latest.clear()
            latest[beta] = target if beta == config.beta else ising(config.L, beta, J=config.J)
        return latest[beta]

    return target_at


def make_trainer(config: IsingConfig | dict[str, Any], device: torch.device | str = "cpu", out_dir: Any = None,
                 progress: bool = True, checkpoint_every: int = 100, *, target: Any = None, kind: str = "ising",
                 saved_config: dict[str, Any] | None = None,
                 max_rollbacks: int | None = None) -> tuple[Any, Any]:
    """Target, flow, Adam, schedule and :class:`~latticeflow.train.VariationalTrainer` of a variational run.

    Under torchrun the flow is wrapped as ``DDP(SampleModule(flow))`` and every rank draws with its
    own generator (see :mod:`latticeflow.distributed`).

    Args:
        config: an :class:`IsingConfig` or its dict (a checkpoint's).
        device: where the flow lives.
        out_dir: the run's folder for log and checkpoints (None: in memory only).
        progress: show a progress bar.
        checkpoint_every: epochs between checkpoints.
        target: another lattice model's target (default: the Ising target of ``config``), whose
            lattice the flow is built on; ``config`` then gives the flow and the training.
        kind: the checkpoints' kind (see :func:`latticeflow.checkpoint.checkpoint_kind`).
        saved_config: the dict checkpoints store (default: ``config.to_dict()``).
        max_rollbacks: overrides ``config.max_rollbacks``.

    Returns:
        (trainer, target).
    """
    import warnings

    from . import distributed as dist
    from .ising import ising
    from .train import VariationalTrainer, WallClockCosine, cosine_schedule

    config = config if isinstance(config, IsingConfig) else IsingConfig.from_dict(config)
    device = torch.device(device)
    if config.anneal_from is not None and target is not None:
        raise ValueError("anneal_from anneals the Ising target's β; it does not apply to another target")
    target = target if target is not None else ising(config.L, config.beta, J=config.J)
    target_at = annealed_targets(config, target) if config.anneal_from is not None else None
    if config.step_size > MAX_SAFE_STEP:
        warnings.warn(f"RK4 step {config.step_size} > {MAX_SAFE_STEP}: the integrated ln p may be too inaccurate "
                      "for a variational bound, and training exploits that (at L=4, steps of 0.2 gave an F/N "
                      "2e-2 below the exact value; README, Results)", stacklevel=2)
    torch.manual_seed(config.seed)
    flow = build_flow(config, target.lattice)
    if getattr(config, "quadratic_init", "zero") == "gaussian":
        # a no-op without a quadratic part or a Gaussian fit of the target; annealed: of the first epoch's target
        start_at_best_gaussian(flow, target if target_at is None else target_at(0))
    flow = flow.to(device)
    model = dist.wrap_sampler(flow, device)  # DDP(SampleModule(flow)) under torchrun: DDP averages the draws' gradients
    opt = torch.optim.Adam(parameter_groups(flow, config, target.N), lr=config.lr, weight_decay=config.weight_decay)
    if config.schedule_minutes is not None:
        sched = WallClockCosine(opt, config.schedule_minutes, warmup=config.warmup)
    else:
        sched = cosine_schedule(opt, config.epochs, warmup=config.warmup) if config.schedule == "cosine" else None
    gen = dist.rank_generator(config.seed, device)  # rank 0: from (seed,); rank r: from (seed, r)
    trainer = VariationalTrainer(model, target, opt, batch_size=config.batch_size, scheduler=sched,
                                 config=saved_config if saved_config is not None else config.to_dict(),
                                 grad_clip=config.grad_clip, gradient_estimator=config.gradient_estimator,
                                 train_precision=config.train_precision, target_at=target_at,
                                 out_dir=out_dir, generator=gen, progress=progress,
                                 checkpoint_every=checkpoint_every, seed=config.seed, kind=kind,
                                 max_rollbacks=config.max_rollbacks if max_rollbacks is None else max_rollbacks)
    return trainer, target

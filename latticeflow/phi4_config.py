"""The configuration of a variational φ⁴ run (the flags of ``python -m models.phi4``).

The flow and training fields are those of :class:`~latticeflow.config.IsingConfig` (same names,
meanings and checks: :meth:`Phi4Config.flow_config` hands them to
:func:`~latticeflow.build.build_flow`, so the flow builder needs no φ⁴ knowledge); the target
fields are φ⁴'s: L and either the mass form (m2, lam) or the hopping form (kappa, lam_tilde).

Example:
    >>> Phi4Config(L=4, m2=1.0, lam=0.0).target()
    Phi4(L=4, m2=1, lam=0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import cli
from .config import (ACTIVATIONS, DTYPE_NAMES, GRADIENT_ESTIMATORS, GROUPS, MIXTURES, SCHEDULE_MINUTES_HELP, SYMMETRIZE,
                     Config, IsingConfig, _extensive_lr_flag, batch_for, grad_clip_flag, kernel_size_for, option)
from .phi4 import Phi4, phi4, phi4_hopping

__all__ = ["Phi4Config", "PHI4_DEFAULT", "FLOW_KEYS"]


def _finite(text: str) -> float:
    return cli._number(text)


@dataclass(frozen=True)
class Phi4Config(Config):
    """A variational φ⁴ run: target (mass or hopping form), flow and training.

    The default target is the standard point of Albergo, Kanwar & Shanahan (arXiv:1904.12072),
    L=6, m²=−4, λ=6.975 (κ = 0.26774, λ̃ = 0.5). Giving ``kappa`` selects the hopping form
    (:meth:`target` builds it from kappa and lam_tilde, and m2 and lam are set to its mass form;
    lam_tilde is used only with kappa).
    """

    # the target
    L: int = option(6, "linear lattice size", parse=cli.int_at_least(2))
    m2: float = option(-4.0, "mass form: bare mass squared m² (> 0 when --lam 0)", parse=_finite)
    lam: float = option(6.975, "mass form: quartic coupling λ >= 0", parse=_finite)
    kappa: float | None = option(None, "hopping form: hopping parameter κ >= 0 (selects the hopping form)",
                                 parse=_finite, show="none: the mass form")
    lam_tilde: float = option(0.5, "hopping form: quartic coupling λ̃ >= 0 (with --kappa)", parse=_finite)
    # the flow (as IsingConfig)
    potential: str = option("quadratic+conv+mlp", "'+'-joined parts: mlp, quadratic, conv")
    hidden: int = option(128, "hidden width of the mlp potential", parse=cli.positive_int)
    activation: str = option("lncosh", "activation of the mlp potential", choices=ACTIVATIONS)
    bias: bool = option(True, "biases in the mlp potential")
    channels: int = option(16, "channels of the conv potential", parse=cli.positive_int)
    kernel_size: int | None = option(None, "odd kernel size of the conv potential, <= L", parse=cli.positive_int,
                                     show="5, or the largest odd size <= L when L < 5")
    conv_layers: int = option(1, "layers of the conv potential", parse=int, choices=(1, 2))
    init_scale: float = option(1e-3, "std of the networks' initial readout weights", parse=cli.nonnegative_float)
    quadratic_init: str = option("gaussian", "start of the quadratic part: 'gaussian' (the closed-form Hartree "
                                 "Gaussian, Phi4.best_gaussian: at L=6, m²=−4, λ=6.975 acceptance 0.88 against 0.70 "
                                 "from the identity after 1600 epochs) or 'zero' (the identity map)",
                                 choices=("zero", "gaussian"))
    time_dependent: bool = option(True, "potentials depend linearly on t (paper section 6)")
    n_steps: int = option(10, "RK4 steps d", parse=cli.positive_int)
    step_size: float = option(0.1, "RK4 step ε", parse=cli.positive_float)
    symmetrize: str = option("random", "group averaging of the network parts", choices=SYMMETRIZE)
    group: str = option("space+z2", "symmetry group (φ → −φ is the z2 factor)", choices=GROUPS)
    mixture: str = option("none", "exact density symmetrisation by a group mixture (|G| times the cost)",
                          choices=MIXTURES)
    dtype: str = option("float32", "floating-point precision", choices=DTYPE_NAMES)
    grad_checkpoint: bool = option(False, "recompute each RK4 step in backward (less memory)")
    # training
    batch: int | None = option(None, "batch size", parse=cli.positive_int, group="training",
                               show="256·min(1, 256/N), at least 16 (as models.ising)")
    lr: float = option(3e-2, "Adam learning rate (1e-2: slower at L=6; 5e-2: unstable)", parse=cli.positive_float,
                       group="training")
    extensive_lr: float | str = option("auto", "Adam learning rate of the extensive parameters (the MLP's input "
                                       "weights, the quadratic kernel), or 'auto': lr·min(1, 256/N)",
                                       parse=_extensive_lr_flag, group="training")
    weight_decay: float = option(0.0, "Adam weight decay", parse=cli.nonnegative_float, group="training")
    epochs: int = option(800, "optimiser steps in all (on resume: may be raised)", parse=cli.positive_int,
                         group="training")
    grad_clip: float | str | None = option(None, "clip the gradient norm at this value, or 'auto': at 3× its "
                                           "median over the last 50 epochs", parse=grad_clip_flag,
                                     group="training", show="none")
    max_rollbacks: int = option(5, "recoveries from a diverged epoch: back to the last good state in memory, "
                                "learning rate halved (0: stop at the first divergence)", parse=cli.nonnegative_int,
                                group="training")
    gradient_estimator: str = option("path", "reverse-KL gradient: 'path' (the zero-mean score term dropped; zero "
                                     "variance at q = p; one more backward integration per step: at L=6, m²=−4, "
                                     "λ=6.975 acceptance 0.906 after 1400 epochs in 473 s, against 0.885 after 2600 "
                                     "epochs in 428 s with 'total') or 'total' (through the sampling path, ln q's "
                                     "parameter dependence included)",
                                     choices=GRADIENT_ESTIMATORS, group="training")
    warmup: int = option(20, "learning-rate warm-up steps", parse=cli.nonnegative_int, group="training")
    schedule: str = option("cosine", "learning-rate schedule", choices=("cosine", "constant"), group="training")
    schedule_minutes: float | None = option(None, SCHEDULE_MINUTES_HELP, parse=cli.positive_float, group="training",
                                            show="none: the decay spans --epochs")
    seed: int = option(0, "seed of the initialisation and the samples", parse=int, group="training")

    def __post_init__(self) -> None:
        target = self.target()  # the target's checks (one-line ValueErrors)
        if self.kappa is not None:  # record the mass form of a hopping target (None for κ = 0), not stale defaults
            object.__setattr__(self, "m2", target.m2)
            object.__setattr__(self, "lam", target.lam)
        self.flow_config()  # the flow and training checks of IsingConfig

    def target(self) -> Phi4:
        """The φ⁴ target: the hopping form when ``kappa`` is set, else the mass form.

        Raises:
            ValueError: bad parameters (see :func:`~latticeflow.phi4.phi4`).
        """
        if self.kappa is not None:
            return phi4_hopping(self.L, self.kappa, self.lam_tilde)
        return phi4(self.L, self.m2, self.lam)

    def flow_config(self) -> IsingConfig:
        """The flow and training fields as an :class:`IsingConfig` for :func:`~latticeflow.build.build_flow`
        (its target fields, β and J, are unused there)."""
        return IsingConfig(L=self.L, **{k: getattr(self, k) for k in FLOW_KEYS})

    def to_dict(self) -> dict[str, Any]:
        """The plain dict for checkpoints and config.json (the conv kernel size actually used)."""
        d = super().to_dict()
        if "conv" in self.potential.split("+"):
            d["kernel_size"] = kernel_size_for(self.kernel_size, self.L)
        d["batch"] = self.batch_size
        return d

    @property
    def batch_size(self) -> int:
        """``batch``, or for None the recipe :func:`~latticeflow.config.batch_for` of this lattice."""
        return self.batch if self.batch is not None else batch_for(self.L)


#: Config keys shared with IsingConfig (flow and training).
FLOW_KEYS = ("potential", "hidden", "activation", "bias", "channels", "kernel_size", "conv_layers", "init_scale",
             "quadratic_init", "time_dependent", "n_steps", "step_size", "symmetrize", "group", "mixture", "dtype", "grad_checkpoint",
             "batch", "lr", "extensive_lr", "weight_decay", "epochs", "grad_clip", "gradient_estimator", "max_rollbacks",
             "warmup", "schedule", "schedule_minutes", "seed")

#: The built-in default of ``python -m models.phi4``.
PHI4_DEFAULT = Phi4Config()

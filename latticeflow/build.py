"""Build flows from plain config dicts, so a checkpoint's config rebuilds its model.

A config is a dict of numbers and strings (the CLI flags of ``models/ising.py``). The
potential is named by a ``+``-separated list of parts, e.g. ``"quadratic+mlp"``:

    mlp        the paper's one-hidden-layer network Σ_k w_k a(W_k·x + b_k) (section 3)
    quadratic  ½ xᵀAx with a translation- and D4-invariant A (an exactly Gaussian flow)
    conv       translation-invariant convolutional potential on the periodic lattice

Symmetrisation (``symmetrize``) averages the network parts over a group:
``none``, ``random`` (the paper's one random element per sample per step) or ``exact``.
"""

from __future__ import annotations

from typing import Any

import torch

from ._checks import check_choice
from .flow import MongeAmpereFlow
from .lattice import SquareLattice
from .mixture import SymmetricMixture
from .potentials import ConvPotential, MLPPotential, Potential, QuadraticPotential, Symmetrized
from .symmetry import SymmetryGroup, point_group, space_group, spin_flip_group, translation_group

PARTS = ("mlp", "quadratic", "conv")
SYMMETRIZE = ("none", "random", "exact")
GROUPS = ("space+z2", "space", "translation+z2", "translation", "d4+z2", "d4", "z2")
DTYPES = {"float32": torch.float32, "float64": torch.float64}

DEFAULTS: dict[str, Any] = {
    "potential": "mlp",
    "hidden": 512,
    "activation": "softplus",
    "bias": True,  # MLP biases; the paper's Ising network is ln cosh without biases (Z2-even)
    "channels": 16,
    "kernel_size": None,  # None: 5, or the largest odd size <= L on smaller lattices
    "conv_layers": 1,
    "init_scale": 1e-3,  # std of the networks' initial readout weights, or "linear": U(±1/√h) as the original
    "time_dependent": False,
    "symmetrize": "random",
    "group": "space+z2",
    "n_steps": 50,
    "step_size": 0.1,
    "dtype": "float32",
    "grad_checkpoint": False,
    "mixture": "none",
}
MIXTURES = ("none", "z2", "d4", "d4+z2")
#: Keys of a run's config that describe the target and the training, not the flow: build_flow
#: accepts and ignores them, so a checkpoint's whole config rebuilds its flow.
RUN_KEYS = frozenset({"L", "beta", "beta_name", "J", "batch", "lr", "weight_decay", "epochs", "grad_clip", "warmup",
                      "schedule", "seed"})


def check_config_keys(config: dict[str, Any]) -> None:
    """Refuse keys that are neither flow settings (:data:`DEFAULTS`) nor run settings (:data:`RUN_KEYS`).

    Raises:
        ValueError: naming the unknown keys, the closest valid names, and every valid key.
    """
    import difflib

    valid = sorted(set(DEFAULTS) | RUN_KEYS)
    unknown = sorted(set(config) - set(valid))
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, valid, n=1)) else repr(k)
                 for k in unknown]
        raise ValueError(f"unknown config key(s) {', '.join(hints)}; valid keys: {', '.join(valid)}")


def _kernel_size(value: Any, L: int) -> int:
    """The conv kernel size: ``value``, or for None 5 (the largest odd size <= L when L < 5)."""
    return int(value) if value is not None else min(5, L if L % 2 else L - 1)


def parse_init_scale(value: Any) -> float | str:
    """An ``init_scale`` from a config or the command line: ``"linear"`` or a number."""
    return value if value == "linear" else float(value)


def make_group(name: str, lattice: SquareLattice) -> SymmetryGroup:
    """Group by name: 'space+z2' (16L² elements), 'space', 'translation(+z2)', 'd4(+z2)', 'z2'."""
    check_choice("group", name, GROUPS)
    base, _, flip = name.partition("+")
    if base == "z2":
        return spin_flip_group(lattice.N)
    g = {"space": space_group, "translation": translation_group, "d4": point_group}[base](lattice)
    return g.with_spin_flip() if flip else g


def build_potential(config: dict[str, Any], lattice: SquareLattice) -> Potential:
    """The potential described by ``config`` on ``lattice`` (see the module docstring).

    Raises:
        ValueError: an unknown key (see :func:`check_config_keys`) or value.
    """
    check_config_keys(config)
    cfg = {**DEFAULTS, **config}
    parts = cfg["potential"].split("+")
    for p in parts:
        check_choice("potential part", p, PARTS)
    check_choice("symmetrize", cfg["symmetrize"], SYMMETRIZE)
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
                                      kernel_size=_kernel_size(cfg["kernel_size"], lattice.L), activation="lncosh" if z2 else cfg["activation"],
                                      d4=True, z2=z2, time_dependent=cfg["time_dependent"],
                                      init_scale=parse_init_scale(cfg["init_scale"])))
        else:
            net = MLPPotential(lattice.N, cfg["hidden"], activation=cfg["activation"], bias=bool(cfg["bias"]),
                               time_dependent=cfg["time_dependent"], init_scale=parse_init_scale(cfg["init_scale"]))
            pots.append(Symmetrized(net, group, mode=cfg["symmetrize"]) if group is not None else net)
    total = pots[0]
    for p in pots[1:]:
        total = total + p
    return total


def build_flow(config: dict[str, Any], lattice: SquareLattice) -> MongeAmpereFlow | SymmetricMixture:
    """A :class:`MongeAmpereFlow` from ``config``, in the config's dtype.

    With ``mixture`` other than ``"none"`` the flow is wrapped in a
    :class:`~latticeflow.mixture.SymmetricMixture` over that group, which makes the density
    exactly invariant (at |G| times the cost).
    """
    check_config_keys(config)
    cfg = {**DEFAULTS, **config}
    check_choice("dtype", cfg["dtype"], tuple(DTYPES))
    check_choice("mixture", cfg["mixture"], MIXTURES)
    flow = MongeAmpereFlow(build_potential(cfg, lattice), n_steps=int(cfg["n_steps"]),
                           step_size=float(cfg["step_size"]), checkpoint=bool(cfg["grad_checkpoint"]))
    if cfg["mixture"] != "none":
        flow = SymmetricMixture(flow, make_group(cfg["mixture"], lattice))
    return flow.to(DTYPES[cfg["dtype"]])

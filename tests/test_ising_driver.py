"""The Ising driver's configurations: the paper's (appendix C, and the original code's Z2-even net) and overrides."""

import torch

from latticeflow import ising
from latticeflow.build import build_flow
from latticeflow.potentials import MLPPotential, Symmetrized
from models.ising import DEFAULT, config_from_args, parse_args


def test_paper_configuration_and_explicit_overrides():
    cfg = config_from_args(parse_args(["--paper"]))
    assert (cfg["L"], cfg["hidden"], cfg["n_steps"], cfg["step_size"], cfg["batch"], cfg["lr"]) == (16, 512, 50, 0.1, 64, 1e-3)
    assert cfg["activation"] == "lncosh" and cfg["bias"] is False and cfg["schedule"] == "constant"
    over = config_from_args(parse_args(["--paper", "--epochs", "7", "--schedule", "cosine", "--L", "4"]))
    assert (over["epochs"], over["schedule"], over["L"], over["hidden"]) == (7, "cosine", 4, 512)


def test_paper_network_is_exactly_z2_even():
    cfg = config_from_args(parse_args(["--paper", "--L", "4", "--hidden", "16", "--dtype", "float64"]))
    flow = build_flow({**cfg, "symmetrize": "none"}, ising(4).lattice)
    pot = flow.potential
    assert isinstance(pot, MLPPotential) and pot.bias is None
    x = torch.randn(5, 16, dtype=torch.float64)
    v1, g1, l1 = pot(x, 0.0)
    v2, g2, l2 = pot(-x, 0.0)
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(g1, -g2)
    torch.testing.assert_close(l1, l2)


def test_default_configuration_builds_the_documented_flow():
    cfg = config_from_args(parse_args([]))
    assert cfg == {**cfg, **{k: DEFAULT[k] for k in ("L", "hidden", "n_steps", "batch", "lr", "activation", "time_dependent")}}
    flow = build_flow(cfg, ising(cfg["L"]).lattice)
    parts = flow.potential.parts if hasattr(flow.potential, "parts") else None
    assert parts is not None and any(isinstance(p, Symmetrized) for p in parts)

"""The Ising driver's configurations: the paper's (appendix C, and the original code's Z2-even net) and overrides."""

import pytest
import torch

from latticeflow import ising
from latticeflow.build import build_flow
from latticeflow.potentials import ConvPotential, MLPPotential, Symmetrized
from latticeflow.config import ISING_DEFAULT, IsingConfig
from models.ising import config_from_args, parse_args


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
    # one table of defaults: the CLI's are the library's
    assert cfg == ISING_DEFAULT == IsingConfig()
    assert (cfg.L, cfg.hidden, cfg.n_steps, cfg.batch_size, cfg.lr, cfg.activation, cfg.time_dependent) == \
        (8, 256, 10, 256, 1e-2, "lncosh", True)
    flow = build_flow(cfg, ising(cfg["L"]).lattice)
    parts = flow.potential.parts if hasattr(flow.potential, "parts") else None
    assert parts is not None and any(isinstance(p, Symmetrized) for p in parts)
    conv = [p for p in parts if isinstance(p, ConvPotential)]
    assert len(conv) == 1 and conv[0].d4 and conv[0].z2 and conv[0].kernel_size == 5


def _mlp(flow):
    parts = flow.potential.parts if hasattr(flow.potential, "parts") else [flow.potential]
    for p in parts:
        net = p.potential if isinstance(p, Symmetrized) else p
        if isinstance(net, MLPPotential):
            return net
    raise AssertionError("no MLP part")


def test_paper_readout_is_initialised_like_the_originals_nn_linear():
    cfg = config_from_args(parse_args(["--paper"]))
    assert cfg["init_scale"] == "linear"
    w = _mlp(build_flow(cfg, ising(16).lattice)).readout.detach()
    bound = 1 / 512 ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # U(±1/√h), h = 512 draws
    assert abs(w.std().item() - bound / 3 ** 0.5) < 0.1 * bound  # std of U(±b) is b/√3


def test_init_scale_and_conv_layers_reach_the_potentials():
    cfg = config_from_args(parse_args(["--L", "4", "--hidden", "8", "--potential", "quadratic+conv+mlp",
                                       "--kernel-size", "3", "--conv-layers", "2", "--init-scale", "0"]))
    flow = build_flow(cfg, ising(4).lattice)
    conv = next(p for p in flow.potential.parts if isinstance(p, ConvPotential))
    assert conv.layers == 2 and conv.kernel_size == 3
    assert torch.count_nonzero(_mlp(flow).readout) == 0 and torch.count_nonzero(conv.readout) == 0
    with pytest.raises(ValueError, match="init_scale"):
        MLPPotential(4, 3, init_scale=-1.0)
    with pytest.raises(ValueError, match="init_scale"):
        MLPPotential(4, 3, init_scale="uniform")


def test_grad_clip_reaches_the_trainer_and_bad_values_are_refused():
    import models.ising as mi

    cfg = config_from_args(parse_args(["--L", "3", "--hidden", "4", "--n-steps", "2", "--grad-clip", "0.5"]))
    trainer, _ = mi.make_trainer(cfg, torch.device("cpu"), None, progress=False)
    assert trainer.grad_clip == 0.5
    with pytest.raises(ValueError, match="grad_clip"):
        mi.make_trainer({**cfg, "grad_clip": 0.0}, torch.device("cpu"), None, progress=False)


def test_default_conv_kernel_fits_small_lattices():
    for L, k in ((3, 3), (4, 3), (5, 5), (16, 5)):
        cfg = config_from_args(parse_args(["--L", str(L), "--hidden", "4", "--potential", "quadratic+conv+mlp"]))
        conv = next(p for p in build_flow(cfg, ising(L).lattice).potential.parts if isinstance(p, ConvPotential))
        assert conv.kernel_size == k


def test_coarse_rk4_steps_are_warned_about():
    import models.ising as mi

    cfg = config_from_args(parse_args(["--L", "3", "--hidden", "4", "--n-steps", "2", "--step-size", "0.2"]))
    with pytest.warns(UserWarning, match="RK4 step 0.2"):
        mi.make_trainer(cfg, torch.device("cpu"), None, progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mi.make_trainer({**cfg, "step_size": 0.1}, torch.device("cpu"), None, progress=False)


def test_extensive_lr_auto_scales_the_extensive_parameters_with_the_sites():
    # 'auto': lr·min(1, 256/N) for the MLP's input weights and the quadratic kernel (a, a'), in an Adam group of
    # their own only where that differs from lr (L=64 at 1e-2 everywhere blew up at the end of the warm-up)
    from latticeflow.build import make_trainer
    from latticeflow.config import IsingConfig
    from latticeflow.potentials import MLPPotential, QuadraticPotential

    for L, rates in ((16, [0.01]), (32, [0.01, 0.0025]), (64, [0.01, 0.000625])):
        cfg = IsingConfig(L=L, hidden=4, potential="quadratic+mlp", n_steps=1)
        trainer, _ = make_trainer(cfg, "cpu", progress=False)
        groups = trainer.optimizer.param_groups
        assert [g["initial_lr"] for g in groups] == pytest.approx(rates)
        mlp = next(m for m in trainer.flow.modules() if isinstance(m, MLPPotential))
        quad = next(m for m in trainer.flow.modules() if isinstance(m, QuadraticPotential))
        wide = {id(p) for p in (mlp.weight, quad.a, quad.a_t)}
        if len(groups) == 2:
            assert {id(p) for p in groups[1]["params"]} == wide
            assert not wide & {id(p) for p in groups[0]["params"]}
        assert sum(len(g["params"]) for g in groups) == len(list(trainer.flow.parameters()))
    with pytest.raises(ValueError, match="extensive_lr must be 'auto' or a finite number > 0"):
        IsingConfig(extensive_lr=0)


def test_default_batch_holds_the_sites_per_batch_from_l16_up():
    # 256 up to L=16, then 256·256/N (the gradient's relative noise ~ 1/√(N·B) and the epoch's cost stay put)
    from latticeflow.build import make_trainer
    from latticeflow.config import IsingConfig, batch_for

    assert [batch_for(L) for L in (4, 8, 16, 24, 32, 64, 128)] == [256, 256, 256, 113, 64, 16, 16]
    cfg = IsingConfig(L=32, hidden=4, potential="quadratic+mlp", n_steps=1)
    assert cfg.batch is None and cfg.batch_size == 64 and cfg.to_dict()["batch"] == 64
    assert IsingConfig.from_dict(cfg.to_dict()).batch == 64  # a saved run keeps its batch
    trainer, _ = make_trainer(cfg, "cpu", progress=False)
    assert trainer.batch_size == 64
    assert IsingConfig(L=32, batch=7).batch_size == 7
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        IsingConfig(batch=0)

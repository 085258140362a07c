"""φ⁴ target (latticeflow/phi4.py), its config and driver (models/phi4.py): exact checks in float64."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

import latticeflow as lf
import models.phi4 as mp
from latticeflow.phi4 import hopping_to_mass, mass_to_hopping, observables, phi4, phi4_hopping
from latticeflow.phi4_config import Phi4Config
from latticeflow.train import VariationalTrainer, cosine_schedule

pytestmark = pytest.mark.usefixtures("float64")

TARGETS = [  # (L, form, parameters): free and interacting, both forms, L = 2 (double bonds) included
    (2, "mass", (0.7, 0.0)), (3, "mass", (1.0, 0.0)), (4, "mass", (-4.0, 6.975)), (3, "mass", (-1.0, 0.5)),
    (2, "hopping", (0.15, 0.0)), (4, "hopping", (0.3, 1.2)), (3, "hopping", (0.0, 0.5)),
]


def build(L, form, params):
    return phi4(L, *params) if form == "mass" else phi4_hopping(L, *params)


def reference_action(t, x):
    """S written site by site from the lattice's neighbour table (an independent implementation)."""
    L = t.L
    S = torch.zeros(x.shape[0])
    for r, c in itertools.product(range(L), range(L)):
        i = r * L + c
        right, down = r * L + (c + 1) % L, ((r + 1) % L) * L + c
        if t.form == "mass":
            S = S - 2 * x[:, i] * (x[:, right] + x[:, down]) + (t.m2 + 4) * x[:, i] ** 2 + t.lam * x[:, i] ** 4
        else:
            S = (S - 2 * t.kappa * x[:, i] * (x[:, right] + x[:, down]) + x[:, i] ** 2
                 + t.lam_tilde * (x[:, i] ** 2 - 1) ** 2)
    return S


# ---------------------------------------------------------------------- action and gradient
@pytest.mark.parametrize("L,form,params", TARGETS)
def test_energy_matches_the_sitewise_formula_and_grad_matches_autograd(L, form, params):
    t = build(L, form, params)
    x = torch.randn(5, t.N, requires_grad=True)
    S = t.energy(x)
    assert torch.allclose(S, reference_action(t, x), rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(S.sum(), x)
    assert torch.allclose(t.grad(x), g, rtol=1e-12, atol=1e-12)
    assert isinstance(t, lf.Target)


@pytest.mark.parametrize("L,form,params", TARGETS)
def test_action_is_invariant_under_translations_d4_and_z2(L, form, params):
    t = build(L, form, params)
    group = t.symmetry_group()
    assert group.order == 16 * t.N or L == 2  # on L = 2 some elements coincide
    x = torch.randn(3, t.N)
    images = group.act(x)  # (G, B, N)
    S = t.energy(images.reshape(-1, t.N)).reshape(group.order, -1)
    assert torch.allclose(S, t.energy(x).expand_as(S), rtol=1e-12, atol=1e-11)


# ---------------------------------------------------------------------- the two parametrisations
@pytest.mark.parametrize("m2,lam", [(-4.0, 6.975), (1.0, 0.0), (0.5, 0.1), (-2.0, 3.0)])
def test_mass_and_hopping_forms_differ_by_a_constant_after_the_map(m2, lam):
    kappa, lam_tilde = mass_to_hopping(m2, lam)
    assert hopping_to_mass(kappa, lam_tilde) == pytest.approx((m2, lam), rel=1e-12, abs=1e-12)
    m, h = phi4(4, m2, lam), phi4_hopping(4, kappa, lam_tilde)
    phit = torch.randn(6, 16)
    # S_m(√κ φ̃) = S_h(φ̃) − N λ̃
    assert torch.allclose(m.energy(math.sqrt(kappa) * phit), h.energy(phit) - 16 * lam_tilde, rtol=1e-12, atol=1e-10)
    assert h.to_mass().m2 == pytest.approx(m2) and m.to_hopping().kappa == kappa


def test_standard_point_maps_to_lam_tilde_one_half():
    t = phi4(6, -4.0, 6.975)
    assert t.lam_tilde == pytest.approx(0.5, abs=1e-12)  # λκ² = 1/2 exactly: 2λκ² + 0·κ − 1 = 0
    assert t.kappa == pytest.approx(math.sqrt(1 / (2 * 6.975)), rel=1e-12)


def grid_log_z(t, half_width, n):
    """ln Z of an N = 4 lattice (L = 2) by the trapezoid rule on [−a, a]⁴ (spectrally accurate here)."""
    g = torch.linspace(-half_width, half_width, n)
    h = float(g[1] - g[0])
    pts = torch.cartesian_prod(g, g, g, g)
    return float(torch.logsumexp(-t.energy(pts), 0)) + 4 * math.log(h)


def test_log_z_maps_with_the_jacobian_by_brute_force_integration():
    # interacting theory, L = 2: ln Z_m = ln Z_h + (N/2) ln κ + N λ̃, on independent grids
    m = phi4(2, -1.0, 1.5)
    h = m.to_hopping()
    lz_m, lz_h = grid_log_z(m, 3.0, 41), grid_log_z(h, 3.0 / math.sqrt(h.kappa), 47)
    assert lz_m == pytest.approx(lz_h + 2 * math.log(h.kappa) + 4 * h.lam_tilde, abs=1e-6)
    off = m.free_energy_offsets
    assert -lz_h / 4 == pytest.approx(-lz_m / 4 + off["hopping"], abs=1e-6)
    assert h.free_energy_offsets["mass"] == pytest.approx(-off["hopping"], rel=1e-14)


# ---------------------------------------------------------------------- free theory: exact values
@pytest.mark.parametrize("L,form,params", [t for t in TARGETS if t[2][1] == 0.0] + [(5, "mass", (0.3, 0.0))])
def test_closed_form_log_z_equals_the_dense_log_det(L, form, params):
    t = build(L, form, params)
    H = torch.autograd.functional.hessian(lambda v: t.energy(v[None])[0], torch.zeros(t.N))  # = M
    assert t.exact_log_z() == pytest.approx(0.5 * t.N * math.log(2 * math.pi) - 0.5 * float(torch.logdet(H)),
                                            rel=1e-12, abs=1e-12)
    assert torch.allclose(t.exact_propagator().reshape(-1), torch.linalg.inv(H)[0], rtol=1e-12, atol=1e-13)


def test_closed_form_log_z_equals_brute_force_integration():
    t = phi4(2, 0.7, 0.0)
    assert grid_log_z(t, 7.0, 41) == pytest.approx(t.exact_log_z(), abs=1e-7)


def test_free_mass_and_hopping_closed_forms_agree_through_the_jacobian():
    m = phi4(6, 0.4, 0.0)
    h = m.to_hopping()
    assert m.exact_log_z() == pytest.approx(h.exact_log_z() + 18 * math.log(h.kappa), rel=1e-12)
    assert m.exact_observables()["xi"] == pytest.approx(1 / math.sqrt(0.4), rel=1e-12)  # ξ = 1/m exactly


def test_exact_samples_reproduce_the_propagator_and_the_observables(generator):
    t = phi4(4, 0.5, 0.0)
    x = t.sample_free(40000, generator)
    cov = (x.T @ x / len(x))[0].reshape(4, 4)
    assert torch.allclose(cov, t.exact_propagator(), atol=5 * 0.02)  # a few σ of 40000 samples
    obs, ex = observables(x, t), t.exact_observables()
    for k in ("m2", "chi", "binder", "xi", "action_density", "abs_m"):
        assert abs(obs[k] - ex[k]) < 4 * obs[k + "_err"] + 1e-12, k
    G_t = ex_G_t = t.exact_propagator().sum(1).numpy()
    assert np.abs(obs["G_t"] - ex_G_t).max() < 4 * obs["G_t_err"].max() and G_t.shape == (4,)


def test_reweighting_corrects_a_wrong_proposal(generator):
    t, q = phi4(3, 1.0, 0.0), phi4(3, 1.6, 0.0)  # proposals from m² = 1.6, target m² = 1
    x = q.sample_free(40000, generator)
    log_q = -q.energy(x) + q.exact_log_z()
    obs = observables(x, t, log_weights=-t.energy(x) - log_q)
    assert 0.3 < obs["ess"] < 1
    assert abs(obs["chi"] - t.exact_observables()["chi"]) < 4 * obs["chi_err"]
    assert abs(observables(x, t)["chi"] - t.exact_observables()["chi"]) > 10 * obs["chi_err"]  # plain means are off


def test_no_exact_value_for_the_interacting_theory():
    with pytest.raises(ValueError, match="interacting"):
        phi4(4, -4.0, 6.975).exact_free_energy()


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,match", [
    (lambda: phi4(4, 1.0, -0.1), "lam must be a finite number >= 0"),
    (lambda: phi4(4, 1.0, float("nan")), "lam must be a finite"),
    (lambda: phi4(4, float("inf"), 1.0), "m2 must be a finite"),
    (lambda: phi4(4, 0.0, 0.0), "m2 must be > 0 when lam = 0"),
    (lambda: phi4(4, -1.0, 0.0), "m2 must be > 0 when lam = 0"),
    (lambda: phi4(1, 1.0, 0.0), "L must be an integer >= 2"),
    (lambda: phi4_hopping(4, -0.1, 0.5), "kappa must be a finite number >= 0"),
    (lambda: phi4_hopping(4, 0.25, 0.0), "kappa must be < 1/4"),
    (lambda: phi4_hopping(4, 0.2, float("inf")), "lam_tilde must be a finite"),
    (lambda: Phi4Config(m2=-1.0, lam=0.0), "m2 must be > 0"),
    (lambda: Phi4Config(hidden=0), "hidden must be an integer >= 1"),
])
def test_bad_input_is_one_line_value_error(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("flags", [["--lam", "-1"], ["--lam", "nan"], ["--m2", "0", "--lam", "0"], ["--kappa", "-0.5"]])
def test_driver_refuses_bad_input_with_status_2_and_writes_nothing(flags, tmp_path, capsys):
    out = tmp_path / "run"
    try:
        status = mp.cli(flags + ["--out", str(out), "--quiet"])
    except SystemExit as e:  # argparse's own refusal of a non-finite number: the same status 2
        status = e.code
    assert status == 2
    assert not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and "error:" in err[-1]


# ---------------------------------------------------------------------- training and the driver
def test_short_training_on_the_free_theory_lands_just_above_exact():
    torch.manual_seed(0)
    cfg = Phi4Config(L=3, m2=1.0, lam=0.0, potential="quadratic+mlp", hidden=16, epochs=200, lr=0.03, batch=128,
                     dtype="float64")
    t = cfg.target()
    flow = lf.build_flow(cfg.flow_config(), t.lattice)
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr)
    log = VariationalTrainer(flow, t, opt, batch_size=cfg.batch, scheduler=cosine_schedule(opt, cfg.epochs, 20),
                             progress=False, generator=torch.Generator().manual_seed(0)).fit(cfg.epochs)
    assert list(log.columns[1:3]) == ["free_energy_mass", "free_energy_hopping"] or "free_energy_mass" in log
    last = log["free_energy_mass"].tail(50)
    err, se = last.mean() - t.exact_free_energy(), last.std() / math.sqrt(50)
    assert err > -3 * se  # the variational bound
    assert err < 1e-2  # measured 3.3e-3 (float32), 200 epochs
    off = t.free_energy_offsets["hopping"]
    assert np.allclose(log["free_energy_hopping"], log["free_energy_mass"] + off)


def test_driver_end_to_end_on_a_tiny_lattice(tmp_path, capsys):
    out = tmp_path / "run"
    status = mp.cli(["--L", "2", "--m2", "1", "--lam", "0", "--potential", "quadratic", "--epochs", "30",
                     "--batch", "64", "--mcmc-samples", "256", "--out", str(out), "--quiet", "--no-plot",
                     "--threads", "1"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "exact -ln Z/N" in printed and "neural MCMC: acceptance" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exact"] == pytest.approx(phi4(2, 1.0, 0.0).exact_free_energy())
    assert 0 < summary["neural_mcmc"]["acceptance"] <= 1 and summary["provenance"]["torch"]
    assert json.loads((out / "config.json").read_text())["m2"] == 1.0
    # resume refuses a changed target, and continues with more epochs
    assert mp.cli(["--resume", str(out), "--lam", "0.5", "--quiet"]) == 2
    assert mp.cli(["--resume", str(out), "--epochs", "35", "--mcmc-samples", "64", "--quiet", "--no-plot",
                   "--threads", "1"]) == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 35


def test_gradient_estimator_flag_reaches_the_trainer():
    for argv, expected in (([], "path"), (["--gradient-estimator", "total"], "total")):  # φ⁴'s default: path
        cfg = mp.config_from_args(mp.build_parser().parse_args(["--L", "4", "--hidden", "4", "--potential", "mlp",
                                                                *argv]))
        assert cfg.gradient_estimator == expected and cfg.flow_config().gradient_estimator == expected
        trainer, _ = mp.make_trainer(cfg, torch.device("cpu"), None, progress=False)
        assert trainer.gradient_estimator == expected
    with pytest.raises(SystemExit) as exc:
        mp.build_parser().parse_args(["--gradient-estimator", "reinforce"])
    assert exc.value.code == 2


def test_quadratic_init_flag_reaches_the_flow():
    # φ⁴ starts at the Hartree Gaussian by default; --quadratic-init zero at the identity
    for argv, expected in (([], "gaussian"), (["--quadratic-init", "zero"], "zero")):
        cfg = mp.config_from_args(mp.build_parser().parse_args(["--L", "4", "--hidden", "4", *argv]))
        assert cfg.quadratic_init == expected and cfg.flow_config().quadratic_init == expected
        trainer, target = mp.make_trainer(cfg, torch.device("cpu"), None, progress=False)
        quad = trainer.flow.potential.parts[0]
        A = quad.matrix().detach().double()
        if expected == "zero":
            assert not A.any()
        else:  # A = ln(Σ*)/(2T): Σ* is the Hartree covariance
            T = trainer.flow.n_steps * trainer.flow.step_size
            spec = target.best_gaussian()["spectrum"]
            assert float(torch.linalg.eigvalsh(A).max()) * 2 * T == pytest.approx(math.log(float(spec.max())), abs=1e-5)


def test_schedule_minutes_flag_reaches_the_trainer():
    from latticeflow.config import UNCAPPED_EPOCHS
    from latticeflow.train import WallClockCosine

    cfg = mp.config_from_args(mp.build_parser().parse_args(["--L", "3", "--hidden", "4", "--schedule-minutes", "2"]))
    assert (cfg.schedule_minutes, cfg.epochs) == (2.0, UNCAPPED_EPOCHS)
    assert cfg.flow_config().schedule_minutes == 2.0
    trainer, _ = mp.make_trainer(cfg, torch.device("cpu"), None, progress=False)
    assert isinstance(trainer.scheduler, WallClockCosine) and trainer.scheduler.seconds == 120.0
    with pytest.raises(ValueError, match="needs schedule='cosine'"):
        mp.config_from_args(mp.build_parser().parse_args(["--schedule-minutes", "2", "--schedule", "constant"]))


def test_driver_flags_reach_the_config():
    args = mp.build_parser().parse_args(["--L", "5", "--kappa", "0.2", "--lam-tilde", "0.7", "--hidden", "8"])
    cfg = mp.config_from_args(args)
    assert (cfg.L, cfg.kappa, cfg.lam_tilde, cfg.hidden) == (5, 0.2, 0.7, 8)
    t = cfg.target()
    assert t.form == "hopping" and t.N == 25 and t.free_energy_offsets["hopping"] == 0.0
    assert (cfg.m2, cfg.lam) == pytest.approx(hopping_to_mass(0.2, 0.7))  # config.json records the mass form too


FLAG_VALUES = {"L": "5", "m2": "0.5", "lam": "0.1", "kappa": "0.2", "lam_tilde": "0.3", "potential": "quadratic+conv",
               "hidden": "8", "activation": "tanh", "channels": "4", "kernel_size": "3", "conv_layers": "2",
               "init_scale": "0.01", "quadratic_init": "zero", "n_steps": "3", "step_size": "0.05",
               "symmetrize": "exact", "group": "d4",
               "mixture": "z2", "dtype": "float64", "batch": "32", "lr": "0.001", "weight_decay": "0.1", "epochs": "7",
               "grad_clip": "1.5", "gradient_estimator": "total", "extensive_lr": "0.002", "max_rollbacks": "2", "warmup": "2",
               "schedule": "constant", "seed": "3"}
SWITCHES = {"bias": ("--no-bias", False), "time_dependent": ("--no-time-dependent", False),
            "grad_checkpoint": ("--grad-checkpoint", True)}


def test_every_config_flag_reaches_the_config_and_the_flow_config():
    # a new field needs a line here (schedule_minutes excludes --schedule constant: tested on its own below)
    assert set(FLAG_VALUES) | set(SWITCHES) | {"schedule_minutes"} == set(Phi4Config.keys())
    argv = [a for k, v in FLAG_VALUES.items() for a in ("--" + k.replace("_", "-"), v)] + [f for f, _ in SWITCHES.values()]
    cfg = mp.config_from_args(mp.build_parser().parse_args(argv))
    for k, v in FLAG_VALUES.items():
        if k in ("m2", "lam"):  # --kappa selects the hopping form; m2 and lam then record its mass form
            continue
        assert str(getattr(cfg, k)) == v or float(getattr(cfg, k)) == float(v), k
    assert (cfg.m2, cfg.lam) == pytest.approx(hopping_to_mass(0.2, 0.3))
    mass = mp.config_from_args(mp.build_parser().parse_args(["--m2", "0.5", "--lam", "0.1"]))
    assert (mass.m2, mass.lam, mass.kappa) == (0.5, 0.1, None)
    for k, (_, v) in SWITCHES.items():
        assert getattr(cfg, k) is v
    fc = cfg.flow_config()
    assert all(getattr(fc, k) == getattr(cfg, k)
               for k in ("hidden", "group", "mixture", "dtype", "lr", "conv_layers", "quadratic_init", "max_rollbacks",
                         "gradient_estimator"))
    trainer, _ = mp.make_trainer(cfg, torch.device("cpu"), None, progress=False)
    assert trainer.max_rollbacks == 2  # the flag reaches the trainer

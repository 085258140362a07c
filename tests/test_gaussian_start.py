"""The closed-form best Gaussian of the Ising HS target, and flows that start there."""

import math

import pytest
import torch

from analysis.free_energy import variational_free_energy
from latticeflow import ising
from latticeflow.build import build_flow, make_trainer, start_at_best_gaussian
from latticeflow.config import ISING_DEFAULT


@pytest.mark.parametrize(("L", "beta"), [(4, 0.3), (6, "critical"), (8, 0.6)])
def test_best_gaussian_is_a_stationary_point_and_a_bound(L, beta):
    target = ising(L, beta)
    best = target.best_gaussian()
    m = target.eigenvalues.double()
    N = target.N
    xi = torch.linspace(-16, 16, 12001, dtype=torch.float64)  # a finer, wider grid than the library's
    w = torch.exp(-0.5 * xi**2)
    w = w / w.sum()

    def F(log_s):  # F/N of N(0, Σ) with circulant Σ of eigenvalues e^{log_s}, by quadrature
        s = log_s.exp()
        v = s.mean()
        y = (v.sqrt() * xi).abs()
        g = (w * (y + torch.log1p(torch.exp(-2 * y)) - math.log(2))).sum()  # ln cosh, overflow-free
        return (0.5 * (s / m).sum() - N * g - 0.5 * log_s.sum() - 0.5 * N * (1 + math.log(2 * math.pi))) / N

    log_s = best["spectrum"].reshape(-1).log().requires_grad_(True)
    value = F(log_s)
    (grad,) = torch.autograd.grad(value, log_s)
    assert value.item() == pytest.approx(best["free_energy"], abs=1e-10)
    assert grad.abs().max().item() < 1e-9  # ∂F/∂s_k = 0 (autograd in float64)
    for scale in (0.9, 1.1):  # and a minimum along the way: F rises on either side
        assert F(log_s.detach() + math.log(scale)).item() > value.item()
    assert F(m.log()).item() > value.item()  # better than the Gaussian of the quadratic term alone
    assert best["free_energy"] > target.exact_free_energy()  # a variational bound


def test_a_quadratic_flow_started_at_the_best_gaussian_has_its_free_energy():
    target = ising(6, "critical")
    config = ISING_DEFAULT.replace(L=6, potential="quadratic", n_steps=4, step_size=0.25)
    flow = build_flow(config, target.lattice).double()
    best = start_at_best_gaussian(flow, target)
    with torch.no_grad():
        x, logq = flow.sample(20000, generator=torch.Generator().manual_seed(0))
        f = variational_free_energy(logq.numpy(), target.energy(x).numpy()).per_site(target.N)
        cov = (x.T @ x / len(x)).diagonal().mean().item()
    assert cov == pytest.approx(best["v"], rel=0.02)  # Var x_i = v
    assert abs(f.value - best["free_energy"]) < 4 * f.stderr + 1e-9  # RK4 is exact for a linear drift up to O(ε⁴)


def test_the_config_flag_starts_training_at_the_best_gaussian():
    config = ISING_DEFAULT.replace(L=4, potential="quadratic+mlp", hidden=8, epochs=1, batch=4096,
                                   quadratic_init="gaussian")
    trainer, target = make_trainer(config, progress=False)
    first = trainer.fit(1)["free_energy_hs"].iloc[0]
    assert first == pytest.approx(target.best_gaussian()["free_energy"], abs=0.02)
    trainer0, _ = make_trainer(config.replace(quadratic_init="zero"), progress=False)
    assert trainer0.fit(1)["free_energy_hs"].iloc[0] > first + 0.3  # the identity map starts far higher
    assert ISING_DEFAULT.quadratic_init == "gaussian"  # the default
    # no quadratic part, or a target without a Gaussian fit: nothing to set, nothing changed
    mlp, target = make_trainer(config.replace(potential="mlp"), progress=False)
    assert start_at_best_gaussian(mlp.flow, target) is None
    assert start_at_best_gaussian(build_flow(config, target.lattice), object()) is None  # no best_gaussian


def test_phi4_best_gaussian_is_exact_for_the_free_theory_and_stationary_otherwise():
    from latticeflow.phi4 import phi4, phi4_hopping

    free = phi4(8, m2=0.5, lam=0.0)
    best = free.best_gaussian()
    assert best["free_energy"] == pytest.approx(free.exact_free_energy(), abs=1e-12)
    torch.testing.assert_close(best["spectrum"], 1 / free.spectrum())
    for target in (phi4(6, m2=-4.0, lam=6.975), phi4_hopping(6, kappa=0.3, lam_tilde=0.02)):
        best = target.best_gaussian()
        M, g, N = target.spectrum().reshape(-1), target.quartic, target.N

        def F(log_s):
            s = log_s.exp()
            v = s.mean()
            return (0.5 * (s * M).sum() + 3 * g * N * v**2 - 0.5 * log_s.sum()
                    - 0.5 * N * (1 + math.log(2 * math.pi))) / N + target.shift

        log_s = best["spectrum"].reshape(-1).log().requires_grad_(True)
        (grad,) = torch.autograd.grad(F(log_s), log_s)
        assert F(log_s).item() == pytest.approx(best["free_energy"], abs=1e-12)
        assert grad.abs().max().item() < 1e-9
        assert (best["spectrum"] > 0).all()
    # the φ⁴ driver's flow starts there too
    target = phi4(6, m2=-4.0, lam=6.975)
    config = ISING_DEFAULT.replace(L=6, potential="quadratic", n_steps=4, step_size=0.25)
    flow = build_flow(config, target.lattice).double()
    assert start_at_best_gaussian(flow, target) is not None
    with torch.no_grad():
        x, logq = flow.sample(20000, generator=torch.Generator().manual_seed(1))
        f = variational_free_energy(logq.numpy(), target.energy(x).numpy()).per_site(target.N)
    assert abs(f.value - target.best_gaussian()["free_energy"]) < 4 * f.stderr

"""The path-gradient estimator of variational training (issue 16), in float64 on small lattices.

* the score the estimator uses (``flow.score``: the backward integration differentiated in x at
  fixed parameters) against the exact score of the discretised map (Jacobians of the RK4 map);
* at the exact optimum (the free φ⁴ theory and the flow started at its Gaussian) the path
  gradient is zero per sample up to RK4 precision, the total gradient of a batch is not;
* both estimators have the same mean on a flow away from the optimum (common random numbers);
* the trainer's option (the flag's part is in tests/test_cli_flags.py and tests/test_phi4.py).
"""

from __future__ import annotations

import pytest
import torch

from latticeflow.build import build_flow, start_at_best_gaussian
from latticeflow.flow import MongeAmpereFlow, standard_normal_log_prob
from latticeflow.mixture import SymmetricMixture
from latticeflow.phi4 import phi4
from latticeflow.phi4_config import Phi4Config
from latticeflow.potentials import MLPPotential, QuadraticPotential, Symmetrized
from latticeflow.symmetry import point_group, spin_flip_group
from latticeflow.train import VariationalTrainer, path_gradient_surrogate

pytestmark = pytest.mark.usefixtures("float64")


def exact_gaussian_flow(target):
    """The quadratic potential started at the best Gaussian: for λ = 0 the exact distribution
    (as in tests/test_phi4_report.py)."""
    cfg = Phi4Config(L=target.L, m2=target.m2, lam=target.lam, potential="quadratic", time_dependent=False)
    flow = build_flow(cfg.flow_config(), target.lattice).double()
    start_at_best_gaussian(flow, target)
    return flow


def mlp_flow(N: int, n_steps: int, step_size: float, scale: float = 3.0, seed: int = 0) -> MongeAmpereFlow:
    """A clearly nonlinear flow: |x − z| about 0.7 at scale 3 (N = 4, T = 1)."""
    torch.manual_seed(seed)
    flow = MongeAmpereFlow(MLPPotential(N, 16, init_scale="linear"), n_steps=n_steps, step_size=step_size).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(scale)
    return flow


def exact_score(flow: MongeAmpereFlow, z: torch.Tensor) -> torch.Tensor:
    """∇ₓ ln q(x) at x = T(z) for the exact density of the discretised map T (RK4 steps):
    ln q(T(z)) = ln N(z) − ln|det ∂T/∂z|, so ∇ₓ ln q = J⁻ᵀ ∇_z[ln N(z) − ln|det J|]."""
    out = []
    for zi in z:
        zi = zi.clone().requires_grad_(True)
        J = torch.autograd.functional.jacobian(lambda v: flow.forward_map(v[None])[0][0], zi, create_graph=True)
        ell = standard_normal_log_prob(zi[None])[0] - torch.linalg.slogdet(J)[1]
        (gz,) = torch.autograd.grad(ell, zi)
        out.append(torch.linalg.solve(J.detach().T, gz))
    return torch.stack(out)


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor], retain: bool = False) -> torch.Tensor:
    gs = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])


# ------------------------------------------------------------------ the score
def test_score_is_log_prob_and_its_x_gradient_without_touching_the_parameters():
    flow = mlp_flow(4, 10, 0.1)
    x, logp = flow.sample(6, generator=torch.Generator().manual_seed(0))
    lp, g = flow.score(x.detach())
    assert not lp.requires_grad and not g.requires_grad
    assert all(p.requires_grad and p.grad is None for p in flow.parameters())  # restored, nothing accumulated
    torch.testing.assert_close(lp, flow.log_prob(x.detach()).detach(), rtol=0, atol=1e-13)
    # the backward integration inverts the forward one only up to O(ε⁴): 1.4e-7 here
    assert (lp - logp.detach()).abs().max() < 1e-6
    xr = x.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(flow.log_prob(xr).sum(), xr)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_score_against_the_exact_score_of_the_rk4_map_is_off_by_order_eps4():
    """Not exact for the discretised map: the RK4 of d ln q/dt is not ln|det| of the RK4 step (and
    backward RK4 not the exact inverse). Measured (N = 4, |x − z| ≈ 0.7, |g| ≈ 3.7): max error of
    g_x 4.9e-6 at ε = 0.1 (T = 1) and 2.8e-7 at ε = 0.05, a factor 17 ≈ 2⁴; the exact inverse of
    the forward map (J⁻ᵀ∇_z of the sampled ln q) is no better (4.6e-6), so the error is that of
    the integrated ln q, which the total estimator's objective shares."""
    errs = []
    for n_steps, eps in ((10, 0.1), (20, 0.05)):
        flow = mlp_flow(4, n_steps, eps)
        z = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
        x, _ = flow.forward_map(z)
        _, g = flow.score(x.detach())
        ref = exact_score(flow, z)
        errs.append(float((g - ref).abs().max() / ref.abs().max()))
    assert errs[0] < 5e-6 and errs[1] < 5e-7
    assert errs[0] / errs[1] > 10  # fourth order


def test_stochastic_flow_needs_and_replays_the_sample_noise():
    from latticeflow.lattice import SquareLattice

    lat = SquareLattice(2)
    flow = MongeAmpereFlow(Symmetrized(MLPPotential(4, 8, init_scale="linear"), point_group(lat), mode="random"),
                           n_steps=5, step_size=0.1).double()
    x, logp = flow.sample(5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="noise"):
        flow.score(x.detach())
    lp, _ = flow.score(x.detach(), noise=flow.sample_noise)
    assert (lp - logp.detach()).abs().max() < 1e-8
    mix = SymmetricMixture(flow, spin_flip_group(4))
    x, logp = mix.sample(5, generator=torch.Generator().manual_seed(1))
    lp, g = mix.score(x.detach(), noise=mix.sample_noise)
    assert (lp - logp.detach()).abs().max() < 1e-8
    xr = x.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(mix._mixture_logp(xr, None, mix.sample_noise).sum(), xr)
    torch.testing.assert_close(g, g_ref)


# ------------------------------------------------------------------ at the optimum
def test_path_gradient_vanishes_per_sample_at_the_exact_optimum_and_the_total_does_not():
    """The free theory: the Gaussian flow is exact up to RK4. Measured (B = 8): the total gradient
    of the batch has norm 8.2; the path gradient per sample at most 5.0e-4 at ε = 0.1 and 3.3e-5 at
    ε = 0.05 (a factor 15: what is left is the RK4 map's O(ε⁴) distance from the optimum)."""
    target = phi4(4, 0.7, 0.0)
    worst = []
    for n_steps, eps in ((10, 0.1), (20, 0.05)):
        flow = exact_gaussian_flow(target)
        flow.n_steps, flow.step_size = n_steps, eps
        start_at_best_gaussian(flow, target)  # the same T = 1
        params = [p for p in flow.parameters() if p.requires_grad]
        x, logp = flow.sample(8, generator=torch.Generator().manual_seed(0))
        f = logp + target.energy(x)
        assert float(f.detach().std()) < 1e-4  # ln q + E = −ln Z for every sample
        total = flat_grad(f.mean(), params, retain=True)
        assert float(total.norm()) > 1.0
        surrogate = path_gradient_surrogate(flow, target, x)
        per_sample = torch.stack([flat_grad(surrogate[i], params, retain=True) for i in range(len(surrogate))])
        worst.append(float(per_sample.norm(dim=1).max()) / float(total.norm()))
    assert worst[0] < 2e-4 and worst[1] < 2e-5
    assert worst[0] / worst[1] > 8  # O(ε⁴)


# ------------------------------------------------------------------ unbiasedness
def test_both_estimators_have_the_same_mean_away_from_the_optimum():
    """Common random numbers: total − path of a batch is the score term Σ ∂_θ ln q(x)|ₓ / B, whose
    mean is zero; t-statistics of its mean over 64 batches, per parameter (39 of them). Measured
    over 400 batches and two seeds: max |t| 1.8 and 3.1, rms t 0.8 and 1.5 (no drift with the
    number of batches). A control that leaves out the energy's gradient gives |t| ≈ 100."""
    target = phi4(2, 0.5, 0.5)
    torch.manual_seed(0)
    pot = QuadraticPotential((2, 2), symmetric="d4", linear=False) + MLPPotential(4, 6, init_scale="linear")
    flow = MongeAmpereFlow(pot, n_steps=4, step_size=0.1).double()
    params = [p for p in flow.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(3)
    totals, paths, wrong = [], [], []
    for _ in range(64):
        x, logp = flow.sample(32, generator=gen)
        totals.append(flat_grad((logp + target.energy(x)).mean(), params, retain=True))
        paths.append(flat_grad(path_gradient_surrogate(flow, target, x).mean(), params, retain=True))
        _, g = flow.score(x.detach())
        wrong.append(flat_grad((g * x).sum(1).mean(), params))  # without ∇E: biased
    totals, paths, wrong = torch.stack(totals), torch.stack(paths), torch.stack(wrong)

    def t_stat(d: torch.Tensor) -> torch.Tensor:
        return d.mean(0) / (d.std(0) / len(d) ** 0.5)

    t = t_stat(totals - paths)
    assert float(t.abs().max()) < 5 and float(t.square().mean().sqrt()) < 1.7, t
    assert float((totals - paths).std(0).max()) > 1e-3  # the score term is there, batch by batch
    assert float(t_stat(totals - wrong).abs().max()) > 10  # the test can see a bias
    assert float(paths.mean(0).norm()) > 10 * float((paths.std(0) / len(paths) ** 0.5).norm())  # a real gradient


# ------------------------------------------------------------------ the trainer
def test_trainer_path_estimator_steps_nowhere_at_the_optimum():
    target = phi4(4, 0.7, 0.0)
    norms = {}
    for est in ("total", "path"):
        flow = exact_gaussian_flow(target)
        opt = torch.optim.SGD(flow.parameters(), lr=1e-3)
        tr = VariationalTrainer(flow, target, opt, batch_size=16, gradient_estimator=est, progress=False)
        assert tr.gradient_estimator == est
        log = tr.fit(2)
        norms[est] = log["grad_norm"].tolist()
    assert min(norms["total"]) > 1.0 and max(norms["path"]) < 1e-3  # measured: 3.8 and 5.4; 1.1e-4 and 8e-5


def test_trainer_checks_the_estimator():
    target = phi4(2, 0.5, 0.5)
    flow = MongeAmpereFlow(MLPPotential(4, 4), n_steps=2).double()
    opt = torch.optim.Adam(flow.parameters())
    with pytest.raises(ValueError, match="gradient_estimator"):
        VariationalTrainer(flow, target, opt, gradient_estimator="reinforce", progress=False)

    class NoScore(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def sample(self, n, generator=None):
            return torch.zeros(n, 4) + self.w, torch.zeros(n)

    with pytest.raises(TypeError, match="score"):
        VariationalTrainer(NoScore(), target, opt, gradient_estimator="path", progress=False)

"""The Monge-Ampère flow: closed forms for quadratic potentials, reversibility, symmetry, errors."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from latticeflow import SquareLattice, space_group
from latticeflow.flow import MongeAmpereFlow, derived_generator, finer_steps, standard_normal_log_prob
from latticeflow.potentials import (
    AutogradPotential,
    ConvPotential,
    MLPPotential,
    QuadraticPotential,
    Symmetrized,
)

from potential_helpers import DT, GROUPS, LAT3, randomize

pytestmark = pytest.mark.usefixtures("float64")


# ---------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("lam", [0.8, -0.5])
def test_single_site_quadratic_matches_appendix_a(lam, generator):
    # φ = λx²/2: x(t) = e^{λt} z and p(x, t) = α/√(2π) exp(−α²x²/2) with α(t) = e^{−λt}
    pot = QuadraticPotential(1, "none", linear=False)
    with torch.no_grad():
        pot.a.fill_(lam)
    flow = MongeAmpereFlow(pot, n_steps=20, step_size=0.05)
    T = flow.total_time
    x, logp = flow.sample(6, generator=generator)
    z = torch.randn(6, 1, generator=torch.Generator().manual_seed(2024))  # the same draw
    torch.testing.assert_close(x, z * math.exp(lam * T), rtol=1e-7, atol=0)  # RK4: n (λε)⁵/120 ≈ 2e-8
    alpha = math.exp(-lam * T)
    closed = math.log(alpha) - 0.5 * math.log(2 * math.pi) - 0.5 * alpha**2 * x[:, 0] ** 2
    torch.testing.assert_close(logp, closed, rtol=0, atol=1e-7)
    torch.testing.assert_close(flow.log_prob(x), closed, rtol=0, atol=1e-7)
    # the log density changes by exactly −T tr A, whatever the RK4 error in x
    torch.testing.assert_close(logp - standard_normal_log_prob(z), torch.full((6,), -lam * T), rtol=0, atol=1e-13)


@pytest.mark.parametrize("symmetric", ["d4", "translation"])
def test_lattice_quadratic_flow_is_matrix_exponential(symmetric, generator):
    pot = randomize(QuadraticPotential((3, 3), symmetric, linear=False), 0.3)
    flow = MongeAmpereFlow(pot, n_steps=20, step_size=0.05)
    T = flow.total_time
    z = torch.randn(4, 9, generator=generator)
    x, dlogp = flow.forward_map(z)
    A = pot.matrix().detach().numpy()
    E = torch.from_numpy(scipy.linalg.expm(A * T))
    torch.testing.assert_close(x, z @ E.T, rtol=0, atol=1e-7)
    torch.testing.assert_close(dlogp, torch.full((4,), -T * np.trace(A)), rtol=0, atol=1e-12)
    # log_prob of the Gaussian N(0, e^{2AT}): ln N(e^{−AT}x) − T tr A
    Einv = torch.from_numpy(scipy.linalg.expm(-A * T))
    closed = standard_normal_log_prob(x @ Einv.T) - T * np.trace(A)
    torch.testing.assert_close(flow.log_prob(x), closed, rtol=0, atol=1e-7)


def test_density_is_normalised_on_a_grid():
    # ∫ p(x, T) dx = 1 checks the sign of eq. 3 and the base density together
    torch.manual_seed(5)
    flow = MongeAmpereFlow(randomize(MLPPotential(2, 6), 0.8), n_steps=10, step_size=0.1)
    g = torch.linspace(-9, 9, 181)
    X, Y = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([X.reshape(-1), Y.reshape(-1)], 1)
    with torch.no_grad():
        p = flow.log_prob(pts).exp()
    h = float(g[1] - g[0])
    assert float(p.sum()) * h * h == pytest.approx(1.0, abs=2e-4)
    # and the flow is not the identity (else the check would be trivial)
    assert not torch.allclose(p, standard_normal_log_prob(pts).exp(), atol=1e-3)


def test_delta_logp_is_minus_log_det_jacobian():
    torch.manual_seed(6)
    flow = MongeAmpereFlow(randomize(MLPPotential(4, 7), 0.8) + randomize(QuadraticPotential(4, "none"), 0.2),
                           n_steps=20, step_size=0.05)
    z = torch.randn(4)
    J = torch.autograd.functional.jacobian(lambda u: flow.forward_map(u[None])[0][0], z)
    _, dlogp = flow.forward_map(z[None])
    # the RK4 map's Jacobian determinant equals exp(−∫∇²φ) up to the integration error
    d = float(dlogp[0].detach())
    assert d == pytest.approx(-float(torch.linalg.slogdet(J)[1]), abs=1e-7)
    assert abs(d) > 0.1


# ---------------------------------------------------------------------- reversibility
def test_reversibility_of_mlp_flow():
    torch.manual_seed(8)
    flow = MongeAmpereFlow(randomize(MLPPotential(9, 16, time_dependent=True), 0.3), n_steps=20, step_size=0.05)
    dz, dlp = flow.reversibility_error(16, torch.Generator().manual_seed(1))
    assert dz < 1e-6 and dlp < 1e-6
    # sample and log_prob agree
    x, logp = flow.sample(16)
    torch.testing.assert_close(flow.log_prob(x), logp, rtol=0, atol=1e-6)


def test_random_symmetrization_replays_noise():
    torch.manual_seed(9)
    group = space_group(LAT3).with_spin_flip()
    pot = Symmetrized(randomize(MLPPotential(9, 16), 0.5), group) + randomize(QuadraticPotential((3, 3)), 0.1)
    flow = MongeAmpereFlow(pot, n_steps=20, step_size=0.05)
    x, logp = flow.sample(16, generator=torch.Generator().manual_seed(3))
    noise = flow.last_noise
    assert len(noise) == 20 and noise[0][0].index.shape == (16,)
    # replay by tokens
    torch.testing.assert_close(flow.log_prob(x, noise=noise), logp, rtol=0, atol=1e-6)
    # replay by an identically seeded generator (tokens are drawn in forward-time order)
    z = torch.randn(16, 9)
    x1, d1 = flow.forward_map(z, generator=torch.Generator().manual_seed(4))
    z1, d2 = flow.inverse_map(x1, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(z1, z, rtol=0, atol=1e-6)
    torch.testing.assert_close(d1, -d2, rtol=0, atol=1e-6)
    assert max(flow.reversibility_error(8)) < 1e-6
    # fresh noise on the way back does not invert the map: the replay matters
    z2, _ = flow.inverse_map(x1, generator=torch.Generator().manual_seed(5))
    assert (z2 - z).abs().max() > 1e-3


def test_hutchinson_flow_replays_probes():
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1), nn.Flatten(0))
    flow = MongeAmpereFlow(AutogradPotential(module, laplacian="hutchinson"), n_steps=5, step_size=0.1)
    x, logp = flow.sample(3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(flow.log_prob(x, noise=flow.last_noise), logp, rtol=0, atol=1e-6)


def test_step_grid_can_change_at_inference():
    torch.manual_seed(10)
    flow = MongeAmpereFlow(randomize(MLPPotential(5, 8), 0.5), n_steps=10, step_size=0.1)
    z = torch.randn(4, 5)
    x_coarse, _ = flow.forward_map(z)
    flow.n_steps, flow.step_size = 40, 0.025
    assert flow.total_time == pytest.approx(1.0)
    x_fine, _ = flow.forward_map(z)
    flow.method = "midpoint"
    x_mid, _ = flow.forward_map(z)
    assert (x_coarse - x_fine).abs().max() < 1e-4
    assert (x_mid - x_fine).abs().max() < 1e-3
    with pytest.raises(ValueError, match="n_steps must be a positive integer, got n_steps=0"):
        flow.n_steps = 0
    with pytest.raises(ValueError, match=r"step_size must be a finite number > 0, got step_size=-0.1"):
        flow.step_size = -0.1
    with pytest.raises(ValueError, match="method must be one of"):
        flow.method = "dopri5"


# ---------------------------------------------------------------------- symmetry
@pytest.mark.parametrize("group_name", list(GROUPS))
def test_exactly_symmetrized_flow_has_invariant_density(group_name):
    torch.manual_seed(11)
    group = GROUPS[group_name]()
    pot = Symmetrized(randomize(MLPPotential(9, 6), 0.5), group, mode="exact")
    flow = MongeAmpereFlow(pot, n_steps=6, step_size=0.1)
    x = 1.5 * torch.randn(2, 9)
    with torch.no_grad():
        lp = flow.log_prob(x)
        lp_g = flow.log_prob(group.act(x).reshape(-1, 9)).reshape(group.order, 2)
    torch.testing.assert_close(lp_g, lp.expand_as(lp_g), rtol=0, atol=1e-11)
    # without symmetrisation the density is not invariant
    plain = MongeAmpereFlow(pot.potential, n_steps=6, step_size=0.1)
    with torch.no_grad():
        lp_plain = plain.log_prob(group.act(x).reshape(-1, 9)).reshape(group.order, 2)
    assert (lp_plain - lp_plain[:1]).abs().max() > 1e-4


def test_conv_and_quadratic_flow_is_invariant_under_space_group_and_flip():
    torch.manual_seed(12)
    pot = randomize(ConvPotential(4, channels=3, kernel_size=3, activation="lncosh", d4=True, z2=True), 0.5) \
        + randomize(QuadraticPotential((4, 4), "d4", linear=False), 0.1)
    flow = MongeAmpereFlow(pot, n_steps=5, step_size=0.1)
    group = space_group(SquareLattice(4)).with_spin_flip()
    x = torch.randn(1, 16)
    with torch.no_grad():
        lp = flow.log_prob(x)
        lp_g = flow.log_prob(group.act(x).reshape(-1, 16))
    torch.testing.assert_close(lp_g, lp.expand_as(lp_g), rtol=0, atol=1e-11)


# ---------------------------------------------------------------------- training
def _param_grads(flow, ckpt, seed=0):
    flow.checkpoint = ckpt
    flow.zero_grad(set_to_none=True)
    x, logp = flow.sample(5, generator=torch.Generator().manual_seed(seed))
    (logp + 0.5 * (x**2).sum(1)).mean().backward()
    # a parameter that only shifts φ by a constant (an output bias) gets no gradient at all
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in flow.parameters()]


@pytest.mark.parametrize("kind", ["mlp-symmetrized", "conv-quadratic", "autograd"])
def test_checkpointing_gives_identical_gradients(kind):
    torch.manual_seed(13)
    if kind == "mlp-symmetrized":
        pot = Symmetrized(randomize(MLPPotential(9, 6, time_dependent=True)), space_group(LAT3).with_spin_flip()) \
            + randomize(QuadraticPotential((3, 3)), 0.1)
    elif kind == "conv-quadratic":
        pot = randomize(ConvPotential(3, channels=2, layers=2)) + randomize(QuadraticPotential((3, 3)), 0.1)
    else:
        pot = AutogradPotential(nn.Sequential(nn.Linear(9, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0)))
    flow = MongeAmpereFlow(pot, n_steps=4, step_size=0.1)
    a, b = _param_grads(flow, False), _param_grads(flow, True)
    assert any(float(g.abs().max()) > 0 for g in a)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)


def test_training_gradient_matches_plain_autograd_reference():
    # the fused MLP backward, the per-integration ‖W‖² and the symmetry frames change only rounding
    torch.manual_seed(14)
    group = space_group(LAT3).with_spin_flip()
    fused = Symmetrized(randomize(MLPPotential(9, 6)), group)
    plain = Symmetrized(MLPPotential(9, 6, fused=False), group)
    plain.load_state_dict(fused.state_dict())
    ga = _param_grads(MongeAmpereFlow(fused, 4, 0.1), False)
    gb = _param_grads(MongeAmpereFlow(plain, 4, 0.1), True)  # checkpointing: no shared constants
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-13)


def test_repeated_and_partial_backward_passes_through_one_graph():
    # no state may leak between backward passes of one graph: an earlier design accumulated
    # ∂/∂W in a per-integration buffer, which a pass asking only for ∂/∂x left stale
    torch.manual_seed(15)
    flow = MongeAmpereFlow(randomize(MLPPotential(5, 6)), 3, 0.1)
    z = torch.randn(4, 5, requires_grad=True)
    x, dlogp = flow.forward_map(z)
    loss = (dlogp + x.square().sum(1)).mean()
    torch.autograd.grad(loss, z, retain_graph=True)  # input gradient only
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in flow.parameters()]
    loss.backward()
    for p, g in zip(flow.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-14, atol=0)
    flow.zero_grad(set_to_none=True)
    x, dlogp = flow.forward_map(z.detach())
    (dlogp + x.square().sum(1)).mean().backward()
    for p, g in zip(flow.parameters(), once):
        torch.testing.assert_close(p.grad, g, rtol=1e-14, atol=0)


def test_gradient_of_log_prob_in_x_is_differentiable_in_parameters():
    # double backward through the fused MLP stage (e.g. a force-matching loss, paper section 4.2)
    torch.manual_seed(16)
    fused = randomize(MLPPotential(4, 5))
    plain = MLPPotential(4, 5, fused=False)
    plain.load_state_dict(fused.state_dict())
    x0 = torch.randn(3, 4)
    out = []
    for pot in (fused, plain):
        flow = MongeAmpereFlow(pot, 3, 0.1)
        x = x0.clone().requires_grad_(True)
        (force,) = torch.autograd.grad(flow.log_prob(x).sum(), x, create_graph=True)
        out.append(torch.autograd.grad(force.square().sum(), list(pot.parameters())))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_float32_follows_parameters():
    flow = MongeAmpereFlow(Symmetrized(MLPPotential(9, 8), space_group(LAT3).with_spin_flip()), 5, 0.1)
    flow = flow.to(torch.float32)
    x, logp = flow.sample(4)
    assert x.dtype == logp.dtype == torch.float32 and flow.dtype == torch.float32
    with pytest.raises(TypeError, match=r"x must have the flow's dtype torch.float32, got dtype=torch.float64"):
        flow.log_prob(x.double())


# ---------------------------------------------------------------------- bad input
def test_bad_flow_arguments():
    with pytest.raises(TypeError, match="potential must be a Potential, got Linear"):
        MongeAmpereFlow(nn.Linear(3, 1))
    with pytest.raises(ValueError, match="n_steps must be a positive integer, got n_steps=-2"):
        MongeAmpereFlow(MLPPotential(3, 2), n_steps=-2)
    with pytest.raises(ValueError, match="step_size must be a finite number > 0, got step_size=0"):
        MongeAmpereFlow(MLPPotential(3, 2), step_size=0)
    with pytest.raises(ValueError, match="method must be one of 'euler', 'midpoint', 'rk4'; got method='rk45'"):
        MongeAmpereFlow(MLPPotential(3, 2), method="rk45")


def test_bad_flow_inputs():
    flow = MongeAmpereFlow(MLPPotential(3, 2), n_steps=2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3\), got shape=\(2, 4\)"):
        flow.log_prob(torch.zeros(2, 4))
    with pytest.raises(TypeError, match="z must be a torch.Tensor of shape \\(B, 3\\), got list"):
        flow.forward_map([[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="n must be an integer >= 1, got n=0"):
        flow.sample(0)
    with pytest.raises(ValueError, match=r"noise must hold one token per step \(2\), got 3"):
        flow.log_prob(torch.zeros(1, 3), noise=[None] * 3)


# ---------------------------------------------------------------------- the Flow interface
def test_flow_implements_the_interface():
    from latticeflow.flow import Flow

    flow = MongeAmpereFlow(MLPPotential(3, 2), n_steps=2)
    assert isinstance(flow, Flow)
    assert not isinstance(nn.Linear(3, 3), Flow)
    assert flow.dim == 3 and flow.n_steps == 2 and flow.dtype == DT and flow.device == torch.device("cpu")
    assert flow.stochastic is False and flow.draw_noise(5) is None


def test_draw_noise_replays_a_stochastic_flow():
    # the public noise draw: one token per step, drawn like the flow's own integrations draw them
    flow = MongeAmpereFlow(Symmetrized(randomize(MLPPotential(9, 8)), space_group(LAT3), mode="random"), 3, 0.1)
    assert flow.stochastic
    noise = flow.draw_noise(4, torch.Generator().manual_seed(1))
    assert len(noise) == 3
    z = torch.randn(4, 9)
    x1, d1 = flow.forward_map(z, noise=noise)
    x2, d2 = flow.forward_map(z, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x1, x2, rtol=0, atol=0)
    torch.testing.assert_close(d1, d2, rtol=0, atol=0)
    assert flow.draw_noise(4, noise=noise) == noise  # given tokens are checked and returned
    with pytest.raises(ValueError, match=r"noise must hold one token per step \(3\), got 2"):
        flow.draw_noise(4, noise=noise[:2])


def test_finer_steps_refines_every_flow_inside_and_restores_them() -> None:
    """Each MongeAmpereFlow in a module: factor × the steps of 1/factor the size, put back after the block."""
    torch.manual_seed(0)
    inner = MongeAmpereFlow(MLPPotential(4, 8, init_scale=0.5), n_steps=6, step_size=0.1).double()
    outer = nn.ModuleList([inner, MongeAmpereFlow(MLPPotential(4, 8), n_steps=3, step_size=0.2)])
    y = torch.randn(5, 4, dtype=torch.float64)
    coarse = inner.log_prob(y)
    with finer_steps(outer, 4):
        assert [(f.n_steps, f.step_size) for f in outer] == [(24, 0.1 / 4), (12, 0.2 / 4)]
        fine = inner.log_prob(y)
    assert [(f.n_steps, f.step_size) for f in outer] == [(6, 0.1), (3, 0.2)]
    # the same T: the densities agree to RK4's error, and differ (the steps did change)
    assert 0 < float((fine - coarse).detach().abs().max()) < 1e-4
    with pytest.raises(RuntimeError, match="inside"), finer_steps(inner, 2):
        raise RuntimeError("inside")
    assert (inner.n_steps, inner.step_size) == (6, 0.1)  # restored on an error too
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="factor"), finer_steps(inner, bad):
            pass
    with pytest.raises(ValueError, match="no MongeAmpereFlow"), finer_steps(nn.Linear(2, 2)):
        pass


def test_noise_tokens_come_from_a_generator_of_their_own() -> None:
    """The per-step tokens are drawn first, from a generator seeded by a hash of one 62-bit draw of the
    caller's, and z after them; sampling stays reproducible from the caller's seed."""
    import hashlib

    g = torch.Generator().manual_seed(0)
    raw = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().set_state(g.get_state())))
    hashed = int.from_bytes(hashlib.blake2b(raw.to_bytes(8, "little"), digest_size=8).digest(), "little") >> 2
    assert derived_generator(g).initial_seed() == hashed != raw
    flow = MongeAmpereFlow(Symmetrized(MLPPotential(16, 4), space_group(SquareLattice(4)).with_spin_flip()), n_steps=3)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 16, generator=g)
    own = derived_generator(torch.Generator().set_state(g.get_state()))  # what draw_noise derives from g
    tokens = flow.draw_noise(8, g)
    expected = [torch.randint(flow.potential.order, (8,), generator=own) for _ in range(3)]
    assert all(torch.equal(t.index, e) for t, e in zip(tokens, expected))
    # and sampling stays reproducible from the caller's seed
    a = flow.sample(8, generator=torch.Generator().manual_seed(3))[0]
    b = flow.sample(8, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b) and z.shape == (8, 16)

"""The Z2 / D4 group mixture of a flow density: exact invariance, normalisation, consistency."""

import math

import pytest
import torch

from latticeflow.flow import MongeAmpereFlow
from latticeflow.lattice import SquareLattice
from latticeflow.mixture import SymmetricMixture
from latticeflow.potentials import MLPPotential
from latticeflow.symmetry import point_group, spin_flip_group


def _flow(dim: int, seed: int = 0) -> MongeAmpereFlow:
    torch.manual_seed(seed)
    pot = MLPPotential(dim, 6).double()
    with torch.no_grad():  # a potential strong enough that p(x) != p(-x) by a lot
        for p in pot.parameters():
            p.mul_(3.0)
    return MongeAmpereFlow(pot, n_steps=6, step_size=0.1).double()


def test_mixture_is_average_of_images_and_z2_invariant():
    flow = _flow(4)
    mix = SymmetricMixture(flow, spin_flip_group(4))
    x = torch.randn(5, 4, dtype=torch.float64)
    lp, lm = flow.log_prob(x), flow.log_prob(-x)
    assert (lp - lm).abs().max() > 1e-3  # the bare flow is not symmetric
    expected = torch.logaddexp(lp, lm) - math.log(2)
    torch.testing.assert_close(mix.log_prob(x), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(mix.log_prob(-x), expected, atol=1e-10, rtol=0)


def test_mixture_invariant_under_point_group():
    lat = SquareLattice(2)
    group = point_group(lat)
    mix = SymmetricMixture(_flow(4, seed=1), group)
    x = torch.randn(3, 4, dtype=torch.float64)
    ref = mix.log_prob(x)
    for g in range(group.order):
        gx = group.signs[g].to(x) * x[:, group.perms[g]]
        torch.testing.assert_close(mix.log_prob(gx), ref, atol=1e-10, rtol=0)


def test_sample_logp_matches_log_prob():
    mix = SymmetricMixture(_flow(4, seed=2), spin_flip_group(4))
    x, logp = mix.sample(7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(mix.log_prob(x), logp, atol=1e-7, rtol=0)


def test_mixture_density_is_normalised_in_2d():
    mix = SymmetricMixture(_flow(2, seed=4), spin_flip_group(2))
    grid = torch.linspace(-7, 7, 281, dtype=torch.float64)
    X, Y = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([X.reshape(-1), Y.reshape(-1)], 1)
    with torch.no_grad():
        dens = mix.log_prob(pts).exp()
    h = (grid[1] - grid[0]).item()
    assert dens.sum().item() * h * h == pytest.approx(1.0, abs=2e-3)


def test_rejects_wrong_group_size():
    with pytest.raises(ValueError, match="N=9"):
        SymmetricMixture(_flow(4), spin_flip_group(9))


# ---------------------------------------------------------------------- the Flow interface
def test_mixture_implements_the_flow_interface():
    from latticeflow.flow import Flow

    flow = _flow(4, seed=5)
    mix = SymmetricMixture(flow, spin_flip_group(4))
    assert isinstance(mix, Flow) and isinstance(flow, Flow)
    assert (mix.dim, mix.n_steps, mix.dtype, mix.device) == (4, 6, torch.float64, torch.device("cpu"))
    assert mix.stochastic is False and mix.draw_noise(3) is None
    mix.n_steps = 8  # settable, like the flow's: it is the flow's
    assert flow.n_steps == 8
    # forward_map / inverse_map are the underlying flow's bijection (a mixture has none of its own)
    z = torch.randn(3, 4, dtype=torch.float64)
    for a, b in zip(mix.forward_map(z), flow.forward_map(z)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(mix.inverse_map(z), flow.inverse_map(z)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sample_applies_a_group_element_to_a_flow_sample():
    # sampling = a flow sample, then one uniform element g through SymmetryGroup.act
    group = point_group(SquareLattice(2)).with_spin_flip()
    flow = _flow(4, seed=6)
    mix = SymmetricMixture(flow, group)
    x, _ = mix.sample(6, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    y, _ = flow.sample(6, generator=gen)
    g = torch.randint(group.order, (6,), generator=gen)
    torch.testing.assert_close(x, group.act(y, g), rtol=0, atol=0)


def test_mixture_bad_input():
    mix = SymmetricMixture(_flow(4), spin_flip_group(4))
    with pytest.raises(TypeError, match=r"x must have the flow's dtype torch.float64, got dtype=torch.float32"):
        mix.log_prob(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 4\), got shape=\(2, 3\)"):
        mix.log_prob(torch.zeros(2, 3, dtype=torch.float64))

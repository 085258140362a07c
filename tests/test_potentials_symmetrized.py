"""Symmetrized: exact group averages are invariant, random draws average to them, step frames (float64)."""

import pytest
import torch
from torch import nn

from latticeflow import SquareLattice, space_group, translation_group
from latticeflow.potentials import MLPPotential, Symmetrized

from potential_helpers import GROUPS, randomize

pytestmark = pytest.mark.usefixtures("float64")

LAT3 = SquareLattice(3)
LAT4 = SquareLattice(4)



@pytest.mark.parametrize("group_name", list(GROUPS))
def test_exact_symmetrization_is_invariant(group_name):
    group = GROUPS[group_name]()
    pot = Symmetrized(randomize(MLPPotential(9, 5)), group, mode="exact")
    x = torch.randn(2, 9)
    phi, g, lap = pot(x)
    images = group.act(x)  # (G, B, N)
    phi_g, g_g, lap_g = pot(images.reshape(-1, 9))
    G = group.order
    torch.testing.assert_close(phi_g.reshape(G, 2), phi.expand(G, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lap_g.reshape(G, 2), lap.expand(G, 2), rtol=1e-12, atol=1e-12)
    # the gradient is equivariant: ∇φ(g·x) = g·∇φ(x)
    torch.testing.assert_close(g_g.reshape(G, 2, 9), group.act(g), rtol=1e-12, atol=1e-12)
    # the raw network is not invariant (so the check above can fail)
    base = pot.potential
    assert not torch.allclose(base(images.reshape(-1, 9))[0].reshape(G, 2), base(x)[0].expand(G, 2), atol=1e-6)


def test_random_mode_averages_to_exact_mode():
    group = space_group(LAT3).with_spin_flip()
    base = randomize(MLPPotential(9, 5))
    rnd, exact = Symmetrized(base, group, "random"), Symmetrized(base, group, "exact")
    x = torch.randn(2, 9)
    outs = [rnd(x, 0.0, torch.full((2,), g, dtype=torch.long)) for g in range(group.order)]
    for i in range(3):
        torch.testing.assert_close(torch.stack([o[i] for o in outs]).mean(0), exact(x)[i], rtol=1e-12, atol=1e-12)
    # one term is φ̃(g·x) itself
    idx = torch.tensor([5, 17])
    phi = rnd(x, 0.0, idx)[0]
    torch.testing.assert_close(phi, base(group.act(x, idx))[0], rtol=0, atol=1e-14)


def test_random_draws_and_step_frame():
    group = space_group(LAT3).with_spin_flip()
    pot = Symmetrized(randomize(MLPPotential(9, 5)), group)
    d1 = pot.resample(6, torch.Generator().manual_seed(3))
    d2 = pot.resample(6, torch.Generator().manual_seed(3))
    assert torch.equal(d1.index, d2.index)
    torch.testing.assert_close(d1.perm, group.perms[d1.index], rtol=0, atol=0)
    x = torch.randn(6, 9)
    into, out_of, inner, inner_noise = pot.step_frame(d1)
    assert inner is pot.potential and inner_noise is None
    torch.testing.assert_close(into(x), group.act(x, d1.index), rtol=0, atol=0)
    torch.testing.assert_close(out_of(into(x)), x, rtol=0, atol=0)
    # the drift in the frame, mapped back, is the symmetrised drift
    g_frame = out_of(inner(into(x))[1])
    torch.testing.assert_close(g_frame, pot(x, 0.0, d1)[1], rtol=1e-14, atol=1e-14)
    assert Symmetrized(pot.potential, group, "exact").step_frame(None) is None


def test_symmetrized_follows_module_dtype():
    pot = Symmetrized(MLPPotential(9, 4), space_group(LAT3).with_spin_flip()).to(torch.float32)
    x = torch.randn(3, 9, dtype=torch.float32)
    phi, g, lap = pot(x)
    assert g.dtype == torch.float32 and pot.signs.dtype == torch.float32


def test_bad_groups_and_indices():
    with pytest.raises(ValueError, match="group acts on dim=16 sites but the potential has dim=9"):
        Symmetrized(MLPPotential(9, 3), translation_group(LAT4))
    with pytest.raises(TypeError, match="group must be a SymmetryGroup, got Tensor"):
        Symmetrized(MLPPotential(9, 3), torch.zeros(3, 9))
    with pytest.raises(TypeError, match="potential must be a Potential, got Linear"):
        Symmetrized(nn.Linear(9, 1), translation_group(LAT3))
    sym = Symmetrized(MLPPotential(9, 3), translation_group(LAT3))
    with pytest.raises(ValueError, match=r"symmetry indices must lie in \[0, 9\), got range \[0, 9\]"):
        sym(torch.zeros(2, 9), 0.0, torch.tensor([0, 9]))
    with pytest.raises(ValueError, match=r"symmetry index must have shape \(2,\), got shape=\(3,\)"):
        sym(torch.zeros(2, 9), 0.0, torch.tensor([0, 1, 2]))


def test_a_sum_steps_in_the_frame_of_its_symmetrised_part_only_when_the_rest_is_invariant():
    from latticeflow.build import make_group
    from latticeflow.flow import MongeAmpereFlow
    from latticeflow.potentials import QuadraticPotential

    lat = SquareLattice(4)
    group = make_group("space+z2", lat)
    quad = randomize(QuadraticPotential((4, 4), "d4", linear=False, time_dependent=True))
    assert quad.invariant_under(group) and quad.invariant_under(translation_group(lat))
    # a linear term is odd under the spin flip; a translation-only kernel is not D4-invariant
    assert not randomize(QuadraticPotential((4, 4), "d4")).invariant_under(group)
    assert QuadraticPotential((4, 4), "d4").invariant_under(make_group("space", lat))
    assert not QuadraticPotential((4, 4), "translation", linear=False).invariant_under(group)
    assert QuadraticPotential((4, 4), "translation", linear=False).invariant_under(translation_group(lat))
    assert not QuadraticPotential((12, 12), "d4", method="fft").invariant_under(make_group("space", SquareLattice(16)))

    sym = Symmetrized(randomize(MLPPotential(16, 6, activation="lncosh", time_dependent=True)), group)
    framed = quad + sym
    assert framed._frame_index == 1 and sym.frame_group() is group
    assert (randomize(QuadraticPotential((4, 4), "d4")) + sym)._frame_index is None  # not invariant
    assert (sym + Symmetrized(MLPPotential(16, 3), group))._frame_index is None  # two frames
    assert (quad + Symmetrized(MLPPotential(16, 3), group, "exact"))._frame_index is None  # no random element

    # the same flow with and without the frame: samples, ln p, ln q of given points and every gradient
    plain = quad + sym
    plain._frame_index = None
    results = []
    for pot in (framed, plain):
        flow = MongeAmpereFlow(pot, n_steps=3, step_size=0.1)
        assert (pot.step_frame(flow.draw_noise(2, torch.Generator().manual_seed(0))[0]) is None) == (pot is plain)
        flow.zero_grad()
        x, logp = flow.sample(5, generator=torch.Generator().manual_seed(1))
        lq = flow.log_prob(x.detach() * 0.9, generator=torch.Generator().manual_seed(2))
        (logp.sum() + (x ** 3).sum() + lq.sum()).backward()
        results.append([x, logp, lq, *(p.grad for p in flow.parameters())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)

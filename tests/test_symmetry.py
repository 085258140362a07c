import numpy as np
import pytest
import torch

from latticeflow import SquareLattice, SymmetryGroup, point_group, space_group, spin_flip_group, translation_group


@pytest.mark.parametrize("L", [3, 4, 5])
def test_orders(L):
    lat = SquareLattice(L)
    assert translation_group(lat).order == L * L
    assert point_group(lat).order == 8
    assert space_group(lat).order == 8 * L * L
    assert space_group(lat).with_spin_flip().order == 16 * L * L


def test_l2_torus_elements_coincide():
    lat = SquareLattice(2)
    # on the 2x2 torus a one-site translation is also a reflection: 8 distinct elements, the
    # automorphism group of the doubled 4-cycle
    assert space_group(lat).order == 8
    assert translation_group(lat).order == 4


@pytest.mark.parametrize("L", [2, 3, 4])
@pytest.mark.parametrize("make", [translation_group, point_group, space_group])
def test_group_axioms_and_automorphisms(L, make):
    lat = SquareLattice(L)
    g = make(lat).with_spin_flip()
    assert bool(g.is_automorphism_of(lat).all())
    table = g.product_table
    assert (table >= 0).all(), "closure"
    G = g.order
    e = g.identity
    assert torch.equal(table[e], torch.arange(G)) and torch.equal(table[:, e], torch.arange(G))
    inv = g.inverse
    assert (inv >= 0).all()
    assert torch.equal(table[torch.arange(G), inv], torch.full((G,), e))
    # associativity on a random sample of triples
    a, b, c = torch.randint(G, (3, 200))
    assert torch.equal(table[table[a, b], c], table[a, table[b, c]])


def test_product_matches_action():
    lat = SquareLattice(4)
    g = space_group(lat).with_spin_flip()
    x = torch.randn(5, lat.N, dtype=torch.float64)
    a, b = torch.randint(g.order, (2, 5))
    ab = g.product(a, b)
    np.testing.assert_array_equal(g.act(g.act(x, b), a).numpy(), g.act(x, ab).numpy())


def test_act_all_vs_index():
    lat = SquareLattice(3)
    g = space_group(lat).with_spin_flip()
    x = torch.randn(4, lat.N)
    allg = g.act(x)
    assert allg.shape == (g.order, 4, lat.N)
    idx = torch.randint(g.order, (4,))
    torch.testing.assert_close(g.act(x, idx), allg[idx, torch.arange(4)])
    # translation on the image: shift by (1, 0) takes the value of row r+1
    T = translation_group(lat)
    k = int(T.index_of(((lat.coords[:, 0] + 1) % 3 * 3 + lat.coords[:, 1])[None].numpy(), np.ones(1))[0])
    img = x.reshape(4, 3, 3)
    torch.testing.assert_close(T.act(x, torch.full((4,), k)).reshape(4, 3, 3), torch.roll(img, -1, dims=1))


def test_inverse_perms_and_gradient_rule():
    lat = SquareLattice(3)
    g = space_group(lat).with_spin_flip()
    x = torch.randn(6, lat.N, dtype=torch.float64, requires_grad=True)
    w = torch.randn(lat.N, dtype=torch.float64)
    idx = torch.randint(g.order, (6,))
    y = g.act(x, idx)
    f = (torch.sin(y) * w).sum()
    (gx,) = torch.autograd.grad(f, x)
    gy = torch.cos(y) * w
    rule = g.signs[idx][:, None] * torch.gather(gy, 1, g.inverse_perms[idx])
    torch.testing.assert_close(gx, rule)


def test_open_lattice_point_group_only():
    lat = SquareLattice(4, boundary="open")
    assert bool(point_group(lat).is_automorphism_of(lat).all())
    with pytest.raises(ValueError, match="periodic"):
        translation_group(lat)


def test_spin_flip_group():
    z2 = spin_flip_group(5)
    assert z2.order == 2
    x = torch.randn(3, 5)
    torch.testing.assert_close(z2.act(x)[1], -x)


def test_bad_inputs():
    with pytest.raises(ValueError, match="permutation"):
        SymmetryGroup(torch.tensor([[0, 0, 1]]))
    with pytest.raises(ValueError, match="identity"):
        SymmetryGroup(torch.tensor([[1, 0, 2]]))
    with pytest.raises(TypeError, match="SquareLattice"):
        translation_group(torch.zeros(4))
    lat = SquareLattice(3)
    with pytest.raises(ValueError, match="N=9"):
        point_group(lat).is_automorphism_of(SquareLattice(4))

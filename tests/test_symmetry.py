import numpy as np
import pytest
import torch

from latticeflow import SquareLattice, SymmetryGroup, point_group, space_group, spin_flip_group, translation_group
from latticeflow.symmetry import all_images, d4_average, d4_maps, displacement_orbits, signed_permutation


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


# ---------------------------------------------------------------------- D4 geometry
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_d4_maps_are_rotations_and_reflections(k):
    r, c = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    X = torch.randn(2, k, k)
    images = [X[:, rows, cols] for rows, cols in d4_maps(r, c, k - 1)]
    # order: identity, rot90 by 1, 2, 3 quarter turns, flip columns, flip rows, transpose, antitranspose
    expected = [X, *(torch.rot90(X, q, (1, 2)) for q in (1, 2, 3)), X.flip(2), X.flip(1), X.transpose(1, 2),
                torch.rot90(X, 2, (1, 2)).transpose(1, 2)]
    for got, want in zip(images, expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("L", [2, 3, 4, 5])
def test_point_group_is_d4_maps_on_the_lattice(L):
    lat = SquareLattice(L)
    r, c = lat.coords[:, 0], lat.coords[:, 1]
    perms = torch.stack([rows * L + cols for rows, cols in d4_maps(r, c, L - 1)])
    assert torch.equal(point_group(lat).perms, perms)


@pytest.mark.parametrize("L, d4, n", [(4, True, 6), (4, False, 10), (5, True, 6), (5, False, 13), (1, True, 1)])
def test_displacement_orbits(L, d4, n):
    # Z_L×Z_L displacements: under d → −d, (L² + #self-inverse)/2 orbits; under D4, 6 for L = 4, 5
    labels = displacement_orbits(L, L, d4)
    assert labels.shape == (L, L) and int(labels.max()) + 1 == n and int(labels[0, 0]) == 0
    r, c = torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij")
    maps = d4_maps(r, c, 0)
    for rows, cols in (maps if d4 else [maps[2]]):
        assert torch.equal(labels[rows % L, cols % L], labels)  # constant on orbits


def test_displacement_orbits_on_a_rectangle():
    labels = displacement_orbits(2, 3, d4=False)
    assert torch.equal(labels, labels[(-torch.arange(2)) % 2][:, (-torch.arange(3)) % 3])
    assert int(labels.max()) + 1 == 4  # (6 + 2 self-inverse) / 2


@pytest.mark.parametrize("k", [1, 3, 5])
def test_d4_average_is_the_mean_over_the_group_and_a_projection(k):
    K = torch.randn(3, k, k, dtype=torch.float64)
    r, c = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    mean = torch.stack([K[:, rows, cols] for rows, cols in d4_maps(r, c, k - 1)]).mean(0)
    avg = d4_average(K)
    torch.testing.assert_close(avg, mean, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(d4_average(avg), avg, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(avg, torch.rot90(avg, 1, (1, 2)), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------- the action
def test_signed_permutation_adjoint_and_double_backward():
    lat = SquareLattice(3)
    g = space_group(lat).with_spin_flip()
    idx = torch.randint(g.order, (5,))
    perm, inv, sign = g.perms[idx], g.inverse_perms[idx], g.signs[idx][:, None]
    x = torch.randn(5, lat.N, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, lat.N, dtype=torch.float64)
    y = signed_permutation(x, perm, inv, sign)
    torch.testing.assert_close(y, sign * torch.gather(x, 1, perm), rtol=0, atol=0)
    # ⟨g·x, v⟩ = ⟨x, gᵀv⟩ and gᵀ undoes g
    torch.testing.assert_close((y * v).sum(), (x * signed_permutation(v, inv, perm, sign)).sum())
    torch.testing.assert_close(signed_permutation(y, inv, perm, sign), x, rtol=0, atol=0)
    # differentiable twice: ∂²/∂x² of Σ (g·x)³ v is diagonal 6 (g·x) v pulled back
    (gx,) = torch.autograd.grad((y**3 * v).sum(), x, create_graph=True)
    (hx,) = torch.autograd.grad(gx.sum(), x)
    want = signed_permutation(6 * y * v * signed_permutation(torch.ones_like(x), perm, inv, sign), inv, perm, sign)
    torch.testing.assert_close(hx, want.detach())


def test_all_images_and_their_pull_back():
    lat = SquareLattice(3)
    g = space_group(lat).with_spin_flip()
    x = torch.randn(4, lat.N, dtype=torch.float64)
    y = all_images(x, g.perms, g.signs)  # (B, G, N)
    assert y.shape == (4, g.order, lat.N)
    assert torch.equal(y.transpose(0, 1), g.act(x))
    assert torch.equal(all_images(x, g.perms), all_images(x, g.perms, torch.ones(g.order, dtype=x.dtype)))
    # each image pulled back by its own inverse (perm (G, N) broadcast over the batch) is x again
    back = signed_permutation(y, g.inverse_perms, g.perms, g.signs[:, None])
    assert torch.equal(back, x[:, None].expand_as(back))


def test_rows_are_checked_in_every_chunk_and_inverse_is_argsort():
    """The permutation check runs over blocks of rows (the L=64 tables take GiB): a bad row in the last
    block is still refused; the inverse table (one scatter) equals argsort row by row."""
    N = 4096  # 1024 rows per block
    rng = np.random.default_rng(0)
    perms = np.stack([np.arange(N)] + [rng.permutation(N) for _ in range(1100)])
    g = SymmetryGroup(perms)
    assert g.order == 1101 and torch.equal(g.inverse_perms, torch.argsort(g.perms, dim=1))
    bad = perms.copy()
    bad[-1, 5] = bad[-1, 6]
    with pytest.raises(ValueError, match="permutation of range"):
        SymmetryGroup(bad)


@pytest.mark.parametrize("L", [3, 4, 5, 6])
@pytest.mark.parametrize("make", [translation_group, space_group])
@pytest.mark.parametrize("flip", [False, True])
def test_factored_group_is_the_dense_table_element_by_element(L, make, flip):
    """The factored translation and space groups hold the dense table's elements in its order,
    and their rows, computed by index arithmetic, are the table's rows and their inverses."""
    from latticeflow.symmetry import FactoredGroup

    lat = SquareLattice(L)
    fac, den = make(lat, factored=True), make(lat, factored=False)
    if flip:
        fac, den = fac.with_spin_flip(), den.with_spin_flip()
    assert isinstance(fac, FactoredGroup) and not isinstance(den, FactoredGroup)
    assert fac.order == den.order and torch.equal(fac.signs, den.signs)
    index = torch.randint(fac.order, (200,), generator=torch.Generator().manual_seed(L))
    perm, inverse = fac.rows(index)
    assert "dense" not in fac.__dict__, "drawing rows must not build the (G, N) table"
    assert torch.equal(perm, den.perms[index]) and torch.equal(inverse, den.inverse_perms[index])
    assert torch.equal(torch.gather(perm, 1, inverse), torch.arange(L * L).expand(200, -1))
    x = torch.randn(200, L * L, dtype=torch.float64)
    assert torch.equal(fac.act(x, index), den.act(x, index))
    assert torch.equal(fac.perms, den.perms) and torch.equal(fac.inverse_perms, den.inverse_perms)
    assert torch.equal(fac.inverse, den.inverse) and fac.identity == den.identity == 0


def test_factored_groups_stay_small_in_the_potential_at_large_L():
    """At L=64 the symmetrised MLP draws elements without the 65,536 × 4,096 tables (2 GiB each)."""
    from latticeflow.build import make_group
    from latticeflow.potentials import MLPPotential, Symmetrized
    from latticeflow.symmetry import FactoredGroup

    lat = SquareLattice(64)
    group = make_group("space+z2", lat)
    assert group.order == 16 * 64 * 64
    pot = Symmetrized(MLPPotential(lat.N, hidden=4), group, mode="random")
    draw = pot.resample(3, torch.Generator().manual_seed(0))
    assert isinstance(group, FactoredGroup) and "dense" not in group.__dict__
    assert sum(b.numel() for b in pot.buffers()) < 20 * lat.N + 2 * group.order
    x = torch.randn(3, lat.N, dtype=torch.float64)
    y = signed_permutation(x, draw.perm, draw.inverse_perm, draw.sign.to(x))
    # the drawn rows are D4 ∘ translation images: a translation and a point map preserve the bond energy
    bonds = lat.bonds
    energy = lambda v: (v[:, bonds[:, 0]] * v[:, bonds[:, 1]]).sum(1)  # noqa: E731
    torch.testing.assert_close(energy(y), energy(x), rtol=1e-12, atol=1e-10)
    assert not torch.equal(y, x)


def test_default_storage_follows_the_table_size():
    from latticeflow.symmetry import FACTORED_ABOVE, FactoredGroup

    small, large = SquareLattice(16), SquareLattice(32)
    assert 8 * small.N * small.N <= FACTORED_ABOVE < 8 * large.N * large.N
    assert not isinstance(space_group(small), FactoredGroup) and isinstance(space_group(large), FactoredGroup)
    assert isinstance(space_group(large).with_spin_flip(), FactoredGroup)
    with pytest.raises(ValueError, match="L >= 3"):
        space_group(SquareLattice(2), factored=True)

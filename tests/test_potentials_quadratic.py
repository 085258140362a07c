"""QuadraticPotential: ∇φ = Ax + b and ∇²φ = tr A exactly, orbit counts, symmetries of A (float64)."""

import pytest
import torch

from latticeflow import SquareLattice, point_group, translation_group
from latticeflow.potentials import QuadraticPotential

from potential_helpers import randomize

pytestmark = pytest.mark.usefixtures("float64")

LAT4 = SquareLattice(4)


def test_quadratic_gradient_and_trace():
    pot = randomize(QuadraticPotential((4, 4), "d4"))
    A = pot.matrix()
    torch.testing.assert_close(A, A.t(), rtol=0, atol=0)
    x = torch.randn(3, 16)
    phi, g, lap = pot(x)
    b = pot.b
    torch.testing.assert_close(g, x @ A + b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(phi, 0.5 * ((x @ A) * x).sum(1) + b * x.sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lap, torch.full((3,), float(torch.trace(A.detach()))), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.trace(A), 16 * pot.kernel()[0, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("symmetric, n_params", [("d4", 6), ("translation", 10)])
def test_quadratic_orbit_counts_on_L4(symmetric, n_params):
    # displacements of Z4×Z4: 6 orbits under D4, 10 under d → −d (4 self-inverse + 12/2)
    assert QuadraticPotential((4, 4), symmetric).a.numel() == n_params


@pytest.mark.parametrize("symmetric", ["d4", "translation"])
def test_quadratic_symmetries(symmetric):
    pot = randomize(QuadraticPotential((4, 4), symmetric))
    A = pot.matrix()

    def invariant_under(group):
        P = torch.eye(16)[group.perms]  # (G, N, N): (P_g x)_i = x[perm_g(i)]
        return torch.allclose(P @ A @ P.transpose(1, 2), A.expand_as(P @ A), atol=1e-12)

    assert invariant_under(translation_group(LAT4))
    assert invariant_under(point_group(LAT4)) == (symmetric == "d4")


def test_quadratic_on_rectangle_and_linear_flag():
    pot = randomize(QuadraticPotential((2, 3), "translation", linear=False))
    assert pot.b is None and pot.dim == 6
    x = torch.randn(2, 6)
    phi, g, lap = pot(x)
    torch.testing.assert_close(g, x @ pot.matrix(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(phi, pot(-x)[0], rtol=1e-12, atol=1e-12)  # no linear term: even


def test_quadratic_starts_at_zero():
    pot = QuadraticPotential((3, 3))
    phi, g, lap = pot(torch.randn(2, 9))
    assert torch.all(phi == 0) and torch.all(g == 0) and torch.all(lap == 0)


def test_bad_quadratic_arguments():
    with pytest.raises(ValueError, match="symmetric='d4' needs a lattice_shape"):
        QuadraticPotential(9, "d4")
    with pytest.raises(ValueError, match=r"symmetric='d4' needs a square lattice, got lattice_shape=\(2, 3\)"):
        QuadraticPotential((2, 3), "d4")

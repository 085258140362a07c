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


@pytest.mark.parametrize("shape, symmetric", [((4, 4), "d4"), ((3, 5), "translation"), ((6, 6), "d4")])
@pytest.mark.parametrize("time_dependent", [False, True])
def test_dense_and_fft_methods_agree(shape, symmetric, time_dependent):
    # the dense matmul of small lattices against the FFT (an independent computation of A x): values,
    # Laplacian and the gradients of a loss with respect to x and to every parameter, in float64
    torch.manual_seed(3)
    fft = randomize(QuadraticPotential(shape, symmetric, time_dependent=time_dependent, method="fft"))
    dense = QuadraticPotential(shape, symmetric, time_dependent=time_dependent, method="dense")
    dense.load_state_dict(fft.state_dict())
    assert dense.dense and not fft.dense and dense.pair_orbits is not None and fft.pair_orbits is None
    N = shape[0] * shape[1]
    x = torch.randn(5, N)
    for t in (0.0, 0.37, torch.tensor(0.8), torch.rand(5)):  # per-sample times: the FFT in both
        outs = []
        for pot in (fft, dense):
            pot.zero_grad()
            xi = x.clone().requires_grad_(True)
            with pot.shared_constants():
                phi, g, lap = pot(xi, t)
                phi2, g2, lap2 = pot(xi, t)  # the second evaluation reads the shared dense parts
            loss = (phi * phi2).sum() + (g.sin() * g2).sum() + (lap * lap2).sum()
            loss.backward()
            outs.append([phi, g, lap, xi.grad, *(p.grad for p in pot.parameters())])
        for a, b in zip(*outs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_auto_method_is_dense_up_to_the_measured_size():
    from latticeflow.potentials.quadratic import DENSE_MAX_SITES

    assert QuadraticPotential((12, 12)).dense and DENSE_MAX_SITES == 144
    assert not QuadraticPotential((16, 16)).dense
    assert "method='auto'" in repr(QuadraticPotential((4, 4)))
    with pytest.raises(ValueError, match="method"):
        QuadraticPotential((4, 4), method="matmul")


def test_set_method_switches_the_path_and_keeps_the_values():
    pot = randomize(QuadraticPotential((16, 16), "d4", time_dependent=True))
    x = torch.randn(3, 256)
    before = pot(x, 0.4)
    assert not pot.dense and pot.pair_orbits is None
    pot.set_method("dense")
    assert pot.dense and pot.pair_orbits.shape == (256, 256)
    for a, b in zip(before, pot(x, 0.4), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    pot.set_method("fft")
    assert not pot.dense and pot.pair_orbits is None
    plain = QuadraticPotential(9, "none", method="dense")  # a plain vector: always its own dense matrix
    assert not plain.dense and plain.pair_orbits is None

import math

import networkx as nx
import numpy as np
import pytest
import torch

import latticeflow as lf
from latticeflow import SquareLattice, ising, space_group
from latticeflow.ising import IsingHS, log_cosh


def _dense_energy(target, x):
    K = target.couplings()
    M = K + target.alpha * np.eye(target.N)
    Minv = np.linalg.inv(M)
    xn = x.numpy()
    return 0.5 * np.einsum("bi,ij,bj->b", xn, Minv, xn) - np.log(np.cosh(xn)).sum(1)


@pytest.mark.parametrize("L", [2, 3, 4, 6])
@pytest.mark.parametrize("beta", [0.2, lf.critical, 1.0])
def test_fft_path_matches_dense(L, beta):
    t = ising(L, beta)
    K = t.couplings()
    np.testing.assert_allclose(K, beta * SquareLattice(L).adjacency(), atol=1e-12)
    M = K + t.alpha * np.eye(t.N)
    ev = np.linalg.eigvalsh(M)
    assert ev.min() == pytest.approx(0.1, abs=1e-12)
    assert t.log_det == pytest.approx(np.linalg.slogdet(M)[1], rel=1e-12)
    x = torch.randn(5, t.N, dtype=torch.float64)
    np.testing.assert_allclose(t.energy(x).numpy(), _dense_energy(t, x), rtol=1e-11)
    dense = IsingHS.from_couplings(K)
    np.testing.assert_allclose(dense.energy(x).numpy(), t.energy(x).numpy(), rtol=1e-11)
    assert dense.alpha == pytest.approx(t.alpha, abs=1e-12)


@pytest.mark.parametrize("target", [ising(4, 0.4), ising(3, 0.7, boundary="open")])
def test_grad_matches_autograd(target):
    x = torch.randn(4, target.N, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(target.energy(x).sum(), x)
    torch.testing.assert_close(target.grad(x.detach()), g)


def test_energy_invariant_under_full_group():
    t = ising(4, lf.critical)
    g = space_group(t.lattice).with_spin_flip()
    x = torch.randn(3, t.N, dtype=torch.float64)
    E = t.energy(x)
    images = g.act(x).reshape(-1, t.N)
    torch.testing.assert_close(t.energy(images).reshape(g.order, 3), E.expand(g.order, 3))


def test_log_cosh_stable():
    x = torch.tensor([-1000.0, -20.0, 0.0, 1e-8, 3.0, 1000.0], dtype=torch.float64)
    ref = torch.tensor([1000 - math.log(2), 20 - math.log(2) + math.log1p(math.exp(-40)), 0.0, 5e-17,
                        math.log(math.cosh(3.0)), 1000 - math.log(2)], dtype=torch.float64)
    torch.testing.assert_close(log_cosh(x), ref, rtol=1e-14, atol=2e-16)


def test_hs_constant_two_sites_by_quadrature():
    """∫ e^{-E} over R² equals Z_Ising · e^{offset} for the two-site model (dblquad)."""
    from scipy import integrate

    k = 0.7
    t = IsingHS.from_couplings(np.array([[0.0, k], [k, 0.0]]))
    Minv = np.linalg.inv(t.couplings() + t.alpha * np.eye(2))

    def f(y, x):
        v = np.array([x, y])
        return math.exp(-0.5 * v @ Minv @ v + math.log(math.cosh(x)) + math.log(math.cosh(y)))

    val, err = integrate.dblquad(f, -30, 30, -30, 30, epsabs=1e-11, epsrel=1e-11)
    log_z_ising = math.log(4 * math.cosh(k))
    assert math.log(val) == pytest.approx(log_z_ising + t.log_z_offset, abs=1e-8)


@pytest.mark.parametrize("beta", [0.3, lf.critical, 0.9])
def test_hs_constant_l2_torus_by_gauss_hermite(beta):
    """4-site periodic lattice: 4D Gauss-Hermite quadrature of ∫ e^{-E} vs enumeration + constant."""
    t = ising(2, beta)
    K = t.couplings()
    M = K + t.alpha * np.eye(4)
    C = np.linalg.cholesky(M)
    z, w = np.polynomial.hermite_e.hermegauss(48)  # weight exp(-z²/2)
    Z = np.stack(np.meshgrid(z, z, z, z, indexing="ij"), -1).reshape(-1, 4)
    W = np.prod(np.stack(np.meshgrid(w, w, w, w, indexing="ij"), -1).reshape(-1, 4), axis=1)
    X = Z @ C.T  # x = C z  ⇒  ½ xᵀM⁻¹x = ½ zᵀz, dx = det C dz
    log_int = math.log(np.sum(W * np.prod(np.cosh(X), axis=1))) + np.log(np.diag(C)).sum()
    s = np.array(np.meshgrid(*[[-1.0, 1.0]] * 4, indexing="ij")).reshape(4, -1).T
    log_z_ising = np.log(np.exp(0.5 * np.einsum("si,ij,sj->s", s, K, s)).sum())
    assert log_int == pytest.approx(log_z_ising + t.log_z_offset, abs=1e-9)
    assert t.exact_log_z_ising() == pytest.approx(log_z_ising, abs=1e-10)


def test_reference_value_l16_critical():
    # the brief's reference: L=16 at beta_c gives -ln Z/N = -2.3159208588 in the HS representation
    assert ising(16, "critical").exact_free_energy() == pytest.approx(-2.3159208588, abs=5e-11)


def test_exact_paths_agree():
    # periodic (Kaufman), open (transfer matrix) and enumeration through the same interface
    for L, boundary in [(3, "periodic"), (3, "open"), (4, "open")]:
        t = ising(L, 0.5, boundary=boundary)
        dense = IsingHS.from_couplings(t.couplings())
        assert t.exact_log_z() == pytest.approx(dense.exact_log_z(), abs=1e-9)


def test_large_lattice_fft_path():
    t = ising(128, lf.critical)
    x = torch.randn(2, 128 * 128)
    assert torch.isfinite(t.energy(x)).all()
    assert math.isfinite(t.exact_free_energy())


def test_from_graph_spin_glass_and_multigraph():
    g = nx.cycle_graph(5)
    for u, v in g.edges:
        g[u][v]["weight"] = (-1.0) ** (u + v)
    t = IsingHS.from_graph(g, beta=0.8)
    K = 0.8 * nx.to_numpy_array(g)
    np.testing.assert_allclose(t.couplings(), K)
    from latticeflow.exact import enumerate_log_z

    assert t.exact_log_z_ising() == pytest.approx(enumerate_log_z(K))
    # the lattice's multigraph gives the doubled L=2 couplings
    lat = SquareLattice(2)
    np.testing.assert_allclose(IsingHS.from_graph(lat.graph, beta=0.3).couplings(), ising(2, 0.3).couplings())


def test_spins():
    x = torch.tensor([[3.0, -3.0, 0.0]], dtype=torch.float64).expand(20000, 3)
    s = lf.sample_spins(x, torch.Generator().manual_seed(0))
    assert set(s.unique().tolist()) <= {-1.0, 1.0}
    p_up = (s > 0).double().mean(0)
    expected = torch.sigmoid(2 * x[0])
    assert torch.all((p_up - expected).abs() < 4 * torch.sqrt(expected * (1 - expected) / 20000) + 1e-12)
    torch.testing.assert_close(lf.improved_spins(x[0]), torch.tanh(x[0]))
    torch.testing.assert_close(2 * expected - 1, torch.tanh(x[0]))  # E[s|x] = tanh x


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(L=1), ValueError, "L must be an integer >= 2, got L=1"),
        (dict(L=4, beta=-1.0), ValueError, "beta must be a finite number > 0, got beta=-1.0"),
        (dict(L=4, beta=float("nan")), ValueError, "beta must be a finite number > 0"),
        (dict(L=4, beta=float("inf")), ValueError, "beta must be a finite number > 0"),
        (dict(L=4, beta="hot"), ValueError, "beta must be a positive number or 'critical', got beta='hot'"),
        (dict(L=4, boundary="mobius"), ValueError, "boundary must be one of"),
        (dict(L=4, J=0.0), ValueError, r"J must be a finite number > 0, got J=0.0"),
        # regression: --J -1 was accepted, then the exact (Kaufman) value failed after training
        (dict(L=4, J=-1.0), ValueError, r"J must be a finite number > 0, got J=-1.0"),
    ],
)
def test_bad_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        ising(**kwargs)


def test_bad_couplings_and_x():
    with pytest.raises(ValueError, match="symmetric"):
        IsingHS.from_couplings(np.array([[0.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="square"):
        IsingHS.from_couplings(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="finite"):
        IsingHS.from_couplings(np.array([[0.0, np.nan], [np.nan, 0.0]]))
    t = ising(3, 0.4)
    with pytest.raises(ValueError, match=r"shape \(B, 9\), got shape=\(2, 8\)"):
        t.energy(torch.zeros(2, 8))
    with pytest.raises(TypeError, match="floating dtype"):
        t.energy(torch.zeros(2, 9, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        t.energy(np.zeros((2, 9)))

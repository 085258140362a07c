"""AutogradPotential: exact Laplacian by Hessian-vector products, Hutchinson's estimator (float64)."""

import pytest
import torch
from torch import nn

from latticeflow.potentials import AutogradPotential, MLPPotential

from potential_helpers import randomize

pytestmark = pytest.mark.usefixtures("float64")


def test_autograd_potential_matches_analytic_mlp():
    mlp = randomize(MLPPotential(7, 5, activation="softplus"))

    class Phi(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            return self.mlp(x)[0]

    wrapped = AutogradPotential(Phi(), dim=7)
    x = torch.randn(4, 7)
    for a, b in zip(wrapped(x), mlp(x)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_autograd_potential_time_argument_and_dim_inference():
    class Phi(nn.Module):
        dim = 3

        def forward(self, x, t):
            return (x**3).sum(1) * (1 + t)

    pot = AutogradPotential(Phi(), time_dependent=True)
    assert pot.dim == 3
    x = torch.randn(2, 3)
    phi, g, lap = pot(x, 0.5)
    torch.testing.assert_close(g, 1.5 * 3 * x**2)
    torch.testing.assert_close(lap, 1.5 * 6 * x.sum(1))


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    # vᵀHv = Σ_i H_ii v_i² = tr H for Rademacher v when H is diagonal
    net = lambda x: torch.sin(x).sum(1) + (x**4).sum(1)  # noqa: E731

    class Phi(nn.Module):
        def forward(self, x):
            return net(x)

    pot = AutogradPotential(Phi(), dim=5, laplacian="hutchinson", n_probes=3)
    x = torch.randn(4, 5)
    torch.testing.assert_close(pot(x)[2], (-torch.sin(x) + 12 * x**2).sum(1), rtol=1e-12, atol=1e-12)


def test_hutchinson_mean_within_standard_errors():
    torch.manual_seed(7)
    module = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1), nn.Flatten(0))
    exact = AutogradPotential(module, laplacian="exact")
    P = 4000
    hutch = AutogradPotential(module, laplacian="hutchinson", n_probes=P)
    x = torch.randn(3, 6)
    lap = exact(x)[2]
    est = hutch(x, 0.0, hutch.resample(3, torch.Generator().manual_seed(1)))[2]
    # Var(vᵀHv) = 2 Σ_{i≠j} H_ij² for Rademacher v
    H = torch.stack([torch.autograd.functional.hessian(lambda y: module(y[None])[0], xb) for xb in x])
    off = H - torch.diag_embed(torch.diagonal(H, dim1=1, dim2=2))
    se = torch.sqrt(2 * (off**2).sum((1, 2)) / P)
    assert torch.all(se > 0)
    assert torch.all((est - lap).abs() < 4 * se), (est, lap, se)
    # and it is noisy: one probe is not the exact value
    one = AutogradPotential(module, laplacian="hutchinson", n_probes=1)
    assert not torch.allclose(one(x)[2], lap, atol=1e-6)


def test_autograd_potential_under_no_grad_returns_detached():
    pot = AutogradPotential(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1), nn.Flatten(0)))
    with torch.no_grad():
        phi, g, lap = pot(torch.randn(2, 4))
    assert not (phi.requires_grad or g.requires_grad or lap.requires_grad)


def test_bad_autograd_arguments():
    with pytest.raises(ValueError, match="laplacian must be one of 'exact', 'hutchinson'"):
        AutogradPotential(nn.Linear(3, 1), laplacian="trace")
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got function"):
        AutogradPotential(lambda x: x.sum(1), dim=3)

"""Shared by the potentials' and the flow's test files: generic parameters, small groups, the
autograd reference. (The float64 fixture is ``float64`` in conftest.py.)"""

import torch
from torch import nn

from latticeflow import SquareLattice, point_group, space_group, spin_flip_group, translation_group
from latticeflow.potentials import Potential

DT = torch.float64
LAT3 = SquareLattice(3)

#: the groups of the 3×3 lattice that symmetry tests loop over
GROUPS = {
    "translation": lambda: translation_group(LAT3),
    "d4": lambda: point_group(LAT3),
    "z2": lambda: spin_flip_group(9),
    "space×z2": lambda: space_group(LAT3).with_spin_flip(),
}


def randomize(pot: nn.Module, scale: float = 0.5) -> nn.Module:
    """Give every parameter a generic nonzero value (zero-initialised parts would hide bugs)."""
    with torch.no_grad():
        for p in pot.parameters():
            p.add_(scale * torch.randn_like(p))
    return pot


def autograd_reference(pot: Potential, x: torch.Tensor, t, noise=None):
    """(phi, grad, laplacian) with grad and Hessian trace taken by autograd from phi."""
    x = x.clone().requires_grad_(True)
    phi, _, _ = pot(x, t, noise)
    (g,) = torch.autograd.grad(phi.sum(), x, create_graph=True)
    lap = sum(torch.autograd.grad(g[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(x.shape[1]))
    return phi.detach(), g.detach(), lap.detach()


def check_exact(pot: Potential, B: int = 3, times=(0.0, 0.7)) -> None:
    """forward's (φ, ∇φ, ∇²φ) equal autograd's, and the hot path returns the same numbers."""
    for t in times:
        x = torch.randn(B, pot.dim)
        noise = pot.resample(B)
        phi, g, lap = pot(x, t, noise)
        phi_r, g_r, lap_r = autograd_reference(pot, x, t, noise)
        torch.testing.assert_close(phi, phi_r, rtol=0, atol=1e-12)
        torch.testing.assert_close(g, g_r, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lap, lap_r, rtol=1e-10, atol=1e-10)
        # the integrator's hot path returns the same numbers
        g2, lap2 = pot.grad_and_laplacian(x, t, noise)
        torch.testing.assert_close(g2, g, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lap2, lap, rtol=1e-12, atol=1e-12)

"""SitewisePotential: gradient and Laplacian against autograd in float64, separability, time, bad input."""

from __future__ import annotations

import pytest
import torch

from latticeflow.mnist import MNISTConfig, build_flow
from latticeflow.potentials import SitewisePotential, SumPotential

torch.set_default_dtype(torch.float32)


def _autograd(pot: SitewisePotential, x: torch.Tensor, t: torch.Tensor | float) -> tuple[torch.Tensor, ...]:
    """φ, ∇φ and the Hessian's trace of φ by autograd (the reference)."""
    x = x.clone().requires_grad_(True)
    phi = pot(x, t)[0]
    (grad,) = torch.autograd.grad(phi.sum(), x, create_graph=True)
    lap = torch.zeros(x.shape[0], dtype=x.dtype)
    for i in range(x.shape[1]):
        lap = lap + torch.autograd.grad(grad[:, i].sum(), x, retain_graph=True)[0][:, i]
    return phi, grad, lap


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("activation", ["softplus", "lncosh", "tanh"])
@pytest.mark.parametrize("per_sample_time", [False, True])
def test_gradient_and_laplacian_match_autograd(shared: bool, activation: str, per_sample_time: bool) -> None:
    torch.manual_seed(0)
    pot = SitewisePotential(6, units=3, activation=activation, shared=shared, time_dependent=True,
                            init_scale=0.7).double()
    with torch.no_grad():  # move the time parts off zero so that t matters
        pot.readout_t.normal_()
        pot.shift_t.normal_()
    x = torch.randn(5, 6, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) if per_sample_time else 0.37
    phi, grad, lap = pot(x, t)
    ref_phi, ref_grad, ref_lap = _autograd(pot, x, t)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lap, ref_lap, rtol=1e-12, atol=1e-12)
    # the hot path (no φ) gives the same gradient and Laplacian
    g2, l2 = pot.grad_and_laplacian(x, t)
    torch.testing.assert_close(g2, grad, rtol=0, atol=0)
    torch.testing.assert_close(l2, lap, rtol=0, atol=0)


def test_separable_and_shared_is_translation_invariant() -> None:
    torch.manual_seed(1)
    pot = SitewisePotential(5, units=4, init_scale=1.0).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    phi = pot(x)[0]
    # φ is a sum over sites: changing x_0 changes only site 0's term
    y = x.clone()
    y[:, 0] += 0.5
    single = lambda z, i: pot(torch.where(torch.arange(5) == i, z, torch.zeros_like(z)))[0] - pot(torch.zeros_like(z))[0]  # noqa: E731
    torch.testing.assert_close(pot(y)[0] - phi, single(y, 0) - single(x, 0), rtol=1e-12, atol=1e-12)
    shared = SitewisePotential(5, units=4, shared=True, init_scale=1.0).double()
    perm = torch.tensor([2, 3, 4, 0, 1])
    torch.testing.assert_close(shared(x[:, perm])[0], shared(x)[0], rtol=1e-12, atol=1e-12)
    assert sum(p.numel() for p in shared.parameters()) == 3 * 4
    assert sum(p.numel() for p in pot.parameters()) == 3 * 4 * 5


def test_zero_readout_is_the_identity_map() -> None:
    pot = SitewisePotential(4, init_scale=0.0)
    _, grad, lap = pot(torch.randn(2, 4))
    assert torch.count_nonzero(grad) == 0 and torch.count_nonzero(lap) == 0


@pytest.mark.parametrize(("kwargs", "message"), [({"units": 0}, "units"), ({"dim": 0}, "dim"),
                                                 ({"activation": "relu"}, "activation")])
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SitewisePotential(**{"dim": 4, **kwargs})


def test_mnist_config_builds_the_sum() -> None:
    flow = build_flow(MNISTConfig(potential="mlp+sitewise", hidden=8, sitewise_units=3, n_steps=2), 16, (4, 4))
    assert isinstance(flow.potential, SumPotential)
    assert sorted(type(p).__name__ for p in flow.potential.parts) == ["MLPPotential", "SitewisePotential"]
    site = next(p for p in flow.potential.parts if isinstance(p, SitewisePotential))
    assert site.units == 3 and site.dim == 16
    with pytest.raises(ValueError, match="potential"):
        MNISTConfig(potential="sitewise+quadratic")

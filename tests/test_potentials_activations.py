"""The activation table: a', a'' (and the fused a''') against autograd; the one ln cosh (float64)."""

import math

import pytest
import torch

from latticeflow.ising import log_cosh as ising_log_cosh
from latticeflow.potentials.activations import ACTIVATIONS, EVEN_ACTIVATIONS, FUSED, log_cosh

pytestmark = pytest.mark.usefixtures("float64")


def _autograd_derivatives(name: str, h: torch.Tensor, order: int) -> list[torch.Tensor]:
    """[a, a', ..., a^(order)] of ACTIVATIONS[name] by repeated autograd of the value."""
    h = h.clone().requires_grad_(True)
    a = ACTIVATIONS[name](h, True)[0]
    out = [a]
    for _ in range(order):
        (d,) = torch.autograd.grad(out[-1].sum(), h, create_graph=True)
        out.append(d)
    return [o.detach() for o in out]


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_table_derivatives_match_autograd(name):
    # an even count of points leaves out h = 0, where autograd differentiates |h| in ln cosh by a subgradient
    h = torch.linspace(-6.0, 6.0, 96)
    a, a1, a2 = ACTIVATIONS[name](h, True)
    ref = _autograd_derivatives(name, h, 3)
    torch.testing.assert_close(a1, ref[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a2, ref[2], rtol=1e-12, atol=1e-12)
    # value=False skips a(h) but returns the same derivatives
    none, b1, b2 = ACTIVATIONS[name](h, False)
    assert none is None and torch.equal(b1, a1) and torch.equal(b2, a2)
    # the fused path's (a', a'', a''') from its base tensor, with and without a saved a''
    base, derivatives = FUSED[name]
    for saved in (None, a2):
        d1, d2, d3 = derivatives(base(h), saved)
        torch.testing.assert_close(d1, a1, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d2, a2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d3, ref[3], rtol=1e-10, atol=1e-12)


def test_tables_name_the_same_activations():
    assert set(FUSED) == set(ACTIVATIONS)
    h = torch.randn(50)
    for name in EVEN_ACTIVATIONS:
        torch.testing.assert_close(ACTIVATIONS[name](-h, True)[0], ACTIVATIONS[name](h, True)[0], rtol=0, atol=0)


def test_log_cosh_is_stable_and_defined_once():
    x = torch.tensor([-1e4, -30.0, -1.0, 0.0, 0.5, 30.0, 1e4])
    ref = torch.where(x.abs() < 20, torch.log(torch.cosh(x)), x.abs() - math.log(2.0))
    torch.testing.assert_close(log_cosh(x), ref, rtol=1e-14, atol=2e-16)
    assert torch.isfinite(log_cosh(torch.tensor([1e300]))).all()
    # the Ising target's ln cosh and the activation's are one function
    assert ising_log_cosh is log_cosh
    h = torch.randn(20)
    assert torch.equal(ACTIVATIONS["lncosh"](h, True)[0], log_cosh(h))

"""The activation table: a', a'' (and the fused a''') against autograd; the one ln cosh (float64)."""

import math

import pytest
import torch

from latticeflow.ising import log_cosh as ising_log_cosh
from latticeflow.potentials.activations import ACTIVATIONS, EVEN_ACTIVATIONS, FUSED, log_cosh, tanh, tanh_

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


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 4e-16), (torch.float32, 2e-7)])
def test_tanh_via_sigmoid_is_tanh_to_rounding(dtype, atol):
    # 2σ(2h) − 1 against torch.tanh: the absolute error bound the docstring states, saturation at ±1
    # (no NaN from inf/inf), NaN kept
    h = torch.cat([torch.linspace(-30.0, 30.0, 6001), torch.tensor([-1e30, 1e30, -math.inf, math.inf])]).to(dtype)
    got = tanh(h)
    assert got.dtype == dtype
    torch.testing.assert_close(got, torch.tanh(h), rtol=0, atol=atol)
    assert got.abs().max() <= 1.0
    assert torch.isnan(tanh(torch.tensor([math.nan], dtype=dtype))).all()
    # in place on a buffer, with or without the doubling done by the caller
    buf = h.clone()
    assert tanh_(buf) is buf and torch.equal(buf, got)
    buf2 = 2.0 * h
    assert torch.equal(tanh_(buf2, doubled=True), got)
    h0 = h.clone()  # the out-of-place form leaves its input alone
    tanh(h)
    assert torch.equal(h, h0)


def test_tanh_via_sigmoid_differentiates_like_tanh():
    # recorded (grad-enabled) path: first and second derivatives are those of tanh, in float64
    h = torch.linspace(-5.0, 5.0, 41, requires_grad=True)
    (d1,) = torch.autograd.grad(tanh(h).sum(), h, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), h)
    th = torch.tanh(h.detach())
    torch.testing.assert_close(d1.detach(), 1 - th * th, rtol=0, atol=1e-15)
    torch.testing.assert_close(d2, -2 * th * (1 - th * th), rtol=0, atol=1e-15)

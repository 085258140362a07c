"""The activation table: a', a'' (and the fused a''') against autograd; the one ln cosh (float64)."""

import math

import pytest
import torch

from latticeflow.ising import log_cosh as ising_log_cosh
from latticeflow.potentials import activations
from latticeflow.potentials.activations import (ACTIVATIONS, EVEN_ACTIVATIONS, FUSED, fused_forward, log_cosh, pre_scale,
                                               tanh, tanh_, tanh_via_sigmoid)

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
def test_tanh_via_sigmoid_is_tanh_to_rounding(dtype, atol, monkeypatch):
    monkeypatch.setenv("LATTICEFLOW_TANH", "sigmoid")
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


@pytest.mark.parametrize("method", ["torch", "sigmoid"])
def test_tanh_differentiates_like_tanh(method, monkeypatch):
    monkeypatch.setenv("LATTICEFLOW_TANH", method)
    # recorded (grad-enabled) path: first and second derivatives are those of tanh, in float64
    h = torch.linspace(-5.0, 5.0, 41, requires_grad=True)
    (d1,) = torch.autograd.grad(tanh(h).sum(), h, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), h)
    th = torch.tanh(h.detach())
    torch.testing.assert_close(d1.detach(), 1 - th * th, rtol=0, atol=1e-15)
    torch.testing.assert_close(d2, -2 * th * (1 - th * th), rtol=0, atol=1e-15)


def test_tanh_method_from_the_environment(monkeypatch):
    h = torch.randn(50, dtype=torch.float64) * 4
    monkeypatch.setenv("LATTICEFLOW_TANH", "torch")
    assert not tanh_via_sigmoid(torch.float64)
    assert torch.equal(tanh(h), torch.tanh(h))  # exactly torch's
    assert pre_scale("lncosh", torch.float64) == 1.0 and pre_scale("softplus", torch.float64) == 1.0
    monkeypatch.setenv("LATTICEFLOW_TANH", "sigmoid")
    assert tanh_via_sigmoid(torch.float64) and pre_scale("tanh", torch.float64) == 2.0
    assert torch.equal(tanh(h), torch.sigmoid(2 * h) * 2 - 1)
    assert not torch.equal(tanh(h), torch.tanh(h))  # a different rounding: the setting took effect
    monkeypatch.setenv("LATTICEFLOW_TANH", "fast")
    with pytest.raises(ValueError, match="LATTICEFLOW_TANH"):
        tanh(h)


def test_tanh_auto_choice_is_timed_once_and_kept(monkeypatch):
    # "auto" (or unset) times both forms once per (device type, dtype) and keeps the answer
    monkeypatch.delenv("LATTICEFLOW_TANH", raising=False)
    monkeypatch.setattr(activations, "_timed_choice", {})
    timed = activations._sigmoid_form_is_faster
    calls = []
    monkeypatch.setattr(activations, "_sigmoid_form_is_faster", lambda dtype: calls.append(dtype) or True)
    assert tanh_via_sigmoid(torch.float32) and tanh_via_sigmoid(torch.float32, "cpu")
    assert calls == [torch.float32]
    monkeypatch.setattr(activations, "_sigmoid_form_is_faster", lambda dtype: calls.append(dtype) or False)
    monkeypatch.setenv("LATTICEFLOW_TANH", "auto")
    assert not tanh_via_sigmoid(torch.float64) and calls == [torch.float32, torch.float64]
    assert not tanh_via_sigmoid(torch.float32, "meta")  # devices other than the CPU take torch.tanh, untimed
    assert calls == [torch.float32, torch.float64]
    # the real timing returns a bool on this machine
    assert timed(torch.float32, rounds=1) in (True, False)


@pytest.mark.parametrize("method", ["torch", "sigmoid"])
@pytest.mark.parametrize("activation", ["softplus", "lncosh", "tanh"])
def test_fused_forward_with_its_pre_scale_gives_the_derivatives(method, activation, monkeypatch):
    # a fused stage forms pre_scale·h in its matmul and hands it to fused_forward: (a', a'') must be
    # the activation table's at h, whichever form of tanh is in use
    monkeypatch.setenv("LATTICEFLOW_TANH", method)
    h = torch.randn(7, 5, dtype=torch.float64) * 3
    _, d1, d2 = fused_forward(activation, h * pre_scale(activation, h.dtype))
    _, r1, r2 = ACTIVATIONS[activation](h, False)
    torch.testing.assert_close(d1, r1, rtol=0, atol=1e-15)
    torch.testing.assert_close(d2, r2, rtol=0, atol=1e-15)

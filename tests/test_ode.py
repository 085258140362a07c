"""Fixed-step integrators against ODEs with closed-form solutions (float64)."""

import math

import pytest
import torch

from latticeflow import ode

METHODS = ["euler", "midpoint", "rk4"]
ORDERS = {"euler": 1, "midpoint": 2, "rk4": 4}


def decay(a: float):
    """dx/dt = −a x, i.e. φ = −a|x|²/2 with ∇²φ = −aN, so d logp/dt = +aN."""

    def f(t, x):
        return -a * x, torch.full(x.shape[:1], a * x.shape[1], dtype=x.dtype)

    return f


def final_error(method: str, n_steps: int, a: float = 1.3, T: float = 1.0) -> float:
    x0 = torch.linspace(-2.0, 2.0, 6, dtype=torch.float64).reshape(2, 3)
    x, _ = ode.integrate(decay(a), x0, torch.zeros(2, dtype=torch.float64), 0.0, T / n_steps, n_steps, method=method)
    return float((x - x0 * math.exp(-a * T)).abs().max())


@pytest.mark.parametrize("method", METHODS)
def test_order_of_convergence_on_linear_decay(method):
    # halving dt divides the global error by 2^order: ~2 (Euler), ~4 (midpoint), ~16 (RK4)
    e1, e2 = final_error(method, 20), final_error(method, 40)
    ratio = e1 / e2
    p = ORDERS[method]
    assert 2**p * 0.85 < ratio < 2**p * 1.15, (method, e1, e2, ratio)


@pytest.mark.parametrize("n_steps", [10, 100])
def test_rk4_error_matches_leading_term(n_steps):
    # one RK4 step multiplies by the Taylor polynomial of e^h (h = −a dt), missing h⁵/120:
    # after n steps the error is ≈ n |h|⁵/120 · e^{−aT} · max|x0| (x0 max = 2)
    a, T = 1.3, 1.0
    h = a * T / n_steps
    predicted = n_steps * h**5 / 120 * math.exp(-a * T) * 2.0
    assert final_error("rk4", n_steps, a, T) == pytest.approx(predicted, rel=0.15)


@pytest.mark.parametrize("method", METHODS)
def test_time_dependent_rhs_uses_stage_times(method):
    # dx/dt = t·x  ->  x(T) = x0 exp(T²/2); wrong stage times break the convergence order
    def f(t, x):
        return t * x, torch.zeros(x.shape[0], dtype=x.dtype)

    x0 = torch.ones(1, 2, dtype=torch.float64)
    lp = torch.zeros(1, dtype=torch.float64)
    errs = []
    for n in (16, 32):
        x, _ = ode.integrate(f, x0, lp, 0.5, 1.0 / n, n, method=method)
        errs.append(float((x - x0 * math.exp((1.5**2 - 0.5**2) / 2)).abs().max()))
    p = ORDERS[method]
    assert 2**p * 0.8 < errs[0] / errs[1] < 2**p * 1.2, errs


@pytest.mark.parametrize("method", METHODS)
def test_constant_log_density_rate_is_integrated_exactly(method):
    a = 0.7
    x0 = torch.randn(4, 5, dtype=torch.float64)
    lp0 = torch.randn(4, dtype=torch.float64)
    _, lp = ode.integrate(decay(a), x0, lp0, 0.0, 0.05, 20, method=method)
    torch.testing.assert_close(lp, lp0 + a * 5 * 1.0, rtol=0, atol=1e-12)


def test_backward_integration_returns_to_start():
    x0 = torch.randn(3, 4, dtype=torch.float64)
    lp0 = torch.zeros(3, dtype=torch.float64)
    f = decay(0.9)
    x1, lp1 = ode.integrate(f, x0, lp0, 0.0, 0.1, 10)
    x2, lp2 = ode.integrate(f, x1, lp1, 1.0, -0.1, 10)
    torch.testing.assert_close(x2, x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(lp2, lp0, rtol=0, atol=1e-12)
    torch.testing.assert_close(x1, x0 * math.exp(-0.9), rtol=0, atol=1e-6)


def test_single_steps_agree_with_solver_classes():
    f = decay(0.4)
    x = torch.randn(2, 3, dtype=torch.float64)
    lp = torch.zeros(2, dtype=torch.float64)
    for name, fn in [("euler", ode.euler_step), ("midpoint", ode.midpoint_step), ("rk4", ode.rk4_step)]:
        solver = ode.get_solver(name)
        assert solver.order == ORDERS[name] and solver.name == name
        a, b = fn(f, 0.0, x, lp, 0.2), solver.step(f, 0.0, x, lp, 0.2)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # one RK4 step of a linear ODE is the 4th-order Taylor polynomial of exp(−a dt)
    h = -0.4 * 0.2
    x1, _ = ode.rk4_step(f, 0.0, x, lp, 0.2)
    torch.testing.assert_close(x1, x * (1 + h + h**2 / 2 + h**3 / 6 + h**4 / 24), rtol=1e-14, atol=1e-14)


def test_callback_sees_every_step():
    seen = []
    x0 = torch.ones(1, 1, dtype=torch.float64)
    ode.integrate(decay(1.0), x0, torch.zeros(1, dtype=torch.float64), 2.0, -0.25, 4,
                  callback=lambda k, t, x, lp: seen.append((k, t, float(x))))
    assert [k for k, _, _ in seen] == [0, 1, 2, 3]
    assert [t for _, t, _ in seen] == pytest.approx([1.75, 1.5, 1.25, 1.0])
    assert seen[-1][2] == pytest.approx(math.exp(1.0), rel=1e-4)  # backward in time: growth


def test_step_drift_called_once_per_step_and_used_by_all_stages():
    calls, stage_calls = [], []

    def step_drift(k, t):
        calls.append((k, t))
        rate = 1.0 + k  # a different ODE on every step

        def f(tt, x):
            stage_calls.append(k)
            return -rate * x, torch.zeros(x.shape[0], dtype=x.dtype)

        return f

    x0 = torch.ones(1, 1, dtype=torch.float64)
    x, _ = ode.integrate(None, x0, torch.zeros(1, dtype=torch.float64), 0.0, 0.01, 3, step_drift=step_drift)
    assert calls == [(0, 0.0), (1, 0.01), (2, 0.02)]
    assert stage_calls == [0] * 4 + [1] * 4 + [2] * 4
    assert float(x) == pytest.approx(math.exp(-0.01 * (1 + 2 + 3)), rel=1e-9)


def test_framed_drift_equals_plain_integration():
    # dx/dt = Qᵀ v(Q x) with Q a signed permutation, stepped in y = Q x
    torch.manual_seed(0)
    N = 5
    perm = torch.randperm(N)
    inv = torch.argsort(perm)
    M = torch.randn(N, N, dtype=torch.float64)

    def v(t, y):
        return torch.tanh(y @ M) * (1 + t), (y**2).sum(1)

    def Q(x):
        return -x[:, perm]

    def Qt(y):
        return -y[:, inv]

    def plain(t, x):
        g, l = v(t, Q(x))
        return Qt(g), l

    x0 = torch.randn(3, N, dtype=torch.float64)
    lp0 = torch.zeros(3, dtype=torch.float64)
    a = ode.integrate(plain, x0, lp0, 0.0, 0.1, 5)
    b = ode.integrate(None, x0, lp0, 0.0, 0.1, 5, step_drift=lambda k, t: ode.FramedDrift(v, Q, Qt))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_gives_identical_values_and_gradients(method):
    a = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)

    def f(t, x):
        v = torch.tanh(x @ W) * a
        return v, -(v**2).sum(1)

    x0 = torch.randn(3, 4, dtype=torch.float64)
    results = []
    for ck in (False, True):
        x, lp = ode.integrate(f, x0, torch.zeros(3, dtype=torch.float64), 0.0, 0.1, 6, method=method, checkpoint=ck)
        (x.sum() + lp.sum()).backward()
        results.append((x.detach(), lp.detach(), a.grad.clone(), W.grad.clone()))
        a.grad = W.grad = None
    for u, w in zip(*results):
        torch.testing.assert_close(u, w, rtol=0, atol=1e-13)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_n_steps(bad):
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match=f"n_steps must be a positive integer, got n_steps={bad!r}"):
        ode.integrate(decay(1.0), x, torch.zeros(1), 0.0, 0.1, bad)


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_bad_dt(bad):
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="dt must be a finite nonzero number"):
        ode.integrate(decay(1.0), x, torch.zeros(1), 0.0, bad, 3)


def test_bad_method_lists_valid_names():
    with pytest.raises(ValueError, match=r"method must be one of 'euler', 'midpoint', 'rk4'; got method='rk5'"):
        ode.integrate(decay(1.0), torch.zeros(1, 1), torch.zeros(1), 0.0, 0.1, 3, method="rk5")


def test_bad_state_shapes_and_missing_drift():
    with pytest.raises(ValueError, match=r"logp shape \(B,\), got \(2, 3\) and \(3,\)"):
        ode.integrate(decay(1.0), torch.zeros(2, 3), torch.zeros(3), 0.0, 0.1, 3)
    with pytest.raises(TypeError, match="x and logp must be tensors"):
        ode.integrate(decay(1.0), [[0.0]], torch.zeros(1), 0.0, 0.1, 3)
    with pytest.raises(ValueError, match="needs a drift f or a step_drift"):
        ode.integrate(None, torch.zeros(1, 1), torch.zeros(1), 0.0, 0.1, 3)

"""The compiled RK4 steps of the MLP drift (latticeflow.native.step), float64 and float32.

The kernel takes one RK4 step of the MLP (+ dense quadratic) drift, forward and backward, for
blocks of samples held in vector lanes ("lanes", small lattices) or with its products by torch's
BLAS gemm ("gemm", larger lattices). Checked here, for both:
- the step and every gradient against the same step in plain autograd ops (``_reference_rk4``)
  to 1e-12 in float64, for every activation, with and without bias, time dependence and quadratic
  part, for batches that leave the last block part-filled, forward and backward in time, at 1 and
  2 threads; and the kernel's backward against finite differences of its forward (gradcheck);
- a whole flow (the L=4 preset's quadratic + symmetrised MLP, random frames) with the kernel
  against the same flow stepped eagerly: samples, ln p, the density of given points and every
  parameter gradient, float64 to 1e-12 and float32 to rounding;
- the double backward through the reference, and the path-gradient estimator against the eager flow's;
- the setting LATTICEFLOW_STEP_KERNEL, the cases the kernel does not take, status(), and a build
  without warnings. Skipped where no C++ compiler can build the kernel.
"""

import math
import subprocess

import pytest
import torch

import latticeflow as lf
from latticeflow import ode
from latticeflow.build import build_flow
from latticeflow.config import IsingConfig
from latticeflow.native import step as native_step
from latticeflow.potentials import MLPPotential, QuadraticPotential
from latticeflow.potentials.mlp import _MLPRK4Step, _reference_rk4


@pytest.fixture
def kernel():
    if native_step.load() is None:
        pytest.skip(f"the step kernel could not be built here: {native_step._load_error}")
    return native_step


def _params(N, H, bias, bias_t, readout_t, quad, quad_t, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.5):
        return (scale * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_()

    A0 = r(N, N, scale=0.2) if quad else None
    A1 = r(N, N, scale=0.2) if quad and quad_t else None
    return [r(H, N), r(H) if bias else None, r(H) if bias and bias_t else None, r(H),
            r(H) if readout_t else None, A0, A1]


def _step_outputs(apply, y, logp, params, act, t, dt, cot):
    out = apply(y, logp, *params, act, t, dt)
    wrt = [q for q in (y, logp, *params) if q is not None]
    return [*out, *torch.autograd.grad(out, wrt, cot)]


CASES = [  # N, H, B, bias, bias_t, readout_t, quad, quad_t
    (16, 24, 13, True, True, True, True, True),
    (9, 17, 8, False, False, False, False, False),
    (5, 8, 21, True, False, True, True, False),
    (12, 40, 3, True, True, False, False, False),
]


def _compiled(path):
    """The compiled step by ``path`` ("lanes" or "gemm"), called as _reference_rk4 is."""
    if path == "gemm" and native_step.blas() is None:
        pytest.skip(f"no BLAS gemm in this torch: {native_step._blas_error}")
    return lambda *a: _MLPRK4Step.apply(*a, path)


PATHS = ["lanes", "gemm"]


@pytest.mark.parametrize("N, H, B, bias, bias_t, readout_t, quad, quad_t", CASES)
@pytest.mark.parametrize("act", ["softplus", "lncosh", "tanh"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dt", [0.1, -0.1])
@pytest.mark.parametrize("path", PATHS)
def test_step_matches_reference_float64(kernel, N, H, B, bias, bias_t, readout_t, quad, quad_t, act, threads, dt,
                                        path, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # what the kernel reads
    dtype = torch.float64
    params = _params(N, H, bias, bias_t, readout_t, quad, quad_t, dtype)
    g = torch.Generator().manual_seed(5)
    y = torch.randn(B, N, generator=g, dtype=dtype).requires_grad_()
    logp = torch.randn(B, generator=g, dtype=dtype).requires_grad_()
    cot = (torch.randn(B, N, generator=g, dtype=dtype), torch.randn(B, generator=g, dtype=dtype))
    got = _step_outputs(_compiled(path), y, logp, params, act, 0.37, dt, cot)
    want = _step_outputs(_reference_rk4, y, logp, params, act, 0.37, dt, cot)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["softplus", "lncosh", "tanh"])
@pytest.mark.parametrize("path", PATHS)
def test_kernel_backward_against_finite_differences(kernel, act, path):
    # gradcheck differentiates the kernel's own forward numerically: independent of the reference
    params = _params(5, 6, True, True, True, True, True, torch.float64, seed=7)
    y = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    logp = torch.randn(3, dtype=torch.float64, requires_grad=True)
    step = _compiled(path)
    assert torch.autograd.gradcheck(lambda *a: step(*a, act, 0.2, 0.1), (y, logp, *params))


def test_gemm_step_without_gradients_keeps_nothing_and_agrees(kernel):
    # under no_grad the GEMM step keeps no stage tensors; its output is the one a gradient-keeping call gives
    step = _compiled("gemm")
    params = _params(20, 33, True, True, True, True, True, torch.float32, seed=2)
    y = torch.randn(70, 20, generator=torch.Generator().manual_seed(1))
    logp = torch.zeros(70)
    kept = native_step.gemm_forward(y, logp, *[q.detach() if q is not None else None for q in params], "softplus",
                                    0.1, 0.1, True)
    bare = native_step.gemm_forward(y, logp, *[q.detach() if q is not None else None for q in params], "softplus",
                                    0.1, 0.1, False)
    assert kept[2].shape == (4, 70, 20) and kept[3].shape == (4, 70, 33) and bare[2] is None and bare[3] is None
    torch.testing.assert_close(kept[0], bare[0], rtol=0, atol=0)
    with torch.no_grad():
        out = step(y, logp, *params, "softplus", 0.1, 0.1)
    torch.testing.assert_close(out[0], bare[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], bare[1], rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_double_backward_through_the_reference(kernel, path):
    # create_graph=True differentiates _reference_rk4 in recorded ops: second derivatives exist and
    # equal the reference's own
    params = _params(6, 7, True, True, True, True, True, torch.float64, seed=9)
    y = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    logp = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    res = []
    for f in (_compiled(path), _reference_rk4):
        out = f(y, logp, *params, "lncosh", 0.1, 0.1)
        loss = (out[0] ** 2).sum() + out[1].sum()
        gy, gW = torch.autograd.grad(loss, (y, params[0]), create_graph=True)
        res.append(torch.autograd.grad((gy**2).sum() + gW.sum(), [y, *[q for q in params if q is not None]]))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_second_order_through_many_steps(kernel, monkeypatch):
    # create_graph=True through a chain of steps (as ∇_z ln|det ∂x/∂z| needs): the same numbers as the
    # eager flow, and each step's backward runs once (a nested grad with respect to a parameter that
    # earlier steps also use must not run their backward again: that was 2^n − 1 calls for n steps)
    from latticeflow import flow as flow_module
    from latticeflow.flow import MongeAmpereFlow

    monkeypatch.setattr(flow_module, "WHOLE_INTEGRATION", False)  # step by step (the whole integration: below)
    res, calls = [], []
    real = _MLPRK4Step.backward
    for mode in ("native", "eager"):
        monkeypatch.setenv("LATTICEFLOW_STEP_KERNEL", mode)
        torch.manual_seed(0)
        flow = MongeAmpereFlow(MLPPotential(4, 6, init_scale="linear"), n_steps=8, step_size=0.1).double()
        n = [0]
        monkeypatch.setattr(_MLPRK4Step, "backward", staticmethod(lambda ctx, *a: n.__setitem__(0, n[0] + 1) or
                                                                  real(ctx, *a)))
        z = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        x, dlogp = flow.forward_map(z)
        (gz,) = torch.autograd.grad((x[:, 0] ** 2).sum() + dlogp.sum(), z, create_graph=True)
        calls.append(n[0])
        res.append(torch.autograd.grad((gz**2).sum(), [z, *flow.parameters()]))
    assert calls == [8, 0]
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def _flow(dtype, hidden=24, L=4, **kw):
    cfg = IsingConfig(L=L, hidden=hidden, potential="quadratic+mlp", dtype=dtype, **kw)
    target = lf.ising(L, lf.critical)
    torch.manual_seed(0)
    flow = build_flow(cfg.to_dict(), target.lattice)
    with torch.no_grad():  # away from the initialisation (zero time parts, tiny readout)
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow, target


def _flow_run(mode, dtype, monkeypatch, path="lanes", **kw):
    # one step at a time (the whole integration: below)
    from latticeflow import flow as flow_module

    monkeypatch.setenv("LATTICEFLOW_STEP_KERNEL", mode)
    monkeypatch.setattr(flow_module, "WHOLE_INTEGRATION", False)
    if path == "gemm":  # every lattice takes the GEMM step
        _compiled(path)
        monkeypatch.setattr(native_step, "AUTO_MAX_SITES", 0)
    flow, target = _flow(dtype, **kw)
    calls = []
    real = _MLPRK4Step.apply
    monkeypatch.setattr(_MLPRK4Step, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    x, logp = flow.sample(37, generator=torch.Generator().manual_seed(1))
    (logp + target.energy(x)).mean().backward()
    grads = [p.grad.clone() for p in flow.parameters()]
    flow.zero_grad()
    x0 = x.detach()
    lp = flow.log_prob(x0, generator=torch.Generator().manual_seed(2))
    lp.sum().backward()
    grads += [p.grad.clone() for p in flow.parameters()]
    assert len(set(calls)) <= 1 and (not calls or calls[0] == path)  # every step by the path asked for
    return [x.detach(), logp.detach(), lp.detach(), *grads], len(calls)


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 2e-5)])
@pytest.mark.parametrize("path", PATHS)
def test_flow_with_the_kernel_equals_the_eager_flow(kernel, dtype, tol, path, monkeypatch):
    native, n_native = _flow_run("native", dtype, monkeypatch, path)
    eager, n_eager = _flow_run("eager", dtype, monkeypatch)
    assert n_native == 20 and n_eager == 0  # ten steps of sampling, ten of the density
    for a, b in zip(native, eager):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12)])
@pytest.mark.parametrize("path", PATHS)
def test_unsymmetrised_sum_takes_the_kernel_too(kernel, dtype, tol, path, monkeypatch):
    # no symmetrisation: the sum itself hands its quadratic part to the MLP's step
    native, n_native = _flow_run("native", dtype, monkeypatch, path, symmetrize="none")
    eager, n_eager = _flow_run("eager", dtype, monkeypatch, symmetrize="none")
    assert n_native == 20 and n_eager == 0
    for a, b in zip(native, eager):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())))


def test_path_gradient_with_the_kernel_equals_eager(kernel, monkeypatch):
    # the path-gradient estimator: the score by the backward integration at frozen parameters, then
    # the sampling path's backward
    from latticeflow.train import path_gradient_surrogate

    res = []
    for mode in ("native", "eager"):
        monkeypatch.setenv("LATTICEFLOW_STEP_KERNEL", mode)
        flow, target = _flow("float64")
        x, _ = flow.sample(9, generator=torch.Generator().manual_seed(4))
        path_gradient_surrogate(flow, target, x).mean().backward()
        res.append([p.grad.clone() for p in flow.parameters()])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("path", PATHS)
def test_thread_counts_agree(kernel, path, monkeypatch):
    # the kernel's own passes at 1, 2 and 3 threads (the GEMM step's products are the BLAS's, at torch's count)
    outs = []
    step = _compiled(path)
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        params = _params(16, 40, True, True, True, True, True, torch.float64)
        y = torch.randn(50, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
        logp = torch.zeros(50, dtype=torch.float64, requires_grad=True)
        outs.append(_step_outputs(step, y, logp, params, "lncosh", 0.0, 0.1,
                                  (torch.ones(50, 16, dtype=torch.float64), torch.ones(50, dtype=torch.float64))))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("which", ["conv", "step"])
def test_kernel_mode_setting(which, monkeypatch):
    # both compiled kernels: "eager" never builds and nothing asks for the kernel; a bad value is refused
    from latticeflow import native

    mod, env = (native, "LATTICEFLOW_CONV_KERNEL") if which == "conv" else (native_step, "LATTICEFLOW_STEP_KERNEL")
    monkeypatch.setenv(env, "eager")
    assert mod.kernel_mode() == "eager" and mod.load() is None
    if which == "conv":
        assert not native.available(torch.zeros(2, 4), 9, "lncosh", 4)
    else:
        assert MLPPotential(4, 3).rk4_step(None) is None
    monkeypatch.setenv(env, "fast")
    with pytest.raises(ValueError, match=f"{env} must be one of"):
        mod.kernel_mode()
    monkeypatch.delenv(env)
    assert mod.kernel_mode() == "auto"


def test_what_the_kernel_does_not_take(kernel, monkeypatch):
    monkeypatch.setenv("LATTICEFLOW_STEP_KERNEL", "auto")
    W = torch.zeros(3, 4)
    assert native_step.available(torch.zeros(2, 4), 3, "lncosh", [W])
    assert not native_step.available(torch.zeros(2, 4, dtype=torch.float16), 3, "lncosh", [W.half()])
    assert not native_step.available(torch.zeros(2, 4, dtype=torch.float64), 3, "lncosh", [W])  # mixed dtypes
    assert not native_step.available(torch.zeros(2, 4), 3, "relu", [W])
    assert not native_step.available(torch.zeros(2, 4, device="meta"), 3, "lncosh", [W])  # any device but the CPU
    assert native_step.available(torch.zeros(2, 4), 3, "lncosh", [W]) == "lanes"
    big = torch.zeros(2, native_step.AUTO_MAX_SITES + 1)
    if native_step.blas() is not None:  # larger lattices: the GEMM step, at any size
        assert native_step.available(big, 3, "lncosh", [torch.zeros(3, big.shape[1])]) == "gemm"
        assert native_step.available(torch.zeros(2, native_step.MAX_SITES + 1), native_step.MAX_HIDDEN + 1,
                                     "lncosh", []) == "gemm"
        huge = torch.zeros(2, native_step.AUTO_GEMM_MAX_SITES + 1)  # auto: eager is as fast there
        assert native_step.available(huge, 3, "lncosh", []) is None
    assert not native_step.available(torch.zeros(2, 4), native_step.MAX_HIDDEN + 1, "lncosh", [])  # lanes' limit
    # without torch's BLAS gemm: auto steps larger lattices eagerly, native says why
    monkeypatch.setattr(native_step, "_blas_ptrs", None)
    monkeypatch.setattr(native_step, "_blas_error", "torch exports no BLAS gemm: (test)")
    assert native_step.available(big, 3, "lncosh", []) is None
    monkeypatch.setenv("LATTICEFLOW_STEP_KERNEL", "native")
    with pytest.raises(RuntimeError, match="GEMM step is unavailable: torch exports no BLAS gemm"):
        native_step.available(big, 3, "lncosh", [])
    # potentials it does not take: an unfused MLP, a stochastic token, a quadratic part with a linear term
    assert MLPPotential(16, 3, fused=False).rk4_step(None) is None
    assert MLPPotential(16, 3).rk4_step(object()) is None
    assert MLPPotential(16, 3).rk4_step(None, [QuadraticPotential(lattice_shape=(4, 4), linear=True)]) is None
    assert MLPPotential(16, 3).rk4_step(None, [QuadraticPotential(lattice_shape=(4, 4), linear=False)]) is not None


def test_the_integrator_falls_back_when_the_step_declines():
    # a drift's rk4_step answering None, or any solver but RK4, leaves the step to the solver
    def f(t, y):
        return -y, -torch.ones(y.shape[0])

    f.rk4_step = lambda t, x, logp, dt: None
    x, lp = ode.integrate(f, torch.ones(2, 3), torch.zeros(2), 0.0, 0.1, 5)
    torch.testing.assert_close(x, torch.full((2, 3), (1 - 0.1 + 0.1**2 / 2 - 0.1**3 / 6 + 0.1**4 / 24) ** 5))
    f.rk4_step = lambda t, x, logp, dt: (x + 1.0, logp)
    assert float(ode.integrate(f, torch.ones(2, 3), torch.zeros(2), 0.0, 0.1, 5)[0][0, 0]) == 6.0
    x, _ = ode.integrate(f, torch.ones(2, 3), torch.zeros(2), 0.0, 0.1, 5, method="midpoint")
    torch.testing.assert_close(x, torch.full((2, 3), (1 - 0.1 + 0.1**2 / 2) ** 5))


@pytest.mark.parametrize("which", ["conv", "step"])
def test_status_names_what_ran_without_building(which, monkeypatch):
    # both compiled kernels (latticeflow.native: the conv stage; latticeflow.native.step)
    from latticeflow import native

    mod, env = (native, "LATTICEFLOW_CONV_KERNEL") if which == "conv" else (native_step, "LATTICEFLOW_STEP_KERNEL")
    monkeypatch.setattr(mod, "_lib", None)
    monkeypatch.setattr(mod, "_load_error", None)
    monkeypatch.setenv(env, "auto")
    assert mod.status() == "not loaded"
    monkeypatch.setattr(mod, "_load_error", "no C++ compiler")
    assert mod.status() == "eager (kernel unavailable: no C++ compiler)"
    monkeypatch.setenv(env, "eager")
    assert mod.status() == f"eager ({env}=eager)"


@pytest.mark.parametrize("which", ["conv", "step"])
def test_without_a_compiler_auto_runs_eagerly_and_native_says_why(which, monkeypatch, tmp_path):
    from latticeflow import native
    from latticeflow.potentials import ConvPotential

    mod, env = (native, "LATTICEFLOW_CONV_KERNEL") if which == "conv" else (native_step, "LATTICEFLOW_STEP_KERNEL")
    monkeypatch.setattr(mod, "_lib", None)
    monkeypatch.setattr(mod, "_load_error", None)
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setenv("LATTICEFLOW_CACHE", str(tmp_path))
    monkeypatch.setenv(env, "auto")
    if which == "conv":  # the eager stage
        assert not native.available(torch.zeros(2, 4), 9, "lncosh", 4)
        g, lap = ConvPotential(4, channels=2, kernel_size=3).grad_and_laplacian(torch.randn(3, 16), 0.0)
        assert g.shape == (3, 16) and lap.shape == (3,)
    else:  # the eager step
        x, _ = _flow("float32")[0].sample(5)
        assert x.shape == (5, 16)
    assert mod.load() is None
    monkeypatch.setenv(env, "native")
    with pytest.raises(RuntimeError, match="no C.. compiler"):
        mod.load()


def test_source_compiles_without_warnings(kernel, tmp_path):
    from latticeflow import native

    cmd = [native._compiler(), *native._BASE_FLAGS, *native_step._FLAGS, "-fopenmp", "-DLF_SIMD_EXP", "-Wall",
           "-Wextra", "-Werror", str(native_step._SOURCE), "-o", str(tmp_path / "k.so"), "-lmvec", "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "mvec" in done.stderr:
        pytest.skip("no libmvec here")
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_run_records_the_step_kernel(kernel, tmp_path, monkeypatch):
    # a quadratic + MLP run at L=3 steps with the kernel, and its summary.json says so
    import json

    from models import ising as driver

    monkeypatch.setenv("LATTICEFLOW_STEP_KERNEL", "auto")
    driver.main(["--L", "3", "--hidden", "4", "--n-steps", "2", "--potential", "quadratic+mlp", "--batch", "8",
                 "--epochs", "2", "--out", str(tmp_path / "run"), "--no-plot", "--quiet", "--threads", "1"])
    prov = json.loads((tmp_path / "run" / "summary.json").read_text())["provenance"]
    assert prov["step_kernel"] == native_step.status() and prov["step_kernel"].startswith("compiled (mlp_step-")


def _gemm_or_skip(precision, which):
    if which not in native_step.gemm_choices(precision):
        pytest.skip(f"no {which} {precision} gemm here (MKL's needs its export in libtorch, the native tiles "
                    "AVX-512, and AVX512-BF16 for bfloat16)")


@pytest.mark.parametrize("which", ["mkl", "native"])
def test_bfloat16_products_round_only_the_products(kernel, which, monkeypatch):
    # inside native_step.products("bfloat16") a float32 GEMM step multiplies bfloat16 operands (float32 sums),
    # by either bfloat16 gemm: its step and gradients agree with the float32 step to bfloat16 rounding (2^-8
    # relative per operand), not to float32 rounding; float64 steps and everything outside the block are untouched
    _gemm_or_skip("bfloat16", which)
    monkeypatch.setitem(native_step.GEMM, "bfloat16", which)
    monkeypatch.setattr(native_step, "AUTO_MAX_SITES", 0)
    params = _params(40, 64, True, True, True, False, False, torch.float32, seed=4)
    y = torch.randn(32, 40, generator=torch.Generator().manual_seed(3)).requires_grad_()
    logp = torch.zeros(32, requires_grad=True)
    cot = (torch.randn(32, 40, generator=torch.Generator().manual_seed(5)), torch.ones(32))
    assert native_step.available(y, 64, "softplus", params) == "gemm"
    full = _step_outputs(_compiled("gemm"), y, logp, params, "softplus", 0.2, 0.1, cot)
    before = dict(native_step.counts)
    with native_step.products("bfloat16"):
        assert native_step.available(y, 64, "softplus", params) == "gemm-bf16"
        assert native_step.available(y.double(), 64, "softplus", [q.double() for q in params if q is not None]) == "gemm"
    assert native_step.counts["bfloat16"] == before["bfloat16"] + 1 and native_step.counts["full"] == before["full"] + 1
    assert native_step.available(y, 64, "softplus", params) == "gemm"  # the block's end restores float32
    low = _step_outputs(_compiled("gemm-bf16"), y, logp, params, "softplus", 0.2, 0.1, cot)
    errs = [float((a - b).detach().norm() / b.detach().norm()) for a, b in zip(low, full) if b.detach().norm() > 0]
    assert max(errs) < 2e-2 and max(errs) > 1e-5  # bfloat16's rounding shows, and nothing more
    with pytest.raises(ValueError, match="precision must be one of"):
        with native_step.products("float16"):
            pass


def _rounded(x):
    return x.to(torch.bfloat16).double()


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("M, Nc, K", [(1, 1, 1), (5, 33, 7), (13, 50, 17), (32, 64, 40), (25, 31, 64), (12, 96, 2)])
def test_tiles_are_the_product(kernel, precision, ta, tb, M, Nc, K):
    # the AVX-512 tiles against float64 products of their operands: for bfloat16 the operands rounded to
    # bfloat16 (torch's rounding, to nearest even), each product then exact in float32 (two 8-bit significands);
    # for float32 each product rounded once. Either way float32 sums over K products, so at most about K
    # roundings of the running sum, bounded by 2K·2⁻²⁴·|α|·(|A||B|) + 2·2⁻²⁴·|C|; columns of C past Nc
    # (ldc > Nc) are left alone; and bfloat16's is not the float32 product (its operands were rounded)
    _gemm_or_skip(precision, "native")
    lib = native_step.load()
    gemm, operand = ((lib.lf_gemm_bf16_f32, _rounded) if precision == "bfloat16" else
                     (lib.lf_gemm_f32, lambda x: x.double()))
    g = torch.Generator().manual_seed(M * 1000 + Nc * 10 + K + (7 if precision == "float32" else 0))
    A = torch.randn(K, M + 3, generator=g) if ta else torch.randn(M, K + 3, generator=g)  # rows longer than used
    B = torch.randn(Nc, K + 1, generator=g) if tb else torch.randn(K, Nc + 2, generator=g)
    opA = operand(A[:, :M].t() if ta else A[:, :K])
    opB = operand(B[:, :K].t() if tb else B[:, :Nc])
    for alpha, beta in ((1.0, 0.0), (0.5, 2.0), (-1.5, 1.0)):
        C = torch.randn(M, Nc + 5, generator=g)
        C0 = C.clone()
        gemm(int(ta), int(tb), M, Nc, K, alpha, A.data_ptr(), A.shape[1], B.data_ptr(), B.shape[1], beta,
             C.data_ptr(), C.shape[1])
        ref = alpha * opA @ opB + beta * C0[:, :Nc].double()
        bound = 2 * K * 2.0 ** -24 * abs(alpha) * (opA.abs() @ opB.abs()) + 2 * 2.0 ** -24 * ref.abs()
        err = (C[:, :Nc].double() - ref).abs()
        assert bool((err <= bound + 1e-30).all()), float((err / bound).max())
        assert torch.equal(C[:, Nc:], C0[:, Nc:])
        if precision == "bfloat16" and K >= 7:
            opA32, opB32 = (A[:, :M].t() if ta else A[:, :K]).double(), (B[:, :K].t() if tb else B[:, :Nc]).double()
            full = alpha * opA32 @ opB32 + beta * C0[:, :Nc].double()
            assert float((C[:, :Nc].double() - full).abs().max()) > 1e-4


def _step_by_each_gemm(precision, quad, seed, monkeypatch):
    """(y, logp, params, cot, {gemm: the GEMM step's outputs}) of one float32 GEMM step with products in
    ``precision`` by each gemm (skipped unless both are available)."""
    _gemm_or_skip(precision, "mkl")
    _gemm_or_skip(precision, "native")
    monkeypatch.setattr(native_step, "AUTO_MAX_SITES", 0)
    params = _params(40, 64, True, True, True, quad, quad and precision == "float32", torch.float32, seed=seed)
    y = torch.randn(32, 40, generator=torch.Generator().manual_seed(3)).requires_grad_()
    logp = torch.zeros(32, requires_grad=True)
    cot = (torch.randn(32, 40, generator=torch.Generator().manual_seed(5)), torch.ones(32))
    path = "gemm" if precision == "float32" else "gemm-bf16"
    out = {}
    for which in ("mkl", "native"):
        with native_step.gemm_as(precision, which):
            out[which] = _step_outputs(_compiled(path), y, logp, params, "lncosh", 0.2, 0.1, cot)
    return y, logp, params, cot, out


def test_the_two_bf16_gemms_give_the_same_step(kernel, monkeypatch):
    # both bfloat16 gemms round the same operands the same way and sum in float32: a GEMM step and its
    # gradients agree between them to float32 rounding of the sums (and an operand that then rounds the other
    # way), far closer than either agrees with the float32 step
    y, logp, params, cot, out = _step_by_each_gemm("bfloat16", True, 6, monkeypatch)
    full = _step_outputs(_compiled("gemm"), y, logp, params, "lncosh", 0.2, 0.1, cot)
    for a, b, f in zip(out["native"], out["mkl"], full):
        if b.detach().norm() > 0:
            between = float((a - b).detach().norm() / b.detach().norm())
            to_full = float((b - f).detach().norm() / b.detach().norm())
            assert between < 1e-5 and between <= to_full / 100, (between, to_full)  # both 0: a pass-through


def test_gemm_choice(kernel, monkeypatch):
    # "auto" prefers, for bfloat16, MKL's gemm on CPUs with AMX tiles and the AVX512-BF16 tiles elsewhere, and
    # for float32 the tiles on AMD CPUs and MKL's sgemm elsewhere, taking the other where the preferred one is
    # missing; "mkl"/"native" insist (None where unavailable); anything else is refused
    from latticeflow.native import step

    cases = [("bfloat16", "GenuineIntel", "flags : avx512f amx_bf16 avx512_bf16", True, True, "mkl"),
             ("bfloat16", "AuthenticAMD", "flags : avx512f avx512_bf16", True, True, "native"),
             ("bfloat16", "GenuineIntel", "flags : avx512f", False, True, "mkl"),
             ("bfloat16", "GenuineIntel", "flags : avx2", False, False, None),
             ("bfloat16", "GenuineIntel", "flags : amx_bf16", True, False, "native"),
             ("float32", "AuthenticAMD", "flags : avx512f", True, True, "native"),
             ("float32", "GenuineIntel", "flags : avx512f amx_bf16", True, True, "mkl"),
             ("float32", "AuthenticAMD", "flags : avx2", False, True, "mkl"),
             ("float32", "GenuineIntel", "flags : avx512f", True, False, "native")]
    for precision, vendor, flags, native, mkl, want in cases:
        monkeypatch.setattr(step, "_cpu_flags", lambda flags=flags: flags)
        monkeypatch.setattr(step, "_cpu_vendor", lambda vendor=vendor: vendor)
        monkeypatch.setattr(step, "_native", lambda p, native=native, precision=precision: native and p == precision)
        key = torch.float32 if precision == "float32" else "bfloat16"
        monkeypatch.setattr(step, "_blas_ptrs", {torch.float64: 2, **({key: 3} if mkl else {})})
        assert step.gemm_choice(precision, "auto") == want, (precision, vendor, flags)
        assert step.gemm_choice(precision, "mkl") == ("mkl" if mkl else None)
        assert step.gemm_choice(precision, "native") == ("native" if native else None)
        assert step.gemm_choices(precision)[:1] == ([want] if want else [])
        with step.gemm_as(precision, "mkl"):
            assert step.gemm_choice(precision) == ("mkl" if mkl else None)
        assert step.GEMM[precision] == "auto"
    # a float32 step with the gemm insisted on unavailable is refused, not quietly run on the other
    monkeypatch.setattr(step, "_native", lambda p: False)
    x = torch.zeros(2, 3)
    with step.gemm_as("float32", "native"):
        with pytest.raises(ValueError, match="unavailable here"):
            step._gemm(x)
    assert step._gemm(x.double()) == 2  # float64: dgemm, whatever the float32 setting
    with pytest.raises(ValueError, match="a gemm must be one of"):
        step.gemm_choice("float32", "oneDNN")
    with pytest.raises(ValueError, match="precision must be one of"):
        step.gemm_choice("float16")
    with pytest.raises(ValueError, match="a gemm must be one of"):
        with step.gemm_as("bfloat16", "oneDNN"):
            pass


@pytest.mark.parametrize("quad", [False, True])
def test_the_float32_gemms_give_the_same_step(kernel, quad, monkeypatch):
    # a float32 GEMM step and its gradients by the tiles and by MKL's sgemm: the same sums in other orders, so
    # equal to float32 rounding (and both equal to the float64 step to float32's accuracy)
    y, logp, params, cot, out = _step_by_each_gemm("float32", quad, 8, monkeypatch)
    p64 = [q.double() if q is not None else None for q in params]
    want = _step_outputs(_reference_rk4, y.detach().double().requires_grad_(), logp.detach().double().requires_grad_(),
                         p64, "lncosh", 0.2, 0.1, tuple(c.double() for c in cot))
    for a, b, w in zip(out["native"], out["mkl"], want):
        scale = float(w.detach().norm())
        if scale > 0:
            assert float((a - b).detach().norm()) / scale < 2e-6
            assert float((a.double() - w).detach().norm()) / scale < 2e-6


def test_float32_gemm_steps_are_counted_apart_from_float64(kernel, monkeypatch):
    # the provenance names the float32 gemm only where float32 GEMM steps ran: a float64 GEMM step (dgemm,
    # whatever the float32 choice) counts as full precision but not as float32
    monkeypatch.setattr(native_step, "AUTO_MAX_SITES", 0)
    params = _params(40, 64, True, False, False, False, False, torch.float64, seed=2)
    y = torch.zeros(4, 40, dtype=torch.float64)
    before = dict(native_step.counts)
    assert native_step.available(y, 64, "softplus", params, steps=3) == "gemm"
    assert native_step.counts["full"] - before["full"] == 3 and native_step.counts["float32"] == before["float32"]
    assert native_step.available(y.float(), 64, "softplus", [q.float() if q is not None else None for q in params],
                                 steps=2) == "gemm"
    assert native_step.counts["full"] - before["full"] == 5 and native_step.counts["float32"] - before["float32"] == 2


def test_bfloat16_training_keeps_its_products_inside_the_epochs(kernel, monkeypatch):
    # --train-precision bfloat16: the trainer's epochs (sampling and backward) take bfloat16 GEMM steps; a
    # flow.sample outside them (every reported estimate) takes float32 ones; the names agree with the config's
    from latticeflow.config import TRAIN_PRECISIONS
    from latticeflow.train import VariationalTrainer

    assert TRAIN_PRECISIONS == native_step.PRECISIONS
    if not native_step.gemm_choices("bfloat16"):
        pytest.skip("no bfloat16 gemm here (MKL's or the AVX512-BF16 kernel)")
    monkeypatch.setattr(native_step, "AUTO_MAX_SITES", 0)  # the L=4 flow takes the GEMM step
    flow, target = _flow("float32", symmetrize="none")
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    trainer = VariationalTrainer(flow, target, opt, batch_size=8, train_precision="bfloat16", progress=False)
    before = dict(native_step.counts)
    record = trainer.run_epoch(0)
    assert math.isfinite(record["loss"])
    assert native_step.counts["bfloat16"] - before["bfloat16"] == flow.n_steps  # the sampling steps
    assert native_step.counts["full"] == before["full"]
    flow.sample(4)
    assert native_step.counts["full"] - before["full"] == flow.n_steps
    with pytest.raises(ValueError, match="train_precision"):
        VariationalTrainer(flow, target, opt, train_precision="float16", progress=False)


def test_compiled_signed_permutation_equals_the_gather(kernel):
    # the step frame's change of coordinates in one compiled pass: y_bj = s_b x_{b, perm_bj}, and the
    # autograd Function around it still pulls gradients back through the inverse permutation
    from latticeflow.symmetry import signed_permutation

    g = torch.Generator().manual_seed(0)
    B, N = 7, 12
    perm = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    inv = torch.argsort(perm, dim=1)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(B, N, generator=g, dtype=dtype, requires_grad=True)
        sign = (2.0 * torch.randint(0, 2, (B, 1), generator=g) - 1.0).to(dtype)
        for s in (sign, None):
            want = torch.gather(x, 1, perm) * (s if s is not None else 1.0)
            got = native_step.signed_permutation(x.detach(), perm, s)
            torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
            y = signed_permutation(x, perm, inv, s)
            torch.testing.assert_close(y, want, rtol=0, atol=0)
            dy = torch.randn(B, N, generator=g, dtype=dtype)
            (gx,) = torch.autograd.grad(y, x, dy)
            (gw,) = torch.autograd.grad(want, x, dy)
            torch.testing.assert_close(gx, gw, rtol=0, atol=0)
    # what it does not take: another shape, an int32 table, a float16 state
    assert native_step.signed_permutation(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.long), None) is None
    assert native_step.signed_permutation(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int32), None) is None
    assert native_step.signed_permutation(torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2, 3, dtype=torch.long),
                                          None) is None


def _whole_run(whole, dtype, monkeypatch, L=6, **kw):
    # a flow at L=6 (36 sites: the GEMM step) or L=4 (the lanes step), its samples, ln p, the density of given
    # points and all gradients, integrated in one call (whole) or step by step; returns the numbers and the
    # whole-integration calls
    from latticeflow import flow as flow_module
    from latticeflow.potentials.mlp import _MLPRK4Integration

    monkeypatch.setattr(flow_module, "WHOLE_INTEGRATION", whole)
    calls = []
    real = _MLPRK4Integration.apply
    monkeypatch.setattr(_MLPRK4Integration, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    flow, target = _flow(dtype, L=L, **kw)
    x, logp = flow.sample(21, generator=torch.Generator().manual_seed(1))
    (logp + target.energy(x)).mean().backward()
    grads = [p.grad.clone() for p in flow.parameters()]
    flow.zero_grad()
    lp = flow.log_prob(x.detach(), generator=torch.Generator().manual_seed(2))
    lp.sum().backward()
    grads += [p.grad.clone() for p in flow.parameters()]
    return [x.detach(), logp.detach(), lp.detach(), *grads], calls


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 2e-5)])
@pytest.mark.parametrize("symmetrize", ["random", "none"])
@pytest.mark.parametrize("path, L", [("gemm", 6), ("lanes", 4)])
def test_whole_integration_equals_the_steps_one_by_one(kernel, dtype, tol, symmetrize, path, L, monkeypatch):
    # all n steps in one call, each in its step's random frame (or none): the numbers of the steps one by one,
    # for sampling, the density of given points (backward in time) and every gradient
    _compiled(path)
    whole, calls = _whole_run(True, dtype, monkeypatch, L=L, symmetrize=symmetrize)
    steps, none = _whole_run(False, dtype, monkeypatch, L=L, symmetrize=symmetrize)
    assert calls == [path, path] and none == []
    for a, b in zip(whole, steps):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("path, L", [("gemm", 6), ("lanes", 4)])
def test_whole_integration_second_derivatives_and_path_gradient(kernel, path, L, monkeypatch):
    # create_graph=True through the whole integration (the reference in autograd ops) and the path-gradient
    # estimator: the numbers of the step-by-step flow
    from latticeflow import flow as flow_module
    from latticeflow.train import path_gradient_surrogate

    _compiled(path)
    res = []
    for whole in (True, False):
        monkeypatch.setattr(flow_module, "WHOLE_INTEGRATION", whole)
        flow, target = _flow("float64", L=L, n_steps=3)
        z = torch.randn(5, L * L, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        x, dlogp = flow.forward_map(z, generator=torch.Generator().manual_seed(3))
        (gz,) = torch.autograd.grad((x[:, 0] ** 2).sum() + dlogp.sum(), z, create_graph=True)
        second = torch.autograd.grad((gz**2).sum(), [z, *flow.parameters()])
        flow.zero_grad()
        xs, _ = flow.sample(7, generator=torch.Generator().manual_seed(4))
        path_gradient_surrogate(flow, target, xs).mean().backward()
        res.append([*second, *[p.grad.clone() for p in flow.parameters()]])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

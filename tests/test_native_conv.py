"""The compiled conv stage (latticeflow.native) against the eager one, float64 and float32.

The kernel computes the one-layer conv potential's (∇φ, ∇²φ) and their backward one lattice
site at a time for blocks of samples; every output and every gradient must equal the eager
implementation's (_ConvDrift, itself tested against FFTs and autograd in test_potentials_conv)
to rounding, for every activation, with and without D4 kernels and a bias, for batches that
do not fill the last block, at 1 and 2 threads. Skipped where no C++ compiler can build it.
"""

import pytest
import torch

from latticeflow import native
from latticeflow.potentials import ConvPotential
from latticeflow.potentials.conv import _ConvDrift, _ConvDriftNative, _d4_kernel_basis, _native_takes, _Stencil

from potential_helpers import randomize


@pytest.fixture
def kernel():
    if native.load() is None:
        pytest.skip(f"the conv kernel could not be built here: {native._load_error}")
    return native


def _inputs(L, k, d4, C, B, bias, dtype, seed=1):
    st = _Stencil(L, k, _d4_kernel_basis(k).to(dtype) if d4 else None)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L * L, generator=g, dtype=dtype).requires_grad_()
    A = (0.5 * torch.randn(C, st.J, generator=g, dtype=dtype)).requires_grad_()
    b = (0.3 * torch.randn(C, generator=g, dtype=dtype)).requires_grad_() if bias else None
    w = (0.3 * torch.randn(C, generator=g, dtype=dtype)).requires_grad_()
    ksq = (torch.rand(C, generator=g, dtype=dtype) + 0.5).requires_grad_()
    dG, dL = torch.randn(B, L * L, generator=g, dtype=dtype), torch.randn(B, generator=g, dtype=dtype)
    return st, (x, A, b, w, ksq), (dG, dL)


def _outputs(F, st, inputs, cot, act):
    grad, lap = F.apply(*inputs, st, act)
    wrt = [t for t in inputs if t is not None]
    return [grad, lap, *torch.autograd.grad((grad, lap), wrt, cot)]


CASES = [(6, 3, False, 5, 13, True), (5, 5, True, 4, 21, False), (7, 5, True, 3, 8, True), (4, 1, False, 2, 17, False)]


@pytest.mark.parametrize("L, k, d4, C, B, bias", CASES)
@pytest.mark.parametrize("act", ["softplus", "lncosh", "tanh"])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_eager_float64(kernel, L, k, d4, C, B, bias, act, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # what the kernel reads
    st, inputs, cot = _inputs(L, k, d4, C, B, bias, torch.float64)
    for a, b in zip(_outputs(_ConvDriftNative, st, inputs, cot, act), _outputs(_ConvDrift, st, inputs, cot, act)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["softplus", "lncosh", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_eager_at_the_default_size(kernel, act, dtype):
    # L=16, k=5 with D4 kernels, 16 channels: the default flow's stage, which (with ln cosh) has
    # its own compiled instantiation. In float32 the two sum in different orders (and exp differs
    # by a few ulp), so they agree to float32 rounding of sums of ~10⁴ terms
    st, inputs, cot = _inputs(16, 5, True, 16, 40, False, dtype)
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(_outputs(_ConvDriftNative, st, inputs, cot, act), _outputs(_ConvDrift, st, inputs, cot, act)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.detach().abs().max()))


def test_kernel_results_across_thread_counts(kernel, monkeypatch):
    # the batch is split over threads and the parameter sums added in thread order: 1, 2 and 3
    # threads give the same numbers to float64 rounding (not bitwise: the sums are grouped differently)
    st, inputs, cot = _inputs(6, 3, True, 4, 37, True, torch.float64)
    runs = []
    for n in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda n=n: n)
        runs.append(_outputs(_ConvDriftNative, st, inputs, cot, "lncosh"))
    for other in runs[1:]:
        for a, b in zip(other, runs[0]):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_double_backward_through_the_kernel_is_exact(kernel):
    # create_graph=True differentiates the recorded reference: second derivatives as eager's
    st, inputs, cot = _inputs(5, 3, True, 3, 6, True, torch.float64)
    seconds = []
    for F in (_ConvDriftNative, _ConvDrift):
        grad, lap = F.apply(*inputs, st, "tanh")
        wrt = [t for t in inputs if t is not None]
        first = torch.autograd.grad((grad**2).sum() + (lap**3).sum(), wrt, create_graph=True)
        seconds.append(torch.autograd.grad((first[0] ** 2).sum() + first[1].sum(), wrt, allow_unused=True))
    for a, b in zip(*seconds):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("td", [False, True])
def test_potential_takes_the_kernel_and_trains_the_same(kernel, td, monkeypatch):
    # ConvPotential.grad_and_laplacian with LATTICEFLOW_CONV_KERNEL=native and =eager: the same
    # drift and parameter gradients (the path the flow's training runs at every RK stage)
    torch.manual_seed(0)
    pot = randomize(ConvPotential(6, channels=4, kernel_size=3, activation="lncosh", d4=True, z2=True,
                                  time_dependent=td)).double()
    x = torch.randn(11, 36, dtype=torch.float64)
    runs = {}
    for mode in ("native", "eager"):
        monkeypatch.setenv("LATTICEFLOW_CONV_KERNEL", mode)
        calls = []
        with monkeypatch.context() as m:
            m.setattr(_ConvDriftNative, "apply", lambda *a, _f=_ConvDriftNative.apply: calls.append(1) or _f(*a))
            xr = x.clone().requires_grad_()
            with pot.shared_constants():
                g, lap = pot.grad_and_laplacian(xr, 0.3)
            loss = (g * torch.sin(xr)).sum() + lap.square().sum()
            runs[mode] = [g, lap, *torch.autograd.grad(loss, [xr, *pot.parameters()])]
        assert bool(calls) == (mode == "native")
    for a, b in zip(runs["native"], runs["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_tables_are_a_stencil_and_its_adjoint():
    # nbr[s, i] = s + d_i − p and nbm[s, i] = s − (d_i − p): inverse permutations of the sites
    for L, k, d4 in ((5, 3, True), (6, 5, False), (4, 1, True)):
        st = _Stencil(L, k, _d4_kernel_basis(k) if d4 else None)
        t = st.tables()
        N = L * L
        assert t.nbr.shape == t.nbm.shape == (N, k * k)
        sites = torch.arange(N)
        for i in range(k * k):
            assert torch.equal(t.nbr[t.nbm[:, i].long(), i].long(), sites)
            assert sorted(t.nbr[:, i].tolist()) == list(range(N))
        # the grouped order covers every offset once, plane by plane
        assert sorted(t.order) == list(range(k * k))
        rows = st.rows if st.rows is not None else list(range(k * k))
        for j in range(t.J):
            assert {rows[d] for d in t.order[t.start[j]:t.start[j + 1]]} == {j}
        # offset d = (r, q) moves site (0, 0) to (r − p, q − p) mod L
        p = k // 2
        for i, d in enumerate(t.order):
            r, q = divmod(d, k)
            assert int(t.nbr[0, i]) == ((r - p) % L) * L + (q - p) % L


@pytest.mark.parametrize("which", ["grad", "lap"])
def test_one_output_used(kernel, which):
    # a backward from ∇φ alone or from ∇²φ alone (the other cotangent None): as eager's
    st, inputs, _ = _inputs(5, 3, True, 3, 9, True, torch.float64)
    res = []
    for F in (_ConvDriftNative, _ConvDrift):
        grad, lap = F.apply(*inputs, st, "softplus")
        out = (grad * grad.detach().cos()).sum() if which == "grad" else (lap**2).sum()
        res.append(torch.autograd.grad(out, [t for t in inputs if t is not None], allow_unused=True))
    for a, b in zip(*res):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_parameters_of_another_dtype_never_reach_the_kernel(kernel):
    # the kernel reads raw memory: float64 x with float32 parameters goes to the eager stage
    st, (x, A, b, w, _), _ = _inputs(5, 3, True, 3, 4, True, torch.float64)
    assert _native_takes(x, A, b, w, st, "lncosh")
    assert not _native_takes(x, A.float(), b, w, st, "lncosh")
    assert not _native_takes(x, A, b.float(), w, st, "lncosh")
    assert not _native_takes(x, A, None, w.float(), st, "lncosh")
    pot = ConvPotential(5, channels=3, kernel_size=3)  # float32 parameters
    with pytest.raises(RuntimeError):  # as before the kernel existed: torch refuses the mixed matmul
        pot.grad_and_laplacian(torch.randn(2, 25, dtype=torch.float64), 0.0)


def test_inputs_the_kernel_does_not_take():
    # float16, 121 > 81 offsets, 65 > 64 channels, an unknown activation: eager
    assert not native.available(torch.zeros(2, 4, dtype=torch.float16), 9, "lncosh", 4)
    assert not native.available(torch.zeros(2, 4), 121, "lncosh", 4)
    assert not native.available(torch.zeros(2, 4), 9, "lncosh", 65)
    assert not native.available(torch.zeros(2, 4), 9, "relu", 4)
    assert not native.available(torch.zeros(2, 4, device="meta"), 9, "lncosh", 4)  # any device but the CPU


def test_build_is_cached_and_atomic(kernel, monkeypatch, tmp_path):
    # a fresh cache builds one library; a second build finds it instead of compiling again
    monkeypatch.setenv("LATTICEFLOW_CACHE", str(tmp_path))
    cxx = native._compiler()
    first = native._build(cxx)
    assert first.parent == tmp_path / "native" and first.exists()
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left behind
    mtime = first.stat().st_mtime_ns
    assert native._build(cxx) == first and first.stat().st_mtime_ns == mtime


def test_source_compiles_without_warnings(kernel, tmp_path):
    # the library's flags with every warning an error (-Wall -Wextra): a warning about a loop bound
    # or an uninitialised lane is a bug report from the compiler
    import subprocess

    cxx = native._compiler()
    cmd = [cxx, *native._BASE_FLAGS, "-fopenmp", "-DLF_SIMD_EXP", "-Wall", "-Wextra", "-Werror",
           str(native._SOURCE), "-o", str(tmp_path / "k.so"), "-lmvec", "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "mvec" in done.stderr:
        pytest.skip("no libmvec here")
    assert done.returncode == 0, done.stderr[-2000:]

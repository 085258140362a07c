"""Compiled CPU kernels: one fused RK4 step of the MLP (+ quadratic) drift, for small and larger lattices.

On small lattices (the L=4 preset: N = 16 sites, h = 128 hidden units, batch 256) an eager RK4
step is about 340 tensor operators (85 per stage, forward and backward), each on a few thousand
numbers, and their dispatch, not the arithmetic, sets an iteration's cost. ``mlp_step.cpp``
computes the whole step, (y, ln p) at t → at t + dt for the drift of

    φ(y) = Σ_k w_k a(W_k·y + b_k) + ½ yᵀA y,       b, w, A linear in t,

and its backward (the cotangent of the step's input and every parameter gradient), in one of two
ways:

- "lanes" (up to :data:`AUTO_MAX_SITES` sites): a block of 16 float32 (8 float64) samples in the
  lanes of one 64-byte vector; the backward recomputes the four stages;
- "gemm" (larger lattices, e.g. the paper's L=16, h=512): the products by the BLAS gemm torch
  itself calls (:func:`blas`), everything else in a few fused passes; the forward keeps its stage
  points and pre-activations for the backward. Inside :func:`products` ("bfloat16") a float32
  GEMM step multiplies bfloat16 operands with float32 sums ("gemm-bf16"), for training only.

Where every step of an integration takes a compiled step, the flow runs all of them in one call each
way (:func:`integrate_forward`, :func:`integrate_backward`; ``latticeflow.flow.WHOLE_INTEGRATION``),
each step in the frame of its random symmetry element, passed as (perm, sign) tables: no per-step
Python, autograd nodes or frame gathers, and the numbers of the steps one by one.

The library is built and cached like the conv kernel (:mod:`latticeflow.native`) and called
through ctypes. ``LATTICEFLOW_STEP_KERNEL`` chooses: ``auto`` (the default: the compiled step for
CPU float32/float64 states, lanes or GEMM by size, when it compiles), ``native`` (the same choice,
or an error where it is unavailable) or ``eager`` (never compile). Results agree with the eager
step to rounding (tests/test_native_step.py: float64 to 1e-12, the step, the flow and every
gradient, on both paths).

Symbols: B batch, N sites, H hidden units.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import platform
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from . import _ACT, _SUFFIX, KERNEL_MODES, _cpu_flags, _declare_kernel, _load_kernel, _mode_of, _ptr, _status_of

__all__ = ["AUTO_GEMM_MAX_SITES", "AUTO_MAX_SITES", "GEMM", "GEMM_MODES", "KERNEL_MODES", "MAX_HIDDEN", "MAX_SITES", "PRECISIONS", "available", "blas", "counts", "gemm_as", "gemm_choice", "gemm_choices",
           "gemm_backward", "gemm_forward", "integrate_backward", "integrate_forward", "kernel_mode", "load", "products", "rk4_backward", "rk4_forward",
           "signed_permutation", "status"]

_ENV = "LATTICEFLOW_STEP_KERNEL"
_SOURCE = Path(__file__).with_name("mlp_step.cpp")
ACTIVATIONS = _ACT  # the activation codes both kernels read (lanes.h)
#: the kernel's limits (mlp_step.cpp: NMAX, HMAX)
MAX_SITES, MAX_HIDDEN = 1024, 4096
#: lattices up to this many sites (L = 5) take the lanes step, larger ones the GEMM step: whole training
#: iterations (benchmarks/step_speed.py, quadratic + MLP, batch 256) at 1 / 2 threads, lanes ÷ GEMM time:
#: L=4 (h=256) 0.86 / 0.84, L=5 0.98 / 0.91, L=6 1.11 / 1.03, L=8 1.42 / 1.31 (2026-12-02)
AUTO_MAX_SITES = 25
#: ``auto`` takes the GEMM step up to this many sites: paper configuration (h=512, batch 64, 2 threads), s per
#: iteration eager / GEMM step by step / whole integration: L=32 0.690 / 0.623 / 0.642, L=64 2.339 / 2.469 /
#: 2.443 (2026-12-02); ``native`` takes any size
AUTO_GEMM_MAX_SITES = 2048
#: gcc vectorises the activation loop 256 bits wide on some AVX-512 CPUs unless asked: ask (x86 only)
_FLAGS = ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_load_error: str | None = None
_blas_ptrs: dict[torch.dtype, int] | None = None
_blas_error: str | None = None


def kernel_mode() -> str:
    """``LATTICEFLOW_STEP_KERNEL``, read as :func:`latticeflow.native.kernel_mode` reads its own."""
    return _mode_of(_ENV)


def _declare(lib: ctypes.CDLL) -> None:
    p, i, d = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    _declare_kernel(lib, {"lf_signed_perm": [p, p, p, i, i, p, i],
                          "lf_mlp_rk4_integrate_forward": [i, p, p, p, p, i, i, i, p, p, p, p, p, p, p, i, d, d, i, p,
                                                           p, p, p, p, p, i],
                          "lf_mlp_rk4_integrate_backward": [i, p, p, p, p, p, p, p, p, i, i, i, p, p, p, p, p, p, p, i,
                                                            d, d, i, p, p, p, p, p, p, p, p, i]},
                    {"lf_mlp_max_sites": MAX_SITES, "lf_mlp_max_hidden": MAX_HIDDEN})
    f = ctypes.c_float
    for name in ("lf_gemm_bf16_f32", "lf_gemm_f32"):
        getattr(lib, name).argtypes = [i, i, i, i, i, f, p, i, p, i, f, p, i]
        getattr(lib, name).restype = None
    lib.lf_native_bf16.restype = lib.lf_native_f32.restype = ctypes.c_int


def blas() -> dict[Any, int] | None:
    """The addresses of the BLAS gemm torch itself calls on the CPU (``sgemm_``/``dgemm_``, the Fortran
    ABI, exported by libtorch_cpu with its MKL), for the GEMM step; under the key "bfloat16" also MKL's
    ``gemm_bf16bf16f32_`` where exported. None where this torch exports no gemm (the reason is kept in
    ``_blas_error``). Using torch's own gemm keeps one BLAS and one thread pool in the process."""
    global _blas_ptrs, _blas_error
    if _blas_ptrs is None and _blas_error is None:
        lib_dir = Path(torch.__file__).parent / "lib"
        found = [path for path in sorted(lib_dir.glob("libtorch_cpu.*")) if path.suffix in (".so", ".dylib")]
        try:
            if not found:
                raise OSError(f"no libtorch_cpu in {lib_dir}")
            lib = ctypes.CDLL(str(found[0]))
            ptrs: dict[Any, int] = {torch.float32: ctypes.cast(lib.sgemm_, ctypes.c_void_p).value,
                                    torch.float64: ctypes.cast(lib.dgemm_, ctypes.c_void_p).value}
            if hasattr(lib, "gemm_bf16bf16f32_"):
                ptrs["bfloat16"] = ctypes.cast(lib.gemm_bf16bf16f32_, ctypes.c_void_p).value
            _blas_ptrs = ptrs
        except (OSError, AttributeError) as e:
            _blas_error = f"torch exports no BLAS gemm: {e}"
    return _blas_ptrs


#: what :func:`products` accepts
PRECISIONS = ("float32", "bfloat16")
_products: contextvars.ContextVar[str] = contextvars.ContextVar("latticeflow_step_products", default="float32")
#: GEMM steps taken with bfloat16 and with full-precision products in this process, and of the latter those
#: of float32 states (the ones :func:`gemm_choice` ("float32") chose a gemm for; provenance)
counts = {"bfloat16": 0, "full": 0, "float32": 0}


@contextlib.contextmanager
def products(precision: str) -> Iterator[None]:
    """Inside the block, float32 GEMM steps multiply in ``precision``: "bfloat16" rounds the products'
    operands to bfloat16 and sums in float32 (:func:`gemm_choice`: MKL's gemm_bf16bf16f32 on AMX, this
    library's AVX512-BF16 tiles on other CPUs that have them), for training iterations whose gradients
    need only descend; "float32" (the default) changes nothing. Every other step (float64, the lanes step, eager steps, other devices) is
    unaffected, and so is everything outside the block: the trainer keeps its reported estimates out
    of it. Where this torch has no bfloat16 gemm the steps stay float32 (``counts`` tells)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    token = _products.set(precision)
    try:
        yield
    finally:
        _products.reset(token)


def load() -> ctypes.CDLL | None:
    """The compiled step library, compiling it on first use; None when it cannot be built (the
    reason is kept for ``LATTICEFLOW_STEP_KERNEL=native``'s error) or the mode is "eager"."""
    return _load_kernel(sys.modules[__name__])


def status() -> str:
    """What this process's fused RK4 steps ran on, for a run's provenance, without building anything:
    "compiled (FILE)", "eager (REASON)", or "not loaded" (no step asked for the kernel)."""
    return _status_of(sys.modules[__name__])


def available(y: Tensor, hidden: int, activation: str, params: list[Tensor | None], steps: int = 1) -> str | None:
    """Which compiled step takes this state: "lanes" (samples in vector lanes, lattices up to
    :data:`AUTO_MAX_SITES` sites, h ≤ :data:`MAX_HIDDEN`), "gemm" (larger lattices: the products by
    torch's BLAS gemm, :func:`blas`), or None (the eager step). Both need a CPU state of
    float32/float64 with parameters of the same dtype on the CPU, a known activation and the library
    loaded. ``native`` chooses as ``auto`` does but raises where the choice is unavailable. ``steps``:
    how many steps the answer is for (what :data:`counts` adds for a GEMM step)."""
    mode = kernel_mode()
    if mode == "eager":
        return None
    N = y.shape[1]
    if y.device.type != "cpu" or y.dtype not in _SUFFIX or activation not in ACTIVATIONS:
        return None
    if any(p is not None and (p.dtype != y.dtype or p.device.type != "cpu") for p in params):
        return None
    if N <= AUTO_MAX_SITES:
        if N > MAX_SITES or hidden > MAX_HIDDEN:
            return None
        return "lanes" if load() is not None else None
    if load() is None or (mode == "auto" and N > AUTO_GEMM_MAX_SITES):
        return None
    ptrs = blas()
    if ptrs is None:
        if mode == "native":
            raise RuntimeError(f"{_ENV}=native but the GEMM step is unavailable: {_blas_error}")
        return None
    low = _products.get() == "bfloat16" and y.dtype == torch.float32 and gemm_choice("bfloat16") is not None
    counts["bfloat16" if low else "full"] += steps
    if not low and y.dtype == torch.float32:
        counts["float32"] += steps
    return "gemm-bf16" if low else "gemm"


def rk4_forward(y: Tensor, logp: Tensor, W: Tensor, b0: Tensor | None, b1: Tensor | None, w0: Tensor,
                w1: Tensor | None, A0: Tensor | None, A1: Tensor | None, activation: str, t: float,
                dt: float) -> tuple[Tensor, Tensor]:
    """(y, ln p) after one lanes step from t to t + dt (contiguous tensors of one dtype; None: absent):
    :func:`integrate_forward` of one step without a frame."""
    y_out, logp_out, _ = integrate_forward("lanes", y, logp, None, None, W, b0, b1, w0, w1, A0, A1, activation, t,
                                           dt, 1, False)
    return y_out, logp_out


def rk4_backward(y: Tensor, gy_out: Tensor, glogp_out: Tensor, W: Tensor, b0: Tensor | None, b1: Tensor | None,
                 w0: Tensor, w1: Tensor | None, A0: Tensor | None, A1: Tensor | None, activation: str, t: float,
                 dt: float) -> tuple[Tensor | None, ...]:
    """(ȳ, W̄, b̄0, b̄1, w̄0, w̄1, Ā0, Ā1) of the lanes step from the cotangents of its outputs (None for
    an absent parameter; the cotangent of ln p passes through unchanged), recomputing the step's
    stages from its input y."""
    return integrate_backward("lanes", [y[None]], None, None, gy_out, glogp_out, W, b0, b1, w0, w1, A0, A1,
                              activation, t, dt, 1)


def gemm_forward(y: Tensor, logp: Tensor, W: Tensor, b0: Tensor | None, b1: Tensor | None, w0: Tensor,
                 w1: Tensor | None, A0: Tensor | None, A1: Tensor | None, activation: str, t: float, dt: float,
                 keep: bool, low: bool = False) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """:func:`rk4_forward` by the GEMM step; with ``keep``, also the four stage points (4, B, N) and
    pre-activations (4, B, H) that :func:`gemm_backward` reads (else None, None). ``low``: products of
    bfloat16 operands (float32 states only, see :func:`products`)."""
    y_out, logp_out, kept = integrate_forward("gemm-bf16" if low else "gemm", y, logp, None, None, W, b0, b1, w0, w1,
                                              A0, A1, activation, t, dt, 1, keep)
    S, Hs = (kept[0][0], kept[1][0]) if keep else (None, None)
    return y_out, logp_out, S, Hs


def gemm_backward(S: Tensor, Hs: Tensor, gy_out: Tensor, glogp_out: Tensor, W: Tensor, b0: Tensor | None,
                  b1: Tensor | None, w0: Tensor, w1: Tensor | None, A0: Tensor | None, A1: Tensor | None,
                  activation: str, t: float, dt: float, low: bool = False) -> tuple[Tensor | None, ...]:
    """:func:`rk4_backward` by the GEMM step, from the stage points and pre-activations its forward kept."""
    return integrate_backward("gemm-bf16" if low else "gemm", [S[None], Hs[None]], None, None, gy_out, glogp_out, W,
                              b0, b1, w0, w1, A0, A1, activation, t, dt, 1)


#: the precisions a GEMM step multiplies in, and the gemms that can do it: "mkl" (the BLAS torch calls:
#: sgemm_, or MKL's gemm_bf16bf16f32) or "native" (this library's AVX-512 tiles, gemm_tiles.h)
GEMM_MODES = ("auto", "mkl", "native")
#: the gemm each precision uses ("auto": see :func:`gemm_choice`); tests and benchmarks set it with :func:`gemm_as`
GEMM = {"float32": "auto", "bfloat16": "auto"}


def _native(precision: str) -> bool:
    """Whether the step library was built with its tiles for ``precision`` (AVX-512; AVX512-BF16 for bfloat16)."""
    lib = load()
    return lib is not None and (lib.lf_native_f32() if precision == "float32" else lib.lf_native_bf16()) == 1


@functools.lru_cache(maxsize=None)
def _cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def gemm_choice(precision: str, mode: str | None = None) -> str | None:
    """Which gemm a float32 GEMM step's products use in ``precision`` ("float32", or "bfloat16" inside
    :func:`products`) under ``mode`` (default ``GEMM[precision]``): "mkl", "native", or None where the one
    asked for is unavailable. "auto" prefers, and takes the other where the preferred one is missing:
    - bfloat16: MKL's gemm_bf16bf16f32 on CPUs with AMX tiles, the AVX512-BF16 tiles elsewhere (on AMD Zen 4
      MKL's bfloat16 gemm runs no faster than its sgemm, so that bfloat16 training was slower than float32);
    - float32: the tiles on AMD CPUs (Zen 4: a paper-configuration iteration 1.08-1.12× faster than with MKL's
      sgemm, 2026-12-02), MKL's sgemm elsewhere (not measured against the tiles on other CPUs yet).
    ``python benchmarks/ising_speed.py --bfloat16`` times an iteration with each gemm available. float64
    steps always take dgemm."""
    if precision not in GEMM:
        raise ValueError(f"precision must be one of {tuple(GEMM)}, got {precision!r}")
    mode = GEMM[precision] if mode is None else mode
    if mode not in GEMM_MODES:
        raise ValueError(f"a gemm must be one of {GEMM_MODES}, got {mode!r}")
    ptrs = blas() or {}
    have = {"mkl": (torch.float32 if precision == "float32" else "bfloat16") in ptrs, "native": _native(precision)}
    if mode != "auto":
        order = [mode]
    elif precision == "bfloat16":
        order = ["mkl", "native"] if "amx_bf16" in _cpu_flags().split() else ["native", "mkl"]
    else:
        order = ["native", "mkl"] if _cpu_vendor() == "AuthenticAMD" else ["mkl", "native"]
    return next((w for w in order if have[w]), None)


def gemm_choices(precision: str) -> list[str]:
    """The gemms available here for ``precision``, :func:`gemm_choice`'s under "auto" first."""
    have = [w for w in ("mkl", "native") if gemm_choice(precision, w) is not None]
    first = gemm_choice(precision, "auto")
    return sorted(have, key=lambda w: w != first)


@contextlib.contextmanager
def gemm_as(precision: str, which: str) -> Iterator[None]:
    """Inside the block, ``GEMM[precision]`` is ``which`` (for benchmarks and tests that compare the gemms)."""
    if precision not in GEMM:
        raise ValueError(f"precision must be one of {tuple(GEMM)}, got {precision!r}")
    if which not in GEMM_MODES:
        raise ValueError(f"a gemm must be one of {GEMM_MODES}, got {which!r}")
    previous, GEMM[precision] = GEMM[precision], which
    try:
        yield
    finally:
        GEMM[precision] = previous


def _gemm(x: Tensor) -> int:
    """The address of the gemm a GEMM step of x's dtype takes (float32: :func:`gemm_choice`)."""
    if x.dtype != torch.float32:
        return blas()[x.dtype]
    which = gemm_choice("float32")
    if which is None:
        raise ValueError(f"GEMM['float32'] = {GEMM['float32']!r}, which is unavailable here")
    return ctypes.cast(load().lf_gemm_f32, ctypes.c_void_p).value if which == "native" else blas()[x.dtype]


def _low(low: bool, x: Tensor) -> int | None:
    """The bfloat16 gemm's address for a float32 step with ``low`` products, else None (full precision)."""
    if not low:
        return None
    which = gemm_choice("bfloat16")
    if x.dtype != torch.float32 or which is None:
        raise ValueError("bfloat16 products need a float32 state and a bfloat16 gemm (gemm_choice('bfloat16'))")
    if which == "native":
        return ctypes.cast(load().lf_gemm_bf16_f32, ctypes.c_void_p).value
    return blas()["bfloat16"]


def signed_permutation(x: Tensor, perm: Tensor, sign: Tensor | None) -> Tensor | None:
    """y_bj = s_b x_{b, perm_bj} in one compiled pass (:func:`latticeflow.symmetry.signed_permutation`'s
    case of one element per sample), or None where it does not apply: not a CPU float32/float64 x of
    shape (B, N) with perm (B, N) int64 and sign None or B numbers of x's dtype, or no library
    (``LATTICEFLOW_STEP_KERNEL=eager`` included). Indices are trusted: the caller's tables are
    permutations."""
    if (x.dim() != 2 or x.device.type != "cpu" or x.dtype not in _SUFFIX or perm.shape != x.shape
            or perm.dtype != torch.int64 or perm.device.type != "cpu"):
        return None
    if sign is not None and (sign.numel() != x.shape[0] or sign.dtype != x.dtype or sign.device.type != "cpu"):
        return None
    lib = load()  # None under "eager"
    if lib is None:
        return None
    x, perm = x.contiguous(), perm.contiguous()
    sign = sign.contiguous() if sign is not None else None
    y = torch.empty_like(x)
    getattr(lib, f"lf_signed_perm_{_SUFFIX[x.dtype]}")(_ptr(x), _ptr(perm), _ptr(sign), x.shape[0], x.shape[1],
                                                       _ptr(y), torch.get_num_threads())
    return y


def integrate_forward(path: str, x: Tensor, logp: Tensor, perm: Tensor | None, sign: Tensor | None, W: Tensor,
                      b0: Tensor | None, b1: Tensor | None, w0: Tensor, w1: Tensor | None, A0: Tensor | None,
                      A1: Tensor | None, activation: str, t0: float, dt: float, n: int,
                      keep: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """n steps of ``path`` ("lanes", "gemm" or "gemm-bf16") from t0 in one call, step k in the frame
    (perm[k] (B, N) int64, sign[k] (B,); None: no frame). With ``keep``, also what the backward reads:
    each step's input (n, B, N) for the lanes step; each step's stage points (n, 4, B, N) and
    pre-activations (n, 4, B, H) for the GEMM step."""
    lib = load()
    B, N = x.shape
    H = W.shape[0]
    lanes = path == "lanes"
    x_out, logp_out = torch.empty_like(x), torch.empty_like(logp)
    kept = []
    if keep:
        kept = [x.new_empty(n, B, N)] if lanes else [x.new_empty(n, 4, B, N), x.new_empty(n, 4, B, H)]
    S, Hs = (kept + [None, None])[:2]
    f = getattr(lib, f"lf_mlp_rk4_integrate_forward_{_SUFFIX[x.dtype]}")
    f(0 if lanes else 1, None if lanes else _gemm(x), _low(path == "gemm-bf16", x), _ptr(x), _ptr(logp), B, N,
      H, _ptr(W), _ptr(b0), _ptr(b1), _ptr(w0), _ptr(w1), _ptr(A0), _ptr(A1), ACTIVATIONS[activation], float(t0),
      float(dt), int(n), _ptr(perm), _ptr(sign), _ptr(x_out), _ptr(logp_out), _ptr(S), _ptr(Hs),
      torch.get_num_threads())
    return x_out, logp_out, kept


def integrate_backward(path: str, kept: list[Tensor], perm: Tensor | None, sign: Tensor | None, gx_out: Tensor,
                       glogp_out: Tensor, W: Tensor, b0: Tensor | None, b1: Tensor | None, w0: Tensor,
                       w1: Tensor | None, A0: Tensor | None, A1: Tensor | None, activation: str, t0: float, dt: float,
                       n: int) -> tuple[Tensor | None, ...]:
    """The backward of :func:`integrate_forward` from what it kept: (x̄, W̄, b̄0, b̄1, w̄0, w̄1, Ā0, Ā1),
    the parameter gradients summed over the steps."""
    lib = load()
    B, N = gx_out.shape
    lanes = path == "lanes"
    S, Hs = (kept + [None])[:2]
    gx = torch.empty_like(gx_out)
    grads = [torch.empty_like(p) if p is not None else None for p in (W, b0, b1, w0, w1, A0, A1)]
    g = getattr(lib, f"lf_mlp_rk4_integrate_backward_{_SUFFIX[gx_out.dtype]}")
    g(0 if lanes else 1, None if lanes else _gemm(gx_out), _low(path == "gemm-bf16", gx_out), _ptr(S),
      _ptr(Hs), _ptr(perm), _ptr(sign), _ptr(gx_out), _ptr(glogp_out), B, N, W.shape[0], _ptr(W), _ptr(b0), _ptr(b1),
      _ptr(w0), _ptr(w1), _ptr(A0), _ptr(A1), ACTIVATIONS[activation], float(t0), float(dt), int(n), _ptr(gx),
      *[_ptr(q) for q in grads], torch.get_num_threads())
    return (gx, *grads)

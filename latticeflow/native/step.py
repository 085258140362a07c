"""Compiled CPU kernel: one fused RK4 step of the small-lattice drift (MLP + quadratic part).

On small lattices (the L=4 preset: N = 16 sites, h = 128 hidden units, batch 256) an eager RK4
step is about 340 tensor operators (85 per stage, forward and backward), each on a few thousand
numbers, and their dispatch, not the arithmetic, sets an iteration's cost. ``mlp_step.cpp``
computes the whole step, (y, ln p) at t → at t + dt for the drift of

    φ(y) = Σ_k w_k a(W_k·y + b_k) + ½ yᵀA y,       b, w, A linear in t,

and its backward (the cotangent of the step's input and every parameter gradient, recomputing
the four stages), for a block of 16 float32 (8 float64) samples in the lanes of one 64-byte vector.
It is built and cached like the conv kernel (:mod:`latticeflow.native`) and called through ctypes.

``LATTICEFLOW_STEP_KERNEL`` chooses: ``auto`` (the default: the kernel for CPU float32/float64
states on lattices of at most :data:`AUTO_MAX_SITES` sites, where it is faster than the eager
step, when it compiles), ``native`` (the kernel at any size up to its limits, or an error) or
``eager`` (never compile). Results agree with the eager step to rounding
(tests/test_native_step.py: float64 to 1e-12, the step, the flow and every gradient).

Symbols: B batch, N sites, H hidden units.
"""

from __future__ import annotations

import ctypes
import platform
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

from . import _ACT, _SUFFIX, KERNEL_MODES, _declare_kernel, _load_kernel, _mode_of, _ptr, _status_of

__all__ = ["AUTO_MAX_SITES", "KERNEL_MODES", "MAX_HIDDEN", "MAX_SITES", "available", "kernel_mode", "load",
           "rk4_backward", "rk4_forward", "status"]

_ENV = "LATTICEFLOW_STEP_KERNEL"
_SOURCE = Path(__file__).with_name("mlp_step.cpp")
ACTIVATIONS = _ACT  # the activation codes both kernels read (lanes.h)
#: the kernel's limits (mlp_step.cpp: NMAX, HMAX)
MAX_SITES, MAX_HIDDEN = 1024, 4096
#: ``auto`` takes lattices up to this many sites (L = 8): beyond, the eager step's matmuls win
AUTO_MAX_SITES = 64
#: gcc vectorises the activation loop 256 bits wide on some AVX-512 CPUs unless asked: ask (x86 only)
_FLAGS = ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_load_error: str | None = None


def kernel_mode() -> str:
    """``LATTICEFLOW_STEP_KERNEL``, read as :func:`latticeflow.native.kernel_mode` reads its own."""
    return _mode_of(_ENV)


def _declare(lib: ctypes.CDLL) -> None:
    p, i, d = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    _declare_kernel(lib, {"lf_mlp_rk4_forward": [p, p, i, i, i, p, p, p, p, p, p, p, i, d, d, p, p, i],
                          "lf_mlp_rk4_backward": [p, p, p, i, i, i, p, p, p, p, p, p, p, i, d, d, p, p, p, p, p, p, p,
                                                  p, i]},
                    {"lf_mlp_max_sites": MAX_SITES, "lf_mlp_max_hidden": MAX_HIDDEN})


def load() -> ctypes.CDLL | None:
    """The compiled step library, compiling it on first use; None when it cannot be built (the
    reason is kept for ``LATTICEFLOW_STEP_KERNEL=native``'s error) or the mode is "eager"."""
    return _load_kernel(sys.modules[__name__])


def status() -> str:
    """What this process's fused RK4 steps ran on, for a run's provenance, without building anything:
    "compiled (FILE)", "eager (REASON)", or "not loaded" (no step asked for the kernel)."""
    return _status_of(sys.modules[__name__])


def available(y: Tensor, hidden: int, activation: str, params: list[Tensor | None]) -> bool:
    """Whether the kernel takes this step: a CPU state of float32/float64 with parameters of the
    same dtype on the CPU, a known activation, N ≤ :data:`MAX_SITES` and h ≤ :data:`MAX_HIDDEN`
    (``auto``: N ≤ :data:`AUTO_MAX_SITES`), and the library loaded."""
    mode = kernel_mode()
    if mode == "eager":
        return False
    N = y.shape[1]
    if (y.device.type != "cpu" or y.dtype not in _SUFFIX or activation not in ACTIVATIONS or N > MAX_SITES
            or hidden > MAX_HIDDEN or (mode == "auto" and N > AUTO_MAX_SITES)):
        return False
    if any(p is not None and (p.dtype != y.dtype or p.device.type != "cpu") for p in params):
        return False
    return load() is not None


def rk4_forward(y: Tensor, logp: Tensor, W: Tensor, b0: Tensor | None, b1: Tensor | None, w0: Tensor,
                w1: Tensor | None, A0: Tensor | None, A1: Tensor | None, activation: str, t: float,
                dt: float) -> tuple[Tensor, Tensor]:
    """(y, ln p) after one RK4 step from t to t + dt (contiguous tensors of one dtype; None: absent)."""
    lib = load()
    B, N = y.shape
    y_out, logp_out = torch.empty_like(y), torch.empty_like(logp)
    f = getattr(lib, f"lf_mlp_rk4_forward_{_SUFFIX[y.dtype]}")
    f(_ptr(y), _ptr(logp), B, N, W.shape[0], _ptr(W), _ptr(b0), _ptr(b1), _ptr(w0), _ptr(w1), _ptr(A0), _ptr(A1),
      ACTIVATIONS[activation], float(t), float(dt), _ptr(y_out), _ptr(logp_out), torch.get_num_threads())
    return y_out, logp_out


def rk4_backward(y: Tensor, gy_out: Tensor, glogp_out: Tensor, W: Tensor, b0: Tensor | None, b1: Tensor | None,
                 w0: Tensor, w1: Tensor | None, A0: Tensor | None, A1: Tensor | None, activation: str, t: float,
                 dt: float) -> tuple[Tensor | None, ...]:
    """(ȳ, W̄, b̄0, b̄1, w̄0, w̄1, Ā0, Ā1) of the step from the cotangents of its outputs (None for
    an absent parameter; the cotangent of ln p passes through unchanged), recomputing the step's
    stages from y."""
    lib = load()
    B, N = y.shape
    gy = torch.empty_like(y)
    grads = [torch.empty_like(p) if p is not None else None for p in (W, b0, b1, w0, w1, A0, A1)]
    g = getattr(lib, f"lf_mlp_rk4_backward_{_SUFFIX[y.dtype]}")
    g(_ptr(y), _ptr(gy_out), _ptr(glogp_out), B, N, W.shape[0], _ptr(W), _ptr(b0), _ptr(b1), _ptr(w0), _ptr(w1),
      _ptr(A0), _ptr(A1), ACTIVATIONS[activation], float(t), float(dt), _ptr(gy), *[_ptr(q) for q in grads],
      torch.get_num_threads())
    return (gy, *grads)

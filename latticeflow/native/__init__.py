"""Compiled CPU kernels: the fused RK stage of the one-layer convolutional potential (here), and the
fused RK4 step of the small-lattice MLP + quadratic drift (:mod:`latticeflow.native.step`).

The eager direct convolution (``latticeflow.potentials.conv``) makes every elementwise step of
a stage a pass over C·N·B numbers (16·256·256 floats, 4 MB, at L=16 with the default batch), and
about fifteen such passes, not the arithmetic, set its cost. ``conv_stage.cpp`` does the same
stage one lattice site at a time for a block of samples held in the vector lanes, and its
backward recomputes the activations from x instead of reading them back. It is plain C++ over
raw pointers (no torch headers), compiled with the system's ``c++`` on first use (a few
seconds), cached by a hash of the source, the flags, the compiler and the CPU's flags, and
called through ``ctypes`` (which releases the GIL). It splits the batch over
``torch.get_num_threads()`` OpenMP threads: torch's own libgomp when torch uses one (the kernel
names the same ``libgomp.so.1``, which the loader finds already loaded), so the kernel and torch's
operators share one thread team instead of two teams competing for the cores.

``LATTICEFLOW_CONV_KERNEL`` chooses: ``auto`` (the default: the compiled kernel on CPU tensors
of float32/float64 when it compiles, else eager), ``native`` (the kernel or an error) or
``eager`` (never compile). The cache directory is ``$LATTICEFLOW_CACHE/native`` (default
``~/.cache/latticeflow/native``). The kernel and the eager path agree to rounding
(tests/test_native_conv.py: float64 to 1e-12, every output and every parameter gradient).

Symbols: B batch, N = L² sites, K2 = k² kernel offsets, J patch planes, C channels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import sys
import threading
import types
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

__all__ = ["KERNEL_MODES", "ConvTables", "available", "conv_backward", "conv_forward", "kernel_mode", "load", "status"]

KERNEL_MODES = ("auto", "native", "eager")
_ENV = "LATTICEFLOW_CONV_KERNEL"
_SOURCE = Path(__file__).with_name("conv_stage.cpp")
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_ACT = {"softplus": 0, "lncosh": 1, "tanh": 2}
_BASE_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC", "-std=c++17"]
_FLAGS: tuple[str, ...] = ()  # this kernel's own flags (none)
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_load_error: str | None = None


def kernel_mode() -> str:
    """``LATTICEFLOW_CONV_KERNEL`` ("auto" when unset).

    Raises:
        ValueError: set to something other than :data:`KERNEL_MODES`.
    """
    return _mode_of(_ENV)


def _mode_of(env: str) -> str:
    """The setting ``env`` names: one of :data:`KERNEL_MODES`, "auto" when unset."""
    mode = os.environ.get(env, "auto") or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"{env} must be one of {KERNEL_MODES}, got {mode!r}")
    return mode


@functools.lru_cache(maxsize=None)  # the CPU does not change within a process; a step asks per call
def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _cache_dir() -> Path:
    root = os.environ.get("LATTICEFLOW_CACHE") or Path.home() / ".cache" / "latticeflow"
    return Path(root) / "native"


def _build(cxx: str, path: Path = _SOURCE, flags: tuple[str, ...] = ()) -> Path:
    """Compile ``path`` (``conv_stage.cpp`` by default) with ``flags`` besides the common ones into a
    shared library in the cache, once per source, flags, compiler and CPU."""
    # the source and the headers beside it (lanes.h), which it includes
    source = b"".join([path.read_bytes(), *(h.read_bytes() for h in sorted(path.parent.glob("*.h")))])
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    # OpenMP (the libgomp torch has loaded, when it uses one) with glibc's vector exp, then without
    # either: the kernel is correct, only slower, in every variant
    attempts = [(["-fopenmp", "-DLF_SIMD_EXP"], ["-lmvec", "-lm"]), (["-fopenmp"], ["-lm"]), ([], ["-lm"])]
    key = hashlib.sha256(b"\0".join([source, " ".join([*_BASE_FLAGS, *flags]).encode(), repr(attempts).encode(),
                                     version.encode(), _cpu_flags().encode()])).hexdigest()[:16]
    out_dir = _cache_dir()
    target = out_dir / f"{path.stem}-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for defines, libs in attempts:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = [cxx, *_BASE_FLAGS, *flags, *defines, str(path), "-o", tmp, *libs]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode == 0:
            os.replace(tmp, target)  # atomic: a concurrent process sees no half-written library
            return target
        os.unlink(tmp)
        errors.append(done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"])
    raise RuntimeError(f"could not compile {path.name}: {errors}")


def _open(path: Path, declare: Callable[[ctypes.CDLL], None], flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build ``path`` with ``flags`` (or find it in the cache), load it and declare its functions.

    Raises:
        RuntimeError: no compiler, or it cannot compile; OSError: the library does not load.
    """
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++, g++ or $CXX) on PATH")
    lib = ctypes.CDLL(str(_build(cxx, path, flags)))
    declare(lib)
    return lib


def _declare_kernel(lib: ctypes.CDLL, functions: dict[str, list], limits: dict[str, int]) -> None:
    """Declare a kernel library's functions (each ``NAME_f32`` and ``NAME_f64`` takes ``functions[NAME]``
    and returns nothing) and check its compiled-in limits (``int NAME()`` each) against ``limits``.

    Raises:
        RuntimeError: a limit differs (the source and its Python side out of step).
    """
    for suffix in _SUFFIX.values():
        for name, argtypes in functions.items():
            f = getattr(lib, f"{name}_{suffix}")
            f.argtypes = argtypes
            f.restype = None
    for name, want in limits.items():
        f = getattr(lib, name)
        f.restype = ctypes.c_int
        if f() != want:
            raise RuntimeError(f"{Path(lib._name).name}: {name}() = {f()}, but the Python side expects {want}")


def _declare(lib: ctypes.CDLL) -> None:
    p, i = ctypes.c_void_p, ctypes.c_int
    _declare_kernel(lib, {"lf_conv_forward": [p, i, i, i, i, i, p, p, p, p, p, p, p, i, p, p, i],
                          "lf_conv_backward": [p, p, p, i, i, i, i, i, p, p, p, p, p, p, p, p, i, p, p, p, p, p, i]},
                    {"lf_conv_max_offsets": MAX_OFFSETS, "lf_conv_max_channels": MAX_CHANNELS})


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, compiling it on first use; None when it cannot be built (the
    reason is kept for ``LATTICEFLOW_CONV_KERNEL=native``'s error) or the mode is "eager"."""
    return _load_kernel(sys.modules[__name__])


def _load_kernel(mod: types.ModuleType) -> ctypes.CDLL | None:
    """``load()`` of a kernel module ``mod`` (this one, or latticeflow.native.step): its library in
    ``mod._lib`` (or the reason it could not be built in ``mod._load_error``) from ``mod._SOURCE``,
    ``mod._declare`` and ``mod._FLAGS``, under the setting ``mod._ENV``."""
    mode = _mode_of(mod._ENV)
    if mode == "eager":
        return None
    if mod._lib is not None:  # every RK stage asks: no lock once loaded
        return mod._lib
    with mod._lock:
        if mod._lib is None and mod._load_error is None:
            try:
                mod._lib = _open(mod._SOURCE, mod._declare, mod._FLAGS)
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                mod._load_error = str(e)
    if mod._lib is None and mode == "native":
        raise RuntimeError(f"{mod._ENV}=native but the kernel is unavailable: {mod._load_error}")
    return mod._lib


def status() -> str:
    """What this process's CPU conv stages ran on, for a run's provenance, without building anything:
    "compiled (FILE)", "eager (REASON)", or "not loaded" (no conv stage asked for the kernel)."""
    return _status_of(sys.modules[__name__])


def _status_of(mod: types.ModuleType) -> str:
    """``status()`` of a kernel module (see :func:`_load_kernel`)."""
    if mod._lib is not None:
        return f"compiled ({Path(mod._lib._name).name})"
    if _mode_of(mod._ENV) == "eager":
        return f"eager ({mod._ENV}=eager)"
    if mod._load_error is not None:
        return f"eager (kernel unavailable: {mod._load_error})"
    return "not loaded"


#: the kernel's limits (conv_stage.cpp: JMAX, CMAX)
MAX_OFFSETS, MAX_CHANNELS = 81, 64


def available(x: Tensor, k2: int, activation: str, channels: int) -> bool:
    """Whether the compiled stage takes this input: a CPU tensor of float32/float64, at most
    81 kernel offsets (k <= 9) and 64 channels, an activation it knows, and the library loaded."""
    if (x.device.type != "cpu" or x.dtype not in _SUFFIX or activation not in _ACT or k2 > MAX_OFFSETS
            or channels > MAX_CHANNELS):
        return False
    return load() is not None


class ConvTables:
    """The integer tables of a k×k stencil on the L×L torus that the kernel reads.

    The k² offsets d = (r, q) (row-major, displacement (r − p, q − p), p = k//2) are listed
    grouped by the patch plane they feed (``rows[d]``, stably sorted): ``order`` is that listing,
    ``start[j] .. start[j+1] − 1`` the positions of plane j's offsets. In that order, ``nbr[s, i]``
    is the site s + (d − p), ``nbm[s, i]`` the site s − (d − p), and ``coef(dtype)[i]`` the weight
    of offset d (the kernel basis; without one, every offset is its own plane with weight 1).
    """

    def __init__(self, L: int, k: int, rows: list[int] | None, coefs: list[float] | None) -> None:
        p = k // 2
        rows = list(range(k * k)) if rows is None else list(rows)
        coefs = [1.0] * (k * k) if coefs is None else list(coefs)
        order = sorted(range(k * k), key=lambda d: rows[d])
        i = torch.arange(L)[:, None, None]
        j = torch.arange(L)[None, :, None]
        r = torch.tensor([d // k - p for d in order])[None, None, :]
        q = torch.tensor([d % k - p for d in order])[None, None, :]
        self.nbr = (((i + r) % L) * L + (j + q) % L).reshape(L * L, k * k).to(torch.int32).contiguous()
        self.nbm = (((i - r) % L) * L + (j - q) % L).reshape(L * L, k * k).to(torch.int32).contiguous()
        self.J = max(rows) + 1
        counts = torch.bincount(torch.tensor(rows), minlength=self.J)
        self.start = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
        self.order = order
        self._coefs = [coefs[d] for d in order]
        self._coef: dict[torch.dtype, Tensor] = {}
        self.K2 = k * k

    def coef(self, dtype: torch.dtype) -> Tensor:
        """The offsets' weights in the grouped order, as ``dtype`` (made once per dtype)."""
        got = self._coef.get(dtype)
        if got is None:
            got = self._coef[dtype] = torch.tensor(self._coefs, dtype=dtype)
        return got


def _ptr(t: Tensor | None) -> int | None:
    """The tensor's data address for ctypes; None (a null pointer) for an absent tensor."""
    return None if t is None else t.data_ptr()


def conv_forward(x: Tensor, tables: ConvTables, A: Tensor, bias: Tensor, w: Tensor, activation: str
                 ) -> tuple[Tensor, Tensor]:
    """(grad (B, N), S (C, B)) of the one-layer stage: grad = ∇φ, S_cb = Σ_s a''(h_{c,s,b}).

    x (B, N), A (C, J), bias (C,), w (C,) contiguous, one dtype; see ``conv_stage.cpp``.
    """
    lib = load()
    B, N = x.shape
    C = A.shape[0]
    grad = torch.empty_like(x)
    S = x.new_empty(C, B)
    f = getattr(lib, f"lf_conv_forward_{_SUFFIX[x.dtype]}")
    f(_ptr(x), B, N, tables.K2, tables.J, C, _ptr(tables.nbr), _ptr(tables.nbm), _ptr(tables.start),
      _ptr(tables.coef(x.dtype)), _ptr(A), _ptr(bias), _ptr(w), _ACT[activation], _ptr(grad), _ptr(S),
      torch.get_num_threads())
    return grad, S


def conv_backward(x: Tensor, dG: Tensor, dL: Tensor, tables: ConvTables, A: Tensor, bias: Tensor, w: Tensor,
                  cvec: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx (B, N), P (C, J), M (C, J), db (C,), T (C,)) from the cotangents dG (B, N) of grad and
    dL (B,) of lap = cvec·S: dh = w⊙(A ẑ)⊙a'' + (cvec ⊗ dL)⊙a''', ẑ = patches(dG), P = Σ dh zᵀ,
    M = Σ a' ẑᵀ, db = Σ dh, T = Σ a'' dL, dx = fold(Aᵀ dh)."""
    lib = load()
    B, N = x.shape
    C, J = A.shape
    dx = torch.empty_like(x)
    g = getattr(lib, f"lf_conv_backward_{_SUFFIX[x.dtype]}")
    P, M, db, T = x.new_zeros(C, J), x.new_zeros(C, J), x.new_zeros(C), x.new_zeros(C)
    g(_ptr(x), _ptr(dG), _ptr(dL), B, N, tables.K2, tables.J, C, _ptr(tables.nbr), _ptr(tables.nbm),
      _ptr(tables.start), _ptr(tables.coef(x.dtype)), _ptr(A), _ptr(bias), _ptr(w), _ptr(cvec), _ACT[activation],
      _ptr(dx), _ptr(P), _ptr(M), _ptr(db), _ptr(T), torch.get_num_threads())
    return dx, P, M, db, T

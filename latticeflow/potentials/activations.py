"""Activations a(h) with the derivatives the potentials need, in one table.

The potentials' Laplacians need a, a' and a'' (the MLP's fused backward also a'''), all
elementwise on the pre-activations h:

    softplus:  a = ln(1 + e^h),   a' = σ(h),        a'' = σ(1 − σ),    a''' = σ(1 − σ)(1 − 2σ)
    lncosh:    a = ln cosh h,     a' = tanh h,      a'' = 1 − tanh²h,  a''' = −2 tanh h (1 − tanh²h)
    tanh:      a = tanh h,        a' = 1 − tanh²h,  a'' = −2 tanh h a', a''' = a'(6 tanh²h − 2)

ln cosh is the paper's activation ("Monge-Ampère Flow for Generative Modeling", Zhang, E,
Wang, arXiv:1809.10188, section 3) and, through :func:`log_cosh`, also the Ising model's
Hubbard-Stratonovich energy (``latticeflow.ising`` imports it from here): it is written once.

Tables:

- :data:`ACTIVATIONS`: name → a(h, value) returning (a(h) or None, a'(h), a''(h)).
- :data:`FUSED`: name → (base, derivatives) for the fused MLP drift: every derivative of a
  stage is computed from one saved "base" tensor, base(h) = σ(h) or tanh h.
- :data:`EVEN_ACTIVATIONS`: the names with a(−h) = a(h).

tanh is evaluated either by ``torch.tanh`` or as 2σ(2h) − 1 (:func:`tanh`, :func:`tanh_`): the
same function to rounding (2e-7 in float32). Which is faster depends on the CPU: on one machine of
this project torch's sigmoid form ran 4–5× faster than ``torch.tanh``, on another (with AMX) 3×
slower (``python benchmarks/activation_speed.py`` prints the ratio). :func:`tanh_via_sigmoid`
times both once per process, dtype and device type and takes the faster; the environment
variable ``LATTICEFLOW_TANH=torch`` or ``=sigmoid`` fixes the choice (for bitwise-reproducible
runs on one machine).

Symbols: h pre-activations (any shape), σ the logistic sigmoid.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "EVEN_ACTIVATIONS", "FUSED", "TANH_METHODS", "fused_forward", "log_cosh", "pre_scale", "tanh",
           "tanh_", "tanh_via_sigmoid"]

_LN2 = math.log(2.0)

#: a(h, value) -> (a(h) if value else None, a'(h), a''(h)).
Activation = Callable[[Tensor, bool], tuple[Tensor | None, Tensor, Tensor]]
#: derivatives(base, a'' or None) -> (a'(h), a''(h), a'''(h)).
Derivatives = Callable[[Tensor, "Tensor | None"], tuple[Tensor, Tensor, Tensor]]


def log_cosh(x: Tensor) -> Tensor:
    """ln cosh x without overflow: |x| + softplus(−2|x|) − ln 2.

    Args:
        x: any shape.

    Returns:
        ln cosh x, shape of x.
    """
    a = x.abs()
    return a + F.softplus(-2.0 * a) - _LN2


#: how tanh is computed, from the environment variable LATTICEFLOW_TANH: "auto" (the faster of
#: the two, timed once per process, dtype and device type), "torch" (``torch.tanh``) or "sigmoid"
#: (2σ(2h) − 1)
TANH_METHODS = ("auto", "torch", "sigmoid")
_TANH_ENV = "LATTICEFLOW_TANH"
#: (device type, dtype) -> whether 2σ(2h) − 1 was the faster on this machine (filled on first use)
_timed_choice: dict[tuple[str, torch.dtype], bool] = {}


def _sigmoid_form_is_faster(dtype: torch.dtype, rounds: int = 7) -> bool:
    """Time ``torch.tanh`` and 2σ(2h) − 1 on a (16, 16384) CPU tensor of ``dtype`` (the conv
    stage's plane at L=16 with half its batch), interleaved, with the current thread count; True
    when the sigmoid form's median is below 0.9 of tanh's (ties keep ``torch.tanh``). About 10 ms."""
    gen = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(16, 16384, generator=gen, dtype=dtype)
    out = torch.empty_like(x)
    runs = {"torch": lambda: torch.tanh(x, out=out),
            "sigmoid": lambda: tanh_(torch.mul(x, 2.0, out=out), doubled=True, via_sigmoid=True)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for f in runs.values():
            f()
        for _ in range(rounds):
            for k, f in runs.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return statistics.median(times["sigmoid"]) < 0.9 * statistics.median(times["torch"])


def tanh_via_sigmoid(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> bool:
    """Whether :func:`tanh` and :func:`tanh_` use 2σ(2h) − 1 (True) or ``torch.tanh`` here.

    Set by ``LATTICEFLOW_TANH`` ("torch", "sigmoid"; "auto" or unset: timed once per process,
    dtype and device type by :func:`_sigmoid_form_is_faster`; devices other than the CPU take
    ``torch.tanh``). The two agree to rounding, so the choice moves results by rounding only.

    Raises:
        ValueError: LATTICEFLOW_TANH is set to something else.
    """
    mode = os.environ.get(_TANH_ENV, "auto") or "auto"
    if mode == "torch":
        return False
    if mode == "sigmoid":
        return True
    if mode != "auto":
        raise ValueError(f"{_TANH_ENV} must be one of {TANH_METHODS}, got {mode!r}")
    kind = torch.device(device).type
    key = (kind, dtype)
    got = _timed_choice.get(key)
    if got is None:
        got = _timed_choice[key] = kind == "cpu" and _sigmoid_form_is_faster(dtype)
    return got


def tanh(h: Tensor) -> Tensor:
    """tanh h, out of place and differentiable (any shape), by ``torch.tanh`` or as 2σ(2h) − 1,
    whichever :func:`tanh_via_sigmoid` says is faster here.

    The sigmoid form equals ``torch.tanh`` to rounding: within 2e-7 in float32 and 4e-16 in
    float64 in absolute terms (tanh is bounded by 1; relative accuracy near h = 0 is not kept,
    and nothing here needs it): four cheap passes instead of one that is slow on some CPUs
    (``benchmarks/activation_speed.py``).
    """
    if not tanh_via_sigmoid(h.dtype, h.device):
        return torch.tanh(h)
    if torch.is_grad_enabled() and h.requires_grad:
        return torch.sigmoid(2.0 * h) * 2.0 - 1.0
    return tanh_(h * 2.0, doubled=True, via_sigmoid=True)


def tanh_(h: Tensor, doubled: bool = False, via_sigmoid: bool | None = None) -> Tensor:
    """:func:`tanh` in place on ``h`` (a fresh buffer nothing else reads; not for recorded ops).

    ``doubled=True`` says ``h`` already holds 2h (a matmul can produce it at no cost; the
    stages ask :func:`pre_scale` whether to). ``via_sigmoid`` forces the form (None: as
    :func:`tanh_via_sigmoid` says).
    """
    if via_sigmoid is None:
        via_sigmoid = tanh_via_sigmoid(h.dtype, h.device)
    if not via_sigmoid:
        return torch.tanh_(h.mul_(0.5) if doubled else h)
    if not doubled:
        h.mul_(2.0)
    return torch.sigmoid_(h).mul_(2.0).sub_(1.0)


# ---------------------------------------------------------------------- (a, a', a'')
def _softplus(h: Tensor, value: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    s = torch.sigmoid(h)
    # softplus' = σ, softplus'' = σ(1 − σ)
    return (F.softplus(h) if value else None), s, s - s * s


def _one_minus_square(t: Tensor) -> Tensor:
    """1 − t² as one fused op with one new tensor (differentiable).

    ``1.0 - t * t`` allocates two tensors of t's size, one of them a temporary; for the conv
    stage's 4 MB planes that pair of allocations cost 0.7–2.3 ms against 0.33 ms for this on the
    project's machine (1 thread; how much depends on the allocator's state, which a training loop
    does not control).
    """
    return torch.addcmul(t.new_ones(()), t, t, value=-1.0)


def _lncosh(h: Tensor, value: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    th = tanh(h)
    return (log_cosh(h) if value else None), th, _one_minus_square(th)


def _tanh(h: Tensor, value: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    th = tanh(h)
    d1 = _one_minus_square(th)
    return (th if value else None), d1, -2.0 * th * d1


#: name -> a(h, value) returning (a(h) or None, a'(h), a''(h)), all elementwise.
ACTIVATIONS: dict[str, Activation] = {
    "softplus": _softplus,
    "lncosh": _lncosh,
    "tanh": _tanh,
}
#: activations with a(−h) = a(h): with no bias they make the MLP/conv potentials Z2-even.
EVEN_ACTIVATIONS = ("lncosh",)


# ---------------------------------------------------------------------- fused: (a', a'', a''') from one base
# ``derivatives(base, d2)`` returns (a', a'', a''') reusing a'' = d2 when the forward pass saved
# it; every op is out of place so the same code serves the double-backward branch.
def _softplus_derivatives(s: Tensor, d2: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    if d2 is None:
        d2 = torch.addcmul(s, s, s, value=-1.0)  # σ(1 − σ)
    return s, d2, torch.addcmul(d2, s, d2, value=-2.0)  # σ(1−σ)(1−2σ)


def _lncosh_derivatives(th: Tensor, d2: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    if d2 is None:
        d2 = _one_minus_square(th)
    return th, d2, -2.0 * th * d2


def _tanh_derivatives(th: Tensor, d2: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    t2 = th * th
    d1 = 1.0 - t2
    if d2 is None:
        d2 = -2.0 * th * d1
    return d1, d2, d1 * (6.0 * t2 - 2.0)


#: name -> (base, derivatives): base(h) is the one tensor a stage of the fused MLP saves.
FUSED: dict[str, tuple[Callable[[Tensor], Tensor], Derivatives]] = {
    "softplus": (torch.sigmoid, _softplus_derivatives),
    "lncosh": (tanh, _lncosh_derivatives),
    "tanh": (tanh, _tanh_derivatives),
}


def pre_scale(activation: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> float:
    """The factor a fused stage's matmul applies to its pre-activations for :func:`fused_forward`:
    2 for the tanh-based activations when tanh is computed as 2σ(2h) − 1 (it starts from 2h;
    :func:`tanh_via_sigmoid`), else 1."""
    if activation == "softplus":
        return 1.0
    return 2.0 if tanh_via_sigmoid(dtype, device) else 1.0


def fused_forward(activation: str, h: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(base, a', a'') of a fused stage's forward pass, in place on ``h`` = scale · (pre-activations),
    a fresh buffer; the third derivative is left to the backward pass (``FUSED``). ``scale`` is the
    :func:`pre_scale` the stage's matmul applied (None: looked up for h's dtype and device), so a
    stage decides the tanh form once."""
    if activation == "softplus":  # a' = σ is the base itself
        base = torch.sigmoid_(h)
        return base, base, torch.addcmul(base, base, base, value=-1.0)
    doubled = tanh_via_sigmoid(h.dtype, h.device) if scale is None else scale == 2.0
    base = tanh_(h, doubled=doubled, via_sigmoid=doubled)
    if activation == "lncosh":  # a' = tanh is the base itself; a'' = 1 − tanh² in one pass (see _one_minus_square)
        return base, base, _one_minus_square(base)
    d1, d2, _ = FUSED[activation][1](base, None)
    return base, d1, d2

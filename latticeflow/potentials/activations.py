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

tanh is evaluated as 2σ(2h) − 1 (:func:`tanh`, :func:`tanh_`): the same function to rounding,
and torch's CPU sigmoid is several times faster than its tanh (``python
benchmarks/activation_speed.py`` prints the ratios; README, speed section).

Symbols: h pre-activations (any shape), σ the logistic sigmoid.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "EVEN_ACTIVATIONS", "FUSED", "fused_forward", "log_cosh", "pre_scale", "tanh", "tanh_"]

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


def tanh(h: Tensor) -> Tensor:
    """tanh h as 2σ(2h) − 1, out of place and differentiable (any shape).

    Equal to ``torch.tanh`` to rounding: within 2e-7 in float32 and 4e-16 in float64 in absolute
    terms (tanh is bounded by 1; relative accuracy near h = 0 is not kept, and nothing here needs
    it). Four cheap passes instead of one slow one: on this project's machine (torch 2.13, AVX512
    and AVX2 kernels alike) the sigmoid form runs 3–5× faster than ``torch.tanh``
    (``benchmarks/activation_speed.py``).
    """
    if torch.is_grad_enabled() and h.requires_grad:
        return torch.sigmoid(2.0 * h) * 2.0 - 1.0
    return tanh_(h * 2.0, doubled=True)


def tanh_(h: Tensor, doubled: bool = False) -> Tensor:
    """:func:`tanh` in place on ``h`` (a fresh buffer nothing else reads; not for recorded ops).

    ``doubled=True`` says ``h`` already holds 2h (a matmul can produce it at no cost).
    """
    if not doubled:
        h.mul_(2.0)
    return torch.sigmoid_(h).mul_(2.0).sub_(1.0)


# ---------------------------------------------------------------------- (a, a', a'')
def _softplus(h: Tensor, value: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    s = torch.sigmoid(h)
    # softplus' = σ, softplus'' = σ(1 − σ)
    return (F.softplus(h) if value else None), s, s - s * s


def _lncosh(h: Tensor, value: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    th = tanh(h)
    return (log_cosh(h) if value else None), th, 1.0 - th * th


def _tanh(h: Tensor, value: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    th = tanh(h)
    d1 = 1.0 - th * th
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
        d2 = 1.0 - th * th
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


def pre_scale(activation: str) -> float:
    """The factor a fused stage's matmul applies to its pre-activations for :func:`fused_forward`:
    2 for the tanh-based activations (tanh h = 2σ(2h) − 1 starts from 2h), 1 for softplus."""
    return 1.0 if activation == "softplus" else 2.0


def fused_forward(activation: str, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(base, a', a'') of a fused stage's forward pass, in place on ``h`` = pre_scale · (pre-activations),
    a fresh buffer; the third derivative is left to the backward pass (``FUSED``)."""
    if activation == "softplus":  # a' = σ is the base itself
        base = torch.sigmoid_(h)
        return base, base, torch.addcmul(base, base, base, value=-1.0)
    base = tanh_(h, doubled=True)
    if activation == "lncosh":  # a' = tanh is the base itself
        return base, base, 1.0 - base * base
    d1, d2, _ = FUSED[activation][1](base, None)
    return base, d1, d2

"""Argument checks shared by the public constructors.

Each helper validates one argument at the public boundary and raises an error that
quotes the received value and states what is expected (see STYLE.md).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor


def check_size(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is an integer >= ``minimum``.

    Raises:
        ValueError: ``value`` is not an integer or is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer() and not isinstance(value, bool):
            value = int(value)
        else:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
    return int(value)


def check_positive(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number > 0.

    Raises:
        ValueError: ``value`` is not a finite positive number.
    """
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {name}={value!r}")
    return float(value)


def check_finite(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {name}={value!r}")
    return float(value)


def check_fraction(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a real number strictly between 0 and 1.

    Raises:
        ValueError: ``value`` is not a number in the open interval (0, 1).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {name}={value!r}")
    return float(value)


#: names that stand for β_c = ½ ln(1 + √2)
BETA_NAMES = ("critical", "c", "beta_c")


def check_beta(beta: object, *, optional: bool = False) -> float | None:
    """Return an inverse temperature as a float: a finite number > 0, a numeric string (from a
    command line or a text file), or ``"critical"`` for β_c; None passes when ``optional``.

    Raises:
        ValueError: quoting the bad value.
    """
    if beta is None and optional:
        return None
    if isinstance(beta, str):
        if beta.lower() in BETA_NAMES:
            from .exact import CRITICAL_BETA

            return CRITICAL_BETA
        try:
            return check_positive("beta", float(beta))
        except ValueError:
            raise ValueError(f"beta must be a positive number or 'critical', got beta={beta!r}") from None
    try:
        return check_positive("beta", beta)
    except ValueError:
        if optional:
            raise ValueError(f"beta must be a finite number > 0 or None, got beta={beta!r}") from None
        raise


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``.

    Raises:
        ValueError: listing the valid names.
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {name}={value!r}")
    return value  # type: ignore[return-value]


def check_batch(x: object, dim: int, name: str = "x") -> Tensor:
    """Return ``x`` as a (B, dim) floating tensor (a single (dim,) vector gets a batch axis).

    Raises:
        TypeError: ``x`` is not a floating-point torch.Tensor.
        ValueError: ``x`` has the wrong shape.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, {dim}), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32 or float64), got dtype={x.dtype}")
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape (B, {dim}), got shape={tuple(x.shape)}")
    return x


def check_points(x: object, dim: int, dtype: torch.dtype, name: str = "x") -> Tensor:
    """Return ``x`` if it is a non-empty (B, dim) tensor of a flow's dtype (no conversion, no new axis).

    Raises:
        TypeError: ``x`` is not a torch.Tensor, or has another dtype than ``dtype``.
        ValueError: ``x`` does not have shape (B, dim) with B >= 1.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, {dim}), got {type(x).__name__}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must have the flow's dtype {dtype}, got dtype={x.dtype}; "
                        f"convert it with .to({dtype}) or the flow with flow.to({x.dtype})")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape (B, {dim}), got shape={tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one sample, got shape={tuple(x.shape)}")
    return x


def check_auto_or_positive(name: str, value: Any, none: bool = False) -> float | str | None:
    """``value`` as ``"auto"``, a finite float > 0, or (with ``none``) None; else a one-line ValueError."""
    if value == "auto" or (none and value is None):
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not (math.isfinite(v) and v > 0):
        allowed = "None, 'auto' or a finite number > 0" if none else "'auto' or a finite number > 0"
        raise ValueError(f"{name} must be {allowed}, got {name}={value!r}")
    return v


def check_grad_clip(value: Any) -> float | str | None:
    """``grad_clip``: None (no clipping), ``"auto"`` (see :meth:`latticeflow.train.VariationalTrainer.clip_limit`)
    or a finite number > 0; anything else is a one-line ValueError."""
    return check_auto_or_positive("grad_clip", value, none=True)

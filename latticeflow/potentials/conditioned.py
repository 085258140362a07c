"""A potential conditioned on a per-sample scalar c (e.g. β): φ(x, t; c) = Σ_j P_j(u(c)) φ_j(x, t).

One flow for a whole range of couplings [c_lo, c_hi]: the potential is a Legendre series in
u = (2c − c_lo − c_hi)/(c_hi − c_lo) ∈ [−1, 1] whose coefficients are potentials φ_j of any family
(quadratic, conv, MLP, sums of them). Gradient and Laplacian are the same series of the parts'
(exact, since the P_j do not depend on x), so the flow's ln p stays exact.

The condition rides in the noise token: :meth:`Conditioned.resample` reads the condition set by
:meth:`Conditioned.condition` (a context manager, per sample) and returns ``(c (B,), part tokens)``,
so a replayed or recomputed integration (gradient checkpointing, ``log_prob(..., noise=...)``)
uses the same c as the original one.

Symbols: B batch, N sites, k = degree + 1 parts.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_size
from .base import Evaluation, Noise, Potential, _check_potential

__all__ = ["Conditioned", "legendre_basis"]


def legendre_basis(u: Tensor, k: int) -> Tensor:
    """P_0(u) … P_{k−1}(u) by Bonnet's recursion, shape (B, k) for u of shape (B,)."""
    out = [torch.ones_like(u)]
    if k > 1:
        out.append(u)
    for n in range(1, k - 1):
        out.append(((2 * n + 1) * u * out[n] - n * out[n - 1]) / (n + 1))
    return torch.stack(out, dim=-1)


class Conditioned(Potential):
    """φ(x, t; c) = Σ_j P_j(u) φ_j(x, t), u = (2c − lo − hi)/(hi − lo): a potential for a range of c.

    Args:
        parts: the coefficient potentials φ_0 … φ_{k−1} (same ``dim``), e.g. k copies of one family.
        low, high: the range of the condition, low < high, both finite.

    Raises:
        ValueError: an empty ``parts``, parts of different dimensions or a bad range.
    """

    def __init__(self, parts: Sequence[Potential], low: float, high: float) -> None:
        super().__init__()
        parts = [_check_potential(p, f"parts[{i}]") for i, p in enumerate(parts)]
        if not parts:
            raise ValueError("Conditioned needs at least one part")
        dims = {p.dim for p in parts}
        if len(dims) != 1:
            raise ValueError(f"all parts must have the same dim, got {sorted(dims)}")
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"the condition's range must be finite with low < high, got [{low!r}, {high!r}]")
        self.dim = dims.pop()
        self.parts = nn.ModuleList(parts)
        self.low, self.high = float(low), float(high)
        self._condition: Tensor | None = None

    def extra_repr(self) -> str:
        return f"range=[{self.low:g}, {self.high:g}], degree={len(self.parts) - 1}"

    @property
    def stochastic(self) -> bool:
        return True  # the token carries the condition

    def check_range(self, c: Tensor | float, tol: float = 1e-12) -> None:
        """ValueError when a condition lies outside [low, high] (the series would extrapolate)."""
        c = torch.as_tensor(c, dtype=torch.float64)
        lo, hi = float(c.min()), float(c.max())
        if lo < self.low - tol or hi > self.high + tol:
            raise ValueError(f"condition {lo:g}..{hi:g} outside the trained range [{self.low:g}, {self.high:g}]: "
                             "a conditioned flow does not extrapolate")

    @contextlib.contextmanager
    def condition(self, c: Tensor | float) -> Iterator[None]:
        """Evaluate (sample, log_prob) at condition c inside the block: a number, or one per sample (B,).

        Raises:
            ValueError: c outside [low, high].
        """
        self.check_range(c)
        previous = self._condition
        self._condition = torch.as_tensor(c, dtype=torch.float64)
        try:
            yield
        finally:
            self._condition = previous

    def resample(self, batch: int, generator: torch.Generator | None = None) -> Noise:
        """``(c (batch,), tokens of the parts)`` with c from the enclosing :meth:`condition`.

        Raises:
            RuntimeError: outside a :meth:`condition` block.
        """
        batch = check_size("batch", batch)
        if self._condition is None:
            raise RuntimeError("a conditioned potential needs its condition: evaluate inside "
                               "potential.condition(beta) (or use latticeflow.conditioned.at_beta)")
        c = self._condition.reshape(-1)
        if c.numel() == 1:
            c = c.expand(batch)
        elif c.numel() != batch:
            raise ValueError(f"the condition holds {c.numel()} values for a batch of {batch}")
        return c, tuple(p.resample(batch, generator) for p in self.parts)

    def basis(self, c: Tensor) -> Tensor:
        """P_j(u(c)), shape (B, k)."""
        u = (2.0 * c - (self.low + self.high)) / (self.high - self.low)
        return legendre_basis(u, len(self.parts))

    def _evaluate(self, x: Tensor, t: Tensor | float, noise: Noise, value: bool) -> Evaluation:
        if noise is None:
            noise = self.resample(x.shape[0])
        c, tokens = noise
        w = self.basis(c.to(x)).to(x)  # (B, k)
        phi = grad = lap = None
        for j, (p, token) in enumerate(zip(self.parts, tokens)):
            f, g, lp = p._evaluate(x, t, token, value)
            wj = w[:, j]
            if grad is None:
                grad, lap = wj[:, None] * g, wj * lp
                phi = wj * f if value else None
            else:
                grad, lap = grad + wj[:, None] * g, lap + wj * lp
                if value:
                    phi = phi + wj * f
        return phi, grad, lap

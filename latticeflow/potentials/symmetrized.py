"""Group averages of a potential: φ(x) = (1/|G|) Σ_g φ̃(g·x), exact or by random elements.

"Monge-Ampère Flow for Generative Modeling" (Zhang, E, Wang, arXiv:1809.10188), section 4.2.
A group element acts as (g·x)_i = s_g x_{p_g(i)} (``latticeflow.symmetry``, which holds the
one implementation of the action, :func:`~latticeflow.symmetry.signed_permutation` and
:func:`~latticeflow.symmetry.all_images`); the action is orthogonal, so

    ∇φ(x) = (1/|G|) Σ_g gᵀ ∇φ̃(g·x),      ∇²φ(x) = (1/|G|) Σ_g ∇²φ̃(g·x).

The paper's random scheme draws one element per sample per integration step
(:class:`SymmetryDraw`), so each step integrates the smooth potential φ̃(g_b·x) and the
symmetry holds on average; the exact mode evaluates all G images.

Symbols: B batch, N = dim sites, G group order, t time.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._checks import check_choice, check_size
from ..symmetry import all_images, signed_permutation
from .base import Evaluation, Frame, Noise, Potential, _check_potential, _is_scalar_time

__all__ = ["SymmetryDraw", "Symmetrized"]


def _check_group(group: object, dim: int) -> Any:
    """The group, if it has a SymmetryGroup's tables and acts on ``dim`` sites; TypeError or ValueError otherwise."""
    for attr in ("row_tables", "rows_from", "signs", "order", "dim"):  # not perms: a FactoredGroup builds them
        if not hasattr(group, attr):
            raise TypeError(f"group must be a SymmetryGroup, got {type(group).__name__}; build one with "
                            "translation_group(lattice), space_group(lattice), ...")
    if group.dim != dim:
        raise ValueError(f"group acts on dim={group.dim} sites but the potential has dim={dim}")
    return group


class SymmetryDraw(NamedTuple):
    """The random group elements of one integration step (token of :class:`Symmetrized`).

    Attributes:
        index: element per sample, LongTensor (B,) (what to store to replay a run).
        perm: perms[index], (B, N): (g·x)_i = sign · x[perm[i]].
        inverse_perm: inverse_perms[index], (B, N).
        sign: signs[index] as a column (B, 1), or None when the group has no spin flip.
    """

    index: Tensor
    perm: Tensor
    inverse_perm: Tensor
    sign: Tensor | None


class Symmetrized(Potential):
    """Group average φ(x) = (1/|G|) Σ_g φ̃(g·x) of a potential φ̃ (paper section 4.2).

    A group element acts as (g·x)_i = s_g x_{p_g(i)}; the action is orthogonal, so
    ∇φ(x) = (1/|G|) Σ_g gᵀ ∇φ̃(g·x) and ∇²φ(x) = (1/|G|) Σ_g ∇²φ̃(g·x).

    Modes:

    - ``"exact"``: all G images in one batched call of φ̃ on (B·G, N) and an average; the
      gradients come back with one gather through ``inverse_perms``. Memory O(B·G·N).
    - ``"random"``: the paper's scheme. The noise token is a :class:`SymmetryDraw`: one group
      element per sample (index (B,) from torch.randint) with its rows of the (G, N) tables
      gathered once; a plain LongTensor of indices is accepted too. The flow draws it once
      per integration step, so each step integrates one smooth potential φ̃(g_b·x) and the
      symmetry holds on average. Each evaluation is then two gathers of shape (B, N). Without
      a token every call draws a fresh one from the global RNG. If φ̃ is itself stochastic
      the token is the pair (draw, token of φ̃).

    Args:
        potential: φ̃.
        group: a SymmetryGroup (latticeflow.symmetry) with perms, inverse_perms, signs.
        mode: ``"random"`` or ``"exact"``.
    """

    def __init__(self, potential: Potential, group: Any, mode: str = "random") -> None:
        super().__init__()
        self.potential = _check_potential(potential)
        self.dim = potential.dim
        group = _check_group(group, self.dim)
        self.mode = check_choice("mode", mode, ("random", "exact"))
        self.order = int(group.order)
        self.group_name = getattr(group, "name", "group")
        # what the group's rows_from reads, shared with the group, not copied (read-only here): the (G, N)
        # tables of a dense group, or the small factors of a FactoredGroup (the dense space group × Z2
        # tables take 4 GiB at L=64). The exact mode needs the whole tables.
        self._rows_from, self._row_spec = group.rows_from, tuple(group.row_spec)
        self._row_names = []
        for name, table in group.row_tables().items():
            self.register_buffer(f"rows_{name}", table.long(), persistent=False)
            self._row_names.append(name)
        if self.mode == "exact":
            self.register_buffer("perms", group.perms.long(), persistent=False)
            self.register_buffer("inverse_perms", group.inverse_perms.long(), persistent=False)
        self.register_buffer("signs", group.signs.clone().to(torch.get_default_dtype()), persistent=False)
        self._has_flip = bool((group.signs < 0).any())
        self._group = group if self.mode == "random" else None  # for frame_group (a plain attribute)

    def extra_repr(self) -> str:
        return f"group={self.group_name!r} (order {self.order}), mode={self.mode!r}"

    @property
    def stochastic(self) -> bool:
        return self.mode == "random" or self.potential.stochastic

    def _draw(self, index: Tensor, check: bool = True) -> "SymmetryDraw":
        """Gather the tables for element indices (B,); ``check=False`` skips the range check,
        which costs two device synchronisations, for indices drawn by :meth:`resample`."""
        if not isinstance(index, Tensor) or index.dtype != torch.long or index.dim() != 1:
            raise TypeError("symmetry noise must be a SymmetryDraw or a LongTensor (B,) of element indices, "
                            f"got {index!r}")
        if check and index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.order):
            raise ValueError(f"symmetry indices must lie in [0, {self.order}), got range "
                             f"[{int(index.min())}, {int(index.max())}]")
        sign = self.signs.index_select(0, index)[:, None] if self._has_flip else None
        tables = {name: getattr(self, f"rows_{name}") for name in self._row_names}
        perm, inverse = self._rows_from(tables, self._row_spec, index)
        return SymmetryDraw(index, perm, inverse, sign)

    def resample(self, batch: int, generator: torch.Generator | None = None) -> Noise:
        """One group element per sample (random mode) as a :class:`SymmetryDraw`.

        Paired with φ̃'s token, ``(draw, token)``, if φ̃ is stochastic; None in exact mode
        with a deterministic φ̃.
        """
        batch = check_size("batch", batch)
        draw = None
        if self.mode == "random":
            draw = self._draw(torch.randint(self.order, (batch,), generator=generator, device=self.signs.device),
                              check=False)
        if self.potential.stochastic:
            return draw, self.potential.resample(batch if self.mode == "random" else batch * self.order, generator)
        return draw

    def frame_group(self) -> Any:
        """The group (random mode): its element g_b fixes φ(x) = φ̃(g_b·x) for a step."""
        return self._group

    def step_frame(self, noise: Noise) -> Frame | None:
        """Random mode: φ(x) = φ̃(g_b·x) for the whole step, so step in y = g_b·x with φ̃.

        Two gathers per step instead of two per RK stage.
        """
        if self.mode != "random" or noise is None:
            return None
        inner = None
        if self.potential.stochastic:
            noise, inner = noise
        draw = noise if isinstance(noise, SymmetryDraw) else self._draw(noise)
        perm, inv, sign = draw.perm, draw.inverse_perm, draw.sign

        def into(x: Tensor) -> Tensor:
            s = sign if sign is None or sign.dtype == x.dtype else sign.to(x.dtype)
            return signed_permutation(x, perm, inv, s)

        def out_of(y: Tensor) -> Tensor:
            s = sign if sign is None or sign.dtype == y.dtype else sign.to(y.dtype)
            return signed_permutation(y, inv, perm, s)

        into.signed = (perm, sign)  # type: ignore[attr-defined]  # for a whole-integration step (latticeflow.flow)
        return into, out_of, self.potential, inner

    def _evaluate(self, x: Tensor, t: Tensor | float, noise: Noise, value: bool) -> Evaluation:
        B, N = x.shape
        inner = None
        if self.potential.stochastic:
            noise, inner = noise if noise is not None else (None, None)
        signs = self.signs if self.signs.dtype == x.dtype else self.signs.to(x.dtype)
        if self.mode == "exact":
            G = self.order
            flip = signs if self._has_flip else None
            y = all_images(x, self.perms, flip)  # (B, G, N)
            if not _is_scalar_time(t):
                t = t.repeat_interleave(G)
            phi, gy, lap = self.potential._evaluate(y.reshape(B * G, N), t, inner, value)
            # gᵀ ∇φ̃(g·x): image g pulled back by its inverse permutation, (B, G, N)
            gx = signed_permutation(gy.reshape(B, G, N), self.inverse_perms, self.perms,
                                    None if flip is None else flip[:, None])
            grad = gx.mean(1)
            lap = lap.reshape(B, G).mean(1)
            if value:
                phi = phi.reshape(B, G).mean(1)
            return phi, grad, lap
        draw = self._draw(torch.randint(self.order, (B,), device=x.device), check=False) if noise is None else noise
        if not isinstance(draw, SymmetryDraw):
            draw = self._draw(draw)
        if draw.index.shape != (B,):
            raise ValueError(f"symmetry index must have shape ({B},), got shape={tuple(draw.index.shape)}")
        sign = draw.sign
        if sign is not None and sign.dtype != x.dtype:
            sign = sign.to(x.dtype)
        y = signed_permutation(x, draw.perm, draw.inverse_perm, sign)
        phi, gy, lap = self.potential._evaluate(y, t, inner, value)
        grad = signed_permutation(gy, draw.inverse_perm, draw.perm, sign)
        return phi, grad, lap

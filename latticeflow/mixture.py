"""Exact symmetrisation of a flow's density by a group mixture.

A symmetric potential makes the flow equivariant, but an equivariant map from a unimodal
Gaussian has to tear the Gaussian apart to reach a target with well-separated symmetric
modes (the two magnetised phases of the Ising model near and below β_c), and reverse-KL
training then tends to settle in one mode: the variational free energy misses up to
ln|G| nats and the importance weights have an ESS near 1/|G|. The mixture

    p_G(x) = (1/|G|) Σ_{g∈G} p(g·x)

is exactly G-invariant, is a normalised density for any flow p (each g is measure
preserving), and needs one backward integration per extra element to evaluate. Sampling
draws x ~ p and a uniform g, returning g·x; since p_G(g·x) = p_G(x) and the target is
invariant, training on x directly gives the same loss.

For Z2 (|G| = 2) this doubles the cost of an iteration and removes the mode-collapse
error of up to ln 2 nats; for larger groups the cost grows with |G|, so keep G small
(Z2, D4, or D4×Z2) and impose the rest through the potential.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ._checks import check_points
from .flow import MongeAmpereFlow, WrappedFlow, frozen_parameters
from .symmetry import SymmetryGroup, all_images, signed_permutation

__all__ = ["SymmetricMixture"]


class SymmetricMixture(WrappedFlow):
    """The mixture (1/|G|) Σ_g p(g·x) of a flow's density over a small group.

    Implements :class:`~latticeflow.flow.Flow`: ``sample`` and ``log_prob`` are those of the
    mixture p_G; ``forward_map``, ``inverse_map``, ``draw_noise``, ``stochastic``, ``n_steps``,
    ``dtype`` and ``device`` are those of the underlying flow (see :meth:`forward_map`). Group
    elements act through the group action of :mod:`latticeflow.symmetry` (the functions behind
    :meth:`SymmetryGroup.act <latticeflow.symmetry.SymmetryGroup.act>`), with the group's tables
    held as buffers so that they follow the module to its device.

    Args:
        flow: the underlying :class:`MongeAmpereFlow` (its parameters are this module's).
        group: a :class:`SymmetryGroup` acting on the flow's N sites; |G| extra cost.

    Attributes:
        flow: the underlying flow.
        group: the group G.
        dim: N.
        order: |G|.
        group_name: G's name.

    Example:
        >>> from latticeflow.potentials import MLPPotential
        >>> from latticeflow.symmetry import spin_flip_group
        >>> mix = SymmetricMixture(MongeAmpereFlow(MLPPotential(4, 8), n_steps=4), spin_flip_group(4))
        >>> x, logp = mix.sample(3)
        >>> torch.allclose(mix.log_prob(-x), logp, atol=1e-4)
        True
    """

    def __init__(self, flow: MongeAmpereFlow, group: SymmetryGroup) -> None:
        if not isinstance(flow, MongeAmpereFlow):
            raise TypeError(f"flow must be a MongeAmpereFlow, got {type(flow).__name__}")
        if not isinstance(group, SymmetryGroup):
            raise TypeError(f"group must be a SymmetryGroup, got {type(group).__name__}; "
                            "build one with spin_flip_group(N) or point_group(lattice)")
        if group.dim != flow.dim:
            raise ValueError(f"group acts on N={group.dim} sites but the flow has dimension {flow.dim}")
        super().__init__(flow)  # n_steps, dtype, device, noise: the flow's (WrappedFlow)
        self.group = group
        self.order = group.order
        self.group_name = group.name
        self.register_buffer("perms", group.perms.clone(), persistent=False)
        self.register_buffer("inverse_perms", group.inverse_perms.clone(), persistent=False)
        self.register_buffer("signs", group.signs.clone(), persistent=False)
        # the elements other than the identity, whose images need a density evaluation when
        # ln p(x) itself is already known (sampling)
        others = [g for g in range(group.order) if g != group.identity]
        self.register_buffer("others", torch.tensor(others, dtype=torch.long), persistent=False)
        #: the underlying flow's noise tokens of the latest :meth:`sample` (None when deterministic)
        self.sample_noise: list[Any] | None = None

    # ------------------------------------------------------------------ the underlying flow's maps
    def forward_map(self, z: Tensor, generator: torch.Generator | None = None, noise: Sequence[Any] | None = None,
                    callback: Callable[[int, float, Tensor, Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
        """The underlying flow's transport x = f(z), with delta_logp = ln p(x) − ln p(z) of the flow's p.

        p_G is a mixture, not the image of N(0, I) under one map, so it has no transport of
        its own; f is a bijection onto the same space, which is all that latent-space methods
        need (latent HMC is exact for any bijection, and for a G-invariant target f and g∘f
        are equally good). ``delta_logp`` is therefore the flow's, not ln p_G(x) − ln p(z).

        Args:
            z, generator, noise, callback: as in :meth:`MongeAmpereFlow.forward_map`.

        Returns:
            x: shape (B, N); delta_logp: shape (B,).
        """
        return self.flow.forward_map(z, generator=generator, noise=noise, callback=callback)

    def inverse_map(self, x: Tensor, generator: torch.Generator | None = None, noise: Sequence[Any] | None = None,
                    callback: Callable[[int, float, Tensor, Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
        """The underlying flow's inverse transport (see :meth:`forward_map`); returns z (B, N), delta_logp (B,)."""
        return self.flow.inverse_map(x, generator=generator, noise=noise, callback=callback)

    # ------------------------------------------------------------------ the mixture density
    def _mixture_logp(self, x: Tensor, logp_x: Tensor | None, noise: Any = None) -> Tensor:
        B = x.shape[0]
        images = all_images(x, self.perms, self.signs.to(x.dtype)).transpose(0, 1)  # (G, B, N), every g·x
        if logp_x is not None:
            images = images[self.others]  # ln p(x) of the identity is known
        n_images = images.shape[0]
        if n_images == 0:
            terms = logp_x[None]
        else:
            # replay the same per-step noise for every image so each term is the same density p_ξ
            rep = None if noise is None else [_repeat_token(t, n_images) for t in noise]
            lp = self.flow.log_prob(images.reshape(-1, x.shape[1]), noise=rep).reshape(n_images, B)
            terms = lp if logp_x is None else torch.cat([logp_x[None], lp])
        return torch.logsumexp(terms, dim=0) - math.log(self.order)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw x ~ p_G with ln p_G(x); differentiable in the parameters (reparametrised).

        Args:
            n: number of samples.
            generator: drives the flow's sample and noise, then the uniform element g.

        Returns:
            x: shape (n, N); logp: shape (n,).
        """
        x, logp = self.flow.sample(n, generator=generator)
        noise = self.flow.last_noise
        self.sample_noise = noise
        logp_mix = self._mixture_logp(x, logp, noise)
        g = torch.randint(self.order, (n,), generator=generator, device=x.device)
        x = signed_permutation(x, self.perms[g], self.inverse_perms[g], self.signs.to(x.dtype)[g][:, None])
        return x, logp_mix

    def log_prob(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """ln p_G(x) = logsumexp_g ln p(g·x) − ln|G|.

        Args:
            x: points, shape (B, N), in the flow's dtype.
            generator: drives the per-step noise of a stochastic flow (one draw shared by all images).

        Returns:
            Log densities, shape (B,).
        """
        x = check_points(x, self.dim, self.dtype, "x")
        noise = self.flow.draw_noise(x.shape[0], generator)
        return self._mixture_logp(x, None, noise)

    def score(self, x: Tensor, noise: Sequence[Any] | None = None) -> tuple[Tensor, Tensor]:
        """ln p_G(x) and ∇ₓ ln p_G(x) at fixed parameters (see :meth:`MongeAmpereFlow.score`).

        Args:
            x: points, shape (B, N).
            noise: the underlying flow's per-step tokens of the sample (``mixture.sample_noise``),
                shared by all images of a row; required for a stochastic flow.

        Returns:
            (ln p_G(x) (B,), ∇ₓ ln p_G(x) (B, N)), both detached.
        """
        x = check_points(x, self.dim, self.dtype, "x")
        if self.stochastic and noise is None:
            raise ValueError("a stochastic flow needs the sample's noise tokens (noise=mixture.sample_noise) "
                             "for its score")
        noise = None if noise is None else self.flow.draw_noise(x.shape[0], noise=noise)
        with torch.enable_grad(), frozen_parameters(self):
            xr = x.detach().requires_grad_(True)
            lp = self._mixture_logp(xr, None, noise)
            (g,) = torch.autograd.grad(lp.sum(), xr)
        return lp.detach(), g

    def forward(self, x: Tensor) -> Tensor:
        """Alias for :meth:`log_prob` (so ``mixture(x)`` is a log density)."""
        return self.log_prob(x)


def _repeat_token(token: Any, times: int) -> Any:
    """Repeat a per-sample noise token along the batch (for the |G|−1 stacked images)."""
    if token is None:
        return None
    if isinstance(token, Tensor):
        return token.repeat(times, *([1] * (token.dim() - 1)))
    if isinstance(token, tuple) and hasattr(token, "_fields"):  # a NamedTuple such as SymmetryDraw
        return type(token)(*(_repeat_token(t, times) for t in token))
    if isinstance(token, (tuple, list)):
        return type(token)(_repeat_token(t, times) for t in token)
    if hasattr(token, "repeat"):
        return token.repeat(times)
    raise TypeError(f"cannot repeat a noise token of type {type(token).__name__}")

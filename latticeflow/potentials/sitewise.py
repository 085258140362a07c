"""A sum of one-variable potentials, one per site: φ(x, t) = Σ_i Σ_k w_ik(t) a(v_ik x_i + c_ik(t)).

"Monge-Ampère Flow for Generative Modeling" (Zhang, E, Wang, arXiv:1809.10188) builds φ from a
one-hidden-layer network of the whole configuration (section 3). Its gradient field lies in the
span of the h weight rows, so a per-variable change of the marginals (the first thing a density
model of images learns: pixels in logit space are far from Gaussian one by one) costs it many
units. A separable potential does exactly that and nothing else, at O(B·N·K) per evaluation:
with z_ik = v_ik x_i + c_ik,

    ∂φ/∂x_i = Σ_k w_ik a'(z_ik) v_ik,      ∇²φ = Σ_i Σ_k w_ik a''(z_ik) v_ik²,

the Hessian being diagonal. Each site's map is the flow of its own 1-D potential (a monotone
transport of that coordinate at every instant), and the sum with another potential
(:class:`~latticeflow.potentials.SumPotential`) lets the other part spend its units on the
correlations.

``shared=True`` ties (v, c, w) across sites (translation invariance, for lattice models: the
on-site part of φ⁴'s action is such a sum); ``shared=False`` gives every site its own, for
images. Time dependence (``time_dependent=True``) is linear: w(t) = w + t·u, c(t) = c + t·d,
both u and d starting at zero.

Initialisation: v ~ U(0.5, 2) with random signs and c ~ U(−3, 3) (kinks spread over a few
standard deviations of unit-variance inputs, as whitened images or HS fields are), w ~
init_scale·N(0, 1) (1e-3: within ~1e-3 of the identity map; 0: exactly the identity).

Symbols: B batch, N = dim sites, K units per site, t time.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from .._checks import check_choice, check_size
from .activations import ACTIVATIONS
from .base import Evaluation, Noise, Potential, _at_time, _initial_readout

__all__ = ["SitewisePotential"]


class SitewisePotential(Potential):
    """φ(x, t) = Σ_i Σ_k w_ik(t) a(v_ik x_i + c_ik(t)), a separable potential (see the module docstring).

    Args:
        dim: N, number of variables (sites or pixels).
        units: K, one-variable units per site.
        activation: ``"softplus"``, ``"lncosh"`` or ``"tanh"``.
        shared: one set of (v, c, w) for every site (translation invariant) instead of one per site.
        time_dependent: w and c depend linearly on t.
        init_scale: standard deviation of the initial readout w, or ``"linear"`` (U(±1/√K)).

    Example:
        >>> pot = SitewisePotential(16, units=4)
        >>> phi, grad, lap = pot(torch.randn(3, 16))
        >>> grad.shape, lap.shape
        (torch.Size([3, 16]), torch.Size([3]))
    """

    def __init__(self, dim: int, units: int = 8, activation: str = "softplus", shared: bool = False,
                 time_dependent: bool = False, init_scale: float | str = 1e-3) -> None:
        super().__init__()
        self.dim = check_size("dim", dim)
        self.units = check_size("units", units)
        self.activation = check_choice("activation", activation, tuple(ACTIVATIONS))
        self._act = ACTIVATIONS[activation]
        self.shared = bool(shared)
        self.time_dependent = bool(time_dependent)
        S, K = (1 if self.shared else self.dim), self.units
        sign = torch.where(torch.rand(S, K) < 0.5, -1.0, 1.0)
        self.scale = nn.Parameter(sign * torch.empty(S, K).uniform_(0.5, 2.0))
        self.shift = nn.Parameter(torch.empty(S, K).uniform_(-3.0, 3.0))
        self.readout = nn.Parameter(_initial_readout(S * K, init_scale).reshape(S, K))
        self.readout_t = nn.Parameter(torch.zeros(S, K)) if self.time_dependent else None
        self.shift_t = nn.Parameter(torch.zeros(S, K)) if self.time_dependent else None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, units={self.units}, activation={self.activation!r}, shared={self.shared}, "
                f"time_dependent={self.time_dependent}")

    def _evaluate(self, x: Tensor, t: Tensor | float, noise: Noise, value: bool) -> Evaluation:
        v = self.scale
        c = _at_time(self.shift, self.shift_t, t)
        w = _at_time(self.readout, self.readout_t, t)
        z = torch.addcmul(c, x[..., None], v)  # (B, N, K)
        a, a1, a2 = self._act(z, value)
        wv = w * v
        grad = (a1 * wv).sum(-1)  # (B, N)
        c2 = wv * v  # w v², the Laplacian's weights
        if c2.dim() == 3:  # per-sample times: (B, S, K)
            lap = (a2 * c2).sum((-2, -1))
        elif self.shared:  # Σ_k (Σ_i a''_ik) w_k v_k²
            lap = a2.sum(1) @ c2[0]
        else:  # one matrix-vector product instead of a (B, N, K) product and its reduction
            lap = a2.reshape(a2.shape[0], -1) @ c2.reshape(-1)
        phi = (a * w).sum((-2, -1)) if value else None
        return phi, grad, lap

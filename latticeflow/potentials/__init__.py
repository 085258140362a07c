"""Scalar potentials φ(x, t) with exact gradients and Laplacians for the Monge-Ampère flow.

"Monge-Ampère Flow for Generative Modeling" (Zhang, E, Wang, arXiv:1809.10188) moves samples
along dx/dt = ∇φ (eq. 2) while their log density changes as d ln p/dt = −∇²φ (eq. 3). Every
potential here therefore returns the triple (φ (B,), ∇φ (B, N), ∇²φ (B,)), exact unless
stated, and differentiable with respect to its parameters (training backpropagates through
the integrator). The Laplacians are analytic and cost about as much as the gradient: no
Hessians, no dense (h, h) or (N, N) matrices where a vector does.

One module per idea:

- ``base``: the :class:`Potential` interface (noise tokens, shared constants, step frames)
  and :class:`SumPotential` (also written ``p + q``).
- ``activations``: the activation table with its derivatives (:data:`ACTIVATIONS`), and the
  library's one ln cosh.
- ``mlp``: :class:`MLPPotential`, the paper's φ(x) = Σ_k w_k a(W_k·x + b_k) (section 3), with
  its fused drift (one custom autograd node per RK stage).
- ``quadratic``: :class:`QuadraticPotential`, ½ xᵀAx + bᵀx with a translation- (and D4-)
  invariant circulant A applied by FFT; its flow is exactly Gaussian (appendix A).
- ``conv``: :class:`ConvPotential`, translation-invariant convolutional potential on the
  periodic L×L lattice (direct matmuls on patches, or by FFT for large kernels), optionally D4- and
  Z2-invariant.
- ``autograd``: :class:`AutogradPotential`, any scalar network, gradient by autograd,
  Laplacian exact (N Hessian-vector products) or by Hutchinson's estimator.
- ``symmetrized``: :class:`Symmetrized`, the group average φ(x) = (1/|G|) Σ_g φ̃(g·x) of
  section 4.2, exact or with one random group element per sample per integration step.

The D4 geometry (rotations and reflections, displacement orbits, kernel averages) and the
group action on configurations live in ``latticeflow.symmetry``.

Stochastic potentials (random symmetrisation, Hutchinson probes) are stateless: their
randomness is an explicit ``noise`` token drawn by :meth:`Potential.resample` and passed to
:meth:`Potential.forward`; with ``noise=None`` they draw a fresh one from the global RNG at
each call. The flow draws one token per integration step and can replay it (see flow.py).

Performance notes (the integrator calls a potential 4·n_steps times per sample): inside
:meth:`Potential.shared_constants`, which the flow opens around every integration, parameter-
only quantities (‖W_k‖², FFT of the quadratic kernel, symmetrised conv kernels) are computed
once; the MLP stage is one custom autograd node; a random symmetry element is applied to
the state once per step (:meth:`Potential.step_frame`) rather than twice per RK stage.

Symbols: B batch, N = dim sites, h hidden units, C channels, G group order, t time.
"""

from .activations import ACTIVATIONS, EVEN_ACTIVATIONS
from .autograd import AutogradPotential
from .base import Evaluation, Frame, Noise, Potential, SumPotential, _check_potential
from .conv import ConvPotential
from .mlp import MLPPotential
from .quadratic import QuadraticPotential
from .sitewise import SitewisePotential
from .symmetrized import SymmetryDraw, Symmetrized

__all__ = [
    "ACTIVATIONS",
    "Potential",
    "MLPPotential",
    "QuadraticPotential",
    "ConvPotential",
    "SitewisePotential",
    "AutogradPotential",
    "SumPotential",
    "Symmetrized",
    "SymmetryDraw",
]

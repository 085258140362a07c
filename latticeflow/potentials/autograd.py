"""A potential from any scalar network, differentiated by autograd.

For a module φ(x) (or φ(x, t)) the gradient ∇φ comes from autograd, and the Laplacian either
exactly, ∇²φ = Σ_i e_iᵀ H e_i (N Hessian-vector products, for small N), or by Hutchinson's
unbiased estimator ∇²φ ≈ (1/P) Σ_p vₚᵀ H vₚ with Rademacher probes vₚ (the potential's noise
token). The result plugs into the flow of "Monge-Ampère Flow for Generative Modeling" (Zhang,
E, Wang, arXiv:1809.10188, eqs. 2–3) like the analytic families.

Symbols: B batch, N = dim, P probes, H the Hessian of φ.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_size
from .base import Evaluation, Noise, Potential

__all__ = ["AutogradPotential"]


class AutogradPotential(Potential):
    """Any scalar network φ(x) (or φ(x, t)), differentiated by autograd.

    The gradient comes from torch.autograd.grad with create_graph=True (so the Laplacian and
    training can differentiate it again). The Laplacian is either

    - ``"exact"``: the Hessian diagonal from N batched Hessian-vector products against the
      identity basis (``is_grads_batched``, a vmap; a loop if the module does not vmap).
      O(N) backward passes: for small N.
    - ``"hutchinson"``: Hutchinson's estimator ∇²φ ≈ (1/P) Σ_p vₚᵀ H vₚ with P = n_probes
      Rademacher vectors. Unbiased, with variance 2 Σ_{i≠j} H_ij² / P per sample, so it is
      noisy: fine for training, not for exact log densities. The probes are this potential's
      noise token (drawn by :meth:`resample`, one set per integration step).

    Args:
        module: maps x (B, N) to φ (B,), or (x, t) to φ with ``time_dependent=True``.
        dim: N; inferred from ``module.dim`` or the first nn.Linear when omitted.
        laplacian: ``"exact"`` or ``"hutchinson"``.
        n_probes: P, Rademacher probes per evaluation (Hutchinson only).
        time_dependent: call ``module(x, t)`` instead of ``module(x)``.
    """

    def __init__(self, module: nn.Module, dim: int | None = None, laplacian: str = "exact", n_probes: int = 1,
                 time_dependent: bool = False) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        if dim is None:
            dim = getattr(module, "dim", None)
            if dim is None:
                lin = next((m for m in module.modules() if isinstance(m, nn.Linear)), None)
                if lin is None:
                    raise ValueError("cannot infer the input dimension of module; pass dim=N")
                dim = lin.in_features
        self.dim = check_size("dim", dim)
        self.laplacian = check_choice("laplacian", laplacian, ("exact", "hutchinson"))
        self.n_probes = check_size("n_probes", n_probes)
        self.time_dependent = bool(time_dependent)

    @property
    def stochastic(self) -> bool:
        return self.laplacian == "hutchinson"

    def resample(self, batch: int, generator: torch.Generator | None = None) -> Tensor | None:
        """Rademacher probes, shape (n_probes, batch, N), int8 ±1 (Hutchinson); None if exact."""
        if self.laplacian != "hutchinson":
            return None
        batch = check_size("batch", batch)
        dev = next((p.device for p in self.parameters()), None)
        r = torch.randint(0, 2, (self.n_probes, batch, self.dim), generator=generator, dtype=torch.int8, device=dev)
        return 2 * r - 1

    def _evaluate(self, x: Tensor, t: Tensor | float, noise: Noise, value: bool) -> Evaluation:
        outer = torch.is_grad_enabled()
        B, N = x.shape
        with torch.enable_grad():
            xi = x if x.requires_grad else x.detach().requires_grad_(True)
            phi = self.module(xi, t) if self.time_dependent else self.module(xi)
            if phi.shape != (B,):
                raise ValueError(f"module must return shape ({B},), got shape={tuple(phi.shape)}")
            (grad,) = torch.autograd.grad(phi.sum(), xi, create_graph=True)
            if self.laplacian == "exact":
                probes = torch.eye(N, dtype=x.dtype, device=x.device)[:, None, :].expand(N, B, N)
            else:
                probes = self.resample(B) if noise is None else noise
                if probes.shape[1:] != (B, N):
                    raise ValueError(f"Hutchinson probes must have shape (P, {B}, {N}), got {tuple(probes.shape)}")
                probes = probes.to(x.dtype)
            hv = self._hvp(grad, xi, probes, outer)  # (P, B, N)
            if self.laplacian == "exact":
                lap = torch.diagonal(hv, dim1=0, dim2=2).sum(-1)
            else:
                lap = (hv * probes).sum(-1).mean(0)
        if not outer:
            phi, grad, lap = phi.detach(), grad.detach(), lap.detach()
        return (phi if value else None), grad, lap

    @staticmethod
    def _hvp(grad: Tensor, x: Tensor, probes: Tensor, create_graph: bool) -> Tensor:
        """Hessian-vector products H v for probes (P, B, N) from grad = ∇φ(x) (B, N); returns (P, B, N)."""
        try:
            (hv,) = torch.autograd.grad(grad, x, grad_outputs=probes, is_grads_batched=True,
                                        create_graph=create_graph, retain_graph=True)
            return hv
        except RuntimeError:  # the module does not support vmap: one backward pass per probe
            rows = [torch.autograd.grad(grad, x, grad_outputs=v, create_graph=create_graph, retain_graph=True)[0]
                    for v in probes]
            return torch.stack(rows)

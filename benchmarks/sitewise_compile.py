"""Would torch.compile pay for the separable (sitewise) potential? Eager against compiled, same run.

One RK stage of :class:`~latticeflow.potentials.SitewisePotential`'s hot path (∇φ and ∇²φ of
Σ_i Σ_k w_ik softplus(v_ik y_i + c_ik), then a backward through both), at the MNIST race's shape
(B = 100 images, D = 784 pixels, K = 8 units), in eager mode and compiled by torch.compile
(inductor, a C++ compiler needed), one thread: milliseconds per stage, the compile time, and the
largest difference between the two (float32 rounding). The README's MNIST section quotes it
(not adopted: compiled functions do not support double backward).

    python benchmarks/sitewise_compile.py
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

B, D, K = 100, 784, 8


def terms(x: Tensor, v: Tensor, c: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """(∇φ (B, D), ∇²φ (B,)) of the separable softplus potential, as SitewisePotential computes them."""
    s = torch.sigmoid(torch.addcmul(c, x[..., None], v))
    wv = w * v
    return (s * wv).sum(-1), ((s - s * s) * (wv * v)).sum((-2, -1))


def per_stage(f, args: tuple[Tensor, ...], n: int = 20) -> float:
    """Seconds of one forward and backward of ``f`` (after three warm-up calls)."""
    for _ in range(3):
        g, lap = f(*args)
        (g.sum() + lap.sum()).backward()
    t0 = time.perf_counter()
    for _ in range(n):
        g, lap = f(*args)
        (g.sum() + lap.sum()).backward()
    return (time.perf_counter() - t0) / n


def main() -> dict[str, float]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    args = (torch.randn(B, D, requires_grad=True), *(torch.randn(D, K, requires_grad=True) for _ in range(3)))
    eager = per_stage(terms, args)
    t0 = time.perf_counter()
    compiled_terms = torch.compile(terms, dynamic=False)
    compiled_terms(*args)
    compile_s = time.perf_counter() - t0
    compiled = per_stage(compiled_terms, args)
    with torch.no_grad():
        (g1, l1), (g2, l2) = terms(*args), compiled_terms(*args)
    diff = max(float((g1 - g2).abs().max()), float((l1 - l2).abs().max()))
    print(f"one RK stage, forward + backward, B={B} D={D} K={K}, 1 thread: eager {1e3 * eager:.1f} ms, compiled "
          f"{1e3 * compiled:.1f} ms ({eager / compiled:.2f}x), compile {compile_s:.0f} s, largest difference {diff:.1e}")
    return {"eager_s": eager, "compiled_s": compiled, "compile_s": compile_s, "max_diff": diff}


if __name__ == "__main__":
    main()

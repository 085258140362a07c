"""Speed of variational training on the Ising model (paper configuration) and its scaling with L.

Prints seconds per training iteration (sample a batch by integrating forward, reverse-KL
loss, backward, Adam step), the achieved GFLOP/s of the potential's arithmetic against a
torch matmul of the same shape measured in the same run, the ratio to the original public
implementation (wangleiphy/MongeAmpereFlow, ~3.2 s per iteration on a 2-core machine), the
top operators from torch.profiler, and time per iteration for L = 8, 16, 32, 64.

    python benchmarks/ising_speed.py                 # paper configuration + scaling
    python benchmarks/ising_speed.py --iters 5 --sizes 8 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import latticeflow as lf  # noqa: E402
from latticeflow.build import build_flow  # noqa: E402

ORIGINAL_S_PER_ITER = 3.2  # wangleiphy/MongeAmpereFlow, paper configuration, 2-core CPU (issue 3)


def mlp_flops(B: int, N: int, h: int) -> float:
    """FLOPs of one MLP potential evaluation (value, gradient, Laplacian) for a batch.

    h = xWᵀ (2BNh), grad = (a'(h)w) W (2BNh), Laplacian (a''(h)w)·‖W‖² (2Bh) + elementwise.
    """
    return 4.0 * B * N * h + 10.0 * B * h


def time_iteration(config: dict, L: int, batch: int, iters: int, warmup: int = 2) -> float:
    target = lf.ising(L, lf.critical)
    torch.manual_seed(0)
    flow = build_flow(config, target.lattice)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        x, logp = flow.sample(batch, generator=gen)
        loss = (logp + target.energy(x)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) / iters


def matmul_gflops(B: int, N: int, h: int, dtype: torch.dtype, reps: int = 50) -> float:
    a, w = torch.randn(B, N, dtype=dtype), torch.randn(h, N, dtype=dtype)
    for _ in range(5):
        a @ w.T
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ w.T
    return 2.0 * B * N * h * reps / (time.perf_counter() - t0) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--sizes", type=int, nargs="*", default=[8, 16, 32, 64])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators")
    p.add_argument("--parts", action="store_true",
                   help="also time the driver's default flow (quadratic + conv + MLP, T=1, batch 256) at L=8 and 16, "
                        "part by part")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, h, steps = 64, 512, 50
    # the flow this benchmark has always timed (softplus MLP with biases, time-independent), spelled out
    paper = {"potential": "mlp", "hidden": h, "n_steps": steps, "step_size": 0.1, "symmetrize": "random",
             "group": "space+z2", "dtype": "float32", "activation": "softplus", "bias": True,
             "time_dependent": False, "init_scale": 1e-3}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    s = time_iteration(paper, 16, B, args.iters)
    N = 256
    # forward: 4 RK stages per step; backward of the pathwise gradient costs about 2x forward
    flops = 3 * 4 * steps * mlp_flops(B, N, h)
    mm = matmul_gflops(B, N, h, torch.float32)
    print(f"paper configuration (L=16, h={h}, {steps} RK4 steps, batch {B}, random space-group×Z2 symmetrisation):")
    print(f"  {s:.3f} s/iteration = {1 / s:.2f} it/s; speed-up vs original {ORIGINAL_S_PER_ITER} s: "
          f"{ORIGINAL_S_PER_ITER / s:.1f}x")
    print(f"  achieved {flops / s / 1e9:.1f} GFLOP/s (model FLOPs {flops / 1e9:.2f} GFLOP/iter); "
          f"matmul ({B}x{N})@({N}x{h}) in this run: {mm:.1f} GFLOP/s; ratio {flops / s / 1e9 / mm:.2f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        target = lf.ising(16, lf.critical)
        flow = build_flow(paper, target.lattice)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            x, logp = flow.sample(B)
            (logp + target.energy(x)).mean().backward()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print("scaling with L (same configuration, hidden 512):")
    print("  L      N   s/iter   ratio to L=16")
    for L in args.sizes:
        t = time_iteration(paper, L, B, max(2, args.iters // 2), warmup=1)
        print(f"  {L:3d} {L * L:6d} {t:8.3f}   {t / s:6.2f}")
    if args.parts:
        time_parts(args.iters)


def time_parts(iters: int) -> None:
    """s/iteration of the driver's default flow and of its parts alone (what each part costs)."""
    from latticeflow.config import ISING_DEFAULT

    DEFAULT = ISING_DEFAULT.to_dict()

    print("the driver's default flow (T=1: 10 RK4 steps, batch 256, random space-group×Z2), s/iteration:")
    print("  L   quadratic  quadratic+mlp  quadratic+conv  quadratic+conv+mlp")
    for L, h in ((8, 256), (16, 512)):
        row = [time_iteration({**DEFAULT, "L": L, "kernel_size": None, "hidden": h, "potential": pot}, L, DEFAULT["batch"], max(2, iters // 2), warmup=1)
               for pot in ("quadratic", "quadratic+mlp", "quadratic+conv", "quadratic+conv+mlp")]
        print(f"  {L:2d}  " + "  ".join(f"{t:12.3f}" for t in row))


if __name__ == "__main__":
    main()

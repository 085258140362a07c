"""The compiled small-lattice RK4 step against the eager step, in one process (issue 16).

For each flow given as ``models/ising.py`` flags (default: the L=4 preset of
``benchmarks/ising_accuracy.py --runs l4min``, and the same flow at L=6 and L=8), times whole
training iterations (sample, reverse-KL loss, backward, Adam step) with
``LATTICEFLOW_STEP_KERNEL=native`` and ``=eager`` set around their calls, interleaved round by
round with the same thread count, and prints the ratio of medians eager / compiled. With
``--kernel`` it also times one step of the kernel alone, forward and backward, and prints its
arithmetic rate (the multiply-adds of the stages' W·y and Σ_k c_k W_k products) against a
matmul of the flow's (B×N)@(N×H) shape measured in the same run.

Ratios only; absolute times depend on the machine and its load.

    python benchmarks/step_speed.py                        # 1 thread
    python benchmarks/step_speed.py --threads 2 --kernel
    python benchmarks/step_speed.py --flags "--L 4 --hidden 256 --potential quadratic+mlp"
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from latticeflow.native import step as native_step  # noqa: E402

import ising_speed  # noqa: E402

DEFAULT_FLAGS = ["--L 4 --hidden 128 --potential quadratic+mlp", "--L 6 --hidden 128 --potential quadratic+mlp",
                 "--L 8 --hidden 128 --potential quadratic+mlp"]


def with_mode(run: Callable[[], None], mode: str) -> Callable[[], None]:
    """``run`` with LATTICEFLOW_STEP_KERNEL=``mode`` set around each call (restored after)."""
    def call() -> None:
        with mock.patch.dict(os.environ, {"LATTICEFLOW_STEP_KERNEL": mode}):
            run()

    return call


def kernel_rate(B: int, N: int, H: int, reps: int = 20) -> tuple[float, float]:
    """(the kernel's GFLOP/s over one step forward + backward, a (B×N)@(N×H) matmul's GFLOP/s), float32.

    Counted: per stage forward W·y and Σ_k c_k W_k (2·2BNH FLOPs); the backward makes the four
    stages again and per stage W·v̄, Σ_k e_k W_k and W̄'s two outer products (4·2BNH).
    """
    g = torch.Generator().manual_seed(0)
    r = lambda *s: 0.3 * torch.randn(*s, generator=g)  # noqa: E731
    y, logp, W = r(B, N), torch.zeros(B), r(H, N)
    args = (W, r(H), r(H), r(H), r(H), r(N, N), r(N, N), "lncosh", 0.2, 0.1)

    def step() -> None:
        native_step.rk4_forward(y, logp, *args)
        native_step.rk4_backward(y, y, logp, *args)

    def timed(f: Callable[[], object]) -> float:
        for _ in range(3):
            f()
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        return (time.perf_counter() - t0) / reps

    flops = 4 * (2 * 2 + 2 * 4 + 2 * 2) * B * N * H  # 4 stages: forward, remade, backward
    x, w = r(B, N), r(N, H)
    return flops / timed(step) / 1e9, 2 * B * N * H / timed(lambda: x @ w) / 1e9


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Print the ratios; return eager / compiled per flow."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flags", action="append", default=None, metavar="FLAGS",
                   help="a flow as models/ising.py flags (repeatable; default: L=4, 6, 8 with quadratic + MLP h=128)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=10, help="iterations of each side per round")
    p.add_argument("--kernel", action="store_true", help="also time the kernel alone against a matmul")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if native_step.load() is None:
        print(f"the compiled step is unavailable here: {native_step._load_error or 'switched off'}; nothing to compare")
        return {}
    ratios = {}
    for flags in args.flags or DEFAULT_FLAGS:
        config, L = ising_speed.driver_config(flags)
        steps = {mode: with_mode(ising_speed.make_step(config, L, config["batch"]), mode) for mode in ("native", "eager")}
        times = ising_speed.time_interleaved(steps, rounds=args.rounds, iters=args.iters)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratios[flags] = med["eager"] / med["native"]
        print(f"{flags} (batch {config['batch']}): eager {med['eager'] * 1e3:.2f} ms, compiled "
              f"{med['native'] * 1e3:.2f} ms per iteration; eager / compiled {ratios[flags]:.2f}")
        if args.kernel:
            kern, mm = kernel_rate(config["batch"], L * L, config["hidden"])
            print(f"  the kernel alone: {kern:.1f} GFLOP/s over a step forward and backward; matmul "
                  f"({config['batch']}x{L * L})@({L * L}x{config['hidden']}) in this run {mm:.1f} GFLOP/s; "
                  f"ratio {kern / mm:.2f}")
    return ratios


if __name__ == "__main__":
    main()

"""Can reduced precision buy speed on this CPU? Matmul GFLOP/s in float32, bfloat16 and float16.

Issue 16 asks for reduced-precision training (bfloat16 matmuls, every reported estimate in
float32/64) where it pays. It pays only where the hardware multiplies bfloat16 faster than
float32 (AMX tiles, or oneDNN's AVX512-BF16 kernels): this script measures, in one run and with
the same threads, the matmuls of the paper's Ising configuration (L=16, h=512, batch 64, so
(64·k × 256) @ (256 × 512) and its transposes) and of the default L=16 flow (batch 256), in each
dtype, and prints the ratio to float32. A ratio below 1 means reduced precision would slow
training down here, whatever it does on other machines.

With ``--iterations``, it also times whole training iterations (sample, reverse-KL loss, backward,
Adam step) of the paper configuration and of the driver's default flow at L=16, interleaved, with
float32 tensors throughout and ``torch.set_float32_matmul_precision("highest")`` against
``"medium"``, which lets oneDNN compute float32 matmuls in bfloat16 (float32 in, float32 out, no
conversion code in the flow); it prints the ratio and the largest change of one matmul, which shows
whether "medium" took effect on this CPU.

    python benchmarks/matmul_precision.py                 # 1 and 2 threads
    python benchmarks/matmul_precision.py --threads 2 --repeats 200
    python benchmarks/matmul_precision.py --iterations --threads 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from latticeflow.cli import positive_int  # noqa: E402

#: (m, k, n): x @ Wᵀ, (a'⊙w) @ W and the backward's transposes in the paper configuration
#: (B = 64, N = 256, h = 512) and the default L=16 flow's MLP (B = 256, h = 256)
SHAPES = ((64, 256, 512), (64, 512, 256), (512, 64, 256), (256, 256, 256), (256, 256, 512))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gflops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    """Achieved GFLOP/s of (m × k) @ (k × n) in ``dtype`` (best of three timed blocks)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(5):
        a @ b
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, (time.perf_counter() - t0) / repeats)
    return 2.0 * m * k * n / best / 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2], help="torch threads [1 2]")
    p.add_argument("--repeats", type=positive_int, default=100, help="matmuls per timed block [100]")
    p.add_argument("--iterations", action="store_true",
                   help="also time whole training iterations with float32 matmul precision 'highest' against 'medium'")
    p.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds of --iterations [5]")
    return p.parse_args(argv)


def medium_changes_matmuls() -> float:
    """Largest |difference| of one (64×256)@(256×512) float32 matmul under precision "medium" against
    "highest" (0: "medium" computes in float32 here, so it cannot change speed either)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=gen), torch.randn(256, 512, generator=gen)
    with float32_matmul_precision("highest"):
        ref = a @ b
    with float32_matmul_precision("medium"):
        got = a @ b
    return float((got - ref).abs().max())


@contextlib.contextmanager
def float32_matmul_precision(precision: str) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` inside the block, the previous setting after."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def iteration_ratios(rounds: int, iters: int = 1, L: int = 16) -> dict[str, float]:
    """Median s/iteration "highest" ÷ "medium" for the paper configuration and the driver's default at L,
    timed interleaved in this process (above 1: "medium" is faster)."""
    from benchmarks.ising_speed import PAPER_BATCH, driver_config, make_step, paper_config, time_interleaved

    flows = {"paper configuration": (paper_config(), PAPER_BATCH)}
    cfg, _ = driver_config(f"--L {L}")
    flows[f"driver's default at L={L}"] = (cfg, cfg["batch"] or 256)
    ratios = {}
    for name, (config, batch) in flows.items():
        steps = {}
        for precision in ("highest", "medium"):
            step = make_step(config, L, batch)

            def run(step: Callable[[], None] = step, precision: str = precision) -> None:
                with float32_matmul_precision(precision):
                    step()

            steps[precision] = run
        t = time_interleaved(steps, rounds, iters)
        ratios[name] = statistics.median(t["highest"]) / statistics.median(t["medium"])
        print(f"  {name}: highest {statistics.median(t['highest']):.3f} s/iter, medium "
              f"{statistics.median(t['medium']):.3f} s/iter, highest ÷ medium {ratios[name]:.2f}")
    return ratios


def main(argv: list[str] | None = None) -> dict[tuple[int, tuple[int, int, int]], dict[str, float]]:
    args = parse_args(argv)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}; load average "
          f"{os.getloadavg()[0]:.2f} (ratios are same-run, the GFLOP/s are not portable)")
    results = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for shape in SHAPES:
            rates = {name: gflops(*shape, dt, args.repeats) for name, dt in DTYPES.items()}
            results[(threads, shape)] = rates
            ratios = ", ".join(f"{n} {r:6.1f} GFLOP/s ({r / rates['float32']:.2f}×)" for n, r in rates.items())
            print(f"{threads} thread(s), ({shape[0]}×{shape[1]}) @ ({shape[1]}×{shape[2]}): {ratios}")
        if args.iterations:
            print(f"{threads} thread(s), whole training iterations, float32 matmul precision 'highest' ÷ 'medium' "
                  f"(medium changes a matmul by up to {medium_changes_matmuls():.2g}), {args.rounds} interleaved rounds:")
            results[(threads, "iterations")] = iteration_ratios(args.rounds)
    return results


if __name__ == "__main__":
    main()

"""The conv potential's cost against the MLP's and a matmul, all in one process (issue 16).

Times, interleaved round by round (median of ``--repeats``) so that a load that comes and goes
hits every candidate alike, with the same thread count:

- one RK stage of each potential as the flow uses it, forward and backward: ``grad_and_laplacian``
  at a scalar time inside ``shared_constants``, then a backward from random cotangents of ∇φ and
  ∇²φ (what training does at every stage); the conv potential with ``method="direct"`` (matmuls
  on patches) and ``method="fft"`` (the FFT implementation it replaced), the MLP potential at the
  given hidden widths (the Ising default 256; ``benchmarks/ising_speed.py --parts`` uses 512 at
  L=16);
- the direct conv stage as the library runs it (the compiled kernel of ``latticeflow.native`` where
  it builds) and as the eager stage (``LATTICEFLOW_CONV_KERNEL=eager``, set only around its calls);
- a matmul with the conv's nominal FLOPs: six (B×N)@(N×C·k²) products, as a direct convolution
  of one input channel into C channels does 2·B·N·C·k² FLOPs and a stage with its backward does
  six such convolutions (h, ∇φ, and in the backward ∂/∂x, ∂/∂h and two kernel gradients);
- with ``--flow``, one whole training iteration (sample, reverse-KL loss, backward, Adam step) of
  the default flow at this L (``IsingConfig(L=...)``: quadratic + conv + MLP), with the conv part
  direct and with it by FFT.

Ratios only (conv/MLP, direct/FFT, conv/matmul); absolute times depend on the machine and its load.

    python benchmarks/conv_speed.py                      # L=16, C=16, k=5, batch 256, 1 thread
    python benchmarks/conv_speed.py --flow               # and whole training iterations
    python benchmarks/conv_speed.py --L 32 --k 5 --batch 64 --hidden 256
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import latticeflow as lf  # noqa: E402
from latticeflow.build import build_flow  # noqa: E402
from latticeflow.config import IsingConfig  # noqa: E402
from latticeflow import native  # noqa: E402
from latticeflow.potentials import ConvPotential, MLPPotential, Potential  # noqa: E402


def conv_kernel(mode: str | None) -> contextlib.AbstractContextManager:
    """LATTICEFLOW_CONV_KERNEL set to ``mode`` inside, restored after (None: left as it is)."""
    if mode is None:
        return contextlib.nullcontext()
    return mock.patch.dict(os.environ, {"LATTICEFLOW_CONV_KERNEL": mode})


def with_kernel(run: Callable[[], None], mode: str | None) -> Callable[[], None]:
    """``run`` with the conv kernel mode set around each call."""

    def wrapped() -> None:
        with conv_kernel(mode):
            run()

    return wrapped


def stage_timer(pot: Potential, B: int, N: int) -> Callable[[], None]:
    """One RK stage as the flow runs it, forward and backward, on fixed random data."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, generator=gen).requires_grad_(True)
    dG, dL = torch.randn(B, N, generator=gen), torch.randn(B, generator=gen)

    def run() -> None:
        with pot.shared_constants():
            g, lap = pot.grad_and_laplacian(x, 0.3)
        torch.autograd.backward((g, lap), (dG, dL))

    return run


def flow_timer(L: int, method: str, batch: int | None, kernel: str | None = None) -> Callable[[], None]:
    """One training iteration of the default flow at L, its conv part computed by ``method`` (and,
    direct, with LATTICEFLOW_CONV_KERNEL = ``kernel``)."""
    cfg = IsingConfig(L=L) if batch is None else IsingConfig(L=L, batch=batch)
    target = lf.ising(L, lf.critical)
    torch.manual_seed(0)
    flow = build_flow(cfg, target.lattice)
    for m in flow.modules():
        if isinstance(m, ConvPotential):
            m.method = method
    from benchmarks.ising_speed import training_step  # the repository root is on sys.path (above)

    return with_kernel(training_step(flow, target, cfg.batch_size, lr=1e-4), kernel)


def interleaved(timers: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each timer, the timers run in turn within every round."""
    for f in timers.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, f in timers.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Print the ratios; return the medians in seconds ({"stage": {...}, "flow": {...}})."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--L", type=int, default=16)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--k", type=int, default=5, help="kernel size")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 512], help="MLP widths to compare with")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--flow", action="store_true", help="also time whole training iterations of the default flow")
    p.add_argument("--flow-repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    L, C, k, B = args.L, args.channels, args.k, args.batch
    N = L * L
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); float32; L={L}, C={C}, k={k}, batch {B}")
    compiled = native.load() is not None
    print("conv direct: the compiled kernel (latticeflow.native)" if compiled else
          f"conv direct: eager (the compiled kernel is unavailable: {native._load_error or 'switched off'})")

    torch.manual_seed(0)
    # the conv part of the default flow: D4 kernels, Z2-even ln cosh, linear in t
    direct = ConvPotential(L, channels=C, kernel_size=k, activation="lncosh", d4=True, z2=True,
                           time_dependent=True, init_scale="linear", method="direct")
    fft = copy.deepcopy(direct)
    fft.method = "fft"
    timers = {"conv direct": stage_timer(direct, B, N), "conv fft": stage_timer(fft, B, N),
              "conv eager": with_kernel(stage_timer(direct, B, N), "eager")}
    for h in args.hidden:
        mlp = MLPPotential(N, h, activation="lncosh", time_dependent=True, init_scale="linear")
        timers[f"mlp h={h}"] = stage_timer(mlp, B, N)
    a, wmat = torch.randn(B, N), torch.randn(N, C * k * k)
    timers["matmul 6x conv FLOPs"] = lambda: [a @ wmat for _ in range(6)]
    t = interleaved(timers, args.repeats)

    print(f"one RK stage, forward + backward, median of {args.repeats} interleaved rounds:")
    print(f"  conv direct / conv fft             {t['conv direct'] / t['conv fft']:6.2f}")
    print(f"  conv direct / conv direct eager    {t['conv direct'] / t['conv eager']:6.2f}")
    for h in args.hidden:
        print(f"  conv direct / mlp h={h:<4d}          {t['conv direct'] / t[f'mlp h={h}']:6.2f}"
              f"    (eager: {t['conv eager'] / t[f'mlp h={h}']:6.2f}, fft: {t['conv fft'] / t[f'mlp h={h}']:6.2f})")
    print(f"  conv direct / matmul of its FLOPs  {t['conv direct'] / t['matmul 6x conv FLOPs']:6.2f}"
          f"    ({6 * 2 * B * N * C * k * k / 1e6:.0f} MFLOP nominal)")
    for h in args.hidden:
        print(f"  mlp h={h:<4d} / matmul of its FLOPs   "
              f"{t[f'mlp h={h}'] / (t['matmul 6x conv FLOPs'] * h / (C * k * k)):6.2f}")

    if args.flow:
        ft = interleaved({"direct": flow_timer(L, "direct", None), "eager": flow_timer(L, "direct", None, "eager"),
                          "fft": flow_timer(L, "fft", None)}, args.flow_repeats, warmup=1)
        print(f"one training iteration of the default flow at L={L} (IsingConfig defaults), "
              f"median of {args.flow_repeats}:")
        print(f"  conv part direct / conv part fft   {ft['direct'] / ft['fft']:6.2f}")
        print(f"  conv part direct / direct eager    {ft['direct'] / ft['eager']:6.2f}")
    return {"stage": t, "flow": ft if args.flow else {}}


if __name__ == "__main__":
    main()

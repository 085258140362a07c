"""GPU check: training-iteration speed and memory of the paper's Ising and MNIST configurations.

One script, a few minutes on a modern GPU. For each configuration, in float32 with and without
TF32 matmuls, it times full training iterations on one device and prints iterations per second,
ms per iteration, the achieved GFLOP/s of the potential's arithmetic, a torch matmul GFLOP/s of
the same shapes measured in the same run on that device with the same TF32 setting, and the peak
memory (torch.cuda.max_memory_allocated, including the model, Adam state and warm-up), then a
markdown table to paste into the README.

* Ising (paper section 4.2, appendix C): L = 16 (N = 256), MLP potential with h = 512,
  50 RK4 steps of 0.1, batch 64, random space-group x Z2 symmetrisation. One iteration samples
  a batch by integrating forward, computes the reverse-KL loss, backpropagates through the
  integration and takes an Adam step (as ``models/ising.py`` trains; built like
  ``benchmarks/ising_speed.py``, whose FLOP count it uses).
* MNIST (section 4.1): D = 784, one-hidden-layer softplus potential with h = 1024, 100 RK4 steps
  of 0.1, batch 100. One iteration is ``log_prob`` of a batch by backward integration, the
  backward pass and an Adam step (as ``models/mnist.py`` trains; built like
  ``benchmarks/mnist_speed.py``, whose FLOP count and matmul reference it uses), without
  gradient checkpointing (memory is no constraint on a GPU), or with it (``--grad-checkpoint``).

Timing: ``--warmup`` untimed iterations, then iterations are queued until ``--seconds`` have
passed (at least ``--min-iters``), and the window ends with torch.cuda.synchronize, so the
rate is the device's throughput including Python and kernel-launch overhead.

    python benchmarks/gpu_check.py                        # cuda, about 2 minutes on an H200
    python benchmarks/gpu_check.py --seconds 30 --json benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --quick   # smoke test: tiny sizes, a few seconds
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import latticeflow as lf  # noqa: E402
from ising_speed import mlp_flops  # noqa: E402
from latticeflow.build import build_flow as build_lattice_flow  # noqa: E402
from latticeflow.config import ISING_PAPER  # noqa: E402
from latticeflow.mnist import MNIST_PAPER, DequantizedBatches  # noqa: E402
from latticeflow.mnist import build_flow as build_mnist_flow  # noqa: E402
from mnist_speed import iteration_flops, matmul_gflops, write_json  # noqa: E402

Step = Callable[[], None]


class Case:
    """One configuration: a training step closure and what its FLOPs and matmuls are."""

    def __init__(self, name: str, label: str, step: Step, flops: float, mm_shape: tuple[int, int, int]) -> None:
        self.name, self.label, self.step, self.flops, self.mm_shape = name, label, step, flops, mm_shape


def ising_case(device: torch.device, quick: bool) -> Case:
    """The paper's Ising configuration (tiny with ``quick``)."""
    L, h, n, B = (4, 32, 4, 16) if quick else (ISING_PAPER["L"], ISING_PAPER["hidden"], ISING_PAPER["n_steps"],
                                               ISING_PAPER["batch"])
    config = {"potential": ISING_PAPER["potential"], "hidden": h, "n_steps": n, "step_size": ISING_PAPER["step_size"],
              "symmetrize": ISING_PAPER["symmetrize"], "group": ISING_PAPER["group"], "dtype": "float32"}
    target = lf.ising(L, lf.critical)
    torch.manual_seed(0)
    flow = build_lattice_flow(config, target.lattice).to(device)
    opt = torch.optim.Adam(flow.parameters(), lr=ISING_PAPER["lr"])
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        x, logp = flow.sample(B, generator=gen)
        loss = (logp + target.energy(x)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    N = target.N
    # forward: 4 RK stages per step; the backward of the pathwise gradient costs about 2x forward
    flops = 3 * 4 * n * mlp_flops(B, N, h)
    label = f"Ising L={L} (N={N}), h={h}, {n} RK4 steps, batch {B}, random space×Z2"
    return Case("ising", label, step, flops, (B, N, h))


def mnist_case(device: torch.device, quick: bool, grad_checkpoint: bool) -> Case:
    """The paper's MNIST configuration (tiny with ``quick``); synthetic pixels (the cost does not depend on them)."""
    D, h, n, B = (64, 32, 4, 20) if quick else (784, MNIST_PAPER.hidden, MNIST_PAPER.n_steps, MNIST_PAPER.batch)
    config = MNIST_PAPER.replace(hidden=h, n_steps=n, batch=B, dtype="float32", grad_checkpoint=grad_checkpoint)
    torch.manual_seed(0)
    flow = build_mnist_flow(config, D).to(device)
    opt = torch.optim.Adam(flow.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4 * B, D), generator=gen, dtype=torch.uint8)
    # a few dequantised batches, moved to the device once and cycled
    batches = [y.to(device, flow.dtype) for y, _ in DequantizedBatches(pixels, B, generator=gen, dtype=torch.float64)]
    k = [0]

    def step() -> None:
        y = batches[k[0] % len(batches)]
        k[0] += 1
        loss = -flow(y).mean()  # flow.forward = log_prob by backward integration (paper eq. 6)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    label = (f"MNIST D={D}, h={h} softplus, {n} RK4 steps, batch {B}"
             + (", grad checkpoint" if grad_checkpoint else ""))
    return Case("mnist" + ("-ckpt" if grad_checkpoint else ""), label, step, iteration_flops(B, D, h, n), (B, D, h))


def set_tf32(on: bool) -> None:
    """TF32 for float32 matmuls (and cuDNN) on or off; no effect on a CPU."""
    torch.set_float32_matmul_precision("high" if on else "highest")
    torch.backends.cudnn.allow_tf32 = on


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(case: Case, device: torch.device, warmup: int, seconds: float, min_iters: int) -> dict[str, Any]:
    """Throughput of ``case.step`` over a window of about ``seconds`` after ``warmup`` iterations."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        case.step()
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    iters = 0
    t0 = time.perf_counter()
    while iters < min_iters or time.perf_counter() - t0 < seconds:
        case.step()
        iters += 1
    synchronize(device)
    total = time.perf_counter() - t0
    return {"iters": iters, "seconds": total, "warmup_seconds": warmup_s, "it_per_s": iters / total,
            "ms_per_iter": 1e3 * total / iters, "gflops": case.flops * iters / total / 1e9,
            "gflop_per_iter": case.flops / 1e9,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:k or cpu")
    p.add_argument("--seconds", type=float, default=15.0, help="timed window per configuration and TF32 setting")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--min-iters", type=int, default=3, help="timed iterations at least")
    p.add_argument("--configs", nargs="+", default=["ising", "mnist"], choices=["ising", "mnist"])
    p.add_argument("--grad-checkpoint", action="store_true", help="also time MNIST with gradient checkpointing")
    p.add_argument("--no-tf32", action="store_true", help="time plain float32 only")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny sizes (not the paper's), 1 warm-up, 0.5 s windows")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.min_iters = min(args.seconds, 0.5), min(args.warmup, 1), min(args.min_iters, 2)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {args.device} but CUDA is not available "
                             f"(torch {torch.__version__}); use --device cpu --quick for a smoke test")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        name = torch.cuda.get_device_name(device)
        mem = torch.cuda.get_device_properties(device).total_memory / 2**30
        where = f"{name} ({mem:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        where = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads (TF32 has no effect)"
    print(f"torch {torch.__version__} on {device}: {where}" + ("  [--quick: tiny sizes, not the paper's]" if args.quick else ""))
    mm_windows, mm_seconds = (1, 0.1) if args.quick else (3, 0.3)
    builders: list[Callable[[], Case]] = []
    if "ising" in args.configs:
        builders.append(lambda: ising_case(device, args.quick))
    if "mnist" in args.configs:
        builders.append(lambda: mnist_case(device, args.quick, grad_checkpoint=False))
        if args.grad_checkpoint:
            builders.append(lambda: mnist_case(device, args.quick, grad_checkpoint=True))
    rows = []
    for build in builders:
        for tf32 in ([False] if args.no_tf32 else [False, True]):
            set_tf32(tf32)
            case = build()  # a fresh model per setting: the same start, and a clean peak-memory count
            B, D, h = case.mm_shape
            mm = matmul_gflops(B, D, h, torch.float32, device, windows=mm_windows, seconds=mm_seconds)
            r = time_case(case, device, args.warmup, args.seconds, args.min_iters)
            r.update({"config": case.name, "label": case.label, "precision": "tf32" if tf32 else "float32",
                      "matmul_gflops": mm, "fraction_of_matmul": r["gflops"] / mm})
            rows.append(r)
            peak = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] is not None else "n/a (cpu)"
            print(f"{case.label}, {r['precision']}: {r['it_per_s']:.2f} it/s = {r['ms_per_iter']:.1f} ms/iter "
                  f"({r['iters']} iters in {r['seconds']:.1f} s after {args.warmup} warm-up in {r['warmup_seconds']:.1f} s); "
                  f"{r['gflops']:.0f} GFLOP/s ({r['gflop_per_iter']:.3g} GFLOP/iter) vs matmul {mm:.0f} GFLOP/s "
                  f"({r['fraction_of_matmul']:.1%}); peak memory {peak}", flush=True)
            del case
            if device.type == "cuda":
                torch.cuda.empty_cache()
    set_tf32(False)
    print(f"\n{where}, torch {torch.__version__}" + (" (--quick: tiny sizes, not the paper's)" if args.quick else "") + "\n")
    print("| configuration | precision | it/s | ms/iter | GFLOP/s | matmul GFLOP/s | of matmul | peak memory |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        peak = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] is not None else "n/a"
        print(f"| {r['label']} | {r['precision']} | {r['it_per_s']:.2f} | {r['ms_per_iter']:.1f} | {r['gflops']:.0f} | "
              f"{r['matmul_gflops']:.0f} | {r['fraction_of_matmul']:.0%} | {peak} |")
    summary = {"device": str(device), "where": where, "torch": torch.__version__, "quick": args.quick,
               "seconds": args.seconds, "warmup": args.warmup, "results": rows}
    if args.json:
        write_json(args.json, summary)
    return summary


if __name__ == "__main__":
    main()

"""tanh on the CPU: ``torch.tanh`` against 2σ(2h) − 1, on the shapes of the flows' stages.

The ln cosh activation of the MLP and conv potentials needs tanh h at every RK stage. Which form
is faster depends on the CPU: on one machine of this project ``torch.tanh`` ran 4–5× slower than
the sigmoid form on the same tensor, on another (with AMX) 3× faster. So the fused stages time
both once per process and take the faster (``latticeflow.potentials.activations.tanh_via_sigmoid``;
``LATTICEFLOW_TANH=torch|sigmoid`` fixes it). This script prints, in one run and on one thread
count, interleaved rounds (A B, B A, ...), the ratio of medians A ÷ B with A = ``torch.tanh`` and
B = the sigmoid form, out of place, and the largest absolute difference of the two, for each
shape and dtype:

- the MLP stage's pre-activations (B, h): the L=4 preset (256, 128), the paper configuration
  (64, 512) and the L=16 mixture preset (128, 512);
- the conv stage's (C, N·B): 16 channels at L=16, batch 128;

and the form the library picks here.

    python benchmarks/activation_speed.py --threads 1
    python benchmarks/activation_speed.py --threads 2 --dtype float64
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from latticeflow.potentials.activations import tanh_, tanh_via_sigmoid  # noqa: E402
from ising_speed import time_interleaved  # noqa: E402

SHAPES = {
    "MLP, L=4 preset (B=256, h=128)": (256, 128),
    "MLP, paper (B=64, h=512)": (64, 512),
    "MLP, L=16 mixture (B=128, h=512)": (128, 512),
    "conv, L=16 (C=16, N·B=256·128)": (16, 256 * 128),
}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("float32", "float64"), nargs="+", default=["float32"])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--iters", type=int, default=20, help="calls per round")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the shapes' first axis (tests use < 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; A = torch.tanh, B = 2σ(2h) − 1; medians of "
          f"{args.rounds} interleaved rounds")
    print("| shape | dtype | A (ms) | B (ms) | A ÷ B | max abs difference |")
    print("|---|---|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for name, (a, b) in SHAPES.items():
            shape = (max(1, round(a * args.scale)), b)
            h = (3.0 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
            def sigmoid_form() -> torch.Tensor:
                return tanh_(h * 2.0, doubled=True, via_sigmoid=True)

            t = time_interleaved({"torch": lambda: torch.tanh(h), "sigmoid": sigmoid_form}, args.rounds, args.iters)
            ta, tb = statistics.median(t["torch"]), statistics.median(t["sigmoid"])
            diff = float((torch.tanh(h) - sigmoid_form()).abs().max())
            rows.append({"shape": name, "dtype": dtype_name, "torch_s": ta, "sigmoid_s": tb, "ratio": ta / tb,
                         "max_diff": diff})
            print(f"| {name} | {dtype_name} | {ta * 1e3:.3f} | {tb * 1e3:.3f} | {ta / tb:.2f} | {diff:.1e} |")
        print(f"{dtype_name}: the library uses "
              f"{'2σ(2h) − 1' if tanh_via_sigmoid(dtype) else 'torch.tanh'} here (timed once per process)")
    return rows


if __name__ == "__main__":
    main()

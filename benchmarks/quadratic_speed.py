"""Small-lattice speed: the quadratic potential's FFTs against one dense matmul, and a sum stepping in
its symmetrised part's frame against one that permutes at every RK stage.

For each lattice size, in one run and on one thread count, interleaved rounds (A B, B A, ...),
ratio of medians A ÷ B (above 1: B is faster):

- ``part``: one evaluation of a time-dependent quadratic potential (gradient and Laplacian of a
  batch), forward and backward, as in training; A = FFT, B = dense;
- ``flow`` (with ``--flow``): a training iteration (sample, reverse-KL loss, backward, Adam step)
  of the driver's flow at that size, built from ``--driver-flags``, with its quadratic part
  switched between the two (``QuadraticPotential.set_method``; same weights, same samples);
- ``flow, frame`` (with ``--flow``, where the flow's sum has a frame): the same iteration with the
  quadratic part at its default, A = without the frame, B = with it.

    python benchmarks/quadratic_speed.py --sizes 4 8 12 16 --threads 1
    python benchmarks/quadratic_speed.py --sizes 4 8 --flow --threads 1
    python benchmarks/quadratic_speed.py --sizes 4 --flow --threads 1 --iters 50   # the accuracy preset's L=4 flow

``latticeflow.potentials.quadratic.DENSE_MAX_SITES`` (the largest N on which the driver's
``method="auto"`` takes the dense matmul) is set from this script's ``part`` ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import latticeflow as lf  # noqa: E402
from latticeflow.build import build_flow  # noqa: E402
from latticeflow.potentials import QuadraticPotential, SumPotential  # noqa: E402
from ising_speed import driver_config, time_interleaved, training_step  # noqa: E402

# the l4 preset of benchmarks/ising_accuracy.py
DEFAULT_DRIVER_FLAGS = "--hidden 128 --potential quadratic+mlp"


def set_quadratic_method(module: torch.nn.Module, method: str) -> int:
    """Switch every lattice QuadraticPotential inside ``module`` to ``method``; how many there were."""
    quads = [m for m in module.modules() if isinstance(m, QuadraticPotential) and m.orbits is not None]
    for q in quads:
        q.set_method(method)
    return len(quads)


def part_steps(L: int, batch: int) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    pot = QuadraticPotential((L, L), "d4", linear=False, time_dependent=True)
    with torch.no_grad():
        for p in pot.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(batch, L * L, requires_grad=True)

    def step(method: str) -> Callable[[], None]:
        def run() -> None:
            pot.set_method(method)
            _, g, lap = pot(x, 0.3)
            (g.square().sum() + lap.sum()).backward()
        return run

    return {"fft": step("fft"), "dense": step("dense")}


def flow_steps(L: int, driver_flags: str) -> tuple[dict[str, Callable[[], None]], int]:
    config, _ = driver_config(f"--L {L} {driver_flags}")
    target = lf.ising(L, lf.critical)
    torch.manual_seed(0)
    flow = build_flow(config, target.lattice)
    batch = config["batch"]
    train = training_step(flow, target, batch)  # sample, reverse-KL loss, backward, Adam step

    def step(method: str) -> Callable[[], None]:
        def run() -> None:
            set_quadratic_method(flow, method)
            train()
        return run

    if set_quadratic_method(flow, "auto") == 0:
        raise SystemExit(f"--driver-flags {driver_flags!r}: the flow has no quadratic part to switch")
    steps = {"fft": step("fft"), "dense": step("dense")}
    sums = [m for m in flow.modules() if isinstance(m, SumPotential) and m._frame_index is not None]
    framed = {}
    if sums:
        def frame(on: bool) -> Callable[[], None]:
            auto = step("auto")

            def run() -> None:
                for m, k in zip(sums, frames, strict=True):
                    m._frame_index = k if on else None
                auto()
            return run

        frames = [m._frame_index for m in sums]
        framed = {"unframed": frame(False), "framed": frame(True)}
    return steps, framed, batch


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 12, 16])
    p.add_argument("--batch", type=int, default=256, help="batch of the part timing")
    p.add_argument("--flow", action="store_true", help="also time training iterations of the driver's flow")
    p.add_argument("--driver-flags", default=DEFAULT_DRIVER_FLAGS,
                   help=f"models/ising.py flags of the flow besides --L (default {DEFAULT_DRIVER_FLAGS!r})")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=20, help="calls per round of the part timing (flow: a fifth)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratio = A ÷ B (medians of "
          f"{args.rounds} interleaved rounds)")
    print("| L | N | what | A | B | A (ms) | B (ms) | A ÷ B |")
    print("|---:|---:|---|---|---|---:|---:|---:|")
    rows = []
    for L in args.sizes:
        cases = [("part", part_steps(L, args.batch), args.iters)]
        if args.flow:
            steps, framed, batch = flow_steps(L, args.driver_flags)
            cases.append((f"flow (batch {batch})", steps, max(1, args.iters // 5)))
            if framed:
                cases.append((f"flow, frame (batch {batch})", framed, max(1, args.iters // 5)))
        for what, steps, iters in cases:
            t = time_interleaved(steps, args.rounds, iters)
            (a, ta), (b, tb) = ((n, statistics.median(v)) for n, v in t.items())
            rows.append({"L": L, "what": what, "a": a, "b": b, "a_s": ta, "b_s": tb, "ratio": ta / tb})
            print(f"| {L} | {L * L} | {what} | {a} | {b} | {ta * 1e3:.3f} | {tb * 1e3:.3f} | {ta / tb:.2f} |")
    return rows


if __name__ == "__main__":
    main()

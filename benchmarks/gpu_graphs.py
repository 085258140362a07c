"""Does a CUDA graph remove the launch overhead of the integrator? Eager against graph replay, one run.

On an H200 the paper's Ising configuration (L=16, h=512, 50 RK4 steps, batch 64, random
space-group × Z2 symmetrisation) runs at about a tenth of the matmul rate measured in the same
run (``benchmarks/gpu_check.py``): an iteration is thousands of small kernels, each launched from
Python. A CUDA graph records them once and replays them with one launch. This script measures,
for that configuration, on one device:

* sampling (the forward map z → x, Δln p, no gradient) of ``--batch`` samples with fixed
  latent points and symmetry elements: eager against the replay of a graph captured once; the
  replay must give the eager result to float32 rounding (the same kernels on the same inputs);
* a whole training iteration (sample with fresh z and elements from the global CUDA RNG,
  reverse-KL loss, backward, Adam with ``capturable=True``): eager against graph replay.

Each part that fails to capture says why and the rest still runs. The ratios are medians of
interleaved rounds in one process.

    python benchmarks/gpu_graphs.py                    # about a minute on a GPU
    python benchmarks/gpu_graphs.py --device cpu --quick   # smoke test of the eager parts only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import latticeflow as lf  # noqa: E402
from latticeflow.build import build_flow  # noqa: E402
from latticeflow.config import ISING_PAPER  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Seconds per call of ``fn`` over ``reps`` calls, the device synchronised at both ends."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def interleaved(a: Callable[[], Any], b: Callable[[], Any], device: torch.device, rounds: int, reps: int) -> tuple[float, float]:
    """Medians over ``rounds`` interleaved rounds of seconds per call of a and of b."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(timed(a, device, reps))
        tb.append(timed(b, device, reps))
    return statistics.median(ta), statistics.median(tb)


def capture(fn: Callable[[], Any], warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``fn`` ``warmup`` times on a side stream (torch's recipe), then record it: (graph, its static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
    return graph, static


def paper_flow(device: torch.device, quick: bool) -> tuple[Any, Any, int]:
    L, h, n = (4, 32, 4) if quick else (ISING_PAPER["L"], ISING_PAPER["hidden"], ISING_PAPER["n_steps"])
    config = {"potential": ISING_PAPER["potential"], "hidden": h, "n_steps": n, "step_size": ISING_PAPER["step_size"],
              "symmetrize": ISING_PAPER["symmetrize"], "group": ISING_PAPER["group"], "dtype": "float32",
              "init_scale": 0.05}
    target = lf.ising(L, lf.critical)
    torch.manual_seed(0)
    flow = build_flow(config, target.lattice).to(device)
    target = target.to(device) if hasattr(target, "to") else target
    return flow, target, target.N


def sampling_part(flow: Any, device: torch.device, batch: int, rounds: int, reps: int) -> dict[str, Any]:
    """Forward map of fixed inputs: eager against a captured graph."""
    g = torch.Generator(device=device).manual_seed(1)
    noise = flow.draw_noise(batch, g)
    z = torch.randn(batch, flow.dim, generator=g, device=device)

    def eager() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return flow.forward_map(z, noise=noise)

    x_ref, d_ref = eager()
    out: dict[str, Any] = {"part": "sampling (forward map, no gradient)", "batch": batch}
    if device.type != "cuda":
        out["eager_s"] = timed(eager, device, reps)
        out["graph"] = "needs CUDA"
        return out
    try:
        graph, (x_g, d_g) = capture(eager)
        graph.replay()
        sync(device)
        out["max_abs_diff_x"] = float((x_g - x_ref).abs().max())
        out["max_abs_diff_dlogp"] = float((d_g - d_ref).abs().max())
        out["eager_s"], out["graph_s"] = interleaved(eager, graph.replay, device, rounds, reps)
        out["speedup"] = out["eager_s"] / out["graph_s"]
    except Exception as e:  # report, do not stop the other parts
        out["graph"] = f"capture failed: {type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc(limit=4)
        out["eager_s"] = timed(eager, device, reps)
    return out


def training_part(flow: Any, target: Any, device: torch.device, batch: int, rounds: int, reps: int) -> dict[str, Any]:
    """A whole training iteration: eager against a captured graph (global CUDA RNG, capturable Adam)."""
    opt = torch.optim.Adam(flow.parameters(), lr=ISING_PAPER["lr"], capturable=device.type == "cuda")

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        x, logp = flow.sample(batch)
        loss = (logp + target.energy(x)).mean()
        loss.backward()
        opt.step()
        return loss

    out: dict[str, Any] = {"part": "training iteration (sample, reverse KL, backward, Adam)", "batch": batch}
    for _ in range(2):
        step()  # Adam state and gradients exist before timing or capture
    if device.type != "cuda":
        out["eager_s"] = timed(step, device, reps)
        out["graph"] = "needs CUDA"
        return out
    try:
        graph, static_loss = capture(step)
        losses = []
        for _ in range(5):
            graph.replay()
            losses.append(float(static_loss.detach()))
        out["replayed_losses"] = losses
        out["eager_s"], out["graph_s"] = interleaved(step, graph.replay, device, rounds, reps)
        out["speedup"] = out["eager_s"] / out["graph_s"]
    except Exception as e:
        out["graph"] = f"capture failed: {type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc(limit=4)
        out["eager_s"] = timed(step, device, reps)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=5, help="calls per round")
    p.add_argument("--sample-batch", type=int, default=4096, help="batch of the sampling part")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device} but CUDA is not available (torch {torch.__version__})")
    flow, target, N = paper_flow(device, args.quick)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {where}: Ising N={N}, {flow.n_steps} RK4 steps, "
          f"{sum(q.numel() for q in flow.parameters())} parameters", flush=True)
    rows = []
    for batch in ((16,) if args.quick else (ISING_PAPER["batch"], args.sample_batch)):
        rows.append(sampling_part(flow, device, batch, args.rounds, args.reps))
        print(rows[-1], flush=True)
    rows.append(training_part(flow, target, device, 16 if args.quick else ISING_PAPER["batch"], args.rounds, args.reps))
    print({k: v for k, v in rows[-1].items() if k != "traceback"}, flush=True)
    print("\n| part | batch | eager ms | graph ms | eager ÷ graph |\n|---|---:|---:|---:|---:|")
    for r in rows:
        g = f"{1e3 * r['graph_s']:.2f}" if "graph_s" in r else r.get("graph", "")
        s = f"{r['speedup']:.2f}" if "speedup" in r else ""
        print(f"| {r['part']} | {r['batch']} | {1e3 * r['eager_s']:.2f} | {g} | {s} |")
        if "traceback" in r:
            print(r["traceback"])
    return rows


if __name__ == "__main__":
    main()

"""Speed and memory of one MNIST training iteration in the paper's configuration.

The paper's MNIST model (arXiv:1809.10188, section 4.1, appendix C Table 2): D = 784, MLP
potential with h = 1024 softplus units, 100 RK4 steps of 0.1, minibatch B = 100. One iteration
is ``log_prob`` of a batch by backward integration (paper eq. 6), the backward pass through
the 400 RK4 stages, and an Adam step, exactly as ``models/mnist.py`` trains.

For each variant (with and without gradient checkpointing through the integration) a fresh
subprocess builds the model and times ``--iters`` iterations after ``--warmup``; its peak
memory is the kernel's high-water mark VmHWM from /proc/self/status (the whole process:
Python, torch, the model and the iteration), and the delta over VmRSS just before the first
iteration. Seconds per iteration are the fastest of the timed iterations (the mean is printed
too): on a shared machine the others are slowed by whatever else runs. The achieved GFLOP/s count the potential's arithmetic analytically:

    per RK stage, forward: h = yWᵀ + b (2BDh), ∇φ = (a'(h)⊙w)W (2BDh), ∇²φ = a''(h)·(w⊙‖W‖²) (2Bh);
    backward: four (B, h, D) matmuls (8BDh); with checkpointing the forward is recomputed.

Useful work per iteration = 3 × forward × 4 stages × 100 steps (the recomputation is not
counted as useful), against a torch matmul of the same shapes measured in the same run.
The original implementation (wangleiphy/MongeAmpereFlow, autograd double backward) was reported
at about 25 s per iteration with a 6.5 GB peak on another 2-core machine; that is not a ratio to
divide by, so this script prints none (a side-by-side run in one process is issue 17's).

    python benchmarks/mnist_speed.py                  # both variants, 2 timed iterations each
    python benchmarks/mnist_speed.py --iters 5 --device cuda --tf32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

VARIANTS = {"checkpoint": True, "no-checkpoint": False}


def mlp_stage_flops(B: int, D: int, h: int) -> float:
    """FLOPs of one forward evaluation of (∇φ, ∇²φ) for the MLP potential on a batch."""
    return 4.0 * B * D * h + 10.0 * B * h


def iteration_flops(B: int, D: int, h: int, n_steps: int) -> float:
    """Useful FLOPs of one training iteration: forward + backward (≈ 2 × forward) over 4 stages per step."""
    return 3.0 * 4 * n_steps * mlp_stage_flops(B, D, h)


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child(args: argparse.Namespace) -> dict:
    """Run in a fresh process: time ``args.iters`` iterations of one variant, report memory."""
    from latticeflow.mnist import MNIST_PAPER, DequantizedBatches, build_flow

    device = torch.device(args.device)
    config = MNIST_PAPER.replace(hidden=args.hidden, n_steps=args.n_steps, step_size=args.step_size, batch=args.batch,
                                 dtype=args.dtype, grad_checkpoint=VARIANTS[args.child])
    torch.manual_seed(0)
    flow = build_flow(config, args.dim).to(device)
    opt = torch.optim.Adam(flow.parameters(), lr=config.lr)
    # synthetic pixels: the cost does not depend on the values (one softplus per hidden unit)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (args.batch * (args.iters + args.warmup), args.dim), generator=gen,
                           dtype=torch.uint8)
    batches = iter(DequantizedBatches(pixels, args.batch, generator=gen, dtype=torch.float64))

    def step() -> float:
        y, _ = next(batches)
        loss = -flow(y.to(device, flow.dtype)).mean()  # flow.forward = log_prob, backward integration
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    rss_before = _proc_status_kb("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    _sync(device)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    # the fastest iteration is the least disturbed by other processes on a shared machine
    out = {"variant": args.child, "s_per_iter": min(times), "mean_s_per_iter": sum(times) / len(times), "times": times,
           "vmhwm_kb": _proc_status_kb("VmHWM"), "rss_before_kb": rss_before, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def matmul_gflops(B: int, D: int, h: int, dtype: torch.dtype, device: torch.device, windows: int = 6,
                  seconds: float = 0.5) -> float:
    """GFLOP/s of the three matmul shapes of an iteration, (B,D)(D,h), (B,h)(h,D), (h,B)(B,D), equally weighted.

    The best of ``windows`` windows of ``seconds`` each, like the iteration times.
    """
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    pairs = [(rand(B, D), rand(D, h)), (rand(B, h), rand(h, D)), (rand(h, B), rand(B, D))]
    for a, b in pairs:  # warm-up
        a @ b
    _sync(device)
    best = 0.0
    for _ in range(windows):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for a, b in pairs:
                a @ b
            reps += 1
        _sync(device)
        best = max(best, reps * 3 * 2.0 * B * D * h / (time.perf_counter() - t0) / 1e9)
    return best


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=2, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--dim", type=int, default=784)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--n-steps", type=int, default=100)
    p.add_argument("--step-size", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on GPUs")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--child", default=None, choices=list(VARIANTS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_json(path: str | Path, obj: object) -> None:
    """Write a benchmark summary as indented JSON, creating the folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.child:
        print(json.dumps(child(args)))
        return {}
    device = torch.device(args.device)
    B, D, h, n = args.batch, args.dim, args.hidden, args.n_steps
    load0 = os.getloadavg()
    paper = (D, h, n, args.step_size, B) == (784, 1024, 100, 0.1, 100)
    print(f"MNIST {'paper ' if paper else ''}configuration: D={D}, h={h}, {n} RK4 steps of {args.step_size}, batch {B}, {args.dtype}, "
          f"{device}; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} (shared machine)")
    flops = iteration_flops(B, D, h, n)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    mm = matmul_gflops(B, D, h, dtype, device)
    print(f"useful work per iteration: {flops / 1e9:.0f} GFLOP; torch matmul of these shapes (best of 6 x 0.5 s): "
          f"{mm:.1f} GFLOP/s")
    results = {}
    for variant in args.variants:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant,
               *[str(x) for x in ("--iters", args.iters, "--warmup", args.warmup, "--dim", D, "--hidden", h,
                                  "--n-steps", n, "--step-size", args.step_size, "--batch", B, "--dtype", args.dtype,
                                  "--device", args.device)]]
        if args.tf32:
            cmd.append("--tf32")
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["gflops"] = flops / r["s_per_iter"] / 1e9
        r["peak_gb"] = r["vmhwm_kb"] * 1024 / 1e9
        r["delta_gb"] = (r["vmhwm_kb"] - r["rss_before_kb"]) * 1024 / 1e9
        results[variant] = r
    load1 = os.getloadavg()
    mm = max(mm, matmul_gflops(B, D, h, dtype, device))  # again after the variants: the better of the two
    for r in results.values():
        r["fraction_of_matmul"] = r["gflops"] / mm
    print(f"reference torch matmul, best of before and after: {mm:.1f} GFLOP/s")
    print(f"\n{'variant':15s} {'s/iter':>8s} {'mean':>6s} {'GFLOP/s':>8s} {'of mm':>6s} {'peak RSS':>9s} {'iter mem':>9s}")
    for variant, r in results.items():
        extra = f"  (CUDA peak {r['cuda_peak_bytes'] / 1e9:.2f} GB)" if "cuda_peak_bytes" in r else ""
        print(f"{variant:15s} {r['s_per_iter']:8.2f} {r['mean_s_per_iter']:6.1f} {r['gflops']:8.1f} {r['fraction_of_matmul']:6.0%} "
              f"{r['peak_gb']:7.2f}GB {r['delta_gb']:7.2f}GB{extra}")
    print("ratio against the original: unavailable here (no side-by-side MNIST run yet; absolute times from another "
          "machine do not make a ratio; benchmarks/ising_speed.py --original PATH does it for the Ising configuration)")
    print("(per-iteration times: "
          + "; ".join(f"{v}: {', '.join(f'{t:.1f}' for t in r['times'])} s" for v, r in results.items())
          + f"; load average at the end {load1[0]:.2f})")
    summary = {"config": {"dim": D, "hidden": h, "n_steps": n, "batch": B, "dtype": args.dtype, "device": args.device},
               "gflop_per_iter": flops / 1e9, "matmul_gflops": mm, "load_before": load0, "load_after": load1,
               "results": results}
    if args.json:
        write_json(args.json, summary)
    return summary


if __name__ == "__main__":
    main()

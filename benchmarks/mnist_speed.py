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

Against the original implementation (wangleiphy/MongeAmpereFlow), ``--original PATH`` imports
it at run time from the user's checkout PATH (nothing of it is copied into this project) and
builds its MNIST model as its ``density_estimation.py -train`` does. A speed-up is only ever a
ratio measured side by side: the original's iteration and ours are timed interleaved in this
process, with the same thread count and the same kind of batch, and the ratio of medians
original / ours is printed for each variant; the original's peak memory comes from its own
subprocess, like ours, since one process's VmHWM would mix the two. Without ``--original`` the
ratio is unavailable (absolute times from another machine are not divided by).

    python benchmarks/mnist_speed.py                  # both variants, 2 timed iterations each
    python benchmarks/mnist_speed.py --iters 5 --device cuda --tf32
    git clone https://github.com/wangleiphy/MongeAmpereFlow /tmp/maf
    python benchmarks/mnist_speed.py --original /tmp/maf --iters 3 --warmup 1 --threads 2
    python benchmarks/mnist_speed.py --original /tmp/maf --hidden 64 --n-steps 10   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

# the original's import machinery and the interleaved timing are shared with the Ising benchmark
from ising_speed import (ORIGINAL_URL, OriginalUnavailable, load_original, open_original,  # noqa: E402
                         ratio_of_medians, time_interleaved)

VARIANTS = {"checkpoint": True, "no-checkpoint": False}
#: the original's density_estimation.py defaults: -lr 0.001, -decay 0.001 (Adam's weight decay)
ORIGINAL_LR, ORIGINAL_DECAY = 1e-3, 1e-3


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


# ---------------------------------------------------------------------------------------------
# One training iteration: ours and the original's
# ---------------------------------------------------------------------------------------------

def logit_batches(batch: int, dim: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless minibatches of dequantised, logit-transformed random pixels, shape (batch, dim).

    Synthetic pixels: the cost does not depend on the values (one softplus per hidden unit).
    The transform is the paper's and the original's (logit of λ + (1 − 2λ)(pixel + U)/256,
    λ = 10⁻⁶); every pass over the 2·batch images draws fresh noise.
    """
    from latticeflow.mnist import DequantizedBatches

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (2 * batch, dim), generator=gen, dtype=torch.uint8)
    while True:
        for y, _ in DequantizedBatches(pixels, batch, generator=gen, dtype=torch.float64):
            yield y.to(device, dtype)


def make_our_step(args: argparse.Namespace, grad_checkpoint: bool) -> Callable[[], float]:
    """One training iteration of our MNIST flow (as ``models/mnist.py`` trains it) as a closure returning the loss."""
    from latticeflow.mnist import MNIST_PAPER, build_flow

    device = torch.device(args.device)
    config = MNIST_PAPER.replace(hidden=args.hidden, n_steps=args.n_steps, step_size=args.step_size, batch=args.batch,
                                 dtype=args.dtype, grad_checkpoint=grad_checkpoint)
    torch.manual_seed(0)
    flow = build_flow(config, args.dim).to(device)
    opt = torch.optim.Adam(flow.parameters(), lr=config.lr)
    batches = logit_batches(args.batch, args.dim, device, flow.dtype)

    def step() -> float:
        loss = -flow(next(batches)).mean()  # flow.forward = log_prob, backward integration
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def make_original_step(orig: types.SimpleNamespace, args: argparse.Namespace) -> Callable[[], float]:
    """One training iteration of the original's MNIST model, as its ``density_estimation.py -train`` builds it.

    ``python density_estimation.py -dataset MNIST -hdim 1024 -Nsteps 100 -train`` (its README):
    Simple_MLP(dim=784, hidden_size=hdim, use_z2=False) (softplus with a bias; its gradient and
    Laplacian written out by hand); MongeAmpereFlow(net, ε = 0.1, Nsteps, device); Adam(lr 1e-3,
    weight_decay 1e-3: its -lr and -decay defaults); per batch, as in its ``step()``: data ->
    ``.view(-1, dim).requires_grad_()``, loss = ``model.nll(data).mean()``, zero_grad, backward,
    step. It always runs in float32 (its ``-double`` flag only prints). Its data loader (torchvision
    MNIST, the same logit transform) is replaced by :func:`logit_batches`; logging, sampling and
    checkpoints are left out.

    Raises:
        OriginalUnavailable: building the model or running an iteration failed; the message says why.
    """
    device = torch.device(args.device)

    def failed(e: Exception, what: str) -> OriginalUnavailable:
        return OriginalUnavailable(f"the original's {what} failed on torch {torch.__version__}: "
                                   f"{type(e).__name__}: {e}")

    try:
        torch.manual_seed(0)
        net = orig.Simple_MLP(dim=args.dim, hidden_size=args.hidden, use_z2=False)
        model = orig.MongeAmpereFlow(net, args.step_size, args.n_steps, device=device)
        model.to(device)
        opt = torch.optim.Adam(model.parameters(), lr=ORIGINAL_LR, weight_decay=ORIGINAL_DECAY)
    except Exception as e:
        raise failed(e, "MNIST model") from e
    batches = logit_batches(args.batch, args.dim, device, torch.float32)

    def step() -> float:
        try:
            data = next(batches).view(-1, args.dim).requires_grad_()
            loss = model.nll(data).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return float(loss.detach())
        except Exception as e:
            raise failed(e, "training iteration") from e

    return step


# ---------------------------------------------------------------------------------------------
# One side in its own process: time and peak memory
# ---------------------------------------------------------------------------------------------

def child(args: argparse.Namespace) -> dict:
    """Run in a fresh process: time ``args.iters`` iterations of one side (a variant of ours, or
    ``original``), report memory."""
    device = torch.device(args.device)
    if args.child == "original":
        step = make_original_step(load_original(args.original), args)
    else:
        step = make_our_step(args, VARIANTS[args.child])
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


def child_result(args: argparse.Namespace) -> dict:
    """:func:`child`, except that the original's failure becomes ``{"error": why}`` (one line) instead of a traceback."""
    if args.child != "original":
        return child(args)
    try:
        return child(args)
    except OriginalUnavailable as e:
        return {"variant": "original", "error": str(e)}


def child_argv(args: argparse.Namespace, which: str) -> list[str]:
    """The command-line flags of the child process that measures ``which`` (a variant or ``original``)."""
    argv = ["--child", which,
            *[str(x) for x in ("--iters", args.iters, "--warmup", args.warmup, "--dim", args.dim, "--hidden", args.hidden,
                               "--n-steps", args.n_steps, "--step-size", args.step_size, "--batch", args.batch,
                               "--dtype", args.dtype, "--device", args.device)]]
    if args.tf32:
        argv.append("--tf32")
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if which == "original":
        argv += ["--original", str(args.original)]
    return argv


def run_child(args: argparse.Namespace, which: str) -> dict:
    """Measure ``which`` in a fresh Python process (a clean VmHWM); its result as a dict.

    Raises:
        RuntimeError: one of our variants failed (the original's failure is returned as ``{"error": why}``).
    """
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *child_argv(args, which)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        if which == "original":  # e.g. killed for memory: no JSON line
            tail = proc.stderr.strip().splitlines()
            return {"variant": which, "error": f"the original's process exited with code {proc.returncode}"
                    + (f": {tail[-1]}" if tail else "")}
        raise RuntimeError(f"variant {which} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


# ---------------------------------------------------------------------------------------------
# Side by side with the original, in this process
# ---------------------------------------------------------------------------------------------

def compare_original(orig: types.SimpleNamespace, args: argparse.Namespace) -> dict:
    """Time the original's iteration and each of ours interleaved in this process; print and return
    {"times": {side: [s/iter per round]}, "ratios": {variant: ratio of medians original / ours}}.

    ``args.iters`` rounds of one iteration of each side, after ``args.warmup`` of each, in
    alternating order (:func:`ising_speed.time_interleaved`).

    Raises:
        OriginalUnavailable: the original's model or iteration failed; the message says why.
    """
    device = torch.device(args.device)

    def synced(step: Callable[[], float]) -> Callable[[], None]:
        def run() -> None:
            step()
            _sync(device)
        return run

    dtype_note = "" if args.dtype == "float32" else f"; ours in {args.dtype}, the original in float32 as its script runs"
    print(f"\nside by side with the original ({ORIGINAL_URL} at {orig.path}, {orig.commit}), same process, "
          f"{torch.get_num_threads()} thread(s), {args.iters} interleaved round(s) × 1 iteration after "
          f"{args.warmup} warm-up (D={args.dim}, h={args.hidden}, {args.n_steps} RK4 steps of {args.step_size}, "
          f"batch {args.batch}{dtype_note}):")
    steps = {"original": synced(make_original_step(orig, args))}
    steps.update({f"ours ({v})": synced(make_our_step(args, VARIANTS[v])) for v in args.variants})
    times = time_interleaved(steps, rounds=args.iters, iters=1, warmup=args.warmup)
    for side, ts in times.items():
        print(f"  {side:22s} {statistics.median(ts):8.3f} s/iter (median of {len(ts)}; {min(ts):.3f}–{max(ts):.3f})")
    ratios = {v: ratio_of_medians(times, "original", f"ours ({v})") for v in args.variants}
    for v, r in ratios.items():
        print(f"  ratio of medians original / ours ({v}): {r:.2f}x")
    return {"times": times, "ratios": ratios}


UNAVAILABLE = (f"ratio against the original: unavailable (no --original given; git clone {ORIGINAL_URL} and pass "
               "--original PATH to time it side by side in this process; absolute times from another machine do "
               "not make a ratio)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=2,
                   help="timed iterations per variant (and interleaved rounds with --original)")
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
    p.add_argument("--original", metavar="PATH", default=None,
                   help=f"a checkout of {ORIGINAL_URL}: time its MNIST training iteration against ours, interleaved "
                        "in this process, print the ratio of medians, and its peak memory from its own process")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--child", default=None, choices=[*VARIANTS, "original"], help=argparse.SUPPRESS)
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
        print(json.dumps(child_result(args)))
        return {}
    # a bad --original path stops here, before any timing; an import that fails only costs the ratio
    orig, why = open_original(args.original)
    why_unavailable = why or UNAVAILABLE
    device = torch.device(args.device)
    B, D, h, n = args.batch, args.dim, args.hidden, args.n_steps
    load0 = os.getloadavg()
    paper = (D, h, n, args.step_size, B) == (784, 1024, 100, 0.1, 100)
    print(f"MNIST {'paper ' if paper else ''}configuration: D={D}, h={h}, {n} RK4 steps of {args.step_size}, batch {B}, {args.dtype}, "
          f"{device}; {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} (shared machine)")
    flops = iteration_flops(B, D, h, n)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    mm = matmul_gflops(B, D, h, dtype, device)
    print(f"useful work per iteration: {flops / 1e9:.0f} GFLOP; torch matmul of these shapes (best of 6 x 0.5 s): "
          f"{mm:.1f} GFLOP/s")
    sides = list(args.variants) + (["original"] if orig is not None else [])
    results = {}
    for side in sides:
        r = run_child(args, side)
        if "error" in r:  # only the original's failure comes back as a result
            orig, why_unavailable = None, f"ratio against the original: unavailable: {r['error']}"
            continue
        r["gflops"] = flops / r["s_per_iter"] / 1e9
        r["peak_gb"] = r["vmhwm_kb"] * 1024 / 1e9
        r["delta_gb"] = (r["vmhwm_kb"] - r["rss_before_kb"]) * 1024 / 1e9
        results[side] = r
    mm = max(mm, matmul_gflops(B, D, h, dtype, device))  # again after the variants: the better of the two
    for r in results.values():
        r["fraction_of_matmul"] = r["gflops"] / mm
    print(f"reference torch matmul, best of before and after: {mm:.1f} GFLOP/s")
    print(f"\neach side in its own process:\n"
          f"{'variant':15s} {'s/iter':>8s} {'mean':>6s} {'GFLOP/s':>8s} {'of mm':>6s} {'peak RSS':>9s} {'iter mem':>9s}")
    for variant, r in results.items():
        extra = f"  (CUDA peak {r['cuda_peak_bytes'] / 1e9:.2f} GB)" if "cuda_peak_bytes" in r else ""
        print(f"{variant:15s} {r['s_per_iter']:8.2f} {r['mean_s_per_iter']:6.1f} {r['gflops']:8.1f} {r['fraction_of_matmul']:6.0%} "
              f"{r['peak_gb']:7.2f}GB {r['delta_gb']:7.2f}GB{extra}")
    if "original" in results:
        print("(the original's row counts the same useful work; its Simple_MLP also multiplies by diag(w) as an "
              "(h, h) matmul, and its batch requires grad as in its script)")
    side_by_side = None
    if orig is not None:
        try:
            side_by_side = compare_original(orig, args)
        except OriginalUnavailable as e:
            why_unavailable = f"  ratio against the original: unavailable: {e}"
    if side_by_side is None:
        print(f"\n{why_unavailable}" if orig is None else why_unavailable)
    else:
        print("  peak memory, each side in its own process (VmHWM; in brackets VmHWM − RSS before the first "
              "iteration): " + "; ".join(f"{s} {results[s]['peak_gb']:.2f} GB ({results[s]['delta_gb']:.2f} GB)"
                                         for s in ["original", *args.variants]))
        for v in args.variants:
            print(f"  peak memory original / ours ({v}): "
                  f"{results['original']['vmhwm_kb'] / results[v]['vmhwm_kb']:.2f}x")
    load1 = os.getloadavg()
    print("(per-iteration times, each in its own process: "
          + "; ".join(f"{v}: {', '.join(f'{t:.1f}' for t in r['times'])} s" for v, r in results.items())
          + f"; load average at the end {load1[0]:.2f})")
    summary = {"config": {"dim": D, "hidden": h, "n_steps": n, "batch": B, "dtype": args.dtype, "device": args.device},
               "gflop_per_iter": flops / 1e9, "matmul_gflops": mm, "load_before": load0, "load_after": load1,
               "results": results,
               "original": {"path": str(orig.path), "commit": orig.commit, **side_by_side} if side_by_side else None,
               "original_unavailable": None if side_by_side else why_unavailable.strip()}
    if args.json:
        write_json(args.json, summary)
    return summary


if __name__ == "__main__":
    main()

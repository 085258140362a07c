"""The variational F/N of trained flows with the per-step noise drawn two ways: the old shared stream and today's.

Until 2026-11-30 ``MongeAmpereFlow.sample`` drew z ~ N(0, I) and then every step's noise token
(the random symmetry elements) from the caller's one generator. With torch 2.13's CPU generator
seeded 0 and the training shapes (B=256, L=8 or 16) the tokens of a row came out correlated with
its z, and the variational F/N estimated from those samples was biased low. Now the tokens come
first, from a generator of their own seeded by a hash of one draw of the caller's
(``MongeAmpereFlow.draw_noise``), and z after them.

For each checkpoint and seed this prints F/N − exact (HS) estimated from ``--epochs`` batches of
``--batch`` samples drawn the old way ("shared": tokens straight after z from the same generator)
and today's way, with standard errors; a difference of many standard errors is the bias.

    python benchmarks/noise_stream.py runs/sweeps/l8_16/b07_0.440687/checkpoint.pt --seeds 0 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.report import load_model  # noqa: E402
from latticeflow.flow import standard_normal_log_prob  # noqa: E402


def free_energy_gap(flow, target, seed: int, shared: bool, epochs: int = 20, batch: int = 256) -> tuple[float, float]:
    """(mean F/N − exact, its standard error) over ``epochs`` batches drawn from one generator seeded ``seed``;
    ``shared``: the tokens drawn from that generator right after z (the old way)."""
    g = torch.Generator().manual_seed(seed)
    exact = target.exact_free_energy()
    fs = []
    with torch.no_grad():
        for _ in range(epochs):
            if shared:  # the old way: z, then the tokens from the same stream
                z = torch.randn(batch, flow.dim, generator=g, dtype=flow.dtype)
                noise = [flow.potential.resample(batch, g) for _ in range(flow.n_steps)]
            else:  # as MongeAmpereFlow.sample now draws them: the tokens (own generator) first, then z
                noise = flow.draw_noise(batch, g)
                z = torch.randn(batch, flow.dim, generator=g, dtype=flow.dtype)
            x, dlogp = flow.forward_map(z, noise=noise)
            fs.append(float((standard_normal_log_prob(z) + dlogp + target.energy(x)).mean()) / flow.dim - exact)
    return float(np.mean(fs)), float(np.std(fs, ddof=1) / np.sqrt(len(fs)))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint.pt files of Ising runs with a stochastic potential")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'checkpoint':55s} seed  shared stream: F/N − exact     own stream: F/N − exact     difference")
    for ck in args.checkpoints:
        flow, target, _ = load_model(ck, dtype=torch.float32)
        if not flow.stochastic:
            print(f"{ck}: a deterministic flow draws no tokens; skipped")
            continue
        for seed in args.seeds:
            old = free_energy_gap(flow, target, seed, True, args.epochs, args.batch)
            new = free_energy_gap(flow, target, seed, False, args.epochs, args.batch)
            sigma = (new[0] - old[0]) / float(np.hypot(old[1], new[1]))
            rows.append({"checkpoint": ck, "seed": seed, "shared": old, "own": new, "sigma": sigma})
            print(f"{ck[-55:]:55s} {seed:4d}  {old[0]:+.2e} ± {old[1]:.1e}            {new[0]:+.2e} ± {new[1]:.1e}"
                  f"           {sigma:+.1f}σ")
    return rows


if __name__ == "__main__":
    main()

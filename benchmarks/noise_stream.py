"""In-sample bias of a trained flow: its F/N on the sample stream it was trained with against a fresh stream.

A flow is fitted to the batches it trained on; evaluated on those very samples its variational F/N
comes out low. A warm-started β of a sweep used to replay its neighbour's training batches (the same
seed), and its first epochs' F/N were in-sample (README, "In-sample samples"). Flows trained before
2026-11-30 drew z and then the per-step tokens from one generator seeded with the raw ``--seed``:
"training stream" redraws exactly that (the epochs of a run's start), "fresh" draws as
``MongeAmpereFlow.sample`` does now (tokens first from their own generator, then z) — a stream such a
flow never saw.

For each checkpoint and seed this prints F/N − exact (HS) over ``--epochs`` batches of ``--batch``
samples both ways, with standard errors; a difference of many standard errors is the in-sample bias.

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
    ``shared``: z and then the tokens from that generator (how flows trained before 2026-11-30 drew them)."""
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
    print(f"{'checkpoint':55s} seed  training stream: F/N − exact   fresh stream: F/N − exact   difference")
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

"""The path-gradient estimator against the total gradient at the same wall time (issue 16).

Trains the same flow on the same target twice, once per estimator (``gradient_estimator`` "total"
and "path"), each for the same wall time on one thread, one after the other. Each run's epochs are
set from a timing of its first epochs so that its cosine schedule ends within the budget (the
path gradient costs one more backward integration per step, so it runs fewer epochs). Then, for
each final flow: the variational F/N on fresh samples against the exact value, its error, and the
Kish ESS; and the variance of the batch gradient of both estimators at the same parameters (the
common start and both final flows): tr Cov over ``--grad-batches`` batches of the training batch,
with the rms over parameters of the t-statistic of the mean of total − path (the score term, mean
zero: a bias check). Prints the tables and the path/total ratios.

    python benchmarks/path_gradient.py                          # Ising L=4 at β_c, 50 s per estimator
    python benchmarks/path_gradient.py --model phi4 --seconds 50   # free φ⁴, L=4, m²=0.7 (exact Gaussian target)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from latticeflow.build import make_trainer  # noqa: E402
from latticeflow.config import IsingConfig  # noqa: E402
from latticeflow.phi4_config import Phi4Config  # noqa: E402
from latticeflow.stats import kish_ess  # noqa: E402
from latticeflow.train import path_gradient_surrogate  # noqa: E402

ESTIMATORS = ("total", "path")


def build(model: str, estimator: str, epochs: int, seed: int):
    """(trainer, target) of the benchmark's configuration."""
    if model == "ising":  # benchmarks/ising_accuracy.py's l4 flow: quadratic + ln cosh MLP (h=128), random symmetrisation
        cfg = IsingConfig(L=4, hidden=128, potential="quadratic+mlp", epochs=epochs, seed=seed,
                          gradient_estimator=estimator)
        return make_trainer(cfg, progress=False)
    cfg = Phi4Config(L=4, m2=0.7, lam=0.0, hidden=32, potential="quadratic+mlp", epochs=epochs, seed=seed,
                     gradient_estimator=estimator)
    return make_trainer(cfg.flow_config(), target=cfg.target(), kind="phi4", saved_config=cfg.to_dict(),
                        max_rollbacks=0, progress=False)


@torch.no_grad()
def evaluate(flow, target, n: int, generator: torch.Generator) -> dict[str, float]:
    """Variational F/N (mean of ln q + E per site) with its standard error, and the normalised Kish ESS."""
    f = torch.cat([_batch_f(flow, target, min(512, n - k), generator) for k in range(0, n, 512)]).double()
    N = target.N
    return {"F/N": float(f.mean()) / N, "stderr": float(f.std()) / math.sqrt(len(f)) / N, "ess": float(kish_ess(-f))}


def _batch_f(flow, target, b: int, generator: torch.Generator) -> torch.Tensor:
    x, logp = flow.sample(b, generator=generator)
    return logp + target.energy(x)


def gradient_variance(flow, target, batch: int, batches: int, generator: torch.Generator) -> dict[str, float]:
    """tr Cov of the batch gradient of each estimator at the flow's parameters (the same batches for both)."""
    params = [p for p in flow.parameters() if p.requires_grad]
    grads: dict[str, list[torch.Tensor]] = {e: [] for e in ESTIMATORS}
    for _ in range(batches):
        x, logp = flow.sample(batch, generator=generator)
        for est in ESTIMATORS:
            loss = (logp + target.energy(x)).mean() if est == "total" else path_gradient_surrogate(flow, target, x).mean()
            gs = torch.autograd.grad(loss, params, retain_graph=est == "total", allow_unused=True)
            grads[est].append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double()
                                         for g, p in zip(gs, params)]))
    out = {}
    for est, gl in grads.items():
        out[est] = float(torch.stack(gl).var(0).sum())
    d = torch.stack(grads["total"]) - torch.stack(grads["path"])  # the score term: mean zero
    t = d.mean(0) / (d.std(0) / math.sqrt(len(d)))
    t = t[torch.isfinite(t)]  # parameters without a gradient
    out["rms_t"] = float(t.square().mean().sqrt())  # ≈ √((K−1)/(K−3)) for mean zero: 1.07 for K = 16
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("ising", "phi4"), default="ising")
    p.add_argument("--seconds", type=float, default=50.0, help="training wall time per estimator [50]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-samples", type=int, default=8192)
    p.add_argument("--grad-batches", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    results, flows = {}, {}
    start_flow = None
    for est in ESTIMATORS:
        probe, _ = build(args.model, est, 1000, args.seed)
        probe.fit(3)
        t0 = time.perf_counter()
        probe.fit(13)
        per_epoch = (time.perf_counter() - t0) / 10
        epochs = max(20, int(0.9 * args.seconds / per_epoch))  # 0.9: epochs in a long run cost a little more
        trainer, target = build(args.model, est, epochs, args.seed)
        if start_flow is None:
            start_flow = build(args.model, est, epochs, args.seed)[0].flow
        t0 = time.perf_counter()
        log = trainer.fit(epochs, max_minutes=args.seconds / 60)
        wall = time.perf_counter() - t0
        flow = trainer.flow
        flow.eval()
        ev = evaluate(flow, target, args.eval_samples, torch.Generator().manual_seed(10_000 + args.seed))
        exact = target.exact_free_energy()
        results[est] = {"epochs": int(log["epoch"].iloc[-1]), "wall_s": wall, "s_per_epoch": per_epoch, **ev,
                        "exact": exact, "error": ev["F/N"] - exact}
        flows[est] = flow

    gv = {name: gradient_variance(f, target, trainer.batch_size, args.grad_batches,
                                  torch.Generator().manual_seed(20_000 + args.seed))
          for name, f in (("start", start_flow), ("end of total", flows["total"]), ("end of path", flows["path"]))}

    print(f"\n{args.model}, L=4, seed {args.seed}: {args.seconds:g} s of training per estimator, one thread; "
          f"F/N and ESS from {args.eval_samples} fresh samples; exact F/N {results['total']['exact']:.6f}")
    print("| estimator | epochs | s/epoch | F/N | error | ESS |")
    print("|---|---:|---:|---|---:|---:|")
    for est, r in results.items():
        print(f"| {est} | {r['epochs']} | {r['s_per_epoch']:.3f} | {r['F/N']:.6f}({r['stderr'] * 1e6:.0f}e-6) | "
              f"{r['error']:.3e} | {r['ess']:.4f} |")
    print(f"\ngradient variance: tr Cov of the batch gradient (batch {trainer.batch_size}, {args.grad_batches} batches, "
          f"the same samples for both); rms over parameters of the t of the mean difference (the score term, mean zero: "
          f"about {math.sqrt((args.grad_batches - 1) / (args.grad_batches - 3)):.2f} when unbiased)")
    print("| parameters | total tr Cov | path tr Cov | path/total | rms t of mean(total − path) |")
    print("|---|---:|---:|---:|---:|")
    for name, v in gv.items():
        print(f"| {name} | {v['total']:.3e} | {v['path']:.3e} | {v['path'] / v['total']:.3g} | {v['rms_t']:.2f} |")
    t, pth = results["total"], results["path"]
    print(f"\npath/total: error ratio {pth['error'] / t['error']:.3f}, error difference {pth['error'] - t['error']:+.2e} "
          f"(stderrs {t['stderr']:.1e}, {pth['stderr']:.1e}), ESS ratio {pth['ess'] / t['ess']:.3f}, "
          f"epochs ratio {pth['epochs'] / t['epochs']:.3f}, cost per epoch ratio {pth['s_per_epoch'] / t['s_per_epoch']:.2f}")
    return {"results": results, "gradient_variance": gv}


if __name__ == "__main__":
    main()

"""Training with bfloat16 products against float32, same seed, same epochs or same wall time (issue 16).

Trains the paper's Ising configuration (L=16 at β_c, softplus MLP h=512 with biases, 50 RK4 steps of
0.1, batch 64, random space-group×Z2 symmetrisation; Adam at ``--lr``) twice from the same seed for
the same number of epochs: once with ``train_precision="float32"`` and once with ``"bfloat16"``
(the GEMM step's products rounded to bfloat16, float32 sums; latticeflow.native.step.products).
Then evaluates both final flows the same way, in float32 on fresh samples outside any bfloat16
block: the variational F/N (an upper bound of the exact −ln Z/N) with its standard error, the gap to
Kaufman's exact value, and the Kish ESS. It prints the difference of the two F/N in units of its
standard error of the evaluations, the training time of each, and their ratio; and whether any
evaluation step ran with bfloat16 products (it must not). With several seeds it also prints the mean
of the paired differences with its standard error from their spread, which holds the trajectories'
drift apart as well as the evaluation error (|mean| < 3 se: equal within errors).

    python benchmarks/precision_training.py                       # seed 0, 300 epochs each, 2 threads
    python benchmarks/precision_training.py --seeds 0 1 2 3       # paired by seed: the mean difference ± its error
    python benchmarks/precision_training.py --epochs 600 --threads 1 --eval 8192
    python benchmarks/precision_training.py --seeds 0 1 2 3 --equal-time   # bfloat16 for float32's wall time

With ``--equal-time`` the bfloat16 training runs for the float32 training's wall time instead of its
number of epochs (at most 4× as many): the comparison a user with a time budget makes, F/N per
minute, where bfloat16's faster epochs count.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from analysis.free_energy import variational_free_energy  # noqa: E402
from latticeflow.build import make_trainer  # noqa: E402
from latticeflow.config import TRAIN_PRECISIONS, IsingConfig  # noqa: E402
from latticeflow.native import step as native_step  # noqa: E402
from latticeflow.stats import kish_ess  # noqa: E402


def paper_training(epochs: int, lr: float, seed: int, precision: str) -> IsingConfig:
    """The paper's Ising configuration as a training config (constant learning rate, as the original)."""
    return IsingConfig(L=16, potential="mlp", hidden=512, activation="softplus", bias=True, time_dependent=False,
                       n_steps=50, step_size=0.1, symmetrize="random", group="space+z2", batch=64, lr=lr,
                       extensive_lr=lr, schedule="constant", warmup=0, epochs=epochs, seed=seed,
                       train_precision=precision)


def evaluate(flow: torch.nn.Module, target, n: int, seed: int, chunk: int = 512) -> dict[str, float]:
    """Variational F/N ± stderr, its gap to the exact value and the Kish ESS, from n fresh float32 samples."""
    gen = torch.Generator().manual_seed(seed)
    before = native_step.counts["bfloat16"]
    logps, energies = [], []
    with torch.no_grad():
        for start in range(0, n, chunk):
            x, logp = flow.sample(min(chunk, n - start), generator=gen)
            logps.append(logp.double())
            energies.append(target.energy(x).double())
    logp, energy = torch.cat(logps), torch.cat(energies)
    est = variational_free_energy(logp, energy)
    N = target.N
    exact = target.exact_free_energy()
    return {"F/N": est.value / N, "stderr": est.stderr / N, "gap": est.value / N - exact,
            "ess": float(kish_ess(-(logp + energy))), "bf16_eval_steps": native_step.counts["bfloat16"] - before}


def main(argv: list[str] | None = None) -> dict[int, dict[str, dict[str, float]]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one pair of trainings per seed")
    p.add_argument("--eval", type=int, default=4096, help="fresh samples of each evaluation")
    p.add_argument("--equal-time", action="store_true",
                   help="train bfloat16 for the float32 training's wall time (at most 4x its epochs) instead of "
                        "for the same epochs")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); paper configuration, {args.epochs} "
          f"epochs, lr {args.lr}, seeds {args.seeds}; evaluation: {args.eval} fresh float32 samples", flush=True)
    if native_step.gemm_choice("bfloat16") is None:
        print("no bfloat16 gemm here (MKL's or the AVX512-BF16 kernel): bfloat16 training would run in float32; "
              "nothing to compare")
        return {}
    print(f"products by {native_step.gemm_choice('float32')} (float32) and {native_step.gemm_choice('bfloat16')} "
          "(bfloat16) (latticeflow.native.step.gemm_choice)", flush=True)
    res: dict[int, dict[str, dict[str, float]]] = {}
    for seed in args.seeds:
        res[seed] = {}
        for precision in TRAIN_PRECISIONS:  # float32 first: with --equal-time its wall time is bfloat16's budget
            budget = res[seed]["float32"]["seconds"] if args.equal_time and precision != "float32" else None
            epochs = args.epochs if budget is None else 4 * args.epochs
            trainer, target = make_trainer(paper_training(epochs, args.lr, seed, precision), progress=False)
            t0 = time.perf_counter()
            trainer.fit(epochs, max_minutes=None if budget is None else budget / 60.0)
            seconds = time.perf_counter() - t0
            res[seed][precision] = {**evaluate(trainer.flow, target, args.eval, seed + 1000), "seconds": seconds,
                                    "epochs": trainer.epoch}
            r = res[seed][precision]
            print(f"  seed {seed}, {precision:8s}: F/N {r['F/N']:.6f} ± {r['stderr']:.6f} (exact "
                  f"{target.exact_free_energy():.6f}, gap {r['gap']:.2e}), ESS {r['ess']:.3f}, {trainer.epoch} epochs "
                  f"in {seconds:.1f} s ({seconds / trainer.epoch * 1e3:.0f} ms/epoch); evaluation steps with "
                  f"bfloat16 products: {r['bf16_eval_steps']}", flush=True)
        a, b = res[seed]["float32"], res[seed]["bfloat16"]
        z = (b["F/N"] - a["F/N"]) / math.hypot(a["stderr"], b["stderr"])
        print(f"  seed {seed}: bfloat16 − float32 {b['F/N'] - a['F/N']:+.2e} = {z:+.2f} σ of the evaluations alone; "
              f"training time float32 / bfloat16 {a['seconds'] / b['seconds']:.2f}, epochs bfloat16 / float32 "
              f"{b['epochs'] / a['epochs']:.2f}", flush=True)
    if len(args.seeds) > 1:
        # paired by seed (same initialisation, same first samples): the spread of the differences holds
        # both the evaluations' errors and how far two training trajectories drift apart
        d = [res[s]["bfloat16"]["F/N"] - res[s]["float32"]["F/N"] for s in args.seeds]
        f32 = [res[s]["float32"]["F/N"] for s in args.seeds]
        mean = sum(d) / len(d)
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
        m32 = sum(f32) / len(f32)
        spread = math.sqrt(sum((x - m32) ** 2 for x in f32) / (len(f32) - 1))
        verdict = ("equal within errors" if abs(mean) < 3 * se else
                   "bfloat16 lower: closer to exact" if mean < 0 else "bfloat16 higher: further from exact")
        print(f"  over {len(d)} seeds: mean bfloat16 − float32 {mean:+.2e} ± {se:.2e} ({mean / se:+.2f} σ; {verdict}); "
              f"seed-to-seed std of float32 F/N {spread:.2e}; mean training time float32 / bfloat16 "
              f"{sum(res[s]['float32']['seconds'] for s in args.seeds) / sum(res[s]['bfloat16']['seconds'] for s in args.seeds):.2f}")
    return res


if __name__ == "__main__":
    main()

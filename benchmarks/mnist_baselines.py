"""MNIST density-estimation baselines under one fixed CPU budget, on the paper's protocol.

Three models on the full MAF protocol (50,000 / 10,000 / 10,000 images, dequantisation,
logit transform with λ = 1e-6; ``latticeflow.mnist``), all scored on the same fixed test noise
as ``models/mnist.py`` (seed eval_seed + 2):

1. the closed-form full-covariance Gaussian (``GaussianBaseline``), fitted to one noise draw
   of the training set: no budget needed, it is the floor any flow must beat;
2. a masked autoregressive flow (MAF, Papamakarios et al., arXiv:1705.07057) from zuko,
   ``--maf-transforms`` MADEs with ``--maf-hidden`` units, affine, no batch norm, Adam at
   ``--maf-lr``, trained for ``--minutes`` of wall time;
3. a reduced Monge-Ampère flow (arXiv:1809.10188) trained by ``models/mnist.py``'s own code for
   the same ``--minutes`` (its per-epoch validation/test evaluation counts in that time):
   by default h = 256, 20 RK4 steps of 0.5 (the paper's T = 10), batch 100, Adam 1e-3, and
   ``--ma-whiten`` (on by default; ``--no-ma-whiten`` turns it off): the driver's ``--whiten``,
   the Gaussian of row 1 (the same fit, the same noise draw) as a fixed affine map in front of
   the flow, so the flow starts at the Gaussian's NLL rather than at N(0, I)'s thousands of nats
   and training improves on it. The row is labelled "MA flow, whitened start".

Prints test NLL (nats, logit space, the paper's Table 1 convention) ± standard error and
bits/dim ± standard error, next to the paper's Table 1. Needs zuko for the MAF (the optional
``bench`` extra: ``pip install -e .[bench]``); the other rows run without it.

    python benchmarks/mnist_baselines.py                 # 30 minutes per trained model
    python benchmarks/mnist_baselines.py --minutes 1     # smoke run
    python benchmarks/mnist_baselines.py --only gaussian maf
    python benchmarks/mnist_baselines.py --only gaussian ma --no-ma-whiten   # the flow from N(0, I)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from latticeflow.mnist import (  # noqa: E402
    MNIST_PAPER,
    PAPER_TEST_NLL,
    DequantizedBatches,
    GaussianBaseline,
    MNISTData,
    load_data,
    nll_logit_to_bits_per_dim,
)
from latticeflow.stats import standard_error  # noqa: E402
from models import mnist as driver  # noqa: E402

MODELS = ("gaussian", "maf", "ma")


def _stats(logp: Tensor, log_det: Tensor, D: int, seconds: float, params: int, note: str) -> dict:
    """Test NLL and bits/dim with standard errors from per-image log p_Y (B,) and logit log-Jacobians (B,)."""
    logp, log_det = logp.double(), log_det.double()
    bpd = nll_logit_to_bits_per_dim(logp, log_det, D)
    return {"nll": float(-logp.mean()), "nll_stderr": standard_error(logp), "bpd": float(bpd.mean()),
            "bpd_stderr": standard_error(bpd), "images": logp.numel(), "train_seconds": seconds,
            "parameters": params, "note": note}


def run_gaussian(data: MNISTData, eval_seed: int) -> dict:
    t0 = time.perf_counter()
    train_y, _ = DequantizedBatches(data.train, seed=eval_seed, dtype=torch.float64).fixed()
    model = GaussianBaseline.fit(train_y)
    seconds = time.perf_counter() - t0
    y, log_det = DequantizedBatches(data.test, seed=eval_seed + 2, dtype=torch.float64).fixed()
    D = data.dim
    return _stats(model.log_prob(y), log_det, D, seconds, D + D * (D + 1) // 2, "closed form, one noise draw")


def run_maf(data: MNISTData, args: argparse.Namespace) -> dict:
    try:
        import zuko
    except ImportError:
        raise SystemExit("the MAF baseline needs zuko: pip install zuko (or pip install -e '.[bench]'); "
                         "or leave it out with --only gaussian ma") from None
    torch.manual_seed(args.seed)
    flow = zuko.flows.MAF(data.dim, transforms=args.maf_transforms, hidden_features=[args.maf_hidden] * args.maf_layers)
    opt = torch.optim.Adam(flow.parameters(), lr=args.maf_lr)
    gen = torch.Generator().manual_seed(args.seed)
    deadline = time.perf_counter() + 60.0 * args.minutes
    t0, steps, epochs = time.perf_counter(), 0, 0
    while time.perf_counter() < deadline:
        for y, _ in DequantizedBatches(data.train, args.batch, generator=gen, dtype=torch.float64):
            loss = -flow().log_prob(y.float()).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if time.perf_counter() > deadline:
                break
        else:
            epochs += 1
    seconds = time.perf_counter() - t0
    y, log_det = DequantizedBatches(data.test, seed=args.eval_seed + 2, dtype=torch.float64).fixed()
    with torch.no_grad():
        logp = torch.cat([flow().log_prob(c.float()).double() for c in y.split(args.eval_batch)])
    params = sum(p.numel() for p in flow.parameters())
    return _stats(logp, log_det, data.dim, seconds, params,
                  f"{args.maf_transforms} MADEs x {args.maf_layers}x{args.maf_hidden}, {steps} steps "
                  f"({epochs} full epochs), lr {args.maf_lr}")


def run_ma(args: argparse.Namespace, out: Path) -> dict:
    argv = ["--hidden", str(args.ma_hidden), "--n-steps", str(args.ma_steps), "--step-size", str(args.ma_step_size),
            "--batch", str(args.batch), "--lr", str(args.ma_lr), "--epochs", "100000", "--patience", "0",
            "--max-minutes", str(args.minutes), "--eval-seed", str(args.eval_seed), "--seed", str(args.seed),
            "--eval-batch", str(args.eval_batch), "--no-grad-checkpoint", "--out", str(out / "ma_flow"),
            *(["--threads", str(args.threads)] if args.threads else []),
            *(["--whiten"] if args.ma_whiten else []),
            "--no-plot", "--quiet", "--force"]  # a benchmark rerun replaces its own earlier result
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    print("  python models/mnist.py " + " ".join(argv))
    t0 = time.perf_counter()
    summary = driver.main(argv)
    wall = time.perf_counter() - t0
    saved = json.loads((out / "ma_flow" / "summary.json").read_text())
    rows = pd.read_csv(out / "ma_flow" / "log.csv")
    return {"nll": summary["test_nll"], "nll_stderr": summary["test_nll_stderr"], "bpd": summary["test_bpd"],
            "bpd_stderr": summary["test_bpd_stderr"], "images": int(summary["test_images"]),
            "train_seconds": float(rows["train_seconds"].sum()), "parameters": saved["parameters"],
            "whiten": bool(args.ma_whiten),
            "note": f"h={args.ma_hidden}, {args.ma_steps} RK4 steps of {args.ma_step_size}, "
                    f"{'whitened (Gaussian start)' if args.ma_whiten else 'N(0, I) start'}, "
                    f"{int(rows['train_images'].sum())} training images seen over {len(rows)} epoch(s), "
                    f"best epoch {summary['best_epoch']}, {wall:.0f} s with evaluation"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="training wall-clock budget per trained model")
    p.add_argument("--only", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--data-dir", default=None, help="as in models/mnist.py")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--eval-seed", type=int, default=1, help="test noise seed is eval_seed + 2 (as the driver's)")
    p.add_argument("--eval-batch", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--maf-transforms", type=int, default=5)
    p.add_argument("--maf-hidden", type=int, default=1024)
    p.add_argument("--maf-layers", type=int, default=1, help="hidden layers per MADE")
    p.add_argument("--maf-lr", type=float, default=1e-4, help="MAF paper: 1e-4")
    p.add_argument("--ma-hidden", type=int, default=256)
    p.add_argument("--ma-steps", type=int, default=20)
    p.add_argument("--ma-step-size", type=float, default=0.5)
    p.add_argument("--ma-lr", type=float, default=1e-3)
    p.add_argument("--ma-whiten", action=argparse.BooleanOptionalAction, default=True,
                   help="whiten the MA flow's input with the Gaussian baseline's fit (models/mnist.py --whiten), "
                        "so it starts at the Gaussian; --no-ma-whiten starts from N(0, I) as in the paper [on]")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/mnist_baselines", help="folder for the JSON and the MA run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(args.data_dir, MNIST_PAPER)
    load = os.getloadavg()
    print(f"MNIST from {data.directory}: {len(data.train)} / {len(data.validation)} / {len(data.test)} images; "
          f"budget {args.minutes:g} min per trained model; torch threads {torch.get_num_threads()}, "
          f"load average {load[0]:.2f} (shared machine)")
    names = {"gaussian": "Gaussian (full covariance)", "maf": "MAF (zuko)",
             "ma": "MA flow, whitened start" if args.ma_whiten else "Monge-Ampere flow (reduced)"}
    results = {}
    for model in args.only:
        print(f"[{names[model]}]")
        if model == "gaussian":
            results[model] = run_gaussian(data, args.eval_seed)
        elif model == "maf":
            results[model] = run_maf(data, args)
        else:
            results[model] = run_ma(args, out)
        r = results[model]
        print(f"  test NLL {r['nll']:.1f} ± {r['nll_stderr']:.1f} nats, {r['bpd']:.4f} ± {r['bpd_stderr']:.4f} bits/dim"
              f"  ({r['note']})")
    print(f"\nTest set ({len(data.test)} images, fixed noise seed {args.eval_seed + 2}); budget {args.minutes:g} min")
    print(f"{'model':30s} {'params':>10s} {'train s':>8s} {'test NLL (nats)':>18s} {'bits/dim':>17s}")
    for model, r in results.items():
        print(f"{names[model]:30s} {r['parameters']:10d} {r['train_seconds']:8.0f} "
              f"{r['nll']:9.1f} ± {r['nll_stderr']:5.1f} {r['bpd']:8.4f} ± {r['bpd_stderr']:.4f}")
    for name, (nll, err) in PAPER_TEST_NLL.items():
        print(f"{'paper: ' + name:30s} {'':10s} {'':8s} {nll:9.1f} ± {err:5.1f}")
    (out / "results.json").write_text(json.dumps({"minutes": args.minutes, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()

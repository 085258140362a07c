"""Do the flow's numbers agree across devices? CPU float64 is the reference.

Floating-point results differ with the device (other kernels, other reduction orders), so this
compares them with a tolerance that can be justified instead of bitwise. For each configuration it
builds one flow with random (not identity) parameters, draws latent points z and the per-step
symmetry elements once on the CPU, and evaluates on every (device, precision):

* the forward map z → x and its Δln p (sampling, paper eq. 4–5);
* ln p(x) of the reference x by the backward integration (density estimation, eq. 6);
* the gradient of mean Δln p with respect to every parameter (what training descends).

Criteria, each against the CPU float64 result:

* the device in float64 must agree to ``1e-9`` relative (float64 has u = 1.1e-16; a few hundred
  RK4 stages of sums over N sites and h units lose at most a few decimal digits);
* the device in float32 (TF32 off) must agree to within ``10x`` the error of the CPU in float32
  (plus 1e-6 relative): float32 has u = 6e-8 on every device, so its rounding error is the scale
  the device may reach; ten times leaves room for other summation orders, and a wrong kernel
  (or TF32 left on) lands orders of magnitude above it;
* TF32 matmuls (10-bit mantissa, u = 4.9e-4) are reported, not judged.

    python benchmarks/device_agreement.py --device cuda          # a minute on a GPU
    python benchmarks/device_agreement.py --device cpu --quick   # smoke test: the CPU against itself
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import latticeflow as lf  # noqa: E402
from latticeflow.build import build_flow as build_lattice_flow  # noqa: E402
from latticeflow.mnist import MNIST_PAPER  # noqa: E402
from latticeflow.mnist import build_flow as build_mnist_flow  # noqa: E402

#: float64 on another device: relative agreement required (see the module docstring)
F64_RTOL = 1e-9
#: float32 on another device: at most this many times the CPU's own float32 error ...
F32_FACTOR = 10.0
#: ... plus this relative floor
F32_FLOOR = 1e-6


def moved(token: Any, device: torch.device) -> Any:
    """A noise token (tensors, tuples of them, SymmetryDraws, None) on ``device``."""
    if isinstance(token, torch.Tensor):
        return token.to(device)
    if isinstance(token, tuple):
        items = [moved(t, device) for t in token]
        return type(token)(*items) if hasattr(token, "_fields") else tuple(items)
    if isinstance(token, list):
        return [moved(t, device) for t in token]
    return token


def randomized(flow: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """Add N(0, scale²·mean(p²)+scale²) noise to every parameter: a flow far from the identity map."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            size = float(p.double().square().mean().sqrt()) if p.numel() else 0.0
            p.add_(scale * (size + 1.0) * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow


def evaluate(flow: torch.nn.Module, z: torch.Tensor, x_ref: torch.Tensor, noise: Any) -> dict[str, torch.Tensor]:
    """Forward map, backward ln p and the parameter gradient of mean Δln p, all returned in float64 on the CPU."""
    flow.zero_grad(set_to_none=True)
    x, dlogp = flow.forward_map(z, noise=noise)
    dlogp.mean().backward()
    grad = torch.cat([p.grad.reshape(-1) for p in flow.parameters() if p.grad is not None])
    with torch.no_grad():
        logp = flow.log_prob(x_ref, noise=noise)
    cpu = torch.device("cpu")
    return {"x": x.detach().to(cpu, torch.float64), "dlogp": dlogp.detach().to(cpu, torch.float64),
            "logp": logp.to(cpu, torch.float64), "grad": grad.to(cpu, torch.float64)}


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a − ref| / max(max |ref|, 1): relative to the quantity's scale."""
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1.0))


def set_tf32(on: bool) -> None:
    torch.set_float32_matmul_precision("high" if on else "highest")
    torch.backends.cudnn.allow_tf32 = on


def compare(name: str, build: Callable[[], torch.nn.Module], batch: int, device: torch.device,
            seed: int = 0) -> list[dict[str, Any]]:
    """Every (device, precision) of one configuration against CPU float64."""
    cpu = torch.device("cpu")
    torch.manual_seed(seed)
    ref_flow = randomized(build().to(torch.float64), 0.05, seed)
    g = torch.Generator().manual_seed(seed + 1)
    noise = ref_flow.draw_noise(batch, g)
    z = torch.randn(batch, ref_flow.dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        x_ref, _ = ref_flow.forward_map(z, noise=noise)
    ref = evaluate(ref_flow, z, x_ref, noise)
    rows: list[dict[str, Any]] = []
    settings = [("cpu", torch.float32, False)]
    if device.type != "cpu":
        settings += [(str(device), torch.float64, False), (str(device), torch.float32, False),
                     (str(device), torch.float32, True)]
    else:  # the smoke test: the CPU against itself in float64 too
        settings += [("cpu", torch.float64, False)]
    cpu32 = None
    for where, dtype, tf32 in settings:
        dev = torch.device(where)
        set_tf32(tf32)
        flow = build().to(torch.float64)
        flow.load_state_dict(ref_flow.state_dict())
        flow = flow.to(dev, dtype)
        out = evaluate(flow, z.to(dev, dtype), x_ref.to(dev, dtype), moved(noise, dev))
        set_tf32(False)
        err = {k: rel_error(out[k], ref[k]) for k in ref}
        precision = "tf32" if tf32 else str(dtype).replace("torch.", "")
        row: dict[str, Any] = {"config": name, "device": where, "precision": precision, **err}
        if dev.type == "cpu" and dtype == torch.float32:
            cpu32 = err
            row["verdict"] = "reference scale"
        elif dtype == torch.float64:
            worst = max(err.values())
            row["bound"] = F64_RTOL
            row["verdict"] = "pass" if worst <= F64_RTOL else "FAIL"
        elif tf32:
            row["verdict"] = "reported"
        else:
            assert cpu32 is not None
            bound = {k: F32_FACTOR * cpu32[k] + F32_FLOOR for k in err}
            row["bound"] = bound
            row["verdict"] = "pass" if all(err[k] <= bound[k] for k in err) else "FAIL"
        rows.append(row)
        print(f"{name:>6} {where:>7} {precision:>8}: x {err['x']:.2e}  Δln p {err['dlogp']:.2e}  "
              f"ln p {err['logp']:.2e}  grad {err['grad']:.2e}  {row['verdict']}", flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:k or cpu (cpu: the CPU against itself)")
    p.add_argument("--quick", action="store_true", help="small sizes (seconds on a CPU)")
    p.add_argument("--batch", type=int, default=64, help="latent points per configuration")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device} but CUDA is not available (torch {torch.__version__})")
    L, steps, D, h, mnist_steps = (4, 4, 64, 32, 4) if args.quick else (16, 10, 784, MNIST_PAPER.hidden, 100)
    target = lf.ising(L, lf.critical)
    ising_config = {"L": L, "n_steps": steps, "dtype": "float64"}
    mnist_config = MNIST_PAPER.replace(hidden=h, n_steps=mnist_steps, dtype="float64", grad_checkpoint=False)
    rows = compare(f"ising{L}", lambda: build_lattice_flow(ising_config, target.lattice), args.batch, device)
    rows += compare(f"mnist{D}", lambda: build_mnist_flow(mnist_config, D), args.batch, device)
    failed = [r for r in rows if r["verdict"] == "FAIL"]
    print(f"{len(rows) - len(failed)} of {len(rows)} rows pass or are reported; "
          + ("every judged row agrees" if not failed else f"{len(failed)} FAIL"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if failed:
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()

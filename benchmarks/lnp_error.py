"""How much the integrated ln p differs from the exact density of the integrator's map, and what it does to F/N.

The flow's ln p(x) is the RK4 integral of d ln p/dt = −∇²φ along the trajectory; the sample x is
the RK4 map z ↦ x. The exact density of that map (given the same per-step noise) is
ln N(z) − ln|det ∂x/∂z|, computed here with the full Jacobian by autograd in float64. Their
difference is the integrator's error in the importance weights w = e^{−E − ln p}; this script
reports it per sample and its effect on the variational and importance-weighted F/N:

    python benchmarks/lnp_error.py runs/ising/latest/checkpoint.pt --samples 256
    python benchmarks/lnp_error.py CKPT --step-factor 2   # also the same flow with steps of ε·2

(small lattices: the Jacobian costs N backward passes per sample).
"""

from __future__ import annotations

import argparse
import math

import torch

from analysis.free_energy import importance_free_energy, variational_free_energy
from analysis.latent import integration_error
from analysis.report import load_model


def exact_and_integrated(flow, target, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(energies, integrated ln p, exact ln p of the RK4 map) of n samples, float64."""
    r = integration_error(flow, n, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        energy = target.energy(r["x"])
    return energy, r["logq_integrated"], r["logq_exact"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-factor", type=float, default=None, help="also measure with steps of ε times this")
    args = p.parse_args(argv)
    flow, target, _ = load_model(args.checkpoint, dtype=torch.float64)
    N = target.N
    rows = {}
    settings = [(flow.n_steps, flow.step_size)]
    if args.step_factor:
        settings.append((max(1, round(flow.n_steps / args.step_factor)), None))
    for n_steps, _ in settings:
        flow.n_steps = n_steps
        flow.step_size = (settings[0][0] * settings[0][1]) / n_steps  # the same total time T
        energy, li, le = exact_and_integrated(flow, target, args.samples, args.seed)
        d = (li - le).numpy()
        fv_i, fv_e = variational_free_energy(li.numpy(), energy.numpy()), variational_free_energy(le.numpy(), energy.numpy())
        fi_i, fi_e = importance_free_energy(li.numpy(), energy.numpy()), importance_free_energy(le.numpy(), energy.numpy())
        exact = target.exact_free_energy()
        row = {"n_steps": n_steps, "step": flow.step_size, "max_abs_dlnp": float(abs(d).max()),
               "mean_dlnp_per_site": float(d.mean()) / N,
               "F_var_integrated": fv_i.value / N, "F_var_exact_map": fv_e.value / N,
               "F_iw_integrated": fi_i.value / N, "F_iw_exact_map": fi_e.value / N, "F_iw_stderr": fi_e.stderr / N,
               "exact": exact}
        rows[n_steps] = row
        print(f"{n_steps} RK4 steps of {flow.step_size:.4g}: max |ln p_integrated − ln p_map| = {row['max_abs_dlnp']:.2e}, "
              f"mean per site {row['mean_dlnp_per_site']:+.2e}")
        print(f"  variational F/N: integrated {row['F_var_integrated']:.6f}, exact map {row['F_var_exact_map']:.6f}; "
              f"importance-weighted: integrated {row['F_iw_integrated']:.6f}, exact map {row['F_iw_exact_map']:.6f} "
              f"(± {row['F_iw_stderr']:.1e}); Kaufman {exact:.6f}")
    if not math.isfinite(rows[settings[0][0]]["max_abs_dlnp"]):
        raise SystemExit("non-finite result")
    return rows


if __name__ == "__main__":
    main()

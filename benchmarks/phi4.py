"""φ⁴ measurements: variational error on the free theory, neural-MCMC acceptance, HMC reference values.

    python benchmarks/phi4.py --runs l4free        # L=4, m²=1, λ=0: F/N − exact after a 1-minute budget
    python benchmarks/phi4.py --runs l6            # L=6, m²=−4, λ=6.975: acceptance after a 5-minute budget
    python benchmarks/phi4.py --hmc                # HMC reference at L=6, m²=−4, λ=6.975 → analysis/phi4_reference.csv
    python benchmarks/phi4.py --hmc --hmc-seed 1 --hmc-leapfrog 20 --hmc-accept 0.9   # an independent cross-check
    python benchmarks/phi4.py --tune 8 12 16 32    # m² with ξ ≈ L/4 at λ = 6.975 (bisection on short HMC runs)
    python benchmarks/phi4.py --hmc --L 8 --m2 -4.1 # a reference row at another point

Each training run is ``python -m models.phi4`` in a fresh process (the command is printed); its
summary.json is read back. The HMC reference uses :func:`analysis.hmc.hmc` on the action itself
(no flow), 64 chains, errors by a block jackknife over time (20 blocks), with τ(|m|), τ(m²) and
split-R̂ of the magnetisation traces; a row is stored only when R̂ <= 1.01 and the run is longer than
50τ. Columns ``obs_<name>`` are
the observables of :func:`latticeflow.phi4.observables` (``obs_m2`` = ⟨m²⟩; ``m2`` is the parameter m²).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT_ROOT = None  # --out-root: where the run folders go (default: the system's temporary folder)

RUNS = {
    "l4free": ["--L", "4", "--m2", "1", "--lam", "0", "--epochs", "250", "--max-minutes", "1"],
    "l6": ["--L", "6", "--m2", "-4", "--lam", "6.975", "--epochs", "500", "--max-minutes", "5"],
    # the free theory at ξ = 1/m = 2, from the identity map (the Hartree start is exact at λ = 0)
    "l8free": ["--L", "8", "--m2", "0.25", "--lam", "0", "--quadratic-init", "zero", "--epochs", "600",
               "--max-minutes", "5", "--mcmc-samples", "16384"],
    "l16free": ["--L", "16", "--m2", "0.25", "--lam", "0", "--quadratic-init", "zero", "--epochs", "300",
                "--max-minutes", "8", "--mcmc-samples", "16384"],
}


#: L/ξ ≈ 4 at λ = 6.975: m² from ``--tune`` (second-moment ξ of short HMC runs), training epochs and budget.
SCALING = {6: (-4.0, 2100, 10), 8: (-4.54, 900, 10), 12: (-5.03, 500, 10), 16: (-5.30, 1800, 15), 32: (-5.57, 800, 25)}


def scaling(L: int, threads: int, extra: list[str]) -> dict:
    """Train at L/ξ ≈ 4 (:data:`SCALING`), then ``python -m analysis`` on the checkpoint: acceptance, Kish ESS,
    τ(|m|) of neural MCMC against HMC run for the same seconds; prints one markdown row."""
    import pandas as pd

    m2, epochs, minutes = SCALING[L]
    out = Path(tempfile.mkdtemp(prefix=f"phi4_scaling_L{L}_", dir=OUT_ROOT)) / "run"
    cmd = [sys.executable, "-m", "models.phi4", "--L", str(L), "--m2", str(m2), "--lam", "6.975", "--epochs", str(epochs),
           "--max-minutes", str(minutes), *extra, "--threads", str(threads), "--quiet", "--no-plot", "--out", str(out)]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    s = json.loads((out / "summary.json").read_text())
    rep = out / "report"
    cmd = [sys.executable, "-m", "analysis", str(out), "--out", str(rep), "--samples", "8192", "--hmc-chains", "64",
           "--target-accept", "0.8", "--threads", str(threads), "--quiet"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    r = json.loads((rep / "report.json").read_text())
    sm = pd.read_csv(rep / "samplers.csv").set_index("sampler")
    nm, hm = sm.loc["neural MCMC"], sm.loc["HMC"]
    ratio = nm["ess_per_s_abs_m"] / hm["ess_per_s_abs_m"]
    print(f"| {L} | {m2} | {s['epochs']} | {s['wall_s'] / 60:.1f} | {r['acceptance']:.3f} | "
          f"{r['weights']['kish_ess'] / r['samples']:.3f} | {r['importance'][0]:.6f}({r['importance'][1]:.1e}) | "
          f"{nm['tau_abs_m']:.2f} / {hm['tau_abs_m']:.1f} | {nm['tau_m2']:.2f} / {hm['tau_m2']:.1f} | {ratio:.2f} |  ← {out}",
          flush=True)
    return {"summary": s, "report": r}


def run(name: str, threads: int, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"phi4_{name}_", dir=OUT_ROOT)) / "run"
    cmd = [sys.executable, "-m", "models.phi4", *RUNS[name], *extra, "--threads", str(threads), "--quiet", "--no-plot",
           "--out", str(out)]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    s = json.loads((out / "summary.json").read_text())
    mc = s.get("neural_mcmc", {})
    imp = ""
    if "free_energy_reweighted" in mc:
        f, e = mc["free_energy_reweighted"], mc["free_energy_reweighted_err"]
        imp = f"; importance F/N {f:.8f} ± {e:.1e}" + (f" ({(f - s['exact']) / e:+.1f}σ from exact)" if s["exact"] is not None else "")
        imp += f", Kish ESS {mc['weights']['kish_ess']:.3f}; τ(|m|) {mc['tau_abs_m']:.2f}, τ(m²) {mc['tau_m2']:.2f}"
        if "propagator" in mc:
            imp += f"; G(x) max {mc['propagator']['reweighted_max_sigma']:.1f}σ from exact"
    print(f"{name}: {s['epochs']} epochs, {time.perf_counter() - t0:.0f} s; F/N {s['free_energy']:.6f} ± {s['stderr']:.6f}"
          + (f", error {s['error']:.2e}" if s["error"] is not None else "")
          + f"; ESS {s['ess']:.3f}; neural MCMC acceptance {mc.get('acceptance', float('nan')):.3f}" + imp, flush=True)
    return s


def hmc_reference(L: int, m2: float, lam: float, chains: int, warmup: int, samples: int, seed: int,
                  n_leapfrog: int = 10, target_accept: float = 0.8, thin: int | None = None) -> dict:
    """HMC on the action: observables from every ``thin``-th state (block jackknife over 20 time windows),
    τ(|m|), τ(m²) and split-R̂ from the full magnetisation traces of all chains."""
    import numpy as np
    import torch

    from analysis.hmc import from_energy, hmc
    from analysis.phi4_report import trace_estimates
    from latticeflow.phi4 import observables, phi4

    torch.set_default_dtype(torch.float64)
    target = phi4(L, m2, lam)
    thin = thin or max(1, (samples * chains * target.N) // 20_000_000)  # at most ~160 MB of stored states
    gen = torch.Generator().manual_seed(seed)
    x0 = 0.1 * torch.randn(chains, target.N, generator=gen)
    traces, kept = [], []

    def keep(k, x, lp):
        traces.append(x.mean(-1).numpy().copy())
        if k % thin == thin - 1:
            kept.append(x.clone())

    t0 = time.perf_counter()
    res = hmc(from_energy(target), x0, n_samples=samples, n_leapfrog=n_leapfrog, step_size=0.1, n_warmup=warmup,
              target_accept=target_accept, generator=gen, keep_samples=False, callback=keep)
    obs = observables(torch.stack(kept).reshape(-1, target.N), target, n_blocks=20)  # time-major: time windows
    tr = trace_estimates(np.stack(traces), target.N)
    row = {"L": L, "m2": m2, "lam": lam, "kappa": target.kappa, "lam_tilde": target.lam_tilde,
           "chains": chains, "warmup": warmup, "samples": samples, "thin": thin, "seed": seed, "n_leapfrog": n_leapfrog,
           "target_accept": target_accept, "acceptance": res.acceptance_rate, "step_size": res.step_size,
           "tau_abs_m": tr["tau_abs_m"], "tau_m2": tr["tau_m2"], "rhat_abs_m": tr["rhat_abs_m"],
           "wall_s": time.perf_counter() - t0}
    for k in ("m", "abs_m", "m2", "chi", "binder", "xi", "action_density"):
        row["obs_" + k], row["obs_" + k + "_err"] = obs[k], obs[k + "_err"]  # obs_m2 = <m²>; m2 = the parameter m²
    for t, (g, e) in enumerate(zip(obs["G_t"], obs["G_t_err"])):
        row[f"obs_G_t{t}"], row[f"obs_G_t{t}_err"] = float(g), float(e)
    return row


def tune_mass(L: int, lam: float, xi_target: float, lo: float, hi: float, probes: int, samples: int,
              seed: int = 0) -> float:
    """m² with second-moment ξ ≈ ``xi_target`` at this λ, by bisection on short HMC runs (ξ grows as m² falls
    toward the critical value); prints every probe."""
    for _ in range(probes):
        mid = 0.5 * (lo + hi)
        r = hmc_reference(L, mid, lam, chains=32, warmup=200, samples=samples, seed=seed)
        print(f"  L={L} m²={mid:.5f}: ξ = {r['obs_xi']:.3f} ± {r['obs_xi_err']:.3f} (target {xi_target:.3f}), "
              f"τ(m²) {r['tau_m2']:.1f}, {r['wall_s']:.0f} s", flush=True)
        if r["obs_xi"] > xi_target:
            lo = mid  # too close to criticality: raise m²
        else:
            hi = mid
    return 0.5 * (lo + hi)


def append_reference(row: dict, command: str) -> Path:
    """Append one HMC row, with the command that made it, to the shipped table (analysis/phi4_reference.csv)."""
    import pandas as pd

    from analysis.phi4_report import REFERENCE_CSV

    row = dict(row, command=command, date=time.strftime("%Y-%m-%d"))
    old = pd.read_csv(REFERENCE_CSV) if REFERENCE_CSV.exists() else None
    new = pd.DataFrame([row])
    (new if old is None else pd.concat([old, new], ignore_index=True)).to_csv(REFERENCE_CSV, index=False)
    return REFERENCE_CSV


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="*", default=[], choices=sorted(RUNS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hmc", action="store_true", help="HMC reference at --L --m2 --lam, appended to "
                   "analysis/phi4_reference.csv when R̂ <= 1.01 and the run is longer than 50τ")
    p.add_argument("--L", type=int, default=6)
    p.add_argument("--m2", type=float, default=-4.0)
    p.add_argument("--lam", type=float, default=6.975)
    p.add_argument("--hmc-chains", type=int, default=64)
    p.add_argument("--hmc-warmup", type=int, default=400)
    p.add_argument("--tune", type=int, nargs="*", default=[], help="lattice sizes L: find m² with ξ = L/--l-over-xi")
    p.add_argument("--scaling", type=int, nargs="*", default=[], choices=sorted(SCALING),
                   help="train at L/ξ ≈ 4 for these L and compare neural MCMC with HMC at equal seconds")
    p.add_argument("--l-over-xi", type=float, default=4.0)
    p.add_argument("--tune-range", type=float, nargs=2, default=(-5.0, -4.0), help="bracket of m² for the bisection")
    p.add_argument("--tune-probes", type=int, default=7)
    p.add_argument("--tune-samples", type=int, default=1000)
    p.add_argument("--hmc-samples", type=int, default=4000)
    p.add_argument("--hmc-seed", type=int, default=0)
    p.add_argument("--hmc-leapfrog", type=int, default=10)
    p.add_argument("--hmc-accept", type=float, default=0.8, help="target acceptance of the step-size adaptation")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="flags after -- go to models.phi4")
    p.add_argument("--out-root", default=None, help="folder for the training runs' folders (default: a temporary one)")
    a = p.parse_args(argv)
    global OUT_ROOT
    if a.out_root:
        OUT_ROOT = Path(a.out_root)
        OUT_ROOT.mkdir(parents=True, exist_ok=True)
    extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra
    for name in a.runs:
        run(name, a.threads, extra)
    if a.scaling:
        print("| L | m² | epochs | training min | acceptance | Kish ESS/B | importance F/N | τ(|m|) neural / HMC "
              "| τ(m²) neural / HMC | ESS/s(|m|) neural ÷ HMC |", flush=True)
    for L in a.scaling:
        scaling(L, a.threads, extra)
    if a.tune:
        for L in a.tune:
            m2 = tune_mass(L, a.lam, L / a.l_over_xi, a.tune_range[0], a.tune_range[1], a.tune_probes,
                           a.tune_samples)
            print(f"L={L}, λ={a.lam}: m² = {m2:.4f} for ξ ≈ L/{a.l_over_xi:g}", flush=True)
    if a.hmc:
        import pandas as pd

        row = hmc_reference(a.L, a.m2, a.lam, chains=a.hmc_chains, warmup=a.hmc_warmup, samples=a.hmc_samples,
                            seed=a.hmc_seed, n_leapfrog=a.hmc_leapfrog, target_accept=a.hmc_accept)
        cmd = (f"python benchmarks/phi4.py --hmc --L {a.L} --m2 {a.m2} --lam {a.lam} --hmc-samples {a.hmc_samples} "
               f"--hmc-chains {a.hmc_chains} --hmc-warmup {a.hmc_warmup} --hmc-seed {a.hmc_seed} "
               f"--hmc-leapfrog {a.hmc_leapfrog} --hmc-accept {a.hmc_accept}")
        print(pd.Series(row).to_string())
        if row["rhat_abs_m"] > 1.01 or a.hmc_samples < 50 * max(row["tau_abs_m"], row["tau_m2"]):
            print(f"not stored: R̂(|m|) {row['rhat_abs_m']:.3f} > 1.01 or fewer than 50τ iterations; run longer")
        else:
            print(f"appended to {append_reference(row, cmd)}")

if __name__ == "__main__":
    main()

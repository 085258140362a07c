"""φ⁴ measurements: variational error on the free theory, neural-MCMC acceptance, HMC reference values.

    python benchmarks/phi4.py --runs l4free        # L=4, m²=1, λ=0: F/N − exact after a 1-minute budget
    python benchmarks/phi4.py --runs l6            # L=6, m²=−4, λ=6.975: acceptance after a 5-minute budget
    python benchmarks/phi4.py --hmc                # HMC reference observables → data/phi4_reference.csv (appended)
    python benchmarks/phi4.py --hmc --hmc-seed 1 --hmc-leapfrog 20 --hmc-accept 0.9   # an independent cross-check

Each training run is ``python -m models.phi4`` in a fresh process (the command is printed); its
summary.json is read back. The HMC reference uses :func:`analysis.hmc.hmc` on the action itself
(no flow), 64 chains, errors by a block jackknife over time (20 blocks); columns ``obs_<name>`` are
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

RUNS = {
    "l4free": ["--L", "4", "--m2", "1", "--lam", "0", "--epochs", "250", "--max-minutes", "1"],
    "l6": ["--L", "6", "--m2", "-4", "--lam", "6.975", "--epochs", "500", "--max-minutes", "5"],
}


def run(name: str, threads: int, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"phi4_{name}_")) / "run"
    cmd = [sys.executable, "-m", "models.phi4", *RUNS[name], *extra, "--threads", str(threads), "--quiet", "--no-plot",
           "--out", str(out)]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    s = json.loads((out / "summary.json").read_text())
    mc = s.get("neural_mcmc", {})
    print(f"{name}: {s['epochs']} epochs, {time.perf_counter() - t0:.0f} s; F/N {s['free_energy']:.6f} ± {s['stderr']:.6f}"
          + (f", error {s['error']:.2e}" if s["error"] is not None else "")
          + f"; ESS {s['ess']:.3f}; neural MCMC acceptance {mc.get('acceptance', float('nan')):.3f}", flush=True)
    return s


def hmc_reference(L: int, m2: float, lam: float, chains: int, warmup: int, samples: int, seed: int,
                  n_leapfrog: int = 10, target_accept: float = 0.8) -> dict:
    import torch

    from analysis.hmc import from_energy, hmc
    from latticeflow.phi4 import observables, phi4

    torch.set_default_dtype(torch.float64)
    target = phi4(L, m2, lam)
    gen = torch.Generator().manual_seed(seed)
    x0 = 0.1 * torch.randn(chains, target.N, generator=gen)
    t0 = time.perf_counter()
    res = hmc(from_energy(target), x0, n_samples=samples, n_leapfrog=n_leapfrog, step_size=0.1, n_warmup=warmup,
              target_accept=target_accept, generator=gen)
    obs = observables(res.samples.reshape(-1, target.N), target, n_blocks=20)  # time-major: blocks are time windows
    row = {"L": L, "m2": m2, "lam": lam, "kappa": target.kappa, "lam_tilde": target.lam_tilde,
           "chains": chains, "warmup": warmup, "samples": samples, "seed": seed, "n_leapfrog": n_leapfrog,
           "target_accept": target_accept,
           "acceptance": res.acceptance_rate, "step_size": res.step_size, "wall_s": time.perf_counter() - t0}
    for k in ("m", "abs_m", "m2", "chi", "binder", "xi", "action_density"):
        row["obs_" + k], row["obs_" + k + "_err"] = obs[k], obs[k + "_err"]  # obs_m2 = <m²>; m2 = the parameter m²
    for t, (g, e) in enumerate(zip(obs["G_t"], obs["G_t_err"])):
        row[f"obs_G_t{t}"], row[f"obs_G_t{t}_err"] = float(g), float(e)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="*", default=[], choices=sorted(RUNS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hmc", action="store_true", help="HMC reference at L=6, m²=−4, λ=6.975 → data/phi4_reference.csv")
    p.add_argument("--hmc-samples", type=int, default=4000)
    p.add_argument("--hmc-seed", type=int, default=0)
    p.add_argument("--hmc-leapfrog", type=int, default=10)
    p.add_argument("--hmc-accept", type=float, default=0.8, help="target acceptance of the step-size adaptation")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="flags after -- go to models.phi4")
    a = p.parse_args()
    extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra
    for name in a.runs:
        run(name, a.threads, extra)
    if a.hmc:
        import pandas as pd

        row = hmc_reference(6, -4.0, 6.975, chains=64, warmup=400, samples=a.hmc_samples, seed=a.hmc_seed,
                            n_leapfrog=a.hmc_leapfrog, target_accept=a.hmc_accept)
        row["command"] = (f"python benchmarks/phi4.py --hmc --hmc-samples {a.hmc_samples} --hmc-seed {a.hmc_seed} "
                          f"--hmc-leapfrog {a.hmc_leapfrog} --hmc-accept {a.hmc_accept}")
        path = ROOT / "data" / "phi4_reference.csv"  # one row per run, appended (data/ is ignored by git)
        old = pd.read_csv(path) if path.exists() else None
        new = pd.DataFrame([row])
        (new if old is None else pd.concat([old, new], ignore_index=True)).to_csv(path, index=False)
        print(pd.Series(row).to_string())
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

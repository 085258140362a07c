r"""Do the report's error bars cover the truth? z-scores against exact values, and their coverage.

On lattices small enough for exact enumeration (N ≤ 16: every observable is exact) the report
(:func:`analysis.report.compute_estimates`) is run again and again with different seeds; each
estimate with an exact value gives a z-score z = (estimate − exact)/σ. If the error bars are
honest, the z-scores of the estimates marked reliable behave like a standard normal: about
95 % within 2σ and practically none beyond 4σ. Estimates marked unreliable are counted
separately: the report already tells the user not to use them.

Plain flow averages and the variational free energy are left out: they are not estimates of
the target (:mod:`analysis.diagnostics`). The rows of one run are correlated (all observables
of one sampler come from the same samples), so coverage is judged over many seeds and flows.

Used by ``tests/test_calibration.py`` (small and fast) and ``benchmarks/calibration.py``
(the README's coverage table).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import replace

import numpy as np
import pandas as pd

import torch

from latticeflow.config import IsingConfig
from latticeflow.flow import Flow
from latticeflow.ising import IsingHS

from .report import ReportSettings, compute_estimates

__all__ = ["NOT_ESTIMATES", "coverage", "trained_stages", "zscores"]

NOT_ESTIMATES = ("flow plain", "flow variational")


def zscores(flow: Flow, target: IsingHS, seeds: Iterable[int], settings: ReportSettings | None = None,
            **labels: object) -> pd.DataFrame:
    """One row per (seed, quantity, method) with an exact value: z-score and verdict.

    Args:
        flow: the flow (float64 recommended).
        target: its target; exact values come from :func:`analysis.latent.exact_reference`.
        seeds: the report seeds to run.
        settings: report settings (``seed``, ``plots`` and ``verbose`` are overridden).
        **labels: constant columns added to every row (e.g. ``L=4, stage="partly trained"``).

    Returns:
        DataFrame with columns seed, quantity, method, value, stderr, exact, z, reliable, reason,
        pareto_k and ess_fraction (of the run's flow samples) and the labels.
    """
    base = settings if settings is not None else ReportSettings()
    rows = []
    for seed in seeds:
        res = compute_estimates(flow, target, replace(base, seed=int(seed), plots=False, verbose=False))
        iw = res["flow"].importance
        for r in res["rows"]:
            if r["method"] in NOT_ESTIMATES or not math.isfinite(r["exact"]) or not math.isfinite(r["deviation_sigma"]):
                continue
            rows.append({"seed": int(seed), "quantity": r["quantity"], "method": r["method"], "value": r["value"],
                         "stderr": r["stderr"], "exact": r["exact"], "z": r["deviation_sigma"],
                         "reliable": bool(r["reliable"]), "reason": r["reason"], "pareto_k": iw.pareto_k,
                         "ess_fraction": iw.ess / iw.n, **labels})
    return pd.DataFrame.from_records(rows)


def trained_stages(config: IsingConfig, stages: dict[str, int]) -> Iterator[tuple[str, int, Flow, IsingHS]]:
    """One flow trained in memory, handed out at several stages of training (float64 copies, eval mode).

    Args:
        config: the run (L, β, potential, ...); its ``epochs`` sets the learning-rate schedule.
        stages: label → epoch count, e.g. ``{"barely": 5, "partly": 60, "well": 400}``.

    Yields:
        (label, epochs, flow, target) in the order of increasing epochs.
    """
    from latticeflow.build import make_trainer

    trainer, target = make_trainer(config, progress=False)
    flow = trainer.flow
    done = 0
    for label, epochs in sorted(stages.items(), key=lambda kv: kv[1]):
        if epochs > done:
            trainer.fit(epochs)
            done = epochs
        yield label, epochs, _float64_copy(flow), target


def _float64_copy(flow: Flow) -> Flow:
    import copy

    return copy.deepcopy(flow).to(torch.float64).eval()


def coverage(z: pd.DataFrame, by: str | list[str] = "method") -> pd.DataFrame:
    """Coverage of the reliable z-scores per group: count, fraction within 1σ, 2σ, beyond 4σ, max |z|.

    Returns:
        DataFrame indexed by ``by`` with columns reliable, unreliable, within_1sigma, within_2sigma,
        beyond_4sigma (a count), max_abs_z (NaN where no estimate is reliable).
    """
    def one(g: pd.DataFrame) -> pd.Series:
        a = np.abs(g.loc[g["reliable"], "z"].to_numpy(dtype=float))
        n = a.size
        return pd.Series({"reliable": n, "unreliable": int((~g["reliable"]).sum()),
                          "within_1sigma": float((a < 1).mean()) if n else math.nan,
                          "within_2sigma": float((a < 2).mean()) if n else math.nan,
                          "beyond_4sigma": int((a > 4).sum()),
                          "max_abs_z": float(a.max()) if n else math.nan})

    return z.groupby(by).apply(one, include_groups=False)

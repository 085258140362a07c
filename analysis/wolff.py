"""Cluster Monte Carlo for the periodic L×L Ising model: Swendsen-Wang and Wolff.

Reference chains for the flow results: H = −J Σ_bonds s_i s_j with J = 1 on the periodic
square lattice (bonds from :class:`latticeflow.lattice.SquareLattice`, so the doubled bonds
of the L=2 torus count twice), Boltzmann weight e^{−βH}. Both algorithms activate a bond
between two aligned neighbours with probability p = 1 − e^{−2βJ} (Fortuin-Kasteleyn); a
doubled bond is two independent chances.

* ``"swendsen-wang"`` (Swendsen & Wang, PRL 58, 86 (1987)): activate every bond, find all
  clusters with ``scipy.sparse.csgraph.connected_components``, flip each cluster with
  probability ½. One update = one sweep of the whole lattice.
* ``"wolff"`` (Wolff, PRL 62, 361 (1989)): grow one cluster from a random seed site by a
  breadth-first search on the neighbour table (the frontier of all chains is one numpy index
  array; every bond from a new cluster site to an aligned outside site is tried once) and
  flip it. One update = one cluster flip; ``mean_cluster_size / N`` converts updates to sweeps.

C independent chains run side by side (vectorised: SW treats them as one disconnected graph
of C·N sites, Wolff grows C clusters at once), so the measurement arrays have shape
(n_sweeps, C). There is no accept/reject step: both algorithms are rejection free.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from latticeflow._checks import check_positive, check_size
from latticeflow.lattice import SquareLattice

from .autocorr import integrated_time, mean_with_error
from .free_energy import Estimate
from .observables import summarize

__all__ = ["ALGORITHMS", "ClusterChain", "cluster_chain"]

ALGORITHMS = ("swendsen-wang", "wolff")


@dataclass
class ClusterChain:
    """Measurements of a cluster Monte Carlo run.

    Attributes:
        L, beta, algorithm: the run's settings.
        m: magnetisation per site after each update, shape (n_sweeps, C).
        energy: energy per site e = H/N after each update, shape (n_sweeps, C).
        seconds: wall time of the whole run (thermalisation included).
        mean_cluster_size: Wolff: mean flipped-cluster size (sites); SW: mean size of the
            cluster holding a given site, Σ|c|²/N, which is the same quantity.
        mean_n_clusters: SW only: mean number of clusters per sweep (NaN for Wolff).
        final_spins: the last configuration of every chain, shape (C, N), int8.
    """

    L: int
    beta: float
    algorithm: str
    m: np.ndarray
    energy: np.ndarray
    seconds: float
    mean_cluster_size: float
    mean_n_clusters: float
    final_spins: np.ndarray = field(repr=False)

    @property
    def N(self) -> int:
        """Number of sites L²."""
        return self.L * self.L

    @property
    def abs_m(self) -> np.ndarray:
        """|m| per update, shape (n_sweeps, C)."""
        return np.abs(self.m)

    def series(self, name: str) -> np.ndarray:
        """Per-update series ``m``, ``abs_m``, ``m2``, ``m4``, ``energy`` or ``energy_sq``, shape (n, C)."""
        table = {
            "m": lambda: self.m,
            "abs_m": lambda: self.abs_m,
            "m2": lambda: self.m**2,
            "m4": lambda: self.m**4,
            "energy": lambda: self.energy,
            "energy_sq": lambda: self.energy**2,
        }
        if name not in table:
            raise ValueError(f"name must be one of {', '.join(map(repr, table))}; got name={name!r}")
        return table[name]()

    def integrated_time(self, name: str) -> float:
        """τ of one series (in updates), chains' autocorrelations averaged."""
        return integrated_time(self.series(name))

    def estimate(self, name: str) -> Estimate:
        """Mean of a series with the error √(Var·τ/(n·C)) from its integrated time."""
        return mean_with_error(self.series(name))

    def observables(self, n_blocks: int = 50) -> dict[str, Estimate]:
        """All averages and derived observables (Binder, χ, C) with time-block jackknife errors.

        The blocks are contiguous in time across all chains; keep n_sweeps / n_blocks well
        above the integrated times.
        """
        moments = {k: self.series(k).reshape(-1) for k in ("m", "abs_m", "m2", "m4", "energy", "energy_sq")}
        return summarize(moments, self.N, beta=self.beta, n_blocks=n_blocks)


# ---------------------------------------------------------------------- updates
class _SwendsenWang:
    def __init__(self, lattice: SquareLattice, n_chains: int, p: float) -> None:
        N, C = lattice.N, n_chains
        b = lattice.bonds.numpy()
        b = b[np.argsort(b[:, 0], kind="stable")]  # sorted by first site: CSR rows come for free
        offset = (np.arange(C) * N)[:, None]
        self.i = (b[:, 0][None, :] + offset).reshape(-1)  # (C·E,) bonds of all chains
        self.j = (b[:, 1][None, :] + offset).reshape(-1)
        self.C, self.N, self.p = C, N, p
        self.cluster_sizes: list[float] = []
        self.n_clusters: list[float] = []

    def __call__(self, s: np.ndarray, rng: np.random.Generator) -> None:
        flat = s.reshape(-1)
        n = flat.size
        active = (flat[self.i] == flat[self.j]) & (rng.random(self.i.size) < self.p)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(self.i[active], minlength=n), out=indptr[1:])
        indices = self.j[active]
        graph = sp.csr_matrix((np.ones(indices.size, dtype=np.int8), indices, indptr), shape=(n, n))
        n_comp, labels = connected_components(graph, directed=False)
        flip = np.where(rng.random(n_comp) < 0.5, -1, 1).astype(np.int8)
        flat *= flip[labels]
        sizes = np.bincount(labels, minlength=n_comp).astype(np.float64)
        self.cluster_sizes.append(float(sizes @ sizes / n))
        self.n_clusters.append(n_comp / self.C)


class _Wolff:
    def __init__(self, lattice: SquareLattice, n_chains: int, p: float) -> None:
        self.nbr = lattice.neighbours.numpy().reshape(-1)  # flat (N·4,): nbr[4k + d]
        self.C, self.N, self.p = n_chains, lattice.N, p
        self.cluster_sizes: list[float] = []

    def __call__(self, s: np.ndarray, rng: np.random.Generator) -> None:
        C, N = self.C, self.N
        rows = np.arange(C)
        seed = rng.integers(N, size=C)
        aligned = (s == s[rows, seed][:, None]).reshape(-1)  # flat (C·N,): candidates
        cluster = np.zeros(C * N, dtype=bool)
        frontier = rows * N + seed  # flat indices c·N + k of the newest cluster sites
        cluster[frontier] = True
        while frontier.size:
            # every bond from a new cluster site to an aligned outside site is tried once
            c, k = np.divmod(np.repeat(frontier, 4), N)
            target = c * N + self.nbr[4 * k + np.tile(np.arange(4), frontier.size)]
            ok = (rng.random(target.size) < self.p) & aligned[target] & ~cluster[target]
            frontier = np.unique(target[ok])  # a site reached by two bonds joins once
            cluster[frontier] = True
        s.reshape(-1)[cluster] *= -1
        self.cluster_sizes.append(float(cluster.sum() / C))


def cluster_chain(
    L: int,
    beta: float,
    n_sweeps: int,
    n_thermalize: int = 1000,
    seed: int | None = 0,
    algorithm: str = "swendsen-wang",
    n_chains: int = 16,
) -> ClusterChain:
    """Run C independent cluster Monte Carlo chains of the periodic L×L Ising model (J = 1).

    Args:
        L: linear size, integer >= 2.
        beta: inverse temperature β > 0.
        n_sweeps: measured updates per chain (SW sweeps, or Wolff cluster flips).
        n_thermalize: discarded updates per chain before measuring, >= 0.
        seed: seed of the numpy Generator (None: fresh entropy).
        algorithm: ``"swendsen-wang"`` or ``"wolff"``.
        n_chains: number of independent chains C run in parallel, >= 1.

    Returns:
        a :class:`ClusterChain` with m and e per update, shape (n_sweeps, C), timing and
        cluster statistics. Chains start from random (infinite-temperature) configurations.

    Raises:
        ValueError: any argument out of range or an unknown algorithm.

    Example:
        >>> run = cluster_chain(L=16, beta=0.4406868, n_sweeps=2000, n_thermalize=200)
        >>> run.estimate("abs_m")  # doctest: +SKIP
    """
    L = check_size("L", L, 2)
    beta = check_positive("beta", beta)
    n_sweeps = check_size("n_sweeps", n_sweeps, 1)
    n_thermalize = check_size("n_thermalize", n_thermalize, 0)
    n_chains = check_size("n_chains", n_chains, 1)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(map(repr, ALGORITHMS))}; got algorithm={algorithm!r}")
    with warnings.catch_warnings():  # the doubled L=2 bonds are intended here (see module docstring)
        warnings.simplefilter("ignore")
        lattice = SquareLattice(L)
    N = lattice.N
    p = -math.expm1(-2.0 * beta)  # 1 − e^{−2β}
    rng = np.random.default_rng(seed)
    update = (_SwendsenWang if algorithm == "swendsen-wang" else _Wolff)(lattice, n_chains, p)
    b = lattice.bonds.numpy()
    bi, bj = b[:, 0], b[:, 1]

    start = time.perf_counter()
    s = np.where(rng.random((n_chains, N)) < 0.5, 1, -1).astype(np.int8)
    for _ in range(n_thermalize):
        update(s, rng)
    update.cluster_sizes.clear()
    if hasattr(update, "n_clusters"):
        update.n_clusters.clear()
    m = np.empty((n_sweeps, n_chains))
    e = np.empty((n_sweeps, n_chains))
    for k in range(n_sweeps):
        update(s, rng)
        m[k] = s.sum(1, dtype=np.int64) / N
        e[k] = -(s[:, bi].astype(np.int64) * s[:, bj]).sum(1) / N
    seconds = time.perf_counter() - start
    return ClusterChain(
        L=L,
        beta=beta,
        algorithm=algorithm,
        m=m,
        energy=e,
        seconds=seconds,
        mean_cluster_size=float(np.mean(update.cluster_sizes)),
        mean_n_clusters=float(np.mean(update.n_clusters)) if hasattr(update, "n_clusters") else math.nan,
        final_spins=s.copy(),
    )

"""The L×L square lattice.

Sites are numbered i = row·L + col (row-major), so a configuration of shape (B, N) with
N = L² reshapes to (B, L, L) images without copying. The lattice is periodic (a torus)
by default; ``boundary="open"`` drops the wrap-around bonds.

The graph itself is a :class:`networkx.MultiGraph` (``lattice.graph``) so users can run
any networkx algorithm on it; the tensors below are what the numerical code uses.
"""

from __future__ import annotations

import warnings
from functools import cached_property

import networkx as nx
import numpy as np
import torch
from torch import Tensor

from ._checks import check_choice, check_size

BOUNDARIES = ("periodic", "open")

# Neighbour order used by ``SquareLattice.neighbours``: right, down, left, up.
_OFFSETS = ((0, 1), (1, 0), (0, -1), (-1, 0))


class SquareLattice:
    """An L×L square lattice with periodic or open boundaries.

    Args:
        L: linear size, an integer >= 2.
        boundary: ``"periodic"`` (torus) or ``"open"``.

    Attributes:
        L: linear size.
        N: number of sites, L².
        boundary: the boundary condition.

    Example:
        >>> lat = SquareLattice(4)
        >>> lat.neighbours.shape, lat.bonds.shape
        (torch.Size([16, 4]), torch.Size([32, 2]))
    """

    def __init__(self, L: int, boundary: str = "periodic") -> None:
        self.L = check_size("L", L, minimum=2)
        self.boundary = check_choice("boundary", boundary, BOUNDARIES)
        self.N = self.L * self.L
        if self.periodic and self.L == 2:
            warnings.warn(
                "on the periodic L=2 lattice each neighbour pair is joined by two bonds (one each way "
                "around the torus); bonds, adjacency and couplings count both, as Kaufman's formula and "
                "brute-force enumeration do",
                stacklevel=2,
            )

    @property
    def periodic(self) -> bool:
        """True for the torus."""
        return self.boundary == "periodic"

    def __repr__(self) -> str:
        return f"SquareLattice(L={self.L}, boundary={self.boundary!r})"

    @cached_property
    def coords(self) -> Tensor:
        """(row, col) of every site, shape (N, 2), int64."""
        r, c = torch.meshgrid(torch.arange(self.L), torch.arange(self.L), indexing="ij")
        return torch.stack([r.reshape(-1), c.reshape(-1)], dim=1)

    @cached_property
    def neighbours(self) -> Tensor:
        """Neighbour table, shape (N, 4), ordered right, down, left, up; -1 where open boundaries cut."""
        r, c = self.coords[:, 0], self.coords[:, 1]
        cols = []
        for dr, dc in _OFFSETS:
            rr, cc = r + dr, c + dc
            j = (rr % self.L) * self.L + (cc % self.L)
            if not self.periodic:
                outside = (rr < 0) | (rr >= self.L) | (cc < 0) | (cc >= self.L)
                j = torch.where(outside, torch.full_like(j, -1), j)
            cols.append(j)
        return torch.stack(cols, dim=1)

    @cached_property
    def bonds(self) -> Tensor:
        """Bond list, shape (E, 2): the right and down bond of every site, each bond once.

        On the periodic lattice E = 2N; on the L=2 torus the same pair appears twice,
        which is the bond multiplicity of that graph. Open boundaries: E = 2L(L-1).
        """
        i = torch.arange(self.N)
        pairs = torch.cat([torch.stack([i, self.neighbours[:, 0]], 1), torch.stack([i, self.neighbours[:, 1]], 1)])
        return pairs[(pairs[:, 1] >= 0)]

    def adjacency(self) -> np.ndarray:
        """Adjacency matrix with bond multiplicity, shape (N, N), float64 (dense; small N)."""
        A = np.zeros((self.N, self.N))
        b = self.bonds.numpy()
        np.add.at(A, (b[:, 0], b[:, 1]), 1.0)
        np.add.at(A, (b[:, 1], b[:, 0]), 1.0)
        return A

    def coupling_kernel(self) -> Tensor:
        """Row 0 of the circulant adjacency as an (L, L) image (periodic lattices only).

        ``A x`` equals the circular convolution of the (L, L) image of x with this kernel,
        which is how the Ising couplings are applied in O(N log N) (see ising.py). For L=2
        the two bonds of a pair land on the same entry, giving weight 2.
        """
        if not self.periodic:
            raise ValueError("coupling_kernel needs a periodic lattice, got boundary='open'")
        k = torch.zeros(self.L, self.L, dtype=torch.float64)
        for dr, dc in _OFFSETS:
            k[dr % self.L, dc % self.L] += 1.0
        return k

    @cached_property
    def graph(self) -> nx.MultiGraph:
        """The lattice as a networkx MultiGraph; node i has attribute ``pos=(row, col)``."""
        g = nx.MultiGraph()
        for i, (r, c) in enumerate(self.coords.tolist()):
            g.add_node(i, pos=(r, c))
        g.add_edges_from(self.bonds.tolist())
        return g

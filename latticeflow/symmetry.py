"""Symmetry groups of the square lattice as permutation tables.

A group element g acts on a configuration x (shape (..., N)) as

    (g·x)_i = s_g · x[p_g[i]],

with a site permutation p_g (row g of ``perms``, shape (G, N)) and a sign s_g = ±1
(``signs``, shape (G,)) for the Z2 spin flip. Acting with the whole group is therefore one
indexing operation (NetKet's design). The action is orthogonal, so for φ(x) = φ̃(g·x)

    ∇φ(x) = gᵀ ∇φ̃(g·x),   i.e.  ∇φ(x)[j] = s_g · ∇φ̃(g·x)[inverse_perms[g, j]],

and the Laplacian is unchanged. Products follow a·(b·x): perm p_b[p_a], sign s_a·s_b.

Groups: ``translation_group`` (L² elements, periodic lattices), ``point_group`` (D4, 8),
``space_group`` (translations × D4, 8L²) and ``with_spin_flip`` (× Z2, doubling the order:
16L² for the full group of the periodic Ising model). On the L=2 torus several of these
operations coincide as permutations (a translation by one site equals a reflection), so the
distinct elements are fewer: the tables keep each distinct element once and say so.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from .lattice import SquareLattice


def _hash_rows(perms: np.ndarray, signs: np.ndarray, key: np.ndarray) -> np.ndarray:
    # Integer dot product with random odd weights (wrapping int64 arithmetic): distinct
    # permutations collide with probability ~G²/2^64, checked exactly in SymmetryGroup.__init__.
    return perms.astype(np.int64) @ key * 2 + (signs < 0)


class SymmetryGroup:
    """A finite group acting on configurations by signed site permutations.

    Args:
        perms: site permutations, shape (G, N), each row a permutation of range(N).
        signs: ±1 per element, shape (G,); defaults to all +1.
        name: label used in repr and error messages.

    Attributes:
        perms: LongTensor (G, N).
        signs: float64 tensor (G,) of ±1.
        inverse_perms: LongTensor (G, N), inverse_perms[g] = argsort(perms[g]).
        order: G.
        dim: N.

    Raises:
        ValueError: rows that are not permutations, signs not ±1, or no identity element.
    """

    def __init__(self, perms: Tensor | np.ndarray, signs: Tensor | np.ndarray | None = None, name: str = "group"):
        p = np.asarray(perms, dtype=np.int64)
        if p.ndim != 2:
            raise ValueError(f"perms must have shape (G, N), got shape={p.shape}")
        G, N = p.shape
        s = np.ones(G) if signs is None else np.asarray(signs, dtype=np.float64).reshape(-1)
        if s.shape != (G,) or not np.all(np.abs(s) == 1):
            raise ValueError(f"signs must be ±1 with shape ({G},), got {s!r}")
        if not np.array_equal(np.sort(p, axis=1), np.broadcast_to(np.arange(N), (G, N))):
            raise ValueError(f"every row of perms must be a permutation of range({N})")
        key = np.random.default_rng(12345).integers(1, 2**62, size=N, dtype=np.int64) | 1
        h = _hash_rows(p, s, key)
        _, first = np.unique(h, return_index=True)
        first = np.sort(first)
        p, s, h = p[first], s[first], h[first]  # keep each distinct element once, in order
        self.name = name
        self.perms = torch.from_numpy(p)
        self.signs = torch.from_numpy(s)
        self.order, self.dim = p.shape
        self._key = key
        self._sorted_hash_order = np.argsort(h)
        self._sorted_hash = h[self._sorted_hash_order]
        ident = self.index_of(np.arange(N)[None], np.ones(1))
        if ident[0] < 0:
            raise ValueError(f"{name}: the identity permutation is not in the table")
        self.identity = int(ident[0])

    def __repr__(self) -> str:
        return f"SymmetryGroup(name={self.name!r}, order={self.order}, dim={self.dim})"

    def __len__(self) -> int:
        return self.order

    # ------------------------------------------------------------------ lookup
    def index_of(self, perms: np.ndarray, signs: np.ndarray) -> np.ndarray:
        """Index of each (perm, sign) in the table, -1 where it is not an element. Shapes (M, N), (M,)."""
        perms = np.asarray(perms, dtype=np.int64)
        signs = np.asarray(signs, dtype=np.float64)
        h = _hash_rows(perms, signs, self._key)
        pos = np.clip(np.searchsorted(self._sorted_hash, h), 0, self.order - 1)
        idx = self._sorted_hash_order[pos]
        found = (self._sorted_hash[pos] == h) & np.all(self.perms.numpy()[idx] == perms, axis=1)
        found &= self.signs.numpy()[idx] == signs
        return np.where(found, idx, -1)

    @cached_property
    def inverse_perms(self) -> Tensor:
        """inverse_perms[g] = argsort(perms[g]), shape (G, N)."""
        return torch.argsort(self.perms, dim=1)

    @cached_property
    def inverse(self) -> Tensor:
        """Index of g⁻¹ for every g, shape (G,)."""
        return torch.from_numpy(self.index_of(self.inverse_perms.numpy(), self.signs.numpy()))

    def product(self, a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> Tensor:
        """Index of the element a·b (act with b first, then a), elementwise over index arrays.

        Returns -1 wherever the product is not in the table (only possible for a set of
        permutations that is not closed, i.e. not a group).
        """
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        a, b = np.broadcast_arrays(a, b)
        P, S = self.perms.numpy(), self.signs.numpy()
        out = np.empty(a.shape, dtype=np.int64)
        flat_a, flat_b, flat_out = a.reshape(-1), b.reshape(-1), out.reshape(-1)
        chunk = max(1, 2**22 // max(self.dim, 1))
        for start in range(0, flat_a.size, chunk):
            ia, ib = flat_a[start:start + chunk], flat_b[start:start + chunk]
            comp = np.take_along_axis(P[ib], P[ia], axis=1)  # p_b[p_a]
            flat_out[start:start + chunk] = self.index_of(comp, S[ia] * S[ib])
        return torch.from_numpy(out)

    @cached_property
    def product_table(self) -> Tensor:
        """Cayley table, shape (G, G): table[a, b] = index of a·b. O(G²N) work: small groups."""
        g = np.arange(self.order)
        return self.product(g[:, None], g[None, :])

    # ------------------------------------------------------------------ action
    def act(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """Apply group elements to a batch.

        Args:
            x: configurations, shape (B, N).
            index: element per sample, shape (B,); None applies every element.

        Returns:
            (G, B, N) with all images if ``index`` is None, else (B, N).
        """
        signs = self.signs.to(x)
        if index is None:
            return signs[:, None, None] * x[:, self.perms].transpose(0, 1)
        return signs[index][:, None] * torch.gather(x, 1, self.perms[index])

    def with_spin_flip(self) -> "SymmetryGroup":
        """The direct product with Z2 spin flip (x → −x): twice the order."""
        return SymmetryGroup(
            torch.cat([self.perms, self.perms]),
            torch.cat([self.signs, -self.signs]),
            name=f"{self.name}×Z2",
        )

    def is_automorphism_of(self, lattice: SquareLattice) -> Tensor:
        """For each element, whether its site map sends the bond multiset onto itself. Shape (G,), bool."""
        if lattice.N != self.dim:
            raise ValueError(f"group acts on N={self.dim} sites, lattice has N={lattice.N}")
        b = lattice.bonds
        N = lattice.N

        def encode(pairs: Tensor) -> Tensor:
            lo, hi = torch.minimum(pairs[..., 0], pairs[..., 1]), torch.maximum(pairs[..., 0], pairs[..., 1])
            return torch.sort(lo * N + hi, dim=-1).values

        # site j moves to position inverse_perms[g, j]
        mapped = self.inverse_perms[:, b]  # (G, E, 2)
        return (encode(mapped) == encode(b)[None]).all(dim=1)


# ---------------------------------------------------------------------- constructors
def _from_maps(lattice: SquareLattice, rows: Tensor, cols: Tensor, name: str) -> SymmetryGroup:
    """Group from site maps: element g takes its value at site i from (rows[g, i], cols[g, i])."""
    return SymmetryGroup(rows * lattice.L + cols, name=name)


def _check_lattice(lattice: object) -> SquareLattice:
    if not isinstance(lattice, SquareLattice):
        raise TypeError(f"expected a SquareLattice, got {type(lattice).__name__}; build one with SquareLattice(L)")
    return lattice


def _d4_maps(L: int, r: Tensor, c: Tensor) -> list[tuple[Tensor, Tensor]]:
    m = L - 1
    return [(r, c), (c, m - r), (m - r, m - c), (m - c, r), (r, m - c), (m - r, c), (c, r), (m - c, m - r)]


def translation_group(lattice: SquareLattice) -> SymmetryGroup:
    """The L² lattice translations of a periodic lattice.

    Raises:
        ValueError: the lattice has open boundaries (translations are not symmetries there).
    """
    lattice = _check_lattice(lattice)
    if not lattice.periodic:
        raise ValueError("translation_group needs a periodic lattice, got boundary='open'")
    L = lattice.L
    r, c = lattice.coords[:, 0], lattice.coords[:, 1]
    a, b = torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij")
    a, b = a.reshape(-1, 1), b.reshape(-1, 1)
    return _from_maps(lattice, (r + a) % L, (c + b) % L, "translations")


def point_group(lattice: SquareLattice) -> SymmetryGroup:
    """The dihedral group D4 (4 rotations, 4 reflections) about the lattice centre: 8 elements."""
    lattice = _check_lattice(lattice)
    r, c = lattice.coords[:, 0], lattice.coords[:, 1]
    maps = _d4_maps(lattice.L, r, c)
    return _from_maps(lattice, torch.stack([m[0] for m in maps]), torch.stack([m[1] for m in maps]), "D4")


def space_group(lattice: SquareLattice) -> SymmetryGroup:
    """Translations × D4 on a periodic lattice: 8L² elements (8 on the L=2 torus, where they coincide)."""
    lattice = _check_lattice(lattice)
    T = translation_group(lattice)
    D = point_group(lattice)
    # t∘d: apply d then t, perm = p_d[p_t]
    perms = D.perms[None, :, :].expand(T.order, -1, -1).gather(2, T.perms[:, None, :].expand(-1, D.order, -1))
    return SymmetryGroup(perms.reshape(-1, lattice.N), name="space group")


def spin_flip_group(N: int) -> SymmetryGroup:
    """Z2 = {1, −1} acting on N sites by a global sign."""
    ident = torch.arange(N).expand(2, N)
    return SymmetryGroup(ident, torch.tensor([1.0, -1.0]), name="Z2")

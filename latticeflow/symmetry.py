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
distinct elements are fewer: the tables keep each distinct element once and say so. Large
translation and space groups (from L = 27 for the space group) are :class:`FactoredGroup` objects: the same elements in the
same order, with the rows of drawn elements computed from the point group's tables and the site
coordinates instead of read from a (G, N) table (2 GiB per int64 table at L=64); ``rows`` is the
one way the random symmetrisation reads elements, from either kind.

This module is also the one home of the D4 geometry and of the group action that the rest of
the library uses:

- :func:`d4_maps`: the 8 rotations and reflections of the square as maps of grid coordinates
  (r, c) ↦ (r', c'), about the centre of an L×L grid (m = L − 1) or about the origin for
  displacements taken mod L (m = 0). ``point_group`` is built from it, and so are
  :func:`displacement_orbits` (the D4 orbits of displacements, for circulant and convolution
  kernels) and :func:`d4_average` (the D4 average of k×k kernels).
- :func:`signed_permutation` (one element per sample, differentiable with the inverse
  permutation as its adjoint) and :func:`all_images` (every element on every sample): the
  only code that applies a group element; :meth:`SymmetryGroup.act` and
  ``potentials.Symmetrized`` call them.

Symbols: B batch, N sites, G group order, L lattice size, k kernel size.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .lattice import SquareLattice
from .native import step as native_step


def _hash_rows(perms: np.ndarray, signs: np.ndarray, key: np.ndarray) -> np.ndarray:
    # Integer dot product with random odd weights (wrapping int64 arithmetic): distinct
    # permutations collide with probability ~G²/2^64, checked exactly in SymmetryGroup.__init__.
    return np.asarray(perms, dtype=np.int64) @ key * 2 + (signs < 0)  # no copy of an int64 table


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

    def __init__(self, perms: Tensor | np.ndarray, signs: Tensor | np.ndarray | None = None,
                 name: str = "group") -> None:
        p = np.asarray(perms, dtype=np.int64)
        if p.ndim != 2:
            raise ValueError(f"perms must have shape (G, N), got shape={p.shape}")
        G, N = p.shape
        s = np.ones(G) if signs is None else np.asarray(signs, dtype=np.float64).reshape(-1)
        if s.shape != (G,) or not np.all(np.abs(s) == 1):
            raise ValueError(f"signs must be ±1 with shape ({G},), got {s!r}")
        chunk = max(1, 2**22 // max(N, 1))  # sorted copies of a few rows at a time: the table can take GiB
        for start in range(0, G, chunk):
            rows = np.sort(p[start:start + chunk], axis=1)
            if not np.array_equal(rows, np.broadcast_to(np.arange(N), rows.shape)):
                raise ValueError(f"every row of perms must be a permutation of range({N})")
        key = np.random.default_rng(12345).integers(1, 2**62, size=N, dtype=np.int64) | 1
        h = _hash_rows(p, s, key)
        _, first = np.unique(h, return_index=True)
        first = np.sort(first)
        if len(first) < G:  # keep each distinct element once, in order (no copy when all are distinct)
            p, s, h = p[first], s[first], h[first]
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
        """inverse_perms[g] = argsort(perms[g]), shape (G, N): one scatter, inverse[g, perms[g, i]] = i."""
        ramp = torch.arange(self.dim).expand(self.order, -1)
        return torch.empty_like(self.perms).scatter_(1, self.perms, ramp)

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

    # ------------------------------------------------------------------ rows of elements
    #: what :meth:`rows_from` needs besides the tables: none for a dense table
    row_spec: tuple[int, ...] = ()

    def row_tables(self) -> dict[str, Tensor]:
        """The tensors :meth:`rows_from` reads (shared, not copied): here the (G, N) tables."""
        return {"perms": self.perms, "inverse_perms": self.inverse_perms}

    @staticmethod
    def rows_from(tables: dict[str, Tensor], spec: tuple[int, ...], index: Tensor) -> tuple[Tensor, Tensor]:
        """perms[index] and inverse_perms[index], each (B, N), from :meth:`row_tables` (on their device)."""
        # index_select: advanced indexing of a (G, N) table is an order of magnitude slower
        return tables["perms"].index_select(0, index), tables["inverse_perms"].index_select(0, index)

    def rows(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The permutation and inverse permutation of each element in ``index`` (B,): two (B, N) tables."""
        return self.rows_from(self.row_tables(), self.row_spec, index)

    # ------------------------------------------------------------------ action
    def act(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """Apply group elements to a batch.

        Args:
            x: configurations, shape (B, N).
            index: element per sample, LongTensor (B,); None applies every element.

        Returns:
            (G, B, N) with all images if ``index`` is None (:func:`all_images`), else (B, N)
            (:func:`signed_permutation`, differentiable any number of times).
        """
        signs = self.signs.to(x)
        if index is None:
            return all_images(x, self.perms, signs).transpose(0, 1)
        return signed_permutation(x, self.perms[index], self.inverse_perms[index], signs[index][:, None])

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


class FactoredGroup(SymmetryGroup):
    """Translations × a point group (× Z2) of a periodic L×L lattice, stored as its factors.

    Element g = f·(L²·P) + t·P + d, with t = a·L + b a translation by (a, b), d an element of
    the point group (P elements, sign +1) and f the spin flip, acts as

        (g·x)_i = (−1)^f · x[p_d[p_t[i]]],   p_t[i] = the site at (r_i + a, c_i + b) mod L:

    the same elements in the same order as the dense table of :func:`space_group` or
    :func:`translation_group` (``factored=False``), followed by ``with_spin_flip``. Instead of
    the (G, N) tables (at L=64 the space group × Z2 has 65,536 elements on 4,096 sites: 2 GiB
    per int64 table, and the inverse as much again) it keeps the point group's (P, N) tables and
    the site coordinates, and :meth:`rows` computes the rows of drawn elements by index
    arithmetic (a few (B, N) integer operations). Everything that needs the whole table
    (``perms``, ``inverse_perms``, ``index_of``, ``product``, the exact group average) builds
    the dense group once, on first use (:attr:`dense`).

    Args:
        lattice: a periodic SquareLattice.
        point: the point group (a dense SymmetryGroup on the lattice's sites, signs +1), or None
            for translations only.
        spin_flip: include the Z2 spin flip (doubling the order).
        name: label.
    """

    def __init__(self, lattice: SquareLattice, point: SymmetryGroup | None = None, spin_flip: bool = False,
                 name: str = "group") -> None:
        lattice = _check_lattice(lattice)
        if not lattice.periodic:
            raise ValueError("a factored group needs a periodic lattice, got boundary='open'")
        N = lattice.N
        if point is not None and (point.dim != N or bool((point.signs < 0).any())):
            raise ValueError(f"the point group must act on the lattice's {N} sites without a spin flip")
        self.L = lattice.L
        self.point = point
        self.spin_flip = bool(spin_flip)
        P = 1 if point is None else point.order
        self.name, self.dim = name, N
        self.order = self.L * self.L * P * (2 if spin_flip else 1)
        half = self.L * self.L * P
        self.signs = torch.cat([torch.ones(half, dtype=torch.float64), -torch.ones(half, dtype=torch.float64)]) \
            if spin_flip else torch.ones(half, dtype=torch.float64)
        self.identity = 0
        self._lattice = lattice
        self.row_spec = (self.L, P)
        ramp = torch.arange(N)[None]
        self._tables = {"point_perms": ramp if point is None else point.perms,
                        "point_inverse": ramp if point is None else point.inverse_perms,
                        "site_rows": lattice.coords[:, 0].long(), "site_cols": lattice.coords[:, 1].long()}

    def __repr__(self) -> str:
        return f"FactoredGroup(name={self.name!r}, order={self.order}, dim={self.dim})"

    def __getattr__(self, name: str) -> Any:
        # what only the whole table answers (perms, the hash index of index_of, ...) comes from the dense group
        if name.startswith("__") or name in ("dense", "_tables", "point"):
            raise AttributeError(name)
        return getattr(self.dense, name)

    @cached_property
    def dense(self) -> SymmetryGroup:
        """The same group as a dense table (built on first use: G·N integers)."""
        perms, _ = self.rows(torch.arange(self.order))
        return SymmetryGroup(perms, self.signs, name=self.name)

    @property
    def inverse_perms(self) -> Tensor:  # type: ignore[override]
        return self.dense.inverse_perms

    def row_tables(self) -> dict[str, Tensor]:
        return dict(self._tables)

    @staticmethod
    def rows_from(tables: dict[str, Tensor], spec: tuple[int, ...], index: Tensor) -> tuple[Tensor, Tensor]:
        """Rows of the elements ``index`` (B,) by index arithmetic: perm[i] = p_d[p_t[i]], and its inverse
        inverse[j] = p_t⁻¹[p_d⁻¹[j]], p_t⁻¹ the translation by (−a, −b)."""
        L, P = spec
        base = index % (L * L * P)  # the spin flip only changes the sign
        t = torch.div(base, P, rounding_mode="floor")
        d = base - t * P
        a = torch.div(t, L, rounding_mode="floor")[:, None]
        b = (t % L)[:, None]
        r, c = tables["site_rows"], tables["site_cols"]
        shifted = ((r + a) % L) * L + (c + b) % L  # p_t, (B, N)
        perm = torch.gather(tables["point_perms"].index_select(0, d), 1, shifted)
        q = tables["point_inverse"].index_select(0, d)  # p_d⁻¹, (B, N)
        inverse = ((r[q] - a) % L) * L + (c[q] - b) % L
        return perm, inverse

    def act(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        if index is None:
            return self.dense.act(x)
        perm, inverse = self.rows(index)
        return signed_permutation(x, perm, inverse, self.signs.to(x)[index][:, None])

    def with_spin_flip(self) -> SymmetryGroup:
        if self.spin_flip:
            return self.dense.with_spin_flip()
        return FactoredGroup(self._lattice, self.point, spin_flip=True, name=f"{self.name}×Z2")


# ---------------------------------------------------------------------- the action
class _SignedPermutation(torch.autograd.Function):
    """y = s ⊙ x[..., perm] along the last axis; its adjoint is s ⊙ y[..., inverse_perm], again a gather.

    Autograd's gather backward is a scatter_add into zeros; for a permutation the inverse
    gather is the same map, cheaper. The backward calls this Function again, so it is
    differentiable any number of times.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, perm: Tensor, inverse_perm: Tensor, sign: Tensor | None) -> Tensor:
        ctx.save_for_backward(perm, inverse_perm, sign if sign is not None else perm.new_empty(0))
        ctx.has_sign = sign is not None
        y = native_step.signed_permutation(x, perm, sign)  # one compiled pass on the CPU (the step frame)
        if y is not None:
            return y
        y = torch.gather(x, -1, perm.expand(x.shape))
        return y * sign if sign is not None else y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, None, None, None]:
        perm, inverse_perm, sign = ctx.saved_tensors
        return _SignedPermutation.apply(dy, inverse_perm, perm, sign if ctx.has_sign else None), None, None, None


def signed_permutation(x: Tensor, perm: Tensor, inverse_perm: Tensor, sign: Tensor | None = None) -> Tensor:
    """Apply one group element per configuration: (g·x)_i = s_g · x[p_g[i]].

    The adjoint (gradient pull-back gᵀ) is the same operation with ``perm`` and
    ``inverse_perm`` swapped: ``signed_permutation(dy, inverse_perm, perm, sign)``.

    Args:
        x: configurations, shape (..., N); (B, N) for one element per sample.
        perm: site permutations, broadcastable to x's shape, e.g. (B, N) rows ``perms[index]``,
            or (G, N) for x of shape (B, G, N).
        inverse_perm: the inverse permutations, same shape as ``perm``.
        sign: ±1 broadcastable to x's shape (e.g. a column (B, 1)) in x's dtype, or None for
            no spin flip.

    Returns:
        g·x, shape of x.
    """
    return _SignedPermutation.apply(x, perm, inverse_perm, sign)


def all_images(x: Tensor, perms: Tensor, signs: Tensor | None = None) -> Tensor:
    """Apply every group element to every configuration: y[b, g, i] = s_g · x[b, p_g[i]].

    One index_select of the flattened (G·N,) table (its backward is one index_add).

    Args:
        x: configurations, shape (B, N).
        perms: the group's permutation table, shape (G, N).
        signs: ±1 per element, shape (G,), in x's dtype; None for no spin flip.

    Returns:
        All images, shape (B, G, N).
    """
    B, N = x.shape
    y = x.index_select(1, perms.reshape(-1)).reshape(B, perms.shape[0], N)
    return y * signs[None, :, None] if signs is not None else y


# ---------------------------------------------------------------------- D4 geometry
def d4_maps(r: Tensor, c: Tensor, m: int) -> list[tuple[Tensor, Tensor]]:
    """The 8 elements of D4 as coordinate maps: element g reads the value at (r, c) from (rows_g, cols_g).

    Applied to an image X (..., L, L), ``X[..., rows_g, cols_g]`` is its g-th image. Order:
    the identity, the rotations by 90°, 180°, 270° (``torch.rot90(X, q)`` for q = 1, 2, 3),
    then the reflections c → m − c, r → m − r, the transpose and the antitranspose.

    Args:
        r: row coordinates, an integer tensor of any shape.
        c: column coordinates, same shape.
        m: reflection offset: L − 1 for the sites of an L×L grid (D4 about its centre); 0 for
            displacements, which the caller then reduces mod L (D4 about the origin).

    Returns:
        Eight pairs (rows_g, cols_g), each of the shape of r.
    """
    return [(r, c), (c, m - r), (m - r, m - c), (m - c, r), (r, m - c), (m - r, c), (c, r), (m - c, m - r)]


def displacement_orbits(L1: int, L2: int, d4: bool) -> Tensor:
    """Orbit label of every displacement (dr, dc) mod (L1, L2), shape (L1, L2), labels 0..n-1.

    The orbits are under dr → −dr (always: a circulant matrix A_ij = a(r_i − r_j) is symmetric
    iff a(dr) = a(−dr)) and, with ``d4``, under the 8 rotations and reflections of the square
    about the origin (L1 = L2). Labels are numbered by the smallest flat code (dr·L2 + dc) in
    each orbit.
    """
    r, c = torch.meshgrid(torch.arange(L1), torch.arange(L2), indexing="ij")
    maps = d4_maps(r, c, 0)
    images = maps if d4 else [maps[0], maps[2]]  # the identity and the 180° rotation (dr → −dr)
    codes = torch.stack([(a % L1) * L2 + (b % L2) for a, b in images]).amin(0)
    return torch.unique(codes.reshape(-1), return_inverse=True)[1].reshape(L1, L2)


def d4_average(kernels: Tensor) -> Tensor:
    """Average of a stack of square kernels (..., k, k) over the 8 elements of D4 (about the centre).

    D4 = {rotations} × {1, transpose}: the sum runs over the four rotations (:func:`d4_maps`,
    m = k − 1) of K and of Kᵀ, in this order, K + Kᵀ + R(K) + R(Kᵀ) + R²(K) + ...
    """
    k = kernels.shape[-1]
    r, c = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    rotations = d4_maps(r, c, k - 1)[:4]
    kt = kernels.transpose(-1, -2)
    out = kernels + kt
    for rows, cols in rotations[1:]:
        out = out + kernels[..., rows, cols] + kt[..., rows, cols]
    return out / 8.0


# ---------------------------------------------------------------------- constructors
def _from_maps(lattice: SquareLattice, rows: Tensor, cols: Tensor, name: str) -> SymmetryGroup:
    """Group from site maps: element g takes its value at site i from (rows[g, i], cols[g, i])."""
    return SymmetryGroup(rows * lattice.L + cols, name=name)


def _check_lattice(lattice: object) -> SquareLattice:
    if not isinstance(lattice, SquareLattice):
        raise TypeError(f"expected a SquareLattice, got {type(lattice).__name__}; build one with SquareLattice(L)")
    return lattice


#: the default stores a translation or space group factored once its dense table would exceed this many
#: entries (2^22 int64: 32 MiB per table, and as much for the inverse): from L = 27 for the space group.
#: Below it the table's rows are read faster than they are computed (paper configuration at L=16:
#: 0.91x the speed when factored, `python benchmarks/ising_speed.py --baseline-commit b127deb`).
FACTORED_ABOVE = 2**22


def _factored(lattice: SquareLattice, factored: bool | None, order: int) -> bool:
    """Factored storage: as asked, or by default when the dense (order, N) table would be large.

    On the L=2 torus elements coincide as permutations, which only the dense table removes."""
    if factored is None:
        return lattice.L >= 3 and order * lattice.N > FACTORED_ABOVE
    if factored and lattice.L < 3:
        raise ValueError(f"a factored group needs L >= 3 (on the L=2 torus elements coincide), got L={lattice.L}")
    return bool(factored)


def translation_group(lattice: SquareLattice, factored: bool | None = None) -> SymmetryGroup:
    """The L² lattice translations of a periodic lattice.

    Args:
        lattice: a periodic SquareLattice.
        factored: a :class:`FactoredGroup` (rows computed on demand) or the dense table; by
            default factored when the dense table would hold more than :data:`FACTORED_ABOVE` entries.

    Raises:
        ValueError: the lattice has open boundaries (translations are not symmetries there).
    """
    lattice = _check_lattice(lattice)
    if not lattice.periodic:
        raise ValueError("translation_group needs a periodic lattice, got boundary='open'")
    if _factored(lattice, factored, lattice.N):
        return FactoredGroup(lattice, None, name="translations")
    L = lattice.L
    r, c = lattice.coords[:, 0], lattice.coords[:, 1]
    a, b = torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij")
    a, b = a.reshape(-1, 1), b.reshape(-1, 1)
    return _from_maps(lattice, (r + a) % L, (c + b) % L, "translations")


def point_group(lattice: SquareLattice) -> SymmetryGroup:
    """The dihedral group D4 (4 rotations, 4 reflections) about the lattice centre: 8 elements."""
    lattice = _check_lattice(lattice)
    r, c = lattice.coords[:, 0], lattice.coords[:, 1]
    maps = d4_maps(r, c, lattice.L - 1)
    return _from_maps(lattice, torch.stack([m[0] for m in maps]), torch.stack([m[1] for m in maps]), "D4")


def space_group(lattice: SquareLattice, factored: bool | None = None) -> SymmetryGroup:
    """Translations × D4 on a periodic lattice: 8L² elements (8 on the L=2 torus, where they coincide).

    ``factored`` as in :func:`translation_group` (default: a :class:`FactoredGroup` from L = 27 on).
    """
    lattice = _check_lattice(lattice)
    if not lattice.periodic:
        raise ValueError("space_group needs a periodic lattice, got boundary='open'")
    D = point_group(lattice)
    if _factored(lattice, factored, 8 * lattice.N):
        return FactoredGroup(lattice, D, name="space group")
    T = translation_group(lattice, factored=False)
    # t∘d: apply d then t, perm = p_d[p_t]
    perms = D.perms[None, :, :].expand(T.order, -1, -1).gather(2, T.perms[:, None, :].expand(-1, D.order, -1))
    return SymmetryGroup(perms.reshape(-1, lattice.N), name="space group")


def spin_flip_group(N: int) -> SymmetryGroup:
    """Z2 = {1, −1} acting on N sites by a global sign."""
    ident = torch.arange(N).expand(2, N)
    return SymmetryGroup(ident, torch.tensor([1.0, -1.0]), name="Z2")

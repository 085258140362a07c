"""The target interface: what a lattice model hands to training, the drivers and the analysis.

A target is an unnormalised density e^{−E(x)}/Z over continuous fields x of N sites
(for the Ising model, its Hubbard-Stratonovich form, :class:`latticeflow.ising.IsingHS`,
"Monge-Ampère Flow for Generative Modeling", Zhang, E & Wang, arXiv:1809.10188, eq. 8).
Variational training minimises F_q = E_q[ln q + E] ≥ −ln Z (eq. 7) against it.

What a new lattice model implements, and who uses each member:

Required (checked by ``isinstance(target, Target)``):
    ``N``: number of sites, the dimension of x.
    ``energy(x)``: E(x) for x of shape (B, N), returning shape (B,), differentiable in x
        (training back-propagates through it; latent HMC differentiates it in x). Used by
        :class:`~latticeflow.train.VariationalTrainer`, and by every sampler and estimator of
        :mod:`analysis.latent`.

Optional, each used where it is present:
    ``grad(x)``: ∇E(x), shape (B, N). HMC on x itself (:func:`analysis.hmc.from_energy`,
        :func:`analysis.latent.physical_hmc`) needs it; everything else uses autograd.
    ``lattice``: the :class:`~latticeflow.lattice.SquareLattice` the sites live on (site
        i = row·L + col), or None. The flow builder takes it
        (``build_flow(config, target.lattice)``: convolutional potentials and symmetry groups
        are built on it), and the analysis measures lattice observables on it.
    ``symmetry_group()``: the :class:`~latticeflow.symmetry.SymmetryGroup` that leaves E
        invariant, for a model whose invariances differ from the square lattice's (today the
        flow builder names groups of ``lattice`` instead, ``--group`` and ``--mixture``).
    ``free_energy_offsets``: dict name → offset per site, the first entry the target's own
        normalisation with offset 0: F/N in normalisation k is F/N + offsets[k].
        Training logs one column ``free_energy_<name>`` per entry
        (:func:`latticeflow.train.free_energy_columns`; without it one column ``free_energy``),
        and the drivers' summaries and convergence plots read those columns. IsingHS gives
        ``{"hs": 0, "ising": (ln Z_HS − ln Z_Ising)/N}``.
    ``exact_free_energy(per_site=True)``: the exact −ln Z (per site) in the target's own
        normalisation, raising ValueError where no exact method applies. The drivers print the
        error against it and the analysis report's "exact" and "deviation" columns use it.

Checkpoints do not hold the target: they hold the flow's weights and the run's config (plain
numbers and strings), from which the driver rebuilds the target. A new model therefore also
needs a builder from such values (as ``ising(L, beta, J)``) and a driver that calls it: today
``python -m models.ising`` and ``python -m analysis`` build the Ising target by name, and the
report's observables (spins tanh x, magnetisation, Ising energy) and its extra members (``beta``,
``J``, ``log_z_offset``, ``to_ising_free_energy``, ``couplings``) are the Ising model's. Training,
checkpoints, the flows and the free-energy estimators work with any target unchanged.

Symbols: B batch, N sites.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["Target"]


@runtime_checkable
class Target(Protocol):
    """A lattice model's energy: the required members (see the module docstring for the optional ones).

    ``isinstance(obj, Target)`` checks that ``N`` and ``energy`` exist, not their types.

    Attributes:
        N: number of sites, the dimension of x.

    Example:
        >>> from latticeflow import ising
        >>> isinstance(ising(4), Target)
        True
    """

    N: int

    def energy(self, x: Tensor) -> Tensor:
        """E(x) for field configurations x of shape (B, N); returns shape (B,)."""
        ...

"""The target interface (latticeflow/target.py): who implements it, and what it checks."""

import numpy as np

from latticeflow import ising
from latticeflow.flow import Flow, MongeAmpereFlow
from latticeflow.ising import IsingHS
from latticeflow.mixture import SymmetricMixture
from latticeflow.potentials import MLPPotential
from latticeflow.symmetry import spin_flip_group
from latticeflow.target import Target


def test_ising_targets_are_targets():
    target = ising(4)
    assert isinstance(target, Target)
    assert isinstance(ising(3, 0.3, boundary="open"), Target)
    assert isinstance(IsingHS.from_couplings(np.full((3, 3), 0.1)), Target)
    # the optional members the drivers and the report use
    assert set(target.free_energy_offsets) == {"hs", "ising"} and next(iter(target.free_energy_offsets)) == "hs"
    assert target.free_energy_offsets["hs"] == 0.0
    assert callable(target.grad) and target.lattice.N == target.N
    assert isinstance(target.exact_free_energy(), float)


def test_flows_are_flows():
    flow = MongeAmpereFlow(MLPPotential(4, 8), n_steps=2)
    assert isinstance(flow, Flow)
    assert isinstance(SymmetricMixture(flow, spin_flip_group(4)), Flow)


def test_any_energy_with_N_is_a_target_and_others_are_not():
    class Gaussian:
        N = 3

        def energy(self, x):
            return 0.5 * x.square().sum(-1)

    assert isinstance(Gaussian(), Target)
    assert not isinstance(object(), Target)
    assert not isinstance(MongeAmpereFlow(MLPPotential(4, 8)), Target)

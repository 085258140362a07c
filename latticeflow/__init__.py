"""latticeflow: Monge-Ampère flows for lattice models.

Reference: L. Zhang, W. E, L. Wang, "Monge-Ampère Flow for Generative Modeling",
arXiv:1809.10188 (2018).
"""

from .exact import (
    CRITICAL_BETA,
    EnumerationResult,
    enumerate_ising,
    enumerate_log_z,
    kaufman_free_energy,
    kaufman_internal_energy,
    kaufman_log_z,
    kaufman_specific_heat,
    onsager_internal_energy,
    onsager_log_z,
    onsager_magnetization,
    transfer_matrix_log_z,
)
from . import ode
from .build import build_flow, build_potential
from .config import ISING_DEFAULT, ISING_PAPER, IsingConfig
from .flow import Flow, MongeAmpereFlow
from .mixture import SymmetricMixture
from .potentials import (
    AutogradPotential,
    ConvPotential,
    MLPPotential,
    Potential,
    QuadraticPotential,
    SumPotential,
    Symmetrized,
)
from .train import Trainer, TrainingDiverged, VariationalTrainer
from .ising import IsingHS, critical, improved_spins, ising, sample_spins
from .phi4 import Phi4, phi4, phi4_hopping
from .phi4_config import PHI4_DEFAULT, Phi4Config
from .lattice import SquareLattice
from .target import Target
from .symmetry import SymmetryGroup, point_group, space_group, spin_flip_group, translation_group

__all__ = [
    "CRITICAL_BETA",
    "EnumerationResult",
    "enumerate_ising",
    "enumerate_log_z",
    "kaufman_free_energy",
    "kaufman_internal_energy",
    "kaufman_log_z",
    "kaufman_specific_heat",
    "onsager_internal_energy",
    "onsager_log_z",
    "onsager_magnetization",
    "transfer_matrix_log_z",
    "AutogradPotential",
    "ConvPotential",
    "MLPPotential",
    "MongeAmpereFlow",
    "Potential",
    "QuadraticPotential",
    "SumPotential",
    "SymmetricMixture",
    "Symmetrized",
    "Trainer",
    "TrainingDiverged",
    "VariationalTrainer",
    "build_flow",
    "Flow",
    "ISING_DEFAULT",
    "ISING_PAPER",
    "IsingConfig",
    "Target",
    "build_potential",
    "ode",
    "IsingHS",
    "PHI4_DEFAULT",
    "Phi4",
    "Phi4Config",
    "phi4",
    "phi4_hopping",
    "SquareLattice",
    "SymmetryGroup",
    "critical",
    "improved_spins",
    "ising",
    "point_group",
    "sample_spins",
    "space_group",
    "spin_flip_group",
    "translation_group",
]
__version__ = "0.1.0"

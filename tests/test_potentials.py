"""Potentials, all families together: analytic gradients and Laplacians against autograd, times, sums, bad input.

One test file per module of ``latticeflow.potentials``: this one covers the shared interface
(``base``: forward, the hot path, per-sample times, sums) over every family; the families'
own checks are in test_potentials_{activations,mlp,quadratic,conv,autograd,symmetrized}.py.
All in float64.
"""

import pytest
import torch
from torch import nn

import latticeflow
from latticeflow import SquareLattice, space_group, translation_group
from latticeflow.potentials import (
    AutogradPotential,
    ConvPotential,
    MLPPotential,
    QuadraticPotential,
    SumPotential,
    Symmetrized,
    SymmetryDraw,
)

from potential_helpers import check_exact, randomize

pytestmark = pytest.mark.usefixtures("float64")

LAT3 = SquareLattice(3)


def _mlp(act, bias=True, td=False):
    return lambda: randomize(MLPPotential(9, 6, activation=act, bias=bias, time_dependent=td))


FACTORIES = {
    "mlp-softplus": _mlp("softplus"),
    "mlp-lncosh-nobias": _mlp("lncosh", bias=False),
    "mlp-tanh": _mlp("tanh"),
    "mlp-softplus-time": _mlp("softplus", td=True),
    "mlp-lncosh-nobias-time": _mlp("lncosh", bias=False, td=True),
    "mlp-plain-path": lambda: randomize(MLPPotential(9, 6, activation="tanh", fused=False)),
    "quadratic-d4": lambda: randomize(QuadraticPotential((3, 3), "d4")),
    "quadratic-translation-time": lambda: randomize(QuadraticPotential((3, 3), "translation", time_dependent=True)),
    "quadratic-dense": lambda: randomize(QuadraticPotential(9, "none", time_dependent=True)),
    "conv-1": lambda: randomize(ConvPotential(3, channels=3, kernel_size=3)),
    "conv-1-d4-z2-time": lambda: randomize(ConvPotential(3, channels=3, kernel_size=3, activation="lncosh",
                                                         d4=True, z2=True, time_dependent=True)),
    "conv-2-d4": lambda: randomize(ConvPotential(3, channels=4, layers=2, kernel_size=3, activation="tanh", d4=True)),
    "conv-2-z2-time": lambda: randomize(ConvPotential(3, channels=3, layers=2, kernel_size=3, activation="lncosh",
                                                      z2=True, time_dependent=True)),
    "autograd": lambda: AutogradPotential(nn.Sequential(nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 1), nn.Flatten(0))),
    "sum": lambda: randomize(QuadraticPotential((3, 3), "d4")) + _mlp("softplus", td=True)()
    + randomize(ConvPotential(3, channels=2)),
    "symmetrized-exact-space-z2": lambda: Symmetrized(_mlp("softplus", td=True)(),
                                                      space_group(LAT3).with_spin_flip(), mode="exact"),
    "symmetrized-random-space-z2": lambda: Symmetrized(_mlp("tanh")(), space_group(LAT3).with_spin_flip()),
    "symmetrized-random-translation": lambda: Symmetrized(_mlp("softplus")(), translation_group(LAT3)),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_gradient_and_laplacian_match_autograd(name):
    check_exact(FACTORIES[name]())


@pytest.mark.parametrize("name", ["mlp-softplus-time", "quadratic-translation-time", "conv-2-z2-time"])
def test_per_sample_times(name):
    # t of shape (B,) is the same as evaluating each sample at its own scalar time
    pot = FACTORIES[name]()
    x = torch.randn(4, 9)
    t = torch.tensor([0.0, 0.3, -1.0, 2.0])
    phi, g, lap = pot(x, t)
    for b in range(4):
        pb, gb, lb = pot(x[b:b + 1], float(t[b]))
        torch.testing.assert_close(phi[b:b + 1], pb, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g[b:b + 1], gb, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lap[b:b + 1], lb, rtol=1e-12, atol=1e-12)


def test_time_dependence_is_real():
    pot = FACTORIES["mlp-softplus-time"]()
    x = torch.randn(2, 9)
    assert not torch.allclose(pot(x, 0.0)[0], pot(x, 1.0)[0])


def test_package_re_exports_the_old_module_names():
    # latticeflow.potentials was one module; every name other files import from it still resolves there
    import latticeflow.potentials as P

    for name in ("ACTIVATIONS", "EVEN_ACTIVATIONS", "Potential", "MLPPotential", "QuadraticPotential", "ConvPotential",
                 "AutogradPotential", "SumPotential", "Symmetrized", "SymmetryDraw", "Noise", "Evaluation", "Frame",
                 "_check_potential"):
        assert hasattr(P, name), name
    assert set(P.__all__) <= set(dir(P))
    assert latticeflow.Symmetrized is P.Symmetrized


# ---------------------------------------------------------------------- sums
def test_sum_adds_parts_and_flattens():
    p, q, r = (randomize(MLPPotential(9, 4)), randomize(QuadraticPotential((3, 3))),
               randomize(ConvPotential(3, channels=2)))
    s = p + q + r
    assert isinstance(s, SumPotential) and len(s.parts) == 3
    x = torch.randn(2, 9)
    outs = [p(x), q(x), r(x)]
    for i in range(3):
        torch.testing.assert_close(s(x)[i], outs[0][i] + outs[1][i] + outs[2][i], rtol=1e-12, atol=1e-12)


def test_sum_noise_is_per_part():
    g = translation_group(LAT3)
    s = Symmetrized(MLPPotential(9, 4), g) + QuadraticPotential((3, 3))
    assert s.stochastic
    noise = s.resample(5)
    assert isinstance(noise, tuple) and isinstance(noise[0], SymmetryDraw) and noise[1] is None
    assert (QuadraticPotential((3, 3)) + MLPPotential(9, 2)).resample(5) is None


# ---------------------------------------------------------------------- bad input
def test_bad_sums():
    with pytest.raises(ValueError, match=r"all potentials must have the same dim, got dims=\[9, 16\]"):
        MLPPotential(9, 2) + MLPPotential(16, 2)


def test_bad_forward_inputs():
    pot = MLPPotential(9, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 9\), got shape=\(2, 8\)"):
        pot(torch.zeros(2, 8))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        pot(torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"t must be a number, a 0-d tensor or shape \(2,\), got shape=\(3,\)"):
        pot(torch.zeros(2, 9), torch.zeros(3))

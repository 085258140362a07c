"""MLPPotential: the fused drift against plain autograd (first and second order), evenness, init (float64)."""

import math

import pytest
import torch

from latticeflow.potentials import MLPPotential

from potential_helpers import randomize

pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("activation", ["softplus", "lncosh", "tanh"])
@pytest.mark.parametrize("time_dependent", [False, True])
@pytest.mark.parametrize("batch", [4, 9])  # fewer and more samples than inputs (N=6): both backward layouts
@pytest.mark.parametrize("loss", ["both", "grad", "laplacian"])  # which of the node's outputs get gradients
@pytest.mark.parametrize("tanh_method", ["torch", "sigmoid"])  # both forms of tanh (activations.tanh_via_sigmoid)
def test_fused_mlp_matches_plain_autograd_in_first_and_second_order(activation, time_dependent, batch, loss,
                                                                    tanh_method, monkeypatch):
    monkeypatch.setenv("LATTICEFLOW_TANH", tanh_method)
    torch.manual_seed(3)
    fused = randomize(MLPPotential(6, 5, activation=activation, time_dependent=time_dependent))
    plain = MLPPotential(6, 5, activation=activation, time_dependent=time_dependent, fused=False)
    plain.load_state_dict(fused.state_dict())
    x0 = torch.randn(batch, 6)

    def objective(g: torch.Tensor, lap: torch.Tensor, g2: torch.Tensor, lap2: torch.Tensor) -> torch.Tensor:
        terms = {"grad": (g2**2).sum() + g.sin().sum(), "laplacian": lap.sum() + (lap2**3).sum()}
        return sum(terms.values()) if loss == "both" else terms[loss]

    grads = []
    for pot in (fused, plain):
        x = x0.clone().requires_grad_(True)
        with pot.shared_constants():
            g, lap = pot.grad_and_laplacian(x, 0.4)
            g2, lap2 = pot.grad_and_laplacian(x * 0.7 + 0.1, 0.6)  # two stages sharing ‖W‖²
        value = objective(g, lap, g2, lap2)
        # the in-place backward of training (no graph) and the recorded one (create_graph=True)
        plain_first = torch.autograd.grad(value, [x, *pot.parameters()], retain_graph=True)
        first = torch.autograd.grad(value, [x, *pot.parameters()], create_graph=True)
        # double backward: a loss on the input gradient, differentiated again in the parameters
        second = torch.autograd.grad((first[0] ** 2).sum(), list(pot.parameters()), allow_unused=True)
        grads.append(list(plain_first) + [f.detach() for f in first]
                     + [s if s is not None else torch.zeros(()) for s in second])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_lncosh_without_bias_is_even_and_stable():
    pot = randomize(MLPPotential(9, 8, activation="lncosh", bias=False))
    x = torch.randn(5, 9)
    phi, g, lap = pot(x)
    phi_m, g_m, lap_m = pot(-x)
    torch.testing.assert_close(phi, phi_m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, -g_m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lap, lap_m, rtol=1e-12, atol=1e-12)
    # ln cosh h = |h| − ln 2 + O(e^{−2|h|}) for huge |h|: no overflow to inf
    big = 1e4 * x
    phi_big, _, _ = pot(big)
    h = big @ pot.weight.t()
    torch.testing.assert_close(phi_big, (h.abs() - math.log(2)) @ pot.readout, rtol=1e-12, atol=1e-6)


def test_mlp_init_is_near_identity():
    pot = MLPPotential(16, 32)
    _, g, lap = pot(torch.randn(8, 16))
    assert g.abs().max() < 0.05 and lap.abs().max() < 0.05
    zero = MLPPotential(16, 32, init_scale=0.0)
    _, g, lap = zero(torch.randn(8, 16))
    assert torch.all(g == 0) and torch.all(lap == 0)


def test_bad_mlp_arguments():
    with pytest.raises(ValueError, match="hidden must be an integer >= 1, got hidden=0"):
        MLPPotential(4, 0)
    with pytest.raises(ValueError, match=r"one of 'softplus', 'lncosh', 'tanh'; got activation='relu'"):
        MLPPotential(4, 3, activation="relu")

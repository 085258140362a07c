"""Potentials: analytic gradients and Laplacians against autograd, symmetries, bad input (float64)."""

import math

import pytest
import torch
from torch import nn

from latticeflow import SquareLattice, point_group, space_group, spin_flip_group, translation_group
from latticeflow.potentials import (
    AutogradPotential,
    ConvPotential,
    MLPPotential,
    Potential,
    QuadraticPotential,
    SumPotential,
    Symmetrized,
    SymmetryDraw,
)

DT = torch.float64


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    yield
    torch.set_default_dtype(old)


def randomize(pot: nn.Module, scale: float = 0.5) -> nn.Module:
    """Give every parameter a generic nonzero value (zero-initialised parts would hide bugs)."""
    with torch.no_grad():
        for p in pot.parameters():
            p.add_(scale * torch.randn_like(p))
    return pot


def autograd_reference(pot: Potential, x: torch.Tensor, t, noise=None):
    """(phi, grad, laplacian) with grad and Hessian trace taken by autograd from phi."""
    x = x.clone().requires_grad_(True)
    phi, _, _ = pot(x, t, noise)
    (g,) = torch.autograd.grad(phi.sum(), x, create_graph=True)
    lap = sum(torch.autograd.grad(g[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(x.shape[1]))
    return phi.detach(), g.detach(), lap.detach()


def check_exact(pot: Potential, B: int = 3, times=(0.0, 0.7)):
    for t in times:
        x = torch.randn(B, pot.dim)
        noise = pot.resample(B)
        phi, g, lap = pot(x, t, noise)
        phi_r, g_r, lap_r = autograd_reference(pot, x, t, noise)
        torch.testing.assert_close(phi, phi_r, rtol=0, atol=1e-12)
        torch.testing.assert_close(g, g_r, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lap, lap_r, rtol=1e-10, atol=1e-10)
        # the integrator's hot path returns the same numbers
        g2, lap2 = pot.grad_and_laplacian(x, t, noise)
        torch.testing.assert_close(g2, g, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lap2, lap, rtol=1e-12, atol=1e-12)


LAT3 = SquareLattice(3)
LAT4 = SquareLattice(4)


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


# ---------------------------------------------------------------------- MLP
@pytest.mark.parametrize("activation", ["softplus", "lncosh", "tanh"])
@pytest.mark.parametrize("time_dependent", [False, True])
def test_fused_mlp_matches_plain_autograd_in_first_and_second_order(activation, time_dependent):
    torch.manual_seed(3)
    fused = randomize(MLPPotential(6, 5, activation=activation, time_dependent=time_dependent))
    plain = MLPPotential(6, 5, activation=activation, time_dependent=time_dependent, fused=False)
    plain.load_state_dict(fused.state_dict())
    x0 = torch.randn(4, 6)
    grads = []
    for pot in (fused, plain):
        x = x0.clone().requires_grad_(True)
        with pot.shared_constants():
            g, lap = pot.grad_and_laplacian(x, 0.4)
            g2, lap2 = pot.grad_and_laplacian(g, 0.6)  # two stages sharing ‖W‖²
        first = torch.autograd.grad((g2**2).sum() + lap.sum() + (lap2**3).sum(), [x, *pot.parameters()],
                                    create_graph=True)
        # double backward: a loss on the input gradient, differentiated again in the parameters
        second = torch.autograd.grad((first[0] ** 2).sum(), list(pot.parameters()))
        grads.append([f.detach() for f in first] + list(second))
    for a, b in zip(*grads):
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


# ---------------------------------------------------------------------- quadratic
def test_quadratic_gradient_and_trace():
    pot = randomize(QuadraticPotential((4, 4), "d4"))
    A = pot.matrix()
    torch.testing.assert_close(A, A.t(), rtol=0, atol=0)
    x = torch.randn(3, 16)
    phi, g, lap = pot(x)
    b = pot.b
    torch.testing.assert_close(g, x @ A + b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(phi, 0.5 * ((x @ A) * x).sum(1) + b * x.sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lap, torch.full((3,), float(torch.trace(A.detach()))), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.trace(A), 16 * pot.kernel()[0, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("symmetric, n_params", [("d4", 6), ("translation", 10)])
def test_quadratic_orbit_counts_on_L4(symmetric, n_params):
    # displacements of Z4×Z4: 6 orbits under D4, 10 under d → −d (4 self-inverse + 12/2)
    assert QuadraticPotential((4, 4), symmetric).a.numel() == n_params


@pytest.mark.parametrize("symmetric", ["d4", "translation"])
def test_quadratic_symmetries(symmetric):
    pot = randomize(QuadraticPotential((4, 4), symmetric))
    A = pot.matrix()

    def invariant_under(group):
        P = torch.eye(16)[group.perms]  # (G, N, N): (P_g x)_i = x[perm_g(i)]
        return torch.allclose(P @ A @ P.transpose(1, 2), A.expand_as(P @ A), atol=1e-12)

    assert invariant_under(translation_group(LAT4))
    assert invariant_under(point_group(LAT4)) == (symmetric == "d4")


def test_quadratic_on_rectangle_and_linear_flag():
    pot = randomize(QuadraticPotential((2, 3), "translation", linear=False))
    assert pot.b is None and pot.dim == 6
    x = torch.randn(2, 6)
    phi, g, lap = pot(x)
    torch.testing.assert_close(g, x @ pot.matrix(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(phi, pot(-x)[0], rtol=1e-12, atol=1e-12)  # no linear term: even


def test_quadratic_starts_at_zero():
    pot = QuadraticPotential((3, 3))
    phi, g, lap = pot(torch.randn(2, 9))
    assert torch.all(phi == 0) and torch.all(g == 0) and torch.all(lap == 0)


# ---------------------------------------------------------------------- conv
@pytest.mark.parametrize("layers", [1, 2])
def test_conv_translation_d4_and_z2_invariance(layers):
    pot = randomize(ConvPotential(4, channels=3, layers=layers, kernel_size=3, activation="lncosh", d4=True, z2=True))
    x = torch.randn(2, 16)
    phi = pot(x)[0]
    group = space_group(LAT4).with_spin_flip()
    images = group.act(x).reshape(-1, 16)  # (G·B, N)
    torch.testing.assert_close(pot(images)[0].reshape(group.order, 2), phi.expand(group.order, 2),
                               rtol=1e-12, atol=1e-12)
    k = pot.kernels()
    torch.testing.assert_close(k, torch.rot90(k, 1, (1, 2)), rtol=0, atol=1e-15)
    torch.testing.assert_close(k, k.transpose(1, 2), rtol=0, atol=1e-15)


def test_conv_without_d4_is_translation_invariant_only():
    pot = randomize(ConvPotential(4, channels=3, kernel_size=3))
    x = torch.randn(1, 16)
    phi = pot(x)[0]
    T = translation_group(LAT4)
    torch.testing.assert_close(pot(T.act(x).reshape(-1, 16))[0], phi.expand(T.order), rtol=1e-12, atol=1e-12)
    D = point_group(LAT4)
    assert not torch.allclose(pot(D.act(x).reshape(-1, 16))[0], phi.expand(D.order), atol=1e-6)
    assert not torch.allclose(pot(-x)[0], phi, atol=1e-6)


def test_conv_matches_dense_formula():
    # layers=1: φ = Σ_{c,s} w_c a(Σ_d K_c(d) x(s + d − 1) + b_c), written out with explicit loops
    pot = randomize(ConvPotential(3, channels=2, kernel_size=3, activation="tanh"))
    x = torch.randn(1, 9)
    img = x.reshape(3, 3)
    K = pot.kernels()
    total = 0.0
    for c in range(2):
        for r in range(3):
            for q in range(3):
                h = sum(K[c, i, j] * img[(r + i - 1) % 3, (q + j - 1) % 3] for i in range(3) for j in range(3))
                total = total + pot.readout[c] * torch.tanh(h + pot.conv_bias[c])
    torch.testing.assert_close(pot(x)[0], total.reshape(1), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- autograd potential
def test_autograd_potential_matches_analytic_mlp():
    mlp = randomize(MLPPotential(7, 5, activation="softplus"))

    class Phi(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            return self.mlp(x)[0]

    wrapped = AutogradPotential(Phi(), dim=7)
    x = torch.randn(4, 7)
    for a, b in zip(wrapped(x), mlp(x)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_autograd_potential_time_argument_and_dim_inference():
    class Phi(nn.Module):
        dim = 3

        def forward(self, x, t):
            return (x**3).sum(1) * (1 + t)

    pot = AutogradPotential(Phi(), time_dependent=True)
    assert pot.dim == 3
    x = torch.randn(2, 3)
    phi, g, lap = pot(x, 0.5)
    torch.testing.assert_close(g, 1.5 * 3 * x**2)
    torch.testing.assert_close(lap, 1.5 * 6 * x.sum(1))


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    # vᵀHv = Σ_i H_ii v_i² = tr H for Rademacher v when H is diagonal
    net = lambda x: torch.sin(x).sum(1) + (x**4).sum(1)  # noqa: E731

    class Phi(nn.Module):
        def forward(self, x):
            return net(x)

    pot = AutogradPotential(Phi(), dim=5, laplacian="hutchinson", n_probes=3)
    x = torch.randn(4, 5)
    torch.testing.assert_close(pot(x)[2], (-torch.sin(x) + 12 * x**2).sum(1), rtol=1e-12, atol=1e-12)


def test_hutchinson_mean_within_standard_errors():
    torch.manual_seed(7)
    module = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1), nn.Flatten(0))
    exact = AutogradPotential(module, laplacian="exact")
    P = 4000
    hutch = AutogradPotential(module, laplacian="hutchinson", n_probes=P)
    x = torch.randn(3, 6)
    lap = exact(x)[2]
    est = hutch(x, 0.0, hutch.resample(3, torch.Generator().manual_seed(1)))[2]
    # Var(vᵀHv) = 2 Σ_{i≠j} H_ij² for Rademacher v
    H = torch.stack([torch.autograd.functional.hessian(lambda y: module(y[None])[0], xb) for xb in x])
    off = H - torch.diag_embed(torch.diagonal(H, dim1=1, dim2=2))
    se = torch.sqrt(2 * (off**2).sum((1, 2)) / P)
    assert torch.all(se > 0)
    assert torch.all((est - lap).abs() < 4 * se), (est, lap, se)
    # and it is noisy: one probe is not the exact value
    one = AutogradPotential(module, laplacian="hutchinson", n_probes=1)
    assert not torch.allclose(one(x)[2], lap, atol=1e-6)


def test_autograd_potential_under_no_grad_returns_detached():
    pot = AutogradPotential(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1), nn.Flatten(0)))
    with torch.no_grad():
        phi, g, lap = pot(torch.randn(2, 4))
    assert not (phi.requires_grad or g.requires_grad or lap.requires_grad)


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


# ---------------------------------------------------------------------- symmetrisation
GROUPS = {
    "translation": lambda: translation_group(LAT3),
    "d4": lambda: point_group(LAT3),
    "z2": lambda: spin_flip_group(9),
    "space×z2": lambda: space_group(LAT3).with_spin_flip(),
}


@pytest.mark.parametrize("group_name", list(GROUPS))
def test_exact_symmetrization_is_invariant(group_name):
    group = GROUPS[group_name]()
    pot = Symmetrized(randomize(MLPPotential(9, 5)), group, mode="exact")
    x = torch.randn(2, 9)
    phi, g, lap = pot(x)
    images = group.act(x)  # (G, B, N)
    phi_g, g_g, lap_g = pot(images.reshape(-1, 9))
    G = group.order
    torch.testing.assert_close(phi_g.reshape(G, 2), phi.expand(G, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lap_g.reshape(G, 2), lap.expand(G, 2), rtol=1e-12, atol=1e-12)
    # the gradient is equivariant: ∇φ(g·x) = g·∇φ(x)
    torch.testing.assert_close(g_g.reshape(G, 2, 9), group.act(g), rtol=1e-12, atol=1e-12)
    # the raw network is not invariant (so the check above can fail)
    base = pot.potential
    assert not torch.allclose(base(images.reshape(-1, 9))[0].reshape(G, 2), base(x)[0].expand(G, 2), atol=1e-6)


def test_random_mode_averages_to_exact_mode():
    group = space_group(LAT3).with_spin_flip()
    base = randomize(MLPPotential(9, 5))
    rnd, exact = Symmetrized(base, group, "random"), Symmetrized(base, group, "exact")
    x = torch.randn(2, 9)
    outs = [rnd(x, 0.0, torch.full((2,), g, dtype=torch.long)) for g in range(group.order)]
    for i in range(3):
        torch.testing.assert_close(torch.stack([o[i] for o in outs]).mean(0), exact(x)[i], rtol=1e-12, atol=1e-12)
    # one term is φ̃(g·x) itself
    idx = torch.tensor([5, 17])
    phi = rnd(x, 0.0, idx)[0]
    torch.testing.assert_close(phi, base(group.act(x, idx))[0], rtol=0, atol=1e-14)


def test_random_draws_and_step_frame():
    group = space_group(LAT3).with_spin_flip()
    pot = Symmetrized(randomize(MLPPotential(9, 5)), group)
    d1 = pot.resample(6, torch.Generator().manual_seed(3))
    d2 = pot.resample(6, torch.Generator().manual_seed(3))
    assert torch.equal(d1.index, d2.index)
    torch.testing.assert_close(d1.perm, group.perms[d1.index], rtol=0, atol=0)
    x = torch.randn(6, 9)
    into, out_of, inner, inner_noise = pot.step_frame(d1)
    assert inner is pot.potential and inner_noise is None
    torch.testing.assert_close(into(x), group.act(x, d1.index), rtol=0, atol=0)
    torch.testing.assert_close(out_of(into(x)), x, rtol=0, atol=0)
    # the drift in the frame, mapped back, is the symmetrised drift
    g_frame = out_of(inner(into(x))[1])
    torch.testing.assert_close(g_frame, pot(x, 0.0, d1)[1], rtol=1e-14, atol=1e-14)
    assert Symmetrized(pot.potential, group, "exact").step_frame(None) is None


def test_symmetrized_follows_module_dtype():
    pot = Symmetrized(MLPPotential(9, 4), space_group(LAT3).with_spin_flip()).to(torch.float32)
    x = torch.randn(3, 9, dtype=torch.float32)
    phi, g, lap = pot(x)
    assert g.dtype == torch.float32 and pot.signs.dtype == torch.float32


# ---------------------------------------------------------------------- bad input
def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="hidden must be an integer >= 1, got hidden=0"):
        MLPPotential(4, 0)
    with pytest.raises(ValueError, match=r"one of 'softplus', 'lncosh', 'tanh'; got activation='relu'"):
        MLPPotential(4, 3, activation="relu")
    with pytest.raises(ValueError, match="symmetric='d4' needs a lattice_shape"):
        QuadraticPotential(9, "d4")
    with pytest.raises(ValueError, match=r"symmetric='d4' needs a square lattice, got lattice_shape=\(2, 3\)"):
        QuadraticPotential((2, 3), "d4")
    with pytest.raises(ValueError, match="kernel_size must be odd and <= L=3"):
        ConvPotential(3, kernel_size=5)
    with pytest.raises(ValueError, match="kernel_size must be odd and <= L=4 .* got kernel_size=2"):
        ConvPotential(4, kernel_size=2)
    with pytest.raises(ValueError, match="z2=True needs an even activation"):
        ConvPotential(4, z2=True, activation="softplus")
    with pytest.raises(ValueError, match="layers must be 1 or 2"):
        ConvPotential(4, layers=3)
    with pytest.raises(ValueError, match="laplacian must be one of 'exact', 'hutchinson'"):
        AutogradPotential(nn.Linear(3, 1), laplacian="trace")
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got function"):
        AutogradPotential(lambda x: x.sum(1), dim=3)


def test_bad_groups_and_sums():
    with pytest.raises(ValueError, match="group acts on dim=16 sites but the potential has dim=9"):
        Symmetrized(MLPPotential(9, 3), translation_group(LAT4))
    with pytest.raises(TypeError, match="group must be a SymmetryGroup, got Tensor"):
        Symmetrized(MLPPotential(9, 3), torch.zeros(3, 9))
    with pytest.raises(TypeError, match="potential must be a Potential, got Linear"):
        Symmetrized(nn.Linear(9, 1), translation_group(LAT3))
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
    sym = Symmetrized(pot, translation_group(LAT3))
    with pytest.raises(ValueError, match=r"symmetry indices must lie in \[0, 9\), got range \[0, 9\]"):
        sym(torch.zeros(2, 9), 0.0, torch.tensor([0, 9]))
    with pytest.raises(ValueError, match=r"symmetry index must have shape \(2,\), got shape=\(3,\)"):
        sym(torch.zeros(2, 9), 0.0, torch.tensor([0, 1, 2]))

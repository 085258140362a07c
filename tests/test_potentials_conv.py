"""ConvPotential: invariances (translations, D4, Z2), the explicit-loop formula, kernels by FFT (float64)."""

import pytest
import torch
import torch.nn.functional as F

from latticeflow import SquareLattice, point_group, space_group, translation_group
from latticeflow.potentials import ConvPotential
from latticeflow.potentials.conv import _d4_kernel_basis, _kernel_spectrum

from potential_helpers import check_exact, randomize

pytestmark = pytest.mark.usefixtures("float64")

LAT4 = SquareLattice(4)


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


@pytest.mark.parametrize("L, k", [(5, 3), (6, 5), (7, 1)])
def test_kernel_spectrum_is_circular_conv2d(L, k):
    # the FFT embedding reproduces conv2d's circular cross-correlation
    K = torch.randn(3, k, k)
    x = torch.randn(2, 1, L, L)
    h = torch.fft.irfft2(torch.fft.rfft2(x) * _kernel_spectrum(K, L), s=(L, L))
    p = k // 2
    ref = F.conv2d(F.pad(x, (p, p, p, p), mode="circular"), K[:, None])
    torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k, J", [(1, 1), (3, 3), (5, 6)])
def test_d4_kernel_basis_is_orthonormal_and_invariant(k, J):
    basis = _d4_kernel_basis(k)  # (J, k²)
    assert basis.shape == (J, k * k)
    torch.testing.assert_close(basis @ basis.t(), torch.eye(J), rtol=0, atol=1e-15)
    img = basis.reshape(J, k, k)
    torch.testing.assert_close(img, torch.rot90(img, 1, (1, 2)), rtol=0, atol=0)
    torch.testing.assert_close(img, img.transpose(1, 2), rtol=0, atol=0)


def test_bad_conv_arguments():
    with pytest.raises(ValueError, match="kernel_size must be odd and <= L=3"):
        ConvPotential(3, kernel_size=5)
    with pytest.raises(ValueError, match="kernel_size must be odd and <= L=4 .* got kernel_size=2"):
        ConvPotential(4, kernel_size=2)
    with pytest.raises(ValueError, match="z2=True needs an even activation"):
        ConvPotential(4, z2=True, activation="softplus")
    with pytest.raises(ValueError, match="layers must be 1 or 2"):
        ConvPotential(4, layers=3)


# ---------------------------------------------------------------------- direct against FFT and autograd
def _pair(L, k, layers, time_dependent, d4, activation="softplus"):
    """The same random potential computed directly and by FFT."""
    z2 = d4 and activation == "lncosh"
    direct = randomize(ConvPotential(L, channels=3, layers=layers, kernel_size=k, activation=activation, d4=d4,
                                     z2=z2, time_dependent=time_dependent, method="direct"))
    fft = ConvPotential(L, channels=3, layers=layers, kernel_size=k, activation=activation, d4=d4, z2=z2,
                        time_dependent=time_dependent, method="fft")
    fft.load_state_dict(direct.state_dict())
    return direct, fft


CASES = [(L, k, layers, td) for L in (3, 4, 6) for k in (1, 3, 5) if k <= L for layers in (1, 2) for td in (False, True)]


@pytest.mark.parametrize("L, k, layers, td", CASES)
def test_direct_matches_fft_and_autograd(L, k, layers, td):
    # forward (φ, ∇φ, ∇²φ) and the hot path, scalar and per-sample times, against the FFT
    # implementation; ∇φ and the full Laplacian (Hessian trace) against autograd
    for d4, act in ((False, "softplus"), (True, "lncosh"), (False, "tanh")):
        direct, fft = _pair(L, k, layers, td, d4, act)
        x = torch.randn(3, L * L)
        for t in (0.4, torch.tensor([0.0, 0.5, -1.0])):
            for a, b in zip(direct(x, t), fft(x, t)):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
            for a, b in zip(direct.grad_and_laplacian(x, t), fft.grad_and_laplacian(x, t)):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        check_exact(direct)


@pytest.mark.parametrize("L, k, layers, td", [c for c in CASES if c[0] != 3])
@pytest.mark.parametrize("tanh_method", ["torch", "sigmoid"])  # both forms of tanh (activations.tanh_via_sigmoid)
def test_direct_hot_path_backward_matches_fft(L, k, layers, td, tanh_method, monkeypatch):
    monkeypatch.setenv("LATTICEFLOW_TANH", tanh_method)
    # training differentiates the integrator's (∇φ, ∇²φ) in x and the parameters, over stages that
    # share constants; a second derivative (double backward) must stay exact too
    for d4, act in ((False, "softplus"), (True, "lncosh"), (False, "tanh")):
        grads = []
        for pot in _pair(L, k, layers, td, d4, act):
            x = torch.randn(2, L * L, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
            with pot.shared_constants():
                g, lap = pot.grad_and_laplacian(x, 0.4)
                g2, lap2 = pot.grad_and_laplacian(g, 0.6)
            params = list(pot.parameters())
            first = torch.autograd.grad((g2**2).sum() + lap.sum() + (lap2**3).sum(), [x, *params], create_graph=True)
            second = torch.autograd.grad((first[0] ** 2).sum(), params, allow_unused=True)
            grads.append([g, lap, g2, lap2, *(f.detach() for f in first),
                          *(s if s is not None else torch.zeros(()) for s in second)])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9)


def test_direct_is_the_default_for_small_kernels():
    assert ConvPotential(16, kernel_size=5).method == "direct"
    assert ConvPotential(16, kernel_size=15).method == "fft"
    assert "method='direct'" in repr(ConvPotential(8, kernel_size=3))
    with pytest.raises(ValueError, match="method"):
        ConvPotential(8, method="winograd")


@pytest.mark.parametrize("conv_kernel", ["eager", "native"])  # LATTICEFLOW_CONV_KERNEL (latticeflow.native)
@pytest.mark.parametrize("L, k, td", [(4, 3, False), (6, 5, True), (5, 1, False)])
def test_direct_hot_path_first_order_backward_matches_fft(L, k, td, conv_kernel, monkeypatch):
    # what training runs at every RK stage: one backward (no create_graph) through (∇φ, ∇²φ) of
    # two chained stages, by the eager stage and by the compiled kernel, against the FFT path
    from latticeflow import native

    if conv_kernel == "native" and native.load() is None:
        pytest.skip("the conv kernel could not be built here")
    monkeypatch.setenv("LATTICEFLOW_CONV_KERNEL", conv_kernel)
    for d4, act in ((False, "softplus"), (True, "lncosh"), (False, "tanh")):
        grads = []
        for pot in _pair(L, k, 1, td, d4, act):
            x = torch.randn(19, L * L, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
            with pot.shared_constants():
                g, lap = pot.grad_and_laplacian(x, 0.4)
                g2, lap2 = pot.grad_and_laplacian(g, 0.6)
            first = torch.autograd.grad((g2**2).sum() + lap.sum() + (lap2**3).sum(), [x, *pot.parameters()])
            grads.append([g, lap, g2, lap2, *first])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9)

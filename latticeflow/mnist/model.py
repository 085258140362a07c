"""The MNIST model: a Monge-Ampère flow in logit space, optionally behind an exact affine map.

"Monge-Ampère Flow for Generative Modeling" (Zhang, E, Wang, arXiv:1809.10188, section 4.1)
fits the density of logit images y by maximum likelihood, with

    ln p_Y(y, T) = ln N(z) − ∫₀ᵀ ∇²φ(y(t)) dt,  z = y(0),                          (eq. 6)

computed by integrating each image backward from t = T to 0
(:meth:`~latticeflow.flow.MongeAmpereFlow.log_prob`). :func:`build_flow` builds that flow from an
:class:`~latticeflow.mnist.config.MNISTConfig`.

:class:`AffineFlow` composes any flow with a fixed, exactly invertible affine map
A(y) = Σ^{-1/2}(y − μ) (``--whiten``, not in the paper): the model's density is

    ln p(y) = ln p_flow(A(y)) + ln|det Σ^{-1/2}|,

its samples are A⁻¹(x') = Σ^{1/2} x' + μ for flow samples x'. With μ and Σ the Gaussian
baseline's fit (:func:`~latticeflow.mnist.baseline.fit_whitening`), the identity flow at
initialisation is the full-covariance Gaussian N(μ, Σ) instead of N(0, I). It implements the
same interface as the flow (:class:`latticeflow.flow.Flow`: sample, log_prob, forward_map,
inverse_map, draw_noise, dim, n_steps, dtype, device, stochastic), so the trainer, the
evaluation and the figures take either; the settings particular to the ODE flow inside
(step_size, total_time, potential) are read off it, :func:`inner_flow`.

The same map in front of a model that is not a :class:`~latticeflow.flow.Flow` (a zuko flow, any
module with a ``log_prob`` of a batch): :class:`WhitenedDensity`, the density only (no sampling,
no maps), ln p(y) = ln q(Σ^{-1/2}(y − μ)) + ln|det Σ^{-1/2}| for the inner density q.

Symbols: B images in a batch, D pixels per image, T = n_steps·ε.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..flow import MongeAmpereFlow, WrappedFlow
from ..potentials import ConvPotential, MLPPotential, Potential, SitewisePotential, SumPotential
from .baseline import Whitening, fit_whitening
from .config import MNISTConfig, as_config
from .protocol import MNISTData

__all__ = ["AffineFlow", "WhitenedDensity", "build_flow", "build_model", "gaussianization_frames", "inner_flow",
           "log_prob"]

StepCallback = Callable[[int, float, Tensor, Tensor], None]


def build_flow(config: MNISTConfig | dict[str, Any], dim: int,
               image_shape: tuple[int, int] | None = None) -> MongeAmpereFlow:
    """The flow described by ``config`` for D = ``dim`` pixels, in the config's dtype.

    ``potential="mlp"`` is the paper's φ(y) = Σ_k w_k a(W_k·y + b_k) (section 3);
    ``"sitewise"`` a separable per-pixel potential (:class:`~latticeflow.potentials.SitewisePotential`,
    ``sitewise_units`` units per pixel), alone or added to the mlp or conv potential (``"mlp+sitewise"``);
    ``potential="conv"`` is a translation-invariant convolutional potential on the periodic
    rows×cols image (no D4 or Z2 tying: digits have neither symmetry), which needs square images.

    Args:
        config: an :class:`MNISTConfig` (or its dict).
        dim: D.
        image_shape: (rows, cols); needed for the conv potential.

    Returns:
        flow: a :class:`~latticeflow.flow.MongeAmpereFlow` with RK4 steps.

    Raises:
        ValueError: an invalid config, or a conv potential on images that are not square.
    """
    cfg = as_config(config)
    parts: list[Potential] = []
    for part in cfg.potential.split("+"):
        if part == "mlp":
            parts.append(MLPPotential(dim, cfg.hidden, activation=cfg.activation, init_scale=cfg.init_scale))
        elif part == "sitewise":
            parts.append(SitewisePotential(dim, cfg.sitewise_units, activation=cfg.activation,
                                           init_scale=cfg.init_scale))
        else:
            if image_shape is None or image_shape[0] != image_shape[1] or image_shape[0] ** 2 != dim:
                raise ValueError(f"potential='conv' needs square images with rows*cols = dim={dim}, "
                                 f"got image_shape={image_shape!r}")
            parts.append(ConvPotential(image_shape[0], channels=cfg.channels, layers=cfg.conv_layers,
                                       kernel_size=cfg.kernel_size, activation=cfg.activation,
                                       init_scale=cfg.init_scale))
    pot: Potential = parts[0] if len(parts) == 1 else SumPotential(*parts)
    flow = MongeAmpereFlow(pot, n_steps=cfg.n_steps, step_size=cfg.step_size, method="rk4",
                           checkpoint=cfg.grad_checkpoint)
    return flow.to(cfg.torch_dtype)


class _Whitens:
    """The affine map y' = Σ^{-1/2}(y − μ) from the buffers ``mean`` and ``inv_sqrt``, which
    :func:`_register_whitening` checks and registers."""

    mean: Tensor
    inv_sqrt: Tensor

    def whiten(self, y: Tensor) -> Tensor:
        """y' = Σ^{-1/2}(y − μ) for points y of shape (B, D) (row vectors; Σ^{-1/2} is symmetric)."""
        return (y - self.mean) @ self.inv_sqrt


def _register_whitening(module: nn.Module, whitening: Whitening, names: Sequence[str], D: int, **to: Any) -> None:
    """Check the tensors ``names`` of ``whitening`` against their shapes for D and register each as a
    buffer of ``module`` (a detached copy, ``.to(**to)``).

    Raises:
        ValueError: a tensor of the wrong shape, naming it.
    """
    shapes = {"mean": (D,), "inv_sqrt": (D, D), "sqrt": (D, D), "log_det": ()}
    for name in names:
        value = getattr(whitening, name)
        if not isinstance(value, Tensor) or tuple(value.shape) != shapes[name]:
            raise ValueError(f"whitening.{name} must be a tensor of shape {shapes[name]} for D={D}, "
                             f"got {tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}")
    for name in names:
        module.register_buffer(name, getattr(whitening, name).detach().to(**to).clone())


class AffineFlow(_Whitens, WrappedFlow):
    """A flow behind a fixed affine map: ln p(y) = ln p_flow(y') + ln|det Σ^{-1/2}|, y' = Σ^{-1/2}(y − μ).

    The map is exactly invertible (y = Σ^{1/2} y' + μ) and has no parameters: μ, Σ^{-1/2},
    Σ^{1/2} and the constant ln|det Σ^{-1/2}| are buffers (``mean``, ``inv_sqrt``, ``sqrt``,
    ``log_det``), so they are saved and restored with the state_dict, follow ``.to()``, and
    DDP broadcasts rank 0's. The inner flow is the submodule ``flow``: the state_dict keys are
    ``flow.*`` and the four buffers, those of the checkpoints written as ``WhitenedFlow``. With an
    identity flow the model is N(μ, Σ).

    Args:
        flow: the flow acting on mapped points y' (a :class:`~latticeflow.flow.MongeAmpereFlow`
            or any other :class:`~latticeflow.flow.Flow` module).
        whitening: μ, Σ^{-1/2}, Σ^{1/2}, ln|det Σ^{-1/2}| (e.g. from
            :func:`~latticeflow.mnist.baseline.fit_whitening`; any float dtype, stored in the
            flow's dtype and on its device), or None for the identity map as a placeholder that a
            checkpoint's state_dict then overwrites.

    Raises:
        ValueError: a whitening tensor of the wrong shape for the flow's D.
    """

    mean: Tensor
    inv_sqrt: Tensor
    sqrt: Tensor
    log_det: Tensor

    def __init__(self, flow: nn.Module, whitening: Whitening | None = None) -> None:
        super().__init__(flow)  # dim, n_steps, dtype, device, noise: the inner flow's (WrappedFlow)
        D = flow.dim
        if whitening is None:
            eye = torch.eye(D, dtype=torch.float64)
            whitening = Whitening(torch.zeros(D, dtype=torch.float64), eye, eye.clone(),
                                  torch.zeros((), dtype=torch.float64))
        _register_whitening(self, whitening, ("mean", "inv_sqrt", "sqrt", "log_det"), D, device=flow.device,
                            dtype=flow.dtype)

    # ------------------------------------------------------------------ the affine map
    def unwhiten(self, y: Tensor) -> Tensor:
        """y = Σ^{1/2} y' + μ, the inverse of :meth:`whiten`, shape (B, D)."""
        return y @ self.sqrt + self.mean

    def _in_data_coordinates(self, callback: StepCallback | None) -> StepCallback | None:
        if callback is None:
            return None
        return lambda k, t, x, dlogp: callback(k, t, self.unwhiten(x), dlogp)

    def forward_map(self, z: Tensor, generator: torch.Generator | None = None, noise: Sequence[Any] | None = None,
                    callback: StepCallback | None = None) -> tuple[Tensor, Tensor]:
        """Latent points z, shape (B, D), to data points A⁻¹(flow(z)).

        ``callback(k, t, x, delta_logp)`` sees the inner flow's state after step k in data
        coordinates (A⁻¹ of it) and the inner flow's change of ln p so far.

        Returns:
            y: shape (B, D); delta_logp: ln p(y) − ln N(z) = the flow's + ln|det Σ^{-1/2}|, shape (B,).
        """
        x, dlogp = self.flow.forward_map(z, generator=generator, noise=noise,
                                         callback=self._in_data_coordinates(callback))
        return self.unwhiten(x), dlogp + self.log_det

    def inverse_map(self, y: Tensor, generator: torch.Generator | None = None, noise: Sequence[Any] | None = None,
                    callback: StepCallback | None = None) -> tuple[Tensor, Tensor]:
        """Data points y, shape (B, D), to latent points flow⁻¹(A(y)).

        ``callback(k, t, x, delta_logp)`` sees the inner flow's state after step k in data
        coordinates (A⁻¹ of it: the Gaussianisation of y as N(μ, Σ) would draw it) and the inner
        flow's change of ln p so far.

        Returns:
            z: shape (B, D); delta_logp: ln N(z) − ln p(y) = the flow's − ln|det Σ^{-1/2}|, shape (B,).
        """
        z, dlogp = self.flow.inverse_map(self.whiten(y), generator=generator, noise=noise,
                                         callback=self._in_data_coordinates(callback))
        return z, dlogp - self.log_det

    def log_prob(self, y: Tensor, generator: torch.Generator | None = None, noise: Any = None) -> Tensor:
        """ln p(y) = ln p_flow(Σ^{-1/2}(y − μ)) + ln|det Σ^{-1/2}|, shape (B,); y (B, D) in the flow's dtype."""
        return self.flow.log_prob(self.whiten(y), generator=generator, noise=noise) + self.log_det

    def forward(self, y: Tensor) -> Tensor:
        """Alias for :meth:`log_prob`, as for the flow (DDP calls this)."""
        return self.log_prob(y)

    def sample(self, n: int, generator: torch.Generator | None = None, noise: Any = None) -> tuple[Tensor, Tensor]:
        """n samples in data coordinates, shape (n, D), and their ln p, shape (n,)."""
        x, logp = self.flow.sample(n, generator=generator, noise=noise)
        return self.unwhiten(x), logp + self.log_det


class WhitenedDensity(_Whitens, nn.Module):
    """Any density model behind the fixed whitening: ln p(y) = ln q(Σ^{-1/2}(y − μ)) + ln|det Σ^{-1/2}|.

    The change of variables through the exactly invertible affine map y' = Σ^{-1/2}(y − μ), the
    same as :class:`AffineFlow`'s, but for any module ``model`` with a log density
    ``model.log_prob(y') -> (B,)`` of a batch (B, D) (a zuko flow behind a small adapter, a
    :class:`~latticeflow.flow.MongeAmpereFlow`, a standard normal): the density only, no sampling.
    With μ, Σ the Gaussian baseline's fit (:func:`~latticeflow.mnist.baseline.fit_whitening`) and
    an inner model that starts at N(0, I), the wrapped model starts at the baseline's N(μ, Σ); that
    is how ``benchmarks/mnist_race.py`` gives every model the same start.

    μ, Σ^{-1/2} and ln|det Σ^{-1/2}| are buffers (``mean``, ``inv_sqrt``, ``log_det``): no
    parameters, saved with the state_dict, cast and moved by ``.to()``. Σ^{-1/2} is symmetric, so
    the map acts on row vectors as (y − μ) @ Σ^{-1/2}.

    Args:
        model: the inner density, a module with ``log_prob(x: Tensor (B, D)) -> Tensor (B,)``; its
            parameters are this module's ``model.*``.
        whitening: μ (D,), Σ^{-1/2} (D, D), ln|det Σ^{-1/2}| () (``sqrt`` is not used), any float dtype.
        dtype: the buffers' dtype; None takes the inner model's (its first floating parameter or
            buffer; float64 when it has none).

    Raises:
        TypeError: a model without a callable ``log_prob``.
        ValueError: whitening tensors of inconsistent shapes.

    Example:
        >>> import zuko                                                        # doctest: +SKIP
        >>> maf = zuko.flows.MAF(784, transforms=5, hidden_features=[1024])   # doctest: +SKIP
        >>> class Zuko(nn.Module):                                             # doctest: +SKIP
        ...     def __init__(self, flow): super().__init__(); self.flow = flow
        ...     def log_prob(self, x): return self.flow().log_prob(x)
        >>> model = WhitenedDensity(Zuko(maf), fit_whitening(data.train, 1))  # doctest: +SKIP
    """

    mean: Tensor
    inv_sqrt: Tensor
    log_det: Tensor

    def __init__(self, model: nn.Module, whitening: Whitening, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not callable(getattr(model, "log_prob", None)):
            raise TypeError(f"model must have a log_prob(x) method returning ln q(x) of shape (B,), "
                            f"got {type(model).__name__}")
        if dtype is None:
            tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
            dtype = tensors[0].dtype if tensors else torch.float64
        self.model = model
        D = int(whitening.mean.shape[-1]) if whitening.mean.dim() == 1 else -1
        _register_whitening(self, whitening, ("mean", "inv_sqrt", "log_det"), D, dtype=dtype)

    @property
    def dim(self) -> int:
        """D, the dimension of the points."""
        return int(self.mean.shape[0])

    def log_prob(self, y: Tensor) -> Tensor:
        """ln p(y) = ln q(Σ^{-1/2}(y − μ)) + ln|det Σ^{-1/2}|, shape (B,), for y of shape (B, D)."""
        return self.model.log_prob(self.whiten(y)) + self.log_det

    def forward(self, y: Tensor) -> Tensor:
        """Alias for :meth:`log_prob`."""
        return self.log_prob(y)


def inner_flow(model: nn.Module) -> MongeAmpereFlow:
    """The ODE flow of a model (itself, or the flow inside an :class:`AffineFlow` or a DDP wrapper):
    where its integration settings (n_steps, step_size, total_time, potential) live."""
    while isinstance(model, (AffineFlow, nn.parallel.DistributedDataParallel)):
        model = model.flow if isinstance(model, AffineFlow) else model.module
    return model


def build_model(config: MNISTConfig | dict[str, Any], data: MNISTData,
                fit: bool = True) -> MongeAmpereFlow | AffineFlow:
    """The model of ``config``: :func:`build_flow`, behind an :class:`AffineFlow` whitening if ``whiten``.

    Args:
        config: an :class:`MNISTConfig` (or its dict).
        data: the sets (D, image shape, and with ``whiten`` the training pixels for the fit).
        fit: fit the whitening (:func:`~latticeflow.mnist.baseline.fit_whitening` on ``data.train``,
            noise seed ``eval_seed``); False leaves identity placeholders for a checkpoint to fill
            (saves the pass on resume).

    Returns:
        model: in the config's dtype, on the CPU.
    """
    cfg = as_config(config)
    flow = build_flow(cfg, data.dim, data.image_shape)
    if not cfg.whiten:
        return flow
    return AffineFlow(flow, fit_whitening(data.train, cfg.eval_seed) if fit else None)


@torch.no_grad()
def log_prob(model: nn.Module, y: Tensor, batch_size: int = 500) -> Tensor:
    """ln p_Y(y, T) of logit images by backward integration, in batches, without gradients.

    Args:
        model: the flow or an :class:`AffineFlow` (which includes its map).
        y: logit images, shape (B, D), any floating dtype (converted to the model's).
        batch_size: images per integration.

    Returns:
        logp: shape (B,), float64, nats.
    """
    out = [model.log_prob(chunk.to(model.device, model.dtype)).double().cpu() for chunk in y.split(batch_size)]
    return torch.cat(out)


@torch.no_grad()
def gaussianization_frames(model: nn.Module, y: Tensor, n_times: int = 6) -> tuple[list[float], Tensor]:
    """Snapshots of images integrated backward from t = T to 0 (paper Fig. 3b).

    One backward integration (``inverse_map``) with a callback that keeps the state at
    ``n_times`` times evenly spaced on the step grid, T first and 0 last. For an
    :class:`AffineFlow` the states are shown in data coordinates, Σ^{1/2} y'(t) + μ: the first
    frame is the image, the last its latent point as the Gaussian baseline N(μ, Σ) would draw it.

    Args:
        model: the flow or an :class:`AffineFlow`.
        y: logit images at t = T, shape (B, D).
        n_times: number of snapshots, >= 2.

    Returns:
        times: the n_times times, decreasing from T to 0.
        frames: shape (n_times, B, D), the logit-space states y(t), float64.
    """
    if isinstance(n_times, bool) or not isinstance(n_times, int) or n_times < 2:
        raise ValueError(f"n_times must be an integer >= 2, got n_times={n_times!r}")
    ode = inner_flow(model)
    n = ode.n_steps
    keep = sorted({round(j * n / (n_times - 1)) for j in range(n_times)})  # steps taken at each snapshot
    x = y.to(model.device, model.dtype)
    frames = {0: x.double().cpu()}

    def callback(k: int, t: float, z: Tensor, dlogp: Tensor) -> None:  # noqa: ARG001
        if k + 1 in keep:
            frames[k + 1] = z.double().cpu()

    model.inverse_map(x, callback=callback)
    times = [ode.total_time - s * ode.step_size for s in keep]
    return times, torch.stack([frames[s] for s in keep])

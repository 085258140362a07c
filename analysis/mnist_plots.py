"""Figures of the MNIST density estimation (paper section 4.1, Fig. 3), PNG and PDF side by side.

"Monge-Ampère Flow for Generative Modeling" (Zhang, E, Wang, arXiv:1809.10188), Fig. 3:
(a) the training and test negative log-likelihood per epoch, in nats in logit space, with the
results of MADE, Real NVP and MAF (Papamakarios et al., arXiv:1705.07057) as horizontal lines;
(b) test digits flowing backward from t = T (data) to t = 0 (the base Gaussian).

The plotting functions take plain arrays (uint8 pixels from ``latticeflow.mnist.logit_to_pixels``)
and a training log; :func:`make_figures` computes them from a trained model (what
``models/mnist.py`` draws after training).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from latticeflow.mnist import gaussianization_frames, inner_flow, logit_to_pixels, tile_images  # noqa: E402

from .plots import _save  # noqa: E402

__all__ = ["make_figures", "plot_gaussianization", "plot_nll_curves", "plot_samples"]

_SETS = (("train", "C0"), ("validation", "C2"), ("test", "C1"))


def _as_pixels(pixels: object, name: str) -> np.ndarray:
    if isinstance(pixels, torch.Tensor):
        pixels = pixels.detach().cpu().numpy()
    if not isinstance(pixels, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch.Tensor, got {type(pixels).__name__}")
    return pixels


def _check_image_shape(image_shape: object, dim: int) -> tuple[int, int]:
    if (not isinstance(image_shape, (tuple, list)) or len(image_shape) != 2
            or int(image_shape[0]) * int(image_shape[1]) != dim):
        raise ValueError(f"image_shape must be (rows, cols) with rows*cols = {dim}, got image_shape={image_shape!r}")
    return int(image_shape[0]), int(image_shape[1])


def plot_samples(pixels: np.ndarray | torch.Tensor, path: str | Path, image_shape: tuple[int, int] = (28, 28),
                 n_cols: int = 10, title: str = "") -> Path:
    """A grid of images, e.g. flow samples mapped back to pixels with ``logit_to_pixels``.

    Args:
        pixels: shape (B, rows*cols), values 0..255.
        path: output file; written as .png and .pdf.
        image_shape: (rows, cols).
        n_cols: images per row.
        title: figure title.

    Returns:
        the PNG path.
    """
    x = _as_pixels(pixels, "pixels")
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"pixels must have shape (B, D) with B >= 1, got shape={x.shape}")
    shape = _check_image_shape(image_shape, x.shape[1])
    n_cols = min(n_cols, len(x))
    grid = tile_images(x, n_cols=n_cols, image_shape=shape, pad=1)
    n_rows = -(-len(x) // n_cols)
    fig, ax = plt.subplots(figsize=(0.6 * n_cols + 0.4, 0.6 * n_rows + (0.5 if title else 0.2)))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_gaussianization(frames: np.ndarray | torch.Tensor, times: Sequence[float], path: str | Path,
                         image_shape: tuple[int, int] = (28, 28)) -> Path:
    """Test images flowing to the base Gaussian (paper Fig. 3b): one row per time, T at the top.

    Args:
        frames: pixels of the images at each time, shape (n_times, B, rows*cols), values 0..255.
        times: the n_times times, from T (data) down to 0 (Gaussian).
        path: output file; written as .png and .pdf.
        image_shape: (rows, cols).

    Returns:
        the PNG path.
    """
    f = _as_pixels(frames, "frames")
    if f.ndim != 3 or f.shape[0] != len(times) or f.shape[1] == 0:
        raise ValueError(f"frames must have shape (n_times, B, D) with n_times = len(times) = {len(times)} "
                         f"and B >= 1, got shape={f.shape}")
    shape = _check_image_shape(image_shape, f.shape[2])
    n_times, B = f.shape[:2]
    grid = tile_images(f.reshape(n_times * B, -1), n_cols=B, image_shape=shape, pad=1)
    fig, ax = plt.subplots(figsize=(0.6 * B + 0.8, 0.6 * n_times + 0.3))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([r * (shape[0] + 1) + shape[0] / 2 for r in range(n_times)])
    ax.set_yticklabels([f"t = {t:.3g}" for t in times], fontsize=8)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(length=0)
    return _save(fig, path)


def plot_nll_curves(log: pd.DataFrame | str | Path, path: str | Path,
                    reference: dict[str, tuple[float, float]] | None = None, bits: bool = False) -> Path:
    """Training, validation and test NLL per epoch on a log epoch axis (paper Fig. 3a).

    Args:
        log: training log (DataFrame or CSV path) with ``epoch`` and ``{set}_nll``,
            ``{set}_nll_stderr`` columns for set in train, validation, test (missing sets are
            skipped), or ``{set}_bpd``/``{set}_bpd_stderr`` with ``bits=True``.
        path: output file; written as .png and .pdf.
        reference: name -> (NLL, error) drawn as horizontal lines (``PAPER_TEST_NLL``: MADE,
            Real NVP, MAF and the paper's own result); None draws none. Only for nats.
        bits: plot bits/dim instead of nats.

    Returns:
        the PNG path.
    """
    if not isinstance(log, pd.DataFrame):
        log = pd.read_csv(log)
    key = "bpd" if bits else "nll"
    present = [(name, color) for name, color in _SETS if f"{name}_{key}" in log]
    if len(log) == 0 or not present:
        raise ValueError(f"log must have at least one row and a column among "
                         f"{[f'{n}_{key}' for n, _ in _SETS]}, got columns {list(log.columns)}")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    epochs = log["epoch"].to_numpy()
    for name, color in present:
        y = log[f"{name}_{key}"].to_numpy(dtype=float)
        err = log[f"{name}_{key}_stderr"].to_numpy(dtype=float) if f"{name}_{key}_stderr" in log else None
        ax.plot(epochs, y, color=color, lw=1.2, marker="o", ms=2.5, label=name)
        if err is not None:  # ± one standard error as a band: bars would hide the trend
            ax.fill_between(epochs, y - err, y + err, color=color, alpha=0.2, lw=0)
    if reference and not bits:
        for name, (value, _) in reference.items():
            own = name == "MA flow"  # the paper's own result, solid red; the earlier flows dashed grey
            color = "C3" if own else "0.4"
            ax.axhline(value, color=color, lw=0.8, ls="-" if own else (0, (4, 2)))
            ax.text(1.0, value, f" {name + ' (paper)' if own else name} {value:g}", transform=ax.get_yaxis_transform(),
                    va="center", fontsize=7, color=color, clip_on=False)
    if epochs.max() > 1:
        ax.set_xscale("log")
    # the first epochs of a flow from the identity are far above the rest: zoom on the tail
    tail = np.concatenate([log[f"{n}_{key}"].to_numpy(dtype=float)[len(log) // 4:] for n, _ in present])
    tail = tail[np.isfinite(tail)]
    if tail.size:
        lo, hi = tail.min(), np.percentile(tail, 90)
        if reference and not bits:
            lo = min(lo, *(v - e for v, e in reference.values()))
            hi = max(hi, *(v + e for v, e in reference.values()))
        span = max(hi - lo, 1e-9)
        ax.set_ylim(lo - 0.1 * span, hi + 0.4 * span)
    ax.set_xlabel("epoch")
    ax.set_ylabel("bits/dim" if bits else "NLL (nats, logit space)")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


@torch.no_grad()
def make_figures(model: torch.nn.Module, log: pd.DataFrame, test_y: torch.Tensor, out_dir: str | Path,
                 image_shape: tuple[int, int], n_samples: int = 100, seed: int = 0,
                 reference: dict[str, tuple[float, float]] | None = None) -> list[Path]:
    """Samples, the Gaussianisation of test digits (Fig. 3b) and the NLL curves (Fig. 3a) of a model.

    Args:
        model: the flow or an :class:`~latticeflow.mnist.AffineFlow` (samples and frames are shown
            in data coordinates).
        log: training log with the per-epoch NLL columns.
        test_y: logit test images to flow backward, shape (B, D) (the first 10 are used).
        out_dir: folder for ``samples``, ``gaussianization`` and ``nll`` (.png and .pdf).
        image_shape: (rows, cols).
        n_samples: number of generated images.
        seed: seed of the latent draw.
        reference: reference lines for the NLL plot (the paper's Table 1), None for none.

    Returns:
        the PNG paths.
    """
    out = Path(out_dir)
    was_training = model.training
    model.eval()
    x, _ = model.sample(n_samples, generator=torch.Generator(device=model.device).manual_seed(seed))
    paths = [plot_samples(logit_to_pixels(x.double().cpu()), out / "samples", image_shape,
                          title=f"{n_samples} samples (T = {inner_flow(model).total_time:g})")]
    times, frames = gaussianization_frames(model, test_y[:10])
    paths.append(plot_gaussianization(logit_to_pixels(frames), times, out / "gaussianization", image_shape))
    paths.append(plot_nll_curves(log, out / "nll", reference=reference))
    model.train(was_training)
    return paths

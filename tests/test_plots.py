"""Figures (analysis/plots.py): files are written as PNG and PDF; bad input raises ValueError."""

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.plots import (
    plot_chains,
    plot_convergence,
    plot_magnetisation_histogram,
    plot_spin_grid,
    spin_tile,
)


def written(png):
    assert png.suffix == ".png" and png.is_file() and png.stat().st_size > 1000
    pdf = png.with_suffix(".pdf")
    assert pdf.is_file() and pdf.read_bytes().startswith(b"%PDF")


# ---------------------------------------------------------------------- spin grids
def test_spin_tile_layout():
    rng = np.random.default_rng(0)
    s = rng.choice([-1.0, 1.0], size=(5, 3, 3))
    tile = spin_tile(s)
    # ⌈√5⌉ = 3 columns, 2 rows, one-pixel gaps: (2·4 − 1, 3·4 − 1)
    assert tile.shape == (7, 11)
    np.testing.assert_array_equal(tile[0:3, 0:3], (s[0] + 1) / 2)
    np.testing.assert_array_equal(tile[4:7, 4:7], (s[4] + 1) / 2)  # 5th: row 1, column 1
    assert np.all(tile[3, :] == 0.5) and np.all(tile[:, 3] == 0.5)  # gaps
    assert np.all(tile[4:7, 8:11] == 0.5)  # the empty 6th slot
    # flat (k, N) input and torch tensors give the same image; tanh values are allowed
    np.testing.assert_array_equal(spin_tile(torch.from_numpy(s.reshape(5, 9))), tile)
    assert spin_tile(np.tanh(rng.normal(size=(4, 2, 2))), columns=4).shape == (2, 11)


@pytest.mark.parametrize("bad, match", [
    (np.ones((3, 5)), "square N"),
    (np.zeros((0, 3, 3)), "k >= 1"),
    (2.0 * np.ones((2, 3, 3)), r"\[-1, 1\]"),
    (np.full((1, 2, 2), np.nan), r"\[-1, 1\]"),
])
def test_spin_tile_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        spin_tile(bad)


def test_plot_spin_grid(tmp_path):
    s = np.where(np.random.default_rng(1).random((9, 4, 4)) < 0.5, -1.0, 1.0)
    written(plot_spin_grid(s, tmp_path / "grid.png", title="samples"))


# ---------------------------------------------------------------------- histogram
def test_magnetisation_histogram(tmp_path):
    rng = np.random.default_rng(2)
    N = 16
    m = (2 * rng.binomial(N, 0.5, size=500) - N) / N
    lw = rng.normal(size=500)
    ref = (2 * rng.binomial(N, 0.5, size=(100, 4)) - N) / N
    written(plot_magnetisation_histogram(m, tmp_path / "m.png", log_weights=lw, reference=ref, N=N, title="t"))
    written(plot_magnetisation_histogram(torch.from_numpy(m), tmp_path / "plain.png"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(m=np.array([])), "non-empty"),
    (dict(m=np.array([0.5, 1.5])), r"\[-1, 1\]"),
    (dict(m=np.array([0.5, np.nan])), "finite"),
    (dict(m=np.zeros(4), log_weights=np.zeros(3)), r"shape of m, \(4,\)"),
    (dict(m=np.zeros(4), log_weights=np.array([0.0, np.nan, 0.0, 0.0])), "NaN"),
    (dict(m=np.zeros(4), reference=np.array([])), "reference must be a non-empty"),
    (dict(m=np.zeros(4), N=0), "N must be a positive integer"),
])
def test_magnetisation_histogram_bad_input(tmp_path, kwargs, match):
    m = kwargs.pop("m")
    with pytest.raises(ValueError, match=match):
        plot_magnetisation_histogram(m, tmp_path / "bad.png", **kwargs)
    assert not (tmp_path / "bad.png").exists()


# ---------------------------------------------------------------------- chains
def test_plot_chains(tmp_path):
    rng = np.random.default_rng(3)
    white = rng.normal(size=(300, 4))
    ar = np.zeros((300, 4))
    for t in range(1, 300):
        ar[t] = 0.9 * ar[t - 1] + rng.normal(size=4)
    written(plot_chains({"latent HMC": white, "physical HMC": ar}, tmp_path / "chains.png", title="x"))
    written(plot_chains({"one chain": ar[:, 0]}, tmp_path / "one.png", max_lag=10))


@pytest.mark.parametrize("traces, kwargs, match", [
    ({}, {}, "non-empty mapping"),
    ({"a": np.zeros(1)}, {}, "n >= 2"),
    ({"a": np.array([0.0, np.inf, 1.0])}, {}, "finite"),
    ({"a": np.zeros((10, 2)), "b": np.zeros(5)}, dict(max_lag=5), r"max_lag must be an integer in \[1, n-1=4\]"),
])
def test_plot_chains_bad_input(tmp_path, traces, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot_chains(traces, tmp_path / "bad.png", **kwargs)


# ---------------------------------------------------------------------- convergence (existing)
def test_plot_convergence_with_spin_inset(tmp_path):
    log = pd.DataFrame({"epoch": np.arange(1, 41), "free_energy": -2.0 + np.exp(-np.arange(40) / 10),
                        "stderr": np.full(40, 0.01)})
    spins = np.where(np.random.default_rng(4).random((9, 4, 4)) < 0.5, -1, 1)
    written(plot_convergence(log, -2.0, tmp_path / "conv.png", title="Ising", spins=spins))
    csv = tmp_path / "log.csv"
    log.to_csv(csv, index=False)
    written(plot_convergence(csv, None, tmp_path / "conv_plain.png"))
    with pytest.raises(ValueError, match="free_energy"):
        plot_convergence(log.iloc[:0], -2.0, tmp_path / "empty.png")

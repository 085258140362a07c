"""Figures (analysis/plots.py): files are written as PNG and PDF; bad input raises ValueError."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from analysis.plots import (
    _convergence_figure,
    bound_violations,
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


# ---------------------------------------------------------------------- convergence: columns, bound, limits
def decaying_log(n=60, exact=-2.0, start=0.5, se=0.002, below=None, seed=5):
    """A training log converging to ``exact`` from above; ``below``: shift the second half down by it."""
    rng = np.random.default_rng(seed)
    f = exact + start * np.exp(-np.arange(n) / (n / 8)) + 0.01 + se * rng.normal(size=n).clip(-2, 2)
    if below is not None:
        f[n // 2:] = exact - below
    return pd.DataFrame({"epoch": np.arange(1, n + 1), "free_energy_hs": f, "free_energy_ising": f + 0.25,
                         "stderr": np.full(n, se)})


def panels(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<inset>" and ax.get_xlabel()]


def all_text(fig):
    texts = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        texts += [ax.get_xlabel(), ax.get_ylabel(), ax.get_title()]
        if ax.get_legend() is not None:
            texts += [t.get_text() for t in ax.get_legend().get_texts()]
    return texts


def test_plot_convergence_columns_and_labels(tmp_path):
    log = decaying_log()
    fig = _convergence_figure(log, -2.0, title="Ising L=4")
    try:
        main, err = panels(fig)
        # None picks free_energy_hs (not the Ising column): the batch-mean line holds its values
        (line,) = [ln for ln in main.get_lines() if ln.get_label() == "variational $F/N$ (batch mean)"]
        np.testing.assert_array_equal(line.get_ydata(), log["free_energy_hs"])
        assert "Hubbard-Stratonovich" in main.get_ylabel() and main.get_xlabel() == "training step"
        legend = [t.get_text() for t in main.get_legend().get_texts()]
        assert "running mean (5 steps)" in legend and "± 1 standard error" in legend
        assert any(t.startswith("exact (finite L): -2.000000") for t in legend)
        assert not any("eq." in t for t in all_text(fig))  # no internal equation numbers
        assert len(main.collections) == 1  # the standard-error band
        band = main.collections[0].get_paths()[0].vertices[:, 1]
        assert band.max() == pytest.approx((log["free_energy_hs"] + 0.002).max())
        assert fig.texts == []  # converging from above: no warning
    finally:
        plt.close(fig)
    # the Ising column, with an exact value in the Ising normalisation
    fig = _convergence_figure(log, -1.75, column="free_energy_ising", exact_label="exact (Kaufman, finite L)")
    try:
        main = panels(fig)[0]
        assert "(Ising)" in main.get_ylabel()
        np.testing.assert_array_equal(main.get_lines()[0].get_ydata(), log["free_energy_ising"])
        assert any(t.startswith("exact (Kaufman, finite L)") for t in all_text(fig)) and fig.texts == []
    finally:
        plt.close(fig)
    # old logs (free_energy, no stderr, no epoch) still work, and files are written
    old = pd.DataFrame({"free_energy": log["free_energy_hs"]})
    written(plot_convergence(old, -2.0, tmp_path / "old.png"))
    csv = tmp_path / "new.csv"
    log.to_csv(csv, index=False)
    written(plot_convergence(csv, -2.0, tmp_path / "new.png", zoom=False))


@pytest.mark.parametrize("log, column, match", [
    (pd.DataFrame({"epoch": [1, 2], "loss": [1.0, 0.5]}), None, "'free_energy_hs', 'free_energy', 'free_energy_ising'"),
    (pd.DataFrame({"epoch": [1, 2], "free_energy": [1.0, 0.5]}), "free_energy_ising", "no column 'free_energy_ising'"),
    (pd.DataFrame({"epoch": [1, 2], "free_energy": [1.0, 0.5]}), "loss", "column must be None or one of"),
    (pd.DataFrame({"epoch": [], "free_energy_hs": []}), None, "at least one row"),
])
def test_plot_convergence_bad_columns(tmp_path, log, column, match):
    with pytest.raises(ValueError, match=match):
        plot_convergence(log, -2.0, tmp_path / "bad.png", column=column)
    assert not (tmp_path / "bad.png").exists()


def test_bound_violations_counts():
    exact = -2.0
    assert bound_violations([-1.9, -1.99, -2.0], [0.01] * 3, exact) == 0  # equal to exact is no violation
    assert bound_violations([-2.05], [0.01], exact) == 1  # 5 standard errors below
    assert bound_violations([-2.05], [0.02], exact) == 0  # 2.5 standard errors: noise
    assert bound_violations([-2.05], None, exact) == 1  # no standard errors: any value below counts
    assert bound_violations([-2.05], [np.nan], exact) == 1
    assert bound_violations([np.nan, -1.9], None, exact) == 0
    assert bound_violations([-2.05], [0.02], exact, sigmas=2.0) == 1
    # running mean: 20 steps 2 s.e. above, then 20 steps 2.5 s.e. below (each within noise alone);
    # the 5-step mean has s.e. 0.001/√5, so it is significantly below from the window ending at step 23 on
    f = np.r_[np.full(20, exact + 0.002), np.full(20, exact - 0.0025)]
    se = np.full(40, 0.001)
    assert bound_violations(f, se, exact, window=0) == 0
    assert bound_violations(f, se, exact, window=5) == 17
    assert bound_violations(f, se, exact) == 17  # default window for 40 steps: max(5, 40 // 50) = 5
    assert bound_violations(torch.from_numpy(f), se, exact, window=40) == 0  # the full mean is above exact
    with pytest.raises(ValueError, match=r"shape of f, \(40,\)"):
        bound_violations(f, se[:3], exact)
    with pytest.raises(ValueError, match="exact must be finite"):
        bound_violations(f, se, float("nan"))
    with pytest.raises(ValueError, match="window must be"):
        bound_violations(f, se, exact, window=-1)


@pytest.mark.parametrize("zoom", [True, False])
def test_plot_convergence_warns_below_exact(tmp_path, zoom):
    log = decaying_log(below=0.02)  # second half 10 standard errors below exact
    n_bad = bound_violations(log["free_energy_hs"], log["stderr"], -2.0)
    assert n_bad == 30
    fig = _convergence_figure(log, -2.0, zoom=zoom)
    try:
        (text,) = fig.texts
        assert "F/N below exact at 30 of 60 training steps" in text.get_text()
        assert "variational bound broken" in text.get_text()
        assert matplotlib.colors.same_color(text.get_color(), "red")
        # the broken points are drawn as red markers with a legend entry in the last panel
        ax = panels(fig)[-1]
        (marks,) = [ln for ln in ax.get_lines() if ln.get_label() == "below exact: bound broken"]
        assert matplotlib.colors.same_color(marks.get_color(), "red") and len(marks.get_xdata()) == 30
    finally:
        plt.close(fig)
    written(plot_convergence(log, -2.0, tmp_path / "broken.png", zoom=zoom))


def test_plot_convergence_limits_show_first_point_and_values_below_exact():
    # a moderate decay (the old 98th-percentile limit cut off the first points)
    log = decaying_log(n=40)
    f = log["free_energy_hs"].to_numpy()
    fig = _convergence_figure(log, -2.0)
    try:
        main = panels(fig)[0]
        lo, hi = main.get_ylim()
        assert main.get_yscale() == "linear" and lo < -2.0 and lo < f.min() and hi > f[0] == f.max()
    finally:
        plt.close(fig)
    # huge first values: symlog, still everything inside; values below exact are not hidden either
    log = decaying_log(below=0.05)
    log.loc[0, "free_energy_hs"] = 1e3
    f = log["free_energy_hs"].to_numpy()
    fig = _convergence_figure(log, -2.0, spins=np.ones((4, 3, 3)))
    try:
        main = panels(fig)[0]
        lo, hi = main.get_ylim()
        assert main.get_yscale() == "symlog"
        assert lo < f.min() == -2.05 and hi > f[0] == 1e3
    finally:
        plt.close(fig)


def test_plot_convergence_error_panel_does_not_clip():
    exact = -2.0
    log = decaying_log(below=1e-3, se=1e-4)
    f = log["free_energy_hs"].to_numpy()
    fig = _convergence_figure(log, exact)
    try:
        err_ax = panels(fig)[1]
        assert err_ax.get_yscale() == "log"
        ys = np.concatenate([np.asarray(ln.get_ydata(), dtype=float) for ln in err_ax.get_lines()])
        ys = ys[np.isfinite(ys)]
        assert (ys > 0).all() and not np.isclose(ys, 1e-6, rtol=1e-3, atol=0).any()
        # |F/N − exact| of the values below exact is what is drawn for them, not a floor
        (line,) = [ln for ln in err_ax.get_lines() if ln.get_label().startswith("$|F/N")]
        np.testing.assert_allclose(line.get_ydata(), np.abs(f - exact))
        (marks,) = [ln for ln in err_ax.get_lines() if ln.get_label() == "below exact: bound broken"]
        np.testing.assert_allclose(marks.get_ydata(), 1e-3)
        assert err_ax.get_ylim()[0] < 1e-3
    finally:
        plt.close(fig)

"""benchmarks/ising_speed.py: side-by-side ratios (issue 16), on tiny settings (L=4, a few iterations)."""

from __future__ import annotations

import importlib
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import benchmark_module
import torch

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path("/work/.mirror/wangleiphy+MongeAmpereFlow/repo")  # only on the project's own machines
ORIGINAL = Path("/tmp/maf_orig")


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("ising_speed.py", "ising_speed_bench")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_no_original_prints_unavailable(bench, capsys):
    bench.main(["--iters", "1", "--sizes"])
    out = capsys.readouterr().out
    assert "threads" in out and torch.__version__ in out
    assert "ratio against the original: unavailable" in out
    assert "--original" in out and "wangleiphy/MongeAmpereFlow" in out
    assert not hasattr(bench, "ORIGINAL_S_PER_ITER")
    assert "speed-up vs original" not in out


def test_bad_original_path_exits_with_message(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--original", str(tmp_path / "nowhere"), "--iters", "1", "--sizes"])
    assert "--original" in str(e.value.code) and "not a directory" in str(e.value.code)
    (tmp_path / "flow.py").write_text("")
    with pytest.raises(SystemExit) as e:
        bench.main(["--original", str(tmp_path), "--iters", "1", "--sizes"])
    assert "does not look like a checkout" in str(e.value.code) and "net.py" in str(e.value.code)
    assert "s/iteration" not in capsys.readouterr().out  # it fails before any timing


def test_bad_baseline_commit_exits_with_message(bench):
    with pytest.raises(SystemExit) as e:
        bench.main(["--baseline-commit", "no-such-revision-xyz", "--iters", "1", "--sizes"])
    assert "--baseline-commit" in str(e.value.code) and "not a commit" in str(e.value.code)


def test_baseline_commit_head_is_imported_under_another_name(bench, capsys, monkeypatch):
    import latticeflow

    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    base = bench.load_baseline(head)
    assert base.__name__ == f"latticeflow_{head[:12]}" and sys.modules[base.__name__] is base
    assert base is not latticeflow and base.build.build_flow is not latticeflow.build.build_flow
    assert REPO not in Path(base.__file__).resolve().parents  # the exported copy, not the working tree
    assert Path(base.build.__file__).parent == Path(base.__file__).parent
    ratios = bench.compare_baseline(base, bench.baseline_configs(L=4, hidden=16, n_steps=3, batch=8),
                                    L=4, rounds=3, iters=1)
    out = capsys.readouterr().out
    assert "ratio of medians baseline / current" in out
    assert len(ratios) == 2
    for label, r in ratios.items():
        assert r is not None and math.isfinite(r) and r > 0, (label, r)
    # --bfloat16 with --baseline-commit: each side's iterations run inside its own package's products("bfloat16")
    from latticeflow.native import step as native_step

    base_step = importlib.import_module(f"{base.__name__}.native.step")
    assert base_step is not native_step
    seen = []
    for mod, who in ((native_step, "current"), (base_step, "baseline")):
        def spy(precision, real=mod.products, who=who):
            seen.append((who, precision))
            return real(precision)

        monkeypatch.setattr(mod, "products", spy)
    r = bench.compare_baseline(base, [("paper configuration, bfloat16 products", bench.paper_config(16, 3), 8)],
                               L=4, rounds=1, iters=1, precision="bfloat16")
    assert {("current", "bfloat16"), ("baseline", "bfloat16")} <= set(seen)
    assert all(p == "bfloat16" for _, p in seen)
    assert all(math.isfinite(v) for v in r.values())


def test_unknown_non_flow_key_dropped_flow_key_skips(bench):
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    base = bench.load_baseline(head)
    cfg, note = bench.config_for_baseline({**bench.paper_config(), "some_training_option": 1}, base)
    assert cfg == bench.paper_config() and "some_training_option" in note
    assert "kernel_size" in bench._keys_build_reads()

    class Old:  # a baseline whose config knows no kernel_size
        class config:
            class ISING_DEFAULT:
                @staticmethod
                def to_dict():
                    return {k: v for k, v in base.config.ISING_DEFAULT.to_dict().items() if k != "kernel_size"}

    cfg, note = bench.config_for_baseline({**bench.paper_config(), "kernel_size": 3}, Old)
    assert cfg is None and "kernel_size" in note


def _original_checkout() -> Path | None:
    if (ORIGINAL / "flow.py").is_file():
        return ORIGINAL
    if ORIGINAL.exists() or not MIRROR.exists() or shutil.which("git") is None:
        return None
    # the mirror's large data files are absent: clone without a checkout, then check out everything but data/
    try:
        subprocess.run(["git", "clone", "-q", "--no-checkout", str(MIRROR), str(ORIGINAL)], check=True)
        files = subprocess.run(["git", "-C", str(ORIGINAL), "ls-tree", "-r", "--name-only", "HEAD"], check=True,
                               capture_output=True, text=True).stdout.split()
        subprocess.run(["git", "-C", str(ORIGINAL), "checkout", "HEAD", "--",
                        *[f for f in files if not f.startswith("data/")]], check=True)
    except subprocess.CalledProcessError:
        return None
    return ORIGINAL if (ORIGINAL / "flow.py").is_file() else None


def test_original_side_by_side_tiny(bench, capsys):
    path = _original_checkout()
    if path is None:
        pytest.skip("no checkout of wangleiphy/MongeAmpereFlow at /tmp/maf_orig (and none could be made from a mirror)")
    before = set(sys.modules)
    orig = bench.load_original(path)
    assert not {"flow", "net", "symmetrize", "objectives"} & (set(sys.modules) - before)  # imported, then unlisted
    r = bench.compare_original(orig, L=4, batch=8, hidden=16, n_steps=3, rounds=3, iters=1)
    out = capsys.readouterr().out
    assert "ratio of medians original / ours" in out
    assert r is not None and math.isfinite(r) and r > 0


def test_default_table_times_each_size_in_its_own_process(bench, capsys):
    """--default-table: one row per L, the driver's default flow at each (batch from L), peak memory from a
    fresh process (so a larger L has its own, not the parent's, high-water mark)."""
    from latticeflow.config import IsingConfig

    rows = bench.default_table([3, 4], iters=1, threads=1)
    out = capsys.readouterr().out
    assert [r["L"] for r in rows] == [3, 4] and [r["N"] for r in rows] == [9, 16]
    assert [r["batch"] for r in rows] == [IsingConfig(L=3).batch_size, IsingConfig(L=4).batch_size]
    for r in rows:
        assert r["threads"] == 1 and 0 < r["s_per_iter"] <= r["mean_s_per_iter"]
        assert r["peak_kb"] >= r["rss_before_kb"] > 0
    assert "peak RSS" in out and len([ln for ln in out.splitlines() if ln.strip().startswith(("3 ", "4 "))]) == 2


def test_default_table_flag_reaches_the_table(bench, monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "default_table", lambda sizes, iters, threads: seen.update(
        sizes=sizes, iters=iters, threads=threads))
    bench.main(["--default-table", "8", "16", "--iters", "3", "--threads", "1"])
    assert seen == {"sizes": [8, 16], "iters": 3, "threads": 1}


def test_baseline_flags_build_the_driver_flow_and_need_a_commit(bench, capsys):
    with pytest.raises(SystemExit, match="--baseline-flags needs --baseline-commit"):
        bench.main(["--baseline-flags", "--L 4", "--iters", "1", "--sizes"])
    with pytest.raises(SystemExit):  # a bad driver flag fails before any timing
        bench.main(["--baseline-commit", "HEAD", "--baseline-flags", "--L 4 --no-such-flag", "--iters", "1"])
    config, L = bench.driver_config("--L 3 --hidden 4 --potential quadratic+mlp --n-steps 2 --batch 8")
    assert (L, config["hidden"], config["potential"], config["n_steps"], config["batch"]) == (3, 4, "quadratic+mlp", 2, 8)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    ratios = bench.compare_baseline(bench.load_baseline(head), [("tiny", config, config["batch"])], L=L,
                                    rounds=1, iters=1)
    assert math.isfinite(ratios["tiny"]) and "tiny:" in capsys.readouterr().out


def test_stage_gemm_shapes_are_the_fused_stages_matmuls(bench):
    """The matmuls the roofline ceiling times are those one fused MLP stage really runs (B ≤ N, the
    paper configuration), forward and backward, found by recording every aten matmul it dispatches;
    their FLOPs are mlp_flops' 12·B·N·h per stage."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from latticeflow.potentials import MLPPotential

    B, N, h = 4, 16, 8
    seen = []

    class Matmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("mm", "addmm", "addmm_"):
                a, b = args[-2], args[-1]
                if 1 not in (a.shape[0], b.shape[1]):  # matrix-vector products are the Laplacian's O(B·h) term
                    seen.append((tuple(a.shape), tuple(b.shape)))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    pot = MLPPotential(N, h, activation="lncosh", bias=False, init_scale=0.5).double()
    x = torch.randn(B, N, dtype=torch.float64, requires_grad=True)
    with Matmuls():
        g, lap = pot.grad_and_laplacian(x, 0.0)
        (g.square().sum() + lap.sum()).backward()
    assert sorted(seen) == sorted(bench.stage_gemm_shapes(B, N, h))
    gemm_flops = sum(2 * a[0] * a[1] * b[1] for a, b in bench.stage_gemm_shapes(B, N, h))
    assert gemm_flops == 12 * B * N * h == 3 * bench.mlp_flops(B, N, h) - 30 * B * h


def test_stage_gemm_seconds_is_a_positive_time(bench):
    t = bench.stage_gemm_seconds(4, 16, 8, reps=3, rounds=3)
    assert math.isfinite(t) and t > 0

"""benchmarks/mnist_speed.py: the side-by-side with the original (issue 17), on tiny settings.

The original (wangleiphy/MongeAmpereFlow) is never needed here: a fake checkout in tmp_path has
the modules and classes the benchmark imports from a real one (``flow.MongeAmpereFlow``,
``net.Simple_MLP``, ``symmetrize``, ``objectives.ising``), so the import machinery, the flags and
the printed lines are tested without it. No test depends on a measured time.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import benchmark_module

TINY = ["--dim", "16", "--hidden", "8", "--n-steps", "2", "--batch", "4", "--iters", "2", "--warmup", "0",
        "--threads", "1"]

FAKE_NET = '''
import torch
from torch import nn

CALLS = []


class Simple_MLP(nn.Module):
    def __init__(self, dim, hidden_size, use_z2=True, device="cpu", name=None):
        super().__init__()
        CALLS.append(("Simple_MLP", dim, hidden_size, use_z2))
        self.dim = dim
        self.fc1 = nn.Linear(dim, hidden_size, bias=not use_z2)
        self.fc2 = nn.Linear(hidden_size, 1, bias=False)
'''

FAKE_FLOW = '''
import torch
from torch import nn
from symmetrize import Symmetrize  # noqa: F401 (a real checkout's flow.py imports it too)
from net import CALLS


class MongeAmpereFlow(nn.Module):
    def __init__(self, net, epsilon, Nsteps, device="cpu", name=None):
        super().__init__()
        CALLS.append(("MongeAmpereFlow", epsilon, Nsteps, str(device)))
        self.net, self.dim = net, net.dim

    def nll(self, x):
        CALLS.append(("nll", tuple(x.shape), x.dtype, x.requires_grad))
        FAIL
        return 0.5 * x.pow(2).sum(1) + self.net.fc2(torch.nn.functional.softplus(self.net.fc1(x))).sum(1)
'''


def make_fake_original(root: Path, fail_at_run: bool = False, fail_at_import: bool = False) -> Path:
    """A directory laid out like a checkout of the original, with tiny stand-in classes."""
    (root / "objectives").mkdir(parents=True)
    fail = 'raise RuntimeError("fake: an operator this torch no longer has")' if fail_at_run else "pass"
    (root / "flow.py").write_text(FAKE_FLOW.replace("FAIL", fail))
    (root / "net.py").write_text(("import no_such_module_of_the_original\n" if fail_at_import else "") + FAKE_NET)
    (root / "symmetrize.py").write_text("class Symmetrize:\n    pass\n")
    (root / "objectives" / "__init__.py").write_text("")
    (root / "objectives" / "ising.py").write_text("class Ising:\n    pass\n")
    return root


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("mnist_speed.py", "mnist_speed_bench")


@pytest.fixture
def fast(bench, monkeypatch):
    """No 6 s matmul reference, and each side measured in this process instead of a subprocess
    (through the same child flags, :func:`child_argv`, and parser)."""
    monkeypatch.setattr(bench, "matmul_gflops", lambda *a, **k: 1.0)
    monkeypatch.setattr(bench, "run_child",
                        lambda args, which: bench.child_result(bench.parse_args(bench.child_argv(args, which))))


pytestmark = pytest.mark.usefixtures("one_thread")


def test_original_flag_reaches_args_and_the_child(bench, tmp_path):
    assert bench.parse_args([]).original is None
    args = bench.parse_args(["--original", str(tmp_path), *TINY])
    assert args.original == str(tmp_path)
    child = bench.parse_args(bench.child_argv(args, "original"))
    assert child.child == "original" and child.original == str(tmp_path)
    for key in ("dim", "hidden", "n_steps", "step_size", "batch", "iters", "warmup", "threads", "dtype", "device"):
        assert getattr(child, key) == getattr(args, key), key
    ours = bench.parse_args(bench.child_argv(args, "no-checkpoint"))
    assert ours.child == "no-checkpoint" and ours.original is None  # our children never import the original


def test_no_original_prints_unavailable(bench, fast, capsys):
    summary = bench.main([*TINY, "--variants", "no-checkpoint"])
    out = capsys.readouterr().out
    assert "ratio against the original: unavailable (no --original given" in out
    assert "wangleiphy/MongeAmpereFlow" in out and "--original PATH" in out
    assert "no-checkpoint" in out and "s/iter" in out  # our own numbers
    assert summary["original"] is None and "no --original" in summary["original_unavailable"]
    assert "ratio of medians" not in out


def test_bad_original_path_exits_before_any_timing(bench, monkeypatch, tmp_path, capsys):
    def never(*args, **kwargs):
        raise AssertionError("timed before checking --original")

    monkeypatch.setattr(bench, "run_child", never)
    monkeypatch.setattr(bench, "matmul_gflops", never)
    with pytest.raises(SystemExit) as e:
        bench.main(["--original", str(tmp_path / "nowhere"), *TINY])
    assert "--original" in str(e.value.code) and "not a directory" in str(e.value.code)
    (tmp_path / "flow.py").write_text("")
    with pytest.raises(SystemExit) as e:
        bench.main(["--original", str(tmp_path), *TINY])
    assert "does not look like a checkout" in str(e.value.code) and "net.py" in str(e.value.code)
    assert "s/iter" not in capsys.readouterr().out


def test_original_step_built_as_its_density_estimation(bench, tmp_path):
    orig = bench.load_original(make_fake_original(tmp_path / "maf"))
    assert orig.path == (tmp_path / "maf").resolve()
    args = bench.parse_args(["--original", str(orig.path), *TINY])
    step = bench.make_original_step(orig, args)
    loss = step()
    assert math.isfinite(loss)
    calls = orig.Simple_MLP.__init__.__globals__["CALLS"]
    # Simple_MLP(dim, hdim, use_z2=False), MongeAmpereFlow(net, epsilon, Nsteps), nll of a float32 batch that
    # requires grad (its step() calls .requires_grad_() on the data)
    assert calls == [("Simple_MLP", 16, 8, False), ("MongeAmpereFlow", 0.1, 2, "cpu"),
                     ("nll", (4, 16), bench.torch.float32, True)]


def test_side_by_side_with_a_fake_original(bench, monkeypatch, tmp_path, capsys):
    # the original's memory in its own subprocess (the real one: its flags through the command line), the timing
    # interleaved in this process; our variant's subprocess is the one the script has always run, here in-process
    # to keep the test short
    run_child = bench.run_child
    monkeypatch.setattr(bench, "matmul_gflops", lambda *a, **k: 1.0)
    monkeypatch.setattr(bench, "run_child", lambda args, which: run_child(args, which) if which == "original" else
                        bench.child_result(bench.parse_args(bench.child_argv(args, which))))
    fake = make_fake_original(tmp_path / "maf")
    summary = bench.main(["--original", str(fake), *TINY, "--variants", "no-checkpoint",
                          "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert summary["original"]["path"] == str(fake.resolve())
    r = summary["original"]["ratios"]["no-checkpoint"]
    assert math.isfinite(r) and r > 0
    assert len(summary["original"]["times"]["original"]) == 2  # --iters rounds
    assert set(summary["results"]) == {"no-checkpoint", "original"}
    assert all(res["vmhwm_kb"] > 0 for res in summary["results"].values())
    assert "ratio of medians original / ours (no-checkpoint)" in out
    assert "peak memory original / ours (no-checkpoint)" in out
    assert "unavailable" not in out
    assert (tmp_path / "out.json").is_file()


@pytest.mark.parametrize("failure", ["run", "import"])
def test_original_that_fails_says_why_in_one_line(bench, fast, tmp_path, capsys, failure):
    fake = make_fake_original(tmp_path / "maf", fail_at_run=failure == "run", fail_at_import=failure == "import")
    summary = bench.main(["--original", str(fake), *TINY, "--variants", "no-checkpoint"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "unavailable" in line]
    assert len(lines) == 1, out
    assert lines[0].startswith("ratio against the original: unavailable: ")
    assert bench.torch.__version__ in lines[0]
    why = "an operator this torch no longer has" if failure == "run" else "no_such_module_of_the_original"
    assert why in lines[0]
    assert "Traceback" not in out
    assert "no-checkpoint" in summary["results"] and "original" not in summary["results"]  # ours still measured
    assert summary["original"] is None and why in summary["original_unavailable"]


def test_original_failing_only_in_the_side_by_side(bench, fast, tmp_path, capsys, monkeypatch):
    fake = make_fake_original(tmp_path / "maf")

    def fails(orig, args):
        raise bench.OriginalUnavailable("the original's training iteration failed on torch x: RuntimeError: boom")

    monkeypatch.setattr(bench, "compare_original", fails)
    summary = bench.main(["--original", str(fake), *TINY, "--variants", "no-checkpoint"])
    out = capsys.readouterr().out
    assert [line.strip() for line in out.splitlines() if "unavailable" in line] == [
        "ratio against the original: unavailable: the original's training iteration failed on torch x: "
        "RuntimeError: boom"]
    assert summary["original"] is None and "original" in summary["results"]


def test_compare_original_raises_when_the_original_fails(bench, tmp_path):
    orig = bench.load_original(make_fake_original(tmp_path / "maf", fail_at_run=True))
    args = bench.parse_args(["--original", str(orig.path), *TINY, "--variants", "no-checkpoint"])
    with pytest.raises(bench.OriginalUnavailable, match="training iteration failed on torch"):
        bench.compare_original(orig, args)

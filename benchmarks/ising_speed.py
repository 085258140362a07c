"""Speed of variational training on the Ising model (paper configuration) and its scaling with L.

Prints seconds per training iteration (sample a batch by integrating forward, reverse-KL
loss, backward, Adam step), the achieved GFLOP/s of the potential's arithmetic against a
torch matmul of the same shape measured in the same run, the top operators from
torch.profiler, and time per iteration for L = 8, 16, 32, 64.

Speed-ups are only ever ratios measured side by side, in this process, with the same thread
count, interleaved round by round (absolute times do not carry between machines):

* ``--original PATH``: against the original public implementation (wangleiphy/MongeAmpereFlow),
  imported at run time from the user's checkout PATH and built with its own classes in the
  paper's Ising configuration; prints the ratio of medians original / ours.
* ``--baseline-commit REV``: against this repository's ``latticeflow`` at an earlier commit,
  exported with ``git archive`` and imported under another top-level name; prints the ratio
  of medians baseline / current for the paper configuration and the driver's default at L=16.

    python benchmarks/ising_speed.py                 # paper configuration + scaling
    python benchmarks/ising_speed.py --iters 5 --sizes 8 16
    git clone https://github.com/wangleiphy/MongeAmpereFlow /tmp/maf
    python benchmarks/ising_speed.py --original /tmp/maf --baseline-commit HEAD~5 --threads 1 --sizes
    python benchmarks/ising_speed.py --default-table 8 16 32 64 --threads 1   # time + peak memory

``--default-table L...`` prints only a table of the driver's default flow (``IsingConfig(L=L)``,
as ``python -m models.ising --L L`` builds it: quadratic + conv + MLP, batch from L) at each L:
seconds per training iteration (the fastest of ``--iters``, after a warm-up) and peak memory,
each L in its own Python process so that its high-water mark (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import importlib.util
import inspect
import io
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import latticeflow as lf  # noqa: E402
from latticeflow.build import build_flow  # noqa: E402
from latticeflow.native import step as native_step  # noqa: E402

ORIGINAL_URL = "https://github.com/wangleiphy/MongeAmpereFlow"
#: the paper's Ising run (variational_free_energy.py -L 16 -T 2.269185314213022 -symmetrize -net Simple_MLP
#: -hdim 512 -Batchsize 64 -Nsteps 50 -epsilon 0.1, its default -lr 0.001 -decay 0.001)
T_C = 2.269185314213022
PAPER_L, PAPER_BATCH, PAPER_HIDDEN, PAPER_STEPS, PAPER_EPS = 16, 64, 512, 50, 0.1


def paper_config(hidden: int = PAPER_HIDDEN, n_steps: int = PAPER_STEPS) -> dict[str, Any]:
    """The flow this benchmark has always timed (softplus MLP with biases, time-independent), spelled out."""
    return {"potential": "mlp", "hidden": hidden, "n_steps": n_steps, "step_size": PAPER_EPS, "symmetrize": "random",
            "group": "space+z2", "dtype": "float32", "activation": "softplus", "bias": True,
            "time_dependent": False, "init_scale": 1e-3}


def mlp_flops(B: int, N: int, h: int) -> float:
    """FLOPs of one MLP potential evaluation (value, gradient, Laplacian) for a batch.

    h = xWᵀ (2BNh), grad = (a'(h)w) W (2BNh), Laplacian (a''(h)w)·‖W‖² (2Bh) + elementwise.
    """
    return 4.0 * B * N * h + 10.0 * B * h


def make_step(config: dict, L: int, batch: int, pkg: types.ModuleType | None = None,
              precision: str = "float32") -> Callable[[], None]:
    """One training iteration of ``pkg``'s flow (default: this working tree's latticeflow) as a closure.

    ``pkg`` may be another copy of the package (:func:`load_baseline`): its own ``ising`` target
    and ``build.build_flow`` are used, so nothing of the current tree enters its iteration.
    ``precision``: the products of this tree's GEMM steps (``--train-precision``).
    """
    pkg = lf if pkg is None else pkg
    target = pkg.ising(L, pkg.critical)
    torch.manual_seed(0)
    flow = (build_flow if pkg is lf else pkg.build.build_flow)(config, target.lattice)
    steps_of = native_step
    if pkg is not lf and precision != "float32":  # the baseline's own step module sets its products
        try:
            steps_of = importlib.import_module(f"{pkg.__name__}.native.step")
            steps_of.products  # noqa: B018
        except (ImportError, AttributeError):
            raise ValueError(f"latticeflow at {getattr(pkg, '__baseline_commit__', '?')[:12]} has no "
                             f"{precision} products") from None
    return training_step(flow, target, batch, precision=precision, steps_of=steps_of)


def training_step(flow: torch.nn.Module, target: object, batch: int, lr: float = 1e-3,
                  precision: str = "float32", steps_of: types.ModuleType | None = None) -> Callable[[], None]:
    """One reverse-KL training iteration of ``flow`` as a closure: sample a batch, loss, backward, Adam step
    (the GEMM steps' products in ``precision``, as the trainer's ``train_precision``, set through
    ``steps_of.products``: this tree's latticeflow.native.step by default)."""
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    products = (native_step if steps_of is None else steps_of).products

    def step() -> None:
        with products(precision):
            x, logp = flow.sample(batch, generator=gen)
            loss = (logp + target.energy(x)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()

    return step


#: what the GEMM step's products are computed by, by precision (latticeflow.native.step.gemm_choice)
GEMM_NAMES = {"float32": {"native": "the float32 tiles", "mkl": "MKL's sgemm"},
              "bfloat16": {"native": "the AVX512-BF16 tiles", "mkl": "MKL's gemm_bf16bf16f32"}}


def time_iteration(config: dict, L: int, batch: int, iters: int, warmup: int = 2,
                   pkg: types.ModuleType | None = None, precision: str = "float32") -> float:
    step = make_step(config, L, batch, pkg, precision)
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) / iters


def time_interleaved(steps: dict[str, Callable[[], None]], rounds: int = 7, iters: int = 2,
                     warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per iteration of each step, per round: after ``warmup`` iterations of each, ``rounds``
    rounds of ``iters`` iterations of each, in alternating order (A B, B A, ...) so that neither
    always runs first after the other."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            for _ in range(iters):
                steps[n]()
            out[n].append((time.perf_counter() - t0) / iters)
    return out


def ratio_of_medians(times: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(times[num]) / statistics.median(times[den])


def _summary(ts: list[float]) -> str:
    return f"{statistics.median(ts):.3f} s/iter (median of {len(ts)}; {min(ts):.3f}–{max(ts):.3f})"


# ---------------------------------------------------------------------------------------------
# The original implementation (wangleiphy/MongeAmpereFlow), imported from the user's checkout
# ---------------------------------------------------------------------------------------------

class OriginalUnavailable(RuntimeError):
    """The original cannot be imported or run from the given path; the message says why."""


#: top-level module names the original uses (it imports them as ``from flow import ...``)
_ORIGINAL_TOPLEVEL = ("flow", "net", "symmetrize", "objectives")
_ORIGINAL_FILES = ("flow.py", "net.py", "symmetrize.py", "objectives/__init__.py", "objectives/ising.py")


def check_original_path(path: str | Path) -> Path:
    """``path`` resolved, if it looks like a checkout of wangleiphy/MongeAmpereFlow.

    Raises:
        OriginalUnavailable: not a directory, or one of the original's files is missing.
    """
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise OriginalUnavailable(f"{path} is not a directory (expected a checkout of {ORIGINAL_URL})")
    missing = [f for f in _ORIGINAL_FILES if not (p / f).is_file()]
    if missing:
        raise OriginalUnavailable(f"{path} does not look like a checkout of {ORIGINAL_URL}: "
                                  f"missing {', '.join(missing)}")
    return p


def _is_original_module(name: str) -> bool:
    return name in _ORIGINAL_TOPLEVEL or name.startswith("objectives.")


def load_original(path: str | Path) -> types.SimpleNamespace:
    """The original's classes, imported from the checkout at ``path``.

    The original imports its modules by top-level names (``flow``, ``net``, ``symmetrize``,
    ``objectives``), so ``path`` goes first on ``sys.path`` for the import only; the modules
    are then removed from ``sys.modules`` again (and any of the same names that were there put
    back), the classes keeping their own module globals. Nothing of the original is copied.

    Shims: none are needed on torch 2.13 (checked against the repository's last commit: its
    ``torch.autograd.Variable``, ``torch.Tensor(b, n).normal_()`` and ``torch.mm`` calls still
    work); if a future torch removes something it uses, add the shim here, documented.

    Raises:
        OriginalUnavailable: bad path (see :func:`check_original_path`) or a failed import.
    """
    p = check_original_path(path)
    saved = {n: m for n, m in sys.modules.items() if _is_original_module(n)}
    for n in saved:
        del sys.modules[n]
    sys.path.insert(0, str(p))
    importlib.invalidate_caches()
    try:
        with warnings.catch_warnings():  # its docstrings' invalid escapes ('\c') warn when compiled on Python >= 3.6
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", SyntaxWarning)
            mods = {n: importlib.import_module(n) for n in ("flow", "net", "symmetrize", "objectives.ising")}
        for n, m in mods.items():
            f = Path(getattr(m, "__file__", "") or "").resolve()
            if p not in f.parents:
                raise OriginalUnavailable(f"module {n!r} came from {f}, not from {p}")
        commit = subprocess.run(["git", "-C", str(p), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "unknown commit"
        return types.SimpleNamespace(path=p, commit=commit, MongeAmpereFlow=mods["flow"].MongeAmpereFlow,
                                     Simple_MLP=mods["net"].Simple_MLP, Symmetrize=mods["symmetrize"].Symmetrize,
                                     Ising=mods["objectives.ising"].Ising)
    except OriginalUnavailable:
        raise
    except Exception as e:  # an import error of the original's own code or its dependencies
        raise OriginalUnavailable(f"importing the original from {p} failed on torch {torch.__version__}: "
                                  f"{type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(p))
        for n in [n for n in sys.modules if _is_original_module(n)]:
            del sys.modules[n]
        sys.modules.update(saved)


def open_original(path: str | Path | None) -> tuple[types.SimpleNamespace | None, str | None]:
    """The original from ``--original PATH``: (its classes, None), or (None, why it is unavailable).

    A bad path (not a checkout) stops the script before any timing (SystemExit naming the flag);
    an import that fails only costs the ratio, whose line then says why. ``path`` None: (None, None).
    """
    if path is None:
        return None, None
    try:
        check_original_path(path)
    except OriginalUnavailable as e:
        raise SystemExit(f"--original: {e}") from None
    try:
        return load_original(path), None
    except OriginalUnavailable as e:
        return None, f"ratio against the original: unavailable: {e}"


def make_original_step(orig: types.SimpleNamespace, L: int = PAPER_L, batch: int = PAPER_BATCH,
                       hidden: int = PAPER_HIDDEN, n_steps: int = PAPER_STEPS) -> Callable[[], None]:
    """One training iteration of the original, as its ``variational_free_energy.py -train`` builds it.

    Ising(L, d=2, T_c, periodic); Symmetrize(Simple_MLP(L², hidden), L, 1); MongeAmpereFlow(net,
    ε=0.1, Nsteps); Adam(lr 1e-3, weight_decay 1e-3 (its default -decay)); per iteration, as in
    its ``vi()``: ``x, logp_x = model.sample(B)``, loss = mean(logp_x − target(x)) (its
    fe.mean()·L² at delta = 0), zero_grad, backward, step. Its logging, plotting and
    checkpointing are left out.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # its Ising() prints the sign and log-det of K
        target = orig.Ising(L, 2, T_C, "periodic")
    torch.manual_seed(0)
    net = orig.Symmetrize(orig.Simple_MLP(dim=target.nvars, hidden_size=hidden), L, 1)
    model = orig.MongeAmpereFlow(net, PAPER_EPS, n_steps)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)

    def step() -> None:
        x, logp_x = model.sample(batch)
        loss = (logp_x - target(x)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def compare_original(orig: types.SimpleNamespace, L: int = PAPER_L, batch: int = PAPER_BATCH,
                     hidden: int = PAPER_HIDDEN, n_steps: int = PAPER_STEPS, rounds: int = 7,
                     iters: int = 2, bfloat16: bool = False) -> float | None:
    """Print the original's and our s/iteration in the paper configuration, side by side; return
    the ratio of medians original / ours (None, with the reason printed, if the original fails).

    Ours is :func:`paper_config` (softplus MLP with biases, as this benchmark has always timed);
    the original's Simple_MLP uses ln cosh without a bias: the same matmuls, within an
    elementwise op of the same cost."""
    print(f"side by side with the original ({ORIGINAL_URL} at {orig.path}, {orig.commit}), same process, "
          f"{torch.get_num_threads()} thread(s), {rounds} interleaved rounds × {iters} iterations "
          f"(L={L}, hidden {hidden}, {n_steps} RK4 steps, batch {batch}, random symmetrisation):")
    try:
        steps = {"original": make_original_step(orig, L, batch, hidden, n_steps)}
        steps["original"]()  # fails here, before any timing, if it does not run on this torch
    except Exception as e:
        print(f"  ratio against the original: unavailable: the original's training step failed on torch "
              f"{torch.__version__}: {type(e).__name__}: {e}")
        return None
    steps["ours"] = make_step(paper_config(hidden, n_steps), L, batch)
    if bfloat16:
        steps["ours, bfloat16 products"] = make_step(paper_config(hidden, n_steps), L, batch, precision="bfloat16")
    t = time_interleaved(steps, rounds, iters)
    r = ratio_of_medians(t, "original", "ours")
    print(f"  original {_summary(t['original'])}")
    print(f"  ours     {_summary(t['ours'])}")
    print(f"  ratio of medians original / ours: {r:.2f}x")
    if bfloat16:
        rb = ratio_of_medians(t, "original", "ours, bfloat16 products")
        print(f"  ours, bfloat16 products (--train-precision bfloat16) {_summary(t['ours, bfloat16 products'])}")
        print(f"  ratio of medians original / ours with bfloat16 products: {rb:.2f}x")
    return r


# ---------------------------------------------------------------------------------------------
# An earlier commit's latticeflow, imported under another name
# ---------------------------------------------------------------------------------------------

class BaselineUnavailable(RuntimeError):
    """The commit cannot be exported or imported; the message says why."""


_ABSOLUTE_IMPORT = re.compile(r"^\s*(from\s+latticeflow[\s.]|import\s+latticeflow\b)", re.M)


def load_baseline(rev: str, repo: str | Path = REPO) -> types.ModuleType:
    """``latticeflow`` as of git commit ``rev`` of ``repo``, imported as ``latticeflow_<sha12>``.

    ``git archive rev latticeflow`` is unpacked into a temporary directory (removed at exit) and
    loaded with ``importlib.util.spec_from_file_location`` under the other top-level name; the
    package imports itself only relatively, which is checked (an absolute ``import latticeflow``
    would silently pull in the current tree).

    Raises:
        BaselineUnavailable: unknown revision, no ``latticeflow/`` there, absolute self-imports,
            or a failed import.
    """
    res = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise BaselineUnavailable(f"{rev!r} is not a commit of {repo}")
    sha = res.stdout.strip()
    name = f"latticeflow_{sha[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    arc = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", sha, "latticeflow"], capture_output=True)
    if arc.returncode != 0:
        raise BaselineUnavailable(f"git archive {sha[:12]} latticeflow failed: {arc.stderr.decode().strip()}")
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}_"))
    atexit.register(shutil.rmtree, tmp, True)
    with tarfile.open(fileobj=io.BytesIO(arc.stdout)) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(tmp, filter="data")
        else:  # pragma: no cover - Python < 3.11.4
            tf.extractall(tmp)
    pkg_dir = tmp / "latticeflow"
    bad = [f"{f.relative_to(tmp)}: {m.group(0).strip()}" for f in sorted(pkg_dir.rglob("*.py"))
           for m in [_ABSOLUTE_IMPORT.search(f.read_text(encoding="utf-8"))] if m]
    if bad:
        raise BaselineUnavailable(f"latticeflow at {sha[:12]} imports itself by name ({'; '.join(bad)}): "
                                  "under another name it would mix in the current tree")
    spec = importlib.util.spec_from_file_location(name, pkg_dir / "__init__.py",
                                                  submodule_search_locations=[str(pkg_dir)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        for n in [n for n in sys.modules if n == name or n.startswith(name + ".")]:
            del sys.modules[n]
        raise BaselineUnavailable(f"importing latticeflow at {sha[:12]} failed: {type(e).__name__}: {e}") from e
    mod.__baseline_commit__ = sha
    importlib.import_module(f"{name}.build")  # build_flow's module (also re-exported by the package)
    return mod


def _keys_build_reads() -> set[str]:
    """Config keys the current ``build_flow`` / ``build_potential`` read (``cfg["key"]``)."""
    from latticeflow import build

    src = inspect.getsource(build.build_flow) + inspect.getsource(build.build_potential)
    return set(re.findall(r"cfg\[\"(\w+)\"\]", src))


def config_for_baseline(config: dict[str, Any], base: types.ModuleType) -> tuple[dict[str, Any] | None, str]:
    """``config`` as the baseline's ``build_flow`` can take it, and a note.

    Keys the baseline's IsingConfig does not know are dropped when the current ``build_flow``
    does not read them either (training options such as ``gradient_estimator``: the flow is
    the same); if it reads one, the flows would differ, and None is returned with the reason.
    """
    known = set(base.config.ISING_DEFAULT.to_dict())
    unknown = sorted(set(config) - known)
    if not unknown:
        return config, ""
    architectural = [k for k in unknown if k in _keys_build_reads()]
    if architectural:
        return None, f"key(s) {', '.join(architectural)} unknown to the baseline shape the flow"
    return ({k: v for k, v in config.items() if k not in unknown},
            f"dropped key(s) unknown to the baseline that build_flow does not read: {', '.join(unknown)}")


def baseline_configs(L: int = PAPER_L, hidden: int = PAPER_HIDDEN, n_steps: int = PAPER_STEPS,
                     batch: int = PAPER_BATCH) -> list[tuple[str, dict[str, Any], int]]:
    """(label, config, batch): the paper configuration and the driver's default at the same L."""
    from latticeflow.config import IsingConfig

    default = IsingConfig.from_dict({"L": L}).to_dict()  # ISING_DEFAULT at this L (its kernel size resolved for L)
    return [("paper configuration", paper_config(hidden, n_steps), batch),
            (f"driver's default (ISING_DEFAULT: {default['potential']}, hidden {default['hidden']}, "
             f"T={default['n_steps'] * default['step_size']:g}, batch {default['batch']})", default, default["batch"])]


def driver_config(flags: str) -> tuple[dict[str, Any], int]:
    """The flow configuration (a dict) and L that ``models/ising.py FLAGS`` would train."""
    import shlex

    from models import ising as driver

    cfg = driver.config_from_args(driver.parse_args(shlex.split(flags)))
    return cfg.to_dict(), int(cfg.L)


def compare_baseline(base: types.ModuleType, configs: list[tuple[str, dict[str, Any], int]], L: int = PAPER_L,
                     rounds: int = 7, iters: int = 2, precision: str = "float32") -> dict[str, float | None]:
    """Print the baseline's and the current tree's s/iteration for each config, side by side (both with
    ``precision`` products); return {label: ratio of medians baseline / current, or None if skipped}."""
    sha = getattr(base, "__baseline_commit__", "?")
    print(f"side by side with latticeflow at {sha[:12]} (imported as {base.__name__}), same process, "
          f"{torch.get_num_threads()} thread(s), {rounds} interleaved rounds × {iters} iterations, L={L}:")
    out: dict[str, float | None] = {}
    for label, config, batch in configs:
        cfg, note = config_for_baseline(config, base)
        if cfg is None:
            print(f"  {label}: skipped: {note}")
            out[label] = None
            continue
        try:
            steps = {"baseline": make_step(cfg, L, batch, base, precision)}
        except Exception as e:
            print(f"  {label}: skipped: the baseline's build_flow rejects it: {type(e).__name__}: {e}")
            out[label] = None
            continue
        steps["current"] = make_step(config, L, batch, precision=precision)
        t = time_interleaved(steps, rounds, iters)
        out[label] = r = ratio_of_medians(t, "baseline", "current")
        print(f"  {label}:" + (f" ({note})" if note else ""))
        print(f"    baseline {_summary(t['baseline'])}")
        print(f"    current  {_summary(t['current'])}")
        print(f"    ratio of medians baseline / current: {r:.2f}x")
    return out


def gemm_variants(bfloat16: bool) -> list[tuple[str, str]]:
    """(precision, gemm) for every gemm available here: float32's, the one taken first; with ``bfloat16``
    also bfloat16's (latticeflow.native.step.gemm_choices)."""
    out = [("float32", w) for w in native_step.gemm_choices("float32")]
    if bfloat16:
        out += [("bfloat16", w) for w in native_step.gemm_choices("bfloat16")]
    return out


def compare_gemms(config: dict, batch: int, gflop: float, mm: float, rounds: int = 7, iters: int = 2,
                  bfloat16: bool = False, L: int = PAPER_L) -> dict[tuple[str, str], float]:
    """Time ``config``'s training iteration with each gemm available (:func:`gemm_variants`), interleaved in
    this process, and print each median, its ratio to the roofline (``gflop`` per iteration at the matmul
    speed ``mm`` GFLOP/s) and its speed relative to float32 with the gemm taken here. Returns the medians."""
    variants = gemm_variants(bfloat16)
    if bfloat16 and not any(p == "bfloat16" for p, _ in variants):
        print("  with bfloat16 products: unavailable (no bfloat16 gemm here)")
    if not variants:
        return {}
    steps = {}
    for precision, which in variants:
        inner = make_step(config, L, batch, precision=precision)

        def step(inner: Callable[[], None] = inner, precision: str = precision, which: str = which) -> None:
            with native_step.gemm_as(precision, which):
                inner()

        steps[f"{precision}/{which}"] = step
    t = time_interleaved(steps, rounds, iters)
    med = {v: statistics.median(t[f"{v[0]}/{v[1]}"]) for v in variants}
    base = med[variants[0]]
    print(f"  each gemm, same process, {rounds} interleaved rounds × {iters} iterations (median s/iteration; "
          f"ratio to the roofline; float32 with {GEMM_NAMES['float32'][variants[0][1]]} ÷ this):")
    for precision, which in variants:
        taken = which == native_step.gemm_choice(precision)
        flag = {"float32": "", "bfloat16": " (--train-precision bfloat16)"}[precision]
        print(f"    {precision}{flag}, {GEMM_NAMES[precision][which]}{' (taken here)' if taken else ''}: "
              f"{med[(precision, which)]:.3f}; {gflop / med[(precision, which)] / mm:.2f}; "
              f"{base / med[(precision, which)]:.2f}")
    return med


def default_size_row(L: int, iters: int) -> dict[str, Any]:
    """Seconds per training iteration and peak memory of the driver's default flow at L, in this process.

    The fastest of ``iters`` iterations after one warm-up (the least disturbed on a shared
    machine), the mean, and ``ru_maxrss`` before the first iteration and at the end (kB).
    """
    import resource

    from latticeflow.config import IsingConfig

    cfg = IsingConfig(L=L)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = make_step(cfg.to_dict(), L, cfg.batch_size)
    step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"L": L, "N": L * L, "batch": cfg.batch_size, "hidden": cfg.hidden, "threads": torch.get_num_threads(),
            "s_per_iter": min(times), "mean_s_per_iter": sum(times) / len(times),
            "rss_before_kb": rss0, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def default_table(sizes: list[int], iters: int, threads: int | None) -> list[dict[str, Any]]:
    """:func:`default_size_row` for each L, each in a fresh Python process; prints the table and returns the rows."""
    import json

    rows = []
    print("the driver's default flow (python -m models.ising --L L: quadratic + conv + MLP, T=1, batch from L), "
          f"each L in its own process, fastest of {iters} iterations:")
    print("   L      N  batch   s/iter  mean s/iter  ratio to first L  peak RSS  RSS before")
    for L in sizes:
        argv = [sys.executable, str(Path(__file__).resolve()), "--child-default", str(L), "--iters", str(iters)]
        if threads:
            argv += ["--threads", str(threads)]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"L={L} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"  {L:2d} {r['N']:6d} {r['batch']:6d} {r['s_per_iter']:8.3f} {r['mean_s_per_iter']:12.3f} "
              f"{r['s_per_iter'] / rows[0]['s_per_iter']:17.2f} {r['peak_kb'] / 2**20:7.2f}GiB "
              f"{r['rss_before_kb'] / 2**20:8.2f}GiB")
    return rows


def matmul_gflops(B: int, N: int, h: int, dtype: torch.dtype, reps: int = 50) -> float:
    a, w = torch.randn(B, N, dtype=dtype), torch.randn(h, N, dtype=dtype)
    for _ in range(5):
        a @ w.T
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ w.T
    return 2.0 * B * N * h * reps / (time.perf_counter() - t0) / 1e9


def stage_gemm_shapes(B: int, N: int, h: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The (m×k)@(k×n) operand shapes of the matmuls in one fused MLP stage, forward and backward.

    For B ≤ N (the paper configuration; ``_MLPDrift`` in latticeflow/potentials/mlp.py):
    forward h = xWᵀ and ∇φ = (a'⊙w)W; backward ĜWᵀ, (a'⊙w)ᵀĜ, (∂/∂h)W and (∂/∂h)ᵀx. Their
    FLOPs are the 12·B·N·h of :func:`mlp_flops` × 3 without its elementwise term.
    """
    return [((B, N), (N, h)), ((B, h), (h, N)),
            ((B, N), (N, h)), ((h, B), (B, N)), ((B, h), (h, N)), ((h, B), (B, N))]


def stage_gemm_seconds(B: int, N: int, h: int, dtype: torch.dtype = torch.float32, reps: int = 50,
                       rounds: int = 5) -> float:
    """Seconds of the stage's matmuls (:func:`stage_gemm_shapes`) run back to back, median of ``rounds``.

    What an iteration would cost if everything but its matmuls were free: the ceiling of the
    roofline ratio is the model FLOPs over (this time × stages × the matmul speed).
    """
    ops = [(torch.randn(a, dtype=dtype), torch.randn(b, dtype=dtype)) for a, b in stage_gemm_shapes(B, N, h)]

    def stage() -> None:
        for a, b in ops:
            torch.mm(a, b)

    for _ in range(5):
        stage()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            stage()
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


UNAVAILABLE = (f"ratio against the original: unavailable (no --original given; git clone {ORIGINAL_URL} "
               "and pass --original PATH to time it side by side in this process)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--sizes", type=int, nargs="*", default=[8, 16, 32, 64])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators")
    p.add_argument("--parts", action="store_true",
                   help="also time the driver's default flow (quadratic + conv + MLP, T=1, batch 256) at L=8 and 16, "
                        "part by part")
    p.add_argument("--original", metavar="PATH", default=None,
                   help=f"a checkout of {ORIGINAL_URL}: time its paper-configuration training iteration against "
                        "ours, side by side in this process, and print the ratio")
    p.add_argument("--baseline-commit", metavar="REV", default=None,
                   help="time this tree's latticeflow against latticeflow at git commit REV (exported and imported "
                        "under another name), side by side in this process, and print the ratios")
    p.add_argument("--baseline-flags", action="append", default=[], metavar="FLAGS",
                   help="with --baseline-commit: also compare the flow that these models/ising.py flags build "
                        "(e.g. '--L 4 --hidden 128 --potential quadratic+mlp'), at its own L and batch; repeatable")
    p.add_argument("--bfloat16", action="store_true",
                   help="also time our paper-configuration iteration with bfloat16 products (--train-precision "
                        "bfloat16) with each bfloat16 gemm available, with --original its ratio to the original's, "
                        "and with --baseline-commit its ratio to the baseline's bfloat16 iteration")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the side-by-side comparisons")
    p.add_argument("--round-iters", type=int, default=2, help="iterations of each side per round")
    p.add_argument("--default-table", type=int, nargs="+", metavar="L", default=None,
                   help="only: time and peak memory per iteration of the driver's default flow at each L, "
                        "each L in its own process")
    p.add_argument("--child-default", type=int, metavar="L", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_default is not None:
        import json

        print(json.dumps(default_size_row(args.child_default, args.iters)))
        return
    if args.default_table:
        default_table(args.default_table, args.iters, args.threads)
        return
    # fail on a bad --original path or --baseline-commit before any timing
    loaded, why = open_original(args.original)
    orig: types.SimpleNamespace | str | None = why if why is not None else loaded
    base = None
    if args.baseline_flags and args.baseline_commit is None:
        raise SystemExit("--baseline-flags needs --baseline-commit")
    extra = [driver_config(flags) for flags in args.baseline_flags]  # bad flags fail before any timing
    if args.baseline_commit is not None:
        try:
            base = load_baseline(args.baseline_commit)
        except BaselineUnavailable as e:
            raise SystemExit(f"--baseline-commit: {e}") from None
    B, h, steps = PAPER_BATCH, PAPER_HIDDEN, PAPER_STEPS
    paper = paper_config(h, steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    s = time_iteration(paper, 16, B, args.iters)
    N = 256
    # forward: 4 RK stages per step; backward of the pathwise gradient costs about 2x forward
    flops = 3 * 4 * steps * mlp_flops(B, N, h)
    mm = matmul_gflops(B, N, h, torch.float32)
    print(f"paper configuration (L=16, h={h}, {steps} RK4 steps, batch {B}, random space-group×Z2 symmetrisation):")
    print(f"  {s:.3f} s/iteration = {1 / s:.2f} it/s")
    print(f"  achieved {flops / s / 1e9:.1f} GFLOP/s (model FLOPs {flops / 1e9:.2f} GFLOP/iter); "
          f"matmul ({B}x{N})@({N}x{h}) in this run: {mm:.1f} GFLOP/s; ratio {flops / s / 1e9 / mm:.2f}")
    gemm = 4 * steps * stage_gemm_seconds(B, N, h)
    gemm_flops = 4 * steps * sum(2.0 * a[0] * a[1] * b[1] for a, b in stage_gemm_shapes(B, N, h))
    rest = (f"everything else {s - gemm:.3f} s ({(s - gemm) / s:.0%} of the iteration)" if s >= gemm else
            "everything else: not measurable (the iteration takes less than torch's matmuls of its shapes)")
    print(f"  its matmuls alone, back to back (the shapes of one fused MLP stage × {4 * steps} stages): "
          f"{gemm:.3f} s/iteration at {gemm_flops / gemm / 1e9:.1f} GFLOP/s; {rest}; "
          f"the ratio with everything else free: {flops / gemm / 1e9 / mm:.2f}")
    compare_gemms(paper, B, flops / 1e9, mm, rounds=args.rounds, iters=args.round_iters, bfloat16=args.bfloat16)
    if orig is None:
        print(f"  {UNAVAILABLE}")
    elif isinstance(orig, str):
        print(f"  {orig}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        target = lf.ising(16, lf.critical)
        flow = build_flow(paper, target.lattice)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            x, logp = flow.sample(B)
            (logp + target.energy(x)).mean().backward()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if isinstance(orig, types.SimpleNamespace):
        compare_original(orig, rounds=args.rounds, iters=args.round_iters, bfloat16=args.bfloat16)
    if base is not None:
        compare_baseline(base, baseline_configs(), rounds=args.rounds, iters=args.round_iters)
        if args.bfloat16:
            compare_baseline(base, [("paper configuration, bfloat16 products", paper, B)], rounds=args.rounds,
                             iters=args.round_iters, precision="bfloat16")
        for flags, (config, L) in zip(args.baseline_flags, extra, strict=True):
            compare_baseline(base, [(f"models/ising.py {flags}", config, config["batch"])], L=L, rounds=args.rounds,
                             iters=args.round_iters)
    if args.sizes:
        print("scaling with L (same configuration, hidden 512):")
        print("  L      N   s/iter   ratio to L=16")
        for L in args.sizes:
            t = time_iteration(paper, L, B, max(2, args.iters // 2), warmup=1)
            print(f"  {L:3d} {L * L:6d} {t:8.3f}   {t / s:6.2f}")
    if args.parts:
        time_parts(args.iters)


def time_parts(iters: int) -> None:
    """s/iteration of the driver's default flow and of its parts alone (what each part costs)."""
    from latticeflow.config import ISING_DEFAULT

    DEFAULT = ISING_DEFAULT.to_dict()

    print("the driver's default flow (T=1: 10 RK4 steps, batch 256, random space-group×Z2), s/iteration:")
    print("  L   quadratic  quadratic+mlp  quadratic+conv  quadratic+conv+mlp")
    for L, h in ((8, 256), (16, 512)):
        row = [time_iteration({**DEFAULT, "L": L, "kernel_size": None, "hidden": h, "potential": pot}, L, DEFAULT["batch"], max(2, iters // 2), warmup=1)
               for pot in ("quadratic", "quadratic+mlp", "quadratic+conv", "quadratic+conv+mlp")]
        print(f"  {L:2d}  " + "  ".join(f"{t:12.3f}" for t in row))


if __name__ == "__main__":
    main()

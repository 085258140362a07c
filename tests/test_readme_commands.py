"""Every command the README documents parses: its module exists and argparse accepts its flags.

A documented flag must work. This test collects each ``python -m MODULE …`` and
``python benchmarks/SCRIPT.py …`` command from the README (inline code, which may wrap over
lines, and code blocks), fills its placeholders (RUN, CKPT, PATH, S, L …) with stand-ins
(paths: a folder holding an empty ``checkpoint.pt``, since checkpoint arguments are checked
for existence while parsing; the README's example run folders ``runs/…`` map onto it too),
and calls the entry point's ``main(argv)`` with ``ArgumentParser.parse_args`` stopped right
after a successful parse, so nothing is trained or timed. A misspelt or removed flag makes
argparse exit with status 2, and the test names the command.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest
from conftest import benchmark_module

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")

#: placeholders the README writes in commands, and what stands in for them
PLACEHOLDERS = {"S": "0", "T": "1", "N": "1", "H": "64", "B": "64", "L": "8", "M2": "-1.0"}
PATH_PLACEHOLDERS = {"RUN", "CKPT", "PATH", "DIR", "SWEEP_FOLDER"}
#: module commands: what ``python -m NAME`` runs
MODULES = {"models.ising": "models.ising", "models.mnist": "models.mnist", "models.phi4": "models.phi4",
           "analysis": "analysis.__main__", "latticeflow.mnist": "latticeflow.mnist.__main__"}


def readme_commands(text: str = README) -> list[str]:
    """The README's python commands, whitespace (and line wraps) collapsed, in order, without repeats."""
    found = []
    for m in re.finditer(r"`(python (?:-m [A-Za-z_.0-9]+|benchmarks/[a-z_0-9]+\.py)[^`]*)`", text):
        found.append(m.group(1))
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("python "):
                found.append(line)
    out = []
    for cmd in found:
        cmd = " ".join(cmd.split())
        if cmd not in out:
            out.append(cmd)
    return out


def concrete(cmd: str, path: Path) -> list[str] | None:
    """argv of ``cmd`` with optional parts ``[...]`` taken, first alternatives of ``a|b`` and
    placeholders filled; None for an elided command (``…``)."""
    if "…" in cmd or "..." in cmd.replace("CKPT...", "CKPT"):
        return None
    cmd = cmd.replace("CKPT...", "CKPT").replace("[", " ").replace("]", " ")
    argv = []
    for tok in shlex.split(cmd):
        if "|" in tok and not tok.startswith("-"):
            tok = tok.split("|")[0]
        if tok in PLACEHOLDERS:
            tok = PLACEHOLDERS[tok]
        elif tok in PATH_PLACEHOLDERS:
            tok = str(path)
        elif re.match(r"(runs|benchmarks/results)/", tok):  # an example run folder or its checkpoint
            tok = str(path / "checkpoint.pt") if tok.endswith("checkpoint.pt") else str(path)
        argv.append(tok)
    return argv


class _Parsed(Exception):
    pass


@pytest.fixture
def run_folder(tmp_path):
    """What stands in for a run folder: a folder with an (empty) checkpoint.pt."""
    (tmp_path / "checkpoint.pt").touch()
    return tmp_path


@pytest.fixture
def parse_only(monkeypatch):
    """ArgumentParser.parse_args parses, then stops the entry point (raises _Parsed)."""
    real = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        ns = real(self, args, namespace)
        raise _Parsed(ns)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)


def entry_point(argv: list[str]):
    """The ``main`` that ``python ARGV…`` runs, and the arguments it gets."""
    assert argv[0] == "python"
    if argv[1] == "-m":
        return importlib.import_module(MODULES[argv[2]]).main, argv[3:]
    script = Path(argv[1])
    assert script.parent.name == "benchmarks" and (REPO / script).is_file(), f"no such script: {script}"
    name = f"readme_{script.stem}"
    mod = sys.modules.get(name) or next(benchmark_module(script.name, name))
    return mod.main, argv[2:]


COMMANDS = readme_commands()

#: benchmark flags that carry driver flags on to a driver: (attribute, the driver's module)
NESTED = {"ising_speed.py": ("baseline_flags", "models.ising"), "ising_sweep.py": ("flags", "models.ising"),
          "phi4.py": ("extra", "models.phi4")}


def nested_driver_flags(argv: list[str], ns: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(driver module, its argv) for each set of driver flags a benchmark command passes on."""
    attr, module = NESTED.get(Path(argv[1]).name, (None, None))
    value = getattr(ns, attr, None) if attr else None
    if not value:
        return []
    if attr == "baseline_flags":  # repeatable, each one string of flags
        return [(module, shlex.split(flags)) for flags in value]
    return [(module, value[1:] if value[:1] == ["--"] else list(value))]


def test_the_readme_documents_commands_of_every_kind():
    kinds = {c.split()[1] if c.split()[1] != "-m" else c.split()[2] for c in COMMANDS}
    assert {"models.ising", "models.mnist", "models.phi4", "analysis", "benchmarks/ising_speed.py"} <= kinds
    assert len(COMMANDS) > 60


def test_concrete_fills_placeholders_and_options(tmp_path):
    assert concrete("python -m models.ising --L 8 --seed S --quadratic-init zero|gaussian [--batch B]",
                    tmp_path) == ["python", "-m", "models.ising", "--L", "8", "--seed", "0", "--quadratic-init",
                                  "zero", "--batch", "64"]
    assert concrete("python -m analysis RUN --threads T", tmp_path)[3:] == [str(tmp_path), "--threads", "1"]
    assert concrete("python -m analysis runs/l4/checkpoint.pt --out runs/x", tmp_path)[3:] == [
        str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path)]
    assert concrete("python benchmarks/phi4.py ...", tmp_path) is None


def test_a_misspelt_flag_is_caught(parse_only, tmp_path):
    main, args = entry_point(concrete("python -m models.ising --L 8 --no-such-flag", tmp_path))
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2


def test_driver_flags_a_benchmark_passes_on_are_found(parse_only, tmp_path):
    for cmd, expected in [
        ('python benchmarks/ising_speed.py --baseline-commit HEAD --baseline-flags "--L 4 --hidden 8" --sizes',
         [("models.ising", ["--L", "4", "--hidden", "8"])]),
        ("python benchmarks/ising_sweep.py --out DIR -- --L 4 --epochs 3", [("models.ising", ["--L", "4", "--epochs", "3"])]),
        ("python benchmarks/phi4.py --runs l6 -- --lr 1e-2", [("models.phi4", ["--lr", "1e-2"])]),
        ("python benchmarks/phi4.py --runs l6", []),
    ]:
        argv = concrete(cmd, tmp_path)
        main, args = entry_point(argv)
        with pytest.raises(_Parsed) as e:
            main(args)
        assert nested_driver_flags(argv, e.value.args[0]) == expected


@pytest.mark.parametrize("cmd", COMMANDS)
def test_readme_command_parses(cmd, parse_only, run_folder, capsys):
    argv = concrete(cmd, run_folder)
    if argv is None:
        pytest.skip("an elided command (…)")
    main, args = entry_point(argv)
    try:
        main(args)
    except _Parsed as parsed:
        for module, flags in nested_driver_flags(argv, parsed.args[0]):
            with pytest.raises((_Parsed, SystemExit)) as e:
                importlib.import_module(module).build_parser().parse_args(flags)
            assert e.type is _Parsed, f"{cmd!r}: the flags it passes to {module} do not parse: {flags}"
        return
    except SystemExit as e:  # --help prints and exits 0; a bad flag exits 2
        err = capsys.readouterr().err
        if len(argv) == 3 and argv[1] == "-m" and "arguments are required" in err:
            return  # the bare module name, as prose names it ("`python -m analysis`, below")
        assert e.code in (0, None), f"{cmd!r} does not parse: {err.strip()}"
        return
    pytest.fail(f"{cmd!r}: the entry point returned without parsing its arguments with argparse")

"""Console entry points: an installed user runs the drivers from anywhere."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_entry_point_is_a_driver_cli(name):
    module, func = SCRIPTS[name].split(":")
    assert callable(getattr(importlib.import_module(module), func))


def test_entry_points_name_the_drivers():
    assert set(SCRIPTS) == {"latticeflow-ising", "latticeflow-mnist", "latticeflow-report", "latticeflow-phi4"}


def test_an_entry_point_runs_outside_the_repository(tmp_path):
    # the same function the console script calls, from another folder: a bad flag is one line, status 2
    code = "import sys; from models.ising import cli; sys.exit(cli(['--L', '0']))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "argument --L: expected an integer >= 2, got 0" in proc.stderr

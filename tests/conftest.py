import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    np.random.seed(1234)
    yield


@pytest.fixture(autouse=True)
def _restore_threads():
    # a driver's main() sets torch's thread count for its process (latticeflow.distributed.setup_run);
    # in the test process that must not leak into the next test's floating-point results
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """One intra-op thread for a test (tiny tensors: a second thread only adds synchronisation, 10× slower on a
    busy machine); ``_restore_threads`` puts the count back. Use ``pytest.mark.usefixtures("one_thread")``."""
    torch.set_num_threads(1)
    yield


@pytest.fixture
def float64():
    """Run a test in float64 (use a module's ``pytestmark = pytest.mark.usefixtures("float64")``)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(2024)


def pytest_configure(config):
    warnings.filterwarnings("ignore", message="on the periodic L=2 lattice")


def benchmark_module(script: str, name: str) -> Iterator[object]:
    """Import ``benchmarks/<script>`` as module ``name`` for a module-scoped fixture (removed after)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(name, None)

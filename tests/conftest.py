import warnings

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    np.random.seed(1234)
    yield


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(2024)


def pytest_configure(config):
    warnings.filterwarnings("ignore", message="on the periodic L=2 lattice")

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # parallel workers share the cores: one thread each,
    torch.set_num_threads(1)  # or their thread pools oversubscribe the machine (10x slower)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

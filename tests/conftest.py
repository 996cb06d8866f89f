import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # parallel workers share the cores: one thread each,
    torch.set_num_threads(1)  # or their thread pools oversubscribe the machine (10x slower)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="run the device tests (tests/test_device.py) on this device against the CPU, e.g. cuda",
    )


@pytest.fixture
def device(request):
    """The device under test; the device tests skip on the CPU (they compare another device
    with it) and where the named device is absent."""
    name = request.config.getoption("--device")
    if name == "cpu":
        pytest.skip("device tests compare another device with the CPU: pytest --device cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"--device {name}: no CUDA device here")
    return torch.device(name)

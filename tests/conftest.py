import pytest
import torch

import kt_sft
from kt_sft import engine


@pytest.fixture(params=engine.available_kernel_paths())
def kernel_path(request):
    """Runs a test once per kernel path this CPU and build offer, then restores the default."""
    before = engine.kernel_path()
    engine.set_kernel_path(request.param)
    yield request.param
    engine.set_kernel_path(before)


@pytest.fixture
def seed():
    torch.manual_seed(1234)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


__all__ = ["kt_sft"]

import os

import pytest
import torch

import kt_sft
from kt_sft import engine


def _test_kernel_paths() -> list[str]:
    """Every path this CPU and build offer, or those named in KT_SFT_TEST_KERNEL_PATHS (space
    separated; scripts/sanitize.sh runs one path per process)."""
    paths = engine.available_kernel_paths()
    only = os.environ.get("KT_SFT_TEST_KERNEL_PATHS", "").split()
    return [p for p in paths if p in only] if only else paths


@pytest.fixture(params=_test_kernel_paths())
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

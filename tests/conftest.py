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
    """Runs a test once per kernel path this CPU and build offer, then restores the default. A path
    that failed its start-up self-check is swapped for the next one down at its first use, which would
    make the test silently run another path: the path must not be marked failed before the test, and
    must still be the selected one after it."""
    from kt_sft.engine.functional import SELF_CHECK_FAILURES

    assert request.param not in SELF_CHECK_FAILURES, (request.param, SELF_CHECK_FAILURES)
    before = engine.kernel_path()
    engine.set_kernel_path(request.param)
    yield request.param
    after = engine.kernel_path()
    engine.set_kernel_path(before)
    assert after == request.param, f"the test ran on {after}, not {request.param}: {SELF_CHECK_FAILURES}"


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

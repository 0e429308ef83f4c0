"""Shared test setup: point the CIFAR-10 loader at the shared copy when this machine has one."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from ghnq_deploy.export.tflite import triton_first

# triton imported after TensorFlow segfaults (docs/platform-notes "Segfault"); torch imports it lazily
# from torch.optim, so any test order that runs an export before a training test would crash
triton_first()

_SHARED_CIFAR10 = Path("/work/shared/data/cifar10")


@pytest.fixture(autouse=True, scope="session")
def _shared_cifar10():
    """Set GHNQ_CIFAR10 only where the shared data set exists (never downloads).

    Session scope, so module-scoped fixtures that load data see it too.
    """
    if not _SHARED_CIFAR10.is_dir():
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GHNQ_CIFAR10", str(_SHARED_CIFAR10))
        yield


@pytest.fixture
def torch_one_thread():
    """Opt-in (``pytestmark = pytest.mark.usefixtures("torch_one_thread")``): one intra-op thread.

    Tests run many tiny forward passes; on a busy 2-core machine a second torch thread only
    adds contention (measured: the sampler tests took 340 s with the default, 25 s with one).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """``GHNQ_TEST_SHUFFLE=<seed>``: run the collected tests in a seeded random order.

    The suite must not depend on its order (an earlier test importing something a later one
    needs by chance); this is how that is checked without pytest-randomly.
    """
    seed = os.environ.get("GHNQ_TEST_SHUFFLE")
    if seed:
        random.Random(int(seed)).shuffle(items)

"""The step prefetcher hands over exactly make(step), in order, and stops cleanly."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from ghnq_deploy.data import load_cifar10
from ghnq_deploy.ghn.prefetch import Prefetcher
from ghnq_deploy.ghn.train import MetaBatchSource, TrainConfig, prepare_step


def test_items_come_in_step_order_from_the_worker_thread():
    threads = set()

    def make(step: int) -> int:
        threads.add(threading.current_thread().name)
        return step * step

    with Prefetcher(make, 3, 9) as ahead:
        assert [ahead.get(s) for s in range(3, 9)] == [s * s for s in range(3, 9)]
    assert threads == {"ghnq-prefetch"}


def test_an_error_in_make_is_raised_by_the_get_of_its_step():
    def make(step: int) -> int:
        if step == 2:
            raise RuntimeError("bad step 2")
        return step

    with Prefetcher(make, 0, 5) as ahead:
        assert ahead.get(0) == 0 and ahead.get(1) == 1
        with pytest.raises(RuntimeError, match="bad step 2"):
            ahead.get(2)


def test_out_of_order_get_is_refused_and_close_stops_a_waiting_worker():
    ahead = Prefetcher(lambda s: s, 0, 1000, depth=1)
    with pytest.raises(ValueError, match="expected step 0"):
        ahead.get(1)
    ahead.close()  # the worker is blocked on a full queue: close still returns
    assert not ahead._thread.is_alive()


@pytest.mark.skipif(not any(p and os.path.isdir(p) for p in (os.environ.get("GHNQ_CIFAR10"),
                                                              "/work/shared/data/cifar10")),
                    reason="needs the CIFAR-10 copy")
def test_prefetched_steps_equal_steps_prepared_in_the_loop():
    """Nets, images, augmentation: a pure function of (seed, step), whichever thread computes them."""
    cfg = TrainConfig(batch_size=8, meta_batch=3, seed=7, space=1)
    source = MetaBatchSource(cfg, load_cifar10("train").subset(64))
    with Prefetcher(lambda s: prepare_step(source, s, 10), 5, 9) as ahead:
        fetched = [ahead.get(s) for s in range(5, 9)]
    for item in fetched:
        again = prepare_step(source, item.step, 10)
        assert item.specs == again.specs and item.bits == again.bits and item.mine == again.mine
        assert torch.equal(item.x, again.x) and torch.equal(item.y, again.y)
        assert item.x.is_contiguous(memory_format=torch.channels_last)
        assert [n.spec for n in item.nets] == item.specs and all(next(n.parameters()).is_meta for n in item.nets)
        for g, h in zip(item.graphs, again.graphs):
            assert all(np.array_equal(getattr(g, f), getattr(h, f)) for f in ("primitives", "shapes", "levels", "edges"))

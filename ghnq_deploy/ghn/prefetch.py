"""Prepare the next training steps' inputs in a background thread, off the critical path.

Each step's inputs are a pure function of the step number (see ``ghn/train.py``), so
computing them ahead in another thread changes nothing but when they are ready. torch
releases the GIL inside its kernels (and through the whole backward), which is when the
worker runs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
_POLL_S = 0.1


class Prefetcher(Generic[T]):
    """``make(step)`` for steps ``start, start + 1, ...`` (up to ``end``), ``depth`` ahead.

    ``get(step)`` must be called for consecutive steps from ``start``; an exception raised
    by ``make`` is raised again by the ``get`` of its step. Use it as a context manager so
    the worker stops with the loop.
    """

    def __init__(self, make: Callable[[int], T], start: int, end: int, depth: int = 2):
        self._make, self._next, self._end = make, start, end
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(start,), name="ghnq-prefetch", daemon=True)
        self._thread.start()

    def _work(self, step: int) -> None:
        while step < self._end and not self._stop.is_set():
            try:
                item = (step, self._make(step), None)
            except BaseException as exc:  # handed to the consumer, which raises it in its own thread
                item = (step, None, exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def get(self, step: int) -> T:
        if step != self._next or step >= self._end:
            raise ValueError(f"prefetcher expected step {self._next} (of steps up to {self._end}), got {step}")
        got, value, error = self._queue.get()
        if error is not None:
            self.close()
            raise error
        assert got == step
        self._next += 1
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

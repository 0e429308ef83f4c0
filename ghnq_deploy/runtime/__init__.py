"""Runners: the same images through torch, ONNX Runtime or LiteRT, giving float logits.

Every runner's ``run(model_file, images)`` takes raw uint8 NHWC pixels (validated, then
normalised once by :func:`ghnq_deploy.data.normalize`, the training preprocessing) and
``run_normalized`` takes already-normalised float NCHW arrays (parity tests, random inputs).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

import numpy as np


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Silence fds 1 and 2 (and Python warnings) for a block of native-library calls.

    TensorFlow's converter prints a SavedModel signature dump and C++ log lines, and LiteRT
    announces its XNNPACK delegate, straight to the file descriptors: library code must not
    print, so these calls run inside this block.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "wb") as sink, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def prepare(images: np.ndarray, image_shape: tuple[int, int, int] = (3, 32, 32)) -> np.ndarray:
    """uint8 NHWC pixels -> normalised float32 NCHW (refusing anything else with one line)."""
    from ghnq_deploy.calibration import validate_images
    from ghnq_deploy.data import normalize

    images = validate_images(images, what="images", image_shape=image_shape)
    return normalize(images).numpy()


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits`` (N, classes) against integer ``labels``."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if len(logits) != len(labels) or not len(labels):
        raise ValueError(f"{len(logits)} logit rows for {len(labels)} labels")
    return float((logits.argmax(axis=1) == labels).mean())


def batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))

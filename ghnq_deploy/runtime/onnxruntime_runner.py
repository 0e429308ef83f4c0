"""Run an exported .onnx file (float or int8 QDQ) with ONNX Runtime on the CPU."""

from __future__ import annotations

import os

import numpy as np

from ghnq_deploy.errors import UserError
from ghnq_deploy.runtime import batches, prepare, top1

PROVIDERS = ["CPUExecutionProvider"]


def session(model_file: str | os.PathLike, num_threads: int | None = None):
    """An InferenceSession on the CPU provider (the one every machine has)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    try:
        return ort.InferenceSession(str(model_file), sess_options=options, providers=PROVIDERS)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph types
        raise UserError(f"{model_file}: ONNX Runtime cannot load it ({str(exc).strip().splitlines()[0][:200]})") from None


def run_normalized(model_file, x: np.ndarray, batch_size: int = 256, num_threads: int | None = None) -> np.ndarray:
    """Logits for normalised float NCHW inputs."""
    sess = session(model_file, num_threads)
    name = sess.get_inputs()[0].name
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.concatenate([sess.run(None, {name: x[s]})[0] for s in batches(len(x), batch_size)]).astype(np.float32)


def run(model_file, images: np.ndarray, **kw) -> np.ndarray:
    """Logits for raw uint8 NHWC images."""
    return run_normalized(model_file, prepare(images), **kw)


def accuracy(model_file, images: np.ndarray, labels: np.ndarray, **kw) -> float:
    return top1(run(model_file, images, **kw), labels)


def describe() -> str:
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__} ({', '.join(PROVIDERS)})"

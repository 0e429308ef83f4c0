"""The runtime registry: which interpreter runs a file, with which kernel sets, from which package.

``export`` uses a runtime in-process to check the file it wrote; ``verify`` names the same
runtime to the device runner (``--runtime``), which may run it on another machine. A target
file names a registered runtime; nothing else tests runtime names as strings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ghnq_deploy.errors import UserError


@dataclass(frozen=True)
class Runtime:
    """One inference runtime."""

    name: str
    family: str  # file family it loads ("tflite" | "onnx")
    packages: tuple[str, ...]  # pip packages that provide it (what a device must install), in preference order
    kernels: tuple[str, ...]  # kernel sets it can be asked for; the first is its default
    description: str
    runner_arg: str  # the device runner's --runtime value
    # in-process run on this host (export's check), or None where this host's package is not that runtime
    run_in_process: Callable[[Path, np.ndarray, str, int | None], np.ndarray] | None = None
    # whose integer rules the bit-exact simulator follows for this runtime's files (tflite_sim.KERNEL_SETS)
    integer_kernels: str = "litert-ref"

    def check_kernels(self, kernels: str) -> str:
        if kernels not in self.kernels:
            raise UserError(f"runtime {self.name} has no {kernels!r} kernels; choose from {', '.join(self.kernels)}")
        return kernels


RUNTIMES: dict[str, Runtime] = {}


def register(runtime: Runtime) -> Runtime:
    if runtime.name in RUNTIMES:
        raise ValueError(f"runtime {runtime.name!r} registered twice")
    RUNTIMES[runtime.name] = runtime
    return runtime


def get_runtime(name: str) -> Runtime:
    try:
        return RUNTIMES[name]
    except KeyError:
        raise UserError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}") from None


def _litert_run(path: Path, x: np.ndarray, kernels: str, threads: int | None) -> np.ndarray:
    from ghnq_deploy.runtime import litert_runner

    return litert_runner.run_normalized(path, x, resolver=kernels, num_threads=threads)


def _ort_run(path: Path, x: np.ndarray, kernels: str, threads: int | None) -> np.ndarray:
    from ghnq_deploy.runtime import onnxruntime_runner

    return onnxruntime_runner.run_normalized(path, x, num_threads=threads)


_TFLITE_KERNELS = ("xnnpack", "builtin", "reference")

register(Runtime("litert", "tflite", ("ai-edge-litert",), _TFLITE_KERNELS,
                 "LiteRT (ai-edge-litert) Interpreter", "litert", _litert_run))
register(Runtime("tflite-runtime", "tflite", ("tflite-runtime",), _TFLITE_KERNELS,
                 "tflite-runtime Interpreter (the pre-LiteRT package, for devices with numpy < 2)", "tflite-runtime"))
register(Runtime("tflite-auto", "tflite", ("ai-edge-litert", "tflite-runtime"), _TFLITE_KERNELS,
                 "whichever TFLite interpreter the device has (ai-edge-litert first, then tflite-runtime)", "auto"))
register(Runtime("tflite-micro", "tflite", ("tflite-micro",), ("reference",),
                 "TensorFlow Lite Micro interpreter (tflite-micro wheel): the microcontroller reference kernels, "
                 "batch 1", "tflite-micro", integer_kernels="tflm"))
register(Runtime("onnxruntime", "onnx", ("onnxruntime",), ("builtin", "reference"),
                 "ONNX Runtime, CPU execution provider (QDQ graphs run as fused integer kernels)", "onnxruntime",
                 _ort_run))

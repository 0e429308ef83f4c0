"""Run one exported model on the machine this script is on and write its raw outputs and timings.

This file is copied, alone, to the device (a Raspberry Pi over SSH, an emulated aarch64 root
filesystem, or a temp folder on this host) and run with the device's own Python. It therefore
imports nothing from ghnq_deploy: only the standard library, numpy and the device's interpreter
(ai-edge-litert, tflite-runtime, tflite-micro or onnxruntime). It must keep working with Python >= 3.9 and
numpy 1 or 2, since a device's system Python is usually older than ours.

    python3 device_runner.py --model m.tflite --inputs in.npy --output out.npz \
        --runtime auto --kernels xnnpack --threads 4 --timing-runs 50 --warmup 5 [--batch 256]

The host has already quantized the inputs (int8 NHWC for a full-integer .tflite, float32 NHWC
for a float .tflite, float32 NCHW for .onnx): the runner only checks dtype and shape, so the
bytes the device computes on are exactly the bytes the host simulated.

Exit codes: 0 done; 2 bad input (one ``device_runner: error:`` line on stderr); 3 no usable
interpreter on the device (the line names the package to install there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import threading
import time

EXIT_BAD_INPUT = 2
EXIT_NO_RUNTIME = 3
ERROR_PREFIX = "device_runner: error: "

TFLITE_RUNTIMES = ("litert", "tflite-runtime")
RUNTIMES = ("auto",) + TFLITE_RUNTIMES + ("tflite-micro", "onnxruntime")
# kernel set -> OpResolverType member name (ai-edge-litert and tflite-runtime share them):
# XNNPACK delegate (the default path), the optimised builtin kernels without delegates, and
# the reference kernels (the exactness yardstick)
TFLITE_RESOLVERS = {"xnnpack": "AUTO", "builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES", "reference": "BUILTIN_REF"}
KERNELS = tuple(TFLITE_RESOLVERS)

# ARM "CPU implementer" / "CPU part" codes from /proc/cpuinfo (ARM's and a few others' manuals):
# an aarch64 kernel reports no model name, only these numbers
ARM_PARTS = {
    (0x41, 0xD03): "ARM Cortex-A53", (0x41, 0xD04): "ARM Cortex-A35", (0x41, 0xD05): "ARM Cortex-A55",
    (0x41, 0xD07): "ARM Cortex-A57", (0x41, 0xD08): "ARM Cortex-A72", (0x41, 0xD09): "ARM Cortex-A73",
    (0x41, 0xD0A): "ARM Cortex-A75", (0x41, 0xD0B): "ARM Cortex-A76", (0x41, 0xD0C): "ARM Neoverse-N1",
    (0x41, 0xD0D): "ARM Cortex-A77", (0x41, 0xD40): "ARM Neoverse-V1", (0x41, 0xD41): "ARM Cortex-A78",
    (0x41, 0xD44): "ARM Cortex-X1", (0x41, 0xD46): "ARM Cortex-A510", (0x41, 0xD47): "ARM Cortex-A710",
    (0x41, 0xD48): "ARM Cortex-X2", (0x41, 0xD49): "ARM Neoverse-N2", (0x41, 0xD4B): "ARM Cortex-A78C",
    (0x41, 0xD4F): "ARM Neoverse-V2", (0x41, 0xD80): "ARM Cortex-A520", (0x41, 0xD81): "ARM Cortex-A720",
    (0x41, 0xD0E): "ARM Cortex-A76AE", (0x41, 0xD4A): "ARM Neoverse-E1",
    (0x61, 0x022): "Apple M1 Icestorm", (0x61, 0x023): "Apple M1 Firestorm",
    (0x51, 0x805): "Qualcomm Kryo 4xx Silver", (0x51, 0x804): "Qualcomm Kryo 4xx Gold",
}


class RunnerError(Exception):
    """A failure reported as one stderr line with an exit code."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- device description


def cpu_model(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The CPU as the device reports it: x86 'model name', or ARM implementer/part mapped to a core
    name, plus the board's 'Hardware' / 'Model' lines (a Pi reports 'Raspberry Pi 4 Model B')."""
    fields = {}
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if ":" in line:
                    key, _, value = line.partition(":")
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    parts = []
    if fields.get("model name"):
        parts.append(fields["model name"])
    elif "CPU implementer" in fields and "CPU part" in fields:
        try:
            code = (int(fields["CPU implementer"], 0), int(fields["CPU part"], 0))
            parts.append(ARM_PARTS.get(code, f"ARM implementer {code[0]:#x} part {code[1]:#x}"))
        except ValueError:
            parts.append(f"ARM implementer {fields['CPU implementer']} part {fields['CPU part']}")
    for key in ("Hardware", "Model"):
        if fields.get(key) and fields[key] not in parts:
            parts.append(fields[key])
    if not parts:
        parts.append(platform.processor() or platform.machine() or "unknown")
    return ", ".join(parts)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def _version(dist: str, module=None) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - unpacked wheels may lack metadata
        return str(getattr(module, "__version__", "unknown"))


# ---------------------------------------------------------------- runtimes


def _import_litert():
    try:
        from ai_edge_litert import interpreter as module
    except ImportError:
        return None
    return module


def _import_tflite_runtime():
    try:
        from tflite_runtime import interpreter as module
    except ImportError:
        return None
    return module


def _install_hint(model: str) -> RunnerError:
    if model.endswith(".onnx"):
        what, install = "onnxruntime", "`pip install onnxruntime`"
    else:
        what, install = "TFLite interpreter", "`pip install ai-edge-litert` or `pip install tflite-runtime`"
    return RunnerError(f"no {what} on this device ({platform.machine()}, Python {platform.python_version()}): "
                       f"{install} there", EXIT_NO_RUNTIME)


class TFLiteModel:
    """ai-edge-litert or tflite-runtime: the same Interpreter API, the same kernel sets."""

    def __init__(self, path: str, runtime: str, kernels: str, threads: int):
        module = None
        if runtime in ("auto", "litert"):
            module, self.package = _import_litert(), "ai-edge-litert"
        if module is None and runtime in ("auto", "tflite-runtime"):
            module, self.package = _import_tflite_runtime(), "tflite-runtime"
        if module is None:
            if runtime == "litert":
                raise RunnerError("ai-edge-litert is not installed on this device: "
                                  "`pip install ai-edge-litert` there", EXIT_NO_RUNTIME)
            if runtime == "tflite-runtime":
                raise RunnerError("tflite-runtime is not installed on this device: "
                                  "`pip install tflite-runtime` there", EXIT_NO_RUNTIME)
            raise _install_hint(path)
        self.version = _version(self.package, module)
        resolver_type = getattr(module, "OpResolverType", None)
        kwargs = {"model_path": path, "num_threads": threads}
        if resolver_type is not None:
            kwargs["experimental_op_resolver_type"] = getattr(resolver_type, TFLITE_RESOLVERS[kernels])
        elif kernels != "xnnpack":
            raise RunnerError(f"{self.package} {self.version} cannot select the {kernels} kernels "
                              "(no OpResolverType): upgrade it on the device")
        try:
            self.interpreter = module.Interpreter(**kwargs)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise RunnerError(f"{self.package} cannot load {os.path.basename(path)}: "
                              f"{_first_line(exc)}") from None
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = None

    def expects(self):
        import numpy as np

        return np.dtype(self.input["dtype"]), tuple(int(v) for v in self.input["shape"][1:]), "NHWC"

    def quantization(self) -> dict:
        def q(detail):
            scale, zero = detail["quantization"]
            return {"dtype": str(detail["dtype"].__name__), "scale": float(scale), "zero_point": int(zero)}

        return {"input": q(self.input), "output": q(self.output)}

    def __call__(self, x):
        if self.batch != len(x):
            self.interpreter.resize_tensor_input(self.input["index"], list(x.shape))
            self.interpreter.allocate_tensors()
            self.batch = len(x)
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"]).copy()


class TFLMModel:
    """TensorFlow Lite Micro's interpreter (the tflite-micro wheel): the microcontroller kernels,
    one image per invoke (its tensors have the file's fixed batch of 1)."""

    def __init__(self, path: str, kernels: str, threads: int):
        if kernels != "reference":
            raise RunnerError(f"tflite-micro has only its reference kernels, not {kernels}: use --kernels reference")
        try:
            from tflite_micro.python.tflite_micro import runtime as module
        except ImportError:
            raise RunnerError("tflite-micro is not installed on this device: `pip install tflite-micro` there",
                              EXIT_NO_RUNTIME) from None
        self.package, self.version = "tflite-micro", _version("tflite-micro", module)
        try:
            self.interpreter = module.Interpreter.from_file(path)
            self.input = self.interpreter.get_input_details(0)
            self.output = self.interpreter.get_output_details(0)
        except Exception as exc:  # noqa: BLE001 - TFLM raises bare RuntimeError / struct errors
            raise RunnerError(f"tflite-micro cannot load {os.path.basename(path)}: {_first_line(exc)}") from None
        if int(self.input["shape"][0]) != 1:
            raise RunnerError(f"tflite-micro runs batch-1 models; {os.path.basename(path)} has batch "
                              f"{int(self.input['shape'][0])}")

    def expects(self):
        import numpy as np

        return np.dtype(self.input["dtype"]), tuple(int(v) for v in self.input["shape"][1:]), "NHWC"

    def quantization(self) -> dict:
        def q(detail):
            params = detail.get("quantization_parameters") or {}
            scales, zeros = list(params.get("scales", [])), list(params.get("zero_points", []))
            return {"dtype": str(detail["dtype"].__name__), "scale": float(scales[0]) if scales else 0.0,
                    "zero_point": int(zeros[0]) if zeros else 0}

        return {"input": q(self.input), "output": q(self.output)}

    def __call__(self, x):
        import numpy as np

        outs = []
        for image in x:
            self.interpreter.set_input(image[None], 0)
            self.interpreter.invoke()
            outs.append(np.array(self.interpreter.get_output(0), copy=True))
        return np.concatenate(outs)


class ONNXModel:
    """ONNX Runtime, CPU provider; 'reference' switches graph optimisations (fusions) off."""

    ORT_TYPES = {"tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
                 "tensor(float16)": "float16"}

    def __init__(self, path: str, kernels: str, threads: int):
        try:
            import onnxruntime as ort
        except ImportError:
            raise _install_hint(path) from None
        self.package, self.version = "onnxruntime", _version("onnxruntime", ort)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if kernels == "reference":
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        elif kernels == "xnnpack":
            if "XnnpackExecutionProvider" not in ort.get_available_providers():
                raise RunnerError(f"onnxruntime {self.version} here has no XNNPACK execution provider: "
                                  "use --kernels builtin (the CPU provider)")
            providers = [("XnnpackExecutionProvider", {"intra_op_num_threads": threads}), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise RunnerError(f"onnxruntime cannot load {os.path.basename(path)}: {_first_line(exc)}") from None
        self.input = self.session.get_inputs()[0]
        self.output_name = self.session.get_outputs()[0].name

    def expects(self):
        import numpy as np

        dtype = self.ORT_TYPES.get(self.input.type)
        if dtype is None:
            raise RunnerError(f"model input type {self.input.type} is not supported")
        shape = tuple(int(v) if isinstance(v, int) else -1 for v in self.input.shape[1:])
        return np.dtype(dtype), shape, "NCHW"

    def quantization(self) -> dict:
        return {}

    def __call__(self, x):
        return self.session.run([self.output_name], {self.input.name: x})[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def load_model(path: str, runtime: str, kernels: str, threads: int):
    if path.endswith(".onnx"):
        if runtime not in ("auto", "onnxruntime"):
            raise RunnerError(f"{os.path.basename(path)} is an ONNX file: runtime {runtime} cannot run it")
        return ONNXModel(path, kernels, threads)
    if runtime == "onnxruntime":
        raise RunnerError(f"{os.path.basename(path)} is not an ONNX file: onnxruntime cannot run it")
    if runtime == "tflite-micro":
        return TFLMModel(path, kernels, threads)
    return TFLiteModel(path, runtime, kernels, threads)


# ---------------------------------------------------------------- the run


def check_inputs(model, inputs) -> None:
    dtype, shape, layout = model.expects()
    if inputs.ndim != len(shape) + 1 or len(inputs) == 0:
        raise RunnerError(f"inputs have shape {list(inputs.shape)}; the model takes a batch of {list(shape)} "
                          f"({layout})")
    if inputs.dtype != dtype:
        raise RunnerError(f"inputs are {inputs.dtype}; the model takes {dtype} ({layout}): "
                          "quantize them on the host first")
    if any(want not in (-1, got) for want, got in zip(shape, inputs.shape[1:])):
        raise RunnerError(f"inputs have shape {list(inputs.shape[1:])} per image; the model takes "
                          f"{list(shape)} ({layout})")


def run(args) -> dict:
    """Load, run every image batched, time batch-1 inference; returns the arrays and meta."""
    import numpy as np

    if not os.path.isfile(args.model):
        raise RunnerError(f"model file {args.model} not found")
    try:
        inputs = np.load(args.inputs, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RunnerError(f"cannot read inputs {args.inputs}: {_first_line(exc)}") from None
    model = load_model(args.model, args.runtime, args.kernels, args.threads)
    check_inputs(model, inputs)
    inputs = np.ascontiguousarray(inputs)

    try:
        start = time.perf_counter()
        raw = np.concatenate([model(inputs[i:i + args.batch]) for i in range(0, len(inputs), args.batch)])
        wall = time.perf_counter() - start

        latency = np.empty(args.timing_runs, dtype=np.float64)
        for i in range(args.warmup + args.timing_runs):
            one = inputs[i % len(inputs)][None]
            t0 = time.perf_counter()
            model(one)
            if i >= args.warmup:
                latency[i - args.warmup] = (time.perf_counter() - t0) * 1000.0
    except Exception as exc:  # noqa: BLE001 - interpreter errors (e.g. a fixed batch size) as one line
        raise RunnerError(f"{model.package} failed running {os.path.basename(args.model)}: {_first_line(exc)}") from None

    meta = {
        "runtime": model.package,
        "runtime_version": model.version,
        "kernels": args.kernels,
        "threads": args.threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "system": platform.system(),
        "peak_rss_mb": peak_rss_mb(),
        "images": int(len(inputs)),
        "batch": args.batch,
        "wall_s": round(wall, 6),
        "timing_runs": args.timing_runs,
        "warmup": args.warmup,
        "quantization": model.quantization(),
    }
    return {"raw": raw, "latency_ms": latency, "meta": meta}


def write_atomic(path: str, result: dict) -> None:
    """np.savez to a temp name in the same folder, then rename: a reader never sees half a file."""
    import numpy as np

    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, raw=result["raw"], latency_ms=result["latency_ms"],
                     meta=np.array(json.dumps(result["meta"])))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _exit_when_stdin_closes() -> None:
    """Over SSH the runner would outlive a dropped or interrupted client (no tty, no SIGHUP):
    the client keeps our stdin open, so end-of-file means nobody is waiting for the result."""
    def watch():
        # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader aborts the
        # interpreter's shutdown ("could not acquire lock for <stdin>")
        try:
            while os.read(0, 65536):
                pass
        except OSError:
            pass
        os._exit(130)

    threading.Thread(target=watch, daemon=True).start()


def parse_args(argv=None):
    def positive(text):
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
        return value

    def count(text):
        value = int(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
        return value

    p = argparse.ArgumentParser(description="Run an exported model on this device (ghnq-deploy verify).")
    p.add_argument("--model", required=True)
    p.add_argument("--inputs", required=True, help=".npy, already quantized by the host")
    p.add_argument("--output", required=True, help=".npz with raw, latency_ms, meta")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto")
    p.add_argument("--kernels", choices=KERNELS, default="xnnpack")
    p.add_argument("--threads", type=positive, default=1)
    p.add_argument("--timing-runs", type=positive, default=50)
    p.add_argument("--warmup", type=count, default=5)
    p.add_argument("--batch", type=positive, default=256)
    p.add_argument("--exit-on-stdin-eof", action="store_true", help="stop when the caller's pipe closes")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.exit_on_stdin_eof:
        _exit_when_stdin_closes()
    try:
        write_atomic(args.output, run(args))
    except RunnerError as exc:
        sys.stderr.write(ERROR_PREFIX + str(exc).replace("\n", " ") + "\n")
        return exc.code
    except ImportError as exc:  # numpy itself missing
        sys.stderr.write(f"{ERROR_PREFIX}{_first_line(exc)} on this device: `pip install numpy` there\n")
        return EXIT_NO_RUNTIME
    return 0


if __name__ == "__main__":
    sys.exit(main())

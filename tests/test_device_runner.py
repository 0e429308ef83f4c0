"""The self-contained device runner and the local transport: same bytes as in-process LiteRT / ORT,
clear one-line failures, timing and provenance, temp folders removed."""

from __future__ import annotations

import ast
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from ghnq_deploy.runtime import onnxruntime_runner
from ghnq_deploy.verify import connection, device_runner
from ghnq_deploy.verify.connection import DeviceError, LocalConnection, RunRequest

from verify_fixtures import (TINY_FLOAT, TINY_INT8, TINY_ONNX, TINY_ONNX_INT8, litert_raw, normalized_images,
                             tflite_inputs)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Route tempfile to an empty folder so a test can see what the transport left behind."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def request(model, inputs, **kw) -> RunRequest:
    fields = dict(runtime="auto", kernels="xnnpack", threads=1, timing_runs=7, warmup=2, batch=16)
    fields.update(kw)
    return RunRequest(model_file=model, inputs=inputs, **fields)


@pytest.mark.parametrize("kernels", ["xnnpack", "builtin", "reference"])
def test_int8_tflite_raw_outputs_equal_in_process_litert_for_each_kernel_set(kernels, private_tmp):
    x = tflite_inputs(TINY_INT8, 40)  # 40 images, batch 16: three batches, the last one short
    result = LocalConnection().run(request(TINY_INT8, x, kernels=kernels))
    assert result.raw.dtype == np.int8 and result.raw.shape == (40, 10)
    np.testing.assert_array_equal(result.raw, litert_raw(TINY_INT8, x, kernels))
    assert result.latency_ms.shape == (7,) and np.all(result.latency_ms > 0)
    meta = result.meta
    assert meta["runtime"] == "ai-edge-litert" and meta["kernels"] == kernels and meta["threads"] == 1
    assert meta["where"] == "host" and meta["images"] == 40 and meta["wall_s"] > 0
    assert meta["machine"] == device_runner.platform.machine() and meta["cpu"]
    assert meta["peak_rss_mb"] > 10 and meta["python"] == device_runner.platform.python_version()
    assert meta["quantization"]["output"]["dtype"] == "int8"
    assert list(private_tmp.iterdir()) == []  # the temp folder is gone


def test_reference_and_xnnpack_really_are_different_kernel_paths():
    # the kernel option must reach the interpreter: on enough images the two paths differ by an LSB
    x = tflite_inputs(TINY_INT8, 64)
    runs = {k: LocalConnection().run(request(TINY_INT8, x, kernels=k)).raw for k in ("xnnpack", "reference")}
    diff = np.abs(runs["xnnpack"].astype(int) - runs["reference"].astype(int))
    assert diff.max() <= 2
    assert diff.any(), "XNNPACK and reference kernels gave identical outputs: kernel choice ignored?"


def test_tflite_micro_runs_the_int8_file_as_the_integer_simulator_predicts(private_tmp):
    # TFLite Micro (batch-1 tensors) loops over the images itself; its outputs are bit-exact
    # with the simulator's tflm kernel set, and its identity is in the provenance
    pytest.importorskip("tflite_micro")
    from ghnq_deploy.quant import tflite_sim

    x = tflite_inputs(TINY_INT8, 20)
    result = LocalConnection().run(request(TINY_INT8, x, runtime="tflite-micro", kernels="reference"))
    assert result.raw.dtype == np.int8 and result.raw.shape == (20, 10)
    np.testing.assert_array_equal(result.raw, tflite_sim.simulate(TINY_INT8, x, "integer", kernels="tflm"))
    meta = result.meta
    assert meta["runtime"] == "tflite-micro" and meta["kernels"] == "reference"
    assert meta["quantization"]["output"]["dtype"] == "int8" and meta["quantization"]["output"]["scale"] > 0
    assert list(private_tmp.iterdir()) == []
    with pytest.raises(DeviceError, match="tflite-micro has only its reference kernels"):
        LocalConnection().run(request(TINY_INT8, x, runtime="tflite-micro", kernels="xnnpack"))


def test_float_tflite_and_onnx_files():
    x = tflite_inputs(TINY_FLOAT, 20)
    result = LocalConnection().run(request(TINY_FLOAT, x))
    assert result.raw.dtype == np.float32
    np.testing.assert_array_equal(result.raw, litert_raw(TINY_FLOAT, x))
    nchw = normalized_images(20)
    for model in (TINY_ONNX, TINY_ONNX_INT8):
        for kernels in ("builtin", "reference"):
            result = LocalConnection().run(request(model, nchw, kernels=kernels, threads=2))
            assert result.meta["runtime"] == "onnxruntime" and result.meta["threads"] == 2
            np.testing.assert_allclose(result.raw, onnxruntime_runner.run_normalized(model, nchw), atol=1e-4)
    # float onnx vs float tflite: the same net
    np.testing.assert_allclose(LocalConnection().run(request(TINY_ONNX, nchw, kernels="builtin")).raw,
                               LocalConnection().run(request(TINY_FLOAT, x)).raw, atol=1e-4)


def test_wrong_dtype_layout_or_runtime_is_one_clear_line(private_tmp):
    x = tflite_inputs(TINY_INT8, 4)
    with pytest.raises(DeviceError, match=r"inputs are float32; the model takes int8 \(NHWC\)"):
        LocalConnection().run(request(TINY_INT8, x.astype(np.float32)))
    with pytest.raises(DeviceError, match=r"shape \[3, 32, 32\] per image; the model takes \[32, 32, 3\]"):
        LocalConnection().run(request(TINY_INT8, np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    with pytest.raises(DeviceError, match="is not an ONNX file"):
        LocalConnection().run(request(TINY_INT8, x, runtime="onnxruntime"))
    with pytest.raises(DeviceError, match="is an ONNX file"):
        LocalConnection().run(request(TINY_ONNX, normalized_images(4), runtime="litert"))
    bad = private_tmp.parent / "corrupt.tflite"
    bad.write_bytes(b"not a flatbuffer" * 10)
    with pytest.raises(DeviceError, match="cannot load model.tflite") as info:
        LocalConnection().run(request(bad, x))
    assert "\n" not in str(info.value)
    assert list(private_tmp.iterdir()) == []


def _blocked_packages(folder, names) -> None:
    """Packages that shadow the real ones and fail to import, as on a device that lacks them."""
    for name in names:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")


def test_no_interpreter_on_the_device_exits_3_naming_the_package(tmp_path, monkeypatch, private_tmp):
    _blocked_packages(tmp_path / "shadow", ["ai_edge_litert", "tflite_runtime", "onnxruntime"])
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "shadow"))
    x = tflite_inputs(TINY_INT8, 4)
    with pytest.raises(DeviceError, match=r"pip install ai-edge-litert. or .pip install tflite-runtime"):
        LocalConnection().run(request(TINY_INT8, x))
    with pytest.raises(DeviceError, match="tflite-runtime is not installed on this device"):
        LocalConnection().run(request(TINY_INT8, x, runtime="tflite-runtime"))
    _blocked_packages(tmp_path / "shadow", ["tflite_micro"])
    with pytest.raises(DeviceError, match="tflite-micro is not installed on this device: .pip install tflite-micro"):
        LocalConnection().run(request(TINY_INT8, x, runtime="tflite-micro", kernels="reference"))
    with pytest.raises(DeviceError, match="pip install onnxruntime"):
        LocalConnection().run(request(TINY_ONNX, normalized_images(4)))
    assert list(private_tmp.iterdir()) == []
    # the runner itself: exit code 3 and one line
    out = tmp_path / "o.npz"
    np.save(tmp_path / "in.npy", x)
    proc = subprocess.run([sys.executable, str(connection.RUNNER), "--model", str(TINY_INT8), "--inputs",
                           str(tmp_path / "in.npy"), "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == device_runner.EXIT_NO_RUNTIME == connection.EXIT_NO_RUNTIME
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(connection.ERROR_PREFIX)
    assert not out.exists()


def test_tflite_runtime_is_used_when_it_is_the_only_interpreter(tmp_path, monkeypatch):
    # a stand-in tflite_runtime package that forwards to LiteRT: `auto` must fall back to it
    _blocked_packages(tmp_path / "shadow", ["ai_edge_litert"])
    fake = tmp_path / "shadow" / "tflite_runtime"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = 'stand-in'\n")
    site = str(__import__("ai_edge_litert").__path__[0])
    (fake / "interpreter.py").write_text(
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ai_edge_litert', {site + '/__init__.py'!r},\n"
        f"    submodule_search_locations=[{site!r}])\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['ai_edge_litert'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "from ai_edge_litert.interpreter import Interpreter, OpResolverType\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "shadow"))
    x = tflite_inputs(TINY_INT8, 8)
    result = LocalConnection().run(request(TINY_INT8, x, kernels="reference"))
    assert result.meta["runtime"] == "tflite-runtime"
    np.testing.assert_array_equal(result.raw, litert_raw(TINY_INT8, x, "reference"))


def test_timeout_and_missing_python(private_tmp):
    x = tflite_inputs(TINY_INT8, 4)
    with pytest.raises(DeviceError, match="not found"):
        LocalConnection(python="/nonexistent/python3").run(request(TINY_INT8, x))
    with pytest.raises(DeviceError, match="did not finish within 0.01 s"):
        LocalConnection(timeout_s=0.01).run(request(TINY_INT8, x, timing_runs=100000))
    assert list(private_tmp.iterdir()) == []


def test_cpu_model_names_arm_cores_and_boards(tmp_path):
    pi = tmp_path / "pi"
    pi.write_text("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
                  "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n\n"
                  "processor\t: 1\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n\n"
                  "Hardware\t: BCM2835\nRevision\t: c03114\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n")
    assert device_runner.cpu_model(str(pi)) == "ARM Cortex-A72, BCM2835, Raspberry Pi 4 Model B Rev 1.4"
    odd = tmp_path / "odd"
    odd.write_text("CPU implementer\t: 0x99\nCPU part\t: 0x123\n")
    assert device_runner.cpu_model(str(odd)) == "ARM implementer 0x99 part 0x123"
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n")
    assert device_runner.cpu_model(str(x86)) == "AMD EPYC 7B13"
    assert device_runner.cpu_model(str(tmp_path / "missing"))  # falls back to platform


def test_runner_is_self_contained_and_old_python_safe():
    tree = ast.parse(connection.RUNNER.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
        assert not isinstance(node, ast.Match), "match needs Python 3.10; devices may run 3.9"
    allowed = set(sys.stdlib_module_names) | {"numpy", "ai_edge_litert", "tflite_runtime", "tflite_micro", "onnxruntime"}
    assert imported <= allowed, imported - allowed
    assert device_runner.ERROR_PREFIX == connection.ERROR_PREFIX
    assert device_runner.EXIT_BAD_INPUT == connection.EXIT_BAD_INPUT


def test_runner_rejects_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, str(connection.RUNNER), "--model", "m", "--inputs", "i",
                           "--output", "o", "--threads", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--threads" in proc.stderr

"""export(): predicted model -> BN calibration -> folding -> converted file + manifest, atomically.

One function the CLI calls for every target. Order matters and is fixed: BN running
statistics from the calibration set, conv+BN folding checked against the unfolded net,
conversion, then an accuracy and parity measurement with the runtime that matches the
file. Everything is written in a hidden temporary folder inside the output folder and
renamed into place only when complete, so an interrupted export leaves no partial file
(and an earlier export in the same folder stays intact).
"""

from __future__ import annotations

import copy
import math

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ghnq_deploy.arch.builder import ArchNet
from ghnq_deploy.calibration import ImageSetFile, load_calibration, load_eval_set
from ghnq_deploy.data import normalize
from ghnq_deploy.errors import UserError
from ghnq_deploy.export import formats, lowbit
from ghnq_deploy.export import manifest as mf
from ghnq_deploy.export import onnx as onnx_export
from ghnq_deploy.runtime.registry import get_runtime
from ghnq_deploy.io import temporary_files_in
from ghnq_deploy.quant.bn_calibrate import FoldReport, calibrate_bn, check_folding, fold_bn, summarize

TARGETS = formats.TARGETS
FILE_NAMES = {name: fmt.file_name for name, fmt in formats.FORMATS.items()}
MIN_CALIBRATION_IMAGES = 32
FOLD_CHECK_IMAGES = 64
BN_BATCH_SIZE = 64


class ExportError(UserError):
    """An export that cannot be done as asked; one line."""


@dataclass
class ExportResult:
    target: str
    model_file: Path
    manifest_file: Path
    manifest: dict
    fold_reports: list[FoldReport] = field(default_factory=list)


@dataclass
class PreparedModel:
    """The float reference an export starts from: BN calibrated, then folded."""

    calibrated: ArchNet
    folded: ArchNet
    reports: list[FoldReport]
    fold_max_abs_diff: float | None
    has_bn: bool
    seconds_bn: float
    seconds_fold: float


def calibrate_running_bn(model: nn.Module, calibration: np.ndarray) -> nn.Module:
    """BN running statistics on the uint8 calibration images: the one routine export, evaluate and verify use."""
    return calibrate_bn(model, calibration, batch_size=BN_BATCH_SIZE)


def prepare_model(model: ArchNet, calibration: np.ndarray) -> PreparedModel:
    """Calibrate BN on the uint8 calibration images, fold, and check the fold on a batch."""
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    start = time.perf_counter()
    if has_bn:
        calibrate_running_bn(model, calibration)
    seconds_bn = time.perf_counter() - start
    start = time.perf_counter()
    folded, reports = fold_bn(model.eval())
    diff = check_folding(model, folded, calibration[:FOLD_CHECK_IMAGES]) if has_bn else None
    return PreparedModel(model, folded, reports, diff, has_bn, seconds_bn, time.perf_counter() - start)


def runner_for(target: str, resolver: str | None = None) -> tuple[Callable[[Path, np.ndarray], np.ndarray], str]:
    """(run_normalized(file, x_nchw) -> logits, runtime description) for a format's file, on this host."""
    runtime = get_runtime(formats.get_format(target).default_runtime)
    kernels = runtime.check_kernels(resolver or runtime.kernels[0])
    return (lambda path, x: runtime.run_in_process(path, x, kernels, None)), _describe_runtime(runtime, kernels)


def _describe_runtime(runtime, kernels: str) -> str:
    from importlib.metadata import version

    package = runtime.packages[0]
    suffix = f" ({kernels} kernels)" if len(runtime.kernels) > 1 else ""
    return f"{package} {version(package)} {runtime.description.split(' (')[0]}{suffix}"


def io_quantization(target: str, path: Path) -> dict:
    """Input/output dtype, shape, scale and zero point, read back from the produced file."""
    inp, out = formats.get_format(target).read_io(path)
    return {"input": inp.to_dict(), "output": out.to_dict()}


def weight_summary(target: str, path: Path) -> dict | None:
    """For int8 files: how the weights and biases were actually quantized (read from the file)."""
    summarize_weights = formats.get_format(target).weight_summary
    return summarize_weights(path) if summarize_weights else None


def evaluate(target: str, path: Path, reference: nn.Module, eval_set: ImageSetFile, resolver: str | None = None) -> dict:
    """Accuracy of the file on the eval set, the torch float reference's, and their agreement."""
    x = normalize(eval_set.images).numpy()
    run, runtime = runner_for(target, resolver)
    start = time.perf_counter()
    logits = run(path, x)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        ref = torch.cat([reference(torch.as_tensor(x[i:i + 256])) for i in range(0, len(x), 256)]).numpy()
    labels = eval_set.labels
    diff = np.abs(logits - ref)
    result = {
        "dataset": eval_set.description,
        "file": eval_set.path.name if eval_set.path else None,
        "sha256": eval_set.sha256,
        "count": len(labels),
        "runtime": runtime,
        "top1": float((logits.argmax(1) == labels).mean()),
        "torch_float_top1": float((ref.argmax(1) == labels).mean()),
        "top1_agreement_with_torch": float((logits.argmax(1) == ref.argmax(1)).mean()),
        "max_abs_logit_diff_vs_torch": float(diff.max()),
        "mean_abs_logit_diff_vs_torch": float(diff.mean()),
        "max_abs_torch_logit": float(np.abs(ref).max()),
        "seconds": seconds,
    }
    if "JPEG copy" in eval_set.description:
        result["note"] = ("a JPEG-derived copy of the CIFAR-10 test set (its first 1,000 images lossless): "
                          "accuracy is close to, but not, the official test set's")
    return result


FLOAT_TARGETS = ("onnx", "tflite")
PARITY_TOLERANCE = 1e-4  # max |logit difference| of a float file vs torch for logits up to PARITY_LOGIT_UNIT
PARITY_LOGIT_UNIT = 10.0  # beyond it the bound grows with max |torch logit| (relative 1e-5 at the default)


def parity_bounds(tolerance: float, max_abs_logit: float) -> tuple[float, float]:
    """(max, mean) |logit difference| a correct float file stays within.

    ``tolerance * (1 + max|logit| / 10)`` for the max, a tenth of it for the mean: an
    absolute 1e-4 while logits are small, 1e-5 of the largest logit when they are large.
    float32 rounding grows with the logits' magnitude: a ResNet with logits near +-400
    differs from torch by a few 1e-4 at most and ~1e-6 on average, so the fixed 1e-4
    refused correct files; a translation bug (a wrong weight layout) moves logits by
    O(their scale). ``tolerance=0`` still demands bit-identical logits.
    """
    bound = tolerance * (1.0 + max_abs_logit / PARITY_LOGIT_UNIT)
    return bound, bound / 10


FLOAT64_FACTOR = 8.0  # a float file may stray from the float64 logits this many times as far as torch's float32


def float64_errors(target: str, path: Path, reference: nn.Module, eval_set: ImageSetFile,
                   resolver: str | None = None) -> dict:
    """max |logit - float64 logit| of the file and of torch's float32 run, on the eval images.

    Why: float32 rounding grows with the length of the sums, not only with the logits' size, so a
    very wide net (VGG's 25,088-input classifier) can leave :func:`parity_bounds` by rounding alone.
    Its honest yardstick is how far torch's own float32 run strays from exact arithmetic.
    """
    x = normalize(eval_set.images).numpy()
    run, _ = runner_for(target, resolver)
    logits = run(path, x).astype(np.float64)
    exact_net = copy.deepcopy(reference).double()
    with torch.no_grad():
        exact = torch.cat([exact_net(torch.as_tensor(x[i:i + 64]).double()) for i in range(0, len(x), 64)]).numpy()
        single = torch.cat([reference(torch.as_tensor(x[i:i + 256])) for i in range(0, len(x), 256)]).numpy()
    return {"file_max_abs_diff": float(np.abs(logits - exact).max()),
            "torch_float32_max_abs_diff": float(np.abs(single.astype(np.float64) - exact).max()),
            "factor": FLOAT64_FACTOR}


def check_parity(target: str, evaluation: dict | None, tolerance: float | None,
                 float64_check: Callable[[], dict] | None = None) -> None:
    """Refuse a float file whose logits leave :func:`parity_bounds` of torch's (nothing is written).

    A file outside them still passes when ``float64_check`` (see :func:`float64_errors`) shows it
    no farther from float64 logits than ``FLOAT64_FACTOR`` times torch's own float32 run: a rounding
    effect, not a translation bug (those move logits by a fraction of their scale). The bounds and
    the measured values are recorded in ``evaluation["parity"]`` (the manifest).
    """
    if target not in FLOAT_TARGETS or evaluation is None or tolerance is None:
        return
    diff, mean = evaluation["max_abs_logit_diff_vs_torch"], evaluation["mean_abs_logit_diff_vs_torch"]
    scale = evaluation["max_abs_torch_logit"]
    max_bound, mean_bound = parity_bounds(tolerance, scale)
    evaluation["parity"] = {
        "criterion": f"max |diff| <= {tolerance:g} * (1 + max |torch logit| / {PARITY_LOGIT_UNIT:g}), "
                     "mean |diff| <= a tenth of that",
        "max_abs_torch_logit": scale, "max_abs_diff": diff, "max_abs_diff_bound": max_bound,
        "mean_abs_diff": mean, "mean_abs_diff_bound": mean_bound,
        "relative_max_diff": diff / scale if scale else None,
    }
    if not (diff <= max_bound and mean <= mean_bound) and tolerance > 0 and float64_check is not None \
            and math.isfinite(diff):
        exact = float64_check()
        evaluation["parity"]["float64"] = exact
        if exact["file_max_abs_diff"] <= exact["factor"] * exact["torch_float32_max_abs_diff"]:
            evaluation["parity"]["passed_by"] = "float64 reference (float32 rounding of long sums)"
            return
    if not (diff <= max_bound and mean <= mean_bound):  # also catches NaN
        raise ExportError(f"{target} file disagrees with torch: max |logit difference| {diff:.3g} (bound {max_bound:.3g}), "
                          f"mean {mean:.3g} (bound {mean_bound:.3g}) at max |logit| {scale:.3g} on "
                          f"{evaluation['count']} images (nothing written; --parity-tolerance raises the floor)")


_PARTIAL_PREFIX = ".export-"
_PARTIAL_SUFFIX = ".partial"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Delete temporary folders left by exports that were killed (their process no longer exists)."""
    removed = []
    for path in out_dir.glob(f"{_PARTIAL_PREFIX}*{_PARTIAL_SUFFIX}"):
        pid = path.name[len(_PARTIAL_PREFIX):].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _method_text(method: str) -> str:
    if method == "entropy":
        return (f"entropy (KL divergence, {onnx_export.ENTROPY_BINS}-bin histogram, "
                f"{onnx_export.ENTROPY_QUANTIZED_BINS} quantized bins)")
    if method == "percentile":
        return "percentile (99.999%, 2048-bin histogram: onnxruntime defaults)"
    return "minmax (absolute min/max over the calibration set)"


def _write_atomically(out_dir: Path, build: Callable[[Path], list[Path]]) -> list[Path]:
    """Run ``build(tmp_dir)`` and move the files it made into ``out_dir``; nothing moves on error.

    The temporary folder is hidden and named after this process, so a later export can
    remove what a killed one (kill -9, power loss) left behind.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL_PREFIX}{os.getpid()}-", suffix=_PARTIAL_SUFFIX, dir=out_dir))
    try:
        with temporary_files_in(tmp):  # the converter's own temp files go with this folder
            made = build(tmp)
        placed = []
        for path in made:  # model file first, manifest last: a manifest always describes a complete file
            path.chmod(0o644)
            with open(path, "rb") as handle:  # on disk before it becomes visible under its final name
                os.fsync(handle.fileno())
            os.replace(path, out_dir / path.name)
            placed.append(out_dir / path.name)
        return placed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(model_path: str | os.PathLike, target: str, calibration: str | os.PathLike | None = None,
           out_dir: str | os.PathLike | None = None, calibration_method: str | None = None,
           eval_set: str | os.PathLike | None = None, eval_count: int | None = None, evaluate_file: bool = True,
           resolver: str | None = None, parity_tolerance: float | None = PARITY_TOLERANCE,
           bits: str | None = None, param_cap: int | None = None) -> ExportResult:
    """Export a predicted model file to ``target``; writes ``<out_dir>/<file>`` and ``manifest.json``.

    ``calibration``/``eval_set``: shipped set names or .npz files (default: the shipped sets).
    ``out_dir`` defaults to ``<model folder>/export/<target>``. ``calibration_method`` is
    onnx-int8's (default minmax) and refused for other targets rather than ignored. A float
    file whose logits differ from torch's by more than ``parity_tolerance`` is not written.
    ``bits``: for int8 formats, w8a8 (default) or w4a8 (int8 file holding only 4-bit weight
    levels, see :mod:`ghnq_deploy.export.lowbit`); its default folder is ``export/<target>-w4a8``.
    """
    from ghnq_deploy.ghn.predict import load_predicted

    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    fmt = formats.get_format(target)
    bits = bits or fmt.bits[0]
    if bits not in fmt.bits:
        raise ExportError(f"{target} carries {', '.join(fmt.bits)}, not {bits}"
                          + ("; use an int8 target for w4a8" if not fmt.integer else ""))
    wbits = lowbit.weight_bits(bits) if fmt.integer else None
    if calibration_method is not None and target != "onnx-int8":
        raise ExportError(f"--calibration-method applies to onnx-int8 only (tflite-int8 calibrates with the "
                          f"converter's min/max); got it for {target}")
    calibration_method = calibration_method or "minmax"
    if calibration_method not in onnx_export.CALIBRATION_METHODS:
        raise ExportError(f"unknown calibration method {calibration_method!r}; "
                          f"choose from {', '.join(onnx_export.CALIBRATION_METHODS)}")
    model_path = Path(model_path)
    if model_path.is_dir():
        from ghnq_deploy.workspace import active_model

        model_path = active_model(model_path)  # a run folder: its fine-tuned model once there is one
    out_dir = (Path(out_dir) if out_dir is not None
               else model_path.parent / "export" / formats.export_folder_name(target, bits))
    # before any work: an output that cannot be written fails now, not after the conversion, and
    # a killed earlier export's partial folder is cleaned even when this one fails later
    from ghnq_deploy.workspace import check_export_folder, check_output_dir

    check_output_dir(out_dir)
    check_export_folder(out_dir, target)
    if out_dir.is_dir():
        remove_stale_partials(out_dir)
    total_start = time.perf_counter()
    predicted = load_predicted(model_path, param_cap=param_cap)
    spec = predicted.spec
    cal = load_calibration(calibration, image_shape=spec.input_shape, min_count=MIN_CALIBRATION_IMAGES,
                           num_classes=spec.num_classes)
    evals = None
    if evaluate_file:
        evals = load_eval_set(eval_set, image_shape=spec.input_shape, num_classes=spec.num_classes).subset(eval_count)
    prepared = prepare_model(predicted.build(), cal.images)
    # the float net the file stands for: W4A8 files carry weights snapped to the 4-bit grid
    source = lowbit.snap_weights(prepared.folded, wbits) if wbits is not None else prepared.folded
    calibration_nchw = normalize(cal.images).numpy()
    file_name = fmt.file_name
    result: dict = {}

    def build(tmp: Path) -> list[Path]:
        model_file = tmp / file_name
        start = time.perf_counter()
        fmt.convert(source, model_file, calibration_nchw, calibration_method)
        if wbits is not None and wbits < 8:
            fmt.requantize(model_file, wbits)
        seconds_convert = time.perf_counter() - start
        evaluation = evaluate(target, model_file, source, evals, resolver) if evals is not None else None
        check_parity(target, evaluation, parity_tolerance,
                     lambda: float64_errors(target, model_file, source, evals, resolver))
        io = io_quantization(target, model_file)
        weights = weight_summary(target, model_file)
        if weights is not None:
            weights["bits"] = bits
            weights["levels"] = (f"{wbits}-bit per-channel symmetric levels [-{lowbit.levels(wbits)}, "
                                 f"{lowbit.levels(wbits)}] stored in int8: an int8 runtime executes exactly {bits}")
        timings = {"bn_calibration": prepared.seconds_bn, "fold": prepared.seconds_fold, "convert": seconds_convert,
                   "evaluate": None if evaluation is None else evaluation["seconds"],
                   "total": time.perf_counter() - total_start}
        manifest = mf.build_manifest(
            target=target, model_file=model_file, description=fmt.description, spec_name=spec.name,
            arch_sha256=spec.sha256(), predicted_file=model_path, predicted_meta=predicted.meta,
            calibration={"description": cal.description, "file": cal.path.name if cal.path else None,
                         "sha256": cal.sha256, "count": len(cal), "source": cal.meta.get("source"),
                         "seed": cal.meta.get("seed"), "preprocessing": cal.meta.get("preprocessing"),
                         "used_for": ["batchnorm"] + (["activation ranges"] if fmt.integer else []),
                         "method": _method_text(calibration_method) if target == "onnx-int8" else
                         ("TFLiteConverter representative_dataset (min/max)" if target == "tflite-int8" else None)},
            bn={"present": prepared.has_bn, "calibrated": prepared.has_bn,
                "protocol": "running stats reset, train-mode BN with momentum=None (cumulative average), one pass, "
                            f"batch {BN_BATCH_SIZE}" if prepared.has_bn else "BN-free net: nothing to calibrate"},
            folding={**summarize(prepared.reports), "check_images": FOLD_CHECK_IMAGES if prepared.has_bn else 0,
                     "max_abs_logit_diff_folded_vs_unfolded": prepared.fold_max_abs_diff,
                     "layers": [r.to_dict() for r in prepared.reports]},
            io=io, weights=weights, evaluation=evaluation, timings=timings,
            options={"calibration_method": calibration_method if target == "onnx-int8" else None,
                     "runtime_kernels": resolver, "bits": bits,
                     "opset": onnx_export.OPSET if fmt.family == "onnx" else None},
        )
        manifest_file = tmp / mf.MANIFEST_NAME
        mf.write_manifest(manifest_file, manifest)
        result["manifest"] = manifest
        return [model_file, manifest_file]

    placed = _write_atomically(out_dir, build)
    return ExportResult(target, placed[0], placed[1], result["manifest"], prepared.reports)

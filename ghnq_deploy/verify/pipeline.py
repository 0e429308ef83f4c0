"""verify(): per target and bit-width, float -> paper sim -> target-scheme sim -> real fixed-point run.

The stages share one image set and one prepared model (BN calibrated on the export's own
calibration set, then folded: exactly the reference the export started from). The real run
goes through a :mod:`connection` (this host, SSH, QEMU), with the input tensor quantized on
the host with the encodings read from the file. A device failure keeps what was finished:
the report is marked incomplete and the error is re-raised after it is written.
"""

from __future__ import annotations

import copy

import hashlib
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ghnq_deploy.calibration import load_calibration, load_eval_set
from ghnq_deploy.data import load_cifar10, normalize
from ghnq_deploy.errors import UserError
from ghnq_deploy.export import formats
from ghnq_deploy.export.manifest import MANIFEST_NAME, read_manifest, sha256_file
from ghnq_deploy.quant.scheme import parse_bits
from ghnq_deploy.runtime.registry import get_runtime
from ghnq_deploy.verify import compare as cmp
from ghnq_deploy.verify import gap as gp
from ghnq_deploy.verify.connection import (Connection, DeviceError, EmulatorConnection, LocalConnection, RunRequest,
                                           SSHConnection)
from ghnq_deploy.verify.scheme_check import check_file
from ghnq_deploy.verify.target import Target

REPORT_FORMAT = "ghnq-deploy/verify"
SIM_BATCH = 64  # the paper protocol's batch for batch-statistics BN
FLOAT_TIMING_IMAGES = 16
# target-file rounding -> integer simulator rounding mode
ROUNDING = {"double": "double", "single": "single", "fp32": "xnnpack"}  # the float file runs for latency / size only: a few images suffice


class VerifyError(UserError):
    """A verify run that cannot be done as asked; one line."""


@dataclass
class VerifyConfig:
    devices: list[str]
    bits: list[str] = field(default_factory=lambda: ["w8a8"])
    data: str | None = None  # a CIFAR-10 copy (its test set) instead of the shipped evaluation set
    eval_set: str | None = None
    limit_images: int | None = None
    host: str | None = None
    emulator: str | None = None
    ssh_config: str | None = None
    timing_runs: int | None = None
    export_missing: bool = True
    integer_sim: bool = True  # run the integer simulator on TFLite files (the gap chain's integer stage)
    rounding: str | None = None  # integer simulator rounding; None: the target's scheme.rounding
    localise: bool = False  # layer-wise comparison on a few samples (also when a gap exceeds max_gap)
    max_gap: float | None = None
    localise_samples: int = 8


@dataclass
class Images:
    images: np.ndarray  # uint8 NHWC
    labels: np.ndarray
    description: str
    sha256: str


def load_images(cfg: VerifyConfig, input_shape, num_classes: int) -> Images:
    if cfg.data is not None and cfg.eval_set is not None:
        raise VerifyError("give --data (a CIFAR-10 copy) or --eval-set (an image-set .npz), not both")
    if cfg.data is not None:
        data = load_cifar10("test", cfg.data)
        x, y, desc = data.images, data.labels, data.description
    else:
        s = load_eval_set(cfg.eval_set, image_shape=input_shape, num_classes=num_classes)
        x, y, desc = s.images, s.labels, s.description
    if cfg.limit_images is not None:
        x, y = x[:cfg.limit_images], y[:cfg.limit_images]
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes() + np.asarray(y, np.int64).tobytes()).hexdigest()
    return Images(np.ascontiguousarray(x), np.asarray(y, np.int64), desc, digest)


# ----------------------------------------------------------------------------- connections


def connection_for(target: Target, cfg: VerifyConfig) -> tuple[Connection, str]:
    """The transport for a target and how its rows are labelled (where it ran)."""
    host = cfg.host or target.connection.host
    if cfg.emulator is not None:
        if target.emulation is None:
            raise VerifyError(f"target {target.name} declares no [emulation] ({target.source})")
        if cfg.emulator != target.emulation.kind:
            raise VerifyError(f"--emulator {cfg.emulator!r}: target {target.name} is emulated with "
                              f"{target.emulation.kind!r}")
        return EmulatorConnection(target.name, cpu=target.emulation.cpu), \
            f"emulated {target.label} (QEMU {target.emulation.cpu})"
    if host:
        if target.is_host:
            raise VerifyError(f"target {target.name} runs on this host; --host applies to device targets")
        c = target.connection
        user = None if "@" in host else (c.user or None)
        return SSHConnection(host, user=user, port=c.port or None, identity_file=c.identity_file or None,
                             python=c.python or "python3", ssh_config=cfg.ssh_config), f"{target.label} over SSH"
    if target.runs_natively_here():
        return LocalConnection(), "this host"
    return LocalConnection(), f"{platform.machine()} stand-in for {target.name} (not {target.arch})"


def stand_in_hint(target: Target) -> str | None:
    if target.runs_natively_here():
        return None
    how = f"`ghnq-deploy emulator setup {target.name}` then --emulator qemu" if target.emulation else ""
    return (f"{target.name}: ran its kernels on this {platform.machine()} host; for the device use --host USER@ADDR"
            + (f", or {how}" if how else ""))


# ----------------------------------------------------------------------------- exports


def export_path(model_path: Path, fmt_name: str, bits: str) -> Path:
    return model_path.parent / "export" / formats.export_folder_name(fmt_name, bits)


def ensure_export(model_path: Path, fmt_name: str, bits: str, allow: bool, notes: list[str]) -> tuple[Path, dict]:
    """The export folder's file and manifest, running ``export`` (in a subprocess: TensorFlow stays out) if missing."""
    folder = export_path(model_path, fmt_name, bits)
    manifest_file = folder / MANIFEST_NAME
    fresh = manifest_file.is_file() and read_manifest(manifest_file).get("predicted_model", {}).get(
        "sha256") == sha256_file(model_path)
    if not fresh:
        if not allow:
            raise VerifyError(f"{folder}: no up-to-date {fmt_name} {bits} export; run `ghnq-deploy export "
                              f"--target {fmt_name}" + (f" --bits {bits}`" if bits != "w8a8" and formats.get_format(
                                  fmt_name).integer else "`"))
        notes.append(f"no up-to-date {fmt_name} ({bits}) export for this model: ran `ghnq-deploy export --target "
                     f"{fmt_name}" + (f" --bits {bits}" if formats.get_format(fmt_name).integer else "") + "` first")
        cmd = [sys.executable, "-c", "from ghnq_deploy.cli import main; main()", "export", "--target", fmt_name,
               "--model", str(model_path), "--no-eval"]
        if formats.get_format(fmt_name).integer:
            cmd += ["--bits", bits]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise VerifyError(f"export {fmt_name} {bits} failed: {last[:300]}")
    manifest = read_manifest(manifest_file)
    return folder / manifest["file"]["name"], manifest


# ----------------------------------------------------------------------------- stages


def _forward(model: torch.nn.Module, x: torch.Tensor, batch: int = 256, channels_last: bool = False) -> np.ndarray:
    """Logits batch by batch. ``channels_last`` (plain float nets) runs a channels-last copy of the
    model: measured 1.3x faster on CPU for ResNet-20 at one thread, the same logits within float
    rounding (3e-8)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=layout)
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch].contiguous(memory_format=layout))
                          for i in range(0, len(x), batch)]).numpy()


class Stages:
    """The host-side stages of one model, computed once and shared by every target."""

    def __init__(self, model_path: Path, images: Images) -> None:
        from ghnq_deploy.export.pipeline import MIN_CALIBRATION_IMAGES, prepare_model
        from ghnq_deploy.ghn.predict import load_predicted

        self.predicted = load_predicted(model_path)
        spec = self.predicted.spec
        self.calibration = load_calibration(None, image_shape=spec.input_shape, min_count=MIN_CALIBRATION_IMAGES,
                                            num_classes=spec.num_classes)
        self.images = images
        self.x = normalize(images.images)
        start = time.perf_counter()
        self.prepared = prepare_model(self.predicted.build(), self.calibration.images)
        self.float_logits = _forward(self.prepared.folded, self.x, channels_last=True)
        self.seconds = {"float": time.perf_counter() - start}
        self._paper: dict[str, np.ndarray] = {}
        self._paper_running: dict[str, np.ndarray] = {}
        self._target: dict[tuple[str, str], np.ndarray] = {}
        self._file_sims: dict[tuple[str, str, str, str], np.ndarray] = {}

    def file_sim(self, sha: str, arithmetic: str, rounding: str, run, kernels: str = "litert-ref") -> np.ndarray:
        """A simulation of one exported file (shared by the targets that consume the same file)."""
        key = (sha, arithmetic, rounding, kernels)
        if key not in self._file_sims:
            start = time.perf_counter()
            self._file_sims[key] = run()
            label = rounding if kernels == "litert-ref" else f"{rounding}_{kernels}"
            self.seconds[f"{arithmetic}_sim_{label}_{sha[:8]}"] = time.perf_counter() - start
        return self._file_sims[key]

    def check_calibration(self, manifest: dict) -> None:
        want = manifest.get("calibration", {}).get("sha256")
        if want and want != self.calibration.sha256:
            raise VerifyError(f"the export used calibration set {want[:12]}, this verify {self.calibration.sha256[:12]}"
                              f": re-run `ghnq-deploy export --target {manifest['target']}`")

    def _paper_protocol(self, sim) -> np.ndarray:
        from ghnq_deploy.report.evaluate import eval_order

        order = eval_order(len(self.x))  # class-mixed batches, as the paper protocol needs
        out = np.empty((len(self.x), self.float_logits.shape[1]), np.float32)
        with torch.no_grad():
            for i in range(0, len(order), SIM_BATCH):
                idx = order[i:i + SIM_BATCH]
                out[idx] = sim(self.x[idx]).numpy()
        return out

    def paper_sim(self, bits: str) -> np.ndarray:
        """The paper's fake-quant simulation (tensorwise asymmetric, batch-statistics BN), as ``evaluate``."""
        if bits not in self._paper:
            from ghnq_deploy.quant.simulate import QuantSim

            start = time.perf_counter()
            sim = QuantSim(self.predicted.build(bn_mode="batch"), "paper", bits, bn="batch")
            self._paper[bits] = self._paper_protocol(sim)
            self.seconds[f"paper_sim_{bits}"] = time.perf_counter() - start
        return self._paper[bits]

    def paper_running_sim(self, bits: str) -> np.ndarray:
        """The paper's scheme with the export's BN (running statistics calibrated on its calibration set):
        the gap chain's link that isolates BN statistics from the scheme."""
        if bits not in self._paper_running:
            from ghnq_deploy.arch.builder import set_bn_mode
            from ghnq_deploy.quant.simulate import QuantSim

            start = time.perf_counter()
            model = self.prepared.calibrated.eval()
            model = set_bn_mode(model, "running") if self.prepared.has_bn else model
            self._paper_running[bits] = self._paper_protocol(QuantSim(model, "paper", bits, bn="running"))
            self.seconds[f"paper_running_sim_{bits}"] = time.perf_counter() - start
        return self._paper_running[bits]

    def target_sim(self, bits: str, scheme: str) -> np.ndarray:
        """The target-scheme fake-quant simulation: running-statistics BN folded, ranges calibrated on the
        export's calibration set (per-channel symmetric weights, per-tensor asymmetric activations)."""
        key = (bits, scheme)
        if key not in self._target:
            from ghnq_deploy.arch.builder import set_bn_mode
            from ghnq_deploy.quant.simulate import QuantSim

            start = time.perf_counter()
            model = self.prepared.calibrated.eval()
            sim = QuantSim(set_bn_mode(model, "running") if self.prepared.has_bn else model, scheme, bits, bn="running")
            cal = normalize(self.calibration.images)
            sim.calibrate([cal[i:i + SIM_BATCH] for i in range(0, len(cal), SIM_BATCH)])
            self._target[key] = _forward(sim, self.x, SIM_BATCH)
            self.seconds[f"target_sim_{bits}"] = time.perf_counter() - start
        return self._target[key]


def host_inputs(fmt: formats.ExportFormat, manifest: dict, x_nchw: np.ndarray) -> np.ndarray:
    """The file's input tensor: NHWC or NCHW, quantized with the file's own input encoding if int8."""
    from ghnq_deploy.runtime.litert_runner import quantize

    x = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1)) if fmt.layout == "NHWC" else np.ascontiguousarray(x_nchw)
    inp = manifest["io"]["input"]
    if inp.get("scale") is not None and inp["dtype"] != "float32":
        return quantize(x, inp["scale"], inp["zero_point"], np.dtype(inp["dtype"]))
    return x.astype(np.float32)


def _real_steps(fmt: formats.ExportFormat, manifest: dict, raw: np.ndarray) -> tuple[np.ndarray, float, int]:
    """The real output on the output step grid, with (scale, zero point) of that grid."""
    out = manifest["io"]["output"]
    if out.get("scale") is not None and out["dtype"] != "float32":
        return raw.astype(np.float64), float(out["scale"]), int(out["zero_point"])
    # QDQ ONNX: float output, but the last DequantizeLinear fixes the grid
    scale, zero = float(out["scale"]), int(out["zero_point"])
    return cmp.to_steps(raw, scale, zero, quantize=False), scale, zero


def verify_target(stages: Stages, target: Target, cfg: VerifyConfig, model_path: Path,
                  notes: list[str]) -> tuple[list[dict], DeviceError | None]:
    """Rows for one target: one per (consumed format, bit-width); stops at the first device failure."""
    runtime = get_runtime(target.runtime)
    connection, where = connection_for(target, cfg)
    rows: list[dict] = []
    labels = stages.images.labels
    for fmt_name in target.consumes:
        fmt = formats.get_format(fmt_name)
        for bits in cfg.bits:
            w, a = parse_bits(bits)
            row: dict = {"target": target.name, "label": target.label, "where": where, "format": fmt_name,
                         "runtime": target.runtime, "kernels": target.kernels, "threads": target.threads,
                         "bits": bits, "float_top1": 100.0 * float((stages.float_logits.argmax(1) == labels).mean())}
            if w is not None:
                row["paper_sim_top1"] = 100.0 * float((stages.paper_sim(bits).argmax(1) == labels).mean())
            if bits not in target.bits:
                row["real"] = False
                row["note"] = f"simulation only: {target.runtime} has no integer kernels for {bits}"
                rows.append(row)
                continue
            row["real"] = True
            model_file, manifest = ensure_export(model_path, fmt_name, bits, cfg.export_missing, notes)
            stages.check_calibration(manifest)
            inputs = host_inputs(fmt, manifest, stages.x.numpy())
            int_sim = None
            sim_raw, sim = None, None
            if fmt.simulate is not None:  # simulate the file itself: its graph, scales and zero points
                sha = manifest["file"]["sha256"]
                try:
                    sim_raw = stages.file_sim(sha, "fake-quant", "double", lambda: fmt.simulate(model_file, inputs))
                    row["target_sim_encodings"] = "read from the exported file (fake-quant execution of its graph)"
                except UserError as exc:  # an op the file simulator does not know yet: say so, use torch's
                    notes.append(f"{model_file.name}: file simulator unavailable ({exc}); target sim from torch")
                    sim_raw = None
                mode = cfg.rounding or ROUNDING[target.scheme.rounding]
                if cfg.integer_sim and sim_raw is not None and fmt.integer_simulator:
                    from ghnq_deploy.quant import tflite_sim

                    try:
                        int_sim = stages.file_sim(sha, "integer", mode, lambda: tflite_sim.simulate(
                            model_file, inputs, "integer", rounding=mode, kernels=runtime.integer_kernels),
                            kernels=runtime.integer_kernels)
                    except UserError as exc:
                        notes.append(f"{model_file.name}: no integer simulation ({exc}); the gap chain merges "
                                     f"integer arithmetic into kernel / platform")
            if cfg.integer_sim and not fmt.integer_simulator:
                notes.append(f"{fmt_name}: the integer simulator reads TFLite files only; the gap chain merges "
                             f"integer arithmetic into kernel / platform")
            if sim_raw is None:
                sim = stages.target_sim(bits, "tflite-int8")
                row["target_sim_encodings"] = ("calibrated by the torch simulator on the export's calibration set "
                                               "(same scheme; not read from the file)")
            request = RunRequest(model_file, inputs, runtime.runner_arg, target.kernels, target.threads,
                                 timing_runs=cfg.timing_runs or target.timing_runs, warmup=target.warmup)
            try:
                result = connection.run(request)
            except DeviceError as exc:
                row["error"] = str(exc)
                rows.append(row)
                return rows, exc
            real, scale, zero = _real_steps(fmt, manifest, result.raw)
            if sim_raw is None:
                sim_steps = cmp.to_steps(sim, scale, zero, True)
            elif manifest["io"]["output"]["dtype"] == "float32":  # QDQ file: float values on the output grid
                sim_steps = cmp.to_steps(sim_raw, scale, zero, True)
            else:
                sim_steps = sim_raw.astype(np.float64)
            float_steps = cmp.to_steps(stages.float_logits, scale, zero, quantize=False)
            sim_vs_real = cmp.compare(sim_steps, real, labels)
            float_vs_real = cmp.compare(float_steps, real, labels)
            row.update({
                "target_sim_top1": sim_vs_real.reference_top1, "real_top1": sim_vs_real.real_top1,
                "delta_top1_pt": sim_vs_real.delta_top1_pt, "sim_vs_real": sim_vs_real.to_dict(),
                "float_vs_real": float_vs_real.to_dict(),
                "integer_sim": None if int_sim is None else {
                    "rounding": mode, "kernels": runtime.integer_kernels,
                    "vs_real": cmp.compare(int_sim.astype(np.float64), real, labels).to_dict(),
                    "vs_target_sim": cmp.compare(sim_steps, int_sim.astype(np.float64), labels).to_dict()},
                "latency": cmp.latency_summary(result.latency_ms),
                "peak_rss_mb": result.meta.get("peak_rss_mb"),
                "file": {"name": model_file.name, "sha256": manifest["file"]["sha256"],
                         "bytes": manifest["file"]["bytes"]},
                "scheme_check": check_file(fmt_name, model_file, target.scheme),
                "device": result.meta,
                "output_grid": {"scale": scale, "zero_point": zero},
            })
            if w is not None:
                chain = {"float": stages.float_logits, "paper": stages.paper_sim(bits),
                         "paper_running": stages.paper_running_sim(bits), "target": sim_steps, "integer": int_sim,
                         "runtime": real}
                row["gap"] = gp.decompose(chain, labels).to_dict()
            if _wants_localise(cfg, row):
                row["localise"] = _localise_row(stages, target, cfg, model_path, notes, fmt, model_file, inputs,
                                                cfg.rounding or ROUNDING[target.scheme.rounding])
            if target.float_reference:
                row["float_file"] = _float_row(stages, target, connection, runtime, model_path, cfg, notes)
                if row["float_file"].get("latency", {}).get("p50_ms") and row["latency"]["p50_ms"]:
                    row["speedup"] = row["float_file"]["latency"]["p50_ms"] / row["latency"]["p50_ms"]
                row["size_ratio"] = row["float_file"]["bytes"] / row["file"]["bytes"]
            rows.append(row)
    return rows, None


def _wants_localise(cfg: VerifyConfig, row: dict) -> bool:
    if cfg.localise:
        return True
    if cfg.max_gap is None:
        return False
    total = (row.get("gap") or {}).get("total_pt")
    return any(v is not None and abs(v) > cfg.max_gap for v in (total, row.get("delta_top1_pt")))


def _localise_row(stages: Stages, target: Target, cfg: VerifyConfig, model_path: Path, notes: list[str],
                  fmt: formats.ExportFormat, model_file: Path, inputs: np.ndarray, rounding: str) -> dict | None:
    """Layer-wise comparison of the first few images: the int8 file on the target's kernels (this host),
    the integer simulator, and the float TFLite export of the same model."""
    from ghnq_deploy.verify.localise import localise

    if fmt.family != "tflite":
        notes.append(f"--localise: {fmt.name} is not a TFLite file; layer-wise comparison covers TFLite files only")
        return None
    float_file, _ = ensure_export(model_path, "tflite", "fp32", cfg.export_missing, notes)
    n = min(cfg.localise_samples, len(inputs))
    x = np.ascontiguousarray(stages.x[:n].numpy().transpose(0, 2, 3, 1))
    start = time.perf_counter()
    result = localise(model_file, float_file, x, inputs[:n], kernels=target.kernels, rounding=rounding).to_dict()
    stages.seconds[f"localise_{target.name}"] = time.perf_counter() - start
    result["where"] = "this host (the target's kernel set in LiteRT, every tensor preserved)"
    return result


def _float_row(stages: Stages, target: Target, connection: Connection, runtime, model_path: Path,
               cfg: VerifyConfig, notes: list[str]) -> dict:
    fmt = formats.get_format(target.float_reference)
    model_file, manifest = ensure_export(model_path, fmt.name, "fp32", cfg.export_missing, notes)
    inputs = host_inputs(fmt, manifest, stages.x[:FLOAT_TIMING_IMAGES].numpy())
    result = connection.run(RunRequest(model_file, inputs, runtime.runner_arg, target.kernels, target.threads,
                                       timing_runs=cfg.timing_runs or target.timing_runs, warmup=target.warmup))
    ref = stages.float_logits[:FLOAT_TIMING_IMAGES]
    return {"format": fmt.name, "name": model_file.name, "sha256": manifest["file"]["sha256"],
            "bytes": manifest["file"]["bytes"], "latency": cmp.latency_summary(result.latency_ms),
            "peak_rss_mb": result.meta.get("peak_rss_mb"),
            "max_abs_logit_diff_vs_torch": float(np.abs(result.raw.reshape(ref.shape) - ref).max())}


def verify(model_path: Path, targets: list[Target], cfg: VerifyConfig) -> tuple[dict, DeviceError | None]:
    """The whole report (a plain dict, JSON-ready) and the device error that cut it short, if any."""
    for bits in cfg.bits:
        w, a = parse_bits(bits)
        if w is None:
            raise VerifyError(f"--bits {bits}: verify compares integer runs; fp32 is the float stage of every row")
    if cfg.rounding is not None and cfg.rounding not in ROUNDING.values():
        raise VerifyError(f"--rounding {cfg.rounding!r}: choose from {', '.join(ROUNDING.values())}")
    start = time.perf_counter()
    from ghnq_deploy.ghn.predict import load_predicted

    spec = load_predicted(model_path).spec
    images = load_images(cfg, spec.input_shape, spec.num_classes)
    stages = Stages(model_path, images)
    notes: list[str] = []
    rows: list[dict] = []
    error = None
    for target in targets:
        hint = stand_in_hint(target) if not (cfg.host or target.connection.host or cfg.emulator) else None
        if hint:
            notes.append(hint)
        target_rows, error = verify_target(stages, target, cfg, model_path, notes)
        rows.extend(target_rows)
        if error is not None:
            break
    report = {
        "format": REPORT_FORMAT, "version": 1, "complete": error is None,
        "error": None if error is None else str(error),
        "model": {"file": str(model_path), "sha256": sha256_file(model_path), "arch": spec.name},
        "images": {"description": images.description, "count": int(len(images.labels)), "sha256": images.sha256},
        "calibration": {"description": stages.calibration.description, "sha256": stages.calibration.sha256},
        "stages": ["float (torch, BN calibrated and folded)", "paper fake-quant (batch-statistics BN)",
                   "paper fake-quant (running-statistics BN: the gap chain's BN link)",
                   "target-scheme fake-quant (TFLite: the file's own encodings)", "integer simulator (TFLite files)",
                   "real fixed-point run"],
        "rows": rows, "notes": notes,
        "host": {"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version(),
                 "cpus": os.cpu_count()},
        "seconds": {**stages.seconds, "total": time.perf_counter() - start},
    }
    return report, error


def max_gap_exceeded(report: dict, max_gap: float) -> list[dict]:
    return [r for r in report["rows"] if r.get("delta_top1_pt") is not None and abs(r["delta_top1_pt"]) > max_gap]

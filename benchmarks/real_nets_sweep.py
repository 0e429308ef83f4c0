"""torchvision families through the whole chain at CIFAR size: import, predict, export, accuracy, size, latency.

For each model (3x32x32, 10 classes): import time, predict time (the shipped GHN-Q; a net with an op
type the checkpoint predates is reported as refused and exported with the builder's initialisation,
so the export columns still mean something and the accuracy column says n/a), export time of each
format, float top-1 (torch, BN calibrated + folded), tflite-int8 and onnx-int8 top-1 and their
top-1 agreement with torch, int8 / float size ratio, and LiteRT latency of the float and int8
files at 1 and 2 threads (batch 1, interleaved runs, median). Exports run in subprocesses (the
converters import TensorFlow; this process does not).

    python benchmarks/real_nets_sweep.py -o docs/results/real-nets                 # every family
    python benchmarks/real_nets_sweep.py --models resnet18,mobilenet_v2 --images 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("resnet18", "resnet34", "resnet50", "vgg11", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_small",
          "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
          "mnasnet0_5", "mnasnet1_0", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "squeezenet1_1", "googlenet",
          "densenet121", "regnet_x_400mf", "regnet_y_400mf")
FORMATS = ("onnx", "onnx-int8", "tflite", "tflite-int8")


def latency(float_file: Path, int8_file: Path, threads: int, runs: int) -> dict:
    """Median ms per image of the float and the int8 file, runs interleaved so drift hits both alike."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interps = {}
    for key, path in (("float", float_file), ("int8", int8_file)):
        it = Interpreter(model_path=str(path), num_threads=threads)
        it.allocate_tensors()
        d = it.get_input_details()[0]
        it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
        it.invoke()  # warm-up
        interps[key] = it
    times: dict[str, list[float]] = {k: [] for k in interps}
    for _ in range(runs):
        for key, it in interps.items():
            t = time.perf_counter()
            it.invoke()
            times[key].append(1000 * (time.perf_counter() - t))
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"float_ms": med["float"], "int8_ms": med["int8"], "speedup": med["float"] / med["int8"]}


def one_model(name: str, ws: Path, images: int, runs: int) -> dict:
    import torch

    from ghnq_deploy.arch.builder import build_model
    from ghnq_deploy.arch.importer import resolve_source, trace_model
    from ghnq_deploy.errors import UserError
    from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint
    from ghnq_deploy.ghn.predict import PredictedModel, predict, save_predicted

    row: dict = {"model": name}
    t = time.perf_counter()
    torch.manual_seed(0)
    try:
        spec = trace_model(resolve_source(f"torchvision:{name}", 10), name, (3, 32, 32), 10).spec
    except UserError as exc:
        row["error"] = f"import: {exc}"
        return row
    row["import_s"] = time.perf_counter() - t
    row["params"] = sum(v.numel() for k, v in build_model(spec).state_dict().items()
                        if "running" not in k and "num_batches" not in k)
    ghn, info = load_ghn_checkpoint("default")
    t = time.perf_counter()
    try:
        pm = predict(ghn, [spec], ghn_info=info)[0]
        row["predict_s"] = time.perf_counter() - t
        row["params_from"] = "GHN-Q (shipped default)"
    except UserError as exc:
        row["predict_refused"] = str(exc)
        pm = PredictedModel(spec, build_model(spec, seed=0).state_dict(), {"note": "builder initialisation"})
        row["params_from"] = "builder init (the shipped GHN refuses the net)"
    run = ws / name
    run.mkdir(parents=True, exist_ok=True)
    save_predicted(run / "model.pt", pm)
    env = {**os.environ, "GHNQ_WORKSPACE": str(ws), "OMP_NUM_THREADS": "1"}
    for fmt in FORMATS:
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "ghnq_deploy", "export", "--target", fmt, "-m", str(run),
                               "--eval-count", str(images)], env=env, capture_output=True, text=True)
        row[f"{fmt}_export_s"] = time.perf_counter() - t
        if done.returncode:
            row[f"{fmt}_error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
            continue
        m = json.loads((run / "export" / fmt / "manifest.json").read_text())
        ev = m.get("evaluation") or {}
        row[f"{fmt}_bytes"] = m["file"]["bytes"]
        row[f"{fmt}_top1"] = None if "top1" not in ev else 100 * ev["top1"]
        row[f"{fmt}_agreement"] = None if "top1_agreement_with_torch" not in ev else 100 * ev["top1_agreement_with_torch"]
        row["float_top1"] = None if "torch_float_top1" not in ev else 100 * ev["torch_float_top1"]
    if not row["params_from"].startswith("GHN-Q"):
        row["float_top1_note"] = "n/a: not GHN-predicted"
    for fam in ("tflite", "onnx"):
        if f"{fam}_bytes" in row and f"{fam}-int8_bytes" in row:
            row[f"{fam}_size_ratio"] = row[f"{fam}_bytes"] / row[f"{fam}-int8_bytes"]
    if "tflite_error" not in row and "tflite-int8_error" not in row:
        from ghnq_deploy.export import formats

        f = run / "export" / "tflite" / formats.get_format("tflite").file_name
        q = run / "export" / "tflite-int8" / formats.get_format("tflite-int8").file_name
        for threads in (1, 2):
            row[f"latency_{threads}t"] = latency(f, q, threads, runs)
    return row


def _fmt(v, spec: str = ".1f") -> str:
    return "—" if v is None else format(v, spec)


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| model | params | weights | import s | predict s | export s (onnx / onnx-int8 / tflite / "
             "tflite-int8) | float top-1 | tflite-int8 top-1 (agr.) | onnx-int8 top-1 (agr.) | int8 size ratio "
             "(tflite) | int8 speed-up 1t / 2t | load avg |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | — | — | — | — | {r['error']} | | | | | | |")
            continue
        exp = " / ".join(_fmt(r.get(f"{f}_export_s"), ".0f") if f"{f}_error" not in r else "failed" for f in FORMATS)
        ft = _fmt(r.get("float_top1")) if r["params_from"].startswith("GHN-Q") else "n/a: not GHN-predicted"
        lat = " / ".join(_fmt((r.get(f"latency_{t}t") or {}).get("speedup"), ".2f") + "×" for t in (1, 2))
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['params_from']} | {_fmt(r.get('import_s'))} | "
            f"{_fmt(r.get('predict_s'), '.2f')} | {exp} | {ft} | {_fmt(r.get('tflite-int8_top1'))} "
            f"({_fmt(r.get('tflite-int8_agreement'))}) | {_fmt(r.get('onnx-int8_top1'))} "
            f"({_fmt(r.get('onnx-int8_agreement'))}) | {_fmt(r.get('tflite_size_ratio'), '.2f')} | {lat} | "
            f"{_fmt(r.get('load_average_1min'), '.1f')} |")
    errors = [f"- {r['model']}: {k}: {v}" for r in rows for k, v in r.items() if k.endswith("_error")]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--images", type=int, default=500, help="evaluation images per export")
    parser.add_argument("--runs", type=int, default=30, help="timed invocations per file and thread count")
    parser.add_argument("-o", "--output", type=Path, default=None)
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in OUTPUT/sweep.json and skip their models")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from ghnq_deploy.io import atomic_write_text

    rows: list[dict] = []
    if args.resume and args.output and (args.output / "sweep.json").exists():
        rows = json.loads((args.output / "sweep.json").read_text())["rows"]
    done = {r["model"] for r in rows}
    started = time.perf_counter()
    header = ""
    with tempfile.TemporaryDirectory() as ws:
        for name in [m.strip() for m in args.models.split(",") if m.strip() and m.strip() not in done]:
            t = time.perf_counter()
            row = one_model(name, Path(ws), args.images, args.runs)
            # latency under load is not the machine's: each row says how busy the CPUs were
            row["load_average_1min"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
            header = (f"torchvision at 3x32x32 / 10 classes: {len(rows)} models, {args.images} images of the "
                      f"shipped evaluation set (CIFAR-10 test (JPEG copy)), {os.cpu_count()} CPUs, "
                      f"this call {time.perf_counter() - started:.0f} s (last: {time.perf_counter() - t:.0f} s); "
                      "latency medians are batch 1, taken while the machine did other work: see each row's "
                      "load_average_1min")
            if args.output:
                args.output.mkdir(parents=True, exist_ok=True)
                atomic_write_text(args.output / "sweep.json", json.dumps({"header": header, "rows": rows}, indent=1))
                atomic_write_text(args.output / "sweep.md", markdown(rows, header))
    print(header)


if __name__ == "__main__":
    main()

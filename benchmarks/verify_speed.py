"""verify's wall time per stage against the bare runtime run, in the same process.

Predicts ResNet-20 into a temporary workspace, exports it (tflite-int8 and its float file; not
timed), then times, on the same images: the bare device-runner run of the int8 file through the
local connection (the runtime's own time), and a full ``verify`` of the x86-litert target
(float, paper sim, file-encoding target sim, real run, comparison, float file). Prints each
stage's seconds and its ratio to the bare runtime run.

    python benchmarks/verify_speed.py --images 2000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--timing-runs", type=int, default=20)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from ghnq_deploy.verify.connection import LocalConnection, RunRequest
    from ghnq_deploy.verify.pipeline import VerifyConfig, ensure_export, host_inputs, verify
    from ghnq_deploy.verify.target import get_target
    from ghnq_deploy.export import formats
    from ghnq_deploy.calibration import load_eval_set
    from ghnq_deploy.data import normalize

    with tempfile.TemporaryDirectory() as ws:
        env = {**os.environ, "GHNQ_WORKSPACE": ws}
        subprocess.run([sys.executable, "-c", "from ghnq_deploy.cli import main; main()", "predict",
                        str(ROOT / "examples" / "resnet20.json")], check=True, env=env, capture_output=True)
        model = next(Path(ws).glob("*/model.pt"))
        notes: list[str] = []
        for fmt in ("tflite-int8", "tflite"):
            ensure_export(model, fmt, "w8a8" if fmt == "tflite-int8" else "fp32", True, notes)
        target = get_target("x86-litert")
        file, manifest = ensure_export(model, "tflite-int8", "w8a8", False, notes)
        images = load_eval_set(None).subset(args.images)
        inputs = host_inputs(formats.get_format("tflite-int8"), manifest, normalize(images.images).numpy())
        start = time.perf_counter()
        LocalConnection().run(RunRequest(file, inputs, "litert", target.kernels, target.threads,
                                         timing_runs=args.timing_runs, warmup=target.warmup))
        bare = time.perf_counter() - start
        report, _ = verify(model, [target], VerifyConfig(devices=[target.name], limit_images=args.images,
                                                         timing_runs=args.timing_runs))
    print(f"ResNet-20, {args.images} images, {os.cpu_count()} CPUs, torch 1 thread")
    print(f"{'stage':40s} {'seconds':>8s} {'x bare runtime':>15s}")
    print(f"{'bare runtime run (device runner)':40s} {bare:8.2f} {1.0:15.2f}")
    for stage, seconds in report["seconds"].items():
        print(f"{stage:40s} {seconds:8.2f} {seconds / bare:15.2f}")


if __name__ == "__main__":
    main()

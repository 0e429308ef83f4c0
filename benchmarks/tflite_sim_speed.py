"""Simulator vs LiteRT on exported int8 files: agreement (LSB) and same-process speed ratios.

    PYTHONPATH=. python benchmarks/tflite_sim_speed.py [-n 2000] FILE.tflite ...

For each file: BUILTIN_REF and XNNPACK outputs, the simulator's integer (double rounding),
integer-xnnpack and fake-quant outputs, exact-match shares, max LSB difference, and wall
time of each, with the simulator / BUILTIN_REF time ratio (one thread each).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ghnq_deploy.calibration import load_eval_set
from ghnq_deploy.data import normalize
from ghnq_deploy.export.tflite import io_quantization
from ghnq_deploy.quant import tflite_sim
from ghnq_deploy.runtime import litert_runner


def _litert(path, q, resolver):
    it = litert_runner.make_interpreter(path, resolver, num_threads=1)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    raws = []
    for i in range(0, len(q), 256):
        chunk = q[i:i + 256]
        it.resize_tensor_input(inp["index"], list(chunk.shape))
        it.allocate_tensors()
        it.set_tensor(inp["index"], chunk)
        it.invoke()
        raws.append(it.get_tensor(out["index"]).astype(np.int64))
    return np.concatenate(raws)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+")
    parser.add_argument("-n", "--count", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = normalize(load_eval_set().images[:args.count]).numpy()
    for path in args.files:
        inp, _ = io_quantization(path)
        q = litert_runner.quantize(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), inp.scale, inp.zero_point)
        t = time.perf_counter()
        ref = _litert(path, q, "reference")
        t_ref = time.perf_counter() - t
        xnn = _litert(path, q, "xnnpack")
        row = [path.split("/")[-1], f"n={len(q)}", f"xnnpack==ref {np.mean(xnn == ref):.4f}"]
        for label, mode, rounding in (("int", "integer", "double"), ("int-xnn", "integer", "xnnpack"),
                                      ("fq", "fake-quant", "double")):
            t = time.perf_counter()
            out = tflite_sim.simulate(path, q, mode, rounding).astype(np.int64)
            dt = time.perf_counter() - t
            d_ref, d_xnn = np.abs(out - ref), np.abs(out - xnn)
            row.append(f"{label}: ==ref {np.mean(d_ref == 0):.4f} (max {d_ref.max()}, <=1 {np.mean(d_ref <= 1):.4f}) "
                       f"==xnn {np.mean(d_xnn == 0):.4f} (max {d_xnn.max()}) time/ref {dt / t_ref:.2f}")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()

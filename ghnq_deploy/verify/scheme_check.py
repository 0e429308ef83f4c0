"""Does the exported file use the integer scheme the target's kernels declare?

Read from the file itself: weight granularity and symmetry, the weight integer range,
per-tensor activation encodings of the declared width, int32 biases at ``s_in * s_w``, and
the ops whose output must keep its input's scale. A mismatch is reported (a list of
findings), not raised: the numbers of the run are still worth seeing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ghnq_deploy.verify.target import Scheme

# target-file op names -> TFLite builtins whose output shares its input's scale
_TFLITE_SHARED = {"concat": "CONCATENATION", "maxpool": "MAX_POOL_2D", "avgpool": "AVERAGE_POOL_2D",
                  "reshape": "RESHAPE"}
_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _finding(rule: str, ok: bool, detail: str) -> dict:
    return {"rule": rule, "ok": bool(ok), "detail": detail}


def _weights(rows: list[dict], scheme: Scheme) -> list[dict]:
    out = []
    per_channel = all(len(r["scales"]) > 1 or r["shape"][r.get("axis", 0) or 0] == 1 for r in rows)
    symmetric = all(not any(r["zero_points"]) for r in rows)
    lo = min((r["min"] for r in rows if r.get("min") is not None), default=0)
    hi = max((r["max"] for r in rows if r.get("max") is not None), default=0)
    want_pc = scheme.weights.startswith("per-channel")
    out.append(_finding("weights granularity", per_channel == want_pc,
                        f"{'per-channel' if per_channel else 'per-tensor'} in the file, {scheme.weights} declared"))
    if scheme.weights.endswith("-symmetric"):
        out.append(_finding("weights symmetric", symmetric, "all weight zero points 0" if symmetric
                            else "some weight zero point is not 0"))
    out.append(_finding("weight range", scheme.weight_range[0] <= lo and hi <= scheme.weight_range[1],
                        f"weights use [{lo}, {hi}], declared [{scheme.weight_range[0]}, {scheme.weight_range[1]}]"))
    return out


def check_tflite(path: Path, scheme: Scheme) -> list[dict]:
    from ghnq_deploy.export.tflite import weighted_ops
    from ghnq_deploy.runtime.litert_runner import make_interpreter

    ops = weighted_ops(path)
    findings = _weights([op["weight"] for op in ops], scheme)
    biases = [op for op in ops if op["bias"] is not None]
    bias_ok = all(op["bias"]["dtype"] == scheme.bias for op in biases)
    scale_ok = all(np.allclose(np.asarray(op["bias"]["scales"]),
                               op["input"]["scales"][0] * np.asarray(op["weight"]["scales"]), rtol=1e-5)
                   for op in biases)
    findings.append(_finding("bias", bias_ok and scale_ok, f"{len(biases)} biases {scheme.bias} at s_in*s_w: "
                             f"types {'ok' if bias_ok else 'differ'}, scales {'ok' if scale_ok else 'differ'}"))
    interpreter = make_interpreter(path, resolver="reference")
    constants = {op["weight"]["name"] for op in ops} | {op["bias"]["name"] for op in biases}
    acts = [d for d in interpreter.get_tensor_details()  # quantized non-constant tensors (shapes, paddings are plain ints)
            if d["name"] not in constants and len(d["quantization_parameters"]["scales"])]
    bad = [d["name"] for d in acts
           if len(d["quantization_parameters"]["scales"]) > 1 or np.dtype(d["dtype"]).itemsize * 8
           != scheme.activation_bits]
    findings.append(_finding("activations", not bad, f"{len(acts)} activation tensors per-tensor "
                             f"int{scheme.activation_bits}" if not bad else f"not per-tensor int"
                             f"{scheme.activation_bits}: {bad[0]}"))
    if scheme.activations.endswith("-symmetric"):
        asym = [d["name"] for d in acts if any(d["quantization_parameters"]["zero_points"])]
        findings.append(_finding("activations symmetric", not asym, "zero points 0" if not asym
                                 else f"non-zero zero point: {asym[0]}"))
    details = {d["index"]: d["quantization"] for d in interpreter.get_tensor_details()}
    for name in scheme.shared_scales:
        builtin = _TFLITE_SHARED[name]
        seen = bad_ops = 0
        for op in interpreter._get_ops_details():
            if op["op_name"] != builtin:
                continue
            seen += 1
            out = details[int(op["outputs"][0])]
            ins = [details[int(i)] for i in op["inputs"] if int(i) >= 0 and int(i) in details]
            ins = ins if builtin == "CONCATENATION" else ins[:1]  # RESHAPE's second input is its shape
            if any(not np.isclose(i[0], out[0], rtol=1e-6) or i[1] != out[1] for i in ins):
                bad_ops += 1
        findings.append(_finding(f"shared scale: {name}", bad_ops == 0,
                                 f"{seen} {builtin} ops, {bad_ops} with an output scale unlike their input's"))
    return findings


def check_onnx(path: Path, scheme: Scheme) -> list[dict]:
    import onnx
    from onnx import numpy_helper

    from ghnq_deploy.export.onnx import weight_quantization

    rows = weight_quantization(path)
    findings = _weights([r for r in rows if r["dtype"] == "int8"], scheme)
    biases = [r for r in rows if r["dtype"] != "int8"]
    findings.append(_finding("bias", all(r["dtype"] == scheme.bias for r in biases),
                             f"{len(biases)} biases: {sorted({r['dtype'] for r in biases})}"))
    graph = onnx.load(str(path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    q = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    bad = [n.output[0] for n in q if n.input[1] in init and init[n.input[1]].size > 1
           or (len(n.input) > 2 and n.input[2] in init and init[n.input[2]].dtype.itemsize * 8 != scheme.activation_bits)]
    findings.append(_finding("activations", not bad, f"{len(q)} QuantizeLinear per-tensor int{scheme.activation_bits}"
                             if not bad else f"not per-tensor int{scheme.activation_bits}: {bad[0]}"))
    return findings


_CHECKS = {"tflite": check_tflite, "onnx": check_onnx}


def check_file(format_name: str, path: Path, scheme: Scheme) -> dict:
    from ghnq_deploy.export.formats import get_format

    findings = _CHECKS[get_format(format_name).family](Path(path), scheme)
    return {"ok": all(f["ok"] for f in findings), "rounding_declared": scheme.rounding, "findings": findings}

"""Throw many generated bad inputs at the CLI in-process and count tracebacks.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/fuzz_cli.py --count 2500 --seed 0

Each input is a command line (with files written to a scratch folder): malformed arch.json
bytes, checkpoints, model.pt, calibration files, out-of-range options, bad output paths.
A run ends as exit 0, or exit 2 with one ``error:`` line, or it is a *traceback* (any other
exception out of ``main()``, or a non-0/2 exit, or more than one stderr line): those are
printed with their command line and counted.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hard_edges_helpers import invoke  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOOD = json.loads((ROOT / "examples" / "bnfree_cnn.json").read_text())
CKPT = (ROOT / "ghnq_deploy" / "checkpoints" / "ghnq-cifar10.pt").read_bytes()
WEIRD_NUMBERS = ["0", "-1", "-5", "nan", "inf", "-inf", "1e308", "1" + "0" * 30, "abc", "", "2", "0.5", "-0"]


def _torch(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def arch_bytes(rng: random.Random) -> bytes:
    kind = rng.randrange(9)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
    if kind == 1:
        return json.dumps(GOOD).encode(rng.choice(["utf-16", "utf-32", "latin-1"]))
    if kind == 2:
        raw = bytearray(json.dumps(GOOD).encode())
        raw[rng.randrange(len(raw))] = rng.randrange(128, 256)
        return bytes(raw)
    if kind == 3:
        depth = rng.randrange(50, 5000)
        return b"[" * depth + b"]" * depth
    if kind == 4:
        return json.dumps({**GOOD, "num_classes": 1}).replace("1", "9" * rng.randrange(4000, 6000), 1).encode()
    if kind == 5:
        name = rng.choice(["\ud800", "a\x00b", "a" * rng.randrange(101, 400), "a/b", ".x", "-x", "é", " ", "a b"])
        return json.dumps({**GOOD, "name": name}).encode()
    if kind == 6:
        doc = json.loads(json.dumps(GOOD))
        node = rng.choice(doc["nodes"])
        node[rng.choice(["op", "inputs", "attributes", "id"])] = rng.choice([None, 1, "x", [], {}, [1], 1e400])
        return json.dumps(doc).encode()
    if kind == 7:
        doc = json.loads(json.dumps(GOOD))
        doc[rng.choice(["input_shape", "num_classes", "nodes"])] = rng.choice(
            [[0, 1, 1], [3, 10**9, 10**9], -1, True, [], None, [3, 32], "x"])
        return json.dumps(doc).encode()
    return json.dumps(GOOD).encode()[: rng.randrange(len(json.dumps(GOOD)))]


def checkpoint_bytes(rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if kind == 1:
        return CKPT[: rng.randrange(len(CKPT))]
    if kind == 2:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr(rng.choice(["a/data.pkl", "a/version", "x"]), b"junk")
        return buffer.getvalue()
    data = torch.load(io.BytesIO(CKPT), weights_only=True)
    if kind == 3:
        data[rng.choice(["config", "state_dict", "format", "version"])] = rng.choice(["x", 1, None, [], {}, 2])
    elif kind == 4:
        name = rng.choice(sorted(data["state_dict"]))
        data["state_dict"][name] = data["state_dict"][name].float().fill_(float("nan"))
    elif kind == 5:
        data["config"] = {**data["config"], rng.choice(list(data["config"])): rng.choice([-1, 0, "x", None, 10**9])}
    else:
        return _torch(rng.choice([1, "x", [1, 2], {"ghn": 1, "optimizer": 2}, {"format": "ghnq-deploy/ghn-q"}]))
    return _torch(data)


def npz_bytes(rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    buffer = io.BytesIO()
    if kind == 0:
        return b"a,b,c\n1,2,3\n"
    if kind == 1:
        np.save(buffer, np.zeros((4, 32, 32, 3), np.uint8))
    elif kind == 2:
        np.savez(buffer, x=rng.choice([np.zeros((4, 32, 32, 3), np.float32), np.zeros(3), np.array("s")]))
    elif kind == 3:
        np.savez(buffer, x=np.arange(4 * 32 * 32 * 3, dtype=np.uint8).reshape(4, 32, 32, 3),
                 y=rng.choice([np.array([1, 2]), np.array([-1, 0, 1, 99]), np.zeros((4, 2))]),
                 meta=np.array(rng.choice(["{", "[1]", "{}"])))
    else:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(100)))
    return buffer.getvalue()


def command(rng: random.Random, tmp: Path) -> list[str]:
    kind = rng.randrange(8)
    spec = ROOT / "examples" / "bnfree_cnn.json"
    if kind == 0:
        path = tmp / "a.json"
        path.write_bytes(arch_bytes(rng))
        return [*rng.choice([["arch", "show"], ["arch", "validate"], ["predict", "--workspace", str(tmp / "ws")]]),
                str(path)]
    if kind == 1:
        path = tmp / "c.pt"
        path.write_bytes(checkpoint_bytes(rng))
        return rng.choice([["predict", str(spec), "--checkpoint", str(path), "--workspace", str(tmp / "ws")],
                           ["evaluate", str(spec), "--checkpoint", str(path), "--limit-images", "8"],
                           ["train", "--init-from", str(path), "--steps", "1", "-o", str(tmp / "r")]])
    if kind == 2:
        run = tmp / "run"
        run.mkdir(exist_ok=True)
        (run / "model.pt").write_bytes(rng.choice([b"", checkpoint_bytes(rng)]))
        return ["export", "--target", rng.choice(["onnx", "tflite-int8"]), "--model", str(run), "--no-eval"]
    if kind == 3:
        path = tmp / "s.npz"
        path.write_bytes(npz_bytes(rng))
        return rng.choice([["calibration", "check", str(path)]])
    if kind == 4:
        run = tmp / "t"
        run.mkdir(exist_ok=True)
        (run / "last.pt").write_bytes(checkpoint_bytes(rng))
        return ["train", "--resume", "-o", str(run), "--steps", "1"]
    if kind == 5:
        option = rng.choice([("predict", str(spec), "--meta-batch"), ("train", "--batch-size"), ("train", "--lr"),
                             ("train", "--epochs"), ("train", "--steps"), ("train", "--lr-decay-at"),
                             ("train", "--loss-cap"), ("train", "--max-minutes"), ("train", "--device"),
                             ("train", "--weight-decay"), ("train", "--seed"), ("calibration", "build", "-o",
                             str(tmp / "x.npz"), "--seed"), ("arch", "sample", "--split", "id-test", "-o",
                             str(tmp / "o"), "-n"), ("evaluate", str(spec), "-n"), ("export", "--target", "onnx",
                             "--parity-tolerance")])
        return [*option, rng.choice(WEIRD_NUMBERS)] + (["-o", str(tmp / "r")] if option[0] == "train" else [])
    if kind == 6:
        return rng.choice([["predict", str(spec), "-o", "/etc"], ["predict", str(spec), "--workspace", "/etc/hostname"],
                           ["export", "--target", "onnx", "-o", "/etc/hostname"], ["arch", "sample", "--split",
                           "id-test", "-o", "/etc/hostname"], ["predict", str(spec), "-o", "/proc/x/y.pt"],
                           ["calibration", "build", "-o", "/etc"]])
    return rng.choice([["export"], ["arch", "sample", "-n", "abc"], ["predict"], ["nosuch"], ["train", "--qat-bits", ""],
                       ["predict", str(spec), "--bits", "w9a9"], ["export", "--target", "nope"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    bad = 0
    start = time.perf_counter()
    for i in range(args.count):
        with tempfile.TemporaryDirectory() as folder:
            argv = command(rng, Path(folder))
            try:
                result = invoke(*argv)
            except Exception:  # noqa: BLE001 - exactly what is being counted
                bad += 1
                print(f"[{i}] TRACEBACK {argv[:6]}\n{traceback.format_exc(limit=-3)}", flush=True)
                continue
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            if result.code not in (0, 2) or (result.code == 2 and (len(lines) != 1 or not lines[0].startswith("error:"))):
                bad += 1
                print(f"[{i}] BAD EXIT {result.code} {argv[:6]}\n{result.stderr[-800:]}", flush=True)
    print(f"{args.count} inputs, {bad} tracebacks / malformed errors, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

"""Generated checkpoints, predicted models and calibration files: bad ones are one ``error:`` line.

Every file input of every command that reads it: ``predict --checkpoint``, ``evaluate
--checkpoint``, ``train --init-from`` / ``--resume`` (last.pt), ``export`` / ``evaluate`` of a
``model.pt``, ``export --calibration`` / ``calibration check``. Inputs are drawn by hypothesis:
random bytes, truncations of real files, zips of the wrong content, and torch files of every
wrong structure (strings for dicts, NaN tensors, unknown format versions).
"""

from __future__ import annotations

import functools
import io
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghnq_deploy.ghn.checkpoint import SHIPPED, SHIPPED_DIR, CheckpointError, read_checkpoint
from hard_edges_helpers import assert_one_error_line, invoke

pytestmark = pytest.mark.usefixtures("torch_one_thread")
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REAL_CKPT = (SHIPPED_DIR / SHIPPED["default"]).read_bytes()
TINY_SPEC = EXAMPLES / "bnfree_cnn.json"


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _real() -> dict:
    return torch.load(io.BytesIO(REAL_CKPT), weights_only=True)


def _mutate(kind: str, value) -> bytes:
    data = _real()
    if kind == "config":
        data["config"] = value
    elif kind == "version":
        data["version"] = value
    elif kind == "format":
        data["format"] = value
    elif kind == "state_dict":
        data["state_dict"] = value
    elif kind == "nan":
        name = sorted(data["state_dict"])[value % len(data["state_dict"])]
        tensor = data["state_dict"][name].clone()
        if not tensor.is_floating_point() or tensor.numel() == 0:
            tensor = torch.zeros(3)
        tensor.view(-1)[value % tensor.numel()] = float("nan") if value % 2 else float("inf")
        data["state_dict"][name] = tensor
    elif kind == "drop":
        name = sorted(data["state_dict"])[value % len(data["state_dict"])]
        del data["state_dict"][name]
    return _torch_bytes(data)


json_like = st.recursive(st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats() | st.text(max_size=5),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                     max_size=3), max_leaves=6)


def _zip_of(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


bad_checkpoint = st.one_of(
    st.binary(max_size=64),
    st.integers(0, len(REAL_CKPT) - 1).map(lambda n: REAL_CKPT[:n]),  # truncated anywhere
    st.dictionaries(st.sampled_from(["archive/data.pkl", "archive/version", "x/y", "data.pkl"]),
                    st.binary(max_size=40), max_size=3).map(_zip_of),
    json_like.map(_torch_bytes),  # a torch file that is not a dict of the right kind
    st.tuples(st.sampled_from(["config", "version", "format", "state_dict"]), json_like).map(lambda a: _mutate(*a)),
    st.tuples(st.just("version"), st.sampled_from([0, 2, 99, "1", None])).map(lambda a: _mutate(*a)),
    st.tuples(st.sampled_from(["nan", "drop"]), st.integers(0, 10**6)).map(lambda a: _mutate(*a)),
)


def _commands(path: Path, tmp: Path) -> list[list[str]]:
    return [
        ["predict", str(TINY_SPEC), "--checkpoint", str(path), "--workspace", str(tmp / "ws")],
        ["evaluate", str(TINY_SPEC), "--checkpoint", str(path), "--limit-images", "8", "--threads", "1"],
        ["train", "--init-from", str(path), "--steps", "1", "--output", str(tmp / "run"), "--train-images", "32"],
    ]


@FUZZ
@given(raw=bad_checkpoint, which=st.integers(0, 2))
def test_bad_checkpoints_are_one_error_line(tmp_path_factory, raw: bytes, which: int):
    tmp = tmp_path_factory.mktemp("ckpt")
    path = tmp / "bad.pt"
    path.write_bytes(raw)
    try:
        read_checkpoint(path)
    except CheckpointError:
        pass
    else:  # a drawn mutation that is still a valid checkpoint (e.g. a harmless extra config key)
        return
    assert_one_error_line(invoke(*_commands(path, tmp)[which]))
    assert not (tmp / "ws").exists() and not (tmp / "run").exists()  # refused before writing anything


@FUZZ
@given(raw=bad_checkpoint)
def test_bad_last_pt_is_refused_by_resume(tmp_path_factory, raw: bytes):
    run = tmp_path_factory.mktemp("resume")
    (run / "last.pt").write_bytes(raw)
    result = invoke("train", "--resume", "--output", str(run), "--steps", "1", "--train-images", "32")
    assert_one_error_line(result)



@functools.lru_cache(maxsize=1)
def predicted_model() -> bytes:
    """A real predicted model.pt of the BN-free example (made once per session)."""
    with tempfile.TemporaryDirectory() as folder:
        result = invoke("predict", str(TINY_SPEC), "--output", str(Path(folder) / "model.pt"))
        assert result.code == 0, result.stderr
        return (Path(folder) / "model.pt").read_bytes()


def _model_variant(good: bytes, kind: int, value) -> bytes:
    data = torch.load(io.BytesIO(good), weights_only=True)
    if kind == 0:
        return good[: (value if isinstance(value, int) else 1000) % len(good)]
    if kind == 1:
        data["spec"] = value
    elif kind == 2:
        data["state_dict"] = value
    elif kind == 3:
        data["version"] = value if value != 1 else 2
    elif kind == 4:
        name = sorted(data["state_dict"])[0]
        data["state_dict"][name] = data["state_dict"][name].clone().fill_(float("nan"))
    elif kind == 5:
        data["meta"] = value if not isinstance(value, dict) else "x"
    return _torch_bytes(data)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(kind=st.integers(-1, 5), value=json_like | st.integers(0, 10**7),
       command=st.sampled_from(["onnx", "tflite-int8", "verify", "finetune"]))
def test_bad_model_pt_is_one_error_line(tmp_path_factory, kind: int, value, command: str):
    """Every command that reads a model.pt: export (two formats), verify and finetune."""
    run = tmp_path_factory.mktemp("run")
    raw = b"" if kind == -1 else _model_variant(predicted_model(), kind, value)
    (run / "model.pt").write_bytes(raw)
    args = {"verify": ["verify", "--model", str(run), "-d", "x86-litert", "--limit-images", "8"],
            "finetune": ["finetune", "--model", str(run), "--steps", "1", "--train-images", "32", "--threads", "1",
                         "-o", str(run / "finetune")]}.get(
        command, ["export", "--target", command, "--model", str(run), "--no-eval"])
    assert_one_error_line(invoke(*args))
    assert not (run / "export").exists() and not (run / "verify").exists()
    assert not (run / "finetune" / "model.pt").exists()


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


arrays = st.one_of(
    st.just(np.zeros((4, 32, 32, 3), np.float32)), st.just(np.zeros((2, 2), np.uint8)),
    st.integers(0, 5).map(lambda n: np.arange(n * 32 * 32 * 3, dtype=np.uint8).reshape(n, 32, 32, 3)),
    st.just(np.array(["a", "b"])), st.just(np.array(3)),
)
bad_image_set = st.one_of(
    st.binary(max_size=200),
    st.lists(st.lists(st.integers(0, 255).map(str), min_size=2, max_size=5).map(",".join), max_size=5)
      .map(lambda rows: "\n".join(rows).encode()),  # a CSV renamed .npz
    arrays.map(_npy),  # an .npy renamed .npz
    st.builds(lambda x, y: _npz(x=x, y=y), arrays, arrays),
    st.builds(lambda y: _npz(y=y), arrays),
    st.builds(lambda x, m: _npz(x=x, meta=np.array(m)), st.just(np.zeros((4, 32, 32, 3), np.uint8)),
              st.sampled_from(["not json", "[1, 2]", "3", "{"])),
    st.just(_zip_of({"x.npy": b"garbage"})),
)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(raw=bad_image_set)
def test_bad_calibration_files_are_one_error_line(tmp_path_factory, raw: bytes):
    path = tmp_path_factory.mktemp("cal") / "set.npz"
    path.write_bytes(raw)
    assert_one_error_line(invoke("calibration", "check", str(path)))


@pytest.mark.parametrize(("raw", "needle"), [
    (b"a,b,c\n1,2,3\n", "looks like CSV; expected an .npz archive"),
    (_npy(np.zeros((2, 32, 32, 3), np.uint8)), "a single .npy array (np.save), not an .npz archive"),
    (b"", "an empty file"),
])
def test_calibration_file_kinds_are_named(tmp_path, raw: bytes, needle: str):
    path = tmp_path / "set.npz"
    path.write_bytes(raw)
    assert_one_error_line(invoke("calibration", "check", str(path)), contains=needle)


def test_weights_only_refusal_is_said_in_full(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    line = assert_one_error_line(invoke("predict", str(TINY_SPEC), "--checkpoint", str(path)))
    assert "Unsupported global: GLOBAL builtins.print" in line or "GLOBAL print" in line
    assert line.rstrip().endswith("(tensors, numbers, strings, lists, dicts))"), line
    assert "\x1b" not in line


def test_nan_checkpoint_and_unknown_version_are_refused(tmp_path):
    nan = tmp_path / "nan.pt"
    nan.write_bytes(_mutate("nan", 1))
    assert_one_error_line(invoke("predict", str(TINY_SPEC), "--checkpoint", str(nan)), contains="NaN or infinite")
    newer = tmp_path / "v2.pt"
    newer.write_bytes(_mutate("version", 2))
    assert_one_error_line(invoke("predict", str(TINY_SPEC), "--checkpoint", str(newer)),
                          contains="format version 2 is not one this release reads")

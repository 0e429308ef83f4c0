"""Target files: the shipped ones load, every field has its effect, every malformed file is one line."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ghnq_deploy.verify import target as tg
from ghnq_deploy.verify.pipeline import VerifyConfig, VerifyError, connection_for, stand_in_hint
from ghnq_deploy.verify.connection import EmulatorConnection, LocalConnection, SSHConnection

SHIPPED = sorted(tg.SHIPPED_DIR.glob("*.toml"))


def _doc(name: str = "rpi4") -> dict:
    return tomllib.loads((tg.SHIPPED_DIR / f"{name}.toml").read_text())


def _dump(data: dict) -> str:
    """A tiny TOML writer for the flat tables target files use."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)
    top = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
              for k, v in data.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


def _write(tmp_path: Path, data: dict, name: str = "t.toml") -> Path:
    path = tmp_path / name
    path.write_text(_dump(data))
    return path


def test_shipped_targets_load_with_the_issue_fields():
    targets = tg.load_targets()
    assert {"x86-litert", "litert-ref", "onnxruntime-cpu", "rpi4"} <= set(targets)
    assert targets["litert-ref"].kernels == "reference" and targets["x86-litert"].kernels == "xnnpack"
    assert targets["onnxruntime-cpu"].consumes == ("onnx-int8",)
    rpi = targets["rpi4"]
    assert (rpi.arch, rpi.threads, rpi.runtime, rpi.kernels) == ("aarch64", 4, "tflite-auto", "xnnpack")
    assert rpi.connection.host == "" and rpi.emulation.cpu == "cortex-a72"
    assert rpi.scheme.weights == "per-channel-symmetric" and rpi.scheme.weight_range == (-127, 127)
    assert len(SHIPPED) == len(targets)


def test_dump_round_trips_the_shipped_files(tmp_path):
    for path in SHIPPED:
        data = tomllib.loads(path.read_text())
        again = tg.load_target_file(_write(tmp_path, data))
        assert again.to_dict() | {"source": ""} == tg.load_target_file(path).to_dict() | {"source": ""}


def _mutations():
    """(description, mutate(doc), text that the one-line error must contain)."""
    def drop(*keys):
        def f(d):
            t = d
            for k in keys[:-1]:
                t = t[k]
            del t[keys[-1]]
        return f

    def put(value, *keys):
        def f(d):
            t = d
            for k in keys[:-1]:
                t = t[k]
            t[keys[-1]] = value
        return f

    cases = []
    for key in ("name", "description", "runtime", "kernels", "arch", "threads", "consumes", "scheme"):
        cases.append((f"missing {key}", drop(key), f"field {key}: required"))
    for key in ("weights", "weight_range", "activations", "activation_bits", "bias", "rounding", "shared_scales"):
        cases.append((f"missing scheme.{key}", drop("scheme", key), f"field scheme.{key}: required"))
    cases += [
        ("unknown top field", put(1, "colour"), "field colour: unknown field"),
        ("unknown scheme field", put("x", "scheme", "roundng"), "field scheme.roundng: unknown field"),
        ("unknown connection field", put("x", "connection", "password"), "field connection.password: unknown field"),
        ("threads as text", put("4", "threads"), "field threads: must be int"),
        ("threads bool", put(True, "threads"), "field threads: must be int"),
        ("threads zero", put(0, "threads"), "field threads: must be in"),
        ("unknown runtime", put("tensorrt", "runtime"), "field runtime: 'tensorrt' is not one of"),
        ("kernels of another runtime", put("default", "kernels"), "field kernels:"),
        ("float format consumed", put(["tflite"], "consumes"), "field consumes:"),
        ("onnx consumed by a tflite runtime", put(["onnx-int8"], "consumes"), "field consumes: onnx-int8 is a onnx file"),
        ("no consumed format", put([], "consumes"), "field consumes: must name"),
        ("bad float reference", put("tflite-int8", "float_reference"), "field float_reference:"),
        ("bits without w8a8", put(["w4a8"], "bits"), "field bits: must include w8a8"),
        ("unknown bits", put(["w8a8", "w3a3"], "bits"), "field bits:"),
        ("bad name", put("Pi 4/x", "name"), "field name:"),
        ("weight range reversed", put([127, -127], "scheme", "weight_range"), "field scheme.weight_range:"),
        ("unknown rounding", put("stochastic", "scheme", "rounding"), "field scheme.rounding:"),
        ("port out of range", put(70000, "connection", "port"), "field connection.port:"),
        ("emulation arch differs", put("riscv64", "emulation", "arch"), "field emulation.arch:"),
        ("unknown emulator", put("vmware", "emulation", "kind"), "field emulation.kind:"),
        ("scheme not a table", put("int8", "scheme"), "field scheme: must be dict"),
        ("repeated consumes", put(["tflite-int8", "tflite-int8"], "consumes"), "field consumes: has repeated"),
    ]
    return cases


@pytest.mark.parametrize("what,mutate,expect", _mutations(), ids=[c[0] for c in _mutations()])
def test_malformed_target_is_one_line_naming_file_and_field(tmp_path, what, mutate, expect):
    doc = _doc("rpi4")
    mutate(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(tg.TargetError) as info:
        tg.load_target_file(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and expect in message, message


@pytest.mark.parametrize("content", [b"\xff\xfe\x00n", b"name = ", b"[scheme\n", b"a = 1\na = 2\n"])
def test_unparsable_target_files(tmp_path, content):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(tg.TargetError, match=str(path)):
        tg.load_target_file(path)


def test_unknown_name_lists_known_targets_and_how_to_add():
    with pytest.raises(tg.TargetError, match=r"unknown target 'pi5'.*rpi4.*--target-file"):
        tg.get_target("pi5")


def test_user_targets_from_env_and_file_override_and_extend(tmp_path, monkeypatch):
    doc = _doc("x86-litert")
    doc.update(name="my-box", threads=2, label="my box")
    folder = tmp_path / "targets"
    folder.mkdir()
    _write(folder, doc, "mine.toml")
    monkeypatch.setenv(tg.ENV_VAR, str(folder))
    assert tg.get_target("my-box").threads == 2
    doc.update(threads=3)
    extra = _write(tmp_path, doc, "extra.toml")
    assert tg.get_target("my-box", [extra]).threads == 3  # --target-file wins over $GHNQ_TARGETS
    monkeypatch.setenv(tg.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(tg.TargetError, match="no such folder"):
        tg.load_targets()


def test_connection_choice_follows_the_target_fields(tmp_path):
    targets = tg.load_targets()
    conn, where = connection_for(targets["x86-litert"], VerifyConfig(devices=[]))
    assert isinstance(conn, LocalConnection) and where == "this host"
    conn, where = connection_for(targets["rpi4"], VerifyConfig(devices=[]))
    assert isinstance(conn, LocalConnection) and "stand-in for rpi4" in where
    assert "emulator setup rpi4" in stand_in_hint(targets["rpi4"])
    conn, where = connection_for(targets["rpi4"], VerifyConfig(devices=[], emulator="qemu"))
    assert isinstance(conn, EmulatorConnection) and "cortex-a72" in where
    conn, where = connection_for(targets["rpi4"], VerifyConfig(devices=[], host="pi@raspberrypi.local"))
    assert isinstance(conn, SSHConnection) and "SSH" in where
    doc = _doc("rpi4")
    key = tmp_path / "id_ed25519"
    key.write_text("not used: the connection is only built")
    doc["connection"].update(host="mypi", user="pi", port=2222, identity_file=str(key), python="/usr/bin/python3")
    configured = tg.load_target_file(_write(tmp_path, doc))
    conn, _ = connection_for(configured, VerifyConfig(devices=[]))
    assert isinstance(conn, SSHConnection) and "mypi" in conn.describe()
    with pytest.raises(VerifyError, match="declares no \\[emulation\\]"):
        connection_for(targets["x86-litert"], VerifyConfig(devices=[], emulator="qemu"))
    with pytest.raises(VerifyError, match="runs on this host"):
        connection_for(targets["x86-litert"], VerifyConfig(devices=[], host="pi@x"))

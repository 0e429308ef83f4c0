"""Generated arch.json files of every malformed kind: each is one ``error:`` line and exit 2.

Bytes, encodings, nesting, numbers and names are drawn by hypothesis and fed to every command
that reads an arch.json (``arch show``, ``arch validate``, ``predict``), through the real CLI
entry point in-process. A traceback escaping ``main()`` fails the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghnq_deploy.arch.spec import NAME_MAX, NAME_PATTERN, ArchError, check_name, decode_json
from hard_edges_helpers import assert_one_error_line, invoke

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
GOOD = json.loads((Path(__file__).parent.parent / "examples" / "resnet20.json").read_text())
COMMANDS = (("arch", "show"), ("arch", "validate"), ("predict", "--checkpoint", "default"))


def _spec_with_name(name) -> bytes:
    return json.dumps({**GOOD, "name": name}).encode()


def _deep(depth: int, opener: str) -> bytes:
    closer = {"[": "]", "{": "}"}[opener]
    if opener == "[":
        return ("[" * depth + "]" * depth).encode()
    return ('{"a":' * depth + "1" + closer * depth).encode()


malformed = st.one_of(
    st.binary(max_size=300),  # raw bytes: mostly invalid UTF-8 or invalid JSON
    st.text(max_size=80).map(lambda t: t.encode("utf-16")),  # another encoding
    st.text(max_size=40).map(lambda t: json.dumps(GOOD).encode()[:200] + b"\xff" + t.encode()),  # a stray byte
    st.builds(_deep, st.integers(65, 3000), st.sampled_from("[{")),  # deep nesting
    st.integers(4301, 6000).map(lambda n: json.dumps({**GOOD, "num_classes": 0}).replace("0", "9" * n, 1).encode()),
    st.sampled_from(["\ud800", "a\udfffb", "\udc80"]).map(
        lambda s: json.dumps({**GOOD, "name": s}).encode()),  # lone surrogates (json.dumps escapes them)
    st.text(min_size=1, max_size=NAME_MAX + 50).filter(lambda n: not NAME_PATTERN.fullmatch(n) or len(n) > NAME_MAX)
      .map(_spec_with_name),
    st.integers(NAME_MAX + 1, 5000).map(lambda n: _spec_with_name("a" * n)),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                 max_leaves=8).map(lambda v: json.dumps(v).encode()),
)


@FUZZ
@given(raw=malformed, command=st.sampled_from(COMMANDS))
def test_malformed_arch_files_are_one_error_line(tmp_path_factory, raw: bytes, command: tuple[str, ...]):
    path = tmp_path_factory.mktemp("arch") / "fuzz.json"
    path.write_bytes(raw)
    ws = path.parent / "ws"
    args = [*command, str(path)] + (["--workspace", str(ws)] if command[0] == "predict" else [])
    result = invoke(*args)
    assert_one_error_line(result)
    assert not ws.exists() or not any(ws.rglob("*.partial"))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(name=st.text(max_size=NAME_MAX + 20))
def test_every_accepted_name_is_a_portable_folder_name(tmp_path_factory, name: str):
    try:
        check_name(name, "n")
    except ArchError as exc:
        assert "\n" not in str(exc)
        return
    assert 1 <= len(name) <= NAME_MAX and name.isascii() and name[0].isalnum()
    assert "/" not in name and "\\" not in name and "\0" not in name
    folder = tmp_path_factory.mktemp("names") / name
    folder.mkdir()
    assert folder.is_dir()


@pytest.mark.parametrize(("raw", "needle"), [
    (b"\xef\xbb\xbf" + json.dumps(GOOD).encode(), None),
    ('{"a": 1}'.encode("utf-16"), "looks like UTF-16"),
    (b"[" * 200 + b"]" * 200, "nested deeper than 64"),
    (b'{"n": ' + b"7" * 5000 + b"}", "more than 4300 digits"),
    (b'{"name": "\\ud800"}', "lone UTF-16 surrogate"),
])
def test_decode_json_reasons(raw: bytes, needle: str | None):
    if needle is None:
        assert decode_json(raw, "f")["name"] == GOOD["name"]
        return
    with pytest.raises(ArchError, match=needle):
        decode_json(raw, "f")

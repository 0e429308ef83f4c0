"""Every arch.json validation rule: a failing example and its exact one-line message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ghnq_deploy.arch.spec import (
    DEFAULT_PARAM_CAP,
    OPS,
    ArchError,
    analyze,
    load_spec,
    parse_spec,
    save_spec,
    topological_order,
)
from ghnq_deploy.errors import UserError

SRC = "t.json"


def base() -> dict:
    """conv -> bn -> relu -> global pool -> linear: the smallest useful net."""
    return {
        "name": "t",
        "input_shape": [3, 8, 8],
        "num_classes": 10,
        "nodes": [
            {"id": "c1", "op": "conv", "inputs": ["input"], "attributes": {"out_channels": 8, "kernel": 3}},
            {"id": "b1", "op": "bn", "inputs": ["c1"]},
            {"id": "r1", "op": "relu", "inputs": ["b1"]},
            {"id": "gap", "op": "global_avgpool", "inputs": ["r1"]},
            {"id": "fc", "op": "linear", "inputs": ["gap"], "attributes": {"out_features": 10}},
            {"id": "output", "op": "output", "inputs": ["fc"]},
        ],
    }


def node(doc: dict, node_id: str) -> dict:
    return next(n for n in doc["nodes"] if n["id"] == node_id)


def check(doc: dict, param_cap: int = DEFAULT_PARAM_CAP):
    return analyze(parse_spec(doc, SRC), param_cap=param_cap)


def error_of(doc: dict, param_cap: int = DEFAULT_PARAM_CAP) -> str:
    with pytest.raises(ArchError) as info:
        check(doc, param_cap)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_base_spec_is_valid_with_exact_counts():
    info = check(base())
    assert info.order == ("c1", "b1", "r1", "gap", "fc", "output")
    assert info.nodes["c1"].shape == (8, 8, 8)
    assert info.nodes["gap"].shape == (8,)
    assert info.params == 3 * 8 * 9 + 2 * 8 + 8 * 10 + 10
    assert info.nodes["c1"].macs == 8 * 8 * 8 * 3 * 9
    assert issubclass(ArchError, UserError)


def test_dumps_round_trip_and_hash_are_stable(tmp_path: Path):
    spec = parse_spec(base(), SRC)
    path = tmp_path / "t.json"
    save_spec(spec, path)
    again = load_spec(path)
    assert again == spec
    assert again.dumps() == spec.dumps() == path.read_text()
    assert again.sha256() == spec.sha256()
    assert not list(tmp_path.glob("*.partial"))


# ----------------------------------------------------------------------------- the rules


def test_invalid_json_reports_line_and_column(tmp_path: Path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "name": "t",\n  "nodes": [1, 2,]\n}\n')
    with pytest.raises(ArchError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: invalid JSON at line 3, column 18: Expecting value"


def test_missing_file_is_one_line(tmp_path: Path):
    with pytest.raises(ArchError) as info:
        load_spec(tmp_path / "nope.json")
    assert str(info.value) == f"{tmp_path / 'nope.json'}: cannot read file (No such file or directory)"


def test_unknown_op():
    doc = base()
    node(doc, "r1")["op"] = "gelu"
    assert error_of(doc) == f"{SRC}: node 'r1': unknown op 'gelu'; known ops: {', '.join(OPS)}"


def test_unknown_attribute():
    doc = base()
    node(doc, "c1")["attributes"]["kernal"] = 3
    assert error_of(doc) == (f"{SRC}: node 'c1': unknown attribute 'kernal' for op 'conv' "
                             "(allowed: out_channels, kernel, stride, padding, dilation, groups, bias)")


def test_attribute_of_wrong_type_and_missing_required_attribute():
    doc = base()
    node(doc, "c1")["attributes"]["stride"] = 1.5
    assert error_of(doc) == f"{SRC}: node 'c1': attribute 'stride' must be int, got 1.5"
    doc = base()
    del node(doc, "fc")["attributes"]["out_features"]
    assert error_of(doc) == f"{SRC}: node 'fc': op 'linear' needs attribute 'out_features'"


def test_dangling_id():
    doc = base()
    node(doc, "r1")["inputs"] = ["b2"]
    assert error_of(doc) == f"{SRC}: node 'r1': input 'b2' does not exist (dangling reference)"


def test_duplicate_id():
    doc = base()
    doc["nodes"].insert(2, {"id": "b1", "op": "relu", "inputs": ["b1"]})
    assert error_of(doc) == f"{SRC}: node 'b1': duplicate id"


def test_cycle():
    doc = base()
    node(doc, "b1")["inputs"] = ["r1"]
    assert error_of(doc) == f"{SRC}: node 'b1': is part of a cycle"
    doc = base()
    node(doc, "r1")["inputs"] = ["r1"]
    assert error_of(doc) == f"{SRC}: node 'r1': node feeds itself (cycle)"


def test_no_path_to_output():
    doc = base()
    doc["nodes"].insert(3, {"id": "dead", "op": "relu", "inputs": ["c1"]})
    assert error_of(doc) == f"{SRC}: node 'dead': has no path to the output node"


def test_node_without_inputs():
    doc = base()
    node(doc, "r1")["inputs"] = []
    assert error_of(doc) == f"{SRC}: node 'r1': op 'relu' has no inputs (no path from the input)"


def test_add_channel_mismatch():
    doc = base()
    doc["nodes"][3:3] = [{"id": "sum", "op": "add", "inputs": ["r1", "input"]}]
    node(doc, "gap")["inputs"] = ["sum"]
    assert error_of(doc) == (f"{SRC}: node 'sum': add needs identical input shapes, "
                             "got [[8, 8, 8], [3, 8, 8]] (channel mismatch)")


def test_concat_spatial_mismatch():
    doc = base()
    doc["nodes"][3:3] = [
        {"id": "pool", "op": "maxpool", "inputs": ["input"]},
        {"id": "cat", "op": "concat", "inputs": ["r1", "pool"]},
    ]
    node(doc, "gap")["inputs"] = ["cat"]
    assert error_of(doc) == f"{SRC}: node 'cat': concat needs equal spatial sizes, got [[8, 8], [4, 4]]"


def test_groups_not_dividing():
    doc = base()
    node(doc, "c1")["attributes"]["groups"] = 2
    assert error_of(doc) == f"{SRC}: node 'c1': groups=2 does not divide in_channels=3 and out_channels=8"


def test_kernel_larger_than_input():
    doc = base()
    node(doc, "c1")["attributes"].update(kernel=11, padding=1)
    assert error_of(doc) == f"{SRC}: node 'c1': kernel 11 (dilation 1) is larger than the padded input 8x8"
    doc = base()
    node(doc, "c1")["attributes"].update(kernel=3, dilation=5)  # span 11 > 8 + 2*5? no: padding 5 makes it fit
    assert check(doc).nodes["c1"].shape == (8, 8, 8)
    node(doc, "c1")["attributes"]["padding"] = 0
    assert error_of(doc) == f"{SRC}: node 'c1': kernel 3 (dilation 5) is larger than the padded input 8x8"
    doc = base()
    doc["nodes"][3:3] = [{"id": "p", "op": "avgpool", "inputs": ["r1"], "attributes": {"kernel": 9}}]
    node(doc, "gap")["inputs"] = ["p"]
    assert error_of(doc) == f"{SRC}: node 'p': kernel 9 is larger than the padded input 8x8"


def test_param_cap():
    assert error_of(base(), param_cap=100) == f"{SRC}: 322 parameters exceed the cap of 100"
    doc = base()
    doc["input_shape"] = [3, 512, 512]
    doc["num_classes"] = 13
    doc["nodes"] = [
        {"id": "fc", "op": "linear", "inputs": ["input"], "attributes": {"out_features": 13}},
        {"id": "output", "op": "output", "inputs": ["fc"]},
    ]
    assert error_of(doc) == f"{SRC}: 10,223,629 parameters exceed the cap of 10,000,000"


def test_output_rules():
    doc = base()
    doc["num_classes"] = 7
    assert error_of(doc) == f"{SRC}: node 'output': output must be a vector of num_classes=7 logits, got shape (10,)"
    doc = base()
    doc["nodes"].append({"id": "output2", "op": "output", "inputs": ["fc"]})
    assert error_of(doc) == f"{SRC}: exactly one 'output' node is required, found 2"


def test_arity_and_rank_rules():
    doc = base()
    node(doc, "r1")["inputs"] = ["b1", "c1"]
    assert error_of(doc) == f"{SRC}: node 'r1': op 'relu' takes exactly one input, got 2"
    doc = base()
    doc["nodes"][3:3] = [{"id": "sum", "op": "add", "inputs": ["r1"]}]
    node(doc, "gap")["inputs"] = ["sum"]
    assert error_of(doc) == f"{SRC}: node 'sum': op 'add' needs at least two inputs"
    doc = base()
    node(doc, "fc")["op"] = "conv"
    node(doc, "fc")["attributes"] = {"out_channels": 10, "kernel": 1}
    assert error_of(doc) == f"{SRC}: node 'fc': op 'conv' needs a (C,H,W) feature map, got shape (8,)"


def test_attribute_value_rules():
    doc = base()
    node(doc, "c1")["attributes"]["stride"] = 0
    assert error_of(doc) == (f"{SRC}: node 'c1': out_channels, kernel, stride, dilation and groups must be >= 1, "
                             "padding >= 0")
    doc = base()
    node(doc, "b1")["attributes"] = {"eps": 0}
    assert error_of(doc) == f"{SRC}: node 'b1': eps must be a finite number > 0, got 0"
    doc = base()
    doc["nodes"][3:3] = [{"id": "p", "op": "maxpool", "inputs": ["r1"], "attributes": {"kernel": 2, "padding": 2}}]
    node(doc, "gap")["inputs"] = ["p"]
    assert error_of(doc) == f"{SRC}: node 'p': pool needs kernel >= 1, stride >= 1 and 0 <= padding <= kernel/2"
    node(doc, "p")["attributes"] = {"kernel": 2, "stride": 0}
    assert error_of(doc) == f"{SRC}: node 'p': pool needs kernel >= 1, stride >= 1 and 0 <= padding <= kernel/2"


def test_top_level_and_id_rules():
    doc = base()
    doc["extra"] = 1
    assert error_of(doc) == (f"{SRC}: unknown top-level key(s) ['extra']; "
                             "allowed: ['input_shape', 'name', 'nodes', 'num_classes']")
    doc = base()
    del doc["num_classes"]
    assert error_of(doc) == f"{SRC}: missing top-level key 'num_classes'"
    doc = base()
    doc["input_shape"] = [3, 0, 8]
    assert error_of(doc) == f"{SRC}: 'input_shape' must be [C, H, W] with positive integers"
    doc = base()
    node(doc, "r1")["id"] = "r1\n"
    assert error_of(doc) == f"{SRC}: nodes[2]: 'id' must match ^[A-Za-z_][A-Za-z0-9_]*$"
    doc = base()
    node(doc, "r1")["id"] = "input"
    assert error_of(doc) == f"{SRC}: node 'input': 'input' is reserved for the network input"
    doc = base()
    node(doc, "r1")["op"] = ["relu"]
    assert error_of(doc) == f"{SRC}: node 'r1': unknown op ['relu']; known ops: {', '.join(OPS)}"


def test_topological_order_is_file_order_among_ready_nodes():
    doc = base()
    doc["nodes"][3:3] = [
        {"id": "z", "op": "maxpool", "inputs": ["input"]},
        {"id": "a", "op": "maxpool", "inputs": ["r1"]},
        {"id": "cat", "op": "concat", "inputs": ["a", "z"]},
    ]
    node(doc, "gap")["inputs"] = ["cat"]
    expected = ("c1", "b1", "r1", "z", "a", "cat", "gap", "fc", "output")
    assert topological_order(parse_spec(doc, SRC)) == expected
    doc["nodes"].reverse()  # consumers listed before their inputs: still a valid order
    order = topological_order(parse_spec(doc, SRC))
    assert sorted(order) == sorted(expected) and order != expected
    for n in doc["nodes"]:
        assert all(order.index(i) < order.index(n["id"]) for i in n["inputs"] if i != "input")
    assert check(doc).nodes["cat"].shape == (11, 4, 4)


def test_examples_are_valid_and_canonical_json():
    for path in sorted(Path(__file__).parent.parent.joinpath("examples").glob("*.json")):
        spec = load_spec(path)
        info = analyze(spec)
        assert spec.num_classes == 10 and spec.input_shape == (3, 32, 32), path
        assert 0 < info.params < 3_000_000, path
        assert spec.name == path.stem
        assert json.loads(path.read_text()) == spec.to_dict()

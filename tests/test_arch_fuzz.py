"""Fuzzing the arch.json front end: whatever comes in, only ArchError (one line) comes out.

And where analyze() accepts a small spec, the builder must build it and every node's
output must have the inferred shape: shape inference and torch never disagree.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghnq_deploy.arch.builder import build_model
from ghnq_deploy.arch.spec import OP_ATTRIBUTES, OPS, ArchError, analyze, parse_spec

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.json"))
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BODY_OPS = ("conv", "bn", "relu", "maxpool", "avgpool", "add", "concat", "identity", "relu6") + OPS
ATTRIBUTE_NAMES = sorted({a for attrs in OP_ATTRIBUTES.values() for a in attrs})

json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
json_value = st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
small_value = st.one_of(
    st.integers(-2, 12), st.integers(-2, 12), st.booleans(), st.none(), st.floats(-1, 1e-3), st.just(10**9), json_leaf,
)


def check(doc: Any) -> None:
    """parse + analyze; on success of a small net, build it and compare every node's shape."""
    try:
        info = analyze(parse_spec(doc, "fuzz.json"))
    except ArchError as exc:
        assert "\n" not in str(exc)
        return
    if info.params > 200_000 or info.macs > 5_000_000:
        return
    spec = info.spec
    model = build_model(spec, seed=0).eval()
    seen: dict[str, tuple[int, ...]] = {}
    for node_id, module in model.layers.items():
        module.register_forward_hook(lambda m, i, o, node_id=node_id: seen.__setitem__(node_id, tuple(o.shape[1:])))
    with torch.no_grad():
        out = model(torch.zeros(1, *spec.input_shape))
    assert out.shape == (1, spec.num_classes)
    assert seen == {k: v.shape for k, v in info.nodes.items()}


SMALL_NETS: list[dict] = [
    {
        "name": "small", "input_shape": [2, 6, 6], "num_classes": 3,
        "nodes": [
            {"id": "c1", "op": "conv", "inputs": ["input"], "attributes": {"out_channels": 4, "kernel": 3}},
            {"id": "b1", "op": "bn", "inputs": ["c1"]},
            {"id": "r1", "op": "relu6", "inputs": ["b1"]},
            {"id": "d1", "op": "conv", "inputs": ["r1"], "attributes": {"out_channels": 4, "kernel": 3, "groups": 4}},
            {"id": "s1", "op": "add", "inputs": ["d1", "r1"]},
            {"id": "p1", "op": "maxpool", "inputs": ["s1"]},
            {"id": "p2", "op": "avgpool", "inputs": ["c1"], "attributes": {"kernel": 3, "stride": 2, "padding": 1}},
            {"id": "cat", "op": "concat", "inputs": ["p1", "p2"]},
            {"id": "fc1", "op": "linear", "inputs": ["cat"], "attributes": {"out_features": 5}},
            {"id": "i1", "op": "identity", "inputs": ["fc1"]},
            {"id": "fc2", "op": "linear", "inputs": ["i1"], "attributes": {"out_features": 3}},
            {"id": "output", "op": "output", "inputs": ["fc2"]},
        ],
    },
    {
        "name": "gap", "input_shape": [3, 5, 5], "num_classes": 2,
        "nodes": [
            {"id": "c", "op": "conv", "inputs": ["input"],
             "attributes": {"out_channels": 6, "kernel": 3, "dilation": 2, "bias": True}},
            {"id": "g", "op": "global_avgpool", "inputs": ["c"]},
            {"id": "f", "op": "linear", "inputs": ["g"], "attributes": {"out_features": 2}},
            {"id": "output", "op": "output", "inputs": ["f"]},
        ],
    },
] + [json.loads(p.read_text()) for p in EXAMPLES]


@FUZZ
@given(json_value)
def test_arbitrary_json_only_raises_arch_error(doc: Any):
    check(doc)


def typed_value(kind: type, junk: bool = True) -> st.SearchStrategy:
    """Well-typed small values (so graphs get past parsing); with ``junk``, sometimes anything."""
    good = {int: st.integers(-1, 9), bool: st.booleans(), float: st.floats(1e-6, 0.1)}[kind]
    return st.one_of(good, good, good, small_value) if junk else good


@st.composite
def graphs(draw: st.DrawFn) -> dict:
    """A chain-ish DAG of random ops: inputs drawn mostly from earlier nodes, attributes from the op's schema.

    Half the documents are "clean" (valid ids, typed attributes, a classifier tail) so they
    reach shape inference and, when accepted, the builder; the rest add junk anywhere.
    """
    clean = draw(st.booleans())
    ids, nodes = ["input"], []
    for k in range(draw(st.integers(1, 7))):
        op = draw(st.sampled_from(BODY_OPS))
        schema = OP_ATTRIBUTES[op]
        chosen = draw(st.lists(st.sampled_from(sorted(schema)), max_size=3, unique=True)) if schema else []
        if not clean:
            chosen += draw(st.sampled_from([[], [], ["bogus"]]))
        attrs = {name: draw(typed_value(schema[name][0] if name in schema else int, junk=not clean))
                 for name in chosen}
        if op == "conv" and (clean or draw(st.booleans())):
            attrs.update(out_channels=draw(st.integers(1, 6)), kernel=draw(st.integers(1, 5)))
        if op == "linear" and (clean or draw(st.booleans())):
            attrs["out_features"] = draw(st.integers(2, 5))
        choices = ids if clean else ids + ["zz"]
        inputs = draw(st.one_of(st.just([ids[-1]]), st.lists(st.sampled_from(choices), min_size=1, max_size=3)))
        node_id = f"n{k}" if clean else draw(st.sampled_from([f"n{k}", "input", "9x", "n0"]))
        nodes.append({"id": node_id, "op": op, "inputs": inputs, "attributes": attrs})
        ids.append(node_id)
    num_classes = draw(st.integers(2, 5)) if clean else draw(st.integers(-1, 5))
    if clean or draw(st.booleans()):  # a proper classifier tail
        head = draw(st.sampled_from([[], [{"id": "gap", "op": "global_avgpool", "inputs": [ids[-1]]}]]))
        nodes += head + [{"id": "fc", "op": "linear", "inputs": [(head or nodes)[-1]["id"]],
                          "attributes": {"out_features": num_classes}}]
        ids.append("fc")
    if clean or draw(st.booleans()):
        nodes.append({"id": "output", "op": "output", "inputs": [ids[-1]]})
    shape = draw(st.lists(st.integers(1, 9) if clean else st.integers(-1, 9), min_size=3, max_size=3))
    return {"name": "g", "input_shape": shape, "num_classes": num_classes, "nodes": nodes}


@FUZZ
@given(graphs())
def test_random_graphs_only_raise_arch_error(doc: dict):
    check(doc)


def mutate(doc: dict, data: st.DataObject) -> dict:
    doc = copy.deepcopy(doc)
    nodes = doc["nodes"]
    ids = [n["id"] for n in nodes] + ["input", "missing"]
    for _ in range(data.draw(st.integers(1, 3))):
        n = data.draw(st.sampled_from(nodes)) if nodes else None
        kind = data.draw(st.sampled_from(
            ["attr", "attr", "del_attr", "op", "inputs", "drop", "dup", "shape", "classes", "raw"]))
        if n is None or kind == "shape":
            doc["input_shape"] = data.draw(st.lists(st.integers(0, 40), min_size=3, max_size=3))
        elif kind == "attr":
            schema = OP_ATTRIBUTES.get(n["op"], {}) if isinstance(n.get("op"), str) else {}
            name = data.draw(st.sampled_from(sorted(schema) or ATTRIBUTE_NAMES))
            if not isinstance(n.get("attributes"), dict):
                n["attributes"] = {}
            n["attributes"][name] = data.draw(typed_value(schema[name][0] if name in schema else int))
        elif kind == "del_attr" and isinstance(n.get("attributes"), dict) and n["attributes"]:
            del n["attributes"][data.draw(st.sampled_from(sorted(n["attributes"])))]
        elif kind == "op":
            n["op"] = data.draw(st.sampled_from(OPS))
        elif kind == "inputs":
            n["inputs"] = data.draw(st.lists(st.sampled_from(ids), min_size=0, max_size=3))
        elif kind == "drop":
            nodes.remove(n)
        elif kind == "dup":
            nodes.insert(data.draw(st.integers(0, len(nodes))), copy.deepcopy(n))
        elif kind == "classes":
            doc["num_classes"] = data.draw(st.integers(-1, 12))
        elif kind == "raw":
            n[data.draw(st.sampled_from(["id", "op", "inputs", "attributes", "extra"]))] = data.draw(json_value)
    return doc


@FUZZ
@given(st.sampled_from(SMALL_NETS), st.data())
def test_mutated_valid_specs_only_raise_arch_error(doc: dict, data: st.DataObject):
    check(mutate(doc, data))


def test_unmutated_small_nets_pass_the_full_check():
    for doc in SMALL_NETS[:2]:
        check(doc)
        analyze(parse_spec(doc))  # and they really are valid

"""The gap chain: per-link accuracy change and agreement; the parts add up to the total."""

from __future__ import annotations

import numpy as np
import pytest

from ghnq_deploy.verify import gap


def _logits_with_accuracy(labels: np.ndarray, correct: np.ndarray, classes: int = 10) -> np.ndarray:
    """Logits whose argmax is the label where ``correct`` and the next class elsewhere."""
    pred = np.where(correct, labels, (labels + 1) % classes)
    out = np.zeros((len(labels), classes))
    out[np.arange(len(labels)), pred] = 1.0
    return out


@pytest.fixture
def chain():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 400)
    stages = {}
    correct = rng.random(400) < 0.9
    for key, _, _ in gap.CHAIN:
        flip = rng.random(400) < 0.05  # each link changes some labels, both ways
        correct = np.where(flip, ~correct, correct)
        stages[key] = _logits_with_accuracy(labels, correct)
    return stages, labels


def test_parts_add_up_to_the_total(chain):
    stages, labels = chain
    d = gap.decompose(stages, labels)
    top1 = {s.stage: s.top1 for s in d.steps}
    assert d.total_pt == pytest.approx(top1["runtime"] - top1["paper"])
    assert set(d.parts) == set(gap.PARTS)
    assert sum(d.parts.values()) == pytest.approx(d.total_pt, abs=1e-9)
    assert d.parts["BN statistics"] == pytest.approx(top1["paper_running"] - top1["paper"])
    assert d.parts["kernel / platform"] == pytest.approx(top1["runtime"] - top1["integer"])
    assert any(abs(v) > 0 for v in d.parts.values())


def test_agreement_is_with_the_stage_before(chain):
    stages, labels = chain
    d = gap.decompose(stages, labels)
    assert d.steps[0].agreement is None and d.steps[0].delta_pt is None
    for prev, step in zip(d.steps, d.steps[1:]):
        want = 100.0 * np.mean(stages[step.stage].argmax(1) == stages[prev.stage].argmax(1))
        assert step.agreement == pytest.approx(want)
        assert 0 <= step.agreement < 100  # every link flipped some labels


def test_a_missing_stage_merges_its_part_into_the_next_link(chain):
    stages, labels = chain
    stages = {**stages, "integer": None}
    d = gap.decompose(stages, labels)
    assert "integer arithmetic + kernel / platform" in d.parts and "integer arithmetic" not in d.parts
    assert sum(d.parts.values()) == pytest.approx(d.total_pt, abs=1e-9)
    assert [s.stage for s in d.steps] == ["float", "paper", "paper_running", "target", "runtime"]


def test_the_gap_needs_its_ends(chain):
    stages, labels = chain
    with pytest.raises(ValueError, match="paper"):
        gap.decompose({**stages, "paper": None}, labels)
    with pytest.raises(ValueError, match="labels"):
        gap.decompose(stages, labels[:10])


def test_waterfall_png(chain, tmp_path):
    stages, labels = chain
    rows = [{"target": "t", "bits": "w8a8", "gap": gap.decompose(stages, labels).to_dict()},
            {"target": "u", "bits": "w4a8", "gap": gap.decompose({**stages, "integer": None}, labels).to_dict()}]
    path = tmp_path / "gap.png"
    gap.plot_waterfall(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name != "gap.png"]  # no temp file left
    assert gap.largest_part(rows[0]["gap"])[0] in gap.PARTS

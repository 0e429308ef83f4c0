"""The paper's evaluation: aggregation, Table 1 rendering, output files, the engine and the CLI."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from ghnq_deploy.arch.sampler import sample_split
from ghnq_deploy.ghn.model import GHNQ
from ghnq_deploy.io import atomic_torch_save
from ghnq_deploy.report.evaluate import (
    BitResult, EvalConfig, EvalError, EvalReport, LayerStats, NetInput, NetResult, eval_order, evaluate, sem,
)
from ghnq_deploy.report.table1 import (
    CSV_COLUMNS, bits_label, build_table1, render_markdown, render_rich, report_json, table1_from_report,
    write_outputs,
)

HAVE_DATA = bool(os.environ.get("GHNQ_CIFAR10")) or os.path.isdir("/work/shared/data/cifar10")
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="needs the CIFAR-10 copy")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Two threads against a background training job on 2 cores spin (~60x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- synthetic results

BITS = ("fp32", "w8a8", "w4a4")
# split -> per-net (float top-1, w8a8 top-1, w4a4 top-1); top-5 = top-1 + 20
SYNTH = {"id-test": [(70.0, 69.0, 40.0), (72.0, 71.5, 44.0), (80.0, 79.0, 50.0)],
         "ood-bnfree": [(60.0, 30.0, 20.0), (64.0, 40.0, 22.0)]}


def _net(split: str, k: int, tops: tuple[float, ...]) -> NetResult:
    bits = {}
    for b, t in zip(BITS, tops):
        drop = tops[0] - t
        bits[b] = BitResult(b, t, t + 20, drop, drop, 0.0 if b == "fp32" else 0.01 * (1 + drop),
                            100.0 if b == "fp32" else 100 - drop)
    layers = [LayerStats("c1", "conv", [16, 3, 3, 3], -0.5, 0.4, 0.5, 0.1, 1.5 + k)]
    return NetResult(f"{split}-{k}", split, "ab" * 32, 1000 + k, 5000, 128, tops[0], tops[0] + 20, bits, layers, 0.1)


def synthetic_report() -> EvalReport:
    cfg = EvalConfig(bits=BITS, limit_images=128)
    report = EvalReport(cfg, {"name": "paper", "bits": "w8a8"}, {"path": "ghn.pt", "sha256": "f00d" * 16, "steps": 3},
                        {"test": "CIFAR-10 test (JPEG copy)", "images": 128, "order": "perm"})
    for split, rows in SYNTH.items():
        report.nets += [_net(split, k, tops) for k, tops in enumerate(rows)]
    return report


def test_sem_by_hand():
    assert sem([1.0]) is None
    assert sem([70.0, 72.0, 80.0]) == pytest.approx(np.std([70, 72, 80], ddof=1) / math.sqrt(3))
    assert sem([5.0, 5.0]) == 0.0


def test_aggregates_mean_sem_max():
    report = synthetic_report()
    cells = {(a.split, a.bits): a for a in report.aggregates()}
    assert len(cells) == 2 * len(BITS)
    a = cells["id-test", "w4a4"]
    assert a.n == 3 and a.top1_mean == pytest.approx(np.mean([40, 44, 50]))
    assert a.top1_sem == pytest.approx(np.std([40, 44, 50], ddof=1) / math.sqrt(3))
    assert a.top1_max == 50.0 and a.top5_max == 70.0
    assert a.drop_top1_mean == pytest.approx(np.mean([30, 28, 30]))
    b = cells["ood-bnfree", "w8a8"]
    assert b.top1_mean == 35.0 and b.top1_sem == pytest.approx(5.0) and b.top1_max == 40.0


def test_table1_layout_and_renderers():
    table = table1_from_report(synthetic_report())
    assert table.splits == ["id-test", "ood-bnfree"] and table.bits == list(BITS)
    assert table.cell("top1", "w8a8", "ood-bnfree").text() == "35.0 ± 5.0; 40.0"
    md = render_markdown(table)
    assert "| W8/A8 | 73.2 ± 3.0; 79.0 | 35.0 ± 5.0; 40.0 |" in md  # mean 73.17, sem 3.00
    assert md.count("| Float32 |") == 2  # one per metric
    assert "**Top-5 accuracy (%)**" in md and "ID Test (n=3)" in md and "BN-Free (n=2)" in md
    console = Console(record=True, width=140)
    console.print(render_rich(table, title="T"))
    text = console.export_text()
    assert "W4/A4" in text and "44.7 ± 2.9; 50.0" in text and "Top-5 accuracy (%)" in text
    assert [bits_label(b) for b in ("fp32", "w8a8", "w4a8", "w2a2")] == ["Float32", "W8/A8", "W4/A8", "W2/A2"]


def test_single_net_cells_say_no_sem():
    report = synthetic_report()
    report.nets = report.nets[:1]
    table = table1_from_report(report)
    assert table.cell("top1", "fp32", "id-test").text() == "70.0 ± n/a; 70.0"
    data = json.loads(report_json(report))
    assert data["aggregates"][0]["top1_sem"] is None


def test_outputs_written(tmp_path):
    report = synthetic_report()
    paths = write_outputs(report, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["format"] == "ghnq-deploy/evaluation"
    assert data["checkpoint"]["sha256"] == "f00d" * 16
    assert data["config"]["bits"] == list(BITS) and data["config"]["batch_size"] == 64
    assert data["config"]["limit_images"] == 128 and data["config"]["order_seed"] == 0
    assert len(data["nets"]) == 5 and data["nets"][0]["layers"][0]["channel_range_spread"] == 1.5
    assert data["table1"]["cells"]["top1"]["w8a8"]["ood-bnfree"]["mean"] == 35.0
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert len(rows) == 5 * len(BITS) and tuple(rows[0]) == CSV_COLUMNS
    r = next(r for r in rows if r["name"] == "ood-bnfree-1" and r["bits"] == "w8a8")
    assert float(r["top1"]) == 40.0 and float(r["drop_top1"]) == 24.0 and float(r["float_top1"]) == 64.0
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 5000
    assert "W4/A4" in paths["markdown"].read_text()
    assert not list((tmp_path / "out").glob("*.partial"))


def test_build_table1_keeps_order():
    report = synthetic_report()
    aggs = report.aggregates()
    table = build_table1(list(reversed(aggs)))
    assert table.splits == ["ood-bnfree", "id-test"] and table.bits == list(reversed(BITS))


def test_config_validation():
    for kw, msg in ((dict(bits=("w8a9",)), "w8a9"), (dict(bits=("fp32", "fp32")), "twice"),
                    (dict(scheme="nope"), "nope"), (dict(bn="frozen"), "frozen"), (dict(batch_size=0), "batch size"),
                    (dict(limit_images=0), "limit-images"), (dict(bits=()), "no bit-widths")):
        with pytest.raises(Exception, match=msg):
            EvalConfig(**kw).validate()


# ----------------------------------------------------------------------------- engine on real images


@needs_data
def test_fixed_order_is_class_mixed():
    from ghnq_deploy.data import load_cifar10

    labels = load_cifar10("test").labels
    order = eval_order(len(labels), 0)
    assert np.array_equal(order, eval_order(len(labels), 0)) and sorted(order) == list(range(len(labels)))
    first = labels[order[:64]]
    assert len(set(first.tolist())) >= 8
    if len(set(labels[:64].tolist())) == 1:  # the class-sorted file this order exists for
        assert len(set(labels[order[:64]].tolist())) > 1


@needs_data
def test_engine_on_two_nets():
    torch.manual_seed(0)
    ghn = GHNQ()
    nets = [NetInput(s, "id-test") for s in sample_split("id-test", 2, 1)]
    cfg = EvalConfig(bits=("fp32", "w8a8", "w2a2"), limit_images=128, meta_batch=2)
    seen = []
    report = evaluate(ghn, {"path": "random", "sha256": "0" * 64}, nets, cfg, on_result=seen.append)
    assert [r.name for r in seen] == [n.spec.name for n in nets] == [r.name for r in report.nets]
    assert report.data["images"] == 128 and "permutation" in report.data["order"]
    for r in report.nets:
        assert r.images == 128 and r.layers and all(layer.absmax >= max(-layer.min, layer.max) - 1e-6
                                                     for layer in r.layers)
        f = r.bits["fp32"]
        assert (f.top1, f.drop_top1, f.logits_mse, f.top1_agreement) == (r.float_top1, 0.0, 0.0, 100.0)
        for b in ("w8a8", "w2a2"):
            q = r.bits[b]
            assert 0 <= q.top1 <= q.top5 <= 100 and 0 <= q.top1_agreement <= 100
            assert q.drop_top1 == pytest.approx(r.float_top1 - q.top1)
            assert q.top1 == pytest.approx(100 * round(q.top1 * 128 / 100) / 128)  # counts of 128 images
        assert 0 < r.bits["w8a8"].logits_mse < r.bits["w2a2"].logits_mse
        assert r.bits["w8a8"].top1_agreement >= r.bits["w2a2"].top1_agreement


@needs_data
def test_engine_is_deterministic_and_sees_the_batch_size():
    torch.manual_seed(0)
    ghn = GHNQ()
    nets = [NetInput(sample_split("id-test", 1, 2)[0], "id-test")]
    cfg = EvalConfig(bits=("fp32", "w4a8"), limit_images=96)
    a = evaluate(ghn, {}, nets, cfg).nets[0]
    b = evaluate(ghn, {}, nets, cfg).nets[0]
    assert a.bits == b.bits
    c = evaluate(ghn, {}, nets, EvalConfig(bits=("fp32", "w4a8"), limit_images=96, batch_size=32)).nets[0]
    assert c.bits["w4a8"].logits_mse != a.bits["w4a8"].logits_mse  # batch statistics depend on the batch


def test_engine_refuses_empty_input():
    with pytest.raises(EvalError):
        evaluate(GHNQ(), {}, [], EvalConfig())


# ----------------------------------------------------------------------------- CLI


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="160")
    code = "from ghnq_deploy.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, "evaluate", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ghn") / "random-ghn.pt"
    atomic_torch_save(path, GHNQ().checkpoint(steps=0))
    return path


@needs_data
def test_cli_tiny_run(tmp_path, random_checkpoint):
    out = tmp_path / "report"
    proc = _cli(["--split", "id-test", "-n", "2", "--limit-images", "128", "--bits", "fp32,w8a8,w4a4",
                 "--checkpoint", str(random_checkpoint), "--out", str(out), "--threads", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Top-1 accuracy" in proc.stdout and "W4/A4" in proc.stdout and "ID Test (n=2)" in proc.stdout
    data = json.loads((out / "evaluation.json").read_text())
    assert len(data["nets"]) == 2 and data["data"]["images"] == 128
    assert data["checkpoint"]["path"] == str(random_checkpoint) and len(data["checkpoint"]["sha256"]) == 64
    assert (out / "per_network.csv").exists() and (out / "accuracy_vs_bits.png").exists()


@pytest.mark.parametrize("args,needle", [
    (["--split", "id-test", "-n", "2", "--bits", "fp32,w9a9"], "w9a9"),
    (["--split", "id-test", "-n", "2", "--bits", "int8"], "int8"),
    (["--split", "id-test", "--scheme", "tflite"], "tflite"),
    ([], "nothing to evaluate"),
])
def test_cli_bad_input_is_one_line_exit_2(args, needle, capsys, monkeypatch):
    """In-process (the subprocess run above covers the console entry point)."""
    from ghnq_deploy.cli import main

    monkeypatch.setattr(sys, "argv", ["ghnq-deploy", "evaluate", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_cli_bad_bits_subprocess(tmp_path):
    proc = _cli(["--split", "id-test", "-n", "2", "--bits", "w4a4,w1a1"], tmp_path)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "error: bit-width 'w1a1': widths must be 2..8 (or 32 for float)"]


def test_running_bn_uses_the_export_calibration_path():
    """evaluate --bn running and export share one calibration set and one BN routine: identical statistics."""
    from ghnq_deploy.arch.sampler import sample_arch
    from ghnq_deploy.calibration import load_calibration
    from ghnq_deploy.export.pipeline import prepare_model
    from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint
    from ghnq_deploy.ghn.predict import predict
    from ghnq_deploy.report.evaluate import load_calibration_images, prepare_bn

    ghn, _ = load_ghn_checkpoint()
    pm = predict(ghn, [sample_arch("id-test", 0, 0, space=1)])[0]
    cfg = EvalConfig(bn="running")
    cal = load_calibration_images(cfg, pm.spec.input_shape, pm.spec.num_classes)
    assert cal.sha256 == load_calibration().sha256  # the set export records in its manifest
    ours = prepare_bn(pm.build(bn_mode="batch"), cal)
    theirs = prepare_model(pm.build(), cal.images).calibrated
    pairs = [(a, b) for a, b in zip(ours.modules(), theirs.modules()) if isinstance(a, torch.nn.BatchNorm2d)]
    assert pairs
    for a, b in pairs:
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
    other = prepare_bn(pm.build(bn_mode="batch"), cal.subset(64))  # a different set gives other statistics
    assert not all(torch.equal(a.running_mean, c.running_mean)
                   for a, c in zip(ours.modules(), other.modules()) if isinstance(a, torch.nn.BatchNorm2d))

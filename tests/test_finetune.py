"""finetune (library): accuracy over the prediction, seeded starts, the schedule, held-out splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune_helpers import TINY
from ghnq_deploy.arch.spec import parse_spec
from ghnq_deploy.data import ImageSet
from ghnq_deploy.finetune.init import InitError, make_start, tiled_filters
from ghnq_deploy.errors import UserError
from ghnq_deploy.ghn.precision import resolve_precision
from ghnq_deploy.finetune.loop import FinetuneConfig, check_config, finetune, read_log
from ghnq_deploy.finetune.schedule import OneCycle
from ghnq_deploy.finetune.split import stratified_split
from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint
from ghnq_deploy.ghn.predict import load_predicted, predict, save_predicted

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    ghn, info = load_ghn_checkpoint("default")
    model = predict(ghn, [parse_spec(TINY, "tiny.json")], ghn_info=info)[0]
    path = tmp_path_factory.mktemp("pred") / "model.pt"
    save_predicted(path, model)
    return path


def test_a_short_finetune_raises_validation_accuracy_over_the_prediction(predicted, tmp_path):
    cfg = FinetuneConfig(model=str(predicted), out_dir=str(tmp_path / "ft"), bits="w8a8", scheme="tflite-int8",
                         steps=80, batch_size=64, train_images=4000, val_count=1000, val_every=40, log_every=10)
    result = finetune(cfg)
    assert result.model_file == tmp_path / "ft" / "model.pt" and result.steps == 80
    assert result.validation == "CIFAR-10 val[:1000]"  # the images held out of training, not training images
    assert result.val_top1_final > result.val_top1_start + 0.03, (result.val_top1_start, result.val_top1_final)
    log = read_log(result.log_file)
    vals = [r for r in log if r["event"] == "val"]
    assert [r["step"] for r in vals] == [0, 40, 80] and vals[0]["val_top1"] == result.val_top1_start
    assert [r["step"] for r in log if r["event"] == "train"] == list(range(10, 81, 10))
    assert [r["step"] for r in log if r["event"] == "freeze"] == [72]  # the last 10 % on frozen BN and ranges
    tuned = load_predicted(result.model_file)
    before = load_predicted(predicted)
    assert tuned.meta["bn_stats"] == "calibrated"
    anc = tuned.meta["ancestry"]
    assert anc["ghn_checkpoint"]["sha256"] == before.meta["ghn"]["sha256"]
    assert anc["prediction"]["seed"] == before.meta["seed"] and anc["finetune"]["init"] == "ghn"
    assert anc["finetune"]["config"]["steps"] == 80 and anc["finetune"]["val_top1_final"] == result.val_top1_final
    assert not torch.equal(tuned.state_dict["layers.c1.weight"], before.state_dict["layers.c1.weight"])


def test_a_minutes_budget_fits_the_schedule_to_the_time(predicted, tmp_path):
    cfg = FinetuneConfig(model=str(predicted), out_dir=str(tmp_path / "ft"), minutes=0.25, batch_size=32,
                         train_images=1000, val_count=100, val_every=20, log_every=1)
    result = finetune(cfg)
    log = read_log(result.log_file)
    steps = [r["step"] for r in log if r["event"] == "train"]
    assert result.model_file is not None and steps == list(range(1, result.total + 1)) and result.total > 10
    totals = [r["total"] for r in log if r["event"] == "train" and r["step"] > 10]
    assert totals[-1] == result.total and totals == sorted(totals, reverse=True)  # refits only shorten the run
    probe_lrs = {r["lr"] for r in log if r["event"] == "train" and r["step"] <= 10}
    assert probe_lrs == {cfg.lr / 25}  # the timed probe runs at the cycle's initial rate


def test_a_float_phase_comes_first_then_qat_then_the_frozen_deployed_form(predicted, tmp_path):
    cfg = FinetuneConfig(model=str(predicted), out_dir=str(tmp_path / "ft"), steps=40, batch_size=32,
                         train_images=1000, val_count=100, val_every=40, log_every=1, float_fraction=0.5)
    result = finetune(cfg)
    log = read_log(result.log_file)
    phases = [r["phase"] for r in log if r["event"] == "train"]
    assert phases == ["float"] * 20 + ["qat"] * 16 + ["frozen"] * 4
    assert [r["step"] for r in log if r["event"] == "qat"] == [20]
    assert {r["precision"] for r in log if r.get("phase") == "float"} == {resolve_precision("auto")}
    info = load_predicted(result.model_file).meta["ancestry"]["finetune"]
    assert info["float_steps"] == 20 and info["float_precision"] == resolve_precision("auto")


def test_a_resumed_float_phase_continues_exactly(predicted, tmp_path):
    def cfg(out):
        return FinetuneConfig(model=str(predicted), out_dir=str(tmp_path / out), steps=16, batch_size=32,
                              train_images=1000, val_count=100, val_every=8, log_every=1, checkpoint_every=3,
                              float_fraction=0.5, precision="fp32")
    whole = finetune(cfg("whole"))
    stopped = finetune(cfg("split"), stop_after=6)  # inside the float phase (steps 0-7)
    assert stopped.model_file is None and stopped.steps == 6
    resumed = finetune(cfg("split"), resume=True)
    a, b = (load_predicted(r.model_file).state_dict for r in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_log(whole.log_file) if r["event"] == "train"] == \
        [r["loss"] for r in read_log(resumed.log_file) if r["event"] == "train"]


def test_a_minutes_budget_times_both_kinds_of_step_in_its_probe(predicted, tmp_path):
    cfg = FinetuneConfig(model=str(predicted), out_dir=str(tmp_path / "ft"), minutes=0.3, batch_size=32,
                         train_images=1000, val_count=100, val_every=20, log_every=1, float_fraction=0.6)
    result = finetune(cfg)
    train = [r for r in read_log(result.log_file) if r["event"] == "train"]
    assert [r["phase"] for r in train[:10]] == ["float", "qat"] * 5  # the probe alternates
    later = [r["phase"] for r in train[10:]]
    assert later and later == sorted(later, key=["float", "qat", "frozen"].index)  # then the phases in order
    assert "float" in later and "qat" in later


def test_random_init_differs_from_the_prediction_and_is_seeded(predicted):
    model = load_predicted(predicted)
    a, b, c = (make_start(model, "random", seed) for seed in (0, 0, 1))
    weights = [k for k, v in model.state_dict.items() if v.dim() > 1]
    assert a.from_ghn is False and set(weights) <= set(a.changed)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert all(not torch.equal(a.state_dict[k], c.state_dict[k]) for k in weights)
    assert all(not torch.equal(a.state_dict[k], model.state_dict[k]) for k in weights)
    ghn = make_start(model, "ghn", 0)
    assert all(torch.equal(ghn.state_dict[k], model.state_dict[k]) for k in model.state_dict)


def test_noise_and_orthogonal_starts(predicted):
    model = load_predicted(predicted)
    noisy = make_start(model, "ghn-noise", 0, noise=0.05)
    w, w0 = noisy.state_dict["layers.c2.weight"], model.state_dict["layers.c2.weight"]
    rel = float((w - w0).std() / w0.std())
    assert 0.03 < rel < 0.07
    assert torch.equal(make_start(model, "ghn-noise", 0).state_dict["layers.c2.weight"], w)
    tiled = torch.randn(4, 3, 3, 3).repeat(2, 1, 1, 1)
    assert tiled_filters(tiled) and not tiled_filters(torch.randn(8, 3, 3, 3))
    with pytest.raises(InitError, match="unknown --init 'xavier'"):
        make_start(model, "xavier", 0)


def test_one_cycle_rises_then_falls_and_a_probe_keeps_the_initial_rate():
    s = OneCycle(0.1, 100)
    lrs = [s.lr(i) for i in range(100)]
    peak = int(np.argmax(lrs))
    assert lrs[0] == pytest.approx(0.1 / 25) and lrs[peak] == pytest.approx(0.1) and peak == 15
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:])) and lrs[-1] < 1e-5
    probed = OneCycle(0.1, 110, start=10)
    assert [probed.lr(i) for i in range(10)] == [0.1 / 25] * 10
    assert [probed.lr(i + 10) for i in range(100)] == lrs


def test_stratified_split_holds_out_every_class_and_never_overlaps():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(200) % 256  # make rows distinguishable
    images[:, 0, 0, 1] = np.arange(200) // 256
    labels = np.arange(200) % 4
    train, val = stratified_split(ImageSet(images, labels, "set"), 0.1, seed=3)
    assert len(val) == 20 and len(train) == 180 and np.bincount(val.labels).tolist() == [5, 5, 5, 5]
    key = lambda s: {(int(a), int(b)) for a, b in s.images[:, 0, 0, :2]}  # noqa: E731
    assert not key(train) & key(val)


@pytest.mark.parametrize("change, message", [
    ({"steps": 5, "minutes": 1.0}, "give one budget, not --steps and --minutes"),
    ({"bits": "w9a8"}, "widths must be 2..8"),
    ({"scheme": "tflite-int16"}, "unknown quantization scheme 'tflite-int16'"),
    ({"freeze_bn": 1.0}, "--freeze-bn is a fraction"),
    ({"lr": float("nan")}, "--lr must be a finite number above 0"),
    ({"noise": float("nan")}, "--noise is a fraction"),
    ({"grad_clip": 0.0}, "--grad-clip must be a finite number above 0"),
    ({"init": "xavier"}, "unknown --init 'xavier'"),
    ({"float_fraction": 1.0}, "--float-fraction is a fraction"),
    ({"float_fraction": float("nan")}, "--float-fraction is a fraction"),
    ({"float_fraction": 0.9, "freeze_bn": 0.1}, "leave no steps for quantization-aware training"),
    ({"precision": "fp16"}, "unknown --precision 'fp16'"),
])
def test_bad_configs_are_one_line(change, message):
    cfg = FinetuneConfig(model="m.pt", out_dir="o", **change)
    with pytest.raises(UserError, match=message) as info:
        check_config(cfg)
    assert "\n" not in str(info.value)


def test_a_run_folder_marker_picks_the_finetuned_model(tmp_path):
    from ghnq_deploy.workspace import WorkspaceError, resolve_model, set_active_model

    run = tmp_path / "ws" / "net"
    (run / "finetune").mkdir(parents=True)
    (run / "model.pt").write_bytes(b"prediction")
    (run / "finetune" / "model.pt").write_bytes(b"fine-tuned")
    (tmp_path / "ws" / "CURRENT").write_text("net\n")
    assert resolve_model(None, tmp_path / "ws") == run / "model.pt"
    set_active_model(run, run / "finetune" / "model.pt")
    assert (run / "MODEL").read_text() == "finetune/model.pt\n"
    assert resolve_model(None, tmp_path / "ws") == run / "finetune" / "model.pt"
    assert resolve_model(run) == run / "finetune" / "model.pt"
    assert resolve_model(run / "model.pt") == run / "model.pt"
    (run / "MODEL").write_text("../elsewhere.pt\n")
    with pytest.raises(WorkspaceError, match="MODEL: names '../elsewhere.pt', which is not a model file") as info:
        resolve_model(run)
    assert "\n" not in str(info.value)
    set_active_model(run, None)
    assert resolve_model(run) == run / "model.pt"


def test_rescaled_start_keeps_the_function_and_takes_the_init_norms(predicted):
    from ghnq_deploy.arch.builder import build_model

    model = load_predicted(predicted)
    start = make_start(model, "ghn-rescale", 0)
    reference = build_model(model.spec, seed=0).state_dict()
    convs = [f"layers.{n.inputs[0]}.weight" for n in model.spec.nodes if n.op == "bn"]
    assert convs and set(convs) <= set(start.changed) and start.from_ghn
    for k in convs:
        assert torch.allclose(start.state_dict[k].norm(), reference[k].norm(), rtol=1e-5)
        assert not torch.allclose(model.state_dict[k].norm(), reference[k].norm(), rtol=1e-2)  # it did rescale
    assert "layers.fc.weight" not in start.changed  # no BN after it: its scale is the function's
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    nets = []
    for state in (model.state_dict, start.state_dict):
        net = build_model(model.spec)
        net.load_state_dict(state)
        nets.append(net)
    with torch.no_grad():
        for mode in (True, False):  # batch statistics, and the rescaled running statistics
            a, b = (net.train(mode)(x) for net in nets)
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())

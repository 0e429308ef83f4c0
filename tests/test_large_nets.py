"""Users' nets of any size (issue 11): the 10^7 cap bounds the sampled space only; torchvision nets end to end."""

from __future__ import annotations

import pytest
import torch

from ghnq_deploy.arch.builder import build_model
from ghnq_deploy.arch.importer import resolve_source, trace_model
from ghnq_deploy.arch.spec import DEFAULT_PARAM_CAP, ArchError, analyze, save_spec
from ghnq_deploy.export import tflite as tflite_export
from ghnq_deploy.export.pipeline import export
from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint
from ghnq_deploy.ghn.predict import PredictedModel, load_predicted, predict, save_predicted


def _spec(name: str):
    torch.manual_seed(0)
    return trace_model(resolve_source(f"torchvision:{name}", 10), name, (3, 32, 32), 10).spec


@pytest.fixture(scope="module")
def resnet18_predicted(tmp_path_factory):
    spec = _spec("resnet18")
    assert analyze(spec, param_cap=10**9).params > DEFAULT_PARAM_CAP
    ghn, info = load_ghn_checkpoint("default")
    path = tmp_path_factory.mktemp("r18") / "model.pt"
    save_predicted(path, predict(ghn, [spec], ghn_info=info)[0])
    return path


def test_a_net_over_the_cap_predicts_and_exports(resnet18_predicted, tmp_path):
    model = load_predicted(resnet18_predicted)
    assert sum(v.numel() for k, v in model.state_dict.items() if "running" not in k and "num_batches" not in k) \
        == 11_181_642
    result = export(resnet18_predicted, "onnx", out_dir=tmp_path / "onnx", eval_count=50)
    assert result.model_file.exists()
    assert result.manifest["evaluation"]["parity"]["max_abs_diff"] <= result.manifest["evaluation"]["parity"][
        "max_abs_diff_bound"]


def test_an_explicit_cap_is_honoured_everywhere(resnet18_predicted, tmp_path):
    ghn, _ = load_ghn_checkpoint("default")
    with pytest.raises(ArchError, match="exceed the cap"):
        predict(ghn, [_spec("resnet18")], param_cap=DEFAULT_PARAM_CAP)
    with pytest.raises(ArchError, match="exceed the cap"):
        load_predicted(resnet18_predicted, param_cap=DEFAULT_PARAM_CAP)
    with pytest.raises(ArchError, match="exceed the cap"):
        export(resnet18_predicted, "onnx", out_dir=tmp_path / "x", eval_count=10, param_cap=DEFAULT_PARAM_CAP)


def test_cli_predict_gives_a_notice_not_a_refusal_and_honours_param_cap(tmp_path):
    from typer.testing import CliRunner

    from ghnq_deploy.cli import app
    import ghnq_deploy.cli.ghn_cmd  # noqa: F401 - registers predict

    spec_file = tmp_path / "r18.json"
    save_spec(_spec("resnet18"), spec_file)
    runner = CliRunner()
    ok = runner.invoke(app, ["predict", str(spec_file), "-o", str(tmp_path / "m.pt"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert "above the 10,000,000" in ok.output
    capped = runner.invoke(app, ["predict", str(spec_file), "-o", str(tmp_path / "n.pt"), "--param-cap", "1000000"])
    assert capped.exit_code != 0 and "exceed the cap" in str(capped.exception or capped.output)


@pytest.mark.slow
@pytest.mark.parametrize("name, ghn", [("mobilenet_v2", True), ("googlenet", True), ("squeezenet1_1", True),
                                       ("mobilenet_v3_small", False),
                                       ("shufflenet_v2_x0_5", False)])
def test_torchvision_nets_through_predict_and_int8_export(name, ghn, tmp_path):
    """GHN-predicted where the shipped GHN knows every op type; builder weights where it (rightly) refuses."""
    spec = _spec(name)
    checkpoint, info = load_ghn_checkpoint("default")
    if ghn:
        model = predict(checkpoint, [spec], ghn_info=info)[0]
    else:
        with pytest.raises(ArchError, match="trained without op type"):
            predict(checkpoint, [spec], ghn_info=info)
        model = PredictedModel(spec, build_model(spec, seed=0).state_dict(), {})
    path = tmp_path / "model.pt"
    save_predicted(path, model)
    for target in ("tflite-int8", "onnx-int8"):
        result = export(path, target, out_dir=tmp_path / target, eval_count=100)
        assert result.manifest["evaluation"]["count"] == 100
        assert 0.0 <= result.manifest["evaluation"]["top1_agreement_with_torch"] <= 1.0
        if target == "tflite-int8":
            assert tflite_export.float_ops(result.model_file) == []

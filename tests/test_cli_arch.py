"""``ghnq-deploy arch ...`` end to end through the real entry point (``ghnq_deploy.cli.main``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ghnq_deploy.arch.spec import analyze, load_spec
from ghnq_deploy.cli import main

EXAMPLES = Path(__file__).parent.parent / "examples"
RESNET20 = EXAMPLES / "resnet20.json"
FACTORY = '''
import torch.nn as nn
import torch.nn.functional as F


class Small(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))
'''


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run ``ghnq-deploy *args`` in-process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["ghnq-deploy", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, needle: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    return lambda *args: run_cli(monkeypatch, capsys, *args)


@pytest.mark.parametrize("args", [
    ["arch", "--help"], ["arch", "show", "--help"], ["arch", "validate", "--help"],
    ["arch", "sample", "--help"], ["arch", "import", "--help"],
])
def test_help_everywhere(cli, args):
    code, out, _ = cli(*args)
    assert code == 0
    assert "Usage" in out and "--help" in out


def test_show_table(cli):
    code, out, err = cli("arch", "show", str(RESNET20))
    assert code == 0 and err == ""
    for text in ("resnet20", "s3b3_add", "64x8x8", "272,474", "MACs", "73 nodes", "total"):
        assert text in out


def test_show_json(cli):
    code, out, _ = cli("arch", "show", str(RESNET20), "--json")
    assert code == 0
    data = json.loads(out)
    info = analyze(load_spec(RESNET20))
    assert data["params"] == info.params == 272_474
    assert data["macs"] == info.macs
    assert len(data["nodes"]) == 73
    first = data["nodes"][0]
    assert first == {"id": "stem", "op": "conv", "inputs": ["input"], "shape": [16, 32, 32],
                     "params": 432, "macs": 432 * 32 * 32}
    assert data["sha256"] == load_spec(RESNET20).sha256()


def test_validate(cli, tmp_path: Path):
    code, out, err = cli("arch", "validate", *map(str, sorted(EXAMPLES.glob("*.json"))))
    assert code == 0 and err == ""
    assert out.count("ok ") == 5
    bad = tmp_path / "bad.json"
    doc = json.loads(RESNET20.read_text())
    doc["nodes"][1]["inputs"] = ["nowhere"]
    bad.write_text(json.dumps(doc))
    code, out, err = cli("arch", "validate", str(RESNET20), str(bad))
    assert_one_error_line(code, err, f"{bad}: node 'stem_bn': input 'nowhere' does not exist (dangling reference)")
    assert out.count("ok ") == 1


def test_sample_is_byte_identical_per_seed(cli, tmp_path: Path):
    for folder, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        code, out, _ = cli("arch", "sample", "--split", "ood-mobilenet", "-n", "4", "--seed", seed,
                           "-o", str(tmp_path / folder))
        assert code == 0 and "wrote 4" in out
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == [f"ood-mobilenet-s3-{i:05d}.json" for i in range(4)]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        load_spec(tmp_path / "a" / name)
    assert sorted(p.read_bytes() for p in (tmp_path / "c").iterdir()) != sorted(
        p.read_bytes() for p in (tmp_path / "a").iterdir())
    assert not list(tmp_path.rglob("*.partial"))


@pytest.mark.parametrize(("args", "needle"), [
    (["--split", "nope", "-n", "2", "-o", "X"], "unknown split 'nope'; choose from id-train"),
    (["--split", "id-test", "-n", "0", "-o", "X"], "Invalid value for '-n' / '--count': Input should be greater than or equal to 1"),
])
def test_sample_bad_input(cli, tmp_path: Path, args, needle):
    args = [str(tmp_path / "x") if a == "X" else a for a in args]
    code, _, err = cli("arch", "sample", *args)
    assert_one_error_line(code, err, needle)


def test_import_factory_file(cli, tmp_path: Path):
    factory = tmp_path / "small.py"
    factory.write_text(FACTORY)
    out_file = tmp_path / "out" / "small.json"
    code, out, err = cli("arch", "import", f"{factory}:Small", "--num-classes", "5", "--input", "3x16x16",
                         "-o", str(out_file))
    assert code == 0 and err == ""
    assert f"wrote {out_file}" in out
    spec = load_spec(out_file)
    assert spec.name == "Small" and spec.num_classes == 5 and spec.input_shape == (3, 16, 16)
    assert [n.op for n in spec.nodes] == ["conv", "bn", "relu", "global_avgpool", "linear", "output"]
    code, out, _ = cli("arch", "import", f"{factory}:Small", "--num-classes", "5", "--input", "3x16x16")
    assert code == 0 and out == out_file.read_text()  # no -o: the same JSON on stdout


def test_import_torchvision_above_cap(cli, tmp_path: Path):
    out_file = tmp_path / "r18.json"
    code, out, _ = cli("arch", "import", "torchvision:resnet18", "-o", str(out_file))
    assert code == 0 and "11,181,642 params" in out and "`arch show` and `arch validate` need --param-cap" in out
    code, _, err = cli("arch", "show", str(out_file))
    assert_one_error_line(code, err, "11,181,642 parameters exceed the cap of 10,000,000")
    code, out, _ = cli("arch", "show", str(out_file), "--param-cap", "20000000", "--json")
    assert code == 0 and json.loads(out)["params"] == 11_181_642


@pytest.mark.parametrize(("args", "needle"), [
    (["torchvision:resnet18", "--input", "3x32"], "--input must look like 3x32x32"),
    (["torchvision:resnet1"], "unknown torchvision classification model 'resnet1'"),
    (["torchvision:resnet18", "--num-classes", "1"], "Invalid value for '--num-classes': Input should be greater than or equal to 2"),
])
def test_import_bad_input(cli, args, needle):
    code, _, err = cli("arch", "import", *args)
    assert_one_error_line(code, err, needle)


def test_bad_file_in_a_real_process(tmp_path: Path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"name": "x",\n "nodes": [}\n')
    result = subprocess.run(
        [sys.executable, "-c", "from ghnq_deploy.cli import main; main()", "arch", "show", str(bad)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.stdout == ""
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {bad}: invalid JSON at line 2, column 12: Expecting value"]
    assert "Traceback" not in result.stderr


def test_usage_error_in_a_real_process_is_one_message_not_a_traceback():
    """Unknown options reach main() as the CLI library's usage error (click's or typer's own copy)."""
    result = subprocess.run(
        [sys.executable, "-c", "from ghnq_deploy.cli import main; main()", "arch", "show", "--no-such-flag"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "No such option: --no-such-flag" in result.stderr
    assert "Traceback" not in result.stderr

"""`ghnq-deploy verify` end to end: predict -> (export run by verify) -> verify on host targets, SSH, --json, --max-gap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sshd import ALIAS, SSHD, SSHServer  # noqa: E402

STAGES = ("float_top1", "paper_sim_top1", "target_sim_top1", "real_top1")


def cli(args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from ghnq_deploy.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    env = {**os.environ, "GHNQ_WORKSPACE": str(ws), "OMP_NUM_THREADS": "1"}
    done = cli(["predict", str(ROOT / "examples" / "resnet20.json")], env)
    assert done.returncode == 0, done.stderr
    return ws, env


@pytest.fixture(scope="module")
def report(run):
    ws, env = run
    done = cli(["verify", "-d", "x86-litert", "-d", "litert-ref", "--bits", "w8a8,w4a8,w2a2", "--limit-images", "200",
                "--timing-runs", "5", "--json"], env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done


def test_json_report_has_every_stage_and_provenance(report, run):
    rep, done = report
    ws, _ = run
    assert rep["complete"] and rep["images"]["count"] == 200
    rows = {(r["target"], r["bits"]): r for r in rep["rows"]}
    assert set(rows) == {(t, b) for t in ("x86-litert", "litert-ref") for b in ("w8a8", "w4a8", "w2a2")}
    for (target, bits), r in rows.items():
        if bits == "w2a2":
            assert r["real"] is False and "simulation only" in r["note"] and r["paper_sim_top1"] is not None
            continue
        assert all(0 <= r[k] <= 100 for k in STAGES)
        assert r["delta_top1_pt"] == pytest.approx(r["real_top1"] - r["target_sim_top1"])
        s = r["sim_vs_real"]
        assert 0 <= s["exact_ties"] <= s["near_ties"] <= 100 and abs(sum(s["step_histogram"].values()) - 1) < 1e-9
        assert r["device"]["kernels"] == {"x86-litert": "xnnpack", "litert-ref": "reference"}[target]
        assert r["device"]["threads"] == 1 and r["device"]["runtime"] == "ai-edge-litert"
        assert r["latency"]["runs"] == 5 and r["latency"]["p50_ms"] > 0
        assert r["float_file"]["bytes"] > r["file"]["bytes"] and r["size_ratio"] > 2
        assert r["scheme_check"]["ok"], r["scheme_check"]
        assert r["where"] == "this host"
        assert r["target_sim_encodings"].startswith("read from the exported file")
        assert r["integer_sim"]["rounding"] == "double"  # the targets' declared rounding
        g = r["gap"]  # the chain paper -> ... -> runtime: its parts add up to the total
        assert [s["stage"] for s in g["steps"]] == ["float", "paper", "paper_running", "target", "integer", "runtime"]
        assert sum(g["parts"].values()) == pytest.approx(g["total_pt"], abs=1e-9)
        assert g["total_pt"] == pytest.approx(r["real_top1"] - r["paper_sim_top1"])
    # W4A8 is real: an int8 file holding only 4-bit levels, exported by verify itself
    w4 = json.loads((ws / "resnet20" / "export" / "tflite-int8-w4a8" / "manifest.json").read_text())
    assert w4["weights"]["weight_int_range"] == [-7, 7] and w4["weights"]["bits"] == "w4a8"
    assert any("ran `ghnq-deploy export --target tflite-int8 --bits w4a8`" in n for n in rep["notes"])
    for device in ("x86-litert", "litert-ref"):
        folder = ws / "resnet20" / "verify" / device
        on_disk = json.loads((folder / "report.json").read_text())
        assert {r["target"] for r in on_disk["rows"]} == {device}
        assert (folder / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (folder / "gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tensorflow" not in done.stderr.lower()


def test_reference_kernels_stay_close_to_the_simulation(report):
    rep, _ = report
    for r in rep["rows"]:
        if r.get("real"):
            s = r["sim_vs_real"]
            assert s["within_one_step"] >= 0.95, (r["target"], r["bits"], s)
            assert s["clear_margin_agreement"] is None or s["clear_margin_agreement"] >= 95


def test_integer_simulator_stage_against_the_reference_kernels(run):
    _, env = run
    done = cli(["verify", "-d", "litert-ref", "--limit-images", "50", "--timing-runs", "2", "--integer-sim", "--json"], env)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)["rows"][0]
    vs_real = row["integer_sim"]["vs_real"]
    assert row["integer_sim"]["rounding"] == "double" and vs_real["images"] == 50
    assert vs_real["max_step_diff"] <= 1 and vs_real["within_one_step"] == 1.0


def test_tflite_micro_target_is_bit_exact_with_its_integer_simulation(run):
    """tflm-ref: TFLite Micro's interpreter runs the int8 file; the integer simulator with its
    kernel set predicts every output code (W8A8 and the W4A8 file alike)."""
    pytest.importorskip("tflite_micro")
    _, env = run
    done = cli(["verify", "-d", "tflm-ref", "--bits", "w8a8,w4a8", "--limit-images", "60", "--timing-runs", "2",
                "--json"], env)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    assert {r["bits"] for r in rows} == {"w8a8", "w4a8"}
    for r in rows:
        assert r["device"]["runtime"] == "tflite-micro" and r["device"]["kernels"] == "reference"
        sim = r["integer_sim"]
        assert sim["kernels"] == "tflm" and sim["rounding"] == "double"
        assert sim["vs_real"]["images"] == 60 and sim["vs_real"]["max_step_diff"] == 0, sim["vs_real"]
        assert r["gap"]["parts"]  # the chain ends on the TFLM run


def test_onnx_target_sim_reads_its_encodings_from_the_file(run):
    """onnxruntime-cpu: the target sim executes the exported QDQ file itself (quant/onnx_sim.py)."""
    _, env = run
    done = cli(["verify", "-d", "onnxruntime-cpu", "--bits", "w8a8,w4a8", "--limit-images", "100",
                "--timing-runs", "2", "--json"], env)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    assert {r["bits"] for r in rows} == {"w8a8", "w4a8"}
    for r in rows:
        assert r["format"] == "onnx-int8" and r["target_sim_encodings"].startswith("read from the exported file")
        s = r["sim_vs_real"]
        assert s["within_one_step"] >= 0.99 and s["max_step_diff"] <= 3, s
        assert s["clear_margin_agreement"] in (None, 100.0)


def test_rounding_option_picks_the_integer_simulator_mode(run):
    _, env = run
    done = cli(["verify", "-d", "x86-litert", "--limit-images", "50", "--timing-runs", "2", "--rounding", "xnnpack",
                "--json"], env)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)["rows"][0]
    assert row["integer_sim"]["rounding"] == "xnnpack"
    assert row["integer_sim"]["vs_real"]["within_one_step"] >= 0.99  # vs XNNPACK itself
    done = cli(["verify", "-d", "x86-litert", "--limit-images", "50", "--timing-runs", "2", "--no-integer-sim",
                "--json"], env)
    row = json.loads(done.stdout)["rows"][0]
    assert row["integer_sim"] is None and "integer arithmetic + kernel / platform" in row["gap"]["parts"]


def test_localise_on_request_and_past_max_gap(run):
    _, env = run
    common = ["verify", "-d", "litert-ref", "--limit-images", "50", "--timing-runs", "2"]
    done = cli(common + ["--localise", "--json"], env)
    assert done.returncode == 0, done.stderr
    loc = json.loads(done.stdout)["rows"][0]["localise"]
    assert loc["samples"] == 8 and loc["kernels"] == "reference" and len(loc["layers"]) > 10
    means = [r["vs_float_mean_steps"] for r in loc["layers"] if r["vs_float_mean_steps"] is not None]
    assert means == sorted(means, reverse=True)
    assert all(r["vs_sim_max_steps"] == 0 for r in loc["layers"])  # reference kernels == integer simulator
    gated = cli(common + ["--max-gap", "0", "--json"], env)
    row = json.loads(gated.stdout)["rows"][0]
    over = abs(row["gap"]["total_pt"]) > 0 or abs(row["delta_top1_pt"]) > 0
    assert bool(row.get("localise")) == over


def test_max_gap_exit_codes(report, run):
    rep, _ = report
    ws, env = run
    worst = max(abs(r["delta_top1_pt"]) for r in rep["rows"] if r.get("real") and r["target"] == "x86-litert")
    common = ["verify", "-d", "x86-litert", "--bits", "w8a8,w4a8", "--limit-images", "200", "--timing-runs", "2"]
    assert cli(common + ["--max-gap", "100"], env).returncode == 0
    gated = cli(common + ["--max-gap", "0"], env)
    assert gated.returncode == (1 if worst > 0 else 0), gated.stderr
    bad = cli(common + ["--max-gap", "-1"], env)
    assert bad.returncode == 2


@pytest.mark.parametrize("args,expect", [
    (["--device", "nope"], "unknown target 'nope'"),
    (["--bits", "w8a8,w8a8"], "distinct bit-widths"),
    (["--bits", "fp32"], "fp32 is the float stage"),
    (["--rounding", "nearest"], "--rounding 'nearest'"),
    (["-d", "x86-litert", "--emulator", "qemu"], "declares no [emulation]"),
    (["-d", "x86-litert", "--host", "pi@x"], "runs on this host"),
    (["--model", "/nonexistent/model.pt"], "no such model"),
])
def test_usage_errors_are_one_line(run, args, expect):
    _, env = run
    done = cli(["verify", "--limit-images", "10", *args], env)
    assert done.returncode == 2 and expect in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().count("\n") == 0 or done.stderr.strip().startswith("error:")


@pytest.mark.skipif(SSHD is None, reason="no OpenSSH server (apt-get install -y openssh-server)")
def test_verify_over_ssh_through_an_alias(run, tmp_path):
    ws, env = run
    srv = SSHServer(tmp_path / "sshd").start()
    try:
        doc = tomllib.loads((ROOT / "ghnq_deploy" / "targets" / "rpi4.toml").read_text())
        text = (ROOT / "ghnq_deploy" / "targets" / "rpi4.toml").read_text()
        text = text.replace('name = "rpi4"', 'name = "ssh-box"').replace(
            'python = "python3"', f'python = "{sys.executable}"').replace('threads = 4', 'threads = 1')
        target = tmp_path / "ssh-box.toml"
        target.write_text(text)
        assert doc["connection"]["python"] == "python3"
        done = cli(["verify", "-d", "ssh-box", "--target-file", str(target), "--host", ALIAS, "--ssh-config",
                    str(srv.ssh_config), "--limit-images", "50", "--timing-runs", "2", "--json"], env)
        assert done.returncode == 0, done.stderr
        row = json.loads(done.stdout)["rows"][0]
        assert row["where"].endswith("over SSH") and row["device"]["where"] == "ssh"
        assert row["device"]["remote_temp_removed"] is True
        assert list(srv.remote_tmp.glob("ghnq-verify.*")) == []
    finally:
        srv.stop()


@pytest.mark.slow
def test_verify_on_the_emulated_pi(run):
    """aarch64 LiteRT under QEMU (cortex-a72): the ARM kernels' outputs against the file's simulation."""
    from ghnq_deploy.verify import emulator

    missing = emulator.check_system_packages()
    if missing:
        pytest.skip(f"missing system packages: {', '.join(missing)}")
    emulator.setup("rpi4")  # cached outside the clone: reused when already prepared
    _, env = run
    done = cli(["verify", "-d", "rpi4", "--emulator", "qemu", "--limit-images", "100", "--timing-runs", "3",
                "--json"], env)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)["rows"][0]
    assert row["where"].startswith("emulated") and row["device"]["emulated"] is True
    assert row["device"]["machine"] == "aarch64" and "Cortex-A72" in row["device"]["cpu"]
    assert row["sim_vs_real"]["within_one_step"] >= 0.99

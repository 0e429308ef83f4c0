"""Calibration / evaluation sets: shipped files, byte-identical rebuild, and one-line refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ghnq_deploy.calibration import (SHIPPED, SHIPPED_DIR, CalibrationError, build_and_save, build_calibration_set,
                                     class_balanced_indices, load_calibration, load_eval_set, load_image_set,
                                     validate_images)
from ghnq_deploy.data import load_cifar10, normalize

ROOT = Path(__file__).resolve().parent.parent
SHARED_CIFAR10 = Path("/work/shared/data/cifar10")
needs_cifar10 = pytest.mark.skipif(not SHARED_CIFAR10.is_dir() and not os.environ.get("GHNQ_CIFAR10"),
                                   reason="no CIFAR-10 copy on this machine")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "from ghnq_deploy.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_shipped_sets_are_class_balanced_uint8_nhwc_and_match_the_manifest():
    manifest = json.loads((ROOT / "calibration" / "manifest.json").read_text())
    entries = {e["file"]: e for e in manifest["files"]}
    cal, ev = load_calibration(), load_eval_set()
    for data, count, split in ((cal, 1000, "train"), (ev, 2000, "test")):
        assert data.images.dtype == np.uint8 and data.images.shape == (count, 32, 32, 3)
        assert np.bincount(data.labels, minlength=10).tolist() == [count // 10] * 10
        assert data.meta["split"] == split and data.meta["seed"] == 0 and data.meta["count"] == count
        entry = entries[data.path.name]
        assert entry["sha256"] == data.sha256 and entry["count"] == count
        assert (ROOT / entry["path"]).resolve() == data.path.resolve()
        assert data.path.parent == SHIPPED_DIR and data.path.name in SHIPPED.values()
        # shuffled: a prefix is class-mixed (the evaluation subsets rely on it)
        assert len(set(data.labels[:50].tolist())) >= 8
    assert "JPEG copy" in ev.description and "normalize" in cal.meta["preprocessing"]
    assert len(set(cal.index.tolist())) == 1000 and cal.index.max() < 45000  # never the val hold-out


@needs_cifar10
def test_shipped_sets_hold_the_source_pixels_and_rebuild_byte_identically(tmp_path):
    cal = load_calibration()
    train = load_cifar10("train")
    assert np.array_equal(train.images[cal.index], cal.images) and np.array_equal(train.labels[cal.index], cal.labels)
    rebuilt = build_and_save(None, 1000, 0, "train", tmp_path / "c.npz")
    assert rebuilt.sha256 == cal.sha256  # the README's rebuild command reproduces the shipped file
    ev = load_eval_set()
    test = load_cifar10("test")
    assert np.array_equal(test.images[ev.index], ev.images) and np.array_equal(test.labels[ev.index], ev.labels)


@needs_cifar10
def test_build_is_seeded_and_class_balanced(tmp_path):
    a = build_calibration_set(None, 25, 3, "test")
    b = build_calibration_set(None, 25, 3, "test")
    c = build_calibration_set(None, 25, 4, "test")
    assert np.array_equal(a.index, b.index) and not np.array_equal(a.index, c.index)
    assert np.bincount(a.labels, minlength=10).tolist() == [3] * 5 + [2] * 5  # remainder to the lowest classes
    with pytest.raises(CalibrationError):
        build_calibration_set(None, 5, 0, "train")
    with pytest.raises(CalibrationError):
        build_calibration_set(None, 100, 0, "nonsense")


def test_class_balanced_indices_refuses_too_small_classes():
    labels = np.array([0] * 5 + [1] * 50)
    with pytest.raises(CalibrationError, match="class 0"):
        class_balanced_indices(labels, 20, 0, num_classes=2)


GOOD = None


def _good() -> np.ndarray:
    global GOOD
    if GOOD is None:
        GOOD = load_calibration().images[:64]
    return GOOD


BAD_INPUTS = {
    "normalised floats": (lambda x: normalize(x).permute(0, 2, 3, 1).numpy(), "already normalised"),
    "normalised torch NCHW": (lambda x: normalize(x), "already normalised"),
    "[0,1] floats": (lambda x: x.astype(np.float32) / 255, "scaled to [0, 1]"),
    "0..255 floats": (lambda x: x.astype(np.float32), "convert to uint8"),
    "int64 pixels": (lambda x: x.astype(np.int64), "dtype int64"),
    "NCHW uint8": (lambda x: x.transpose(0, 3, 1, 2).copy(), "NCHW"),
    "grayscale": (lambda x: x[..., :1].copy(), "1 channels"),
    "RGBA": (lambda x: np.concatenate([x, x[..., :1]], axis=3), "4 channels"),
    "wrong size": (lambda x: x[:, :28, :28].copy(), "expected (N, 32, 32, 3)"),
    "single image": (lambda x: x[0], "not a batch"),
    "empty": (lambda x: x[:0], "at least 1"),
    "normalised cast to uint8": (lambda x: normalize(x).permute(0, 2, 3, 1).numpy().astype(np.uint8), "distinct pixel values"),
    "constant": (lambda x: np.full_like(x, 128), "distinct pixel values"),
    "NaN floats": (lambda x: np.full(x.shape, np.nan, np.float32), "NaN"),
    "a list": (lambda x: x.tolist()[:2], "numpy array"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_images_are_refused_with_one_line(case):
    make, message = BAD_INPUTS[case]
    with pytest.raises(CalibrationError) as info:
        validate_images(make(_good()))
    text = str(info.value)
    assert message in text and "\n" not in text


def test_good_images_pass_and_torch_uint8_is_accepted():
    x = _good()
    assert validate_images(x) is not None
    assert validate_images(torch.from_numpy(x)).shape == x.shape
    with pytest.raises(CalibrationError, match="at least 100"):
        validate_images(x, min_count=100)
    with pytest.raises(CalibrationError, match="expects 1"):
        validate_images(x, image_shape=(1, 32, 32))


def test_bad_files_are_refused_and_nothing_falls_back(tmp_path):
    x = _good()
    cases = {
        "missing.npz": None,
        "text.npz": lambda p: p.write_text("not a zip"),
        "no_x.npz": lambda p: np.savez(p, images=x),
        "float.npz": lambda p: np.savez(p, x=normalize(x).permute(0, 2, 3, 1).numpy(), y=np.zeros(64, int)),
        "labels.npz": lambda p: np.savez(p, x=x, y=np.full(64, 12)),
        "short_labels.npz": lambda p: np.savez(p, x=x, y=np.zeros(3, int)),
    }
    for name, write in cases.items():
        path = tmp_path / name
        if write:
            write(path)
        with pytest.raises(CalibrationError) as info:
            load_calibration(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
    np.savez(tmp_path / "unlabelled.npz", x=x)
    assert len(load_calibration(tmp_path / "unlabelled.npz")) == 64  # calibration needs no labels...
    with pytest.raises(CalibrationError, match="needs labels"):
        load_eval_set(tmp_path / "unlabelled.npz")  # ...evaluation does
    custom = load_image_set(tmp_path / "unlabelled.npz")
    assert np.array_equal(custom.images, x) and custom.sha256


def test_calibration_cli_build_check_and_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=_good().transpose(0, 3, 1, 2))
    result = _cli("calibration", "check", str(bad), cwd=tmp_path)
    assert result.returncode == 2 and "NCHW" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    ok = _cli("calibration", "check", "calibration", "eval", "--json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert [e["count"] for e in json.loads(ok.stdout)] == [1000, 2000]
    wrong = _cli("calibration", "build", "--split", "nonsense", "-o", "x.npz", cwd=tmp_path)
    assert wrong.returncode == 2 and "unknown split" in wrong.stderr and "Traceback" not in wrong.stderr
    if SHARED_CIFAR10.is_dir():
        built = _cli("calibration", "build", "--data", str(SHARED_CIFAR10), "-n", "30", "--seed", "1",
                     "--split", "test", "-o", "small.npz", "--json", cwd=tmp_path)
        assert built.returncode == 0, built.stderr
        info = json.loads(built.stdout)
        assert info["count"] == 30 and info["class_counts"] == [3] * 10 and info["split"] == "test"
        assert load_eval_set(tmp_path / "small.npz").sha256 == info["sha256"]

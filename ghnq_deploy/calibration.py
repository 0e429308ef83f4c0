"""Calibration and evaluation image sets: build, save, load and validate.

Exports need real images twice: to calibrate BatchNorm running statistics and int8
activation ranges (the calibration set, from CIFAR-10 train), and to measure accuracy
right after export (the evaluation set, from the CIFAR-10 test JPEG copy). Both are
stored as raw ``uint8`` NHWC RGB pixels; the one place that normalises them is
:func:`ghnq_deploy.data.normalize` (the training preprocessing), so a file can never
carry a second, different preprocessing. Anything else (floats, NCHW, wrong channel
count, pixels that are not 8-bit photos) is refused with one line: wrong calibration data
is the silent failure users of quantization tools complain about most, so there is no
fallback to random or default data either.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ghnq_deploy.data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10
from ghnq_deploy.errors import UserError

CALIBRATION_FORMAT = "ghnq-deploy/image-set"
SHIPPED_DIR = Path(__file__).resolve().parent / "calibration_data"
SHIPPED = {
    "calibration": "cifar10-calib-train-1000-seed0.npz",
    "eval": "cifar10-eval-test-jpeg-2000-seed0.npz",
}
DEFAULT_CALIBRATION = "calibration"
DEFAULT_EVAL = "eval"
MIN_DISTINCT_VALUES = 16  # real 8-bit photos use far more; normalised data cast to uint8 uses a handful
PREPROCESSING = (f"uint8 RGB NHWC pixels; at use: x/255, minus mean {list(CIFAR10_MEAN)}, divided by std "
                 f"{list(CIFAR10_STD)} (ghnq_deploy.data.normalize, the GHN training preprocessing), NCHW")


class CalibrationError(UserError):
    """Calibration or evaluation images that cannot be used as they are; one line."""


@dataclass
class ImageSetFile:
    """Raw images with labels and where they came from (what a calibration .npz holds)."""

    images: np.ndarray  # uint8 (N, H, W, C) RGB
    labels: np.ndarray  # int64 (N,)
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None
    index: np.ndarray | None = None  # rows of the source split, when built from one

    def __len__(self) -> int:
        return len(self.images)

    @property
    def description(self) -> str:
        return str(self.meta.get("description", self.path or "images"))

    def subset(self, count: int | None) -> ImageSetFile:
        """The first ``count`` images (the files are shuffled, so a prefix stays class-mixed)."""
        if count is None or count >= len(self):
            return self
        meta = dict(self.meta, description=f"{self.description}, first {count}", count=count)
        index = None if self.index is None else self.index[:count]
        return ImageSetFile(self.images[:count], self.labels[:count], meta, self.path, self.sha256, index)


# ----------------------------------------------------------------------------- validation


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(v) for v in shape) + ")"


def validate_images(images: Any, what: str = "calibration images", image_shape: tuple[int, int, int] = (3, 32, 32),
                    min_count: int = 1) -> np.ndarray:
    """Return ``images`` as a uint8 NHWC array, or raise CalibrationError naming the problem.

    ``image_shape`` is the net's input (C, H, W). Refused: non-uint8 dtypes (with a hint when
    floats look already normalised or scaled to [0, 1]), NCHW layout, wrong channel count or
    size, too few images, and uint8 data with too few distinct values to be 8-bit photos.
    """
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise CalibrationError(f"{what}: expected a numpy array of uint8 pixels, got {type(images).__name__}")
    c, h, w = image_shape
    expected = f"uint8 (N, {h}, {w}, {c}) NHWC RGB pixels 0..255"
    if images.dtype != np.uint8:
        if np.issubdtype(images.dtype, np.floating) and images.size:
            if not np.isfinite(images).all():
                raise CalibrationError(f"{what}: {images.dtype} values contain NaN or inf; expected {expected}")
            lo, hi = float(images.min()), float(images.max())
            if lo < 0:
                raise CalibrationError(
                    f"{what}: {images.dtype} values in [{lo:.2f}, {hi:.2f}] look already normalised; pass raw "
                    f"{expected} (normalisation is applied once, at use)")
            if hi <= 1.0:
                raise CalibrationError(
                    f"{what}: {images.dtype} values in [{lo:.2f}, {hi:.2f}] look scaled to [0, 1]; pass raw {expected}")
            raise CalibrationError(f"{what}: dtype {images.dtype} (values {lo:.0f}..{hi:.0f}); convert to {expected}")
        raise CalibrationError(f"{what}: dtype {images.dtype}; expected {expected}")
    if images.ndim != 4:
        raise CalibrationError(f"{what}: shape {_shape_text(images.shape)} is not a batch of images; expected {expected}")
    n = images.shape[0]
    if images.shape[1:] == (c, h, w) and images.shape[1:] != (h, w, c):
        raise CalibrationError(f"{what}: shape {_shape_text(images.shape)} is NCHW; expected NHWC (N, {h}, {w}, {c}) "
                               f"(use x.transpose(0, 2, 3, 1))")
    if images.shape[1:3] == (h, w) and images.shape[3] != c:
        raise CalibrationError(f"{what}: {images.shape[3]} channels, the net expects {c} (RGB); "
                               f"shape {_shape_text(images.shape)}")
    if images.shape[1:] != (h, w, c):
        raise CalibrationError(f"{what}: shape {_shape_text(images.shape)}; expected (N, {h}, {w}, {c})")
    if n < max(1, min_count):
        raise CalibrationError(f"{what}: {n} images; at least {max(1, min_count)} are needed")
    distinct = len(np.unique(images[: min(n, 256)]))
    if distinct < MIN_DISTINCT_VALUES:
        raise CalibrationError(
            f"{what}: only {distinct} distinct pixel values; not raw 8-bit photos (normalised or [0, 1] data cast "
            f"to uint8?); expected {expected}")
    return np.ascontiguousarray(images)


def validate_labels(labels: Any, count: int, num_classes: int = 10, what: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise CalibrationError(f"{what}: expected {count} integer class ids, got {labels.dtype} {_shape_text(labels.shape)}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise CalibrationError(f"{what}: class ids must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


# ----------------------------------------------------------------------------- build / save / load


def class_balanced_indices(labels: np.ndarray, n: int, seed: int, num_classes: int = 10) -> np.ndarray:
    """``n`` row indices with n/num_classes per class (remainder to the lowest classes), shuffled.

    Drawn with numpy's PCG64 from ``seed``; the indices are stored in the file, so the set is
    reproducible from the file alone even if a future numpy draws differently.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    per_class = [n // num_classes + (1 if c < n % num_classes else 0) for c in range(num_classes)]
    chosen = []
    for cls, k in enumerate(per_class):
        pool = np.flatnonzero(labels == cls)
        if len(pool) < k:
            raise CalibrationError(f"class {cls} has only {len(pool)} images; cannot draw {k} per class")
        chosen.append(np.sort(rng.permutation(pool)[:k]))
    return rng.permutation(np.concatenate(chosen))


def build_calibration_set(data_dir: str | os.PathLike | None, n: int, seed: int, split: str = "train") -> ImageSetFile:
    """A seeded, class-balanced draw of ``n`` CIFAR-10 images from ``split`` (train or test)."""
    if split not in ("train", "test", "val", "train-all"):
        raise CalibrationError(f"unknown split {split!r}; choose train, val, train-all or test")
    if n < 10:
        raise CalibrationError(f"-n must be at least 10 (one image per class), got {n}")
    source = load_cifar10(split, data_dir)
    index = class_balanced_indices(source.labels, n, seed)
    images = validate_images(source.images[index], what=f"CIFAR-10 {split}")
    labels = source.labels[index]
    counts = np.bincount(labels, minlength=10).tolist()
    meta = {
        "format": CALIBRATION_FORMAT,
        "version": 1,
        "description": f"{source.description}, {n} images, class-balanced seeded draw (seed {seed})",
        "source": source.description,
        "split": split,
        "count": n,
        "seed": seed,
        "class_counts": counts,
        "selection": "numpy PCG64(seed): per class a random n/10 rows (remainder to the lowest classes), then "
                     "one shuffle of all rows; 'index' holds the rows of the source split",
        "layout": "uint8 NHWC RGB",
        "preprocessing": PREPROCESSING,
    }
    return ImageSetFile(images, labels.astype(np.int64), meta, index=index)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_image_set(path: str | os.PathLike, data: ImageSetFile) -> str:
    """Write a compressed npz (x uint8 NHWC, y uint8, index int32, meta JSON) atomically; return its sha256."""
    from ghnq_deploy.io import atomic_write

    path = Path(path)
    if path.suffix != ".npz":
        raise CalibrationError(f"{path}: the output file must end in .npz")
    images = validate_images(data.images)
    labels = validate_labels(data.labels, len(images))
    arrays: dict[str, np.ndarray] = {"x": images, "y": labels.astype(np.uint8),
                                     "meta": np.array(json.dumps(data.meta, sort_keys=True))}
    if data.index is not None:
        arrays["index"] = np.asarray(data.index, dtype=np.int32)

    def write(tmp: Path) -> None:
        # what np.savez_compressed does, with a fixed member timestamp so that a rebuild gives
        # byte-identical files (the SHA-256 in calibration/manifest.json is then reproducible)
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)

    atomic_write(path, write)
    path.chmod(0o644)  # mkstemp creates 0600; a data file is meant to be read by everyone
    data.path, data.sha256 = path, file_sha256(path)
    return data.sha256


def build_and_save(data_dir: str | os.PathLike | None, n: int, seed: int, split: str, out: str | os.PathLike) -> ImageSetFile:
    """Build a set and write it to ``out`` (keeping the source row indices in the file)."""
    data = build_calibration_set(data_dir, n, seed, split)
    save_image_set(out, data)
    return data


def resolve_image_set(name_or_path: str | os.PathLike | None, default: str = DEFAULT_CALIBRATION) -> Path:
    """'calibration' / 'eval' (the shipped sets) or a file path; None means ``default``."""
    key = str(name_or_path) if name_or_path is not None else default
    if key in SHIPPED:
        path = SHIPPED_DIR / SHIPPED[key]
        if not path.exists():
            raise CalibrationError(f"the shipped {key} set is not in this installation ({path})")
        return path
    path = Path(key)
    if not path.is_file():
        raise CalibrationError(f"{path}: no such calibration file (shipped sets: {', '.join(SHIPPED)})")
    return path


_EXPECTED = "expected an .npz archive (np.savez) with x: uint8 (N, 32, 32, 3) and y: labels"


def sniff_kind(path: Path) -> str | None:
    """What a file that should be an .npz really is, from its first bytes; None for a zip archive."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if head.startswith(b"PK"):
        return None
    if not head:
        return "an empty file"
    if head.startswith(b"\x93NUMPY"):
        return "a single .npy array (np.save), not an .npz archive"
    if head[:1] == b"\x80":
        return "a Python pickle"
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff"):
        return "an image file (PNG / JPEG)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data that is not a zip archive"
    if "," in text.split("\n", 1)[0]:
        return "a text file that looks like CSV"
    return "a text file"


def load_image_set(name_or_path: str | os.PathLike | None = None, default: str = DEFAULT_CALIBRATION,
                   image_shape: tuple[int, int, int] = (3, 32, 32), min_count: int = 1,
                   num_classes: int = 10) -> ImageSetFile:
    """Load and validate a set: shipped by name, or an .npz with ``x`` (uint8 NHWC) and ``y``."""
    path = resolve_image_set(name_or_path, default)
    kind = sniff_kind(path)
    if kind is not None:
        raise CalibrationError(f"{path}: this is {kind}; {_EXPECTED}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CalibrationError(f"{path}: not a readable .npz image set ({reason})") from None
    if "x" not in arrays:
        raise CalibrationError(f"{path}: no array 'x' (expected x: uint8 (N, 32, 32, 3) and y: labels)")
    images = validate_images(arrays["x"], what=str(path), image_shape=image_shape, min_count=min_count)
    labels = (validate_labels(arrays["y"], len(images), num_classes, what=f"{path}: y") if "y" in arrays
              else np.full(len(images), -1, dtype=np.int64))
    meta: dict[str, Any] = {}
    if "meta" in arrays:
        try:
            meta = json.loads(str(arrays["meta"]))
        except (json.JSONDecodeError, ValueError):
            raise CalibrationError(f"{path}: 'meta' is not JSON") from None
        if not isinstance(meta, dict):
            raise CalibrationError(f"{path}: 'meta' must be a JSON object")
    meta.setdefault("description", f"{path.name} ({len(images)} images)")
    meta.setdefault("count", len(images))
    index = arrays.get("index")
    if index is not None:
        if index.dtype.kind not in "iu" or index.shape != (len(images),):
            raise CalibrationError(f"{path}: 'index' must hold one integer row index per image")
        index = index.astype(np.int64)
    return ImageSetFile(images, labels, meta, path, file_sha256(path), index)


def load_calibration(name_or_path: str | os.PathLike | None = None, **kw: Any) -> ImageSetFile:
    """The calibration set (default: the shipped 1,000 class-balanced CIFAR-10 train images)."""
    return load_image_set(name_or_path, DEFAULT_CALIBRATION, **kw)


def load_eval_set(name_or_path: str | os.PathLike | None = None, **kw: Any) -> ImageSetFile:
    """The evaluation set (default: the shipped 2,000 class-balanced CIFAR-10 test JPEG-copy images)."""
    data = load_image_set(name_or_path, DEFAULT_EVAL, **kw)
    if (data.labels < 0).any():
        raise CalibrationError(f"{data.path}: an evaluation set needs labels (array 'y')")
    return data


def describe_file(path: str | os.PathLike) -> dict[str, Any]:
    """One entry of calibration/manifest.json: the file's hash, size and recorded provenance."""
    data = load_image_set(path)
    meta = {k: v for k, v in data.meta.items() if k not in ("format", "version")}
    return {"file": Path(path).name, "sha256": data.sha256, "bytes": Path(path).stat().st_size,
            "shape": list(data.images.shape), "dtype": "uint8", **meta}

"""CIFAR-10 loading (npz copy or the official cifar-10-batches-py layout) and augmentation."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ghnq_deploy.errors import UserError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
VAL_SIZE = 5000  # the last 5,000 training images are held out from GHN training (as GHN-2)
_CANDIDATES = ("data/cifar10", "../shared/data/cifar10", "~/.cache/ghnq-deploy/cifar10")


class DataError(UserError):
    """Data that is missing or not what it claims to be; one line."""


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, 32, 32, 3) HWC RGB
    labels: np.ndarray  # int64 (N,)
    description: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, count: int | None) -> ImageSet:
        if count is None or count >= len(self):
            return self
        return ImageSet(self.images[:count], self.labels[:count], f"{self.description}[:{count}]")


def find_cifar10(path: str | os.PathLike | None = None) -> Path:
    """The CIFAR-10 folder: ``path``, $GHNQ_CIFAR10, or a known location."""
    options = [path] if path else [os.environ.get("GHNQ_CIFAR10"), *_CANDIDATES]
    for option in options:
        if option and _layout(Path(option).expanduser()):
            return Path(option).expanduser()
    wanted = path or "$GHNQ_CIFAR10 or one of " + ", ".join(_CANDIDATES)
    raise DataError(f"no CIFAR-10 found at {wanted} (expected cifar10_train_*.npz or cifar-10-batches-py)")


def _layout(folder: Path) -> str | None:
    if (folder / "cifar10_train_0.npz").exists():
        return "npz"
    if (folder / "data_batch_1").exists():
        return "batches"
    if (folder / "cifar-10-batches-py" / "data_batch_1").exists():
        return "batches-parent"
    return None


def load_cifar10(split: str, path: str | os.PathLike | None = None) -> ImageSet:
    """``split``: train (45k), val (last 5k of train), train-all (50k), test, test-lossless1000.

    ``path`` may also be a single .npz file with arrays x (uint8 NHWC) and y: it is then
    used whole, whatever the split (a user-made subset, e.g. for a machine with little disk).
    """
    if path and Path(path).is_file() and str(path).endswith(".npz"):
        data = np.load(path)
        if "x" not in data or "y" not in data:
            raise DataError(f"{path}: expected arrays 'x' (uint8 N,32,32,3) and 'y'")
        return ImageSet(np.ascontiguousarray(data["x"], dtype=np.uint8), data["y"].astype(np.int64), f"{path}")
    folder = find_cifar10(path)
    layout = _layout(folder)
    if layout == "batches-parent":
        folder, layout = folder / "cifar-10-batches-py", "batches"
    if split in ("train", "val", "train-all"):
        if layout == "npz":
            parts = [np.load(folder / f"cifar10_train_{k}.npz") for k in range(5)]
            x = np.concatenate([p["x"] for p in parts])
            y = np.concatenate([p["y"] for p in parts])
        else:
            x, y = _read_batches([folder / f"data_batch_{k}" for k in range(1, 6)])
        if split == "train":
            x, y = x[:-VAL_SIZE], y[:-VAL_SIZE]
        elif split == "val":
            x, y = x[-VAL_SIZE:], y[-VAL_SIZE:]
        desc = f"CIFAR-10 {split}"
    elif split == "test":
        if layout == "npz":
            data = np.load(folder / "cifar10_test.npz")
            x, y = data["x"], data["y"]
            desc = "CIFAR-10 test (JPEG copy)"
        else:
            x, y = _read_batches([folder / "test_batch"])
            desc = "CIFAR-10 test"
    elif split == "test-lossless1000":
        if layout != "npz":
            x, y = _read_batches([folder / "test_batch"])
            x, y = x[:1000], y[:1000]
        else:
            data = np.load(folder / "cifar10_test_first1000_lossless.npz")
            x, y = data["x"], data["y"]
        desc = "CIFAR-10 test[:1000] (lossless)"
    else:
        raise DataError(f"unknown CIFAR-10 split {split!r}")
    return ImageSet(np.ascontiguousarray(x, dtype=np.uint8), y.astype(np.int64), desc)


def _read_batches(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f in files:
        with open(f, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(batch[b"labels"]))
    return np.concatenate(xs), np.concatenate(ys)


def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW with CIFAR-10 mean/std normalisation (the training preprocessing)."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop 32 with padding 4 and horizontal flip, on a normalised NCHW batch."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    out = _crop(padded, dy, dx, h, w)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def _crop(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n = padded.shape[0]
    rows = dy[:, None] + torch.arange(h)[None, :]  # (n, h)
    cols = dx[:, None] + torch.arange(w)[None, :]  # (n, w)
    batch = torch.arange(n)[:, None, None]
    # advanced indexing: (n, h, w, C) -> NCHW
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()

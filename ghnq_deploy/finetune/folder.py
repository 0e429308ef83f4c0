"""Class-per-folder image sets (``root/<class>/<image>``) at the net's input size.

Fine-tuning on the user's own data must refuse what would silently train the wrong thing:
images of another size (resizing would change what the net sees at deployment), a class
count that is not the net's, empty class folders and files that are not images.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ghnq_deploy.data import DataError, ImageSet

def is_image_folder(path: str | os.PathLike) -> bool:
    """A folder whose entries include sub-folders (classes) and no CIFAR-10 files."""
    path = Path(path)
    return path.is_dir() and any(p.is_dir() for p in path.iterdir()) and not any(
        (path / name).exists() for name in ("cifar10_train_0.npz", "data_batch_1", "cifar-10-batches-py"))


def load_image_folder(root: str | os.PathLike, image_shape: tuple[int, int, int],
                      num_classes: int) -> tuple[ImageSet, list[str]]:
    """All images under ``root`` as uint8 NHWC RGB with labels (classes in sorted folder order).

    ``image_shape`` is the net's (C, H, W); every image must already be H x W. Returns the
    set and the class names (label k is ``names[k]``).
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such image folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: empty image folder (expected one sub-folder of images per class)")
    if len(classes) != num_classes:
        raise DataError(f"{root}: {len(classes)} class folders, the net has {num_classes} classes")
    c, h, w = image_shape
    if c != 3:
        raise DataError(f"{root}: image folders hold RGB images; the net expects {c} input channels")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{root / name}: empty class folder (no images)")
        for f in files:
            try:
                with Image.open(f) as img:
                    size = img.size
                    pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
            except (UnidentifiedImageError, OSError, ValueError):
                raise DataError(f"{f}: not an image (PIL cannot read it)") from None
            if size != (w, h):
                raise DataError(f"{f}: image is {size[0]}x{size[1]}, the net takes {w}x{h} (resize the data set "
                                "to the net's input size)")
            images.append(pixels)
            labels.append(label)
    x = np.ascontiguousarray(np.stack(images))
    return ImageSet(x, np.asarray(labels, dtype=np.int64), f"image folder {root} ({len(x)} images)"), classes

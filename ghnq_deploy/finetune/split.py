"""The fine-tune's three image sets: training, held-out validation and calibration.

Validation is never drawn from the training images: on CIFAR-10 it is the 5,000 training
images GHN training also held out (``data.VAL_SIZE``); on an image folder (or a single x/y
.npz) a seeded, class-stratified fraction. Calibration (BatchNorm statistics and activation ranges, as at
export) uses training images: the shipped calibration set on CIFAR-10, which is what
``export`` calibrates with, or a seeded draw from the folder's training part.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ghnq_deploy.data import DataError, ImageSet, load_cifar10
from ghnq_deploy.finetune.folder import is_image_folder, load_image_folder

FOLDER_CALIBRATION_IMAGES = 1000


@dataclass
class FinetuneData:
    train: ImageSet
    val: ImageSet
    calibration: np.ndarray  # uint8 NHWC training images
    source: str  # "cifar10" or "image-folder"
    classes: list[str] | None = None


def load_finetune_data(data: str | os.PathLike | None, image_shape: tuple[int, int, int], num_classes: int,
                       val_count: int | None, val_fraction: float, seed: int,
                       train_images: int | None = None) -> FinetuneData:
    """Split the data the fine-tune trains on; ``train_images`` keeps the first N training images."""
    if data is not None and is_image_folder(data):
        full, classes = load_image_folder(data, image_shape, num_classes)
        train, val = stratified_split(full, val_fraction, seed)
        if train_images:
            train = train.subset(train_images)
        rng = np.random.default_rng(seed)
        cal = train.images[np.sort(rng.permutation(len(train))[:FOLDER_CALIBRATION_IMAGES])]
        return FinetuneData(train, val.subset(val_count), cal, "image-folder", classes)
    if data is not None and os.path.isdir(data) and not any(os.scandir(data)):
        raise DataError(f"{data}: empty folder (expected CIFAR-10 or one sub-folder of images per class)")
    if tuple(image_shape) != (3, 32, 32) or num_classes != 10:
        raise DataError(f"the net takes {list(image_shape)} inputs and {num_classes} classes; CIFAR-10 is 3x32x32 "
                        "with 10: pass --data with an image folder of the net's input size and classes")
    from ghnq_deploy.calibration import load_calibration

    if data is not None and os.path.isfile(data):  # one x/y .npz (as `train` takes): held out by fraction
        train, val = stratified_split(load_cifar10("train", data), val_fraction, seed)
    else:
        train, val = load_cifar10("train", data), load_cifar10("val", data)
    if train_images:
        train = train.subset(train_images)
    cal = load_calibration(None, image_shape=tuple(image_shape), num_classes=num_classes)
    return FinetuneData(train, val.subset(val_count), cal.images, "cifar10")


def stratified_split(images: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, val): ``val_fraction`` of every class (at least one image each) held out, seeded."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"the validation fraction must lie strictly between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    val_idx, train_idx = [], []
    for cls in np.unique(images.labels):
        rows = rng.permutation(np.flatnonzero(images.labels == cls))
        if len(rows) < 2:
            raise DataError(f"{images.description}: class {cls} has {len(rows)} image; at least 2 are needed "
                            "(one to train on, one to validate)")
        k = min(len(rows) - 1, max(1, round(val_fraction * len(rows))))
        val_idx.append(rows[:k])
        train_idx.append(rows[k:])
    tr = rng.permutation(np.concatenate(train_idx))
    va = rng.permutation(np.concatenate(val_idx))
    return (ImageSet(images.images[tr], images.labels[tr], f"{images.description}, training part"),
            ImageSet(images.images[va], images.labels[va], f"{images.description}, held-out {val_fraction:g}"))

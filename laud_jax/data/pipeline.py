"""Input pipelines: one interface for the embedded dataset and any tfds image dataset.

Training streams are grain datasets over a shuffled, endlessly repeated index stream:
global batches of (stream position, example index) pairs, of which each process keeps its
own contiguous slice and renders or loads only that. Per-example randomness is seeded by
(seed, stream position), so the global batch at step k is the same whatever the number of
processes or workers, and the iterator state (a position) is checkpointable.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from laud_jax.data import cluttered_mnist, tfds_source

EMBEDDED = "cluttered_mnist"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset the trainer needs before building a model."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_eval: int


def canvas_spec(data_cfg: Any) -> cluttered_mnist.CanvasSpec:
    """CanvasSpec from a data config."""
    spec = cluttered_mnist.CanvasSpec(
        size=int(data_cfg.image_size), num_clutter=int(data_cfg.num_clutter), fragment_size=int(data_cfg.fragment_size)
    )
    spec.validate()
    return spec


def _normalization(data_cfg: Any, channels: int) -> tuple[np.ndarray, np.ndarray]:
    mean = data_cfg.mean or (tfds_source.IMAGENET_MEAN if channels == 3 else (0.5,) * channels)
    std = data_cfg.std or (tfds_source.IMAGENET_STD if channels == 3 else (0.25,) * channels)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"data.mean/data.std have {len(mean)}/{len(std)} entries but the images have {channels} channels."
        )
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def dataset_info(data_cfg: Any) -> DatasetInfo:
    """Opens the dataset's sources (clear error if missing) and reports its shape facts."""
    size = int(data_cfg.image_size)
    if data_cfg.name == EMBEDDED:
        spec = canvas_spec(data_cfg)
        train_images, _ = cluttered_mnist.split_digits("train")
        test_images, _ = cluttered_mnist.split_digits("test")
        return DatasetInfo(
            EMBEDDED,
            cluttered_mnist.NUM_CLASSES,
            (spec.size, spec.size, 1),
            len(train_images),
            len(test_images) * int(data_cfg.test_copies),
        )
    train = tfds_source.open_source(data_cfg.name, data_cfg.train_split, data_cfg.data_dir)
    evaluation = tfds_source.open_source(data_cfg.name, data_cfg.eval_split, data_cfg.data_dir)
    num_classes, channels = tfds_source.source_info(train)
    return DatasetInfo(data_cfg.name, num_classes, (size, size, channels), len(train), len(evaluation))


def _local_slice(
    batch: tuple[np.ndarray, np.ndarray], process_index: int, process_count: int
) -> tuple[np.ndarray, np.ndarray]:
    positions, indices = batch
    per_process = len(positions) // process_count
    keep = slice(process_index * per_process, (process_index + 1) * per_process)
    return positions[keep], indices[keep]


def _render_embedded(
    batch: tuple[np.ndarray, np.ndarray], spec: cluttered_mnist.CanvasSpec, seed: int
) -> dict[str, np.ndarray]:
    positions, indices = batch
    return cluttered_mnist.render_batch(indices, positions, "train", spec, seed)


def _load_tfds(
    batch: tuple[np.ndarray, np.ndarray], source: Any, size: int, seed: int, mean: np.ndarray, std: np.ndarray
) -> dict[str, np.ndarray]:
    positions, indices = batch
    return tfds_source.load_batch(source, indices, positions, size, True, seed, mean, std)


def train_iterator(
    data_cfg: Any, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """Endless iterator of this process's slice of each global training batch.

    Yields {'image': (global_batch / process_count, H, W, C) float32, 'label': int32}; its
    `get_state()` / `set_state()` make it resumable.
    """
    if global_batch % process_count:
        raise ValueError(f"batch_size={global_batch} is not divisible by the number of processes ({process_count}).")
    if data_cfg.name == EMBEDDED:
        num_train = len(cluttered_mnist.split_digits("train")[0])
        load = functools.partial(_render_embedded, spec=canvas_spec(data_cfg), seed=seed)
    else:
        source = tfds_source.open_source(data_cfg.name, data_cfg.train_split, data_cfg.data_dir)
        _, channels = tfds_source.source_info(source)
        mean, std = _normalization(data_cfg, channels)
        num_train = len(source)
        load = functools.partial(
            _load_tfds, source=source, size=int(data_cfg.image_size), seed=seed, mean=mean, std=std
        )
    ds = grain.MapDataset.range(num_train).shuffle(seed=seed).repeat()
    ds = ds.map_with_index(lambda position, index: (position, index))
    ds = ds.batch(
        global_batch, drop_remainder=True, batch_fn=lambda rows: tuple(np.asarray(column) for column in zip(*rows))
    )
    ds = ds.map(functools.partial(_local_slice, process_index=process_index, process_count=process_count))
    ds = ds.map(load)
    read = grain.ReadOptions(num_threads=max(1, int(data_cfg.num_threads)), prefetch_buffer_size=int(data_cfg.prefetch))
    iter_ds = ds.to_iter_dataset(read)
    if int(data_cfg.num_workers) > 0:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data_cfg.num_workers)))
    return iter(iter_ds)


def eval_batches(
    data_cfg: Any, global_batch: int, process_index: int = 0, process_count: int = 1, ink: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """This process's slice of each global eval batch; the last batch is padded (weight 0).

    `ink`: the embedded dataset's batches also carry 'digit_ink' and 'clutter_ink' (where the
    digit and the clutter were drawn); other datasets have none.
    """
    if global_batch % process_count:
        raise ValueError(
            f"eval batch size {global_batch} is not divisible by the number of processes ({process_count})."
        )
    if data_cfg.name == EMBEDDED:
        data = cluttered_mnist.test_set(canvas_spec(data_cfg), int(data_cfg.test_copies))
        total = len(data["label"])
        keys = ("image", "label", "digit_ink", "clutter_ink") if ink else ("image", "label")
        fetch = lambda idx: {k: data[k][idx] for k in keys}  # noqa: E731
    else:
        source = tfds_source.open_source(data_cfg.name, data_cfg.eval_split, data_cfg.data_dir)
        _, channels = tfds_source.source_info(source)
        mean, std = _normalization(data_cfg, channels)
        total = len(source)
        fetch = lambda idx: tfds_source.load_batch(  # noqa: E731
            source, idx, idx, int(data_cfg.image_size), False, 0, mean, std
        )
    per_process = global_batch // process_count
    for start in range(0, total, global_batch):
        ids = np.arange(start, start + global_batch)[process_index * per_process :][:per_process]
        weight = (ids < total).astype(np.float32)
        batch = fetch(np.minimum(ids, total - 1))
        batch["weight"] = weight
        yield batch

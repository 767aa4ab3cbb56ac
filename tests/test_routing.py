"""Routing's spatial index lists against NumPy constructions: the conv1 pixel list and its
inverse, the row map conv2 reads conv1's rows through; the patch list as (sample, row,
col) and as flat patch ids. Non-square grids, batch > 1, batch-shared and per-sample lists."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from laud_jax.models.specs import network_spec
from laud_jax.sparse.routing import active_slots, block_routing, capacity, conv1_mask


def test_active_slots_are_the_inverse_of_the_list():
    rng = np.random.default_rng(0)
    for size in (1, 5, 128, 300):
        for density in (0.0, 0.3, 1.0):
            flags = rng.random(size) < density
            index, slot, count = (np.asarray(a) for a in active_slots(jnp.asarray(flags)))
            on = np.flatnonzero(flags)
            np.testing.assert_array_equal(index, np.concatenate([on, np.full(size - on.size, size)]))
            expected = np.full(size, size)
            expected[on] = np.arange(on.size)
            np.testing.assert_array_equal(slot, expected)
            assert int(count) == on.size


def _expected_lists(spec, cells: np.ndarray, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Lists of one batch-flattened grid, by loops: active entries in row-major order, then
    padding."""
    batch = cells.shape[0]
    gh, gw = spec.mask_grid
    size = spec.granularity
    on_cells = [(b, i, j) for b in range(batch) for i in range(gh) for j in range(gw) if cells[b, i, j]]
    n_cells = batch * gh * gw
    starts = np.array([[b, i * size, j * size] for b, i, j in on_cells] + [[batch, 0, 0]] * (n_cells - len(on_cells)))
    ids = np.array([(b * gh + i) * gw + j for b, i, j in on_cells] + [n_cells] * (n_cells - len(on_cells)))
    height, width = pixels.shape[1:]
    n_pixels = batch * height * width
    row_map = np.full(n_pixels, n_pixels)
    listed = []
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                if pixels[b, y, x]:
                    row_map[(b * height + y) * width + x] = len(listed)
                    listed.append((b * height + y) * width + x)
    return {
        "starts": starts.reshape(-1, 3),
        "cells": ids,
        "pixels": np.array(listed + [n_pixels] * (n_pixels - len(listed))),
        "row_map": row_map,
        "n_pixels": len(listed),
    }


@pytest.mark.parametrize(
    "mode, batch",
    [("spatial", 1), ("spatial", 3), ("spatial+channel", 3)],
    ids=["shared-b1", "shared-b3", "per-sample-b3"],
)
def test_spatial_lists_and_row_map_match_loops(mode, batch):
    """Every block of a non-square network (strides 1 and 2, S = 1 and 2). The row map
    inverts the pixel list: pixel p's row is its position in the list, inactive pixels
    point past every capacity the list can be cut to."""
    cfg = dict(arch="resnet_tiny", num_classes=10, mode=mode, granularity=(2, 2, 1, 1))
    rng = np.random.default_rng(4)
    for spec in network_spec(cfg, (40, 24, 3)).blocks:
        height, width = spec.conv1_hw
        assert height != width and spec.mask_grid[0] != spec.mask_grid[1]
        spatial = (rng.random((batch, *spec.mask_grid, 1)) < 0.4).astype(np.float32)
        gates = {"spatial": jnp.asarray(spatial)}
        if spec.channel:
            gates["channel"] = jnp.ones((batch, spec.channel_groups), jnp.float32)
        routing, counts = block_routing(spec, gates, batch)
        pixels = np.asarray(conv1_mask(spec, jnp.asarray(spatial)))
        per_sample = spec.channel and batch > 1
        samples = range(batch) if per_sample else [None]
        for b in samples:
            part = slice(b, b + 1) if per_sample else slice(None)
            expected = _expected_lists(spec, spatial[part, ..., 0] > 0, pixels[part])
            for key in ("starts", "cells", "pixels", "row_map"):
                actual = np.asarray(routing[key][b] if per_sample else routing[key])
                np.testing.assert_array_equal(actual, expected[key], err_msg=f"{spec.name} {key} sample {b}")
            # the executor cuts the pixel list to a capacity; active pixels' rows stay inside it
            total = expected["pixels"].size
            cap = capacity(expected["n_pixels"], total, 4) if expected["n_pixels"] else 0
            on = expected["row_map"] < total
            assert np.all(expected["row_map"][on] < cap) and int(counts[1]) >= expected["n_pixels"]

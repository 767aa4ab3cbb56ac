"""From hard masks to index lists: what a block executes, padded to a few static capacities.

A block's *routing* holds, for each gate, the indices of the active units sorted first and
padded with an out-of-range sentinel to the full size, plus their counts. The host reads
the counts, picks a capacity from :func:`capacity` for each, and the block's compiled
function slices the index lists to those static capacities: jit compiles one program per
capacity, never one per count. Padding slots hold the sentinel, which reads zeros and is
never written back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from laud_jax.models.specs import BlockSpec

# Order of the entries of a routing's ``counts`` vector.
COUNT_KEYS = ("cells", "pixels", "groups", "samples")
# Steps of the capacity ladder the engine pads index lists to unless told otherwise.
DEFAULT_CAPACITY_STEPS = 32


@functools.cache
def capacity_ladder(total: int, steps: int) -> tuple[int, ...]:
    """Capacities for a count in [1, total]: powers of two below total/steps, then multiples of it.

    The padding waste is at most ``total / steps`` slots (a bounded fraction of the dense
    work) and a block compiles at most ``log2(total / steps) + steps`` programs.
    """
    if total < 1 or steps < 1:
        raise ValueError(f"capacity_ladder needs total >= 1 and steps >= 1, got {total}, {steps}")
    quantum = total / steps
    ladder = set()
    power = 1
    while power < quantum:
        ladder.add(power)
        power *= 2
    ladder.update(min(total, int(np.ceil(j * quantum))) for j in range(1, steps + 1))
    return tuple(sorted(ladder))


def capacity(count: int, total: int, steps: int) -> int:
    """Smallest ladder capacity holding ``count`` active units (0 for none)."""
    count = int(count)
    if count <= 0:
        return 0
    if count > total:
        raise ValueError(f"count {count} exceeds the {total} units available")
    ladder = capacity_ladder(total, steps)
    return ladder[int(np.searchsorted(ladder, count))]


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Static execution choices for one block call (hashable: part of the jit cache key).

    ``run``: ``"dense"`` (the whole block; a gated block then applies its gates, exact for
    any masks: static blocks, or where ``latency.chooser.ExecutionChooser`` predicts it faster),
    ``"skip"`` (nothing of the residual branch runs) or ``"sparse"``. Capacities are slot counts for active mask cells,
    conv1 pixels, channel groups and samples. ``per_sample``: channel-gated blocks at
    batch > 1 loop over samples, each with its own channel set.
    """

    run: str
    cells: int = 0
    pixels: int = 0
    groups: int = 0
    samples: int = 0
    per_sample: bool = False


def plan_block(spec: BlockSpec, counts: np.ndarray | None, batch: int, steps: int) -> BlockPlan:
    """Choose the block's execution and capacities from its routing counts (host side)."""
    if spec.mode == "static":
        return BlockPlan("dense")
    cells, pixels, groups, samples = (int(c) for c in np.asarray(counts))
    per_sample = spec.channel and batch > 1
    if samples == 0 or (spec.spatial and cells == 0):
        return BlockPlan("skip", per_sample=per_sample)
    totals = count_totals(spec, batch)
    kw: dict[str, Any] = {"per_sample": per_sample}
    if spec.layer:
        kw["samples"] = capacity(samples, totals["samples"], steps)
    if spec.spatial:
        kw["cells"] = capacity(cells, totals["cells"], steps)
        kw["pixels"] = capacity(pixels, totals["pixels"], steps)
    if spec.channel:
        # At least one slot: a block whose every group is off still adds its biases.
        kw["groups"] = max(1, capacity(groups, totals["groups"], steps))
    return BlockPlan("sparse", **kw)


def count_totals(spec: BlockSpec, batch: int) -> dict[str, int]:
    """The number of units each routing count of a dynamic block is out of (per sample for
    channel-gated blocks at batch > 1, which run one sample at a time)."""
    units = 1 if (spec.channel and batch > 1) else batch
    totals = {"samples": batch}
    if spec.spatial:
        totals["cells"] = units * spec.mask_grid[0] * spec.mask_grid[1]
        totals["pixels"] = units * spec.conv1_hw[0] * spec.conv1_hw[1]
    if spec.channel:
        totals["groups"] = spec.channel_groups
    return totals


def counted_keys(spec: BlockSpec) -> tuple[str, ...]:
    """The routing counts (of COUNT_KEYS) that size a dynamic block's index lists: cells and
    pixels for spatial gates, groups for channel gates, samples for layer gates."""
    kinds = {"cells": spec.spatial, "pixels": spec.spatial, "groups": spec.channel, "samples": spec.layer}
    return tuple(key for key in COUNT_KEYS if kinds[key])


_ROW = 128


def _inclusive_count(flags: jax.Array) -> jax.Array:
    """Running count of true entries (inclusive prefix sum) of a 1-D boolean array.

    Rows of 128 are summed by a triangular matmul, then offset by the running row totals:
    a handful of ops (``jnp.cumsum`` lowers to a quadratic reduce-window on CPU, and a
    log-depth scan to dozens of small ops). Exact in float32 for counts below 2**24.
    """
    size = flags.shape[0]
    rows = -(-size // _ROW)
    x = jnp.pad(flags.astype(jnp.float32), (0, rows * _ROW - size)).reshape(rows, _ROW)
    upper = jnp.asarray(np.triu(np.ones((_ROW, _ROW), np.float32)))
    within = x @ upper
    totals = within[:, -1]
    offsets = jnp.asarray(np.tril(np.ones((rows, rows), np.float32), -1)) @ totals
    return (within + offsets[:, None]).reshape(-1)[:size].astype(jnp.int32)


def active_slots(flags: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(index, slot, count) of a 1-D boolean array's true entries.

    ``index``: their indices, in order, padded with ``flags.size``; ``slot``: each entry's
    position in ``index`` (its inclusive count minus one where true, ``flags.size`` where
    false: past any capacity the list is sliced to), the inverse map, which the
    compaction computes anyway; ``count``: how many are true.
    """
    size = flags.shape[0]
    if size == 1:  # batch 1's sample list: one select, no prefix count
        slot = jnp.where(flags, 0, 1).astype(jnp.int32)
        return slot, slot, flags[0].astype(jnp.int32)
    rank = _inclusive_count(flags)
    slot = jnp.where(flags, rank - 1, size)
    index = (
        jnp.full((size,), size, jnp.int32)
        .at[slot]
        .set(jnp.arange(size, dtype=jnp.int32), mode="drop", unique_indices=True)
    )
    return index, slot, rank[-1]


def active_first(flags: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Indices of the true entries of a 1-D array, in order, padded with ``flags.size``."""
    index, _, count = active_slots(flags)
    return index, count


def _max3x3(mask: jax.Array) -> jax.Array:
    """3x3 max filter (zero padding) of a (B, H, W) boolean map."""
    height, width = mask.shape[1:]
    padded = jnp.pad(mask, ((0, 0), (1, 1), (1, 1)))
    out = mask
    for dy in range(3):
        for dx in range(3):
            out = out | padded[:, dy : dy + height, dx : dx + width]
    return out


def conv1_mask(spec: BlockSpec, spatial: jax.Array) -> jax.Array:
    """(B, H1, W1) pixels where conv1 runs: the output mask dilated to conv2's receptive field.

    The map of ``laud_jax.models.gates.dilate_mask`` (each output pixel placed at the
    top-left of its stride x stride cell, 3x3 max, crop), built from fusible slices.
    """
    cells = spatial[..., 0] > 0
    size = spec.granularity
    batch, gh, gw = cells.shape
    out = jnp.broadcast_to(cells[:, :, None, :, None], (batch, gh, size, gw, size))
    out = out.reshape(batch, gh * size, gw * size)
    stride = spec.stride if spec.kind == "bottleneck" else 1
    if stride > 1:
        h, w = out.shape[1:]
        spread = jnp.zeros((batch, h, stride, w, stride), bool).at[:, :, 0, :, 0].set(out)
        out = spread.reshape(batch, h * stride, w * stride)
    h1, w1 = spec.conv1_hw
    return _max3x3(out)[:, :h1, :w1]


def _spatial_lists(spec: BlockSpec, cells: jax.Array, pixels: jax.Array) -> dict[str, jax.Array]:
    """Index lists of one batch-flattened (or one-sample) grid of cell and conv1-pixel flags.

    ``starts`` (N, 3): (sample, row, col) of each active patch's top-left output pixel
    (padding: sample == batch, out of range); ``cells``: each active patch's flat index
    on the (batch, mask grid) (padding: the grid's size); ``pixels``: flat conv1-grid
    index of each active conv1 pixel (padding: the grid's size); ``row_map`` (batch *
    H1 * W1,): each conv1-grid pixel's row in that list, the grid's size where inactive
    (never a row: conv2 reads zeros there), built by the same prefix count as the list;
    basic blocks: ``taps`` (N, 9), the block-input rows conv1 reads at each listed pixel.
    """
    gh, gw = spec.mask_grid
    h1, w1 = spec.conv1_hw
    batch = cells.shape[0]
    cell_idx, n_cells = active_first(cells.reshape(-1))
    pixel_idx, row_map, n_pixels = active_slots(pixels.reshape(-1))
    b, rest = jnp.divmod(cell_idx, gh * gw)
    i, j = jnp.divmod(rest, gw)
    size = spec.granularity
    lists = {
        "starts": jnp.stack([b, i * size, j * size], axis=-1).astype(jnp.int32),
        "cells": cell_idx,
        "pixels": pixel_idx,
        "row_map": row_map,
        "n_cells": n_cells,
        "n_pixels": n_pixels,
    }
    if spec.kind == "basic":
        pb, prest = jnp.divmod(pixel_idx, h1 * w1)
        pr, pc = jnp.divmod(prest, w1)
        lists["taps"] = conv1_taps(spec, jnp.stack([pb, pr, pc], axis=-1).astype(jnp.int32), batch)
    return lists


def block_routing(spec: BlockSpec, gates: dict[str, Any], batch: int) -> tuple[dict[str, Any], jax.Array]:
    """Index lists of a block's active units, from its hard gates; and their counts.

    Spatial lists are flat over (batch, grid) for batch-shared execution, or per sample
    (leading batch axis) when the block loops over samples. ``counts`` (see COUNT_KEYS)
    holds totals for batch-shared lists and maxima over samples for per-sample lists.
    """
    routing: dict[str, Any] = {}
    zero = jnp.zeros((), jnp.int32)
    counts = {"cells": zero, "pixels": zero, "groups": zero, "samples": jnp.asarray(batch, jnp.int32)}
    per_sample = spec.channel and batch > 1
    if spec.spatial:
        if spec.mask_groups != 1:
            raise NotImplementedError("sparse execution of spatial mask_groups > 1; use backend='dense'")
        cells = gates["spatial"][..., 0] > 0  # (B, Hm, Wm)
        pixels = conv1_mask(spec, gates["spatial"])  # (B, H1, W1)
        if per_sample:
            lists = jax.vmap(lambda c, p: _spatial_lists(spec, c[None], p[None]))(cells, pixels)
            counts["cells"], counts["pixels"] = jnp.max(lists["n_cells"]), jnp.max(lists["n_pixels"])
        else:
            lists = _spatial_lists(spec, cells, pixels)
            counts["cells"], counts["pixels"] = lists["n_cells"], lists["n_pixels"]
        routing.update(lists)
    if spec.channel:
        group_idx, n_groups = jax.vmap(active_first)(gates["channel"] > 0)
        routing["groups"] = group_idx
        counts["groups"] = jnp.max(n_groups)
    if spec.layer:
        sample_idx, counts["samples"] = active_first(gates["layer"] > 0)
        routing["samples"] = sample_idx
    elif per_sample:
        routing["samples"] = jnp.arange(batch, dtype=jnp.int32)
    return routing, jnp.stack([counts[k] for k in COUNT_KEYS])


# ----------------------------------------------------------------------------- gather maps


def conv1_taps(spec: BlockSpec, coords: jax.Array, batch: int) -> jax.Array:
    """(N, 9) rows of the flattened block input that a basic block's conv1 (3x3, stride) reads.

    ``coords``: (sample, row, col) of conv1 pixels on the output grid. Out-of-image taps
    and padding entries point past the end (read as zeros).
    """
    total = batch * spec.h_in * spec.w_in
    b, r, c = coords[:, 0], coords[:, 1], coords[:, 2]
    dy, dx = np.divmod(np.arange(9), 3)
    rows = r[:, None] * spec.stride + dy - 1
    cols = c[:, None] * spec.stride + dx - 1
    inside = (rows >= 0) & (rows < spec.h_in) & (cols >= 0) & (cols < spec.w_in) & (b[:, None] < batch)
    flat = (b[:, None] * spec.h_in + rows) * spec.w_in + cols
    return jnp.where(inside, flat, total).astype(jnp.int32)


def patch_geometry(spec: BlockSpec) -> tuple[int, int]:
    """(stride, T) of conv2 on patches: an S x S output patch reads T x T conv1 pixels."""
    stride = spec.stride if spec.kind == "bottleneck" else 1
    return stride, stride * (spec.granularity - 1) + 3


def channel_index(groups: jax.Array, granularity: int) -> jax.Array:
    """Channel indices of listed channel groups (sentinel groups map past the last channel)."""
    return (groups[:, None] * granularity + np.arange(granularity)).reshape(-1)

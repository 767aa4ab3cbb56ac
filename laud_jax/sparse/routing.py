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

from laud_jax.models.gates import dilate_mask, upsample_nearest
from laud_jax.models.specs import BlockSpec

# Order of the entries of a routing's ``counts`` vector.
COUNT_KEYS = ("cells", "pixels", "groups", "samples")


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

    ``run``: ``"dense"`` (no gate limits the work), ``"skip"`` (nothing of the residual
    branch runs) or ``"sparse"``. Capacities are slot counts for active mask cells,
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
    kw: dict[str, Any] = {"per_sample": per_sample}
    if spec.layer:
        kw["samples"] = capacity(samples, batch, steps)
    if spec.spatial:
        grid = spec.mask_grid
        h1, w1 = spec.conv1_hw
        units = 1 if per_sample else batch
        kw["cells"] = capacity(cells, units * grid[0] * grid[1], steps)
        kw["pixels"] = capacity(pixels, units * h1 * w1, steps)
    if spec.channel:
        # At least one slot: a block whose every group is off still adds its biases.
        kw["groups"] = max(1, capacity(groups, spec.channel_groups, steps))
    return BlockPlan("sparse", **kw)


def active_first(flags: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Indices of the true entries of a 1-D array, in order, padded with ``flags.size``."""
    size = flags.shape[0]
    (index,) = jnp.nonzero(flags, size=size, fill_value=size)
    return index.astype(jnp.int32), jnp.sum(flags).astype(jnp.int32)


def conv1_mask(spec: BlockSpec, spatial: jax.Array) -> jax.Array:
    """(B, H1, W1) pixels where conv1 runs: the output mask dilated to conv2's receptive field."""
    out = upsample_nearest(spatial, spec.granularity)
    stride = spec.stride if spec.kind == "bottleneck" else 1
    return dilate_mask(out, stride, spec.conv1_hw)[..., 0] > 0


def block_routing(spec: BlockSpec, gates: dict[str, Any], batch: int) -> tuple[dict[str, Any], jax.Array]:
    """Index lists of a block's active units, from its hard gates; and their counts.

    Spatial indices are flat over (batch, grid) for batch-shared execution, or per sample
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
            cell_idx, n_cells = jax.vmap(active_first)(cells.reshape(batch, -1))
            pixel_idx, n_pixels = jax.vmap(active_first)(pixels.reshape(batch, -1))
            routing["sample_cells"] = n_cells
            counts["cells"], counts["pixels"] = jnp.max(n_cells), jnp.max(n_pixels)
        else:
            cell_idx, counts["cells"] = active_first(cells.reshape(-1))
            pixel_idx, counts["pixels"] = active_first(pixels.reshape(-1))
            routing["n_cells"] = counts["cells"]
        routing["cells"], routing["pixels"] = cell_idx, pixel_idx
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


def conv1_taps(spec: BlockSpec, pixels: jax.Array, batch: int) -> jax.Array:
    """Rows of the flattened block input that conv1 reads for each listed conv1 pixel.

    Bottleneck (1x1 conv on the input grid): (N, 1). Basic block (3x3 conv with the block's
    stride, computed on the output grid): (N, 9). Out-of-image taps and padding slots
    point past the end (read as zeros).
    """
    h1, w1 = spec.conv1_hw
    if spec.kind == "bottleneck":
        return pixels[:, None]
    total = batch * spec.h_in * spec.w_in
    b, rest = jnp.divmod(pixels, h1 * w1)
    r, c = jnp.divmod(rest, w1)
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


def patch_slots(spec: BlockSpec, cells: jax.Array, pixels: jax.Array, batch: int) -> jax.Array:
    """(P, T, T) row of conv1's output (listed pixels) for every pixel conv2 reads in each patch.

    Pixels outside the image, outside conv1's mask, or in padding cells get
    ``len(pixels)``, which reads as zero.
    """
    h1, w1 = spec.conv1_hw
    gh, gw = spec.mask_grid
    size = spec.granularity
    stride, span = patch_geometry(spec)
    n_slots = pixels.shape[0]
    inverse = jnp.full((batch * h1 * w1,), n_slots, jnp.int32)
    inverse = inverse.at[pixels].set(jnp.arange(n_slots, dtype=jnp.int32), mode="drop")
    b, rest = jnp.divmod(cells, gh * gw)
    i, j = jnp.divmod(rest, gw)
    offsets = np.arange(span) - 1
    rows = (i * size * stride)[:, None] + offsets  # (P, T)
    cols = (j * size * stride)[:, None] + offsets
    inside = (
        ((rows >= 0) & (rows < h1))[:, :, None]
        & ((cols >= 0) & (cols < w1))[:, None, :]
        & (b < batch)[:, None, None]
    )
    flat = (b[:, None, None] * h1 + rows[:, :, None]) * w1 + cols[:, None, :]
    flat = jnp.where(inside, flat, 0)
    return jnp.where(inside, inverse[flat], n_slots)


def patch_starts(spec: BlockSpec, cells: jax.Array) -> jax.Array:
    """(P, 3) (sample, row, col) of each listed cell's top-left output pixel."""
    gh, gw = spec.mask_grid
    b, rest = jnp.divmod(cells, gh * gw)
    i, j = jnp.divmod(rest, gw)
    return jnp.stack([b, i * spec.granularity, j * spec.granularity], axis=-1).astype(jnp.int32)


def channel_index(groups: jax.Array, granularity: int) -> jax.Array:
    """Channel indices of listed channel groups (sentinel groups map past the last channel)."""
    return (groups[:, None] * granularity + np.arange(granularity)).reshape(-1)

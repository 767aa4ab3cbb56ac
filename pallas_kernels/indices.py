"""Index lists the spatial kernels read: active patches and dilated input pixels.

Conventions shared by kernels 1-3 (activations NHWC, one list for the whole batch):
- patch id p = b * Hm * Wm + i * Wm + j for patch (i, j) of image b on the mask grid
  Hm = ceil(Ho / S), Wm = ceil(Wo / S) of the block's output (Ho, Wo);
- pixel id q = b * H * W + y * W + x on the block's input grid (H, W);
- a list is int32 (capacity,) plus a count; entries at and after the count are padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._common import next_power_of_2


def capacity_bucket(count: int, total: int) -> int:
    """Static list capacity for `count` active entries out of `total`: the next power
    of two, capped at `total` (so jit sees a handful of shapes, not one per count)."""
    if not 0 <= count <= total:
        raise ValueError(f"count={count} must lie in [0, total={total}].")
    return min(next_power_of_2(max(count, 1)), total)


def active_indices(mask: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Flat ids of the True entries of `mask` (row-major), padded to `capacity`.

    Returns (indices int32 (capacity,), count int32): count is the number of True
    entries and may exceed `capacity` (a bucket too small; the kernels then process only
    the first `capacity` entries), so callers that size buckets dynamically check it.
    """
    flat = mask.reshape(-1)
    (indices,) = jnp.nonzero(flat, size=capacity, fill_value=0)
    return indices.astype(jnp.int32), jnp.sum(flat, dtype=jnp.int32)


def dilated_pixel_mask(
    patch_mask: jax.Array, patch_size: int, stride: int, input_hw: tuple[int, int]
) -> jax.Array:
    """Input pixels a block's conv2 (3x3, padding 1, stride s) reads for the active
    patches: the patch mask upsampled to the output grid, placed on the stride-s input
    grid, then dilated by a 3x3 window. (B, Hm, Wm) bool -> (B, H, W) bool."""
    batch = patch_mask.shape[0]
    height, width = input_hw
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    up = jnp.repeat(jnp.repeat(patch_mask, patch_size, axis=1), patch_size, axis=2)
    up = up[:, :out_h, :out_w]
    placed = jnp.zeros((batch, height, width), bool)
    placed = placed.at[:, : (out_h - 1) * stride + 1 : stride, : (out_w - 1) * stride + 1 : stride].set(up)
    return jax.lax.reduce_window(
        placed, False, jax.lax.bitwise_or, (1, 3, 3), (1, 1, 1), ((0, 0), (1, 1), (1, 1))
    )

"""conv1x1_scatter_add: fused 1x1 conv (+ folded BN bias) + residual add + scatter + relu.

Takes patch_conv's compact patches (capacity, S, S, Cin), computes conv3, adds the
identity at each patch's place in the full-resolution output and applies relu. The
output aliases a base buffer (`input_output_aliases`): only the pixels of active
patches are written; every other pixel keeps the base. The base defaults to the identity
itself (updated in place): skipped pixels of a bottleneck output relu(identity), which
is the identity when it is the previous block's (post-relu) output. For a downsample
identity (which can be negative) pass base=relu(identity).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as c
from pallas_kernels._common import Implementation, TileConfig

NAME = "conv1x1_scatter_add"


def default_tiles(cin: int, cout: int, rows: int | None = None) -> TileConfig:
    """Default tiles for Cin=cin input and Cout=cout output channels over `rows` compact
    rows (capacity * S * S). Where the tuned 64-wide tiles leave the grid under one wave
    (TARGET_CTAS), 32 output channels per tile on one warpgroup (4 warps) instead: the
    fused residual epilogue rules out split-K here."""
    tiles = c.tuned_tiles(cin, cout)
    if rows is None or cout <= 32:
        return tiles
    if pl.cdiv(rows, tiles.block_m) * pl.cdiv(cout, tiles.block_n) >= c.TARGET_CTAS:
        return tiles
    return dataclasses.replace(tiles, block_n=32, num_warps=4)


def conv1x1_scatter_add_reference(
    h: jax.Array,
    patch_indices: jax.Array,
    patch_count: jax.Array | int,
    w: jax.Array,
    b: jax.Array,
    identity: jax.Array,
    *,
    base: jax.Array | None = None,
) -> jax.Array:
    """Pure-jnp conv1x1_scatter_add: paste the patches on a canvas, dense 1x1 conv,
    masked residual + relu."""
    capacity, size, _, cin = h.shape
    batch, height, width, cout = identity.shape
    hm, wm = -(-height // size), -(-width // size)
    valid = jnp.arange(capacity) < patch_count
    target = jnp.where(valid, patch_indices, batch * hm * wm)  # padding -> dropped
    canvas = jnp.zeros((batch * hm * wm, size, size, cin), jnp.float32)
    canvas = canvas.at[target].set(h.astype(jnp.float32), mode="drop")
    active = jnp.zeros((batch * hm * wm,), bool).at[target].set(True, mode="drop")

    def to_image(patches: jax.Array) -> jax.Array:
        channels = patches.shape[-1]
        image = patches.reshape(batch, hm, wm, size, size, channels).transpose(0, 1, 3, 2, 4, 5)
        return image.reshape(batch, hm * size, wm * size, channels)[:, :height, :width]

    canvas = to_image(canvas)
    active = to_image(jnp.broadcast_to(active[:, None, None, None], (batch * hm * wm, size, size, 1)))
    branch = jnp.einsum("bhwc,cd->bhwd", canvas, w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    y = jnp.maximum(identity.astype(jnp.float32) + branch + b.astype(jnp.float32), 0.0)
    return jnp.where(active, y.astype(identity.dtype), identity if base is None else base)


def _kernel(
    count_ref,
    idx_ref,
    h_ref,
    w_ref,
    b_ref,
    id_ref,
    *refs,
    geometry,
    cin,
    cout,
    capacity,
    tiles,
    mem,
):
    o_ref = refs[-1]  # the base buffer (the identity itself when no base is given)
    height, width, grid_h, grid_w, size = geometry
    bm, bn = tiles.block_m, tiles.block_n
    pid_m, pid_n = pl.program_id(0), pl.program_id(1)
    count = jnp.minimum(c.load_scalar(count_ref), capacity)

    @pl.when(pid_m * bm < count * size * size)
    def _compute():
        rows = c.tile_range(pid_m, bm)
        slot_ok, image, oy, ox = c.patch_rows(mem, rows, count, idx_ref, size, grid_h, grid_w)
        out_ok = slot_ok & (oy < height) & (ox < width)
        pixel = (image * height + oy) * width + ox
        cols = c.tile_range(pid_n, bn)
        col_ok = cols < cout
        # The epilogue's operands are loaded before the K loop: their latency hides
        # behind it instead of adding a round trip after the last MMA.
        bias = mem.load(b_ref, cols, col_ok).astype(jnp.float32)
        offsets = pixel[:, None] * cout + cols[None, :]
        write = out_ok[:, None] & col_ok[None, :]
        identity = mem.load(id_ref, offsets, write)
        acc = c.tap_matmul(
            mem,
            h_ref,
            w_ref,
            source=lambda _: (rows, slot_ok),
            n_taps=1,
            cin=cin,
            cout=cout,
            cols=cols,
            col_ok=col_ok,
            tiles=tiles,
        )
        y = jnp.maximum(acc + bias[None, :] + identity.astype(jnp.float32), 0.0)
        mem.store(o_ref, offsets, y, write)


def conv1x1_scatter_add(
    h: jax.Array,
    patch_indices: jax.Array,
    patch_count: jax.Array | int,
    w: jax.Array,
    b: jax.Array,
    identity: jax.Array,
    *,
    base: jax.Array | None = None,
    tiles: TileConfig | None = None,
    implementation: Implementation = "pallas",
) -> jax.Array:
    """`base` (default: the identity) with relu(identity + h @ w + b) pasted at every
    listed patch.

    Args:
      h: (capacity, S, S, Cin) compact patches (patch_conv's output).
      patch_indices: (capacity,) int32 patch ids b * Hm * Wm + i * Wm + j with
        Hm = ceil(H / S), Wm = ceil(W / S); entries >= patch_count are padding.
      patch_count: number of valid entries.
      w: (Cin, Cout) conv3 weight with BN folded in, same dtype as h.
      b: (Cout,) folded BN bias.
      identity: (B, H, W, Cout) residual, same dtype as h; aliased to the output when
        no base is given.
      base: optional (B, H, W, Cout) output buffer (aliased): what pixels outside the
        active patches hold, e.g. relu(identity) for a downsample identity.
      tiles: tile sizes; `default_tiles(Cin, Cout, capacity * S * S)` when None.
      implementation: 'pallas', 'interpret' or 'reference'.
    """
    c.check_implementation(NAME, implementation)
    c.check_ndim(NAME, "h", h, 4, "(capacity, S, S, Cin) compact patches")
    c.check_dtype(NAME, "h", h)
    capacity, size, size_w, cin = h.shape
    if size != size_w or size < 1:
        raise ValueError(f"{NAME}: h.shape={h.shape}: patches must be square S x S with S >= 1.")
    c.check_ndim(NAME, "identity", identity, 4, "NHWC (B, H, W, Cout)")
    c.check_dtype(NAME, "identity", identity, h.dtype)
    batch, height, width, cout = identity.shape
    c.check_ndim(NAME, "w", w, 2, "(Cin, Cout)")
    if w.shape != (cin, cout):
        raise ValueError(f"{NAME}: w.shape={w.shape}, expected (Cin, Cout)=({cin}, {cout}) from h and identity.")
    c.check_dtype(NAME, "w", w, h.dtype)
    c.check_shape(NAME, "b", b, (cout,))
    c.check_dtype(NAME, "b", b)
    c.check_shape(NAME, "patch_indices", patch_indices, (capacity,))
    c.check_index_list(NAME, "patch_indices", patch_indices)
    count = c.as_count(NAME, "patch_count", patch_count)
    if base is not None:
        c.check_shape(NAME, "base", base, identity.shape)
        c.check_dtype(NAME, "base", base, identity.dtype)
    c.check_addressable(NAME, "h", h)
    c.check_addressable(NAME, "identity", identity)

    if implementation == "reference":
        return conv1x1_scatter_add_reference(h, patch_indices, count, w, b, identity, base=base)
    if capacity == 0:
        return identity if base is None else base
    tiles = tiles or default_tiles(cin, cout, capacity * size * size)
    geometry = (height, width, -(-height // size), -(-width // size), size)
    kernel = functools.partial(
        _kernel,
        geometry=geometry,
        cin=cin,
        cout=cout,
        capacity=capacity,
        tiles=tiles,
        mem=c.Memory(implementation == "interpret"),
    )
    rows = capacity * size * size
    operands = [count.reshape(1), patch_indices, h.reshape(-1), w.reshape(-1), b, identity.reshape(-1)]
    if base is not None:
        operands.append(base.reshape(-1))
    result = c.pallas_call(
        kernel,
        operands,
        name=NAME,
        grid=(pl.cdiv(rows, tiles.block_m), pl.cdiv(cout, tiles.block_n)),
        out_shape=((identity.size,), identity.dtype),
        tiles=tiles,
        implementation=implementation,
        input_output_aliases={len(operands) - 1: 0},
    )
    return result.reshape(identity.shape)

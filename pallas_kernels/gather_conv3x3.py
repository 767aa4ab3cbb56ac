"""Kernel 2: fused patch gather + 3x3 conv (stride 1 or 2, zero padding 1) + bias + relu.

For every active S x S output patch, reads its ((S-1)*s+3)^2 input window with halo
straight from the full-resolution intermediate written by kernel 1 (no gathered copy is
materialized) and writes the patch's S x S x Cout result into a compact buffer
(capacity, S, S, Cout). Reads outside the image are the conv's zero padding. Only the
pixels of the dilated mask (conv2's receptive field of the active patches) are read.

Tiling: the M dimension of the implicit GEMM runs over the flat compact rows
slot * S * S + y * S + x, so a tile of 64 rows holds 64 patches at S=1, 16 at S=2, 4 at
S=4, one at S=8 and 1.3 at S=7: M stays a power of two >= 16 for tl.dot and S=7 wastes
nothing (no padding to 8). The reduction runs over 9 taps x Cin in one pipelined loop.

Patch ids: p = b * Hm * Wm + i * Wm + j on the mask grid Hm = ceil(Ho / S), Wm = ceil(Wo / S),
Ho = (H - 1) // s + 1. Pixels of a partial border patch that fall outside the image
are written as 0; padding slots (>= patch_count) are never written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as c
from pallas_kernels._common import Implementation, TileConfig

NAME = "gather_conv3x3"


def output_size(size: int, stride: int) -> int:
    """Output extent of a 3x3 conv with padding 1 and the given stride."""
    return (size - 1) // stride + 1


def mask_grid(size: int, stride: int, patch_size: int) -> int:
    """Number of patches along one axis of the output grid (ceil)."""
    return -(-output_size(size, stride) // patch_size)


def default_tiles(cin: int, cout: int) -> TileConfig:
    """Default tiles for Cin=cin input and Cout=cout output channels."""
    return c.tuned_tiles(cin, cout)


def reference(
    h: jax.Array,
    patch_indices: jax.Array,
    patch_count: jax.Array | int,
    w: jax.Array,
    b: jax.Array,
    *,
    patch_size: int,
    stride: int,
    out: jax.Array | None = None,
) -> jax.Array:
    """Dense XLA conv of the whole input, cut into patches; valid slots written to `out`."""
    batch, height, width, _ = h.shape
    cout = w.shape[-1]
    size = patch_size
    y = jax.lax.conv_general_dilated(
        h.astype(jnp.float32),
        w.astype(jnp.float32),
        window_strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    y = jnp.maximum(y + b.astype(jnp.float32), 0.0).astype(h.dtype)
    hm, wm = mask_grid(height, stride, size), mask_grid(width, stride, size)
    y = jnp.pad(y, ((0, 0), (0, hm * size - y.shape[1]), (0, wm * size - y.shape[2]), (0, 0)))
    patches = y.reshape(batch, hm, size, wm, size, cout).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(batch * hm * wm, size, size, cout)
    capacity = patch_indices.shape[0]
    valid = jnp.arange(capacity) < patch_count
    gathered = patches[jnp.where(valid, patch_indices, 0)]
    if out is None:
        out = jnp.zeros((capacity, size, size, cout), h.dtype)
    return out.at[jnp.where(valid, jnp.arange(capacity), capacity)].set(gathered, mode="drop")


def _kernel(
    count_ref, idx_ref, src_ref, w_ref, b_ref, *refs, geometry, cin, cout, capacity, relu,
    tiles, mem,
):
    """Rows slot * S * S + y * S + x of the compact output. `geometry` selects how a
    tap's input row is found: ("image", H, W, Ho, Wo, Hm, Wm, S, s) computes its address
    in the full-resolution input from the patch id; ("slots", T, S, s, R) reads it from
    the (P, T, T) slot table (ids outside [0, R) read zeros)."""
    o_ref = refs[-1]
    bm, bn = tiles.block_m, tiles.block_n
    pid_m, pid_n = pl.program_id(0), pl.program_id(1)
    count = jnp.minimum(c.load_scalar(count_ref), capacity)
    size, stride = geometry[-2:] if geometry[0] == "image" else geometry[2:4]

    @pl.when(pid_m * bm < count * size * size)
    def _compute():
        rows = c.tile_range(pid_m, bm)
        if geometry[0] == "image":
            height, width, out_h, out_w, grid_h, grid_w = geometry[1:7]
            slot_ok, image, oy, ox = c.patch_rows(mem, rows, count, idx_ref, size, grid_h, grid_w)
            out_ok = slot_ok & (oy < out_h) & (ox < out_w)

            def source(tap):
                iy = oy * stride - 1 + c.div(tap, 3)
                ix = ox * stride - 1 + c.rem(tap, 3)
                inside = out_ok & (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
                return (image * height + iy) * width + ix, inside
        else:
            span, n_src = geometry[1], geometry[4]
            slot = c.div(rows, size * size)
            within = c.rem(rows, size * size)
            slot_ok = out_ok = slot < count
            top = slot * span * span + c.div(within, size) * stride * span + c.rem(within, size) * stride

            def source(tap):
                src_rows = mem.load(idx_ref, top + c.div(tap, 3) * span + c.rem(tap, 3), slot_ok)
                return src_rows, slot_ok & (src_rows >= 0) & (src_rows < n_src)

        cols = c.tile_range(pid_n, bn)
        col_ok = cols < cout
        acc = c.tap_matmul(
            mem, src_ref, w_ref, source=source, n_taps=9, cin=cin, cout=cout, cols=cols,
            col_ok=col_ok, tiles=tiles,
        )
        y = acc + mem.load(b_ref, cols, col_ok).astype(jnp.float32)[None, :]
        if relu:
            y = jnp.maximum(y, 0.0)
        y = jnp.where(out_ok[:, None], y, 0.0)
        mem.store(o_ref, rows[:, None] * cout + cols[None, :], y, slot_ok[:, None] & col_ok[None, :])


def _launch(
    name: str, count: jax.Array, index: jax.Array, src: jax.Array, w: jax.Array, b: jax.Array,
    out: jax.Array | None, *, geometry: tuple, capacity: int, size: int, relu: bool,
    tiles: TileConfig, implementation: str,
) -> jax.Array:
    cin, cout = w.shape[2], w.shape[3]
    kernel = functools.partial(
        _kernel, geometry=geometry, cin=cin, cout=cout, capacity=capacity, relu=relu,
        tiles=tiles, mem=c.Memory(implementation == "interpret"),
    )
    operands = [count.reshape(1), index.reshape(-1), src.reshape(-1), w.reshape(-1), b]
    aliases = {}
    if out is not None:
        aliases = {len(operands): 0}
        operands.append(out.reshape(-1))
    rows = capacity * size * size
    result = c.pallas_call(
        kernel,
        operands,
        name=name,
        grid=(pl.cdiv(rows, tiles.block_m), pl.cdiv(cout, tiles.block_n)),
        out_shape=((rows * cout,), src.dtype),
        tiles=tiles,
        implementation=implementation,
        input_output_aliases=aliases,
    )
    return result.reshape(capacity, size, size, cout)


def gather_conv3x3(
    h: jax.Array,
    patch_indices: jax.Array,
    patch_count: jax.Array | int,
    w: jax.Array,
    b: jax.Array,
    *,
    patch_size: int,
    stride: int,
    out: jax.Array | None = None,
    tiles: TileConfig | None = None,
    implementation: Implementation = "pallas",
) -> jax.Array:
    """relu(conv3x3_stride(h) + b) on every listed S x S output patch, compact.

    Args:
      h: (B, H, W, Cin) input (kernel 1's output); only the pixels in the 3x3 receptive
        field of the listed patches are read.
      patch_indices: (capacity,) int32 patch ids b * Hm * Wm + i * Wm + j; entries
        >= patch_count are padding.
      patch_count: number of valid entries.
      w: (3, 3, Cin, Cout) HWIO weight with BN folded in, same dtype as h.
      b: (Cout,) folded BN bias.
      patch_size: S, the patch side on the output grid (any S >= 1).
      stride: 1 or 2.
      out: optional (capacity, S, S, Cout) buffer (aliased); padding slots keep its values.
      tiles: tile sizes; `default_tiles(Cin, Cout)` when None.
      implementation: 'pallas', 'interpret' or 'reference'.

    Returns:
      (capacity, S, S, Cout): slot k holds patch patch_indices[k] for k < patch_count.
    """
    c.check_implementation(NAME, implementation)
    c.check_ndim(NAME, "h", h, 4, "NHWC (B, H, W, Cin)")
    c.check_dtype(NAME, "h", h)
    batch, height, width, cin = h.shape
    if stride not in (1, 2):
        raise ValueError(f"{NAME}: stride={stride!r}; supported strides are 1 and 2.")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"{NAME}: patch_size={patch_size!r}; must be an int >= 1.")
    c.check_ndim(NAME, "w", w, 4, "HWIO (3, 3, Cin, Cout)")
    if w.shape[:3] != (3, 3, cin):
        raise ValueError(
            f"{NAME}: w.shape={w.shape}, expected (3, 3, {cin}, Cout) for h with Cin={cin}."
        )
    c.check_dtype(NAME, "w", w, h.dtype)
    cout = w.shape[3]
    c.check_shape(NAME, "b", b, (cout,))
    c.check_dtype(NAME, "b", b)
    c.check_index_list(NAME, "patch_indices", patch_indices)
    count = c.as_count(NAME, "patch_count", patch_count)
    capacity = patch_indices.shape[0]
    out_shape = (capacity, patch_size, patch_size, cout)
    if out is not None:
        c.check_shape(NAME, "out", out, out_shape)
        c.check_dtype(NAME, "out", out, h.dtype)
    c.check_addressable(NAME, "h", h)
    c.check_addressable(NAME, "out", jax.ShapeDtypeStruct(out_shape, h.dtype))

    if implementation == "reference":
        return reference(
            h, patch_indices, count, w, b, patch_size=patch_size, stride=stride, out=out
        )
    if capacity == 0:
        return jnp.zeros(out_shape, h.dtype)
    tiles = tiles or default_tiles(cin, cout)
    geometry = (
        "image",
        height,
        width,
        output_size(height, stride),
        output_size(width, stride),
        mask_grid(height, stride, patch_size),
        mask_grid(width, stride, patch_size),
        patch_size,
        stride,
    )
    return _launch(
        NAME, count, patch_indices, h, w, b, out, geometry=geometry, capacity=capacity,
        size=patch_size, relu=True, tiles=tiles, implementation=implementation,
    )


def patch_conv_reference(
    rows: jax.Array, slots: jax.Array, w: jax.Array, b: jax.Array, *, stride: int, relu: bool
) -> jax.Array:
    """Pure-jnp patch_conv: gather the windows, VALID conv."""
    patches, span, _ = slots.shape
    slots = jnp.where(slots >= 0, slots, rows.shape[0])  # negative ids read zeros too
    windows = jnp.take(rows, slots.reshape(-1), axis=0, mode="fill", fill_value=0)
    windows = windows.reshape(patches, span, span, rows.shape[-1]).astype(jnp.float32)
    y = jax.lax.conv_general_dilated(
        windows, w.astype(jnp.float32), (stride, stride), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST,
    ) + b.astype(jnp.float32)
    return (jnp.maximum(y, 0.0) if relu else y).astype(rows.dtype)


def patch_conv(
    rows: jax.Array,
    slots: jax.Array,
    w: jax.Array,
    b: jax.Array,
    *,
    stride: int,
    relu: bool = True,
    tiles: TileConfig | None = None,
    implementation: Implementation = "pallas",
) -> jax.Array:
    """The sparse engine's form of kernel 2: 3x3 VALID conv over gathered patch windows.

    Args:
      rows: (R, Cin) compact conv1 output rows.
      slots: (P, T, T) int32: for each patch, the row of every pixel of its T x T window
        (T = (S - 1) * stride + 3); ids outside [0, R) read zeros (image border, pixels
        outside conv1's mask, padding patches).
      w: (3, 3, Cin, Cout) HWIO weight (BN folded in), same dtype as rows.
      b: (Cout,) bias.
      stride: 1 or 2.
      relu: apply relu after the bias.
      tiles: tile sizes; `default_tiles(Cin, Cout)` when None.
      implementation: 'pallas', 'interpret' or 'reference'.

    Returns:
      (P, S, S, Cout); every patch is written.
    """
    name = "patch_conv"
    c.check_implementation(name, implementation)
    c.check_ndim(name, "rows", rows, 2, "(R, Cin) rows")
    c.check_dtype(name, "rows", rows)
    cin = rows.shape[1]
    c.check_ndim(name, "slots", slots, 3, "(P, T, T) slot table")
    if slots.dtype != jnp.int32:
        raise TypeError(f"{name}: slots.dtype={slots.dtype}, expected int32.")
    if stride not in (1, 2):
        raise ValueError(f"{name}: stride={stride!r}; supported strides are 1 and 2.")
    patches, span, span_w = slots.shape
    if span != span_w or span < 3 or (span - 3) % stride:
        raise ValueError(
            f"{name}: slots.shape={slots.shape}: windows must be T x T with T = (S - 1) * {stride} + 3."
        )
    size = (span - 3) // stride + 1
    c.check_ndim(name, "w", w, 4, "HWIO (3, 3, Cin, Cout)")
    if w.shape[:3] != (3, 3, cin):
        raise ValueError(f"{name}: w.shape={w.shape}, expected (3, 3, {cin}, Cout) for rows with Cin={cin}.")
    c.check_dtype(name, "w", w, rows.dtype)
    cout = w.shape[3]
    c.check_shape(name, "b", b, (cout,))
    c.check_dtype(name, "b", b)
    c.check_addressable(name, "rows", rows)
    c.check_addressable(name, "slots", slots)
    c.check_addressable(name, "out", jax.ShapeDtypeStruct((patches, size, size, cout), rows.dtype))
    if implementation == "reference":
        return patch_conv_reference(rows, slots, w, b, stride=stride, relu=relu)
    if patches == 0:
        return jnp.zeros((0, size, size, cout), rows.dtype)
    tiles = tiles or default_tiles(cin, cout)
    return _launch(
        name, jnp.asarray(patches, jnp.int32), slots, rows, w, b, None,
        geometry=("slots", span, size, stride, rows.shape[0]), capacity=patches, size=size,
        relu=relu, tiles=tiles, implementation=implementation,
    )

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

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Where a patch's input pixels are. The index list holds patch ids on the mask grid
    (grid_h x grid_w), or, with `starts`, each patch's (sample, row, col) start. The
    input is the full-resolution map, or, with `row_map`, compact rows found through a
    per-pixel row map (rows >= n_src read zeros)."""

    batch: int
    height: int  # input map
    width: int
    size: int  # S
    stride: int
    starts: bool = False
    row_map: bool = False
    grid_h: int = 0
    grid_w: int = 0
    n_src: int = 0

    @property
    def out_h(self) -> int:
        return output_size(self.height, self.stride)

    @property
    def out_w(self) -> int:
        return output_size(self.width, self.stride)


def _kernel(
    count_ref, idx_ref, src_ref, w_ref, b_ref, *refs, geometry, cin, cout, capacity, relu,
    tiles, mem,
):
    """Rows slot * S * S + y * S + x of the compact (P, S, S, Cout) output."""
    o_ref = refs[-1]
    g = geometry
    bm, bn = tiles.block_m, tiles.block_n
    pid_m, pid_n = pl.program_id(0), pl.program_id(1)
    count = jnp.minimum(c.load_scalar(count_ref), capacity)

    @pl.when(pid_m * bm < count * g.size * g.size)
    def _compute():
        rows = c.tile_range(pid_m, bm)
        if not g.starts:
            slot_ok, image, oy, ox = c.patch_rows(mem, rows, count, idx_ref, g.size, g.grid_h, g.grid_w)
        else:
            slot = c.div(rows, g.size * g.size)
            within = c.rem(rows, g.size * g.size)
            slot_ok = slot < count
            image = mem.load(idx_ref, slot * 3, slot_ok)
            oy = mem.load(idx_ref, slot * 3 + 1, slot_ok) + c.div(within, g.size)
            ox = mem.load(idx_ref, slot * 3 + 2, slot_ok) + c.rem(within, g.size)
        out_ok = slot_ok & (image < g.batch) & (oy < g.out_h) & (ox < g.out_w)

        def source(tap):
            iy = oy * g.stride - 1 + c.div(tap, 3)
            ix = ox * g.stride - 1 + c.rem(tap, 3)
            inside = out_ok & (iy >= 0) & (iy < g.height) & (ix >= 0) & (ix < g.width)
            pixel = (image * g.height + iy) * g.width + ix
            if not g.row_map:
                return pixel, inside
            src_rows = mem.load(refs[0], pixel, inside)
            return src_rows, inside & (src_rows >= 0) & (src_rows < g.n_src)

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
    lookup: jax.Array | None, out: jax.Array | None, *, geometry: _Geometry, capacity: int,
    relu: bool, tiles: TileConfig, implementation: str,
) -> jax.Array:
    cin, cout = w.shape[2], w.shape[3]
    size = geometry.size
    kernel = functools.partial(
        _kernel, geometry=geometry, cin=cin, cout=cout, capacity=capacity, relu=relu,
        tiles=tiles, mem=c.Memory(implementation == "interpret"),
    )
    operands = [count.reshape(1), index.reshape(-1), src.reshape(-1), w.reshape(-1), b]
    if lookup is not None:
        operands.append(lookup)
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
    geometry = _Geometry(
        batch, height, width, patch_size, stride,
        grid_h=mask_grid(height, stride, patch_size), grid_w=mask_grid(width, stride, patch_size),
    )
    return _launch(
        NAME, count, patch_indices, h, w, b, None, out, geometry=geometry, capacity=capacity,
        relu=True, tiles=tiles, implementation=implementation,
    )


def patch_conv_reference(
    rows: jax.Array, coords: jax.Array | None, starts: jax.Array, w: jax.Array, b: jax.Array, *,
    grid: tuple[int, int, int], size: int, stride: int, relu: bool,
) -> jax.Array:
    """Pure-jnp patch_conv: paste the rows on a zero map, conv, cut the patches out."""
    batch, height, width = grid
    if coords is None:
        canvas = rows.astype(jnp.float32).reshape(batch, height, width, -1)
    else:
        canvas = jnp.zeros((batch, height, width, rows.shape[-1]), jnp.float32)
        canvas = canvas.at[coords[:, 0], coords[:, 1], coords[:, 2]].set(rows.astype(jnp.float32), mode="drop")
    y = jax.lax.conv_general_dilated(
        canvas, w.astype(jnp.float32), (stride, stride), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST,
    ) + b.astype(jnp.float32)
    y = jnp.maximum(y, 0.0) if relu else y
    offsets = jnp.arange(size)
    index = (starts[:, 0, None, None], starts[:, 1, None, None] + offsets[:, None],
             starts[:, 2, None, None] + offsets[None, :])
    return y.at[index].get(mode="fill", fill_value=0).astype(rows.dtype)


def patch_conv(
    rows: jax.Array,
    coords: jax.Array | None,
    starts: jax.Array,
    w: jax.Array,
    b: jax.Array,
    *,
    grid: tuple[int, int, int],
    size: int,
    stride: int,
    relu: bool = True,
    tiles: TileConfig | None = None,
    implementation: Implementation = "pallas",
) -> jax.Array:
    """The sparse engine's form of kernel 2: 3x3 conv (padding 1) of a sparse map on patches.

    Args:
      rows: (N, Cin) compact conv1 output, row i at pixel coords[i] of a map of shape
        `grid` that is zero elsewhere.
      coords: (N, 3) int32 (sample, row, col); rows with sample >= B are padding. None:
        rows is the whole map in row-major order (N = B * H * W).
      starts: (P, 3) int32 (sample, row, col) of each patch's first output pixel;
        patches with sample >= B are padding (written as zeros).
      w: (3, 3, Cin, Cout) HWIO weight (BN folded in), same dtype as rows.
      b: (Cout,) bias.
      grid: (B, H, W) of the input map.
      size: S, the patch side on the output grid.
      stride: 1 or 2.
      relu: apply relu after the bias.
      tiles: tile sizes; `default_tiles(Cin, Cout)` when None.
      implementation: 'pallas', 'interpret' or 'reference'.

    Returns:
      (P, S, S, Cout). Conv1's rows are found through a per-pixel row map (int32, one
      entry per pixel of the map) built here, not through a zero-filled copy of the map.
    """
    name = "patch_conv"
    c.check_implementation(name, implementation)
    c.check_ndim(name, "rows", rows, 2, "(N, Cin) rows")
    c.check_dtype(name, "rows", rows)
    n_src, cin = rows.shape
    batch, height, width = grid
    if coords is None and n_src != batch * height * width:
        raise ValueError(f"{name}: coords=None needs rows for all {batch}x{height}x{width} pixels, got {n_src}.")
    for arg, array, count_rows in (("coords", coords, n_src), ("starts", starts, None)):
        if array is None:
            continue
        c.check_ndim(name, arg, array, 2, "(rows, 3) (sample, row, col)")
        if array.shape[1] != 3 or (count_rows is not None and array.shape[0] != count_rows):
            raise ValueError(f"{name}: {arg}.shape={array.shape}, expected ({count_rows or 'P'}, 3).")
        if array.dtype != jnp.int32:
            raise TypeError(f"{name}: {arg}.dtype={array.dtype}, expected int32.")
    if stride not in (1, 2):
        raise ValueError(f"{name}: stride={stride!r}; supported strides are 1 and 2.")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"{name}: size={size!r}; must be an int >= 1.")
    c.check_ndim(name, "w", w, 4, "HWIO (3, 3, Cin, Cout)")
    if w.shape[:3] != (3, 3, cin):
        raise ValueError(f"{name}: w.shape={w.shape}, expected (3, 3, {cin}, Cout) for rows with Cin={cin}.")
    c.check_dtype(name, "w", w, rows.dtype)
    cout = w.shape[3]
    c.check_shape(name, "b", b, (cout,))
    c.check_dtype(name, "b", b)
    patches = starts.shape[0]
    c.check_addressable(name, "rows", rows)
    c.check_addressable(name, "map", jax.ShapeDtypeStruct((batch * height * width,), jnp.int32))
    c.check_addressable(name, "out", jax.ShapeDtypeStruct((patches, size, size, cout), rows.dtype))
    if implementation == "reference":
        return patch_conv_reference(rows, coords, starts, w, b, grid=grid, size=size, stride=stride, relu=relu)
    if patches == 0:
        return jnp.zeros((0, size, size, cout), rows.dtype)
    row_map = None
    if coords is not None:
        pixels = (coords[:, 0] * height + coords[:, 1]) * width + coords[:, 2]
        pixels = jnp.where(coords[:, 0] < batch, pixels, batch * height * width)  # padding: dropped
        row_map = jnp.full((batch * height * width,), n_src, jnp.int32)
        row_map = row_map.at[pixels].set(jnp.arange(n_src, dtype=jnp.int32), mode="drop")
    tiles = tiles or default_tiles(cin, cout)
    geometry = _Geometry(
        batch, height, width, size, stride, starts=True, row_map=coords is not None, n_src=n_src
    )
    return _launch(
        name, jnp.asarray(patches, jnp.int32), starts, rows, w, b, row_map, None,
        geometry=geometry, capacity=patches, relu=relu, tiles=tiles, implementation=implementation,
    )

"""patch_conv: 3x3 conv (stride 1 or 2, zero padding 1) + bias (+ relu) on listed patches.

The input is a sparse map: compact rows (N, Cin) of a (B, H, W) map that is zero
elsewhere, found through a row map (int32, one entry per pixel of the map: the pixel's
row, or any value outside [0, N) where it has none), an operand the caller builds once
per set of rows (the sparse engine's routing derives it from the same prefix count as
its pixel list; `make_row_map` builds it from a coordinate list). With row_map=None the
rows are the whole map in row-major order. For every listed S x S output patch (its
first output pixel in `starts`) the kernel reads the patch's ((S-1)*s+3)^2 input window
with halo through the row map and writes the patch's S x S x Cout result into a compact
(P, S, S, Cout) buffer. Pixels without a row, and pixels outside the image (the conv's
zero padding), read as zeros. No zero-filled copy of the map is materialized, and the
launch is the kernel alone (plus split-K's reduction).

Tiling: the M dimension of the implicit GEMM runs over the flat compact rows
slot * S * S + y * S + x, so a tile of 64 rows holds 64 patches at S=1, 16 at S=2, 4 at
S=4, one at S=8 and 1.3 at S=7: M stays a power of two >= 16 for tl.dot and S=7 wastes
nothing (no padding to 8). Each tile looks up its rows' 9 tap sources in the row map
once, before the reduction; the reduction then runs over 9 taps x Cin in one loop whose
loads depend on the loop counter only, so Triton keeps copies in flight across steps (a
row-map lookup inside the loop made every step wait for all its loads). Output pixels
of a partial border patch, and patches whose sample is >= B (padding), are written as
zeros.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as c
from pallas_kernels._common import Implementation, TileConfig

NAME = "patch_conv"


def output_size(size: int, stride: int) -> int:
    """Output extent of a 3x3 conv with padding 1 and the given stride."""
    return (size - 1) // stride + 1


def default_tiles(cin: int, cout: int) -> TileConfig:
    """Default tiles for Cin=cin input and Cout=cout output channels."""
    return c.tuned_tiles(cin, cout)


def make_row_map(coords: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
    """(B * H * W,) int32 row map of rows listed at `coords`: entry (b * H + y) * W + x
    holds i where coords[i] = (b, y, x), N = len(coords) where no row is listed (rows
    with sample >= B are padding, listed nowhere). One scatter: for callers holding a
    coordinate list; the engine's routing builds its map without one."""
    batch, height, width = grid
    n_src = coords.shape[0]
    _check_index_table("make_row_map", "coords", coords, n_src)
    pixels = (coords[:, 0] * height + coords[:, 1]) * width + coords[:, 2]
    pixels = jnp.where(coords[:, 0] < batch, pixels, batch * height * width)  # padding: dropped
    row_map = jnp.full((batch * height * width,), n_src, jnp.int32)
    return row_map.at[pixels].set(jnp.arange(n_src, dtype=jnp.int32), mode="drop")


def patch_conv_reference(
    rows: jax.Array,
    row_map: jax.Array | None,
    starts: jax.Array,
    w: jax.Array,
    b: jax.Array,
    *,
    grid: tuple[int, int, int],
    size: int,
    stride: int,
    relu: bool,
) -> jax.Array:
    """Pure-jnp patch_conv: the map through the row map (zeros where it lists no row),
    dense conv, cut the patches out."""
    batch, height, width = grid
    n_src = rows.shape[0]
    if row_map is None:
        canvas = rows.astype(jnp.float32).reshape(batch, height, width, -1)
    else:
        listed = (row_map >= 0) & (row_map < n_src)
        canvas = jnp.take(
            rows.astype(jnp.float32), jnp.where(listed, row_map, n_src), axis=0, mode="fill", fill_value=0
        )
        canvas = canvas.reshape(batch, height, width, -1)
    y = jax.lax.conv_general_dilated(
        canvas,
        w.astype(jnp.float32),
        (stride, stride),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    ) + b.astype(jnp.float32)
    y = jnp.maximum(y, 0.0) if relu else y
    offsets = jnp.arange(size)
    index = (
        starts[:, 0, None, None],
        starts[:, 1, None, None] + offsets[:, None],
        starts[:, 2, None, None] + offsets[None, :],
    )
    return y.at[index].get(mode="fill", fill_value=0).astype(rows.dtype)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static shape of one launch: the input map, the patch side and stride, the number
    of patches, and whether rows are found through a row map (rows >= n_src read zeros)."""

    batch: int
    height: int
    width: int
    size: int  # S
    stride: int
    patches: int
    row_map: bool
    n_src: int

    @property
    def out_h(self) -> int:
        return output_size(self.height, self.stride)

    @property
    def out_w(self) -> int:
        return output_size(self.width, self.stride)


def _tap_sources(
    g: _Geometry,
    mem: c.Memory,
    map_refs: Sequence[Any],
    image: jax.Array,
    oy: jax.Array,
    ox: jax.Array,
    out_ok: jax.Array,
) -> list[jax.Array]:
    """Each tap's source row of every output row of the tile; -1 where the tap reads zero
    (outside the image, or no row at that pixel of the row map)."""
    sources = []
    for tap in range(9):
        iy = oy * g.stride - 1 + tap // 3
        ix = ox * g.stride - 1 + tap % 3
        inside = out_ok & (iy >= 0) & (iy < g.height) & (ix >= 0) & (ix < g.width)
        pixel = (image * g.height + iy) * g.width + ix
        if g.row_map:
            row = mem.load(map_refs[0], pixel, inside)
            sources.append(jnp.where(inside & (row >= 0) & (row < g.n_src), row, -1))
        else:
            sources.append(jnp.where(inside, pixel, -1))
    return sources


def _kernel(starts_ref, src_ref, w_ref, b_ref, *refs, geometry, cin, cout, relu, tiles, parts, mem):
    """Rows slot * S * S + y * S + x of the compact (P, S, S, Cout) output; split-K
    (parts > 1): part pid_k's float32 partial sums (the bias in part 0, no activation)
    into the pid_k-th (P * S * S, Cout) block."""
    o_ref = refs[-1]
    g = geometry
    bm, bn = tiles.block_m, tiles.block_n
    pid_m, pid_n, pid_k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = c.tile_range(pid_m, bm)
    slot = c.div(rows, g.size * g.size)
    within = c.rem(rows, g.size * g.size)
    slot_ok = slot < g.patches
    image = mem.load(starts_ref, slot * 3, slot_ok)
    oy = mem.load(starts_ref, slot * 3 + 1, slot_ok) + c.div(within, g.size)
    ox = mem.load(starts_ref, slot * 3 + 2, slot_ok) + c.rem(within, g.size)
    out_ok = slot_ok & (image < g.batch) & (oy < g.out_h) & (ox < g.out_w)
    # The 9 taps' source rows are found once, before the K loop: its loads then depend
    # on the loop counter only, and Triton keeps copies in flight across steps.
    sources = _tap_sources(g, mem, refs[:-1], image, oy, ox, out_ok)

    def source(tap: jax.Array) -> tuple[jax.Array, jax.Array]:
        chosen = sources[0]
        for t in range(1, 9):
            chosen = jnp.where(tap == t, sources[t], chosen)
        return chosen, chosen >= 0

    cols = c.tile_range(pid_n, bn)
    col_ok = cols < cout
    acc = c.tap_matmul(
        mem,
        src_ref,
        w_ref,
        source=source,
        n_taps=9,
        cin=cin,
        cout=cout,
        cols=cols,
        col_ok=col_ok,
        tiles=tiles,
        split=(pid_k, parts),
    )
    bias = mem.load(b_ref, cols, col_ok & (pid_k == 0)).astype(jnp.float32)
    y = acc + bias[None, :]
    if relu and parts == 1:
        y = jnp.maximum(y, 0.0)
    y = jnp.where(out_ok[:, None], y, 0.0)
    offsets = (pid_k * g.patches * g.size * g.size + rows[:, None]) * cout + cols[None, :]
    mem.store(o_ref, offsets, y, slot_ok[:, None] & col_ok[None, :])


def _check_index_table(name: str, arg: str, array: jax.Array, rows: int | None) -> None:
    """(rows, 3) int32 (sample, row, col) table; rows=None accepts any number of rows."""
    c.check_ndim(name, arg, array, 2, "(rows, 3) (sample, row, col)")
    if array.shape[1] != 3 or (rows is not None and array.shape[0] != rows):
        raise ValueError(f"{name}: {arg}.shape={array.shape}, expected ({'P' if rows is None else rows}, 3).")
    if array.dtype != jnp.int32:
        raise TypeError(f"{name}: {arg}.dtype={array.dtype}, expected int32.")


def patch_conv(
    rows: jax.Array,
    row_map: jax.Array | None,
    starts: jax.Array,
    w: jax.Array,
    b: jax.Array,
    *,
    grid: tuple[int, int, int],
    size: int,
    stride: int,
    relu: bool = True,
    tiles: TileConfig | None = None,
    split_k: int | None = None,
    implementation: Implementation = "pallas",
) -> jax.Array:
    """act(conv3x3_stride(map) + b) on every listed S x S output patch, compact.

    Args:
      rows: (N, Cin) rows of the input map (conv1's compact output), float32 or bfloat16.
      row_map: (B * H * W,) int32: entry (b * H + y) * W + x is the row of pixel (b, y,
        x), any value outside [0, N) where the pixel has none (reads zeros); rows no
        entry points to (padding) are never read. Built once per set of rows (the
        engine's routing; `make_row_map(coords, grid)` from a coordinate list). None:
        rows is the whole map in row-major order (N = B * H * W).
      starts: (P, 3) int32 (sample, row, col) of each patch's first output pixel;
        patches with sample >= B are padding (written as zeros).
      w: (3, 3, Cin, Cout) HWIO weight (BN folded in), same dtype as rows.
      b: (Cout,) bias (float32 or rows' dtype).
      grid: (B, H, W) of the input map.
      size: S, the patch side on the output grid (any S >= 1).
      stride: 1 or 2.
      relu: apply relu after the bias.
      tiles: tile sizes; `default_tiles(Cin, Cout)` when None.
      split_k: CTAs sharing each output tile's 9 x cdiv(Cin, block_k) K steps (their
        float32 partial sums are added by one XLA reduction); must divide the steps.
        None: `split_k(tiles, steps)` of `_common`, which splits grids under one wave.
      implementation: 'pallas', 'interpret' or 'reference'.

    Returns:
      (P, S, S, Cout): slot p holds the patch whose first output pixel is starts[p].
    """
    c.check_implementation(NAME, implementation)
    c.check_ndim(NAME, "rows", rows, 2, "(N, Cin) rows")
    c.check_dtype(NAME, "rows", rows)
    n_src, cin = rows.shape
    batch, height, width = grid
    if row_map is None and n_src != batch * height * width:
        raise ValueError(f"{NAME}: row_map=None needs rows for all {batch}x{height}x{width} pixels, got {n_src}.")
    if row_map is not None:
        c.check_index_list(NAME, "row_map", row_map)
        c.check_shape(NAME, "row_map", row_map, (batch * height * width,))
    _check_index_table(NAME, "starts", starts, None)
    if stride not in (1, 2):
        raise ValueError(f"{NAME}: stride={stride!r}; supported strides are 1 and 2.")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"{NAME}: size={size!r}; must be an int >= 1.")
    c.check_ndim(NAME, "w", w, 4, "HWIO (3, 3, Cin, Cout)")
    if w.shape[:3] != (3, 3, cin):
        raise ValueError(f"{NAME}: w.shape={w.shape}, expected (3, 3, {cin}, Cout) for rows with Cin={cin}.")
    c.check_dtype(NAME, "w", w, rows.dtype)
    cout = w.shape[3]
    c.check_shape(NAME, "b", b, (cout,))
    c.check_dtype(NAME, "b", b)
    patches = starts.shape[0]
    c.check_addressable(NAME, "rows", rows)
    if row_map is not None:
        c.check_addressable(NAME, "row_map", row_map)
    c.check_addressable(NAME, "out", jax.ShapeDtypeStruct((patches, size, size, cout), rows.dtype))
    if implementation == "reference":
        return patch_conv_reference(rows, row_map, starts, w, b, grid=grid, size=size, stride=stride, relu=relu)
    if patches == 0:
        return jnp.zeros((0, size, size, cout), rows.dtype)
    operands = [starts.reshape(-1), rows.reshape(-1), w.reshape(-1), b]
    if row_map is not None:
        operands.append(row_map)
    tiles = tiles or default_tiles(cin, cout)
    out_rows = patches * size * size
    grid_mn = (pl.cdiv(out_rows, tiles.block_m), pl.cdiv(cout, tiles.block_n))
    k_steps = 9 * pl.cdiv(cin, tiles.block_k)
    parts = c.choose_split(NAME, tiles, out_rows, cout, k_steps, split_k)
    geometry = _Geometry(batch, height, width, size, stride, patches, row_map=row_map is not None, n_src=n_src)
    kernel = functools.partial(
        _kernel,
        geometry=geometry,
        cin=cin,
        cout=cout,
        relu=relu,
        tiles=tiles,
        parts=parts,
        mem=c.Memory(implementation == "interpret"),
    )
    result = c.pallas_call(
        kernel,
        operands,
        name=NAME,
        grid=(*grid_mn, parts),
        out_shape=((parts * out_rows * cout,), rows.dtype if parts == 1 else jnp.float32),
        tiles=tiles,
        implementation=implementation,
    )
    if parts > 1:
        result = c.reduce_split(result.reshape(parts, out_rows * cout), relu, rows.dtype)
    return result.reshape(patches, size, size, cout)

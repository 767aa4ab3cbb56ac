"""Kernel 1: fused row gather + 1x1 conv (+ folded BN bias) + relu.

Computes conv1 of a bottleneck block only at the active input-resolution pixels (the
spatial mask dilated to conv2's receptive field). Two entry points share one kernel:

- `gather_conv1x1` writes each result row back at its pixel of a full-resolution NHWC
  buffer, so kernel 2 can read any pixel's 3x3 neighbourhood by address. Layout: x
  (B, H, W, Cin); pixel_indices (capacity,) int32 flat pixel ids b * H * W + y * W + x, of
  which the first `pixel_count` are valid (the rest is padding of the capacity bucket and
  is never read as an address nor written). Pixels not listed are not written.
- `gather_matmul` is the sparse engine's form: out[i] = act(sum_k src[taps[i, k]] @ w_k + b)
  on compact rows, where taps out of range (the engine's sentinel) read zeros; K = 1
  for a bottleneck's conv1, K = 9 for a basic block's 3x3 conv1 (im2col by index).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as c
from pallas_kernels._common import Implementation, TileConfig

NAME = "gather_conv1x1"


def default_tiles(cin: int, cout: int) -> TileConfig:
    """Default tiles for Cin=cin input and Cout=cout output channels."""
    return c.tuned_tiles(cin, cout)


def reference(
    x: jax.Array,
    pixel_indices: jax.Array,
    pixel_count: jax.Array | int,
    w: jax.Array,
    b: jax.Array,
    *,
    out: jax.Array | None = None,
) -> jax.Array:
    """Pure-jnp gather_conv1x1; unlisted pixels keep `out` (zeros when not given)."""
    batch, height, width, _ = x.shape
    cout = w.shape[1]
    rows = x.reshape(batch * height * width, -1)
    valid = jnp.arange(pixel_indices.shape[0]) < pixel_count
    safe = jnp.where(valid, pixel_indices, 0)
    y = jnp.dot(
        rows[safe].astype(jnp.float32),
        w.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    y = jnp.maximum(y + b.astype(jnp.float32), 0.0).astype(x.dtype)
    if out is None:
        out = jnp.zeros((batch, height, width, cout), x.dtype)
    target = jnp.where(valid, pixel_indices, out.size)  # padding -> dropped
    flat = out.reshape(-1, cout).at[target].set(y, mode="drop")
    return flat.reshape(out.shape)


def _kernel(
    count_ref, taps_ref, src_ref, w_ref, b_ref, *refs, n_taps, n_src, cin, cout, capacity,
    scatter, relu, tiles, mem,
):
    o_ref = refs[-1]
    bm, bn = tiles.block_m, tiles.block_n
    pid_m, pid_n = pl.program_id(0), pl.program_id(1)
    count = jnp.minimum(c.load_scalar(count_ref), capacity)

    @pl.when(pid_m * bm < count)
    def _compute():
        rows = c.tile_range(pid_m, bm)
        valid = rows < count

        def source(tap):
            src_rows = mem.load(taps_ref, rows * n_taps + tap, valid)
            return src_rows, valid & (src_rows >= 0) & (src_rows < n_src)

        first = source(0)  # with one tap: gathered once, reused by every K step
        cols = c.tile_range(pid_n, bn)
        col_ok = cols < cout
        acc = c.tap_matmul(
            mem, src_ref, w_ref, source=source if n_taps > 1 else (lambda _: first),
            n_taps=n_taps, cin=cin, cout=cout, cols=cols, col_ok=col_ok, tiles=tiles,
        )
        y = acc + mem.load(b_ref, cols, col_ok).astype(jnp.float32)[None, :]
        if relu:
            y = jnp.maximum(y, 0.0)
        out_rows, write = first if scatter else (rows, valid)
        mem.store(o_ref, out_rows[:, None] * cout + cols[None, :], y, write[:, None] & col_ok[None, :])


def _launch(
    name: str, count: jax.Array, taps: jax.Array, src: jax.Array, w: jax.Array, b: jax.Array,
    out: jax.Array | None, *, out_rows: int, scatter: bool, relu: bool, tiles: TileConfig,
    implementation: str,
) -> jax.Array:
    capacity, n_taps = taps.shape
    n_src, cin = src.shape
    cout = w.shape[-1]
    kernel = functools.partial(
        _kernel, n_taps=n_taps, n_src=n_src, cin=cin, cout=cout, capacity=capacity,
        scatter=scatter, relu=relu, tiles=tiles, mem=c.Memory(implementation == "interpret"),
    )
    operands = [count.reshape(1), taps.reshape(-1), src.reshape(-1), w.reshape(-1), b]
    aliases = {}
    if out is not None:
        aliases = {len(operands): 0}
        operands.append(out.reshape(-1))
    return c.pallas_call(
        kernel,
        operands,
        name=name,
        grid=(pl.cdiv(capacity, tiles.block_m), pl.cdiv(cout, tiles.block_n)),
        out_shape=((out_rows * cout,), src.dtype),
        tiles=tiles,
        implementation=implementation,
        input_output_aliases=aliases,
    )


def gather_conv1x1(
    x: jax.Array,
    pixel_indices: jax.Array,
    pixel_count: jax.Array | int,
    w: jax.Array,
    b: jax.Array,
    *,
    out: jax.Array | None = None,
    tiles: TileConfig | None = None,
    implementation: Implementation = "pallas",
) -> jax.Array:
    """relu(x[p] @ w + b) written at every listed pixel p of a (B, H, W, Cout) buffer.

    Args:
      x: (B, H, W, Cin) block input, float32 or bfloat16.
      pixel_indices: (capacity,) int32 flat pixel ids; entries >= pixel_count are padding.
      pixel_count: number of valid entries (int or int32 scalar array).
      w: (Cin, Cout) conv1 weight with BN folded in, same dtype as x.
      b: (Cout,) folded BN bias (float32 or x's dtype).
      out: optional (B, H, W, Cout) buffer to write into (aliased, updated in place);
        unlisted pixels keep its values. Without it they are undefined.
      tiles: tile sizes; `default_tiles(Cin, Cout)` when None.
      implementation: 'pallas' (Triton GPU kernel), 'interpret' (the same kernel
        interpreted on CPU, slow) or 'reference' (pure jnp).
    """
    c.check_implementation(NAME, implementation)
    c.check_ndim(NAME, "x", x, 4, "NHWC (B, H, W, Cin)")
    c.check_dtype(NAME, "x", x)
    batch, height, width, cin = x.shape
    c.check_ndim(NAME, "w", w, 2, "(Cin, Cout)")
    if w.shape[0] != cin:
        raise ValueError(f"{NAME}: w.shape={w.shape} has Cin={w.shape[0]}, but x has Cin={cin}.")
    c.check_dtype(NAME, "w", w, x.dtype)
    cout = w.shape[1]
    c.check_shape(NAME, "b", b, (cout,))
    c.check_dtype(NAME, "b", b)
    c.check_index_list(NAME, "pixel_indices", pixel_indices)
    count = c.as_count(NAME, "pixel_count", pixel_count)
    out_shape = (batch, height, width, cout)
    if out is not None:
        c.check_shape(NAME, "out", out, out_shape)
        c.check_dtype(NAME, "out", out, x.dtype)
    for name, array in (("x", x), ("out", jax.ShapeDtypeStruct(out_shape, x.dtype))):
        c.check_addressable(NAME, name, array)

    if implementation == "reference":
        return reference(x, pixel_indices, count, w, b, out=out)
    capacity = pixel_indices.shape[0]
    if capacity == 0:
        return out if out is not None else jnp.zeros(out_shape, x.dtype)
    tiles = tiles or default_tiles(cin, cout)
    result = _launch(
        NAME, count, pixel_indices[:, None], x.reshape(-1, cin), w, b, out,
        out_rows=batch * height * width, scatter=True, relu=True, tiles=tiles,
        implementation=implementation,
    )
    return result.reshape(out_shape)


def gather_matmul_reference(src: jax.Array, taps: jax.Array, w: jax.Array, b: jax.Array, *, relu: bool) -> jax.Array:
    """Pure-jnp gather_matmul."""
    taps = jnp.where(taps >= 0, taps, src.shape[0])  # negative ids read zeros too
    gathered = jnp.take(src, taps, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
    y = jnp.dot(gathered.reshape(taps.shape[0], -1), w.astype(jnp.float32),
                precision=jax.lax.Precision.HIGHEST) + b.astype(jnp.float32)
    return (jnp.maximum(y, 0.0) if relu else y).astype(src.dtype)


def gather_matmul(
    src: jax.Array,
    taps: jax.Array,
    w: jax.Array,
    b: jax.Array,
    *,
    relu: bool = True,
    tiles: TileConfig | None = None,
    implementation: Implementation = "pallas",
) -> jax.Array:
    """act(concat_k src[taps[:, k]] @ w + b) for every row of `taps` (compact output).

    Args:
      src: (R, C) source rows (a flattened NHWC activation), float32 or bfloat16.
      taps: (N, K) int32 row ids; ids outside [0, R) read as zeros (padding, image border).
      w: (K * C, Cout) weight (tap-major, BN folded in), same dtype as src.
      b: (Cout,) bias.
      relu: apply relu after the bias.
      tiles: tile sizes; `default_tiles(C, Cout)` when None.
      implementation: 'pallas', 'interpret' or 'reference'.

    Returns:
      (N, Cout); every row is written (padding rows hold act(b)).
    """
    name = "gather_matmul"
    c.check_implementation(name, implementation)
    c.check_ndim(name, "src", src, 2, "(R, C) rows")
    c.check_dtype(name, "src", src)
    c.check_ndim(name, "taps", taps, 2, "(N, K) row ids")
    if taps.dtype != jnp.int32:
        raise TypeError(f"{name}: taps.dtype={taps.dtype}, expected int32.")
    rows, n_taps = taps.shape
    cin = src.shape[1]
    c.check_ndim(name, "w", w, 2, "(K * C, Cout)")
    if w.shape[0] != n_taps * cin:
        raise ValueError(
            f"{name}: w.shape={w.shape} has {w.shape[0]} rows, expected K * C = {n_taps} * {cin}."
        )
    c.check_dtype(name, "w", w, src.dtype)
    cout = w.shape[1]
    c.check_shape(name, "b", b, (cout,))
    c.check_dtype(name, "b", b)
    c.check_addressable(name, "src", src)
    c.check_addressable(name, "out", jax.ShapeDtypeStruct((rows, cout), src.dtype))
    if implementation == "reference":
        return gather_matmul_reference(src, taps, w, b, relu=relu)
    if rows == 0:
        return jnp.zeros((0, cout), src.dtype)
    tiles = tiles or default_tiles(cin, cout)
    result = _launch(
        name, jnp.asarray(rows, jnp.int32), taps, src, w, b, None, out_rows=rows, scatter=False,
        relu=relu, tiles=tiles, implementation=implementation,
    )
    return result.reshape(rows, cout)

"""Kernel 1: fused pixel gather + 1x1 conv (+ folded BN bias) + relu.

Computes conv1 of a bottleneck block only at the listed input-resolution pixels (the
active pixels of the spatial mask dilated to conv2's receptive field) and writes each
result row back at the same pixel of a full-resolution NHWC buffer, so kernel 2 can read
any pixel's 3x3 neighbourhood directly. Pixels not in the list are not written.

Layout: x (B, H, W, Cin) NHWC; pixel_indices (capacity,) int32 holding flat pixel ids
b * H * W + y * W + x, of which the first `pixel_count` are valid (the rest is padding of
the power-of-two capacity bucket and is never read as an address nor written).
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


def _kernel(count_ref, idx_ref, x_ref, w_ref, b_ref, *refs, cin, cout, capacity, tiles, mem):
    o_ref = refs[-1]
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    pid_m, pid_n = pl.program_id(0), pl.program_id(1)
    count = jnp.minimum(c.load_scalar(count_ref), capacity)

    @pl.when(pid_m * bm < count)
    def _compute():
        slots = c.tile_range(pid_m, bm)
        valid = slots < count
        pixels = mem.load(idx_ref, slots, valid)
        cols = c.tile_range(pid_n, bn)
        col_ok = cols < cout

        def step(k_step, acc):
            ks = k_step * bk + jnp.arange(bk, dtype=jnp.int32)
            k_ok = ks < cin
            a = mem.load(x_ref, pixels[:, None] * cin + ks[None, :], valid[:, None] & k_ok[None, :])
            wt = mem.load(w_ref, ks[:, None] * cout + cols[None, :], k_ok[:, None] & col_ok[None, :])
            return acc + c.dot(a, wt)

        acc = jax.lax.fori_loop(0, pl.cdiv(cin, bk), step, jnp.zeros((bm, bn), jnp.float32))
        bias = mem.load(b_ref, cols, col_ok).astype(jnp.float32)
        y = jnp.maximum(acc + bias[None, :], 0.0)
        mem.store(o_ref, pixels[:, None] * cout + cols[None, :], y, valid[:, None] & col_ok[None, :])


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
    kernel = functools.partial(
        _kernel, cin=cin, cout=cout, capacity=capacity, tiles=tiles,
        mem=c.Memory(implementation == "interpret"),
    )
    operands = [count.reshape(1), pixel_indices, x.reshape(-1), w.reshape(-1), b]
    aliases = {}
    if out is not None:
        aliases = {len(operands): 0}
        operands.append(out.reshape(-1))
    result = c.pallas_call(
        kernel,
        operands,
        name=NAME,
        grid=(pl.cdiv(capacity, tiles.block_m), pl.cdiv(cout, tiles.block_n)),
        out_shape=((batch * height * width * cout,), x.dtype),
        tiles=tiles,
        implementation=implementation,
        input_output_aliases=aliases,
    )
    return result.reshape(out_shape)

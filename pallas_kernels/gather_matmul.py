"""gather_matmul: fused row gather + matmul (+ folded BN bias) + optional relu.

out[i] = act(concat_k src[taps[i, k]] @ w + b) on compact rows. `src` is a flattened
NHWC activation (one row per pixel), `taps` (N, K) lists for every output row the K
source rows it reads; ids outside [0, R) (the sparse engine's padding sentinel, the
image border of a 3x3 conv done by index) read as zeros. K = 1 is a bottleneck's conv1
on the dilated active pixels, K = 9 a basic block's 3x3 conv1 (im2col by index).
The gather happens in the kernel: no gathered copy of `src` is materialized.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as c
from pallas_kernels._common import Implementation, TileConfig

NAME = "gather_matmul"


def default_tiles(cin: int, cout: int) -> TileConfig:
    """Default tiles for C=cin source and Cout=cout output channels."""
    return c.tuned_tiles(cin, cout)


def gather_matmul_reference(
    src: jax.Array, taps: jax.Array, w: jax.Array, b: jax.Array, *, relu: bool, transposed_w: bool = False
) -> jax.Array:
    """Pure-jnp gather_matmul (float32 accumulation at the highest precision)."""
    w = w.T if transposed_w else w
    taps = jnp.where(taps >= 0, taps, src.shape[0])  # negative ids read zeros too
    gathered = jnp.take(src, taps, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
    y = jnp.dot(
        gathered.reshape(taps.shape[0], -1),
        w.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    y = y + b.astype(jnp.float32)
    return (jnp.maximum(y, 0.0) if relu else y).astype(src.dtype)


def _kernel(
    taps_ref, src_ref, w_ref, b_ref, o_ref, *, n_taps, n_src, cin, cout, rows, relu, tiles, parts, transposed_w, mem
):
    """One (block_m rows, block_n channels) tile of the compact output; split-K (parts >
    1): part pid_k's float32 partial sums (the bias in part 0, no activation) into the
    pid_k-th (N, Cout) block."""
    bm, bn = tiles.block_m, tiles.block_n
    pid_m, pid_n, pid_k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    out_rows = c.tile_range(pid_m, bm)
    valid = out_rows < rows

    # Every tap's source rows are looked up once, before the K loop (-1: reads zeros);
    # each step picks its tap's with n_taps - 1 selects, so no load of the loop depends
    # on a load of the same step and Triton keeps copies in flight across steps.
    sources = []
    for tap in range(n_taps):
        src_rows = mem.load(taps_ref, out_rows * n_taps + tap, valid)
        sources.append(jnp.where(valid & (src_rows >= 0) & (src_rows < n_src), src_rows, -1))

    def source(tap):
        chosen = sources[0]
        for t in range(1, n_taps):
            chosen = jnp.where(tap == t, sources[t], chosen)
        return chosen, chosen >= 0

    cols = c.tile_range(pid_n, bn)
    col_ok = cols < cout
    acc = c.tap_matmul(
        mem,
        src_ref,
        w_ref,
        source=source,
        n_taps=n_taps,
        cin=cin,
        cout=cout,
        cols=cols,
        col_ok=col_ok,
        tiles=tiles,
        split=(pid_k, parts),
        transposed_w=transposed_w,
    )
    y = acc + mem.load(b_ref, cols, col_ok & (pid_k == 0)).astype(jnp.float32)[None, :]
    if relu and parts == 1:
        y = jnp.maximum(y, 0.0)
    offsets = (pid_k * rows + out_rows[:, None]) * cout + cols[None, :]
    mem.store(o_ref, offsets, y, valid[:, None] & col_ok[None, :])


def gather_matmul(
    src: jax.Array,
    taps: jax.Array,
    w: jax.Array,
    b: jax.Array,
    *,
    relu: bool = True,
    tiles: TileConfig | None = None,
    split_k: int | None = None,
    transposed_w: bool = False,
    implementation: Implementation = "pallas",
) -> jax.Array:
    """act(concat_k src[taps[:, k]] @ w + b) for every row of `taps` (compact output).

    Args:
      src: (R, C) source rows (a flattened NHWC activation), float32 or bfloat16.
      taps: (N, K) int32 row ids; ids outside [0, R) read as zeros (padding, image border).
      w: (K * C, Cout) weight (tap-major, BN folded in), same dtype as src.
      b: (Cout,) bias (float32 or src's dtype).
      relu: apply relu after the bias.
      tiles: tile sizes; `default_tiles(C, Cout)` when None.
      split_k: CTAs sharing each output tile's K * cdiv(C, block_k) K steps (their
        float32 partial sums are added by one XLA reduction); must divide the steps.
        None: `split_k(tiles, steps)` of `_common`, which splits grids under one wave.
      transposed_w: w is given transposed, (Cout, K * C): the reduction runs along
        memory, the layout float32 (TF32) tensor cores read directly on sm_90 (16-byte
        copies of the weight tile instead of 4-byte ones; docs/kernels.md). Prepare it
        once, with the weights.
      implementation: 'pallas' (Triton GPU kernel), 'interpret' (the same kernel
        interpreted on CPU, slow) or 'reference' (pure jnp).

    Returns:
      (N, Cout) in src's dtype; every row is written (rows of padding taps hold act(b)).
    """
    c.check_implementation(NAME, implementation)
    c.check_ndim(NAME, "src", src, 2, "(R, C) rows")
    c.check_dtype(NAME, "src", src)
    c.check_ndim(NAME, "taps", taps, 2, "(N, K) row ids")
    if taps.dtype != jnp.int32:
        raise TypeError(f"{NAME}: taps.dtype={taps.dtype}, expected int32.")
    rows, n_taps = taps.shape
    n_src, cin = src.shape
    c.check_ndim(NAME, "w", w, 2, "(Cout, K * C) (transposed_w)" if transposed_w else "(K * C, Cout)")
    k_axis = 1 if transposed_w else 0
    if w.shape[k_axis] != n_taps * cin:
        raise ValueError(
            f"{NAME}: w.shape={w.shape} has {w.shape[k_axis]} {'columns' if transposed_w else 'rows'}, "
            f"expected K * C = {n_taps} * {cin}."
        )
    c.check_dtype(NAME, "w", w, src.dtype)
    cout = w.shape[1 - k_axis]
    c.check_shape(NAME, "b", b, (cout,))
    c.check_dtype(NAME, "b", b)
    c.check_addressable(NAME, "src", src)
    c.check_addressable(NAME, "taps", taps)
    c.check_addressable(NAME, "out", jax.ShapeDtypeStruct((rows, cout), src.dtype))
    if implementation == "reference":
        return gather_matmul_reference(src, taps, w, b, relu=relu, transposed_w=transposed_w)
    if rows == 0:
        return jnp.zeros((0, cout), src.dtype)
    tiles = tiles or default_tiles(cin, cout)
    grid_mn = (pl.cdiv(rows, tiles.block_m), pl.cdiv(cout, tiles.block_n))
    k_steps = n_taps * pl.cdiv(cin, tiles.block_k)
    parts = c.choose_split(NAME, tiles, rows, cout, k_steps, split_k)
    kernel = functools.partial(
        _kernel,
        n_taps=n_taps,
        n_src=n_src,
        cin=cin,
        cout=cout,
        rows=rows,
        relu=relu,
        tiles=tiles,
        parts=parts,
        transposed_w=transposed_w,
        mem=c.Memory(implementation == "interpret"),
    )
    result = c.pallas_call(
        kernel,
        [taps.reshape(-1), src.reshape(-1), w.reshape(-1), b],
        name=NAME,
        grid=(*grid_mn, parts),
        out_shape=((parts * rows * cout,), src.dtype if parts == 1 else jnp.float32),
        tiles=tiles,
        implementation=implementation,
    )
    if parts > 1:
        result = c.reduce_split(result.reshape(parts, rows * cout), relu, src.dtype)
    return result.reshape(rows, cout)

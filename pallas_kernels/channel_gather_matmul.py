"""channel_gather_matmul: channel-group gather matmul for dynamic channel skipping.

out[b, m, j] = act(sum_t x[b, m, kx(t)] * w[kw(t), nw(j)] + bias[nw(j)]) where t runs only
over the active input channels of sample b and j over its active output channels:
channel groups of `group_size` channels are listed per sample (padded to a capacity,
with a per-sample count). The weight rows/columns (and, for a full-width x, the input
columns) are gathered inside the kernel, so nothing compact is materialized and the
reduction stops at the sample's own count (no work for skipped groups).

- in_groups=None: all K input channels. Otherwise (B, Gi) group ids; with
  x_compact=False x holds all K channels and its columns are gathered, with
  x_compact=True x already holds the Gi * group_size active channels in slot order
  (the output of a previous channel-gathered layer).
- out_groups=None: all N output channels, out (B, M, N). Otherwise (B, Go) group ids and
  out (B, M, Go * group_size) in slot order, with columns of padding slots set to 0.

Used for conv1 (in: all, out: groups) and conv3 (in: compact groups, out: all) of a
channel-skipping bottleneck, and for any 1x1 conv or linear layer on active groups.

With an input list, each K step's channel ids are looked up one step ahead and carried
into the next step, so the step's x and weight loads depend on the loop counter and the
carried ids only: Triton then keeps copies in flight across steps. (Looked up in the
step that uses them, the ids fed the weight tile's addresses from a load of the same
step, and every step waited for all its copies: `cp.async.wait_group 0`.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as c
from pallas_kernels._common import Implementation, TileConfig

NAME = "channel_gather_matmul"


def default_tiles(k: int, n: int) -> TileConfig:
    """Default tiles for K=k input and N=n output channels."""
    return c.tuned_tiles(k, n)


def _channels(groups: jax.Array, count: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
    """Per sample: the channel ids of the listed groups (B, G * g) and their validity."""
    slots = jnp.arange(groups.shape[1] * group_size)
    channels = groups[:, slots // group_size] * group_size + slots % group_size
    valid = slots[None, :] < count[:, None] * group_size
    return jnp.where(valid, channels, 0), valid


def channel_gather_matmul_reference(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array,
    *,
    in_groups: jax.Array | None,
    in_count: jax.Array | None,
    out_groups: jax.Array | None,
    out_count: jax.Array | None,
    group_size: int,
    x_compact: bool,
    relu: bool,
    transposed_w: bool = False,
) -> jax.Array:
    """Pure-jnp channel_gather_matmul: zero the inactive input channels, dense matmul,
    pick the output columns."""
    w = w.T if transposed_w else w
    batch, _, _ = x.shape
    k, _ = w.shape
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if in_groups is None:
        dense_x = x
    else:
        channels, valid = _channels(in_groups, in_count, group_size)
        source = x if x_compact else jnp.take_along_axis(x, channels[:, None, :], axis=2)
        source = jnp.where(valid[:, None, :], source, 0.0)
        rows = jnp.broadcast_to(jnp.arange(batch)[:, None], channels.shape)
        dense_x = jnp.zeros((batch, x.shape[1], k), jnp.float32)
        dense_x = dense_x.at[rows, :, channels].add(jnp.moveaxis(source, 2, 1))
    y = jnp.einsum("bmk,kn->bmn", dense_x, w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    y = y + b.astype(jnp.float32)
    if relu:
        y = jnp.maximum(y, 0.0)
    if out_groups is not None:
        channels, valid = _channels(out_groups, out_count, group_size)
        y = jnp.take_along_axis(y, channels[:, None, :], axis=2)
        y = jnp.where(valid[:, None, :], y, 0.0)
    return y.astype(dtype)


def _kernel(*refs, m, k, kx, n, n_out, gi, go, group_size, x_compact, relu, tiles, batch, parts, transposed_w, mem):
    """One (block_m, block_n) output tile of one sample; split-K (parts > 1): part
    `part` of the sample's K steps, float32 partial sums (the bias in part 0, no
    activation) into the part-th (B, M, n_out) block."""
    in_groups_ref = in_count_ref = out_groups_ref = out_count_ref = None
    refs = list(refs)
    if gi:
        in_groups_ref, in_count_ref = refs.pop(0), refs.pop(0)
    if go:
        out_groups_ref, out_count_ref = refs.pop(0), refs.pop(0)
    x_ref, w_ref, b_ref = refs[:3]
    o_ref = refs[-1]
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    pid_m, pid_n, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    sample, part = c.div(pid_s, parts), c.rem(pid_s, parts)

    rows = c.tile_range(pid_m, bm)
    row_ok = rows < m
    cols = c.tile_range(pid_n, bn)
    if go:
        n_valid = jnp.minimum(out_count_ref[sample], go) * group_size
        col_ok = cols < n_valid
        group = mem.load(out_groups_ref, sample * go + c.div(cols, group_size), col_ok)
        w_cols = group * group_size + c.rem(cols, group_size)
    else:
        n_valid = n
        col_ok = cols < n
        w_cols = cols
    k_valid = jnp.minimum(in_count_ref[sample], gi) * group_size if gi else k
    # No reduction for output tiles that hold only padding slots.
    k_steps = (pid_n * bn < n_valid).astype(jnp.int32) * pl.cdiv(k_valid, bk)
    per_part = pl.cdiv(gi * group_size if gi else k, bk) // parts
    first = part * per_part
    x_rows = (sample * m + rows) * kx

    def listed(j):
        """The weight rows (listed channels) of step j's reduction positions."""
        ts = (first + j) * bk + jnp.arange(bk, dtype=jnp.int32)
        group = mem.load(in_groups_ref, sample * gi + c.div(ts, group_size), ts < k_valid)
        return group * group_size + c.rem(ts, group_size)

    def step(j, carry):
        acc, w_rows = carry
        ts = (first + j) * bk + jnp.arange(bk, dtype=jnp.int32)
        t_ok = ts < k_valid
        if not gi:
            w_rows = ts
        x_cols = w_rows if gi and not x_compact else ts
        a = mem.load(x_ref, x_rows[:, None] + x_cols[None, :], row_ok[:, None] & t_ok[None, :])
        w_offsets = w_cols[None, :] * k + w_rows[:, None] if transposed_w else w_rows[:, None] * n + w_cols[None, :]
        wt = mem.load(w_ref, w_offsets, t_ok[:, None] & col_ok[None, :])
        # With an input list, the next step's rows are looked up one step ahead and
        # carried: no load of a step then depends on a load of the same step.
        return acc + c.dot(a, wt), listed(j + 1) if gi else w_rows

    steps = jnp.clip(k_steps - first, 0, per_part)
    start = listed(0) if gi else jnp.zeros((bk,), jnp.int32)
    acc, _ = jax.lax.fori_loop(0, steps, step, (jnp.zeros((bm, bn), jnp.float32), start))
    y = acc + mem.load(b_ref, w_cols, col_ok & (part == 0)).astype(jnp.float32)[None, :]
    if relu and parts == 1:
        y = jnp.maximum(y, 0.0)
    y = jnp.where(col_ok[None, :], y, 0.0)
    offsets = ((part * batch + sample) * m + rows)[:, None] * n_out + cols[None, :]
    mem.store(o_ref, offsets, y, row_ok[:, None] & (cols < n_out)[None, :])


def channel_gather_matmul(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array,
    *,
    group_size: int,
    in_groups: jax.Array | None = None,
    in_count: jax.Array | None = None,
    out_groups: jax.Array | None = None,
    out_count: jax.Array | None = None,
    x_compact: bool = False,
    relu: bool = True,
    out: jax.Array | None = None,
    tiles: TileConfig | None = None,
    split_k: int | None = None,
    transposed_w: bool = False,
    implementation: Implementation = "pallas",
) -> jax.Array:
    """Matmul over the active channel groups of each sample (see the module docstring).

    Args:
      x: (B, M, Kx) activations (M pixels per sample), float32 or bfloat16.
      w: (K, N) weight (BN folded in), same dtype as x; (N, K) with transposed_w.
      b: (N,) bias.
      group_size: channels per group g (K and N must be multiples of g where grouped).
      in_groups, in_count: (B, Gi) int32 active input group ids and (B,) counts, or None.
      out_groups, out_count: (B, Go) int32 active output group ids and (B,) counts, or None.
      x_compact: x holds only the Gi * g listed input channels (Kx = Gi * g).
      relu: apply relu after the bias.
      out: optional buffer of the output's shape (aliased without split-K; every element
        is written).
      tiles: tile sizes; `default_tiles(K, N)` when None.
      split_k: CTAs sharing each output tile's cdiv(Gi * g or K, block_k) K steps (their
        float32 partial sums are added by one XLA reduction); must divide the steps.
        None: `split_k(tiles, steps)` of `_common`, which splits grids under one wave.
      transposed_w: w is given transposed, (N, K): the reduction runs along memory
        (docs/kernels.md: the weight tile's copies are 16 bytes wide where its K
        positions are contiguous, i.e. without an input list, for bf16 and for float32
        on sm_90's TF32 tensor cores). Prepare it once, with the weights.
      implementation: 'pallas', 'interpret' or 'reference'.
    """
    c.check_implementation(NAME, implementation)
    c.check_ndim(NAME, "x", x, 3, "(B, M, K) pixel rows")
    c.check_dtype(NAME, "x", x)
    batch, m, kx = x.shape
    c.check_ndim(NAME, "w", w, 2, "(N, K) (transposed_w)" if transposed_w else "(K, N)")
    c.check_dtype(NAME, "w", w, x.dtype)
    n, k = w.shape if transposed_w else w.shape[::-1]
    c.check_shape(NAME, "b", b, (n,))
    c.check_dtype(NAME, "b", b)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{NAME}: group_size={group_size!r}; must be an int >= 1.")
    gi = go = 0
    if in_groups is None:
        if x_compact:
            raise ValueError(f"{NAME}: x_compact=True needs in_groups (the listed channels).")
        if kx != k:
            raise ValueError(f"{NAME}: x.shape={x.shape} has K={kx}, but w.shape={w.shape} has K={k}.")
    else:
        if k % group_size:
            raise ValueError(f"{NAME}: K={k} is not a multiple of group_size={group_size}.")
        c.check_ndim(NAME, "in_groups", in_groups, 2, "(B, Gi) group ids")
        c.check_dtype(NAME, "in_groups", in_groups, jnp.int32)
        if in_groups.shape[0] != batch:
            raise ValueError(f"{NAME}: in_groups.shape={in_groups.shape}, expected batch {batch}.")
        gi = in_groups.shape[1]
        in_count = c.as_count(NAME, "in_count", in_count, (batch,))
        expected_kx = gi * group_size if x_compact else k
        if kx != expected_kx:
            raise ValueError(
                f"{NAME}: x.shape={x.shape} has K={kx}, expected {expected_kx} "
                f"({'Gi * group_size (compact x)' if x_compact else 'the K of w'})."
            )
    if out_groups is None:
        n_out = n
    else:
        if n % group_size:
            raise ValueError(f"{NAME}: N={n} is not a multiple of group_size={group_size}.")
        c.check_ndim(NAME, "out_groups", out_groups, 2, "(B, Go) group ids")
        c.check_dtype(NAME, "out_groups", out_groups, jnp.int32)
        if out_groups.shape[0] != batch:
            raise ValueError(f"{NAME}: out_groups.shape={out_groups.shape}, expected batch {batch}.")
        go = out_groups.shape[1]
        out_count = c.as_count(NAME, "out_count", out_count, (batch,))
        n_out = go * group_size
    out_shape = (batch, m, n_out)
    if out is not None:
        c.check_shape(NAME, "out", out, out_shape)
        c.check_dtype(NAME, "out", out, x.dtype)
    c.check_addressable(NAME, "x", x)
    c.check_addressable(NAME, "out", jax.ShapeDtypeStruct(out_shape, x.dtype))

    if implementation == "reference":
        return channel_gather_matmul_reference(
            x,
            w,
            b,
            in_groups=in_groups,
            in_count=in_count,
            out_groups=out_groups,
            out_count=out_count,
            group_size=group_size,
            x_compact=x_compact,
            relu=relu,
            transposed_w=transposed_w,
        )
    if batch * m * n_out == 0:
        return jnp.zeros(out_shape, x.dtype)
    tiles = tiles or default_tiles(k, n)
    grid_mn = (pl.cdiv(m, tiles.block_m), pl.cdiv(n_out, tiles.block_n))
    k_steps = pl.cdiv(gi * group_size if gi else k, tiles.block_k)
    parts = c.choose_split(NAME, tiles, m, n_out, k_steps, split_k, batches=batch)
    kernel = functools.partial(
        _kernel,
        m=m,
        k=k,
        kx=kx,
        n=n,
        n_out=n_out,
        gi=gi,
        go=go,
        group_size=group_size,
        x_compact=x_compact,
        relu=relu,
        tiles=tiles,
        batch=batch,
        parts=parts,
        transposed_w=transposed_w,
        mem=c.Memory(implementation == "interpret"),
    )
    operands = []
    if gi:
        operands += [in_groups.reshape(-1), in_count]
    if go:
        operands += [out_groups.reshape(-1), out_count]
    operands += [x.reshape(-1), w.reshape(-1), b]
    aliases = {}
    if out is not None and parts == 1:
        aliases = {len(operands): 0}
        operands.append(out.reshape(-1))
    result = c.pallas_call(
        kernel,
        operands,
        name=NAME,
        grid=(*grid_mn, batch * parts),
        out_shape=((parts * batch * m * n_out,), x.dtype if parts == 1 else jnp.float32),
        tiles=tiles,
        implementation=implementation,
        input_output_aliases=aliases,
    )
    if parts > 1:
        result = c.reduce_split(result.reshape(parts, batch * m * n_out), relu, x.dtype)
    return result.reshape(out_shape)

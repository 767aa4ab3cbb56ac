"""Roofline time of kernel launches on a hardware profile (pure jnp, jit/vmap/grad friendly).

Per launch: ``weight * (launch_overhead + body)`` (loop steps pay ``loop_overhead``, host
round trips ``call_overhead`` only) where body combines

- compute: tiles of (tile_m x tile_n) outputs are spread over ``cores * tiles_per_core``
  slots; a wave of tiles takes ``2 tile_m tile_n k / slot_rate`` (a partial tile costs a
  whole one), so time = ceil(tiles / slots) waves (wave quantization). The slot rate is
  peak (per dtype) x efficiency (dense or gathered kernels) x k / (k + k_half) / slots.
- memory: streamed bytes (activations through the last-level cache when they fit, from
  DRAM otherwise; weights from DRAM; gathered runs shorter than a DRAM sector cost the
  whole sector) plus on-chip re-reads (the A panel once per extra N tile, the weight panel
  once per extra M tile of its GEMM) at L2 bandwidth.

and ``body = (1 - sum_weight) * max(compute, memory) + sum_weight * (compute + memory)``.
Gathered kernels use their own tile; dense-library kernels the fastest of the profile's
candidate tiles (shrunk to the problem) and of the engine's kernel tile.

A launch whose kernel geometry is known (``k_steps`` > 0: the Pallas kernels' CTAs and K
steps per CTA) is timed from it instead: ceil(ctas / slots) waves of one CTA's chain of
``k_steps`` steps of a (tile_m x tile_n x block_k) MMA, plus the memory latency the
pipeline exposes (every step's when the main loop is drained, ``wait_depth`` 0; once per
launch, filling the pipeline, otherwise); a grid of fewer CTAs than SMs streams its bytes
at that fraction of the bandwidth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from laud_jax.latency.launches import KIND_CONV, KIND_GATHERED, KIND_GROUPED, KIND_HOST, KIND_LOOP, Launches
from laud_jax.latency.profiles import HardwareProfile


def _safe_div(num, den):
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _gather_bytes(nbytes, seg, sector, gather_eff):
    """Bandwidth-equivalent bytes of ``nbytes`` accessed in contiguous runs of ``seg`` bytes
    (0: contiguous): a run shorter than a sector moves the whole sector, and indexed
    accesses reach ``gather_eff`` of the streaming bandwidth."""
    runs = jnp.where(seg > 0, seg, 1.0)
    waste = jnp.where(seg > 0, jnp.ceil(runs / sector) * sector / runs / gather_eff, 1.0)
    return nbytes * waste


def stream_time(profile: HardwareProfile, activation_bytes, weight_bytes):
    """Streaming time: activations hit the last-level cache while they fit, weights come from DRAM."""
    dram = profile.dram_bw * profile.mem_eff
    hit = jnp.clip(_safe_div(profile.l2_size, activation_bytes), 0.0, 1.0)
    return activation_bytes * (hit / profile.l2_bw + (1.0 - hit) / dram) + weight_bytes / dram


def launch_times(profile: HardwareProfile, launches: Launches, half) -> jax.Array:
    """Time in seconds of every launch slot (same shape as ``launches.weight``)."""
    p, L = profile, launches
    peak = jnp.where(jnp.asarray(half) > 0.5, p.flops_half, p.flops_fp32)
    eff = jnp.select(
        [L.kind == KIND_GATHERED, L.kind == KIND_CONV, L.kind == KIND_GROUPED],
        [p.eff_sparse, p.eff_conv, p.eff_grouped],
        p.eff_dense,
    )
    slots = p.cores * p.tiles_per_core
    slot_rate = peak * eff / slots
    a_moved = _gather_bytes(L.a_bytes, L.a_seg, p.sector_bytes, p.gather_eff)
    w_moved = _gather_bytes(L.w_bytes, L.w_seg, p.sector_bytes, p.gather_eff)
    o_moved = _gather_bytes(L.o_bytes, L.o_seg, p.sector_bytes, p.gather_eff)
    streamed = stream_time(p, a_moved + o_moved, w_moved)
    is_matmul = (L.m > 0) & (L.k > 0) & (L.n > 0)
    batches = jnp.maximum(L.batches, 1.0)

    rows = L.m / batches

    def combine(compute, memory):
        return (1.0 - p.sum_weight) * jnp.maximum(compute, memory) + p.sum_weight * (compute + memory)

    def tile_grid(tile_m, tile_n):
        """Row tiles, column tiles, and the bytes re-read from L2 by tiles sharing a row or column."""
        tiles_m = batches * jnp.ceil(_safe_div(rows, tile_m))
        tiles_n = jnp.ceil(_safe_div(L.n, tile_n))
        reread = jnp.maximum(tiles_n - 1.0, 0.0) * L.a_bytes + jnp.maximum(tiles_m / batches - 1.0, 0.0) * L.w_bytes
        return tiles_m, tiles_n, reread

    def with_tile(tile_m, tile_n, fit_problem):
        if fit_problem:  # a library never picks tiles much larger than the problem (>= 16)
            tile_m = jnp.minimum(tile_m, jnp.maximum(16.0, 2.0 ** jnp.ceil(jnp.log2(jnp.maximum(rows, 1.0)))))
            tile_n = jnp.minimum(tile_n, jnp.maximum(16.0, 2.0 ** jnp.ceil(jnp.log2(jnp.maximum(L.n, 1.0)))))
        tiles_m, tiles_n, reread = tile_grid(tile_m, tile_n)
        waves = jnp.ceil(_safe_div(tiles_m * tiles_n, slots))
        # k / (k + k_half) efficiency: a tile's time grows with k + k_half
        compute = waves * _safe_div(2.0 * tile_m * tile_n * (L.k + p.k_half), slot_rate)
        memory = streamed + reread / p.l2_bw
        compute = jnp.where(is_matmul, compute, 0.0)
        memory = jnp.where(is_matmul, memory, streamed)
        return combine(compute, memory)

    def with_geometry():
        waves = jnp.ceil(_safe_div(L.ctas, slots))
        chain = waves * _safe_div(2.0 * L.tile_m * L.tile_n * (L.k_steps * L.block_k + p.k_half), slot_rate)
        stalls = L.latency * jnp.where(L.wait_depth < 0.5, waves * L.k_steps, 1.0)
        _, _, reread = tile_grid(L.tile_m, L.tile_n)
        used = jnp.clip(_safe_div(L.ctas, p.cores), 1e-6, 1.0)  # fraction of the SMs the grid occupies
        compute = chain + stalls
        memory = (streamed + reread / p.l2_bw) / used
        return combine(compute, memory)

    # Gathered kernels run their own tile (their own geometry where known). Dense library
    # kernels take the fastest of the profile's tiles and the engine's kernel tile (a
    # library is never worse than ours).
    tiles = jnp.asarray(p.dense_tiles, jnp.float32).reshape(-1, 2)
    library = jnp.min(jnp.stack([with_tile(tiles[i, 0], tiles[i, 1], True) for i in range(tiles.shape[0])]), axis=0)
    custom = jnp.where(L.k_steps > 0, with_geometry(), with_tile(L.tile_m, L.tile_n, False))
    gathered = L.kind == KIND_GATHERED
    body = jnp.where(gathered, custom, jnp.where(L.tile_m > 0, jnp.minimum(custom, library), library))
    overhead = jnp.where(L.kind == KIND_LOOP, p.loop_overhead, p.launch_overhead)
    return L.weight * jnp.where(L.kind == KIND_HOST, p.call_overhead, overhead + body)


def total_time(profile: HardwareProfile, launches: Launches, half) -> jax.Array:
    """Sum over the launch slots (the last axis)."""
    return jnp.sum(launch_times(profile, launches, half), axis=-1)

"""The kernel launches of one block, as roofline work records: the one place that
describes what the sparse engine executes.

Every block (static or dynamic, any mode) is described by the same fixed list of launch
slots (``LAUNCH_NAMES``); a slot the configuration does not use has weight 0. A slot's
record holds its expected number of executions (``weight``), its GEMM dimensions per
execution (m rows, n output channels, k reduction length, split into ``batches``
independent GEMMs), the bytes it streams (activations ``a_bytes``, weights ``w_bytes``,
everything else ``o_bytes``), the contiguous run length of gathered or scattered accesses
(``a_seg``/``w_seg``/``o_seg``, 0 when contiguous) and the engine's kernel tile
(gathered kernels run it; dense library calls may pick it or one of the profile's).

How an engine executes a dynamic block is an :class:`EngineModel` (numbers, so it can be
jitted and vmapped too). ``ENGINES``:

- ``xla``: ``laud_jax.sparse`` with ``backend='xla'`` (the CPU path), driven block by block
  (one compiled call and one host read of the next block's counts per dynamic block).
  Index lists are padded to the engine's capacity ladder (``capacity_steps``). Spatial:
  conv1 is a matmul on the gathered dilated-mask pixels; conv2 gathers each patch's
  ((S-1)s+3)^2 window from those rows, as im2col rows + one matmul for S <= 2, or as
  windows + a VALID conv otherwise; conv3 is a matmul on the patches; a loop over the
  active patches writes relu(identity + branch) into the block input in place (a fresh
  relu(identity) for downsampling blocks). Channel: the active channels' weights are
  gathered (per executing sample, in a loop over samples at batch > 1) and the branch runs
  dense on them; a grouped conv2 runs at full width on the kept channels scattered back.
  Layer: the executing samples are gathered, the branch runs on them, one scatter writes
  them back; a block no sample executes is skipped on the device (batch 1: the branch runs
  or not). Dense 3x3 convs use im2col (a strided slice per
  tap) for maps of at most 256 pixels, XLA's convolution otherwise (grouped: its grouped
  convolution). Bias and relu are separate elementwise passes.
- ``pallas``: the same driver and executor with ``backend='pallas'`` on a GPU
  (``laud_jax.sparse.pallas_ops``): conv1 on the dilated pixel list is ``gather_matmul``
  (gather + conv1 + bias + relu, compact rows out), conv2 is ``patch_conv`` (3x3 on the
  active patches, reading each window with halo from those compact rows through the
  per-pixel row map routing builds with the pixel list: no launch of its own), conv3
  is ``conv1x1_scatter_add`` (conv3 + bias + residual + relu written into the aliased
  block output at routing's flat patch ids, tiles past the active count exit).
  Everything else stays on the xla primitives: dense convs, a grouped conv2, the channel
  path (the executor gathers the active channels' weights, ``select_branch``, and runs
  ordinary convs on them, one sample after another at batch > 1), the layer path's one
  scatter. Index lists are padded to the same capacity ladder as ``xla``. The
  three kernels launch with their own geometry (``pallas_kernels``' tiles and split-K
  rule, :func:`launch_geometry`): a split launch writes float32 partial sums that one
  XLA reduction adds (``conv1_reduce`` / ``conv2_reduce``); every main loop keeps 2
  copies in flight (docs/gpu_build_report.md).
- ``pallas_nchw``: ``pallas`` on NCHW activations (PyTorch's layout): a gathered run is
  one channel of consecutive pixels, so small S wastes most of every DRAM sector.
- ``halo``: a hypothetical single-program engine (LASNet's formulation) that recomputes
  conv1 on each patch's gathered window with halo ((S+2)^2 pixels per S^2 at stride 1),
  then runs 3x3 on the compact windows and a fused conv3 + scatter-add; channel-gated
  conv1 / conv3 gather their weights in-kernel (``channel_gather_matmul``); no padding.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from laud_jax.models.specs import CHANNEL_MODES, LAYER_MODES, MODE_ALIASES, MODES, SPATIAL_MODES, BlockSpec, LayerSpec
from laud_jax.sparse.routing import DEFAULT_CAPACITY_STEPS, capacity
from pallas_kernels import _common as kernel_rules
from pallas_kernels import conv1x1_scatter_add, gather_matmul, patch_conv

# Launch kinds: dense GEMM, direct convolution, grouped convolution, gathered-tile kernel,
# memory-bound op, host round trip, step of an on-device loop.
KIND_DENSE, KIND_GATHERED, KIND_MEMORY, KIND_HOST, KIND_CONV, KIND_LOOP, KIND_GROUPED = (
    0.0,
    1.0,
    2.0,
    3.0,
    4.0,
    5.0,
    6.0,
)
MODE_CODE: dict[str, int] = {mode: i for i, mode in enumerate(MODES)}
MODE_CODE |= {alias: MODE_CODE[mode] for alias, mode in MODE_ALIASES.items()}


def _dataclass(cls):
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


def _as_arrays(obj):
    return type(obj)(**{f.name: jnp.asarray(getattr(obj, f.name), jnp.float32) for f in dataclasses.fields(obj)})


@_dataclass
class EngineModel:
    """How an engine executes a dynamic block (flags are 0/1 floats).

    conv1_on_halo: conv1 runs on each patch's gathered window with halo (recomputed where
      windows overlap); 0: on the list of dilated-mask pixels.
    fuse_gather: spatial gathers (conv1's pixels, conv2's windows) happen inside the
      consuming kernel; 0: a gather op writes a copy.
    channel_weights_in_kernel: conv1 / conv3 of channel-gated blocks read the active
      channels' weights in-kernel (``channel_gather_matmul``); 0: the executor gathers them
      first (``select_branch``) and the convs run on the smaller weights.
    fuse_scatter: a bottleneck's conv3 + residual + scatter is one kernel.
    fuse_masker: the maskers' pooling is fused into the previous block (input not re-read).
    fused_epilogue: dense convs apply bias, relu and the residual in their epilogue;
      0: separate elementwise passes.
    im2col_max_size: without fused gathers, conv2 on patches materializes im2col rows
      (9 taps per output pixel) for S up to this; larger S gathers windows for a conv.
    dense_im2col_pixels: dense 3x3 convs use im2col on maps of at most this many pixels.
    capacity_steps: index lists are padded to the engine's capacity ladder with this many
      steps (``laud_jax.sparse.routing.capacity``, called by :func:`ladder_capacity`);
      0: no padding (kernels stop at the active count).
    scatter_loop: the spatial scatter is a loop with one step per active patch (each step
      pays the per-op overhead); 0: one kernel. (Compacted samples are one scatter.) A fused scatter
      (``fuse_scatter``) replaces the spatial loop.
    per_sample_loop: channel-gated blocks at batch > 1 run one sample after another.
    block_calls: host round trips per dynamic block (the stepwise driver reads counts);
      0: the speculative driver's single program.
    index_ops: ops to build one index list.
    sparse_tile_m / sparse_tile_n: tile of the gathered kernels (n capped at the next
      power of two of N) where ``kernel_geometry`` is 0.
    channels_last: 1 for NHWC activations; 0 for NCHW.
    kernel_geometry: 1: the gathered launches take the launch geometry of ``pallas_kernels``
      (their default tiles, split-K rule, CTAs and K steps per CTA: :func:`launch_geometry`)
      and pay the pipeline state below; 0: the fixed ``sparse_tile_m`` x ``sparse_tile_n``.
    wait_depth: copies the gathered kernels' main loops keep in flight
      (``cp.async.wait_group N`` in docs/gpu_build_report.md); 0: every K step waits for
      its loads (drained), paying ``memory_latency`` per step; >= 1: the latency is paid
      once, when the pipeline fills.
    memory_latency: seconds of one round trip of a K step's loads (global memory to the
      SM), for ``wait_depth``.
    """

    conv1_on_halo: Any
    fuse_gather: Any
    channel_weights_in_kernel: Any
    fuse_scatter: Any
    fuse_masker: Any
    fused_epilogue: Any
    im2col_max_size: Any
    dense_im2col_pixels: Any
    capacity_steps: Any
    scatter_loop: Any
    per_sample_loop: Any
    block_calls: Any
    index_ops: Any
    sparse_tile_m: Any
    sparse_tile_n: Any
    channels_last: Any
    kernel_geometry: Any
    wait_depth: Any
    memory_latency: Any

    def replace(self, **changes: Any) -> EngineModel:
        return dataclasses.replace(self, **changes)

    def as_arrays(self) -> EngineModel:
        return _as_arrays(self)


ENGINES: dict[str, EngineModel] = {
    # The engine with backend='xla'. No per-block host round trip: the default driver
    # (speculative) runs the whole network as one program in steady state, and a block whose
    # gates switch every output off is skipped on the device (lax.cond), so a layer gate at
    # batch 1 saves its block with probability 1 - rho.
    "xla": EngineModel(
        conv1_on_halo=0.0,
        fuse_gather=0.0,
        channel_weights_in_kernel=0.0,
        fuse_scatter=0.0,
        fuse_masker=0.0,
        fused_epilogue=0.0,
        im2col_max_size=2.0,
        dense_im2col_pixels=256.0,
        capacity_steps=float(DEFAULT_CAPACITY_STEPS),
        scatter_loop=1.0,
        per_sample_loop=1.0,
        block_calls=0.0,
        index_ops=3.0,
        sparse_tile_m=16.0,
        sparse_tile_n=16.0,
        channels_last=1.0,
        kernel_geometry=0.0,
        wait_depth=0.0,
        memory_latency=0.0,
    ),
    # The engine with backend='pallas': the executor's channel, layer and write-back code is
    # the xla backend's (weights gathered outside the kernels, per-sample and write-back
    # loops, the capacity ladder). Its kernels launch with their own geometry (pallas_kernels'
    # default tiles and split-K rule) and, in every main loop, keep 2 copies in flight
    # (docs/gpu_build_report.md, sm_90 and sm_80). Memory latency: a few hundred ns for an
    # L2 hit on A100 / H100 and more from HBM (published microbenchmarks); 0.5 us assumed,
    # not measured here. No per-block host round trip: in steady state the engine's default
    # driver (speculative) runs the whole network as one program and reads every block's
    # counts once at the end (the network's call).
    "pallas": EngineModel(
        conv1_on_halo=0.0,
        fuse_gather=1.0,
        channel_weights_in_kernel=0.0,
        fuse_scatter=1.0,
        fuse_masker=0.0,
        fused_epilogue=1.0,
        im2col_max_size=0.0,
        dense_im2col_pixels=0.0,
        capacity_steps=float(DEFAULT_CAPACITY_STEPS),
        scatter_loop=1.0,
        per_sample_loop=1.0,
        block_calls=0.0,
        index_ops=3.0,
        sparse_tile_m=64.0,
        sparse_tile_n=64.0,
        channels_last=1.0,
        kernel_geometry=1.0,
        wait_depth=2.0,
        memory_latency=0.5e-6,
    ),
    "halo": EngineModel(
        conv1_on_halo=1.0,
        fuse_gather=1.0,
        channel_weights_in_kernel=1.0,
        fuse_scatter=1.0,
        fuse_masker=0.0,
        fused_epilogue=1.0,
        im2col_max_size=0.0,
        dense_im2col_pixels=0.0,
        capacity_steps=0.0,
        scatter_loop=0.0,
        per_sample_loop=0.0,
        block_calls=0.0,
        index_ops=3.0,
        sparse_tile_m=64.0,
        sparse_tile_n=128.0,
        channels_last=1.0,
        kernel_geometry=0.0,
        wait_depth=0.0,
        memory_latency=0.0,
    ),
}
ENGINES["pallas_nchw"] = ENGINES["pallas"].replace(channels_last=0.0)


def get_engine(name: str) -> EngineModel:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of {sorted(ENGINES)}")
    return ENGINES[name]


@_dataclass
class BlockShape:
    """Static shape of a residual block as numbers (stack several for a leading block axis)."""

    bottleneck: Any
    in_channels: Any
    width: Any
    out_channels: Any
    stride: Any
    groups: Any
    se_channels: Any
    downsample: Any
    h_in: Any
    w_in: Any
    h_out: Any
    w_out: Any

    @classmethod
    def from_specs(cls, specs: Sequence[BlockSpec]) -> BlockShape:
        """Shapes of ``specs`` stacked along a leading axis (from ``network_spec(...).blocks``)."""
        columns = {
            "bottleneck": [float(s.kind == "bottleneck") for s in specs],
            **{
                name: [float(getattr(s, name)) for s in specs]
                for name in (
                    "in_channels",
                    "width",
                    "out_channels",
                    "stride",
                    "groups",
                    "se_channels",
                    "downsample",
                    "h_in",
                    "w_in",
                    "h_out",
                    "w_out",
                )
            },
        }
        return cls(**{k: jnp.asarray(v, jnp.float32) for k, v in columns.items()})


@_dataclass
class BlockSetting:
    """Dynamic setting of a block: mode code, S, densities, group sizes, batch, dtype.

    mode: ``MODE_CODE[mode]``. granularity: S. rho_spatial: fraction of active patches;
    rho_channel: fraction of active channel groups; rho_layer: fraction of samples that
    execute the residual branch (each only used by modes that have that gate).
    rho_conv1: fraction of conv1 input pixels the dilated mask keeps; < 0: the expectation
    for i.i.d. patch masks (:func:`dilated_density`). channel_granularity: channels per
    channel-mask group; mask_groups: G. batch: images per call. half: 1 for bf16/fp16.
    """

    mode: Any
    granularity: Any
    rho_spatial: Any
    rho_channel: Any
    rho_layer: Any
    rho_conv1: Any
    channel_granularity: Any
    mask_groups: Any
    batch: Any
    half: Any

    def as_arrays(self) -> BlockSetting:
        return _as_arrays(self)


def block_setting(
    mode: str | int = "static",
    granularity: float = 1,
    rho: float = 1.0,
    *,
    rho_spatial: float | None = None,
    rho_channel: float | None = None,
    rho_layer: float | None = None,
    rho_conv1: float = -1.0,
    channel_granularity: float = 2,
    mask_groups: float = 1,
    batch: float = 1,
    dtype: str = "float32",
) -> BlockSetting:
    """A :class:`BlockSetting` with one ``rho`` for every gate unless given separately."""
    code = MODE_CODE[mode] if isinstance(mode, str) else mode
    return BlockSetting(
        mode=code,
        granularity=granularity,
        rho_spatial=rho if rho_spatial is None else rho_spatial,
        rho_channel=rho if rho_channel is None else rho_channel,
        rho_layer=rho if rho_layer is None else rho_layer,
        rho_conv1=rho_conv1,
        channel_granularity=channel_granularity,
        mask_groups=mask_groups,
        batch=batch,
        half=float(dtype in ("bfloat16", "float16")),
    ).as_arrays()


def static_twin(setting: BlockSetting) -> BlockSetting:
    """The same setting with every gate off (the static block it is compared with)."""
    return dataclasses.replace(setting, mode=jnp.zeros_like(setting.mode))


@_dataclass
class Launches:
    """Work records of launch slots (fields share one shape: (..., slots)).

    Launches of a kernel with known geometry (``k_steps`` > 0) also hold its CTAs (split-K
    parts included), K steps per CTA of ``block_k`` reduction channels each, split-K parts,
    main-loop wait depth and memory latency (seconds); 0 elsewhere.
    """

    weight: Any
    kind: Any
    m: Any
    n: Any
    k: Any
    batches: Any
    a_bytes: Any
    a_seg: Any
    w_bytes: Any
    w_seg: Any
    o_bytes: Any
    o_seg: Any
    tile_m: Any
    tile_n: Any
    ctas: Any
    k_steps: Any
    block_k: Any
    split: Any
    wait_depth: Any
    latency: Any


LAUNCH_FIELDS = tuple(f.name for f in dataclasses.fields(Launches))
LAUNCH_NAMES = (
    "host_sync",  # host round trip of the block-by-block driver
    "masker_pool",  # pooling of the block input for the maskers / gates
    "masker_conv",  # spatial masker's 1x1 conv on the mask grid
    "gate_fc",  # channel masker FCs, layer gate, LC scale head
    "index_lists",  # mask -> active index lists (patches, dilated pixels, groups, samples)
    "layer_compact",  # gather the executing samples (layer gates, batch > 1)
    "gather_x",  # separate gather of conv1's input (unfused engines)
    "conv1",
    "conv1_reduce",  # sum of conv1's split-K partial sums (+ relu)
    "conv1_epilogue",  # bias + relu pass (unfused epilogues)
    "gather_conv2",  # separate window gather / im2col before conv2
    "channel_weight_cols",  # gathers of the active channels' weights along an output axis
    "channel_weight_rows",  # ... and along an input axis (whole rows)
    "channel_expand",  # kept channels scattered to full width and back (grouped conv2)
    "conv2",
    "conv2_reduce",
    "conv2_epilogue",
    "se",  # squeeze-excitation: pool + FCs + scale (RegNetY)
    "lc_scale",  # LC-Net channel scale multiply
    "conv3",  # bottleneck conv3 (+ residual / scatter when fused)
    "residual",  # separate residual add / scatter (+ relu), or one step of a scatter loop
    "identity_relu",  # relu over a downsampled identity (skipped positions)
    "downsample",
    "downsample_epilogue",
)


# Slots a dynamic block adds to the static one whatever its rate (the "masker cost").
OVERHEAD_SLOTS = ("host_sync", "masker_pool", "masker_conv", "gate_fc", "index_lists")


def _launch(weight, kind=KIND_MEMORY, **work) -> dict[str, Any]:
    """One launch record: ``weight`` expected executions of a ``kind`` launch doing ``work``
    (fields of :class:`Launches`; those not given are 0, ``batches`` 1)."""
    unknown = set(work) - set(LAUNCH_FIELDS)
    if unknown:
        raise TypeError(f"unknown launch fields {sorted(unknown)}")
    record = dict.fromkeys(LAUNCH_FIELDS, 0.0)
    record["batches"] = 1.0
    record.update(work, weight=weight, kind=kind)
    return record


def _stack(records: Sequence[dict[str, Any]]) -> Launches:
    return Launches(
        **{field: jnp.stack([jnp.asarray(r[field], jnp.float32) for r in records], axis=-1) for field in LAUNCH_FIELDS}
    )


def _engine_capacities(counts: np.ndarray, totals: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """``routing.capacity`` of every (count, total, steps) entry; 0 where steps or count is 0."""
    rows = np.stack([np.ravel(counts), np.ravel(totals), np.ravel(steps)], axis=-1).astype(np.int64)
    distinct, where = np.unique(rows, axis=0, return_inverse=True)
    values = [capacity(c, t, s) if c > 0 and s > 0 else 0 for c, t, s in distinct.tolist()]
    return np.asarray(values, np.float32)[np.ravel(where)].reshape(np.shape(counts))


def ladder_capacity(count, total, steps):
    """Capacity the engine pads an expected ``count`` of ``total`` units to: its own
    ``laud_jax.sparse.routing.capacity`` of the whole count, called from the compiled
    predictor on the host; the count itself when ``steps`` is 0 (no padding)."""
    count, total, steps = jnp.broadcast_arrays(*(jnp.asarray(x, jnp.float32) for x in (count, total, steps)))
    whole = jnp.clip(jnp.ceil(count - 1e-4), 0.0, jnp.floor(total))
    padded = jax.pure_callback(
        _engine_capacities,
        jax.ShapeDtypeStruct(count.shape, jnp.float32),
        whole,
        jnp.floor(total),
        steps,
        vmap_method="broadcast_all",
    )
    return jnp.where(steps > 0, padded, count)


# The gathered kernels the engine's pallas backend launches (codes of :func:`launch_geometry`).
KERNEL_CODES: dict[str, int] = {"gather_matmul": 1, "patch_conv": 2, "conv1x1_scatter_add": 3}
GEOMETRY_FIELDS = ("tile_m", "tile_n", "block_k", "split", "ctas", "k_steps")


@functools.cache
def launch_geometry(kernel: int, rows: int, cin: int, cout: int, taps: int, grid_rows: int) -> tuple[int, ...]:
    """``GEOMETRY_FIELDS`` of one launch of a ``pallas_kernels`` kernel (``KERNEL_CODES``),
    by the kernel's own rules: its ``default_tiles`` and ``_common.split_k``.

    ``rows`` output rows computed, ``cin`` reduction channels per tap, ``cout`` output
    channels, ``taps`` taps; ``grid_rows``: the rows the grid is sized for (conv1x1_scatter_add
    sizes its grid and tiles by the capacity; tiles past the active rows exit at once, so
    only ``rows`` count as CTAs). All zeros for code 0 or an empty launch."""
    if kernel not in KERNEL_CODES.values() or min(rows, cin, cout, taps, grid_rows) <= 0:
        return (0,) * len(GEOMETRY_FIELDS)
    if kernel == KERNEL_CODES["conv1x1_scatter_add"]:
        tiles = conv1x1_scatter_add.default_tiles(cin, cout, grid_rows)
    elif kernel == KERNEL_CODES["patch_conv"]:
        tiles = patch_conv.default_tiles(cin, cout)
    else:
        tiles = gather_matmul.default_tiles(cin, cout)
    steps = taps * pl.cdiv(cin, tiles.block_k)
    scatter = kernel == KERNEL_CODES["conv1x1_scatter_add"]  # no split-K (its residual epilogue)
    split = 1 if scatter else kernel_rules.choose_split("", tiles, grid_rows, cout, steps)
    ctas = pl.cdiv(rows, tiles.block_m) * pl.cdiv(cout, tiles.block_n) * split
    return (tiles.block_m, tiles.block_n, tiles.block_k, split, ctas, steps // split)


def _launch_geometries(kernel, rows, cin, cout, taps, grid_rows) -> np.ndarray:
    """:func:`launch_geometry` of every entry (host side); (..., len(GEOMETRY_FIELDS))."""
    whole = np.stack(
        [np.ravel(np.ceil(np.asarray(x) - 1e-4)).astype(np.int64) for x in (kernel, rows, cin, cout, taps, grid_rows)],
        axis=-1,
    )
    values = np.zeros((whole.shape[0], len(GEOMETRY_FIELDS)), np.float32)
    launched = np.flatnonzero(whole[:, 0] > 0)
    # distinct launches: each row's integers as one opaque key (much faster than unique(axis=0))
    keys = np.ascontiguousarray(whole[launched]).view(np.dtype((np.void, 8 * whole.shape[1]))).ravel()
    distinct, where = np.unique(keys, return_inverse=True)
    shapes = distinct.view(np.int64).reshape(-1, whole.shape[1]).tolist()
    geometries = np.asarray([launch_geometry(*shape) for shape in shapes], np.float32)
    values[launched] = geometries.reshape(-1, len(GEOMETRY_FIELDS))[np.ravel(where)]
    return values.reshape(*np.shape(rows), len(GEOMETRY_FIELDS))


def kernel_geometry(kernel, rows, cin, cout, taps, grid_rows=None) -> dict[str, jax.Array]:
    """:func:`launch_geometry` of traced launch shapes (called from the compiled predictor
    on the host, like :func:`ladder_capacity`): ``GEOMETRY_FIELDS`` to arrays."""
    grid_rows = rows if grid_rows is None else grid_rows
    args = jnp.broadcast_arrays(*(jnp.asarray(x, jnp.float32) for x in (kernel, rows, cin, cout, taps, grid_rows)))
    values = jax.pure_callback(
        _launch_geometries,
        jax.ShapeDtypeStruct((*args[0].shape, len(GEOMETRY_FIELDS)), jnp.float32),
        *args,
        vmap_method="broadcast_all",
    )
    return {name: values[..., i] for i, name in enumerate(GEOMETRY_FIELDS)}


def _next_pow2(x):
    return 2.0 ** jnp.ceil(jnp.log2(jnp.maximum(x, 1.0)))


def _axis_spans(length, size, stride):
    """Fractions (a1, a2, a3) of conv1-grid rows of one axis whose 3x3-conv consumers span
    1, 2 or 3 patches of size ``size`` (stride 1 or 2), image borders included."""
    patches = jnp.ceil(length / jnp.where(stride > 1.5, 2.0 * size, size))
    two_s1 = jnp.where(size < 1.5, 2.0, 2.0 * patches - 2.0)
    three_s1 = jnp.where(size < 1.5, jnp.maximum(length - 2.0, 0.0), 0.0)
    two = jnp.where(stride > 1.5, patches - 1.0, two_s1)
    three = jnp.where(stride > 1.5, 0.0, three_s1)
    two, three = two / length, three / length
    return 1.0 - two - three, two, three


def dilated_density(rho, size, stride, height, width):
    """Expected fraction of conv1-grid pixels (``height`` x ``width``) that the dilated mask
    keeps when each S x S output patch is active independently with probability ``rho``.

    A pixel is needed when any 3x3 (stride ``stride``) output it feeds lies in an active
    patch; spanning i patches along y and j along x, it is kept with 1 - (1 - rho)^(i j).
    """
    ay = _axis_spans(height, size, stride)
    ax = _axis_spans(width, size, stride)
    keep = 0.0
    for i in range(3):
        for j in range(3):
            keep = keep + ay[i] * ax[j] * (1.0 - (1.0 - rho) ** ((i + 1) * (j + 1)))
    return keep


def _is(code, *modes: str):
    return jnp.isin(code, jnp.asarray([MODE_CODE[m] for m in modes], jnp.float32))


def _when(condition, value):
    """``value`` where ``condition`` holds, else 0."""
    return jnp.where(condition, value, 0.0)


def _count(condition):
    """1.0 where ``condition`` holds, else 0.0 (for counting launches)."""
    return jnp.asarray(condition, jnp.float32)


@dataclasses.dataclass(frozen=True)
class _BlockExecution:
    """What one block call executes: gates, capacities and row counts shared by the launch
    groups (the predictor's counterpart of ``routing.plan_block`` and the executor's shapes).

    Booleans are traced arrays. ``branch_batch``: samples the branch runs on; ``loop``:
    launches per conv (one per sample in a per-sample loop); ``gemms``: independent GEMMs
    per launch; ``group``: channels per channel-mask group; ``width_c``: kept channels of
    conv1 / conv2; ``rows1`` / ``rows2``: conv1 and conv2 / conv3 output rows;
    ``pixel_list``: conv1 runs on a gathered pixel list (not the whole grid);
    ``residual_fused``: the residual joins the last conv.
    """

    bytes_per_element: Any
    spatial: Any
    channel: Any
    layer: Any
    lc: Any
    multi_sample: Any
    bottleneck: Any
    rho_spatial: Any
    rho_layer: Any
    executing: Any
    branch_batch: Any
    compacting: Any
    branch_weight: Any
    per_sample: Any
    n_groups: Any
    group: Any
    width_c: Any
    weight_copies: Any
    loop: Any
    gemms: Any
    grid_h: Any
    grid_w: Any
    active_patches: Any
    patches: Any
    rows1: Any
    rows2: Any
    conv1_pixels: Any
    taps1: Any
    size: Any
    window: Any
    conv1_gathered: Any
    pixel_list: Any
    gathered: Any
    channel_in_kernel: Any
    residual_fused: Any
    identity_rows: Any
    channels_last: Any

    def run_bytes(self, n_pixels, channels):
        """Contiguous bytes of a run of consecutive pixels of one row (all channels in NHWC)."""
        return n_pixels * jnp.where(self.channels_last, channels, 1.0) * self.bytes_per_element


def _block_execution(shape: BlockShape, setting: BlockSetting, engine: EngineModel) -> _BlockExecution:
    """Gates, capacities and row counts of one block call (see :class:`_BlockExecution`)."""
    bytes_per_element = jnp.where(setting.half > 0.5, 2.0, 4.0)
    code = setting.mode
    spatial, channel, layer = _is(code, *SPATIAL_MODES), _is(code, *CHANNEL_MODES), _is(code, *LAYER_MODES)
    rho_s = jnp.where(spatial, setting.rho_spatial, 1.0)
    rho_c = jnp.where(channel, setting.rho_channel, 1.0)
    rho_l = jnp.where(layer, setting.rho_layer, 1.0)
    steps = engine.capacity_steps
    bottleneck = shape.bottleneck > 0.5
    batch = setting.batch
    multi_sample = batch > 1.5

    # Channel gates at batch > 1 give every sample its own channels (and weights); engines
    # with a per-sample loop run only the executing samples, one after the other.
    per_sample = channel & multi_sample
    sample_loop = per_sample & (engine.per_sample_loop > 0.5)
    # Layer gates: at batch 1 the branch runs with probability rho; at batch > 1 the
    # executing samples are compacted (padded to a capacity) and the branch runs on them.
    executing = rho_l * batch
    compacted = layer & multi_sample
    branch_batch = jnp.where(compacted, jnp.maximum(ladder_capacity(executing, batch, steps), 1.0), batch)
    branch_batch = jnp.where(sample_loop, executing, jnp.minimum(branch_batch, batch))
    compacting = compacted & ~sample_loop & (branch_batch < batch)
    # nothing active: the engine skips the branch altogether
    branch_weight = _when((rho_s > 0.0) & (rho_l > 0.0), jnp.where(layer & ~multi_sample, rho_l, 1.0))

    # Channel gates: active groups per sample (padded to the engine's capacity).
    group = setting.channel_granularity
    n_groups = shape.width / group
    active_groups = jnp.where(channel, ladder_capacity(rho_c * n_groups, n_groups, steps), n_groups)
    # one launch per sample when the engine loops over samples, else one launch for all
    loop = jnp.where(sample_loop, jnp.maximum(branch_batch, 1e-6), 1.0)

    # Spatial gates: active patches on the output grid, conv1 pixels on conv1's grid.
    size = setting.granularity
    grid_h, grid_w = jnp.ceil(shape.h_out / size), jnp.ceil(shape.w_out / size)
    n_patches = branch_batch * grid_h * grid_w
    active_patches = rho_s * n_patches
    patches = jnp.where(spatial, ladder_capacity(active_patches, n_patches, steps), n_patches)
    h1 = jnp.where(bottleneck, shape.h_in, shape.h_out)
    w1 = jnp.where(bottleneck, shape.w_in, shape.w_out)
    conv1_pixels = h1 * w1
    stride1 = jnp.where(bottleneck, shape.stride, 1.0)
    window = (size - 1.0) * stride1 + 3.0  # conv2's input window side per patch
    rho_in = jnp.where(setting.rho_conv1 >= 0.0, setting.rho_conv1, dilated_density(rho_s, size, stride1, h1, w1))
    pixels = ladder_capacity(rho_in * branch_batch * conv1_pixels, branch_batch * conv1_pixels, steps)
    on_halo = engine.conv1_on_halo > 0.5
    conv1_rows = jnp.where(on_halo, patches * window * window, pixels)
    # a pixel capacity covering the whole grid runs conv1 densely, without gather or row map
    # (``spatial_branch``: plan.pixels == batch * h1 * w1)
    pixel_list = spatial & ~on_halo & (pixels < branch_batch * conv1_pixels)
    rows2 = jnp.where(spatial, patches * size * size, branch_batch * (shape.h_out * shape.w_out))
    fuse_gather = engine.fuse_gather > 0.5
    channel_in_kernel = channel & (engine.channel_weights_in_kernel > 0.5)
    return _BlockExecution(
        bytes_per_element=bytes_per_element,
        spatial=spatial,
        channel=channel,
        layer=layer,
        lc=code == MODE_CODE["lc"],
        multi_sample=multi_sample,
        bottleneck=bottleneck,
        rho_spatial=rho_s,
        rho_layer=rho_l,
        executing=executing,
        branch_batch=branch_batch,
        compacting=compacting,
        branch_weight=branch_weight,
        per_sample=per_sample,
        n_groups=n_groups,
        group=group,
        width_c=jnp.maximum(active_groups, 1.0) * group,
        weight_copies=jnp.where(per_sample, branch_batch, 1.0),
        loop=loop,
        gemms=jnp.where(channel, branch_batch, 1.0) / loop,
        grid_h=grid_h,
        grid_w=grid_w,
        active_patches=active_patches,
        patches=patches,
        rows1=jnp.where(spatial, conv1_rows, branch_batch * conv1_pixels),
        rows2=rows2,
        conv1_pixels=conv1_pixels,
        taps1=jnp.where(bottleneck, 1.0, 9.0),
        size=size,
        window=window,
        conv1_gathered=(pixel_list | (spatial & on_halo)) & fuse_gather | channel_in_kernel,
        pixel_list=pixel_list,
        # conv3 is a gathered-tile kernel where the engine fuses the spatial gathers or reads
        # channel groups' weights in-kernel; otherwise a dense library call.
        gathered=(spatial & fuse_gather) | channel_in_kernel,
        channel_in_kernel=channel_in_kernel,
        # the fused scatter is conv3's (conv1x1_scatter_add): a basic block's spatial
        # write-back stays the engine's scatter loop
        residual_fused=jnp.where(
            spatial,
            (engine.fuse_scatter > 0.5) & bottleneck,
            ~(channel | compacting) & (engine.fused_epilogue > 0.5),
        ),
        identity_rows=rows2 * shape.out_channels * bytes_per_element,
        channels_last=engine.channels_last > 0.5,
    )


def _tile(engine: EngineModel, n) -> dict[str, Any]:
    """The gathered kernels' fixed tile (n capped at the next power of two of ``n``); a
    candidate for dense library calls."""
    return dict(tile_m=engine.sparse_tile_m, tile_n=jnp.clip(_next_pow2(n), 16.0, engine.sparse_tile_n))


def _kernel_fields(engine: EngineModel, kernel: str, runs, rows, cin, cout, taps, grid_rows=None) -> dict[str, Any]:
    """Tile and geometry fields of a conv's launch record: ``kernel``'s own geometry where
    it ``runs`` and the engine follows the kernels (``kernel_geometry``), else the engine's
    fixed tile (``_tile``) and no geometry."""
    code = _when(runs, float(KERNEL_CODES[kernel]))
    args = jnp.broadcast_arrays(code, rows, cin, cout, taps, rows if grid_rows is None else grid_rows)
    # no host call for engines that do not follow the kernels (the predicate is never batched)
    geometry = jax.lax.cond(
        engine.kernel_geometry > 0.5,
        lambda: kernel_geometry(*args),
        lambda: dict.fromkeys(GEOMETRY_FIELDS, jnp.zeros_like(args[0])),
    )
    known = geometry["k_steps"] > 0
    fixed = _tile(engine, cout)
    return dict(
        tile_m=jnp.where(known, geometry["tile_m"], fixed["tile_m"]),
        tile_n=jnp.where(known, geometry["tile_n"], fixed["tile_n"]),
        ctas=geometry["ctas"],
        k_steps=geometry["k_steps"],
        block_k=geometry["block_k"],
        split=geometry["split"],
        wait_depth=_when(known, engine.wait_depth),
        latency=_when(known, engine.memory_latency),
    )


def _split_output(fields: dict[str, Any], weight, rows, n, bytes_per_element) -> tuple[Any, dict[str, Any]]:
    """A split-K launch's output bytes (float32 partial sums of every part) and the record
    of the XLA reduction that adds them (and applies the activation) in one pass."""
    split = fields["split"]
    parts = split > 1.5
    out = jnp.where(parts, split * rows * n * 4.0, rows * n * bytes_per_element)
    reduce = _launch(_when(parts, weight), o_bytes=_when(parts, out + rows * n * bytes_per_element))
    return out, reduce


def _gate_launches(shape: BlockShape, setting: BlockSetting, engine: EngineModel, block: _BlockExecution):
    """The driver's host round trip, the maskers and gates, and the index lists
    (``engine.compute_gates``, ``routing.block_routing``)."""
    b = block.bytes_per_element
    cin = shape.in_channels
    p_in = shape.h_in * shape.w_in
    batch = setting.batch
    on_halo = engine.conv1_on_halo > 0.5
    # the spatial masker pools x to its grid, the channel masker averages it, the layer gate
    # is one weighted sum over it (folded pool + conv + compare, ``engine.fused_layer_gate``):
    # separate reads of the block input
    pools = _count(block.spatial) + _count(block.channel) + _count(block.layer)
    hidden = jnp.maximum(jnp.floor(block.n_groups / 16.0), 16.0)
    fc_macs = _when(block.channel, cin * hidden + hidden * 2.0 * block.n_groups) + _when(
        block.lc, cin * (block.n_groups + 1.0)
    )
    fc_launches = 2.0 * _count(block.channel) + _count(block.lc)
    sample_lists = block.layer & block.multi_sample
    # spatial: the patch list, and the dilated-pixel list unless conv1 runs on halo windows;
    # with the pixel list its inverse, the row map (each conv1 pixel's row, int32) that
    # conv2 reads conv1's rows through: an output of the same prefix count, no launch
    lists = _when(block.spatial, jnp.where(on_halo, 1.0, 2.0)) + _count(block.channel) + _count(sample_lists)
    pixel_list_bytes = _when(~on_halo, batch * block.conv1_pixels * (13.0 + 4.0))
    index_bytes = (
        _when(block.spatial, batch * block.grid_h * block.grid_w * 5.0 + pixel_list_bytes)
        + _when(block.channel, batch * block.n_groups * 5.0)
        + _when(sample_lists, batch * 5.0)
    )
    gated = setting.mode != MODE_CODE["static"]
    return dict(
        host_sync=_launch(_when(gated, engine.block_calls), KIND_HOST),
        masker_pool=_launch(_when(engine.fuse_masker < 0.5, pools), o_bytes=batch * p_in * cin * b),
        masker_conv=_launch(
            _count(block.spatial),
            KIND_DENSE,
            m=batch * block.grid_h * block.grid_w,
            n=2.0 * setting.mask_groups,
            k=cin,
            a_bytes=batch * block.grid_h * block.grid_w * cin * b,  # the pooled grid (all of x at S=1)
            w_bytes=cin * 2.0 * setting.mask_groups * b,
        ),
        gate_fc=_launch(
            fc_launches,
            KIND_DENSE,
            m=batch,
            k=cin,
            n=fc_macs / cin / jnp.maximum(fc_launches, 1.0),
            w_bytes=fc_macs * b / jnp.maximum(fc_launches, 1.0),
        ),
        index_lists=_launch(engine.index_ops * lists, o_bytes=index_bytes / jnp.maximum(engine.index_ops * lists, 1.0)),
    )


def _conv1_launches(shape: BlockShape, engine: EngineModel, block: _BlockExecution):
    """The executing samples' compaction, conv1's input gather, conv1 and its epilogue
    (``executor.run_block``'s sample gather; ``ops.gather_matmul`` in ``spatial_branch``;
    ``ops.conv`` in ``dense_branch``)."""
    b = block.bytes_per_element
    cin = shape.in_channels
    p_in = shape.h_in * shape.w_in
    rows1, taps1, loop = block.rows1, block.taps1, block.loop
    fuse_gather = engine.fuse_gather > 0.5
    on_halo = engine.conv1_on_halo > 0.5
    # conv1 reads listed rows (dilated pixels or halo windows); otherwise the whole input
    listed = block.pixel_list | (block.spatial & on_halo)
    gather_seg = block.run_bytes(jnp.where(on_halo, block.window, 1.0), cin)
    input_bytes = jnp.where(listed, rows1 * taps1 * cin * b, block.branch_batch * p_in * cin * b)
    # basic blocks' dense 3x3 conv1: im2col + GEMM on small maps, a direct conv otherwise
    direct = (
        ~block.conv1_gathered & ~listed & ~block.bottleneck & (shape.h_out * shape.w_out > engine.dense_im2col_pixels)
    )
    weight = block.branch_weight * loop
    kernel = _kernel_fields(engine, "gather_matmul", block.conv1_gathered, rows1 / loop, cin, block.width_c, taps1)
    out_bytes, reduce = _split_output(kernel, weight, rows1 / loop, block.width_c, b)
    return dict(
        layer_compact=_launch(
            _count(block.compacting),
            a_bytes=block.branch_batch * p_in * cin * b,
            a_seg=p_in * cin * b,
            o_bytes=block.branch_batch * p_in * cin * b,
        ),
        gather_x=_launch(
            _when(listed & ~fuse_gather, block.branch_weight),
            a_bytes=rows1 * taps1 * cin * b,
            a_seg=gather_seg,
            o_bytes=rows1 * taps1 * cin * b,
        ),
        conv1=_launch(
            weight,
            jnp.where(direct, KIND_CONV, jnp.where(block.conv1_gathered, KIND_GATHERED, KIND_DENSE)),
            m=rows1 / loop,
            n=block.width_c,
            k=taps1 * cin,
            batches=block.gemms,
            a_bytes=input_bytes / loop,
            a_seg=_when(listed & fuse_gather, gather_seg),
            w_bytes=block.weight_copies / loop * taps1 * cin * block.width_c * b,
            w_seg=_when(block.channel_in_kernel, block.group * b),  # runs of one group per row
            o_bytes=out_bytes,
            **kernel,
        ),
        conv1_reduce=reduce,
        conv1_epilogue=_launch(
            _when((engine.fused_epilogue < 0.5) & ~block.conv1_gathered, block.branch_weight * loop),
            o_bytes=2.0 * rows1 * block.width_c * b / loop,
        ),
    )


def _channel_launches(shape: BlockShape, engine: EngineModel, block: _BlockExecution):
    """Active-channel weights gathered outside the kernels, and a grouped conv2's channels
    scattered to full width and back (``executor.select_branch``, ``executor._expand``).

    conv2's weights are always gathered, conv1's and conv3's too unless the engine reads
    them in-kernel (``channel_weights_in_kernel``: ``channel_gather_matmul``, which the
    engine's executor does not call). The executor gathers from the group-major copies of
    ``folding.group_major``, so a gathered piece is a contiguous slab: one column gather
    per conv selecting output groups (conv1's ``w1g``, a bottleneck conv2's first take), one
    row gather selecting input groups (conv2's second take, conv3's rows of ``w3``). A
    slot's run length is its conv2 gather's (the larger one) where conv2 is gathered.
    """
    b = block.bytes_per_element
    cin, width, cout, groups = shape.in_channels, shape.width, shape.out_channels, shape.groups
    width_c, loop, group = block.width_c, block.loop, block.group
    unfused = ~block.channel_in_kernel
    expanded = (groups > 1.5) & block.channel
    conv2_gathered = ~expanded
    bottleneck2 = conv2_gathered & block.bottleneck
    # folding.conv2_group_layout: (G_out, G_in, 3, 3, cg, cg) for kernels up to 2**20
    # elements / 9, else (G_in, 3, 3, cg, G_out, cg)
    out_major = 9.0 * width * width <= 2.0**20
    column_elems = _when(unfused, block.taps1 * cin * width_c) + _when(bottleneck2, 9.0 * width * width_c)
    row_elems = _when(conv2_gathered, 9.0 * width_c * jnp.where(block.bottleneck, width_c, cout)) + _when(
        unfused & block.bottleneck, width_c * cout
    )
    column_seg = jnp.where(bottleneck2, jnp.where(out_major, 9.0 * width * group, group), block.taps1 * cin * group)
    row_seg = jnp.where(
        conv2_gathered,
        jnp.where(
            block.bottleneck, jnp.where(out_major, 9.0 * group * group, 9.0 * group * width_c), 9.0 * group * cout
        ),
        cout,
    )
    column_gathers = _count(unfused) + _count(bottleneck2)
    row_gathers = _count(conv2_gathered) + _count(unfused & block.bottleneck)
    column_bytes = block.weight_copies * column_elems * b / jnp.maximum(column_gathers, 1.0) / loop
    row_bytes = block.weight_copies * row_elems * b / jnp.maximum(row_gathers, 1.0) / loop
    return dict(
        channel_weight_cols=_launch(
            _when(block.channel, block.branch_weight * column_gathers * loop),
            a_seg=column_seg * b,
            a_bytes=column_bytes,
            o_bytes=column_bytes,
        ),
        channel_weight_rows=_launch(
            _when(block.channel, block.branch_weight * row_gathers * loop),
            a_seg=row_seg * b,
            a_bytes=row_bytes,
            o_bytes=row_bytes,
        ),
        channel_expand=_launch(
            _when(expanded, block.branch_weight * loop * 2.0), o_bytes=block.rows2 * (width + width_c) * b / loop
        ),
    )


def _conv2_launches(shape: BlockShape, engine: EngineModel, block: _BlockExecution):
    """conv2 (3x3, stride s in bottlenecks) on patch windows with halo or dense, its window
    gather or im2col, its epilogue, SE and the LC scale (``ops.patch_conv`` in
    ``spatial_branch``; ``_dense_conv12``). A grouped conv2 under channel gates runs at
    full width on the kept channels scattered back."""
    b = block.bytes_per_element
    width, cout, groups = shape.width, shape.out_channels, shape.groups
    width_c, rows2, loop = block.width_c, block.rows2, block.loop
    fuse_gather = engine.fuse_gather > 0.5
    on_halo = engine.conv1_on_halo > 0.5
    grouped = groups > 1.5
    conv2_width = jnp.where(grouped & block.channel, width, width_c)
    n2 = jnp.where(block.bottleneck, conv2_width, cout)
    p_out = shape.h_out * shape.w_out
    input_pixels = jnp.where(block.bottleneck, shape.h_in * shape.w_in, p_out)
    window_bytes = block.patches * block.window * block.window * width_c * b
    im2col_bytes = rows2 * 9.0 * width_c * b
    patch_im2col = block.spatial & ~fuse_gather & (block.size <= engine.im2col_max_size)
    dense_im2col = ~block.spatial & (p_out <= engine.dense_im2col_pixels) & ~grouped
    im2col = patch_im2col | dense_im2col
    # Without fused gathers the windows (or im2col rows) are gathered first; halo engines
    # already hold compact windows; Pallas (patch_conv, groups 1 only) reads them in-kernel,
    # through routing's per-pixel row map where conv1 wrote a pixel list (the map is
    # built with the index lists, ``_gate_launches``; here only its reads).
    in_kernel_gather = block.spatial & fuse_gather & ~on_halo & ~grouped
    window_gather = block.spatial & ~on_halo & ~in_kernel_gather
    row_map = in_kernel_gather & block.pixel_list
    row_map_reads = _when(row_map, block.patches * block.window * block.window * 4.0)
    # dense im2col: one strided slice per tap and a concatenation; on patches: one gather
    gather_ops = jnp.where(dense_im2col, 10.0, 1.0)
    input_bytes = jnp.where(
        im2col,
        im2col_bytes,
        jnp.where(block.spatial, window_bytes, block.branch_batch * input_pixels * conv2_width * b),
    )
    kind = jnp.where(
        in_kernel_gather,
        KIND_GATHERED,
        jnp.where(im2col, KIND_DENSE, jnp.where(grouped, KIND_GROUPED, KIND_CONV)),
    )
    # Basic blocks: conv2 is the last conv, so the fused residual joins its output.
    fused_residual_bytes = _when(~block.bottleneck & block.residual_fused, block.identity_rows / loop)
    weight = block.branch_weight * loop
    kernel = _kernel_fields(engine, "patch_conv", in_kernel_gather, rows2 / loop, conv2_width, n2, 9.0)
    out_bytes, reduce = _split_output(kernel, weight, rows2 / loop, n2, b)
    return dict(
        gather_conv2=_launch(
            _when(im2col | window_gather, block.branch_weight * loop * gather_ops),
            a_bytes=jnp.where(block.spatial, window_bytes, block.branch_batch * input_pixels * width_c * b)
            / loop
            / gather_ops,
            a_seg=_when(block.spatial, block.run_bytes(block.window, width_c)),
            o_bytes=jnp.where(im2col, im2col_bytes, window_bytes) / loop / gather_ops,
        ),
        conv2=_launch(
            weight,
            kind,
            m=rows2 / loop,
            n=n2,
            k=9.0 * conv2_width / groups,
            batches=block.gemms,
            a_bytes=(input_bytes + row_map_reads) / loop,
            a_seg=_when(in_kernel_gather, block.run_bytes(block.window, width_c)),
            w_bytes=block.weight_copies / loop * 9.0 * conv2_width * n2 / groups * b,
            o_bytes=out_bytes + fused_residual_bytes,
            **kernel,
        ),
        conv2_reduce=reduce,
        conv2_epilogue=_launch(
            _when((engine.fused_epilogue < 0.5) & block.bottleneck & ~in_kernel_gather, block.branch_weight * loop),
            o_bytes=2.0 * rows2 * n2 * b / loop,
        ),
        se=_launch(_when(shape.se_channels > 0, block.branch_weight * 3.0), o_bytes=rows2 * width_c * b),
        lc_scale=_launch(_when(block.lc, block.branch_weight), o_bytes=2.0 * rows2 * width_c * b),
    )


def _conv3_launches(shape: BlockShape, engine: EngineModel, block: _BlockExecution):
    """A bottleneck's conv3, then the residual: fused into conv3, one kernel (compacted
    samples: one scatter), or a loop over the active patches (``ops.conv3_scatter``,
    ``ops.scatter_residual``)."""
    b = block.bytes_per_element
    cout = shape.out_channels
    rows2, loop, residual_fused = block.rows2, block.loop, block.residual_fused
    scattered = block.run_bytes(block.size, cout)
    # a loop step moves one window with dynamic slices (contiguous rows, no indexed gather)
    looped = (engine.scatter_loop > 0.5) & block.spatial
    scatter_steps = jnp.where(looped, block.active_patches, loop)
    # a fused conv3 + scatter kernel skips the padding slots past the active count
    exits_early = block.spatial & residual_fused
    rows3 = jnp.where(exits_early, jnp.minimum(rows2, jnp.ceil(block.active_patches - 1e-4) * block.size**2), rows2)
    scatter_kernel = block.bottleneck & block.spatial & block.gathered & residual_fused
    kernel = _kernel_fields(
        engine, "conv1x1_scatter_add", scatter_kernel, rows3 / loop, block.width_c, cout, 1.0, rows2 / loop
    )
    return dict(
        conv3=_launch(
            _when(block.bottleneck, block.branch_weight * loop),
            jnp.where(block.gathered, KIND_GATHERED, KIND_DENSE),
            m=rows3 / loop,
            n=cout,
            k=block.width_c,
            batches=block.gemms,
            a_bytes=rows3 * block.width_c * b / loop,
            w_bytes=block.weight_copies / loop * block.width_c * cout * b,
            o_bytes=rows3 * cout * b * jnp.where(residual_fused, 2.0, 1.0) / loop,
            o_seg=_when(block.spatial & residual_fused, scattered),
            **kernel,
        ),
        residual=_launch(
            _when(~residual_fused, block.branch_weight * scatter_steps),
            jnp.where(looped, KIND_LOOP, KIND_MEMORY),
            o_bytes=3.0 * block.identity_rows / jnp.maximum(scatter_steps, 1.0),
            o_seg=_when(block.spatial & ~looped, scattered),
        ),
    )


def _shortcut_launches(shape: BlockShape, setting: BlockSetting, engine: EngineModel, block: _BlockExecution):
    """The downsampling shortcut (1x1 stride-s conv), its epilogue, and relu over it where the
    branch adds nothing (``executor._identity``)."""
    b = block.bytes_per_element
    batch, cin, cout = setting.batch, shape.in_channels, shape.out_channels
    p_out = shape.h_out * shape.w_out
    downsample = shape.downsample > 0.5
    full_out = batch * p_out * cout * b
    # blocks whose skipped positions read relu(identity)
    skipped = _count(block.spatial) + _when(block.layer, jnp.where(block.multi_sample, 1.0, 1.0 - block.rho_layer))
    # unfused: the bias pass, and the strided input slice a 1x1 stride-s conv reads
    strided_input = _when(shape.stride > 1.5, batch * p_out * cin * b)
    return dict(
        identity_relu=_launch(_when(downsample, jnp.minimum(skipped, 1.0)), o_bytes=2.0 * full_out),
        downsample=_launch(
            _count(downsample),
            KIND_DENSE,
            m=batch * p_out,
            n=cout,
            k=cin,
            a_bytes=batch * p_out * cin * b,
            w_bytes=cin * cout * b,
            o_bytes=full_out,
            **_tile(engine, cout),
        ),
        downsample_epilogue=_launch(
            _count(downsample & (engine.fused_epilogue < 0.5)), o_bytes=2.0 * (full_out + strided_input)
        ),
    )


def block_launches(shape: BlockShape, setting: BlockSetting, engine: EngineModel) -> Launches:
    """Launch records of one block (scalar fields in, (slots,) fields out)."""
    # arrays throughout, so that comparisons give array booleans (``~`` negates them)
    shape, setting, engine = _as_arrays(shape), _as_arrays(setting), _as_arrays(engine)
    block = _block_execution(shape, setting, engine)
    records = {
        **_gate_launches(shape, setting, engine, block),
        **_conv1_launches(shape, engine, block),
        **_channel_launches(shape, engine, block),
        **_conv2_launches(shape, engine, block),
        **_conv3_launches(shape, engine, block),
        **_shortcut_launches(shape, setting, engine, block),
    }
    return _stack([records[name] for name in LAUNCH_NAMES])


def block_macs(shape: BlockShape, setting: BlockSetting):
    """(expected dynamic MACs, static MACs) per sample, counted as the models' ``aux`` does."""
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    code = setting.mode
    spatial, channel, layer = _is(code, *SPATIAL_MODES), _is(code, *CHANNEL_MODES), _is(code, *LAYER_MODES)
    rho_s = jnp.where(spatial, setting.rho_spatial, 1.0)
    rho_c = jnp.where(channel, setting.rho_channel, 1.0)
    rho_l = jnp.where(layer, setting.rho_layer, 1.0)
    bottleneck = shape.bottleneck
    cin, width, cout = shape.in_channels, shape.width, shape.out_channels
    p_in, p_out = shape.h_in * shape.w_in, shape.h_out * shape.w_out
    conv1 = jnp.where(bottleneck > 0.5, p_in * cin * width, p_out * 9.0 * cin * width)
    conv2 = jnp.where(bottleneck > 0.5, p_out * 9.0 * width * width / shape.groups, p_out * 9.0 * width * cout)
    conv3 = bottleneck * p_out * width * cout
    downsample = shape.downsample * p_out * cin * cout
    se = 2.0 * width * shape.se_channels
    size = setting.granularity
    h1 = jnp.where(bottleneck > 0.5, shape.h_in, shape.h_out)
    w1 = jnp.where(bottleneck > 0.5, shape.w_in, shape.w_out)
    stride1 = jnp.where(bottleneck > 0.5, shape.stride, 1.0)
    rho_in = jnp.where(setting.rho_conv1 >= 0.0, setting.rho_conv1, dilated_density(rho_s, size, stride1, h1, w1))
    rho_in = jnp.where(spatial, rho_in, 1.0)
    density2 = rho_s * rho_c * jnp.where(bottleneck > 0.5, rho_c, 1.0)
    n_groups = width / setting.channel_granularity
    hidden = jnp.maximum(jnp.floor(n_groups / 16.0), 16.0)
    grid = jnp.floor(shape.h_out / size) * jnp.floor(shape.w_out / size)
    masker = (
        f(spatial) * grid * cin * 2.0 * setting.mask_groups
        + f(channel) * (cin * hidden + hidden * 2.0 * n_groups)
        + f(layer) * 2.0 * cin
        + f(code == MODE_CODE["lc"]) * cin * (n_groups + 1.0)
    )
    dynamic = (conv1 * rho_in * rho_c + conv2 * density2 + conv3 * rho_s * rho_c + se) * rho_l + downsample + masker
    return dynamic, conv1 + conv2 + conv3 + downsample + se


def layer_launches(
    layers: Sequence[LayerSpec], batch, half, engine: EngineModel, head_input_hw: tuple[int, int]
) -> Launches:
    """Launch records of the stem and head layers (never dynamic): two slots per layer.

    ``head_input_hw``: the last feature map, which the classifier's global pooling reads.
    """
    b = jnp.where(jnp.asarray(half) > 0.5, 2.0, 4.0)
    unfused_epi = 1.0 - engine.fused_epilogue
    records = []
    for layer in layers:
        p_in, p_out = layer.h_in * layer.w_in, layer.h_out * layer.w_out
        if layer.kind == "conv":
            taps = layer.kernel * layer.kernel
            out = batch * p_out * layer.out_channels * b
            records.append(
                _launch(
                    1.0,
                    KIND_CONV if taps > 1 else KIND_DENSE,
                    m=batch * p_out,
                    n=layer.out_channels,
                    k=taps * layer.in_channels,
                    a_bytes=batch * p_in * layer.in_channels * b,
                    w_bytes=taps * layer.in_channels * layer.out_channels * b,
                    o_bytes=out,
                )
            )
            records.append(_launch(unfused_epi, o_bytes=2.0 * out))
        elif layer.kind == "maxpool":
            records.append(_launch(1.0, o_bytes=batch * (p_in + p_out) * layer.in_channels * b))
            records.append(_launch(0.0))
        elif layer.kind == "dense":
            # global average pool of the last feature map, then the classifier
            records.append(
                _launch(
                    1.0,
                    KIND_DENSE,
                    m=batch,
                    n=layer.out_channels,
                    k=layer.in_channels,
                    w_bytes=layer.in_channels * layer.out_channels * b,
                    o_bytes=batch * layer.out_channels * b,
                )
            )
            pooled = head_input_hw[0] * head_input_hw[1] * layer.in_channels
            records.append(_launch(1.0, o_bytes=batch * pooled * b))
        else:
            raise ValueError(f"unknown layer kind {layer.kind!r} of {layer.name}")
    return _stack(records)

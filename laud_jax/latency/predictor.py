"""Per-block and whole-network latency: launch records (launches.py) timed by the roofline.

Everything here is pure jnp on pytrees of numbers: :func:`block_time` is a scalar function
of (profile, engine, block shape, block setting) that jit and vmap over any grid of
settings (:func:`grid_block_times`), and :func:`predict` evaluates a configured network.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from laud_jax.latency.launches import (
    ENGINES,
    MODE_CODE,
    OVERHEAD_SLOTS,
    BlockSetting,
    BlockShape,
    EngineModel,
    block_launches,
    block_macs,
    layer_launches,
    static_twin,
)
from laud_jax.latency.profiles import HardwareProfile
from laud_jax.latency.roofline import launch_times, total_time
from laud_jax.models.specs import NetworkSpec

GPU_ENGINE = "pallas"
CPU_ENGINE = "xla"


def default_engine(hardware: str) -> str:
    """The engine a hardware name runs: the Pallas kernels on GPUs, the XLA path on the CPU."""
    return CPU_ENGINE if hardware.lower() == "local" else GPU_ENGINE


def block_launch_times(profile: HardwareProfile, engine: EngineModel, shape: BlockShape, setting: BlockSetting):
    """Predicted seconds of each launch slot of one block (``launches.LAUNCH_NAMES`` order).

    Layer gates at batch > 1: compacting the executing samples costs a gather and a scatter,
    so the block runs whichever is faster, the compacted branch or the branch on every
    sample with the gate multiplied in (the rate-1 setting). This keeps latency monotone
    in the rate.
    """
    times = launch_times(profile, block_launches(shape, setting, engine), setting.half)
    all_samples = dataclasses.replace(setting, rho_layer=jnp.ones_like(setting.rho_layer))
    uncompacted = launch_times(profile, block_launches(shape, all_samples, engine), setting.half)
    layer = jnp.isin(setting.mode, jnp.asarray([MODE_CODE["layer"], MODE_CODE["lc"]], jnp.float32))
    cheaper = layer & (setting.batch > 1.5) & (jnp.sum(uncompacted) < jnp.sum(times))
    return jnp.where(cheaper, uncompacted, times)


def block_time(profile: HardwareProfile, engine: EngineModel, shape: BlockShape, setting: BlockSetting):
    """Predicted seconds of one block (scalars in, scalar out; no call overhead)."""
    return jnp.sum(block_launch_times(profile, engine, shape, setting), axis=-1)


def block_masker_time(profile: HardwareProfile, engine: EngineModel, shape: BlockShape, setting: BlockSetting):
    """Seconds of the block's host round trip, maskers, gates and index lists (what a
    dynamic block adds at any rate)."""
    times = block_launch_times(profile, engine, shape, setting)
    return jnp.sum(times[..., : len(OVERHEAD_SLOTS)], axis=-1)


def _broadcast(setting: BlockSetting) -> tuple[BlockSetting, tuple[int, ...]]:
    leaves = [jnp.asarray(getattr(setting, f.name), jnp.float32) for f in dataclasses.fields(setting)]
    shape = jnp.broadcast_shapes(*(leaf.shape for leaf in leaves))
    flat = [jnp.broadcast_to(leaf, shape).reshape(-1) for leaf in leaves]
    return BlockSetting(*flat), shape


@jax.jit
def _grid(profile, engine, shapes, setting):
    per_setting = jax.vmap(
        lambda shape, s: (block_time(profile, engine, shape, s), *block_macs(shape, s)),
        in_axes=(None, 0),
    )
    return jax.vmap(per_setting, in_axes=(0, None))(shapes, setting)


def grid_block_times(
    profile: HardwareProfile, engine: EngineModel, shapes: BlockShape, setting: BlockSetting
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Times, dynamic MACs and dense MACs of every block for every setting of a grid.

    ``shapes`` has a leading block axis (n,); the fields of ``setting`` broadcast to any grid
    shape G. Returns three (n, *G) arrays (one jitted, vmapped call).
    """
    flat, grid_shape = _broadcast(setting)
    times, dynamic, dense = _grid(profile.as_arrays(), engine.as_arrays(), shapes, flat)
    n = shapes.in_channels.shape[0]
    return tuple(x.reshape(n, *grid_shape) for x in (times, dynamic, dense))


def fixed_time(profile: HardwareProfile, engine: EngineModel, spec: NetworkSpec, batch, half):
    """Seconds of the stem and the head (never dynamic)."""
    last = spec.blocks[-1]
    launches = layer_launches(spec.stem + spec.head, batch, half, engine, (last.h_out, last.w_out))
    return total_time(profile, launches, half)


@functools.partial(jax.jit, static_argnames=("spec",))
def _network_grid(profile, engine, spec, setting):
    shapes = BlockShape.from_specs(spec.blocks)
    blocks = jax.vmap(lambda s: jnp.sum(jax.vmap(lambda shape: block_time(profile, engine, shape, s))(shapes)))(setting)
    fixed = jax.vmap(lambda batch, half: fixed_time(profile, engine, spec, batch, half))(setting.batch, setting.half)
    return blocks + fixed + profile.call_overhead


def grid_network_times(
    profile: HardwareProfile, engine: EngineModel, spec: NetworkSpec, setting: BlockSetting
) -> jax.Array:
    """Whole-network seconds for every setting of a grid (every block takes the setting:
    one mode, S and rate for the whole network; stem and head static). One jitted call."""
    flat, grid_shape = _broadcast(setting)
    return _network_grid(profile.as_arrays(), engine.as_arrays(), spec, flat).reshape(grid_shape)


def spec_settings(spec: NetworkSpec, rho, batch, dtype: str, rho_conv1=None) -> BlockSetting:
    """Per-block settings (leading block axis) of a configured network at activation rate rho.

    ``rho``: one rate for every gate of every block, or one per block; ``rho_conv1``:
    optional measured conv1 densities per block (default: the i.i.d. expectation).
    """
    n = len(spec.blocks)
    rho = jnp.broadcast_to(jnp.asarray(rho, jnp.float32), (n,))
    conv1 = jnp.full((n,), -1.0) if rho_conv1 is None else jnp.broadcast_to(jnp.asarray(rho_conv1, jnp.float32), (n,))
    column = lambda attr: jnp.asarray([float(attr(b)) for b in spec.blocks], jnp.float32)  # noqa: E731
    return BlockSetting(
        mode=column(lambda b: MODE_CODE[b.mode]),
        granularity=column(lambda b: b.granularity),
        rho_spatial=rho,
        rho_channel=rho,
        rho_layer=rho,
        rho_conv1=conv1,
        channel_granularity=column(lambda b: b.channel_granularity),
        mask_groups=column(lambda b: b.mask_groups),
        batch=jnp.full((n,), float(batch)),
        half=jnp.full((n,), float(dtype in ("bfloat16", "float16"))),
    )


@jax.jit
def _paired(profile, engine, shapes, dynamic_setting):
    static_setting = static_twin(dynamic_setting)

    def one(shape, dyn, stat):
        return (
            block_time(profile, engine, shape, stat),
            block_time(profile, engine, shape, dyn),
            block_masker_time(profile, engine, shape, dyn),
            *block_macs(shape, dyn),
        )

    return jax.vmap(one)(shapes, dynamic_setting, static_setting)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Predicted latency of a configured network (milliseconds) and its MAC ratio."""

    static_ms: float
    dynamic_ms: float
    latency_ratio: float
    mac_ratio: float
    fixed_ms: float
    blocks: list[dict[str, Any]]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def predict(
    spec: NetworkSpec,
    profile: HardwareProfile,
    engine: EngineModel | str = GPU_ENGINE,
    *,
    rho: float | Sequence[float] = 0.5,
    batch: int = 1,
    dtype: str = "float32",
    rho_conv1: Sequence[float] | None = None,
) -> Prediction:
    """Static and dynamic latency of every block of ``spec`` (its modes and S) at rate ``rho``."""
    if isinstance(engine, str):
        engine = ENGINES[engine]
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    rates = np.broadcast_to(np.asarray(rho, np.float64), (len(spec.blocks),))
    if np.any((rates < 0) | (rates > 1)):
        raise ValueError(f"activation rates must lie in [0, 1], got {sorted(set(rates.tolist()))}")
    profile_arrays, engine_arrays = profile.as_arrays(), engine.as_arrays()
    setting = spec_settings(spec, rates, batch, dtype, rho_conv1)
    shapes = BlockShape.from_specs(spec.blocks)
    static_t, dynamic_t, masker_t, dyn_macs, dense_macs = (
        np.asarray(x, np.float64) for x in _paired(profile_arrays, engine_arrays, shapes, setting)
    )
    half = float(dtype in ("bfloat16", "float16"))
    fixed = float(fixed_time(profile_arrays, engine_arrays, spec, float(batch), half))
    call = float(profile.call_overhead)
    static_total = fixed + call + static_t.sum()
    dynamic_total = fixed + call + dynamic_t.sum()
    blocks = [
        {
            "name": b.name,
            "stage": b.stage + 1,
            "mode": b.mode,
            "granularity": b.granularity,
            "rho": float(rates[i]),
            "static_ms": 1e3 * static_t[i],
            "dynamic_ms": 1e3 * dynamic_t[i],
            "masker_ms": 1e3 * masker_t[i] if b.mode != "static" else 0.0,
            "latency_ratio": dynamic_t[i] / static_t[i],
            "mac_ratio": dyn_macs[i] / dense_macs[i],
        }
        for i, b in enumerate(spec.blocks)
    ]
    total_dense = float(spec.fixed_macs) + dense_macs.sum()
    return Prediction(
        static_ms=1e3 * static_total,
        dynamic_ms=1e3 * dynamic_total,
        latency_ratio=dynamic_total / static_total,
        mac_ratio=(float(spec.fixed_macs) + dyn_macs.sum()) / total_dense,
        fixed_ms=1e3 * fixed,
        blocks=blocks,
        settings={"batch": batch, "dtype": dtype, "arch": spec.config.arch, "image_shape": list(spec.image_shape)},
    )

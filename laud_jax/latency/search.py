"""Granularity search: per stage, the mode and patch size S (and, network-wide, the channel
group size) predicted fastest at a target MAC rate.

One jitted call evaluates every block for every (S, mode, channel group size, rho) of the
grid, sums blocks per stage, converts each stage's rho axis to its MAC ratio (maskers
included, as the sparsity loss counts them), interpolates the stage latency at the target
rate and takes the fastest valid option per stage; the channel group size is chosen for the
whole network (it is one model config key).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from laud_jax.latency.launches import MODE_CODE, BlockSetting, BlockShape, EngineModel, block_macs, static_twin
from laud_jax.latency.predictor import block_time, fixed_time
from laud_jax.latency.profiles import HardwareProfile
from laud_jax.models.specs import CHANNEL_MODES, SPATIAL_MODES, NetworkSpec, network_spec

SEARCH_MODES = ("spatial", "channel", "layer")
GRANULARITIES = (1, 2, 4, 7, 8, 14)
CHANNEL_GRANULARITIES = (2, 4, 8)
NUM_RATES = 20


def default_rates(n: int = NUM_RATES) -> np.ndarray:
    """Activation-rate grid: n points in (0, 1], evenly spaced."""
    return np.linspace(1.0 / n, 1.0, n)


@jax.jit
def _search(profile, engine, shapes, stage_onehot, valid, modes, sizes, groups, rates, target, batch, half, fixed):
    grid = (sizes.shape[0], modes.shape[0], groups.shape[0], rates.shape[0])
    setting = BlockSetting(
        mode=jnp.broadcast_to(modes[None, :, None, None], grid).reshape(-1),
        granularity=jnp.broadcast_to(sizes[:, None, None, None], grid).reshape(-1),
        rho_spatial=jnp.broadcast_to(rates, grid).reshape(-1),
        rho_channel=jnp.broadcast_to(rates, grid).reshape(-1),
        rho_layer=jnp.broadcast_to(rates, grid).reshape(-1),
        rho_conv1=jnp.full(int(np.prod(grid)), -1.0),
        channel_granularity=jnp.broadcast_to(groups[None, None, :, None], grid).reshape(-1),
        mask_groups=jnp.ones(int(np.prod(grid))),
        batch=jnp.full(int(np.prod(grid)), batch),
        half=jnp.full(int(np.prod(grid)), half),
    )

    def per_block(shape):
        def per_setting(s):
            return (block_time(profile, engine, shape, s), *block_macs(shape, s))

        times, dynamic, dense = jax.vmap(per_setting)(setting)
        static = block_time(profile, engine, shape, static_twin(jax.tree.map(lambda x: x[0], setting)))
        return times.reshape(grid), dynamic.reshape(grid), dense[0], static

    times, dynamic, dense, static = jax.vmap(per_block)(shapes)
    stage_times = jnp.einsum("sb,b...->s...", stage_onehot, times)
    stage_ratio = jnp.einsum("sb,b...->s...", stage_onehot, dynamic) / (stage_onehot @ dense)[:, None, None, None, None]
    stage_static = stage_onehot @ static

    rows_x = stage_ratio.reshape(-1, grid[-1])
    rows_t = stage_times.reshape(-1, grid[-1])
    at_target = jax.vmap(lambda x, t: jnp.interp(target, x, t, left=jnp.inf, right=jnp.inf))(rows_x, rows_t)
    at_target = jnp.where(valid, at_target.reshape(stage_times.shape[:-1]), jnp.inf)  # (stages, S, M, G)
    n_stages = at_target.shape[0]
    flat = jnp.moveaxis(at_target, 3, 1).reshape(n_stages, groups.shape[0], -1)  # (stages, G, S*M)
    best = jnp.argmin(flat, axis=-1)
    best_time = jnp.min(flat, axis=-1)  # (stages, G)
    network = fixed + jnp.sum(best_time, axis=0)  # (G,)
    best_group = jnp.argmin(network)
    return dict(
        at_target=at_target,
        best=best,
        best_time=best_time,
        network=network,
        best_group=best_group,
        stage_static=stage_static,
        static_network=fixed + jnp.sum(stage_static),
    )


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The chosen granularity per stage, its predicted latency and a config fragment."""

    arch: str
    hardware: str
    engine: str
    target_rate: float
    batch: int
    dtype: str
    channel_granularity: int
    stages: list[dict[str, Any]]
    static_ms: float
    dynamic_ms: float
    latency_ratio: float
    candidates: dict[str, Any]  # latency ratio at the target per stage x S x mode (chosen group size)
    seconds: float  # wall time of the search (after compilation)

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(s["mode"] for s in self.stages)

    @property
    def granularity(self) -> tuple[int, ...]:
        return tuple(s["granularity"] for s in self.stages)

    def config_fragment(self) -> dict[str, Any]:
        fragment = {"mode": self.modes[0] if len(set(self.modes)) == 1 else self.modes, "granularity": self.granularity}
        if any(m in CHANNEL_MODES for m in self.modes):
            fragment["channel_granularity"] = self.channel_granularity
        return {"model": fragment}

    def flags(self) -> str:
        """Overrides for `python -m laud_jax.train --exp CONFIG ...`."""
        model = self.config_fragment()["model"]
        mode = model["mode"] if isinstance(model["mode"], str) else ",".join(model["mode"])
        parts = [f"--exp.model.mode={mode}", "--exp.model.granularity=" + ",".join(map(str, model["granularity"]))]
        if "channel_granularity" in model:
            parts.append(f"--exp.model.channel_granularity={model['channel_granularity']}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["config"] = self.config_fragment()
        record["flags"] = self.flags()
        return record


def search(
    arch: str,
    profile: HardwareProfile,
    engine: EngineModel,
    *,
    target_rate: float = 0.5,
    batch: int = 1,
    dtype: str = "float32",
    image_shape: Sequence[int] = (224, 224, 3),
    modes: Sequence[str] = SEARCH_MODES,
    granularities: Sequence[int] = GRANULARITIES,
    channel_granularities: Sequence[int] = CHANNEL_GRANULARITIES,
    rates: Sequence[float] | None = None,
    num_classes: int = 1000,
    hardware_name: str = "",
    engine_name: str = "",
) -> SearchResult:
    """Choose mode and S per stage (and the channel group size) at ``target_rate``."""
    if not 0.0 < target_rate <= 1.0:
        raise ValueError(f"target rate must lie in (0, 1], got {target_rate}")
    bad = [m for m in modes if m not in MODE_CODE or m == "static"]
    if bad or not modes:
        raise ValueError(f"search modes {list(modes)} invalid; choose from {[m for m in MODE_CODE if m != 'static']}")
    if not granularities or min(granularities) < 1 or not channel_granularities or min(channel_granularities) < 1:
        raise ValueError("granularities and channel granularities must be non-empty lists of positive ints")
    spec = network_spec({"arch": arch, "num_classes": num_classes}, image_shape)
    rates = default_rates() if rates is None else np.asarray(rates, np.float64)
    valid = _valid_options(spec, modes, granularities, channel_granularities)
    if not valid.any(axis=(1, 2, 3)).all():
        raise ValueError("some stage has no valid (mode, S, channel group size) candidate; widen the candidate lists")
    half = float(dtype in ("bfloat16", "float16"))
    profile_arrays, engine_arrays = profile.as_arrays(), engine.as_arrays()
    fixed = fixed_time(profile_arrays, engine_arrays, spec, float(batch), half) + profile_arrays.call_overhead
    args = (
        profile_arrays,
        engine_arrays,
        BlockShape.from_specs(spec.blocks),
        jnp.asarray(_stage_onehot(spec)),
        jnp.asarray(valid),
        jnp.asarray([MODE_CODE[m] for m in modes], jnp.float32),
        jnp.asarray(granularities, jnp.float32),
        jnp.asarray(channel_granularities, jnp.float32),
        jnp.asarray(rates, jnp.float32),
        jnp.float32(target_rate),
        jnp.float32(batch),
        jnp.float32(half),
        fixed,
    )
    start = time.perf_counter()
    out = jax.tree.map(np.asarray, _search(*args))
    seconds = time.perf_counter() - start
    g = int(out["best_group"])
    n_modes = len(modes)
    stages = []
    for stage in range(spec.config.num_stages):
        index = int(out["best"][stage, g])
        s_index, m_index = divmod(index, n_modes)
        mode = modes[m_index]
        stage_static = float(out["stage_static"][stage])
        stage_time = float(out["best_time"][stage, g])
        stages.append(
            {
                "stage": stage + 1,
                "mode": mode,
                "granularity": int(granularities[s_index]) if mode in SPATIAL_MODES else 1,
                "static_ms": 1e3 * stage_static,
                "dynamic_ms": 1e3 * stage_time,
                "latency_ratio": stage_time / stage_static,
            }
        )
    static = float(out["static_network"])
    dynamic = float(out["network"][g])
    ratio_table = out["at_target"][:, :, :, g] / out["stage_static"][:, None, None]
    candidates = {
        "granularities": list(map(int, granularities)),
        "modes": list(modes),
        "latency_ratio": np.where(np.isfinite(ratio_table), ratio_table, np.nan).tolist(),
    }
    return SearchResult(
        arch=arch,
        hardware=hardware_name,
        engine=engine_name,
        target_rate=float(target_rate),
        batch=int(batch),
        dtype=dtype,
        channel_granularity=int(channel_granularities[g]),
        stages=stages,
        static_ms=1e3 * static,
        dynamic_ms=1e3 * dynamic,
        latency_ratio=dynamic / static,
        candidates=candidates,
        seconds=seconds,
    )


def _stage_onehot(spec: NetworkSpec) -> np.ndarray:
    matrix = np.zeros((spec.config.num_stages, len(spec.blocks)), np.float32)
    for i, block in enumerate(spec.blocks):
        matrix[block.stage, i] = 1.0
    return matrix


def _valid_options(spec: NetworkSpec, modes, granularities, channel_granularities) -> np.ndarray:
    """(stages, S, modes, group sizes) mask of options the model config accepts.

    S must divide every feature map of a spatial stage; the group size must divide the
    width of a channel stage. S is irrelevant to non-spatial modes (only the first S
    counts, so ties do not repeat), the group size to non-channel modes.
    """
    n_stages = spec.config.num_stages
    valid = np.zeros((n_stages, len(granularities), len(modes), len(channel_granularities)), bool)
    for stage in range(n_stages):
        blocks = spec.stage_blocks(stage)
        for si, size in enumerate(granularities):
            divides = all(b.h_out % size == 0 and b.w_out % size == 0 for b in blocks)
            for mi, mode in enumerate(modes):
                for gi, group in enumerate(channel_granularities):
                    ok = True
                    if mode in SPATIAL_MODES:
                        ok &= divides
                    elif si > 0:
                        ok = False
                    if mode in CHANNEL_MODES:
                        ok &= all(b.width % group == 0 for b in blocks)
                    valid[stage, si, mi, gi] = ok
    return valid

"""Granularity search: per stage, the mode and patch size S (and, network-wide, the channel
group size) predicted fastest at a target MAC rate.

One jitted call evaluates every block for every (S, mode, channel group size, rho) of the
grid, sums blocks per stage, converts each stage's rho axis to its MAC ratio (maskers
included, as the sparsity loss counts them), interpolates the stage latency at the target
rate and takes the fastest valid option per stage; the channel group size is chosen for the
whole network (it is one model config key).

:func:`search_config` searches the model of an experiment config: the fields of
``config.model`` set to ``'auto'`` (``mode``, ``granularity``) are chosen, the others fix
the candidates (what ``python -m laud_jax.train`` runs before building an ``auto`` model).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from laud_jax.config_utils import AUTO, AUTO_FIELDS, model_dict
from laud_jax.latency.launches import ENGINES, MODE_CODE, BlockSetting, BlockShape, EngineModel, block_macs, static_twin
from laud_jax.latency.predictor import block_time, default_engine, fixed_time
from laud_jax.latency.profiles import HardwareProfile, get_profile, local_profile_path
from laud_jax.models.specs import (
    CHANNEL_MODES,
    DEFAULT_GRANULARITY,
    MODE_ALIASES,
    MODES,
    SPATIAL_MODES,
    NetworkSpec,
    model_config,
    network_spec,
)

SEARCH_MODES = ("spatial", "channel", "layer")
GRANULARITIES = (1, 2, 4, 7, 8, 14)
CHANNEL_GRANULARITIES = (2, 4, 8)
NUM_RATES = 20
SEARCHABLE_MODES = tuple(m for m in MODES if m != "static")


def default_rates(n: int = NUM_RATES) -> np.ndarray:
    """Activation-rate grid: n points in (0, 1], evenly spaced."""
    return np.linspace(1.0 / n, 1.0, n)


@jax.jit
def _search(
    profile, engine, shapes, stage_onehot, valid, modes, sizes, groups, rates, target, batch, half, mask_groups, fixed
):
    grid = (sizes.shape[0], modes.shape[0], groups.shape[0], rates.shape[0])
    setting = BlockSetting(
        mode=jnp.broadcast_to(modes[None, :, None, None], grid).reshape(-1),
        granularity=jnp.broadcast_to(sizes[:, None, None, None], grid).reshape(-1),
        rho_spatial=jnp.broadcast_to(rates, grid).reshape(-1),
        rho_channel=jnp.broadcast_to(rates, grid).reshape(-1),
        rho_layer=jnp.broadcast_to(rates, grid).reshape(-1),
        rho_conv1=jnp.full(int(np.prod(grid)), -1.0),
        channel_granularity=jnp.broadcast_to(groups[None, None, :, None], grid).reshape(-1),
        mask_groups=jnp.full(int(np.prod(grid)), mask_groups),
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
    image_shape: tuple[int, ...]
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
    seconds: float  # wall time of the jitted call (its first call with these shapes includes compilation)

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
    model: str | Mapping[str, Any],
    profile: HardwareProfile,
    engine: EngineModel,
    *,
    target_rate: float = 0.5,
    batch: int = 1,
    dtype: str | None = None,
    image_shape: Sequence[int] = (224, 224, 3),
    modes: Sequence[str] | Sequence[Sequence[str]] = SEARCH_MODES,
    granularities: Sequence[int] | Sequence[Sequence[int]] = GRANULARITIES,
    channel_granularities: Sequence[int] = CHANNEL_GRANULARITIES,
    rates: Sequence[float] | None = None,
    num_classes: int | None = None,
    hardware_name: str = "",
    engine_name: str = "",
) -> SearchResult:
    """Choose mode and S per stage (and the channel group size) at ``target_rate``.

    ``model``: an arch name, or a model config (``laud_jax.models.model_config`` keys; its
    shape overrides, ``mask_groups`` and ``dtype`` count, its ``mode`` and ``granularity``
    are ignored). ``modes`` / ``granularities``: candidates for every stage, or one
    candidate list per stage. ``num_classes``: default the model config's (1000 for a name);
    ``dtype``: default the model config's (float32 for a name).
    """
    if not 0.0 < target_rate <= 1.0:
        raise ValueError(f"target rate must lie in (0, 1], got {target_rate}")
    cfg = {"arch": model} if isinstance(model, str) else {k: v for k, v in dict(model).items() if v is not None}
    cfg = {**cfg, "mode": "static"}
    cfg.pop("granularity", None)
    if num_classes is not None:
        cfg["num_classes"] = num_classes
    spec = network_spec(cfg, image_shape)
    dtype = dtype or spec.config.dtype
    n_stages = spec.config.num_stages
    stage_modes = [tuple(MODE_ALIASES.get(m, m) for m in c) for c in _stage_candidates(modes, n_stages, "modes")]
    stage_sizes = _stage_candidates(granularities, n_stages, "granularities")
    all_modes = tuple(dict.fromkeys(m for c in stage_modes for m in c))
    all_sizes = tuple(dict.fromkeys(int(s) for c in stage_sizes for s in c))
    bad = [m for m in all_modes if m not in MODE_CODE or m == "static"]
    if bad or not all(stage_modes):
        raise ValueError(f"search modes {list(all_modes)} invalid; choose from {list(SEARCHABLE_MODES)}")
    if not all(stage_sizes) or min(all_sizes) < 1 or not channel_granularities or min(channel_granularities) < 1:
        raise ValueError("granularities and channel granularities must be non-empty lists of positive ints")
    rates = default_rates() if rates is None else np.asarray(rates, np.float64)
    valid = _valid_options(spec, stage_modes, stage_sizes, all_modes, all_sizes, channel_granularities)
    if not valid.any(axis=(1, 2, 3)).all():
        stages = [i + 1 for i in range(n_stages) if not valid[i].any()]
        raise ValueError(
            f"stage(s) {stages} have no valid (mode, S, channel group size) candidate (S must divide the stage's "
            "feature map, the group sizes its width); widen the candidate lists"
        )
    half = float(dtype in ("bfloat16", "float16"))
    profile_arrays, engine_arrays = profile.as_arrays(), engine.as_arrays()
    fixed = fixed_time(profile_arrays, engine_arrays, spec, float(batch), half) + profile_arrays.call_overhead
    args = (
        profile_arrays,
        engine_arrays,
        BlockShape.from_specs(spec.blocks),
        jnp.asarray(_stage_onehot(spec)),
        jnp.asarray(valid),
        jnp.asarray([MODE_CODE[m] for m in all_modes], jnp.float32),
        jnp.asarray(all_sizes, jnp.float32),
        jnp.asarray(channel_granularities, jnp.float32),
        jnp.asarray(rates, jnp.float32),
        jnp.float32(target_rate),
        jnp.float32(batch),
        jnp.float32(half),
        jnp.float32(spec.config.mask_groups),
        fixed,
    )
    start = time.perf_counter()
    out = jax.tree.map(np.asarray, _search(*args))
    seconds = time.perf_counter() - start
    g = int(out["best_group"])
    n_modes = len(all_modes)
    stages = []
    for stage in range(n_stages):
        index = int(out["best"][stage, g])
        s_index, m_index = divmod(index, n_modes)
        mode = all_modes[m_index]
        stage_static = float(out["stage_static"][stage])
        stage_time = float(out["best_time"][stage, g])
        stages.append(
            {
                "stage": stage + 1,
                "mode": mode,
                "granularity": all_sizes[s_index] if mode in SPATIAL_MODES else 1,
                "static_ms": 1e3 * stage_static,
                "dynamic_ms": 1e3 * stage_time,
                "latency_ratio": stage_time / stage_static,
            }
        )
    static = float(out["static_network"])
    dynamic = float(out["network"][g])
    ratio_table = out["at_target"][:, :, :, g] / out["stage_static"][:, None, None]
    candidates = {
        "granularities": list(all_sizes),
        "modes": list(all_modes),
        "latency_ratio": np.where(np.isfinite(ratio_table), ratio_table, np.nan).tolist(),
    }
    return SearchResult(
        arch=spec.config.arch,
        image_shape=tuple(spec.image_shape),
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


@dataclasses.dataclass(frozen=True)
class Hardware:
    """The profile and engine a search runs on; ``note`` says why ``name`` is not the one asked for."""

    name: str
    profile: HardwareProfile
    engine: str
    note: str = ""


def resolve_hardware(hardware: str, engine: str = "", fallback: str = "") -> Hardware:
    """``hardware`` (a preset, ``local`` or a profile .json) and ``engine`` ('' = the hardware's).

    ``local`` without a fitted profile uses the preset ``fallback`` with a note when one is
    given, else raises FileNotFoundError. Unknown names raise ValueError.
    """
    note = ""
    try:
        profile = get_profile(hardware)
    except FileNotFoundError:
        if hardware.lower() != "local" or not fallback:
            raise
        note = (
            f"no fitted local profile at {local_profile_path()} (fit one with `python -m laud_jax.latency "
            f"calibrate`): the latency search uses the {fallback!r} preset instead"
        )
        hardware, profile = fallback, get_profile(fallback)
    engine = engine or default_engine("local" if hardware.endswith(".json") else hardware)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {sorted(ENGINES)}")
    return Hardware(hardware, profile, engine, note)


def auto_fields(model: Mapping[str, Any]) -> tuple[str, ...]:
    """The fields of a model config set to ``'auto'`` (of ``AUTO_FIELDS``)."""
    return tuple(field for field in AUTO_FIELDS if model.get(field) == AUTO)


def search_config(
    config: Any,
    image_shape: Sequence[int],
    num_classes: int,
    hardware: Hardware,
    *,
    batch: int | None = None,
    rates: Sequence[float] | None = None,
) -> SearchResult:
    """Search the ``'auto'`` fields of an experiment config's model.

    ``config``: a training config (``config_utils.base_config`` schema); its model (shape
    overrides, ``num_classes``, or ``num_classes`` from the data when 0, ``dtype``,
    ``mask_groups``), ``loss.target_rate``, ``latency`` candidates and batch
    (``latency.batch``, 0 = ``eval_batch_size``; ``batch`` overrides both) are used.
    A fixed ``mode`` fixes each stage's mode, a fixed ``granularity`` each spatial stage's
    S; the channel group size stays ``model.channel_granularity``. ``image_shape`` and
    ``num_classes`` are the dataset's. Raises ValueError naming the config field.
    """
    model = model_dict(config, num_classes)
    fields = auto_fields(model)
    if not fields:
        raise ValueError("neither model.mode nor model.granularity is 'auto': there is nothing to search")
    shape = {k: v for k, v in model.items() if k not in AUTO_FIELDS}
    if "mode" in fields:
        candidates = [MODE_ALIASES.get(m, m) for m in config.latency.modes]
        bad = [m for m in candidates if m not in SEARCHABLE_MODES]
        if bad or not candidates:
            raise ValueError(f"latency.modes={tuple(config.latency.modes)}: choose from {list(SEARCHABLE_MODES)}")
        modes: Any = tuple(candidates)
    else:
        fixed = model_config({**shape, "mode": model["mode"]}).mode
        static = [i + 1 for i, m in enumerate(fixed) if m == "static"]
        if static or not any(m in SPATIAL_MODES for m in fixed):
            raise ValueError(
                f"model.granularity='auto' chooses S of spatial stages, and model.mode={model['mode']!r} "
                + (f"makes stage(s) {static} static" if static else "has no spatial stage")
                + ": set model.mode to dynamic modes, or model.mode='auto'"
            )
        modes = [(m,) for m in fixed]
    if "granularity" in fields:
        granularities: Any = tuple(config.latency.granularities)
    else:
        fixed_s = model_config(
            {**shape, "mode": "static", "granularity": model.get("granularity", DEFAULT_GRANULARITY)}
        )
        granularities = [(s,) for s in fixed_s.granularity]
    batch = batch or config.latency.batch or config.eval_batch_size
    return search(
        shape,
        hardware.profile,
        ENGINES[hardware.engine],
        target_rate=float(config.loss.target_rate),
        batch=int(batch),
        image_shape=image_shape,
        modes=modes,
        granularities=granularities,
        channel_granularities=(int(model.get("channel_granularity", 2)),),
        rates=rates,
        hardware_name=hardware.name,
        engine_name=hardware.engine,
    )


def model_update(result: SearchResult, fields: Sequence[str]) -> dict[str, Any]:
    """The values of the ``'auto'`` model ``fields`` that ``result`` chose (config form)."""
    values = {
        "mode": result.modes[0] if len(set(result.modes)) == 1 else ",".join(result.modes),
        "granularity": result.granularity,
    }
    return {field: values[field] for field in fields}


def _stage_candidates(values: Sequence[Any], n_stages: int, name: str) -> list[tuple[Any, ...]]:
    """One candidate list for every stage, or one list per stage."""
    values = list(values)
    if values and all(isinstance(v, (list, tuple)) for v in values):
        if len(values) != n_stages:
            raise ValueError(f"{len(values)} per-stage candidate lists of {name} for {n_stages} stages")
        return [tuple(v) for v in values]
    return [tuple(values)] * n_stages


def _stage_onehot(spec: NetworkSpec) -> np.ndarray:
    matrix = np.zeros((spec.config.num_stages, len(spec.blocks)), np.float32)
    for i, block in enumerate(spec.blocks):
        matrix[block.stage, i] = 1.0
    return matrix


def _valid_options(
    spec: NetworkSpec, stage_modes, stage_sizes, modes, granularities, channel_granularities
) -> np.ndarray:
    """(stages, S, modes, group sizes) mask of options the model config accepts.

    A stage takes its own candidate modes and S. S must divide every feature map of a
    spatial stage and the mask groups G its widths; the group size must divide the width of
    a channel stage. S is irrelevant to non-spatial modes (only the first S counts, so ties
    do not repeat), the group size to non-channel modes.
    """
    n_stages = spec.config.num_stages
    mask_groups = spec.config.mask_groups
    valid = np.zeros((n_stages, len(granularities), len(modes), len(channel_granularities)), bool)
    for stage in range(n_stages):
        blocks = spec.stage_blocks(stage)
        for si, size in enumerate(granularities):
            divides = size in stage_sizes[stage] and all(
                b.h_out % size == 0
                and b.w_out % size == 0
                and b.width % mask_groups == 0
                and b.out_channels % mask_groups == 0
                for b in blocks
            )
            for mi, mode in enumerate(modes):
                for gi, group in enumerate(channel_granularities):
                    ok = mode in stage_modes[stage]
                    if mode in SPATIAL_MODES:
                        ok &= divides
                    elif si > 0:
                        ok = False
                    if mode in CHANNEL_MODES:
                        ok &= all(b.width % group == 0 for b in blocks)
                    valid[stage, si, mi, gi] = ok
    return valid

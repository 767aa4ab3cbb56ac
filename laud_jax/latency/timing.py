"""Timing the sparse engine's per-block execution on the local device (for calibration).

One measured call runs what the engine's block-by-block driver runs for a block: the
block's gates (the model's own maskers, with the decisions replaced by random hard masks of
a chosen density), its index lists, and ``laud_jax.sparse.executor.run_block`` under the
plan the engine picks for those counts (capacity ladder), the block input donated as the
engine donates it. The prediction for a measurement uses the realized densities: active
patch fraction, conv1 pixel fraction, the largest per-sample channel count (what the
engine pads every sample to) and the executing-sample fraction.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from laud_jax.latency.calibrate import Measurements
from laud_jax.latency.launches import MODE_CODE, BlockSetting, BlockShape
from laud_jax.models.blocks import DynamicBasicBlock, DynamicBottleneck
from laud_jax.models.specs import CHANNEL_MODES, MODES, BlockSpec, network_spec
from laud_jax.sparse import engine as sparse_engine
from laud_jax.sparse import executor, get_ops
from laud_jax.sparse.folding import fold_block
from laud_jax.sparse.routing import COUNT_KEYS, DEFAULT_CAPACITY_STEPS, plan_block
from laud_jax.timing import stats_ms, time_side_by_side

# (arch, image side): block shapes the calibration draws from (CPU-sized).
CALIBRATION_NETWORKS = (("resnet_small", 64), ("resnet50", 112), ("resnet18", 112), ("regnety_400mf", 112))
MODE_WEIGHTS = {"static": 1.0, "spatial": 2.0, "channel": 1.0, "layer": 1.0, "spatial+channel": 1.0, "lc": 1.0}
BATCHES = (1, 2, 4, 8)
MAX_INPUT_ELEMENTS = 2_000_000  # batch * H * W * C of a block input, to bound the run time


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    """One block configuration to time."""

    arch: str
    image: int
    block: int
    mode: str
    granularity: int
    rho: float
    batch: int
    seed: int

    def spec(self) -> BlockSpec:
        base = network_spec({"arch": self.arch, "num_classes": 10}, (self.image, self.image, 3))
        stage = base.blocks[self.block].stage
        modes = ["static"] * base.config.num_stages
        sizes = [1] * base.config.num_stages
        modes[stage], sizes[stage] = self.mode, self.granularity
        cfg = {"arch": self.arch, "num_classes": 10, "mode": tuple(modes), "granularity": tuple(sizes)}
        return network_spec(cfg, (self.image, self.image, 3)).blocks[self.block]


def sample_configs(n: int, seed: int) -> list[TimingConfig]:
    """``n`` random block configurations (shapes, modes, S, densities, batch sizes)."""
    rng = np.random.default_rng(seed)
    modes = list(MODE_WEIGHTS)
    weights = np.asarray([MODE_WEIGHTS[m] for m in modes]) / sum(MODE_WEIGHTS.values())
    configs = []
    while len(configs) < n:
        arch, image = CALIBRATION_NETWORKS[rng.integers(len(CALIBRATION_NETWORKS))]
        blocks = network_spec({"arch": arch, "num_classes": 10}, (image, image, 3)).blocks
        index = int(rng.integers(len(blocks)))
        block = blocks[index]
        mode = str(rng.choice(modes, p=weights))
        if mode in CHANNEL_MODES and block.width % 2:
            continue
        sizes = [s for s in (1, 2, 4, 7, 8) if block.h_out % s == 0 and block.w_out % s == 0]
        batches = [b for b in BATCHES if b * block.h_in * block.w_in * block.in_channels <= MAX_INPUT_ELEMENTS]
        if not batches:
            continue
        configs.append(
            TimingConfig(
                arch=arch,
                image=image,
                block=index,
                mode=mode,
                granularity=int(rng.choice(sizes)),
                rho=float(rng.uniform(0.1, 1.0)),
                batch=int(rng.choice(batches)),
                seed=int(rng.integers(2**31)),
            )
        )
    return configs


def _random_gates(spec: BlockSpec, batch: int, rho: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    gates = {}
    for key, shape in sparse_engine.gate_shapes(spec, batch).items():
        gates[key] = (rng.random(shape) < rho).astype(np.float32)
    return gates


def _block_variables(spec: BlockSpec, batch: int, key: jax.Array):
    module = (DynamicBottleneck if spec.kind == "bottleneck" else DynamicBasicBlock)(spec)
    x = jnp.zeros((batch, spec.h_in, spec.w_in, spec.in_channels), jnp.float32)
    variables = module.init({"params": key}, x, train=False, tau=jnp.asarray(1.0), gate_offset=0.0)
    folded = fold_block(spec, {spec.name: variables["params"]}, {spec.name: variables["batch_stats"]})
    return folded


def _step(ops, spec: BlockSpec, plan, params, x, forced):
    """Gates (maskers run, decisions replaced), index lists and their counts (which the
    driver reads on the host), and the block's execution."""
    gates = sparse_engine.compute_gates(spec, params.get("gates"), x, jnp.zeros(()), None)
    # keep the maskers' work: the forced decisions depend on the computed ones (x * 0 stays)
    gates = {k: (forced[k] + 0.0 * v if k in forced else v) for k, v in gates.items()}
    routing, counts = sparse_engine._routing(spec, gates, x.shape[0])
    return executor.run_block(ops, spec, plan, params, x, gates, routing), counts


_STEP = jax.jit(_step, static_argnames=("ops", "spec", "plan"))
_STEP_IN_PLACE = jax.jit(_step, static_argnames=("ops", "spec", "plan"), donate_argnames=("x",))


def realized(spec: BlockSpec, gates: dict[str, np.ndarray], counts: np.ndarray, batch: int) -> dict[str, float]:
    """Densities the engine executes for these gates (see the module docstring)."""
    count = dict(zip(COUNT_KEYS, (float(c) for c in counts)))
    out = {"rho_spatial": 1.0, "rho_channel": 1.0, "rho_layer": 1.0, "rho_conv1": -1.0}
    if spec.spatial:
        grid = spec.mask_grid
        per_sample = spec.channel and batch > 1
        units = 1 if per_sample else batch
        out["rho_spatial"] = count["cells"] / (units * grid[0] * grid[1])
        h1, w1 = spec.conv1_hw
        out["rho_conv1"] = count["pixels"] / (units * h1 * w1)
    if spec.channel:
        out["rho_channel"] = count["groups"] / spec.channel_groups
    if spec.layer:
        out["rho_layer"] = float(np.sum(gates["layer"] > 0)) / batch
    return out


def time_config(config: TimingConfig, repeats: int, backend: str = "xla", warmup: int = 2) -> dict[str, Any]:
    """Seconds of one block call (under the engine's default capacity ladder) and its
    realized densities, timed by ``laud_jax.timing.time_side_by_side``.

    ``seconds`` is the minimum over ``repeats`` calls after ``warmup``: on a shared machine
    other processes only ever add time, and the median can be several times the minimum
    under load (``median_s`` and every repeat are kept too).
    """
    spec = config.spec()
    rng = np.random.default_rng(config.seed)
    key = jax.random.key(config.seed)
    params = _block_variables(spec, config.batch, key)
    x = jax.nn.relu(
        jax.random.normal(jax.random.fold_in(key, 1), (config.batch, spec.h_in, spec.w_in, spec.in_channels))
    )
    gates = _random_gates(spec, config.batch, config.rho, rng)
    forced = {k: jnp.asarray(v) for k, v in gates.items()}
    if spec.mode == "static":
        counts = np.zeros(len(COUNT_KEYS))
        plan = plan_block(spec, None, config.batch, DEFAULT_CAPACITY_STEPS)
    else:
        counts = np.asarray(sparse_engine._routing(spec, forced, config.batch)[1])
        plan = plan_block(spec, counts, config.batch, DEFAULT_CAPACITY_STEPS)
    ops = get_ops(backend)
    in_place = plan.run == "sparse" and spec.spatial and not spec.downsample and not plan.per_sample
    step = _STEP_IN_PLACE if in_place else _STEP
    # every call gets its own copy of the input (an in-place step donates it), made before
    # the clock starts
    calls = max(1, warmup) + max(1, repeats)
    inputs = iter([jnp.array(x, copy=True).block_until_ready() for _ in range(calls)])
    times = time_side_by_side({"block": lambda: step(ops, spec, plan, params, next(inputs), forced)}, repeats, warmup)[
        "block"
    ]
    stats = stats_ms(times)
    return {
        **dataclasses.asdict(config),
        **realized(spec, gates, counts, config.batch),
        "plan": dataclasses.asdict(plan),
        "seconds": stats["min_ms"] / 1e3,
        "median_s": stats["median_ms"] / 1e3,
        "repeats": times,
        "load_average": os.getloadavg()[0],
    }


def measure(configs: Sequence[TimingConfig], repeats: int, backend: str = "xla") -> list[dict[str, Any]]:
    """Time every configuration (progress bar); the machine load is recorded per record."""
    records = []
    for config in tqdm(configs, desc="timing blocks", unit="config"):
        records.append(time_config(config, repeats, backend))
    return records


@functools.cache
def _spec_of(arch: str, image: int, block: int, mode: str, granularity: int) -> BlockSpec:
    return TimingConfig(arch, image, block, mode, granularity, 0.0, 1, 0).spec()


def to_measurements(records: Sequence[dict[str, Any]]) -> Measurements:
    """Measurements (shapes, realized settings, seconds) for :func:`calibrate.fit_profile`."""
    specs = [_spec_of(r["arch"], r["image"], r["block"], r["mode"], r["granularity"]) for r in records]
    column = lambda key: jnp.asarray([float(r[key]) for r in records], jnp.float32)  # noqa: E731
    n = len(records)
    settings = BlockSetting(
        mode=jnp.asarray([MODE_CODE[r["mode"]] for r in records], jnp.float32),
        granularity=column("granularity"),
        rho_spatial=column("rho_spatial"),
        rho_channel=column("rho_channel"),
        rho_layer=column("rho_layer"),
        rho_conv1=column("rho_conv1"),
        channel_granularity=jnp.asarray([float(s.channel_granularity) for s in specs], jnp.float32),
        mask_groups=jnp.ones((n,), jnp.float32),
        batch=column("batch"),
        half=jnp.zeros((n,), jnp.float32),
    )
    return Measurements(BlockShape.from_specs(specs), settings, column("seconds"))


def save_measurements(path: str, records: Sequence[dict[str, Any]]) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"format": "laud_jax.latency.timings/v1", "records": list(records)}, f, indent=1)


def load_measurements(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        record = json.load(f)
    if record.get("format") != "laud_jax.latency.timings/v1":
        raise ValueError(f"{path!r} is not a timings file written by `calibrate --measurements`")
    bad = [r for r in record["records"] if r.get("mode") not in MODES]
    if bad:
        raise ValueError(f"{path!r} has records with unknown modes: {bad[:2]}")
    return record["records"]

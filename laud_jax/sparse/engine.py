"""The sparse inference engine: a trained dynamic model executed without the masked-out work.

>>> engine = SparseEngine(model_cfg, variables, backend="xla")
>>> logits = engine(images)                      # the model's own gates decide
>>> logits, info = engine.apply(images, masks=masks)   # or forced masks, as in model.apply

Three drivers run the same block executor:

* ``planned``: when every gate is forced (``masks`` given for all gates), the counts are
  known before running, and the whole network is one compiled program.
* ``stepwise``: one compiled call per block. Each call also evaluates the next block's
  gates and index lists; the host reads their counts (a small device-to-host copy), picks
  static capacities and calls the next block's program (cached per capacity).
* ``speculative`` (gates decide): the whole network as one program under the plans that
  held for earlier inputs of that shape; it also returns every block's counts, and when one
  does not fit its plan the input is rerun stepwise and the plans grow. Exact either way.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from laud_jax.models.blocks import BlockGates
from laud_jax.models.specs import SPATIAL_MODES, BlockSpec, ModelConfig, NetworkSpec, model_config, network_spec
from laud_jax.sparse import executor
from laud_jax.sparse.backends import BACKENDS, get_ops
from laud_jax.sparse.folding import LAYER_GATE_FUSED, cast_weights, fold_network
from laud_jax.sparse.routing import (
    COUNT_KEYS,
    DEFAULT_CAPACITY_STEPS,
    BlockPlan,
    block_routing,
    counted_keys,
    plan_block,
)

EXECUTIONS = ("auto", "planned", "speculative", "stepwise")
GATE_KEYS = ("spatial", "channel", "layer")


def gate_shapes(spec: BlockSpec, batch: int) -> dict[str, tuple[int, ...]]:
    """Shapes of a block's hard gates (those its mode has)."""
    shapes = {}
    if spec.spatial:
        shapes["spatial"] = (batch, *spec.mask_grid, spec.mask_groups)
    if spec.channel:
        shapes["channel"] = (batch, spec.channel_groups)
    if spec.layer:
        shapes["layer"] = (batch,)
    return shapes


def _jit_key(spec: BlockSpec | None) -> BlockSpec | None:
    """Blocks that differ only in name share compiled programs."""
    return None if spec is None else dataclasses.replace(spec, name="block", index=0, stage=0)


def compute_gates(spec: BlockSpec, gate_params, x: jax.Array, gate_offset: jax.Array, forced) -> dict[str, Any]:
    """The block's gates from the model's own gate modules (eval threshold), forced ones replaced.

    A layer gate that is not forced is evaluated from its folded form (``folding.fold_layer_gate``):
    one reduction over ``x`` (XLA:CPU runs one fused loop where the pool, conv and compare
    took five launches); the model's own layer gate is then unused and compiled away.
    """
    if spec.mode == "static":
        return {}
    forced = forced or {}
    own = {k: v for k, v in gate_params.items() if k != LAYER_GATE_FUSED}
    gates = BlockGates(spec).apply(
        {"params": own}, x, train=False, tau=jnp.asarray(1.0), gate_offset=gate_offset, forced=forced
    )
    if spec.layer and "layer" not in forced:
        gates["layer"] = fused_layer_gate(gate_params[LAYER_GATE_FUSED], x, gate_offset)
    return gates


def fused_layer_gate(fused: Mapping[str, jax.Array], x: jax.Array, gate_offset: jax.Array) -> jax.Array:
    """(B,) hard layer gate: ``sum_hwc x * w + b >= gate_offset`` (see ``folding.fold_layer_gate``)."""
    diff = jnp.sum(x.astype(jnp.float32) * fused["w"], axis=(1, 2, 3)) + fused["b"]
    return (diff >= gate_offset).astype(jnp.float32)


def _routing(spec: BlockSpec, gates: dict[str, Any], batch: int):
    if spec.mode == "static":
        return {}, jnp.zeros((len(COUNT_KEYS),), jnp.int32)
    return block_routing(spec, gates, batch)


def _stem(ops, spec: NetworkSpec, folded: dict[str, Any], images: jax.Array, dtype) -> jax.Array:
    stem = spec.stem[0]
    x = ops.conv(images.astype(dtype), folded["stem_w"], folded["stem_b"], stride=stem.stride, relu=True)
    if len(spec.stem) > 1:
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return x


def _head(folded: dict[str, Any], x: jax.Array) -> jax.Array:
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return pooled @ folded["fc_w"] + folded["fc_b"]


# ----------------------------------------------------------------------------- compiled programs


@functools.partial(jax.jit, static_argnames=("ops", "spec", "first", "dtype"))
def _stem_step(ops, spec: NetworkSpec, first: BlockSpec, dtype, stem_params, gate_params, images, forced, gate_offset):
    x = _stem(ops, spec, stem_params, images, dtype)
    forced, x = lax.optimization_barrier((forced, x))
    gates = compute_gates(first, gate_params, x, gate_offset, forced)
    routing, counts = _routing(first, gates, x.shape[0])
    return x, gates, routing, counts


def _block_step(
    ops,
    spec: BlockSpec,
    plan: BlockPlan,
    following: BlockSpec | None,
    params,
    next_gate_params,
    x,
    gates,
    routing,
    next_forced,
    gate_offset,
    head_params,
):
    out = executor.run_block(ops, spec, plan, params, x, gates, routing)
    if following is None:
        return _head(head_params, out)
    next_forced, out = lax.optimization_barrier((next_forced, out))
    next_gates = compute_gates(following, next_gate_params, out, gate_offset, next_forced)
    next_routing, counts = _routing(following, next_gates, out.shape[0])
    return out, next_gates, next_routing, counts


_STEP_STATIC = ("ops", "spec", "plan", "following")
_block_step_jit = jax.jit(_block_step, static_argnames=_STEP_STATIC)
# Scatter into the block input in place: its buffer is donated (spatial blocks without downsample).
_block_step_in_place = jax.jit(_block_step, static_argnames=_STEP_STATIC, donate_argnames=("x",))


@functools.partial(jax.jit, static_argnames=("ops", "spec", "plans", "dtype"))
def _planned_network(ops, spec: NetworkSpec, plans: tuple[BlockPlan, ...], dtype, folded, images, forced, gate_offset):
    """The whole network as one program under fixed plans; also every block's routing counts."""
    x = _stem(ops, spec, folded, images, dtype)
    counts = []
    for block, plan, params, block_forced in zip(spec.blocks, plans, folded["blocks"], forced):
        # Barriers keep the program a chain: each block's gates and index lists are built
        # after its input and before its compute (see executor.run_block).
        with jax.named_scope(block.name):
            block_forced, x = lax.optimization_barrier((block_forced, x))
            gates = compute_gates(block, params.get("gates"), x, gate_offset, block_forced)
            routing, block_counts = _routing(block, gates, x.shape[0])
            gates, routing, x = lax.optimization_barrier((gates, routing, x))
            x = executor.run_block(ops, block, plan, params, x, gates, routing)
            counts.append(block_counts)
    return _head(folded, x), jnp.stack(counts)


@functools.partial(jax.jit, static_argnames=("spec",))
def _forced_counts(spec: NetworkSpec, forced, batch_array):
    """Routing counts of every block under fully forced masks, and whether each block's are 0/1."""
    batch = batch_array.shape[0]
    counts, binary = [], []
    for block, block_forced in zip(spec.blocks, forced):
        gates = {key: jnp.broadcast_to(block_forced[key], shape) for key, shape in gate_shapes(block, batch).items()}
        counts.append(_routing(block, gates, batch)[1])
        binary.append(jnp.all(jnp.asarray([jnp.all((v == 0) | (v == 1)) for v in block_forced.values()] or [True])))
    return jnp.stack(counts), jnp.stack(binary)


@functools.partial(jax.jit, static_argnames=("ops", "spec", "dtype", "masked"))
def _dense_network(ops, spec: NetworkSpec, dtype, masked: bool, folded, images, forced, gate_offset):
    x = _stem(ops, spec, folded, images, dtype)
    for block, params, block_forced in zip(spec.blocks, folded["blocks"], forced):
        with jax.named_scope(block.name):
            if masked and block.mode != "static":
                gates = compute_gates(block, params["gates"], x, gate_offset, block_forced)
                x = executor.dense_masked_block(ops, block, params, x, gates)
            else:
                x = executor.run_block(ops, block, BlockPlan("dense"), params, x, {}, {})
    return _head(folded, x)


# ----------------------------------------------------------------------------- engine


def _covers(have: BlockPlan, need: BlockPlan) -> bool:
    """Whether a block run under ``have`` computes exactly what ``need`` asks for."""
    if need.run == "skip" or have.run == "dense":
        return have.run != "skip" or need.run == "skip"
    if need.run == "dense":  # the chooser's choice (or a static block): only dense covers it
        return False
    if have.run != "sparse" or have.per_sample != need.per_sample:
        return False
    return all(getattr(have, k) >= getattr(need, k) for k in ("cells", "pixels", "groups", "samples"))


def _limits(spec: NetworkSpec, plans: tuple[BlockPlan, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per block, the largest routing counts (COUNT_KEYS order) ``plans`` cover (inf: any),
    and whether a block's zero cells or samples mean nothing runs (its need is ``skip``)."""
    limits = np.full((len(plans), len(COUNT_KEYS)), np.inf)
    spatial = np.zeros((len(plans),), bool)
    for i, (block, plan) in enumerate(zip(spec.blocks, plans)):
        spatial[i] = block.mode != "static" and block.spatial
        if plan.run == "dense" or block.mode == "static":
            continue
        counted = counted_keys(block)
        for j, key in enumerate(COUNT_KEYS):
            if plan.run == "skip":
                limits[i, j] = -1  # only a need of skip fits
            elif key in counted:
                limits[i, j] = getattr(plan, key)
    return limits, spatial


def _fits(limits, spatial, counts) -> jax.Array:
    """Whether every block's routing counts fit its plan (``_limits``): ``_covers(plan,
    plan_block(counts))`` for all blocks in one vectorized test (a ladder capacity holds a
    count iff count <= it). Traced inside the speculative program (host work right after a
    program pays for XLA:CPU's still-spinning worker threads: ~95 us for this test on 2 cores
    against 8 us alone)."""
    cells, samples = counts[:, COUNT_KEYS.index("cells")], counts[:, COUNT_KEYS.index("samples")]
    need_skip = (samples == 0) | (spatial & (cells == 0))
    return jnp.all(need_skip | jnp.all(counts <= limits, axis=1))


@functools.partial(jax.jit, static_argnames=("ops", "spec", "plans", "dtype"))
def _speculative_network(ops, spec, plans, dtype, folded, images, forced, gate_offset, limits, spatial):
    """``_planned_network`` plus whether its counts fit ``plans`` (``_fits``), in one program."""
    logits, counts = _planned_network(ops, spec, plans, dtype, folded, images, forced, gate_offset)
    return logits, counts, _fits(limits, spatial, counts)


def _merge(have: BlockPlan, need: BlockPlan) -> BlockPlan:
    """The smallest plan covering both (capacities are ladder values, so maxima are too)."""
    if _covers(have, need):
        return have
    if _covers(need, have):
        return need
    return dataclasses.replace(
        need, **{k: max(getattr(have, k), getattr(need, k)) for k in ("cells", "pixels", "groups", "samples")}
    )


@dataclasses.dataclass(frozen=True)
class MaskPlan:
    """Fully forced masks, validated, with every block's static plan: reusable across calls."""

    spec: NetworkSpec
    batch: int
    forced: list[dict[str, Any]]
    plans: tuple[BlockPlan, ...]
    counts: list[dict[str, int] | None]


@dataclasses.dataclass
class BlockTrace:
    """One block as a stepwise run reached it (see :meth:`SparseEngine.trace_blocks`)."""

    spec: BlockSpec
    plan: BlockPlan
    counts: dict[str, int] | None
    params: dict[str, Any]
    x: jax.Array
    gates: dict[str, Any]
    routing: dict[str, Any]


@functools.partial(jax.jit, static_argnames=("ops", "spec", "plan"))
def _one_block(ops, spec: BlockSpec, plan: BlockPlan, params, x, gates, routing):
    return executor.run_block(ops, spec, plan, params, x, gates, routing)


class RunInfo:
    """What one engine call executed: per block, the plan (capacities) and the active counts.

    ``counts`` may be given as a zero-argument callable: the speculative driver reads its
    counts back from the device only when they are asked for (host work right after a
    program is slow while XLA:CPU's worker threads still spin).
    """

    def __init__(
        self,
        execution: str,
        plans: list[BlockPlan],
        counts: list[dict[str, int] | None] | Callable[[], list[dict[str, int] | None]],
    ):
        self.execution = execution
        self.plans = plans
        self._counts = counts

    @property
    def counts(self) -> list[dict[str, int] | None]:
        """Per block the routing counts (COUNT_KEYS), None for static blocks."""
        if callable(self._counts):
            self._counts = self._counts()
        return self._counts

    def __repr__(self) -> str:
        return f"RunInfo(execution={self.execution!r}, plans={self.plans!r}, counts={self.counts!r})"

    @property
    def runs(self) -> tuple[str, ...]:
        """Per block how it ran: ``sparse``, ``dense`` (gated blocks: computed densely, then
        masked) or ``skip``."""
        return tuple(plan.run for plan in self.plans)

    def gated_runs(self) -> dict[str, int]:
        """How many gated (non-static) blocks ran ``sparse``, ``dense`` and ``skip``."""
        gated = [plan.run for plan, counts in zip(self.plans, self.counts) if counts is not None]
        return {run: gated.count(run) for run in ("sparse", "dense", "skip")}


class SparseEngine:
    """Sparse inference for a trained dynamic model (``variables`` from ``model.init``/training).

    ``backend``: ``xla`` (pure JAX), ``pallas`` (GPU kernels; falls back to ``xla`` until
    wired in) or ``dense`` (computes everything and multiplies by the masks: the reference).
    ``capacity_steps``: index lists are padded to a ladder of capacities whose padding is at
    most 1/capacity_steps of the dense work (see ``routing.capacity_ladder``).
    ``latency_profile``: a hardware profile (preset name, ``"local"``, a profile JSON or a
    ``HardwareProfile``) for choosing, per block and plan, between sparse execution and the
    dense block with its masks applied, whichever the latency predictor says is faster
    (``laud_jax.latency.chooser.ExecutionChooser``; ``latency_engine`` names the engine model, default the
    backend's). None: every gated block with work runs sparse.
    """

    def __init__(
        self,
        config: ModelConfig | Mapping[str, Any],
        variables: Mapping[str, Any],
        *,
        backend: str = "xla",
        capacity_steps: int = DEFAULT_CAPACITY_STEPS,
        image_shape: Sequence[int] | None = None,
        latency_profile: Any = None,
        latency_engine: str | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        if capacity_steps < 1:
            raise ValueError(f"capacity_steps must be >= 1, got {capacity_steps}")
        self.config = model_config(config)
        spatial = any(m in SPATIAL_MODES for m in self.config.mode)
        if spatial and self.config.mask_groups != 1 and backend != "dense":
            raise ValueError(
                f"mask_groups={self.config.mask_groups}: spatial masks with several groups are executed "
                "only by backend='dense' (the sparse backends gather one mask per patch)"
            )
        self.backend = backend
        self.ops = get_ops(backend)
        self.capacity_steps = int(capacity_steps)
        self.dtype = jnp.dtype(self.config.dtype)
        self.chooser = None
        if latency_profile is not None and backend != "dense":
            from laud_jax.latency.chooser import ExecutionChooser  # the predictor imports this package

            self.chooser = ExecutionChooser(latency_profile, latency_engine or backend, self.config.dtype)
        self._variables = variables
        self._networks: dict[tuple[int, ...], tuple[NetworkSpec, dict[str, Any]]] = {}
        self._offsets: dict[float, jax.Array] = {}
        self._checked_images: dict[tuple, tuple[NetworkSpec, dict[str, Any], bool]] = {}
        # per (image shape, batch): the kept plans and their _limits
        self._speculation: dict[tuple, tuple[tuple[BlockPlan, ...], np.ndarray, np.ndarray]] = {}
        if image_shape is not None:
            self.network(image_shape)

    # ------------------------------------------------------------------ structure

    def network(self, image_shape: Sequence[int]) -> tuple[NetworkSpec, dict[str, Any]]:
        """The network spec for images of ``image_shape`` (H, W, C) and the folded weights."""
        key = tuple(int(s) for s in image_shape)
        if key not in self._networks:
            spec = network_spec(self.config, key)  # rejects a granularity that does not divide
            folded = fold_network(spec, self._variables)
            folded = {
                **cast_weights({k: v for k, v in folded.items() if k != "fc_w" and k != "fc_b"}, self.dtype),
                "fc_w": folded["fc_w"],
                "fc_b": folded["fc_b"],
            }
            self._networks[key] = (spec, folded)
        return self._networks[key]

    def _check_images(self, images) -> tuple[jax.Array, NetworkSpec, dict[str, Any], bool]:
        """``images`` as a device array, checked once per shape and dtype; the spec, the folded
        weights and whether the network has no gates."""
        if not isinstance(images, jax.Array):  # a device array passes as is (no dispatch per call)
            images = jnp.asarray(images)
        known = self._checked_images.get((images.shape, images.dtype))
        if known is None:
            known = self._checked_images[(images.shape, images.dtype)] = self._new_images(images)
        return images, *known

    def _new_images(self, images: jax.Array) -> tuple[NetworkSpec, dict[str, Any], bool]:
        """Checks of an image shape and dtype not seen before; the spec, the folded weights
        and whether no block has a gate."""
        if images.ndim != 4:
            raise ValueError(f"images must be NHWC (B, H, W, C); got shape {images.shape}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images must be floating point (normalized); got dtype {images.dtype}")
        if images.shape[0] < 1:
            raise ValueError("images has an empty batch")
        try:
            expected_c = self._variables["params"]["stem_conv"]["kernel"].shape[2]
        except (KeyError, TypeError, IndexError, AttributeError):
            expected_c = images.shape[-1]  # malformed variables: network() says what is wrong
        if images.shape[-1] != expected_c:
            raise ValueError(f"images have {images.shape[-1]} channels; the model's stem expects {expected_c}")
        spec, folded = self.network(images.shape[1:])
        return spec, folded, all(b.mode == "static" for b in spec.blocks)

    def _check_masks(self, spec: NetworkSpec, masks, batch: int) -> list[dict[str, Any]]:
        if masks is None:
            return [{}] * len(spec.blocks)  # read-only
        if len(masks) != len(spec.blocks):
            raise ValueError(f"masks has {len(masks)} entries; the network has {len(spec.blocks)} blocks")
        checked = []
        for i, (block, entry) in enumerate(zip(spec.blocks, masks)):
            entry = dict(entry or {})
            shapes = gate_shapes(block, batch)
            for key, value in entry.items():
                if key not in shapes:
                    raise ValueError(
                        f"masks[{i}] forces {key!r}, but block {block.name} (mode {block.mode!r}) has "
                        f"only {sorted(shapes) or 'no'} gates"
                    )
                value = jnp.asarray(value, jnp.float32)
                try:
                    broadcast = np.broadcast_shapes(value.shape, shapes[key])
                except ValueError:
                    broadcast = None
                if broadcast != shapes[key]:
                    raise ValueError(
                        f"masks[{i}][{key!r}] has shape {tuple(value.shape)}; block {block.name} expects "
                        f"{shapes[key]} (or a shape that broadcasts to it)"
                    )
                entry[key] = value
            checked.append(entry)
        return checked

    # ------------------------------------------------------------------ running

    def __call__(self, images, masks=None, gate_offset: float = 0.0) -> jax.Array:
        return self.apply(images, masks=masks, gate_offset=gate_offset)[0]

    def apply(
        self,
        images,
        *,
        masks: Sequence[Mapping[str, Any] | None] | MaskPlan | None = None,
        gate_offset: float = 0.0,
        execution: str = "auto",
    ) -> tuple[jax.Array, RunInfo]:
        """Logits of the dynamic model, executing only the active work; and what ran.

        ``masks`` (one dict per block, as in ``model.apply``, or a :class:`MaskPlan` from
        :meth:`plan_masks`) force gates; unforced gates come from the model's gate modules
        with threshold ``gate_offset``. ``execution``: ``planned`` (needs every gate forced),
        ``speculative``, ``stepwise`` (see the module docstring) or ``auto``: planned when
        every gate is forced, else speculative.
        """
        if execution not in EXECUTIONS:
            raise ValueError(f"unknown execution {execution!r}; choose one of {EXECUTIONS}")
        images, spec, folded, all_static = self._check_images(images)
        batch = images.shape[0]
        offset = self._offset(gate_offset)
        plan = masks if isinstance(masks, MaskPlan) else None
        if plan is not None and (plan.spec != spec or plan.batch != batch):
            raise ValueError(
                f"the MaskPlan was made for batch {plan.batch} and images {plan.spec.image_shape}; "
                f"got batch {batch} and images {tuple(images.shape[1:])}"
            )
        forced = plan.forced if plan is not None else self._check_masks(spec, masks, batch)
        if self.backend == "dense":
            logits = _dense_network(self.ops, spec, self.dtype, True, folded, images, forced, offset)
            return logits, RunInfo("dense", [BlockPlan("dense")] * len(spec.blocks), [None] * len(spec.blocks))
        all_forced = (
            all_static
            if masks is None
            else all(set(gate_shapes(b, batch)) <= set(f) for b, f in zip(spec.blocks, forced))
        )
        if execution == "planned" and not all_forced:
            raise ValueError("execution='planned' needs every gate of every block forced through masks")
        if execution == "planned" or (execution == "auto" and all_forced):
            if plan is None:
                plan = self._plan(spec, forced, batch)
            logits, _ = _planned_network(self.ops, spec, plan.plans, self.dtype, folded, images, forced, offset)
            return logits, RunInfo("planned", list(plan.plans), plan.counts)
        if execution == "stepwise":
            return self._stepwise(spec, folded, images, forced, offset)
        return self._speculative(spec, folded, images, forced, offset)

    def _offset(self, gate_offset: float) -> jax.Array:
        """``gate_offset`` as a device scalar, made once per value (not a transfer per call)."""
        key = float(gate_offset)
        if key not in self._offsets:
            self._offsets[key] = jnp.asarray(key, jnp.float32)
        return self._offsets[key]

    def _speculative(self, spec, folded, images, forced, offset) -> tuple[jax.Array, RunInfo]:
        """Whole network in one program under the plans that held for earlier inputs.

        The program also returns every block's counts and whether each fits its plan (tested
        on the device); if they fit, the result is exact and is returned (the flag and the
        counts read back). Otherwise the input is run stepwise and the plans grow to cover it.
        """
        batch = images.shape[0]
        key = (spec.image_shape, batch)
        kept = self._speculation.get(key)
        if kept is not None:
            plans, limits, spatial = kept
            logits, counts, fits = _speculative_network(
                self.ops, spec, plans, self.dtype, folded, images, forced, offset, limits, spatial
            )
            if fits:
                return logits, RunInfo("speculative", list(plans), functools.partial(self._count_dicts, spec, counts))
        logits, info = self._stepwise(spec, folded, images, forced, offset)
        plans = tuple(info.plans)
        if kept is not None:
            plans = tuple(
                self._choose(b, _merge(have, need), batch) for b, have, need in zip(spec.blocks, kept[0], plans)
            )
        self._speculation[key] = (plans, *(jnp.asarray(a) for a in _limits(spec, plans)))
        return logits, info

    def plan_masks(self, masks: Sequence[Mapping[str, Any]], image_shape: Sequence[int], batch: int) -> MaskPlan:
        """Validate fully forced masks once and fix every block's capacities (for repeated runs)."""
        spec, _ = self.network(image_shape)
        forced = self._check_masks(spec, masks, batch)
        missing = [(b.name, sorted(set(gate_shapes(b, batch)) - set(f))) for b, f in zip(spec.blocks, forced)]
        missing = [m for m in missing if m[1]]
        if missing:
            raise ValueError(f"plan_masks needs every gate forced; missing {missing[:3]}")
        return self._plan(spec, forced, batch)

    def _plan(self, spec: NetworkSpec, forced: list[dict[str, Any]], batch: int) -> MaskPlan:
        counts, binary = _forced_counts(spec, forced, jnp.zeros((batch,)))
        counts, binary = np.asarray(counts), np.asarray(binary)
        if not binary.all():
            i = int(np.argmin(binary))
            raise ValueError(f"masks[{i}] must hold hard 0/1 values")
        plans = tuple(
            self._choose(b, plan_block(b, c, batch, self.capacity_steps), batch) for b, c in zip(spec.blocks, counts)
        )
        return MaskPlan(spec, batch, forced, plans, self._count_dicts(spec, counts))

    def _choose(self, spec: BlockSpec, plan: BlockPlan, batch: int) -> BlockPlan:
        """``plan``, or dense where the chooser predicts the dense block faster than it."""
        return plan if self.chooser is None else self.chooser.choose(spec, plan, batch)

    @staticmethod
    def _count_dict(spec: BlockSpec, counts) -> dict[str, int] | None:
        if spec.mode == "static":
            return None
        return {k: int(v) for k, v in zip(COUNT_KEYS, np.asarray(counts))}

    @staticmethod
    def _count_dicts(spec: NetworkSpec, counts) -> list[dict[str, int] | None]:
        """``_count_dict`` of every block from one (blocks, keys) array, read back once."""
        rows = np.asarray(counts).tolist()
        return [None if b.mode == "static" else dict(zip(COUNT_KEYS, r)) for b, r in zip(spec.blocks, rows)]

    def _stepwise(self, spec, folded, images, forced, offset, record: list | None = None) -> tuple[jax.Array, RunInfo]:
        blocks = spec.blocks
        x, gates, routing, counts = _stem_step(
            self.ops,
            spec,
            _jit_key(blocks[0]),
            self.dtype,
            {"stem_w": folded["stem_w"], "stem_b": folded["stem_b"]},
            folded["blocks"][0].get("gates"),
            images,
            forced[0],
            offset,
        )
        plans, count_log = [], []
        batch = images.shape[0]
        for i, block in enumerate(blocks):
            host_counts = None if block.mode == "static" else np.asarray(counts)  # the host round trip
            plan = self._choose(block, plan_block(block, host_counts, batch, self.capacity_steps), batch)
            plans.append(plan)
            count_log.append(self._count_dict(block, host_counts) if host_counts is not None else None)
            last = i + 1 == len(blocks)
            following = None if last else blocks[i + 1]
            in_place = plan.run == "sparse" and block.spatial and not block.downsample and not plan.per_sample
            if record is not None:
                record.append(BlockTrace(block, plan, count_log[-1], folded["blocks"][i], x, gates, routing))
                in_place = False  # keep the recorded input alive
            step = _block_step_in_place if in_place else _block_step_jit
            result = step(
                self.ops,
                _jit_key(block),
                plan,
                _jit_key(following),
                folded["blocks"][i],
                None if last else folded["blocks"][i + 1].get("gates"),
                x,
                gates,
                routing,
                None if last else forced[i + 1],
                offset,
                {"fc_w": folded["fc_w"], "fc_b": folded["fc_b"]},
            )
            if last:
                return result, RunInfo("stepwise", plans, count_log)
            x, gates, routing, counts = result
        raise AssertionError("unreachable")

    def trace_blocks(self, images, *, masks=None, gate_offset: float = 0.0) -> list[BlockTrace]:
        """Each block's input, gates, index lists and plan, as a stepwise run meets them."""
        images, spec, folded, _ = self._check_images(images)
        batch = images.shape[0]
        forced = masks.forced if isinstance(masks, MaskPlan) else self._check_masks(spec, masks, batch)
        record: list[BlockTrace] = []
        self._stepwise(spec, folded, images, forced, self._offset(gate_offset), record)
        return record

    def block_program(self, trace: BlockTrace, *, dense: bool = False):
        """A zero-argument callable running one traced block alone: sparse as planned, or dense."""
        plan = BlockPlan("dense") if dense else trace.plan
        fn = functools.partial(_one_block, self.ops, _jit_key(trace.spec), plan)
        gates, routing = ({}, {}) if dense else (trace.gates, trace.routing)
        return lambda: fn(trace.params, trace.x, gates, routing)

    def apply_static(self, images) -> jax.Array:
        """Logits of the static network (every gate ignored), dense, BN folded: the baseline."""
        images, spec, folded, _ = self._check_images(images)
        forced = self._check_masks(spec, None, images.shape[0])
        return _dense_network(self.ops, spec, self.dtype, False, folded, images, forced, self._offset(0.0))

"""The sparse engine's per-block choice between sparse and masked-dense execution, from the
latency predictor, and the predictor's setting for a block at given routing counts."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from laud_jax.latency.launches import BlockSetting, BlockShape, block_setting, get_engine, static_twin
from laud_jax.latency.predictor import block_masker_time, block_time
from laud_jax.latency.profiles import get_profile
from laud_jax.models.specs import BlockSpec
from laud_jax.sparse.routing import BlockPlan, count_totals, counted_keys


def setting_at_counts(spec: BlockSpec, counts: Mapping[str, float], batch: int, dtype: str) -> BlockSetting:
    """The predictor's setting for a dynamic block whose routing counts (``cells``,
    ``pixels``, ``groups``, ``samples``, each out of ``routing.count_totals``) are ``counts``."""
    totals = count_totals(spec, batch)
    keys = {"cells": "rho_spatial", "pixels": "rho_conv1", "groups": "rho_channel", "samples": "rho_layer"}
    rates = {keys[k]: min(1.0, max(0.0, counts[k] / totals[k])) for k in counted_keys(spec)}
    return block_setting(
        spec.mode,
        spec.granularity,
        channel_granularity=spec.channel_granularity,
        mask_groups=spec.mask_groups,
        batch=batch,
        dtype=dtype,
        **rates,
    )


class ExecutionChooser:
    """Sparse or masked-dense per block, from the latency predictor.

    A block runs sparse where the predicted time of its sparse execution at the planned
    capacities is below that of its static (dense) twin. The maskers, gates and index lists
    run in either case (the drivers need the counts), so they are left out of the sparse
    side. Predictions are made on the host CPU and cached per (block shape, plan, batch):
    the capacity ladder keeps the number of distinct queries small.

    ``profile``: a ``HardwareProfile``, a preset name, ``"local"`` (the fitted profile) or a
    profile JSON path. ``engine``: the engine model's name (``laud_jax.latency.ENGINES``).
    """

    def __init__(self, profile: Any, engine: str, dtype: str = "float32"):
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self.engine = get_engine(engine)
        self.engine_name = engine
        self.dtype = str(dtype)
        self._times: dict[tuple, tuple[float, float]] = {}

    def predicted_ms(self, spec: BlockSpec, plan: BlockPlan, batch: int) -> tuple[float, float]:
        """(sparse, dense) predicted milliseconds of the block's work under ``plan`` (cached)."""
        key = (dataclasses.replace(spec, name="block", index=0, stage=0), plan, int(batch))
        if key not in self._times:
            with jax.default_device(jax.devices("cpu")[0]):  # never a round trip to an accelerator
                setting = _planned_setting(spec, plan, int(batch), self.dtype)
                sparse, dense = _sparse_and_dense_times(
                    self.profile.as_arrays(), self.engine.as_arrays(), BlockShape.from_specs([spec]), setting
                )
                self._times[key] = (1e3 * float(sparse[0]), 1e3 * float(dense[0]))
        return self._times[key]

    def choose(self, spec: BlockSpec, plan: BlockPlan, batch: int) -> BlockPlan:
        """``plan``, or ``dense`` where a ``sparse`` plan is predicted no faster than dense."""
        if plan.run != "sparse":
            return plan
        sparse, dense = self.predicted_ms(spec, plan, batch)
        return plan if sparse < dense else BlockPlan("dense")


def _planned_setting(spec: BlockSpec, plan: BlockPlan, batch: int, dtype: str):
    """The predictor's setting whose ladder-padded counts are the plan's capacities.

    Each count is capacity - 1/2: the predictor rounds an expected count up to a whole unit
    and pads it to the ladder, which maps a ladder value to itself. At batch 1 the predictor
    reads the layer rate as the odds of running, and a sparse plan runs.
    """
    counts = {k: getattr(plan, k) - 0.5 for k in ("cells", "pixels", "groups", "samples")}
    if batch == 1:
        counts["samples"] = 1.0
    setting = setting_at_counts(spec, counts, batch, dtype)
    return jax.tree.map(lambda leaf: leaf[None], setting)


@jax.jit
def _sparse_and_dense_times(profile, engine, shapes, settings):
    """Per block: predicted seconds of the sparse execution without the maskers, gates and
    index lists (run either way), and of the static block (its static twin)."""

    def one(shape, setting):
        sparse = block_time(profile, engine, shape, setting) - block_masker_time(profile, engine, shape, setting)
        return sparse, block_time(profile, engine, shape, static_twin(setting))

    return jax.vmap(one)(shapes, settings)

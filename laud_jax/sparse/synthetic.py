"""Synthetic inputs for benchmarks and tests: random weights, forced masks of exact density."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from laud_jax.models.specs import NetworkSpec


def _exact(rng: np.random.Generator, batch: int, units: int, rate: float) -> np.ndarray:
    """(batch, units) 0/1 rows with exactly round(rate * units) ones each, at random places."""
    on = int(round(rate * units))
    rows = np.zeros((batch, units), np.float32)
    for row in rows:
        row[rng.permutation(units)[:on]] = 1.0
    return rows


def random_masks(
    spec: NetworkSpec, batch: int, rate: float, *, channel_rate: float | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """One dict of hard masks per block (the ``masks`` argument of ``model.apply``).

    Spatial masks: each block and sample gets exactly round(rate * cells) active cells of
    its mask grid. Channel masks: round(channel_rate * G_c) active groups (channel_rate
    defaults to rate). Layer gates: each sample executes exactly round(rate * n) of the n
    blocks that have a layer gate, chosen at random.
    """
    for name, value in (("rate", rate), ("channel_rate", channel_rate)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    channel_rate = rate if channel_rate is None else channel_rate
    rng = np.random.default_rng(seed)
    masks: list[dict[str, Any]] = []
    for block in spec.blocks:
        entry: dict[str, Any] = {}
        if block.spatial:
            gh, gw = block.mask_grid
            cells = _exact(rng, batch * block.mask_groups, gh * gw, rate)
            entry["spatial"] = cells.reshape(batch, block.mask_groups, gh, gw).transpose(0, 2, 3, 1)
        if block.channel:
            entry["channel"] = _exact(rng, batch, block.channel_groups, channel_rate)
        masks.append(entry)
    gated = [i for i, block in enumerate(spec.blocks) if block.layer]
    if gated:
        layer = _exact(rng, batch, len(gated), rate)
        for column, i in enumerate(gated):
            masks[i]["layer"] = layer[:, column]
    return masks


def random_variables(
    model, image_shape: Sequence[int], seed: int = 0, *, random_bn: bool = False, gate_bias: float | None = None
) -> dict[str, Any]:
    """Variables of ``model`` drawn in numpy (no compiled init): He-normal kernels.

    Batch norm is the identity, or random statistics and affine terms with ``random_bn``
    (so folding is exercised). Gate biases keep the gates' execute-leaning init (+1 on
    the execute logits) unless ``gate_bias`` sets them all.
    """
    shapes = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, *image_shape), jnp.float32))
    )
    rng = np.random.default_rng(seed)

    def make(path, leaf):
        name = jax.tree_util.keystr(path)
        shape = leaf.shape
        gate_logits = any(k in name for k in ("'masker_spatial'", "'fc2'", "'layer_gate'"))
        if "'gates'" in name and "'bias'" in name and gate_logits:
            if gate_bias is not None:
                return np.full(shape, gate_bias, np.float32)
            half = shape[0] // 2
            return np.concatenate([np.ones(half), np.zeros(shape[0] - half)]).astype(np.float32)
        if "'var'" in name or "'scale'" in name:
            return rng.uniform(0.5, 1.5, shape).astype(np.float32) if random_bn else np.ones(shape, np.float32)
        if "'mean'" in name or "'bias'" in name:
            return (0.2 * rng.standard_normal(shape)).astype(np.float32) if random_bn else np.zeros(shape, np.float32)
        fan_in = int(np.prod(shape[:-1]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(make, shapes)

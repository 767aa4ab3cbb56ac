"""Forced masks of an exact density, for benchmarks and tests without a trained model."""

from __future__ import annotations

from typing import Any

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

"""One constructor for every model: configs, converters and the sparse engine share it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from laud_jax.models.network import DynamicNet
from laud_jax.models.specs import ModelConfig, model_config


def build_model(cfg: ModelConfig | Mapping[str, Any] | None = None, **overrides: Any) -> DynamicNet:
    """Build a model from a config dict / ConfigDict / ModelConfig, plus keyword overrides.

    >>> model = build_model(arch="resnet50", mode="spatial", granularity=(4, 4, 2, 1))
    """
    if isinstance(cfg, ModelConfig):
        cfg = cfg.to_dict()
    merged = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else (cfg or {}))
    merged.update(overrides)
    return DynamicNet(model_config(merged))


def init_variables(
    model: DynamicNet, seed: int | jax.Array, image_shape: Sequence[int], batch: int = 1
) -> dict[str, Any]:
    """Initialize ``params`` and ``batch_stats`` for images of ``image_shape`` (H, W, C).

    An integer ``seed`` draws the initial weights with the ``rbg`` generator, whose bit
    generation XLA compiles about 3x faster than threefry's on CPU (initialization of a
    large network otherwise takes longer to compile than to train a step); a key array is
    used as given.
    """
    key = jax.random.key(seed, impl="rbg") if isinstance(seed, int) else seed
    images = jnp.zeros((batch, *image_shape), jnp.float32)
    return jax.jit(lambda k: model.init({"params": k}, images, train=False))(key)

"""Dynamic ResNet / RegNetY models (LASNet, LAUDNet, LC-Net) and their static structure."""

from laud_jax.models.network import DynamicNet
from laud_jax.models.registry import build_model, init_variables
from laud_jax.models.specs import (
    ARCHS,
    MODEL_CONFIG_KEYS,
    MODES,
    BlockSpec,
    LayerSpec,
    ModelConfig,
    NetworkSpec,
    model_config,
    network_spec,
)

__all__ = [
    "ARCHS",
    "MODEL_CONFIG_KEYS",
    "MODES",
    "BlockSpec",
    "DynamicNet",
    "LayerSpec",
    "ModelConfig",
    "NetworkSpec",
    "build_model",
    "init_variables",
    "model_config",
    "network_spec",
]

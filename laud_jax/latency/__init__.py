"""Latency predictor of dynamic networks: hardware profiles, the sparse engine's kernels as
roofline work records, per-block and whole-network latency, granularity search, calibration.

>>> from laud_jax.latency import PRESETS, predict
>>> from laud_jax.models import network_spec
>>> spec = network_spec({"arch": "resnet101", "mode": "spatial", "granularity": (4, 4, 2, 1)}, (224, 224))
>>> predict(spec, PRESETS["v100"], "pallas", rho=0.5, batch=128).latency_ratio
"""

from laud_jax.latency.launches import (
    ENGINES,
    BlockSetting,
    BlockShape,
    EngineModel,
    block_launches,
    block_macs,
    block_setting,
    dilated_density,
)
from laud_jax.latency.predictor import Prediction, block_time, grid_block_times, grid_network_times, predict
from laud_jax.latency.profiles import PRESETS, HardwareProfile, get_profile, profile_from_json, profile_to_json
from laud_jax.latency.roofline import launch_times, total_time
from laud_jax.latency.search import Hardware, SearchResult, resolve_hardware, search, search_config

__all__ = [
    "ENGINES",
    "PRESETS",
    "BlockSetting",
    "BlockShape",
    "EngineModel",
    "Hardware",
    "HardwareProfile",
    "Prediction",
    "SearchResult",
    "block_launches",
    "block_macs",
    "block_setting",
    "block_time",
    "dilated_density",
    "get_profile",
    "grid_block_times",
    "grid_network_times",
    "launch_times",
    "predict",
    "profile_from_json",
    "profile_to_json",
    "resolve_hardware",
    "search",
    "search_config",
    "total_time",
]

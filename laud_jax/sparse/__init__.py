"""Sparse inference engine: hard masks -> index lists -> gather / compute / scatter."""

from laud_jax.sparse.backends import BACKENDS, get_ops
from laud_jax.sparse.engine import MaskPlan, RunInfo, SparseEngine, gate_shapes
from laud_jax.sparse.routing import BlockPlan, capacity, capacity_ladder

__all__ = [
    "BACKENDS",
    "BlockPlan",
    "MaskPlan",
    "RunInfo",
    "SparseEngine",
    "capacity",
    "capacity_ladder",
    "gate_shapes",
    "get_ops",
]

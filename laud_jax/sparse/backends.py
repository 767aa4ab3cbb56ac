"""Backend dispatch: the one place that maps a backend name to its compute primitives.

``xla``: :class:`~laud_jax.sparse.xla_ops.XlaOps` (pure JAX, the CPU path). ``dense``: the
masked dense reference; it computes with the same primitives but never skips work.
``pallas``: the GPU kernels, from ``laud_jax.sparse.pallas_ops.PallasOps`` once that module
exists; until then it falls back to ``xla`` with a warning.
"""

from __future__ import annotations

import functools
import importlib
import warnings

from laud_jax.sparse.xla_ops import XlaOps

BACKENDS = ("xla", "pallas", "dense")


@functools.cache
def get_ops(backend: str):
    """The primitives object of ``backend`` (one shared instance per backend: a jit cache key)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "pallas":
        try:
            module = importlib.import_module("laud_jax.sparse.pallas_ops")
        except ModuleNotFoundError as err:
            if err.name != "laud_jax.sparse.pallas_ops":
                raise
            warnings.warn(
                "backend='pallas' has no kernels wired in yet (laud_jax/sparse/pallas_ops.py is "
                "missing); running backend='xla' instead",
                stacklevel=3,
            )
            return XlaOps()
        return module.PallasOps()
    return XlaOps()

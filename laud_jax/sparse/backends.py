"""Backend dispatch: the one place that maps a backend name to its compute primitives.

``xla``: :class:`~laud_jax.sparse.xla_ops.XlaOps` (pure JAX, the CPU path). ``dense``: the
masked dense reference; it computes with the same primitives but never skips work.
``pallas``: the GPU kernels, :class:`~laud_jax.sparse.pallas_ops.PallasOps` (imported on
first use, so that the other backends never load Pallas).
"""

from __future__ import annotations

import functools

from laud_jax.sparse.xla_ops import XlaOps

BACKENDS = ("xla", "pallas", "dense")


@functools.cache
def get_ops(backend: str):
    """The primitives object of ``backend`` (one shared instance per backend: a jit cache key)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "pallas":
        from laud_jax.sparse.pallas_ops import PallasOps

        return PallasOps()
    return XlaOps()

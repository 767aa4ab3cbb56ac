"""The ``pallas`` backend: the sparse engine's gather/scatter primitives as Pallas GPU kernels.

:class:`PallasOps` overrides the three fused primitives of
:class:`~laud_jax.sparse.xla_ops.XlaOps` with the kernels of ``pallas_kernels/``
(docs/kernels.md): conv1 on gathered pixels (``gather_matmul``), conv2 on the active
patches reading conv1's compact rows through routing's per-pixel row map (``patch_conv``), and
conv3 + residual + relu written into the block output at the active patches only
(``conv1x1_scatter_add``, aliasing the output buffer). Everything else (dense convs, the
downsample branch, grouped conv2, per-sample SE biases, channel-gathered dense convs)
stays on the xla primitives. Without a GPU the kernels run in interpret mode: correct
but slow, and a one-time warning says so.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp

from laud_jax.sparse.xla_ops import XlaOps
from pallas_kernels.conv1x1_scatter_add import conv1x1_scatter_add
from pallas_kernels.gather_matmul import gather_matmul
from pallas_kernels.patch_conv import patch_conv

_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _default_implementation() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "interpret"


@functools.cache
def _warn_interpret() -> None:
    warnings.warn(
        "backend='pallas' without a GPU: the Pallas kernels run in interpret mode (correct "
        "but slow); use backend='xla' for speed on CPU",
        stacklevel=2,
    )


def _kernel_ready(x: jax.Array, w: jax.Array) -> bool:
    """The kernels take float32 or bfloat16 activations with weights of the same dtype."""
    return x.dtype in _KERNEL_DTYPES and w.dtype == x.dtype


@dataclasses.dataclass(frozen=True)
class PallasOps(XlaOps):
    """XlaOps with the gather-fused conv1, patch conv2 and scatter-fused conv3 as kernels.

    ``implementation``: ``pallas`` (Triton GPU kernels) or ``interpret`` (the same kernels
    on CPU); by default ``pallas`` when JAX's default backend is a GPU.
    """

    name: str = "pallas"
    implementation: str = dataclasses.field(default_factory=_default_implementation)

    def _kernels(self) -> str:
        if self.implementation == "interpret":
            _warn_interpret()
        return self.implementation

    def gather_matmul(self, src, taps, w, b, *, relu):
        if not _kernel_ready(src, w):
            return super().gather_matmul(src, taps, w, b, relu=relu)
        return gather_matmul(src, taps, w, b, relu=relu, implementation=self._kernels())

    def patch_conv(self, rows, row_map, starts, w, b, *, grid, size, stride, groups, relu):
        if groups != 1 or not _kernel_ready(rows, w):
            return super().patch_conv(
                rows, row_map, starts, w, b, grid=grid, size=size, stride=stride, groups=groups, relu=relu
            )
        return patch_conv(
            rows,
            row_map,
            starts,
            w,
            b,
            grid=grid,
            size=size,
            stride=stride,
            relu=relu,
            implementation=self._kernels(),
        )

    def conv3_scatter(self, h, w, b, identity, base, starts, cells, count, *, in_place):
        if b.ndim != 1 or not _kernel_ready(h, w) or identity.dtype != h.dtype:
            return super().conv3_scatter(h, w, b, identity, base, starts, cells, count, in_place=in_place)
        # routing's flat patch indices: the kernel's patch list as it is (no index op here)
        return conv1x1_scatter_add(
            h,
            cells,
            count,
            w,
            b,
            identity,
            base=None if in_place else base,
            implementation=self._kernels(),
        )

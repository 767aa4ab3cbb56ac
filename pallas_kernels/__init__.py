"""Pallas GPU kernels for sparse (masked) execution: generic array ops, one op per module,
each beside its pure-jnp reference `<kernel>_reference`. Import them from their modules,
e.g. `from pallas_kernels.patch_conv import patch_conv`; see docs/kernels.md.

- gather_matmul: act(concat_k src[taps[:, k]] @ w + b) on gathered rows (conv1)
- patch_conv: 3x3 conv (stride 1/2) of a sparse map on listed S x S patches (conv2)
- conv1x1_scatter_add: 1x1 conv + bias + residual + relu scattered into the identity (conv3)
- channel_gather_matmul: matmul over the active channel groups of each sample

The first three are what the sparse engine's `backend="pallas"` launches
(laud_jax/sparse/pallas_ops.py). This package imports nothing from laud_jax.
"""

from pallas_kernels._common import IMPLEMENTATIONS, Implementation, TileConfig

__all__ = ["IMPLEMENTATIONS", "Implementation", "TileConfig"]

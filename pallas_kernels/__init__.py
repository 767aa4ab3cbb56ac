"""Pallas GPU kernels for sparse (masked) bottleneck execution, each beside its
pure-jnp reference. Import the kernels from their modules, e.g.
`from pallas_kernels.gather_conv3x3 import gather_conv3x3`; see docs/kernels.md.

- gather_conv1x1: gather dilated active pixels + 1x1 conv + bias + relu (conv1)
- gather_conv3x3: 3x3 conv (stride 1/2) on active S x S patches with halo (conv2)
- conv1x1_scatter_add: 1x1 conv + bias + residual + relu scattered into the identity (conv3)
- channel_gather_matmul: matmul over the active channel groups of each sample
"""

from pallas_kernels._common import IMPLEMENTATIONS, Implementation, TileConfig

__all__ = ["IMPLEMENTATIONS", "Implementation", "TileConfig"]

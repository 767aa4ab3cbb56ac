"""laud_jax: latency-aware dynamic networks (LASNet, LAUDNet, LC-Net) in JAX/Flax.

Importing the package is cheap; import the subpackages you need
(``laud_jax.models``, ``laud_jax.data``, ``laud_jax.train``, ...).
"""

__version__ = "0.1.0"

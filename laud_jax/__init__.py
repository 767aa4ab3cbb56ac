"""laud_jax: latency-aware dynamic networks (LASNet, LAUDNet, LC-Net) in JAX/Flax.

Importing the package is cheap; import the subpackages you need
(``laud_jax.models``, ``laud_jax.data``, ``laud_jax.train``, ...).
``laud_jax.load_pretrained`` imports the converter on first use; a checkpoint directory it
cannot read raises ``laud_jax.CheckpointError`` (a ``ValueError`` whose one-line message names
the file and what to do).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy top-level API."""
    if name == "load_pretrained":
        from laud_jax.convert import load_pretrained

        return load_pretrained
    if name == "CheckpointError":
        from laud_jax.checkpointing import CheckpointError

        return CheckpointError
    raise AttributeError(f"module 'laud_jax' has no attribute {name!r}")

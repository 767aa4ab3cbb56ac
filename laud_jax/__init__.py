

def __getattr__(name: str):
    """Lazy top-level API: ``laud_jax.load_pretrained`` imports the converter on first use."""
    if name == "load_pretrained":
        from laud_jax.convert import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'laud_jax' has no attribute {name!r}")

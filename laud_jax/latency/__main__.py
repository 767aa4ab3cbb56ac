"""``python -m laud_jax.latency predict|search|calibrate``."""

import sys

from laud_jax.latency.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])

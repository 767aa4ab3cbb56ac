"""The quickstart with hand-picked spatial masks (the published LASNet setting) instead of the
latency search's choice: S = 2/2/1/1, stage grids 32/16/8/4 -> mask grids 16/8/8/4.

configs/quickstart.py otherwise. The dynamic model whose masks `laud_jax.visualize` draws
(docs/quickstart_masks.png).
  python -m laud_jax.train --exp configs/quickstart_spatial.py --workdir runs/quickstart_spatial
"""

import os

from laud_jax.config_utils import load_config_file


def get_config():
    config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
    config.model.mode = "spatial"
    config.model.granularity = (2, 2, 1, 1)
    return config

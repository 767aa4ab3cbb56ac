"""The quickstart with the dynamic granularity chosen by the latency search before training.

configs/quickstart.py, except model.mode and model.granularity = 'auto': the trainer
searches them for latency.hardware (the fitted local profile; without one, the
latency.fallback_hardware preset, with a warning) at loss.target_rate and records the
choice in WORKDIR/search.json and summary.json.
  python -m laud_jax.train --exp configs/quickstart_auto.py --workdir runs/quickstart_auto
  python -m laud_jax.latency search --exp configs/quickstart_auto.py   # the same search, printed
"""

import os

from laud_jax.config_utils import AUTO, load_config_file


def get_config():
    config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
    config.model.mode = AUTO
    config.model.granularity = AUTO
    return config

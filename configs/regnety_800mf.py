"""Spatially dynamic RegNetY-800MF on ImageNet (t = 0.5).

RegNetY stage grids at 224: 56/28/14/7 (every stage has stride 2 after a stride-2 stem).
  python -m laud_jax.train --exp configs/regnety_800mf.py --workdir runs/regnety_800mf
"""

from laud_jax.config_utils import imagenet_config


def get_config():
    return imagenet_config("regnety_800mf")

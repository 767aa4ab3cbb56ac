"""LAUDNet-style spatially dynamic ResNet-101 on ImageNet (t = 0.5, S = 4/4/2/1).

  python -m laud_jax.train --exp configs/resnet101.py --workdir runs/resnet101 \
      --exp.data.data_dir=/path/to/tensorflow_datasets
"""

from laud_jax.config_utils import imagenet_config


def get_config():
    return imagenet_config("resnet101")

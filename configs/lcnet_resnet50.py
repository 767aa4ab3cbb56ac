"""LC-Net on ResNet-50 / ImageNet: per-input layer skipping + channel skipping with scales.

python -m laud_jax.train --exp configs/lcnet_resnet50.py --workdir runs/lcnet_resnet50
"""

from laud_jax.config_utils import imagenet_config


def get_config():
    config = imagenet_config("resnet50", mode="lc")
    config.model.channel_granularity = 2
    return config

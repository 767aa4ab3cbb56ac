"""Quickstart: embedded cluttered MNIST (64x64), resnet_small, CPU, minutes on 2 cores.

Trains a static teacher (WORKDIR/teacher), then a spatially dynamic model initialized
from it and distilled from it, at target MAC rate 0.5 (WORKDIR).
  python -m laud_jax.train --exp configs/quickstart.py --workdir runs/quickstart
"""

from laud_jax.config_utils import base_config


def get_config():
  config = base_config()
  config.model.arch = 'resnet_small'
  config.model.mode = 'spatial'
  config.model.granularity = (4, 4, 2, 1)   # stage grids 32/16/8/4 -> mask grids 8/4/4/4
  config.data.name = 'cluttered_mnist'
  config.data.image_size = 64
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 4.0

  config.teacher.source = 'train'
  config.teacher.num_epochs = 8.0
  config.teacher.optimizer.name = 'adamw'
  config.teacher.optimizer.learning_rate = 3e-3
  config.teacher.optimizer.lr_reference_batch = 0
  config.teacher.optimizer.warmup_steps = 50
  config.teacher.optimizer.weight_decay = 1e-4

  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.lr_reference_batch = 0
  config.optimizer.warmup_steps = 20
  config.optimizer.weight_decay = 1e-4

  config.loss.target_rate = 0.5
  config.loss.sparsity_weight = 10.0
  config.loss.kd_alpha = 0.5
  config.loss.kd_temperature = 4.0
  config.gumbel.tau_start = 5.0
  config.gumbel.tau_end = 0.1
  config.checkpoint.every_steps = 100
  config.checkpoint.keep = 2
  config.log_every_steps = 10
  return config

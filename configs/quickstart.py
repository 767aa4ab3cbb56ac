"""Quickstart: embedded cluttered MNIST (64x64), resnet_small, CPU, minutes on 2 cores.

Phase 1 trains a static teacher (WORKDIR/teacher). Phase 2 trains the spatially dynamic
model at target MAC rate t = 0.5 (WORKDIR), initialized from the teacher and distilled
from it.
  python -m laud_jax.train --exp configs/quickstart.py --workdir runs/quickstart
"""

from laud_jax.config_utils import base_config


def get_config():
  config = base_config()
  config.model.arch = 'resnet_small'
  # Half the default widths: twice the images per second on 2 CPU cores.
  config.model.stage_widths = (8, 16, 32, 64)
  config.model.stem_width = 16
  config.model.zero_init_residual = True
  config.model.mode = 'spatial'
  config.model.granularity = (4, 4, 2, 1)   # stage grids 32/16/8/4 -> mask grids 8/4/4/4
  config.data.name = 'cluttered_mnist'
  config.data.image_size = 64
  config.batch_size = 64
  config.eval_batch_size = 500

  # Phase 1: static teacher.
  config.teacher.source = 'train'
  config.teacher.num_epochs = 30.0
  config.teacher.optimizer.name = 'adamw'
  config.teacher.optimizer.learning_rate = 5e-3
  config.teacher.optimizer.lr_reference_batch = 0
  config.teacher.optimizer.warmup_steps = 60
  config.teacher.optimizer.weight_decay = 1e-4

  # Phase 2: dynamic model, from the teacher's weights, distilled from it.
  config.num_epochs = 5.0
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.lr_reference_batch = 0
  config.optimizer.warmup_steps = 20
  config.optimizer.weight_decay = 1e-4
  config.loss.target_rate = 0.5
  config.loss.sparsity_weight = 2.0
  config.loss.bound_relax_fraction = 3.0    # keep per-block bounds: no block switched off whole
  config.loss.kd_alpha = 1.0
  config.loss.kd_temperature = 4.0
  config.gumbel.tau_start = 5.0
  config.gumbel.tau_end = 0.1

  config.checkpoint.every_steps = 200
  config.checkpoint.keep = 2
  config.log_every_steps = 10
  return config

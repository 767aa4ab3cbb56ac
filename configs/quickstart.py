"""Quickstart: embedded cluttered MNIST (64x64), resnet_small, CPU, minutes on 2 cores.

Before training, the latency search picks the dynamic mode and granularity per stage for
this machine at batch 1 (the local profile; fitted first when missing, ~4 min). Phase 1
trains a static teacher (WORKDIR/teacher). Phase 2 trains the dynamic model at target MAC
rate t = 0.5 (WORKDIR), initialized from the teacher and distilled from it.
  python -m laud_jax.train --exp configs/quickstart.py --workdir runs/quickstart
  python -m laud_jax.latency search --exp configs/quickstart.py   # the search alone, printed
  configs/quickstart_spatial.py: the hand-picked spatial masks (S = 2/2/1/1) instead
"""

from laud_jax.config_utils import AUTO, base_config


def get_config():
    config = base_config()
    config.model.arch = "resnet_small"
    # Half the default widths (twice the images per second on 2 CPU cores), two blocks in the
    # high-resolution stages and a stem as wide as stage 1's output (no downsample conv there):
    # most MACs sit where the digit is small against the canvas, so masks can save them.
    config.model.stage_widths = (8, 16, 32, 64)
    config.model.stage_depths = (2, 2, 2, 1)
    config.model.stem_width = 32
    config.model.zero_init_residual = True
    # Chosen by the latency search (laud_jax.latency) before training, for batch 1 on the
    # local profile; candidates: latency.modes x latency.granularities.
    config.model.mode = AUTO
    config.model.granularity = AUTO
    # If the search picks spatial masks: the masker sees its pooled features standardized over
    # the mask grid (on mostly blank canvases, plain pooled features let the sparsity push
    # switch off the digit first).
    config.model.masker_input = "standardized"
    config.latency.hardware = "local"
    config.latency.calibrate_configs = 48  # no local profile yet: fit one first (~4 min)
    config.latency.batch = 1
    config.data.name = "cluttered_mnist"
    config.data.image_size = 64
    config.batch_size = 64
    config.eval_batch_size = 500

    # Phase 1: static teacher.
    config.teacher.source = "train"
    config.teacher.num_epochs = 30.0
    config.teacher.optimizer.name = "adamw"
    config.teacher.optimizer.learning_rate = 5e-3
    config.teacher.optimizer.lr_reference_batch = 0
    config.teacher.optimizer.warmup_steps = 60
    config.teacher.optimizer.weight_decay = 1e-4

    # Phase 2: dynamic model, from the teacher's weights, distilled from it.
    config.num_epochs = 12.0
    config.optimizer.name = "sgd"
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.optimizer.learning_rate = 0.02
    config.optimizer.lr_reference_batch = 0
    config.optimizer.warmup_steps = 20
    config.optimizer.weight_decay = 5e-5
    config.optimizer.grad_clip_norm = 2.0  # hard-mask flips late in training spike the gradient
    config.loss.target_rate = 0.5
    config.loss.sparsity_weight = 10.0
    config.loss.bound_relax_fraction = 0.33
    config.loss.kd_alpha = 0.5
    config.loss.kd_temperature = 4.0
    config.gumbel.tau_start = 5.0
    config.gumbel.tau_end = 0.1

    config.checkpoint.every_steps = 200
    config.checkpoint.keep = 2
    config.log_every_steps = 10
    return config

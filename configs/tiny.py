"""Smoke-test config: resnet_tiny on 32x32 embedded canvases, a few steps (tests, CI)."""

from laud_jax.config_utils import base_config


def get_config():
    config = base_config()
    config.model.arch = "resnet_tiny"
    config.model.mode = "spatial"
    config.model.granularity = (4, 4, 2, 1)  # stage grids 16/8/4/2
    config.data.image_size = 32
    config.data.num_clutter = 0  # digits at random positions, no clutter: learns in a few steps
    config.data.test_copies = 1
    config.batch_size = 32
    config.eval_batch_size = 200
    config.num_steps = 24
    config.optimizer.name = "sgd"  # plain SGD: equal gradients give equal updates
    config.optimizer.learning_rate = 0.1
    config.optimizer.lr_reference_batch = 0
    config.loss.kd_alpha = 0.0
    config.loss.sparsity_weight = 1.0
    config.checkpoint.every_steps = 3
    config.checkpoint.keep = 8
    config.log_every_steps = 4
    config.progress_bar = False
    return config

"""Config files and validation: every bad input is a clear error before any compute."""

import glob
import os

import jax
import numpy as np
import optax
import pytest

from conftest import REPO_ROOT
from laud_jax import config_utils, models, train
from laud_jax.config_utils import ConfigError
from laud_jax.training import steps

CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, 'configs', '*.py')))
TINY = os.path.join(REPO_ROOT, 'configs', 'tiny.py')


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_every_config_file_is_valid(path):
  config = config_utils.load_config_file(path)
  config_utils.validate(config)
  cfg = {k: v for k, v in config.model.to_dict().items() if v is not None}
  cfg['num_classes'] = 1000 if config.data.name != 'cluttered_mnist' else 10
  spec = models.network_spec(models.model_config(cfg),
                             (config.data.image_size, config.data.image_size, 3))
  assert spec.dense_macs > 0


def test_quickstart_and_imagenet_recipes_hold_the_documented_values():
  quick = config_utils.load_config_file(os.path.join(REPO_ROOT, 'configs', 'quickstart.py'))
  assert quick.data.name == 'cluttered_mnist' and quick.model.arch == 'resnet_small'
  assert quick.teacher.source == 'train' and quick.loss.target_rate == 0.5
  r50 = config_utils.load_config_file(os.path.join(REPO_ROOT, 'configs', 'resnet50.py'))
  assert (r50.optimizer.name, r50.optimizer.nesterov, r50.optimizer.weight_decay) == ('sgd', True, 5e-5)
  assert steps.peak_learning_rate(r50.optimizer, r50.batch_size) == pytest.approx(0.02 * 1024 / 256)
  assert (r50.num_epochs, r50.loss.sparsity_weight, r50.loss.kd_temperature,
          r50.loss.kd_alpha) == (100, 10, 4, 0.5)
  assert (r50.gumbel.tau_start, r50.gumbel.tau_end) == (5.0, 0.1)


def run_main(tmp_path, *flags):
  workdir = str(tmp_path / 'run')
  return train.main(['--exp', TINY, '--workdir', workdir, *flags]), workdir


@pytest.mark.parametrize('flags, message', [
    (['--exp.loss.target_rate=1.5'], 'target_rate=1.5 must be in (0, 1]'),
    (['--exp.loss.target_rate=0'], 'target_rate=0.0 must be in (0, 1]'),
    (['--exp.model.granularity=(3,4,2,1)'], 'S=3 of stage 1 does not divide'),
    (['--exp.model.arch=resnet_huge'], "unknown arch 'resnet_huge'"),
    (['--exp.data.name=imagenet2012', '--exp.data.data_dir=/nonexistent/tfds'],
     "Dataset 'imagenet2012'"),
    (['--exp.loss.kd_alpha=0.5'], 'needs a teacher'),
    (['--exp.optimizer.name=lion'], "optimizer.name='lion'"),
])
def test_bad_values_fail_before_compute(tmp_path, capsys, flags, message):
  code, workdir = run_main(tmp_path, *flags)
  assert code == 1
  assert message in capsys.readouterr().err
  assert not os.path.exists(workdir)     # nothing was written: the run never started


def test_unknown_override_key_is_rejected(tmp_path, capsys):
  code, workdir = run_main(tmp_path, '--exp.optimzer.learning_rate=0.1')
  assert code == 2
  assert 'optimzer' in capsys.readouterr().err
  assert not os.path.exists(workdir)


def test_model_schema_matches_the_model_registry():
  assert set(config_utils.base_config().model) == set(models.MODEL_CONFIG_KEYS)


def test_unknown_key_in_config_file_is_rejected(tmp_path):
  path = tmp_path / 'typo.py'
  path.write_text('from laud_jax.config_utils import base_config\n'
                  'def get_config():\n'
                  '  c = base_config()\n'
                  '  c.loss.sparsity_wieght = 3.0\n'
                  '  return c\n')
  with pytest.raises(ConfigError, match="Unknown config key 'loss.sparsity_wieght'"):
    config_utils.validate(config_utils.load_config_file(str(path)))


def test_batch_must_divide_over_devices_and_processes():
  config = config_utils.load_config_file(TINY)
  config.batch_size = 30
  with pytest.raises(ConfigError, match='batch_size=30 is not divisible by the 4 devices'):
    config_utils.validate(config, num_devices=4)
  config.batch_size = 32
  config_utils.validate(config, num_devices=4)
  with pytest.raises(ConfigError, match='not divisible by the 3 processes'):
    config_utils.validate(config, num_devices=1, num_processes=3)


def test_help_and_missing_flags(capsys):
  assert train.main([]) == 2
  assert '--exp CONFIG.py and --workdir DIR are required' in capsys.readouterr().err
  assert train.main(['--help']) == 0
  out = capsys.readouterr().out
  assert '--exp.field=value' in out and '--workdir' in out


def test_temperature_schedule_is_exponential():
  taus = [steps.temperature(k, 100, 5.0, 0.1) for k in (0, 50, 100)]
  assert taus[0] == pytest.approx(5.0) and taus[2] == pytest.approx(0.1)
  assert taus[1] == pytest.approx(np.sqrt(5.0 * 0.1))


def test_lr_schedule_warmup_cosine_and_batch_scaling():
  config = config_utils.base_config().optimizer
  config.warmup_steps = 10
  schedule = steps.lr_schedule(config, batch_size=512, total_steps=110)
  peak = 0.02 * 512 / 256
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(peak)
  assert float(schedule(60)) == pytest.approx(peak / 2, rel=1e-4)
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-9)


def test_masker_lr_multiplier_scales_only_mask_parameters():
  config = config_utils.base_config().optimizer
  config.update(dict(momentum=0.0, weight_decay=0.0, schedule='constant', learning_rate=0.5,
                     lr_reference_batch=0, masker_lr_multiplier=0.1))
  params = {'block': {'conv1': {'kernel': np.ones(3, np.float32)},
                      'gates': {'masker_spatial': {'conv': {'bias': np.ones(2, np.float32)}}}}}
  grads = jax.tree.map(lambda x: np.full_like(x, 2.0), params)
  tx, _ = steps.make_optimizer(config, batch_size=32, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['block']['conv1']['kernel'], -1.0)
  np.testing.assert_allclose(updates['block']['gates']['masker_spatial']['conv']['bias'], -0.1)
  assert isinstance(tx, optax.GradientTransformation)


def test_pretrained_weights_must_fit():
  fresh = {'params': {'a': np.zeros((2, 3), np.float32), 'gates': {'b': np.zeros(4, np.float32)}}}
  merged, new = train.merge_variables(fresh, {'params': {'a': np.ones((2, 3))}}, 'teacher')
  np.testing.assert_array_equal(merged['params']['a'], np.ones((2, 3)))
  assert new == ['params/gates/b']
  with pytest.raises(ConfigError, match=r'params/a: pretrained \(3, 3\), model \(2, 3\)'):
    train.merge_variables(fresh, {'params': {'a': np.ones((3, 3))}}, 'teacher')
  with pytest.raises(ConfigError, match='params/c: not in the model'):
    train.merge_variables(fresh, {'params': {'a': np.ones((2, 3)), 'c': np.ones(1)}}, 'x')

"""Experiment configs: the schema every config starts from, and validation before compute.

An experiment file `configs/X.py` defines `get_config()` returning `base_config()` with
fields changed; `--exp.a.b=value` overrides any field. Unknown keys and impossible values
are rejected here with a message naming the field, before any data or model is touched.
"""

from __future__ import annotations

import json
import math
import os

import ml_collections

OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('cosine', 'constant')
TEACHER_TRAIN = 'train'   # teacher.source value: train a static teacher first, in WORKDIR/teacher


class ConfigError(ValueError):
  """A config field has an unknown name or an impossible value."""


def optimizer_config() -> ml_collections.ConfigDict:
  """Optimizer fields (also used for the teacher phase)."""
  return ml_collections.ConfigDict(dict(
      name='sgd',                 # sgd | adamw
      learning_rate=0.02,         # peak lr for a batch of lr_reference_batch images
      lr_reference_batch=256,     # lr scales with batch_size / this; 0 = no scaling
      schedule='cosine',          # cosine (per step, to zero) | constant
      warmup_steps=0,
      momentum=0.9,               # sgd
      nesterov=True,              # sgd
      b1=0.9, b2=0.999,           # adamw
      weight_decay=5e-5,          # on all parameters (decoupled for adamw)
      masker_lr_multiplier=1.0,   # lr factor for mask/gate parameters
      grad_clip_norm=0.0,         # 0 = off
  ))


def base_config() -> ml_collections.ConfigDict:
  """Every field a training config may set, with its default."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(dict(   # laud_jax.models.model_config keys
      arch='resnet50',
      num_classes=0,              # 0 = take it from the dataset
      mode='spatial',             # one mode, or a tuple with one per stage
      granularity=ml_collections.config_dict.placeholder(tuple),  # S per stage
      mask_groups=1,
      channel_granularity=2,
      channel_mask_position='post_act',
      se_pool='dense',            # RegNetY SE under spatial masks: 'dense' (released code) | 'masked'
      masker_input='pooled',      # spatial masker input: 'pooled' (published) | 'standardized'
      dtype='float32',
      zero_init_residual=False,
      stage_widths=ml_collections.config_dict.placeholder(tuple),  # None = the arch's
      stage_depths=ml_collections.config_dict.placeholder(tuple),
      stem_width=ml_collections.config_dict.placeholder(int),
  ))
  config.data = ml_collections.ConfigDict(dict(
      name='cluttered_mnist',     # 'cluttered_mnist' (embedded) or any tfds image dataset
      data_dir='',                # tfds data_dir ('' = tfds default)
      train_split='train',
      eval_split='test',
      image_size=64,
      num_clutter=4,              # embedded only: clutter fragments per canvas
      fragment_size=8,            # embedded only: fragment side in pixels
      test_copies=2,              # embedded only: canvases per held-out digit
      num_workers=0,              # grain worker processes (0 = in the training process)
      num_threads=1,              # grain reader threads per process
      prefetch=2,
      mean=ml_collections.config_dict.placeholder(tuple),
      std=ml_collections.config_dict.placeholder(tuple),
  ))
  config.batch_size = 256         # global, over all devices and processes
  config.eval_batch_size = 256
  config.num_epochs = 100.0
  config.num_steps = 0            # > 0 overrides num_epochs
  config.optimizer = optimizer_config()
  config.loss = ml_collections.ConfigDict(dict(
      target_rate=0.5,            # t: target dynamic/dense MAC ratio
      sparsity_weight=10.0,       # lambda
      kd_temperature=4.0,         # T
      kd_alpha=0.5,               # alpha (0 = no distillation)
      bound_relax_fraction=0.33,  # per-block MAC bounds relax from [t, t] to [0, 1] over this
                                  # fraction of training (> 1: never fully)
  ))
  config.gumbel = ml_collections.ConfigDict(dict(
      tau_start=5.0, tau_end=0.1,
      noise=True,                 # False: deterministic hard gates with the same straight-through
                                  # gradient (tests, debugging)
  ))
  config.teacher = ml_collections.ConfigDict(dict(
      source='',                  # '' none | 'train' (static teacher first) | path to a workdir
      num_epochs=10.0,            # teacher phase ('train' only)
      optimizer=optimizer_config(),
      init_student=True,          # initialize the student from the teacher's weights
  ))
  config.init_from = ''           # workdir of a trained model to initialize from
  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3))
  config.log_every_steps = 50
  config.eval_every_steps = 0     # 0 = evaluate at the end only
  config.progress_bar = True
  config.distributed = ml_collections.ConfigDict(dict(
      coordinator_address='',     # host:port; '' = $LAUD_COORDINATOR or single process
      num_processes=0,            # 0 = $LAUD_NUM_PROCESSES or 1
      process_id=-1,              # -1 = $LAUD_PROCESS_ID or 0
  ))
  return config


def imagenet_config(arch: str, mode: str = 'spatial',
                    granularity: tuple[int, ...] = (4, 4, 2, 1)) -> ml_collections.ConfigDict:
  """ImageNet (tfds imagenet2012), 100 epochs, SGD Nesterov, KD from a static teacher."""
  config = base_config()
  config.model.arch = arch
  config.model.mode = mode
  config.model.granularity = granularity
  config.data.name = 'imagenet2012'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.image_size = 224
  config.data.num_workers = 8
  config.data.num_threads = 4
  config.batch_size = 1024
  config.eval_batch_size = 1000
  config.num_epochs = 100.0
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.02       # x batch / 256
  config.optimizer.lr_reference_batch = 256
  config.optimizer.schedule = 'cosine'
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 5e-5
  # Maskers learn at the backbone's rate: the released trainer's per-group lr_mult only
  # applies to architectures whose name contains 'dyn', which uni_resnet50/101 and the
  # LAUDNet RegNets do not, so every parameter gets the scheduled lr.
  config.optimizer.masker_lr_multiplier = 1.0
  config.loss.target_rate = 0.5
  config.loss.sparsity_weight = 10.0
  config.loss.kd_temperature = 4.0
  config.loss.kd_alpha = 0.5
  config.gumbel.tau_start = 5.0
  config.gumbel.tau_end = 0.1
  # The frozen static model is the teacher and the student's initialization. Point
  # teacher.source at a trained static workdir to skip training it here.
  config.teacher.source = 'train'
  config.teacher.num_epochs = 90.0
  config.teacher.optimizer.name = 'sgd'
  config.teacher.optimizer.learning_rate = 0.1
  config.teacher.optimizer.lr_reference_batch = 256
  config.teacher.optimizer.warmup_steps = 5 * 1251
  config.teacher.optimizer.weight_decay = 1e-4
  config.checkpoint.every_steps = 2000
  config.checkpoint.keep = 3
  config.log_every_steps = 100
  config.eval_every_steps = 12510
  return config


def check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict,
               prefix: str = '') -> None:
  """Raises ConfigError for any key of `config` that `schema` does not define."""
  for key, value in config.items():
    name = f'{prefix}{key}'
    if key not in schema:
      known = ', '.join(sorted(schema.keys()))
      raise ConfigError(f'Unknown config key {name!r}. Known keys here: {known}.')
    if key == 'model':   # model keys are validated by the model registry
      continue
    if isinstance(value, ml_collections.ConfigDict):
      if not isinstance(schema[key], ml_collections.ConfigDict):
        raise ConfigError(f'Config key {name!r} must be a value, not a group.')
      check_keys(value, schema[key], name + '.')


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _check_optimizer(opt: ml_collections.ConfigDict, where: str) -> None:
  _require(opt.name in OPTIMIZERS, f'{where}.name={opt.name!r}; choose one of {OPTIMIZERS}.')
  _require(opt.schedule in SCHEDULES,
           f'{where}.schedule={opt.schedule!r}; choose one of {SCHEDULES}.')
  _require(opt.learning_rate > 0, f'{where}.learning_rate={opt.learning_rate} must be > 0.')
  _require(opt.weight_decay >= 0, f'{where}.weight_decay={opt.weight_decay} must be >= 0.')
  _require(opt.warmup_steps >= 0, f'{where}.warmup_steps={opt.warmup_steps} must be >= 0.')
  _require(0 <= opt.momentum < 1, f'{where}.momentum={opt.momentum} must be in [0, 1).')
  _require(opt.masker_lr_multiplier >= 0,
           f'{where}.masker_lr_multiplier={opt.masker_lr_multiplier} must be >= 0.')
  _require(opt.lr_reference_batch >= 0,
           f'{where}.lr_reference_batch={opt.lr_reference_batch} must be >= 0.')


def validate(config: ml_collections.ConfigDict, num_devices: int = 1,
             num_processes: int = 1) -> None:
  """Checks keys and values that need neither data nor model; raises ConfigError."""
  check_keys(config, base_config())
  _require(config.batch_size > 0, f'batch_size={config.batch_size} must be > 0.')
  _require(config.batch_size % num_devices == 0,
           f'batch_size={config.batch_size} is not divisible by the {num_devices} devices '
           f'the data-parallel mesh spans; use a multiple of {num_devices}.')
  _require(config.batch_size % num_processes == 0,
           f'batch_size={config.batch_size} is not divisible by the {num_processes} processes.')
  _require(config.eval_batch_size > 0 and config.eval_batch_size % num_devices == 0,
           f'eval_batch_size={config.eval_batch_size} must be a positive multiple of the '
           f'{num_devices} devices.')
  _require(config.num_steps > 0 or config.num_epochs > 0,
           'Set num_epochs > 0 or num_steps > 0.')
  rate = config.loss.target_rate
  _require(0 < rate <= 1, f'loss.target_rate={rate} must be in (0, 1].')
  _require(config.loss.sparsity_weight >= 0, 'loss.sparsity_weight must be >= 0.')
  _require(config.loss.kd_alpha >= 0, 'loss.kd_alpha must be >= 0.')
  _require(config.loss.kd_temperature > 0, 'loss.kd_temperature must be > 0.')
  _require(config.loss.bound_relax_fraction > 0, 'loss.bound_relax_fraction must be > 0.')
  _require(config.gumbel.tau_start > 0 and config.gumbel.tau_end > 0,
           'gumbel.tau_start and gumbel.tau_end must be > 0.')
  _require(config.checkpoint.every_steps > 0, 'checkpoint.every_steps must be > 0.')
  _require(config.checkpoint.keep > 0, 'checkpoint.keep must be > 0.')
  _require(config.log_every_steps > 0, 'log_every_steps must be > 0.')
  _check_optimizer(config.optimizer, 'optimizer')
  _check_optimizer(config.teacher.optimizer, 'teacher.optimizer')
  source = config.teacher.source
  if source == TEACHER_TRAIN:
    _require(config.teacher.num_epochs > 0, 'teacher.num_epochs must be > 0.')
  if config.loss.kd_alpha > 0 and not source:
    raise ConfigError('loss.kd_alpha > 0 needs a teacher: set teacher.source to '
                      f"'{TEACHER_TRAIN}' or a trained workdir, or set loss.kd_alpha=0.")
  _require(config.model.num_classes >= 0, 'model.num_classes must be >= 0 (0 = from data).')


def num_train_steps(config: ml_collections.ConfigDict, num_train_examples: int,
                    num_epochs: float | None = None) -> int:
  """Total optimizer steps: num_steps, or epochs x examples / batch (at least 1)."""
  if config.num_steps > 0 and num_epochs is None:
    return int(config.num_steps)
  epochs = config.num_epochs if num_epochs is None else num_epochs
  return max(1, math.ceil(epochs * num_train_examples / config.batch_size))


def to_json(config: ml_collections.ConfigDict) -> str:
  """Stable JSON text of a config (tuples become lists)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """get_config() of an experiment file (what --exp PATH loads)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('laud_jax_experiment_config', path)
  if spec is None or not path.endswith('.py'):
    raise ConfigError(f'{path} is not a Python config file (expected configs/NAME.py).')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} defines no get_config().')
  return module.get_config()


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of --NAME=VALUE or --NAME VALUE in `argv`, else None."""
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def command_line_error(error: BaseException, argv: list[str], tool: str) -> str:
  """One line for an error in the flags of `python -m laud_jax.TOOL`: what, the config file, the fix.

  ml_collections reports an unknown --exp.key as a KeyError (or an AttributeError holding
  one) whose message spans lines, and a config file it cannot load as an OSError.
  """
  path = _flag_value(argv, 'exp') or '--exp'
  if isinstance(error, AttributeError) and error.args and isinstance(error.args[0], KeyError):
    error = error.args[0]
  if isinstance(error, KeyError) and error.args:
    first, *rest = str(error.args[0]).splitlines()
    key = first.strip('\'"')
    flag = next((a.split('=', 1)[0] for a in argv
                 if a.startswith('--exp.') and key in a.split('=', 1)[0].split('.')), '--exp')
    hint = ' '.join(line.strip() for line in rest)
    hint = hint[:1].lower() + hint[1:] + ' ' if hint else ''
    return (f'unknown config key {key!r} in {flag} ({path}): {hint}(every field is listed in '
            'laud_jax/config_utils.py, base_config)')
  if isinstance(error, OSError) and path != '--exp':
    if not os.path.isfile(path):
      return (f'config file not found ({os.path.abspath(path)}): pass --exp the path of an '
              'experiment file, e.g. configs/quickstart.py')
    detail = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
    return f'config file could not be loaded: {detail} ({os.path.abspath(path)}): fix the file'
  return f'{" ".join(str(error).split())}; python -m laud_jax.{tool} --help lists the flags'

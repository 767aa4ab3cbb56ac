"""In subprocesses: the sharded step on 2 host CPU devices, and the throughput benchmark."""

import json


from conftest import run_python

SHARDED_STEP = r'''
import json, jax, numpy as np
from jax.sharding import Mesh
from laud_jax import config_utils, data, models
from laud_jax.training import distributed, steps
assert jax.device_count() == 2, jax.devices()
config = config_utils.load_config_file('configs/tiny.py')
model_cfg = {k: v for k, v in config.model.to_dict().items() if v is not None}
model_cfg['num_classes'] = 10
model = models.build_model(model_cfg)
tx, _ = steps.make_optimizer(config.optimizer, 16, 10)
step_fn = steps.make_train_step(model, tx, config.loss, True, None)
state = steps.init_state(model, tx, 3, (32, 32, 1))
batch = next(data.train_iterator(config.data, 16, seed=5))
results = {}
for n in (1, 2):
  mesh = Mesh(np.array(jax.devices()[:n]), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  repl, sharded = distributed.replicated(mesh), distributed.batch_sharded(mesh)
  fn = jax.jit(step_fn, in_shardings=(repl, sharded, repl, repl, repl), out_shardings=(repl, repl))
  global_batch = distributed.global_batch(batch, mesh)
  assert len(global_batch['image'].addressable_shards) == n
  assert global_batch['image'].addressable_shards[0].data.shape[0] == 16 // n
  new_state, metrics = fn(state, global_batch, np.float32(2.0), np.float32(0.3), None)
  results[n] = jax.device_get((new_state['params'], new_state['batch_stats'], metrics['loss']))
diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), results[1], results[2])
changed = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), results[1][0], state['params'])
print(json.dumps({'max_diff': max(jax.tree.leaves(diffs)),
                  'min_change': min(jax.tree.leaves(changed))}))
'''


def test_two_device_step_equals_single_device_step():
  result = run_python(['-c', SHARDED_STEP], timeout=240,
                      XLA_FLAGS='--xla_force_host_platform_device_count=2')
  assert result.returncode == 0, result.stderr[-3000:]
  numbers = json.loads(result.stdout.strip().splitlines()[-1])
  assert numbers['min_change'] > 0            # every parameter moved
  assert numbers['max_diff'] < 2e-5, numbers  # same update (and synchronized BN statistics)


def test_throughput_benchmark_writes_both_measurements(tmp_path):
  out = tmp_path / 'bench.json'
  result = run_python(['-m', 'laud_jax.training.throughput', '--arch', 'resnet_tiny',
                       '--image-size', '32', '--batch', '2', '--warmup', '1', '--repeats', '2',
                       '--out', str(out)], timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads(out.read_text())
  static, dynamic = record['results']['static'], record['results']['dynamic']
  assert len(static['samples_s']) == len(dynamic['samples_s']) == 2
  assert record['dynamic_over_static'] == dynamic['median_s'] / static['median_s']
  assert 'dynamic / static step time' in result.stdout

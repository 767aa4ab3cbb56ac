"""End-to-end training: loss falls, checkpoints, resume, kill-and-resume, bad checkpoints, NaN stop."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, run_python, subprocess_env
from laud_jax import checkpointing, config_utils, train
from laud_jax.data import cluttered_mnist

TINY = os.path.join(REPO_ROOT, 'configs', 'tiny.py')
STEPS = 24


def tiny_config(**overrides):
  config = config_utils.load_config_file(TINY)   # 24 steps, batch 32, checkpoints every 3
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def read_metrics(workdir, split='train'):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['split'] == split]


def checkpoint_steps(workdir):
  root = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """One tiny run of STEPS steps: (workdir, summary, final variables)."""
  workdir = str(tmp_path_factory.mktemp('tiny') / 'run')
  summary = train.train_and_evaluate(tiny_config(), workdir)
  variables, _ = checkpointing.load_variables(workdir)
  return workdir, summary, variables


def copy_run(trained, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(trained[0], workdir)
  return workdir


def test_loss_falls_and_outputs_are_written(trained):
  workdir, summary, _ = trained
  records = read_metrics(workdir)
  assert [r['step'] for r in records] == list(range(4, STEPS + 1, 4))
  first = np.mean([r['ce'] for r in records[:2]])
  last = np.mean([r['ce'] for r in records[-2:]])
  assert last < first - 0.05, (first, last)
  assert checkpoint_steps(workdir) == list(range(3, STEPS + 1, 3))
  with open(os.path.join(workdir, 'summary.json')) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(summary))
  assert saved['steps'] == STEPS and 0.0 <= saved['top1'] <= 1.0
  assert 0.05 < saved['mac_ratio'] <= 1.05
  assert sorted(saved['density']) == ['stage0', 'stage1', 'stage2', 'stage3']
  assert saved['eval_examples'] == len(cluttered_mnist.split_digits('test')[1])
  assert os.listdir(os.path.join(workdir, 'tensorboard'))


def test_resume_from_saved_step_gives_identical_state(trained, tmp_path):
  workdir = copy_run(trained, tmp_path)
  for step in range(15, STEPS + 1, 3):
    shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
  os.remove(os.path.join(workdir, 'summary.json'))
  lines_before = len(read_metrics(workdir))
  train.train_and_evaluate(tiny_config(), workdir)
  resumed = read_metrics(workdir)[lines_before:]
  assert [r['step'] for r in resumed] == [16, 20, 24]          # continued after step 12
  variables, _ = checkpointing.load_variables(workdir)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(trained[2]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_finished_run_is_not_retrained(trained, tmp_path):
  workdir = copy_run(trained, tmp_path)
  summary = train.train_and_evaluate(tiny_config(), workdir)
  assert summary['top1'] == trained[1]['top1']
  assert len(read_metrics(workdir)) == STEPS // 4


def test_corrupt_checkpoint_is_reported_and_left_alone(trained, tmp_path):
  workdir = copy_run(trained, tmp_path)
  state_dir = os.path.join(workdir, 'checkpoints', str(STEPS), 'state')
  victim = os.path.join(state_dir, 'manifest.ocdbt')
  with open(victim, 'wb') as f:
    f.write(b'\x00garbage' * 10)
  before = {p: open(os.path.join(state_dir, p), 'rb').read() for p in os.listdir(state_dir)
            if os.path.isfile(os.path.join(state_dir, p))}
  with pytest.raises(checkpointing.CheckpointError, match=os.path.join('checkpoints', str(STEPS))):
    train.train_and_evaluate(tiny_config(), workdir)
  after = {p: open(os.path.join(state_dir, p), 'rb').read() for p in before}
  assert after == before
  assert checkpoint_steps(workdir) == list(range(3, STEPS + 1, 3))


def test_incompatible_checkpoint_names_file_and_mismatch(trained, tmp_path):
  workdir = copy_run(trained, tmp_path)
  with pytest.raises(checkpointing.CheckpointError, match='config.json.*model'):
    train.train_and_evaluate(tiny_config(**{'model.stage_widths': (4, 8, 8, 8)}), workdir)
  # The state itself checked against a different model: names the leaf and both shapes.
  checkpointer = checkpointing.Checkpointer(workdir)
  saved_vars = trained[2]
  target = {'step': np.zeros((), np.int32), 'params': jax.tree.map(np.asarray, saved_vars['params'])}
  target['params']['fc']['kernel'] = np.zeros((5, 10), np.float32)
  with pytest.raises(checkpointing.CheckpointError) as info:
    checkpointer.restore(STEPS, target)
  message = str(info.value)
  assert os.path.join('checkpoints', str(STEPS)) in message
  assert 'params/fc/kernel' in message and '(5, 10)' in message
  checkpointer.close()


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  render = cluttered_mnist.render_batch
  bad_from = 5 * 32   # first example of step 6

  def poisoned(digit_ids, positions, *args, **kwargs):
    out = render(digit_ids, positions, *args, **kwargs)
    if positions.max() >= bad_from:
      out['image'][0, 0, 0, 0] = np.nan
    return out

  monkeypatch.setattr(cluttered_mnist, 'render_batch', poisoned)
  workdir = str(tmp_path / 'nan')
  config = tiny_config(**{'checkpoint.every_steps': 2})
  with pytest.raises(train.NonFiniteLossError, match=r'at step 6.*checkpoints/4'):
    train.train_and_evaluate(config, workdir)
  assert checkpoint_steps(workdir) == [2, 4]


# Runs in other processes, compared with the in-process run above (same config and seed).
TRAIN_CLI = ['-m', 'laud_jax.train', '--exp', 'configs/tiny.py']


def assert_same_parameters(workdir, reference):
  variables, _ = checkpointing.load_variables(workdir)
  got = jax.tree_util.tree_flatten_with_path(variables)[0]
  want = jax.tree_util.tree_flatten_with_path(reference)[0]
  assert [p for p, _ in got] == [p for p, _ in want]
  for (path, a), (_, b) in zip(got, want):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_killed_run_resumes_to_identical_parameters(trained, tmp_path):
  workdir = str(tmp_path / 'victim')
  args = TRAIN_CLI + ['--workdir', workdir]
  victim = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while victim.poll() is None and time.time() < deadline:
    steps = checkpoint_steps(workdir) if os.path.isdir(os.path.join(workdir, 'checkpoints')) else []
    if steps:
      break
    time.sleep(0.01)
  victim.send_signal(signal.SIGKILL)
  victim.communicate()
  assert victim.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
  assert 3 <= max(checkpoint_steps(workdir)) < STEPS
  resumed = run_python(args, timeout=240)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from' in resumed.stdout
  assert_same_parameters(workdir, trained[2])

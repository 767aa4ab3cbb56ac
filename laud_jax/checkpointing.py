"""Checkpoints of a training run (orbax): model, optimizer, step, rng and data-iterator state.

Layout of a work directory: ``config.json`` (the run's config) and ``checkpoints/<step>/``
with the items ``state`` (a pytree) and ``data`` (the input iterator's state, JSON).
A checkpoint that cannot be read, or does not match the model being trained, raises
:class:`CheckpointError` naming the file and the mismatch; it is never overwritten.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'


class CheckpointError(RuntimeError):
  """A checkpoint is unreadable or incompatible with the current run."""


def path_name(path: tuple[Any, ...]) -> str:
  """'params/block/conv1/kernel' for a pytree key path."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _leaf_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_name(p): (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for p, leaf in leaves}


def describe_mismatch(saved: Any, expected: Any, limit: int = 8) -> str:
  """Human-readable differences between two pytrees of arrays/metadata ('' if none)."""
  a, b = _leaf_shapes(saved), _leaf_shapes(expected)
  lines = []
  missing = sorted(set(b) - set(a))
  extra = sorted(set(a) - set(b))
  if missing:
    lines.append(f'missing from the checkpoint: {", ".join(missing[:limit])}'
                 + (f' (+{len(missing) - limit} more)' if len(missing) > limit else ''))
  if extra:
    lines.append(f'in the checkpoint but not in the model: {", ".join(extra[:limit])}'
                 + (f' (+{len(extra) - limit} more)' if len(extra) > limit else ''))
  for name in sorted(set(a) & set(b)):
    if a[name][0] != b[name][0]:
      lines.append(f'{name}: checkpoint shape {a[name][0]}, model shape {b[name][0]}')
  return '\n  '.join(lines[:limit + 2])


class Checkpointer:
  """Saves and restores a run's checkpoints under WORKDIR/checkpoints."""

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler()})

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
    """Writes checkpoint `step` (atomically: a killed save leaves no partial step)."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """(state, data_state) of checkpoint `step`, laid out like `target` (arrays or structs)."""
    where = self.step_dir(step)
    try:
      metadata = self.manager.item_metadata(step)['state']
    except Exception as e:  # orbax raises many types for unreadable files
      raise CheckpointError(
          f'Checkpoint {where} is unreadable ({type(e).__name__}: {e}). It was left as it is. '
          f'Move or delete {where} to resume from an earlier checkpoint, or use a new '
          '--workdir.') from e
    if metadata is not None:
      mismatch = describe_mismatch(metadata, target)
      if mismatch:
        raise CheckpointError(
            f'Checkpoint {where} does not match the model/optimizer of this run:\n  {mismatch}\n'
            'It was left as it is. Use a new --workdir, or the config that wrote it '
            f'({os.path.join(os.path.dirname(self.directory), CONFIG_FILE)}).')
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
        target)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(
          f'Checkpoint {where} could not be restored ({type(e).__name__}: {e}). It was left as '
          f'it is. Move or delete {where} to resume from an earlier checkpoint, or use a new '
          '--workdir.') from e
    return restored['state'], restored['data']

  def close(self) -> None:
    self.manager.close()


def load_variables(workdir: str, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """(model variables {'params', 'batch_stats'}, run config dict) of a workdir's checkpoint.

  Reads the latest checkpoint unless `step` is given; arrays come back on the host.
  """
  config_path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise CheckpointError(f'{config_path} not found: {workdir} is not a laud_jax.train work '
                          'directory (expected config.json and checkpoints/).')
  with open(config_path) as f:
    config = json.load(f)
  checkpointer = Checkpointer(workdir)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'No checkpoint under {checkpointer.directory}; train that run first.')
  if not os.path.isdir(checkpointer.step_dir(step)):
    raise CheckpointError(f'No checkpoint {checkpointer.step_dir(step)}.')
  where = checkpointer.step_dir(step)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  try:
    metadata = checkpointer.manager.item_metadata(step)['state']
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          metadata)
    restored = checkpointer.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))['state']
  except Exception as e:
    raise CheckpointError(f'Checkpoint {where} could not be read ({type(e).__name__}: {e}).') from e
  finally:
    checkpointer.close()
  variables = {'params': restored['params'], 'batch_stats': restored.get('batch_stats', {})}
  return jax.tree.map(np.asarray, variables), config

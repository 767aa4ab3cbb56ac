"""Data parallelism: multi-host start-up, the ('data',) mesh, and global arrays."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def process_settings(dist: ml_collections.ConfigDict) -> tuple[str, int, int]:
  """(coordinator address, number of processes, process id) from the config or environment.

  Environment fallbacks: LAUD_COORDINATOR, LAUD_NUM_PROCESSES, LAUD_PROCESS_ID.
  """
  address = dist.coordinator_address or os.environ.get('LAUD_COORDINATOR', '')
  count = dist.num_processes or int(os.environ.get('LAUD_NUM_PROCESSES', '1'))
  index = dist.process_id if dist.process_id >= 0 else int(os.environ.get('LAUD_PROCESS_ID', '0'))
  if count < 1 or not 0 <= index < count:
    raise ValueError(f'process id {index} is not in [0, {count}): set distributed.process_id '
                     '(or LAUD_PROCESS_ID) per process and distributed.num_processes for all.')
  if count > 1 and not address:
    raise ValueError(f'{count} processes need a coordinator: set distributed.coordinator_address '
                     '(or LAUD_COORDINATOR) to host:port of process 0.')
  return address, count, index


def initialize(dist: ml_collections.ConfigDict) -> None:
  """Joins the multi-host job when more than one process is configured (before any JAX work)."""
  address, count, index = process_settings(dist)
  if count == 1:
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU collectives across hosts
  jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)


def data_mesh() -> Mesh:
  """A 1-D mesh named 'data' over every device, ordered by process.

  Process p's slice of a global batch then lands in rows [p B / P, (p + 1) B / P), so the
  global batch (and each row's random Gumbel noise) is the same for any number of processes.
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host arrays (identical on every process) -> replicated global arrays."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of a batch -> global arrays sharded over 'data'."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}

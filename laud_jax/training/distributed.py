"""Data parallelism: multi-host start-up, the ('data',) mesh, and global arrays."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from laud_jax.config_utils import ConfigError

DATA_AXIS = "data"


OWN_VARIABLES = ("LAUD_COORDINATOR", "LAUD_NUM_PROCESSES", "LAUD_PROCESS_ID")
# What jax.distributed.initialize() reads in each cluster (jax._src.clusters), in its order.
OMPI_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Join:
    """How this process joins a multi-process job."""

    source: str  # where the settings come from, for the log
    arguments: dict[str, Any]  # for jax.distributed.initialize
    num_processes: int | None  # None: known only once joined
    process_id: int | None


def process_settings(dist: ml_collections.ConfigDict, environ: Mapping[str, str] = os.environ) -> tuple[str, int, int]:
    """(coordinator address, number of processes, process id) from the config or environment.

    Environment fallbacks: LAUD_COORDINATOR, LAUD_NUM_PROCESSES, LAUD_PROCESS_ID.
    """
    address = dist.coordinator_address or environ.get("LAUD_COORDINATOR", "")
    count = dist.num_processes or int(environ.get("LAUD_NUM_PROCESSES", "1"))
    index = dist.process_id if dist.process_id >= 0 else int(environ.get("LAUD_PROCESS_ID", "0"))
    if count < 1 or not 0 <= index < count:
        raise ConfigError(
            f"process id {index} is not in [0, {count}): set distributed.process_id "
            "(or LAUD_PROCESS_ID) per process and distributed.num_processes for all."
        )
    if count > 1 and not address:
        raise ConfigError(
            f"{count} processes need a coordinator: set distributed.coordinator_address "
            "(or LAUD_COORDINATOR) to host:port of process 0."
        )
    return address, count, index


def cluster_join(environ: Mapping[str, str]) -> Join | None:
    """The multi-process job of a cluster launcher that started this process, as
    jax.distributed.initialize() detects it by itself; None outside one, or for one process.

    Open MPI (mpirun), SLURM (srun; an sbatch script outside srun is not a job step) and a
    Kubernetes indexed Job (completion index set), checked in JAX's order.
    """
    if "OMPI_MCA_orte_hnp_uri" in environ or all(v in environ for v in OMPI_VARIABLES):
        count, index = environ.get("OMPI_COMM_WORLD_SIZE"), environ.get("OMPI_COMM_WORLD_RANK")
        join = Join(
            "Open MPI job (mpirun)",
            {"cluster_detection_method": "ompi"},
            int(count) if count else None,
            int(index) if index else None,
        )
    elif all(v in environ for v in SLURM_VARIABLES):
        join = Join(
            f"SLURM job {environ['SLURM_JOB_ID']} (srun)",
            {"cluster_detection_method": "slurm"},
            int(environ["SLURM_NTASKS"]),
            int(environ["SLURM_PROCID"]),
        )
    elif "KUBERNETES_SERVICE_HOST" in environ and "JOB_COMPLETION_INDEX" in environ:
        if importlib.util.find_spec("kubernetes") is None:
            raise ConfigError(
                "this is a Kubernetes indexed Job, but joining it needs the kubernetes "
                "package: pip install 'jax[k8s]' (or set LAUD_COORDINATOR, "
                "LAUD_NUM_PROCESSES and LAUD_PROCESS_ID)"
            )
        join = Join("Kubernetes indexed Job", {}, None, int(environ["JOB_COMPLETION_INDEX"]))
    else:
        return None
    return None if join.num_processes == 1 else join


def plan_join(dist: ml_collections.ConfigDict, environ: Mapping[str, str] = os.environ) -> Join | None:
    """How this process joins a multi-process job; None to run as a single process.

    The config fields distributed.* or the LAUD_* variables when any of them is set, else the
    job of a cluster launcher (SLURM, Open MPI, Kubernetes) when there is one.
    """
    if (
        dist.coordinator_address
        or dist.num_processes
        or dist.process_id >= 0
        or any(v in environ for v in OWN_VARIABLES)
    ):
        address, count, index = process_settings(dist, environ)
        if count == 1:
            return None
        return Join(
            f"coordinator {address}",
            {"coordinator_address": address, "num_processes": count, "process_id": index},
            count,
            index,
        )
    return cluster_join(environ)


def initialize(dist: ml_collections.ConfigDict) -> None:
    """Joins the multi-host job when there is one (before any JAX work); process 0 says how."""
    join = plan_join(dist)
    if join is None:
        return
    if join.process_id in (0, None):
        count = join.num_processes or "all"
        print(f"distributed: {join.source}: joining {count} processes with jax.distributed.initialize()", flush=True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across hosts
    jax.distributed.initialize(**join.arguments)


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

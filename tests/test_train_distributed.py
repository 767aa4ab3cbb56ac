"""In subprocesses: 2 host CPU devices, 2 processes (multi-host, ours or SLURM's settings), the
throughput benchmark; in process: how the multi-host settings are chosen."""

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, run_python, subprocess_env

from laud_jax import checkpointing, config_utils
from laud_jax.training import distributed

SHARDED_STEP = r"""
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
"""


def test_two_device_step_equals_single_device_step():
    result = run_python(["-c", SHARDED_STEP], timeout=240, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["min_change"] > 0  # every parameter moved
    assert numbers["max_diff"] < 2e-5, numbers  # same update (and synchronized BN statistics)


def test_throughput_benchmark_writes_both_measurements(tmp_path):
    out = tmp_path / "bench.json"
    result = run_python(
        [
            "-m",
            "laud_jax.training.throughput",
            "--arch",
            "resnet_tiny",
            "--image-size",
            "32",
            "--batch",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--out",
            str(out),
        ],
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    static, dynamic = record["results"]["static"], record["results"]["dynamic"]
    assert len(static["samples_s"]) == len(dynamic["samples_s"]) == 2
    assert record["dynamic_over_static"] == dynamic["median_s"] / static["median_s"]
    assert "dynamic / static step time" in result.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_multi_host_matches_one_process(tmp_path):
    """Two processes on localhost (gloo), each feeding half of every global batch, against one
    process trained on the whole batch: the same parameters after step 1 (to 1e-5) and step 2
    (rounding differences of the all-reduced sums grow with lr 0.1 and, through flipped hard-mask
    decisions, make the runs drift apart legitimately: measured 6e-5 at step 2 with the tests'
    low-optimization XLA flags, 6e-4 at step 4 and 0.06 at step 6 with the default flags).
    """
    args = [
        "-m",
        "laud_jax.train",
        "--exp",
        "configs/tiny.py",
        "--exp.num_steps=6",
        "--exp.checkpoint.every_steps=1",
        "--exp.checkpoint.keep=6",
    ]
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    port = free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, *args, "--workdir", multi],
            cwd=REPO_ROOT,
            env=subprocess_env(LAUD_COORDINATOR=f"localhost:{port}", LAUD_NUM_PROCESSES="2", LAUD_PROCESS_ID=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    reference = run_python(args + ["--workdir", single], timeout=300)
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert reference.returncode == 0, reference.stderr[-3000:]
    for worker, out in zip(workers, outputs):
        assert worker.returncode == 0, out[-3000:]
    assert "summary:" in outputs[0] and "summary:" not in outputs[1]  # process 0 reports
    # A process missing the other's gradients or batch statistics would be off by ~1e-2.
    for step, atol in ((1, 1e-5), (2, 1e-3)):
        got = jax.tree_util.tree_flatten_with_path(checkpointing.load_variables(multi, step)[0])[0]
        want = jax.tree_util.tree_flatten_with_path(checkpointing.load_variables(single, step)[0])[0]
        assert [p for p, _ in got] == [p for p, _ in want]
        for (path, a), (_, b) in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol, err_msg=f"step {step} {jax.tree_util.keystr(path)}")
    with open(os.path.join(multi, "summary.json")) as f:
        assert json.load(f)["steps"] == 6


SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "node[01-02]",
    "SLURM_NTASKS": "8",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
}
OMPI = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
K8S = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "3"}


def no_settings():
    return config_utils.base_config().distributed


def test_multi_host_settings_come_from_ours_or_the_cluster_launcher(monkeypatch):
    plan = distributed.plan_join
    assert plan(no_settings(), {}) is None  # a plain process
    slurm = plan(no_settings(), SLURM)  # srun: JAX detects it
    assert slurm.arguments == {"cluster_detection_method": "slurm"}
    assert (slurm.num_processes, slurm.process_id) == (8, 5) and "SLURM job 4242" in slurm.source
    assert plan(no_settings(), {**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    batch_script = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
    assert plan(no_settings(), batch_script) is None  # sbatch, outside srun
    ompi = plan(no_settings(), OMPI)
    assert ompi.arguments == {"cluster_detection_method": "ompi"} and ompi.num_processes == 4
    assert plan(no_settings(), {**SLURM, **OMPI}).source.startswith("Open MPI")  # JAX's order
    assert plan(no_settings(), {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) is None  # a lone pod
    # Ours win over any cluster: the environment variables, or the config fields.
    ours = plan(
        no_settings(), {**SLURM, "LAUD_COORDINATOR": "h0:1234", "LAUD_NUM_PROCESSES": "2", "LAUD_PROCESS_ID": "1"}
    )
    assert ours.arguments == {"coordinator_address": "h0:1234", "num_processes": 2, "process_id": 1}
    dist = no_settings()
    dist.coordinator_address, dist.num_processes, dist.process_id = "h1:99", 3, 2
    assert plan(dist, SLURM).arguments == {"coordinator_address": "h1:99", "num_processes": 3, "process_id": 2}
    assert plan(no_settings(), {**SLURM, "LAUD_NUM_PROCESSES": "1"}) is None
    with pytest.raises(config_utils.ConfigError, match="need a coordinator"):
        plan(no_settings(), {"LAUD_NUM_PROCESSES": "2"})
    # Kubernetes: JAX asks the API server, which needs the kubernetes package.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "kubernetes" else real_find_spec(name, *a)
    )
    with pytest.raises(config_utils.ConfigError, match=r"pip install 'jax\[k8s\]'"):
        plan(no_settings(), K8S)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "kubernetes" else real_find_spec(name, *a)
    )
    k8s = plan(no_settings(), K8S)
    assert k8s.arguments == {} and k8s.process_id == 3 and k8s.num_processes is None


def test_initialize_lets_jax_detect_the_cluster_and_says_which(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls.append({name: value}))
    for name in distributed.OWN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**SLURM, "SLURM_PROCID": "0"}.items():
        monkeypatch.setenv(name, value)
    distributed.initialize(no_settings())
    assert calls == [{"jax_cpu_collectives_implementation": "gloo"}, {"cluster_detection_method": "slurm"}]
    assert capsys.readouterr().out == (
        "distributed: SLURM job 4242 (srun): joining 8 processes with jax.distributed.initialize()\n"
    )
    monkeypatch.setenv("SLURM_PROCID", "5")  # only process 0 says it
    distributed.initialize(no_settings())
    assert capsys.readouterr().out == ""


SLURM_PROBE = r"""
import json, jax, numpy as np
from jax.experimental import multihost_utils
from laud_jax import config_utils
from laud_jax.training import distributed
distributed.initialize(config_utils.base_config().distributed)
ranks = multihost_utils.process_allgather(np.array([jax.process_index()]))
print(json.dumps({'count': jax.process_count(), 'index': jax.process_index(),
                  'ranks': sorted(int(r) for r in ranks.ravel())}))
"""


def test_two_processes_started_like_srun_join_without_our_settings():
    """srun's environment on localhost: JAX derives the coordinator (port from the job id)."""
    start = random.randrange(61440, 65536)  # SLURM's coordinator port: 61440 + job id % 4096
    for port in [*range(start, 65536), *range(61440, start)]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
    env = {"SLURM_JOB_ID": str(port - 61440), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", SLURM_PROBE],
            cwd=REPO_ROOT,
            env=subprocess_env(**env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [w.communicate(timeout=240) for w in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [(r["count"], r["index"], r["ranks"]) for r in results] == [(2, 0, [0, 1]), (2, 1, [0, 1])]
    assert f"SLURM job {env['SLURM_JOB_ID']} (srun): joining 2 processes" in outputs[0][0]
    assert "distributed:" not in outputs[1][0]

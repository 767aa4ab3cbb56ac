"""Calibration timing harness: its plans, shapes and timings agree with the sparse engine."""

import dataclasses
import inspect

import numpy as np
import pytest

from laud_jax.latency import timing
from laud_jax.models.gates import dilate_mask, upsample_nearest
from laud_jax.sparse import SparseEngine
from laud_jax.sparse.routing import plan_block


def test_timed_block_reports_the_densities_the_engine_executes(tmp_path):
    config = timing.TimingConfig(
        arch="resnet_small", image=64, block=1, mode="spatial", granularity=2, rho=0.4, batch=2, seed=3
    )
    record = timing.time_config(config, repeats=2, warmup=1)
    spec = config.spec()
    # the same random masks, recomputed independently of the engine's index lists
    rng = np.random.default_rng(config.seed)
    cells = (rng.random((2, *spec.mask_grid, 1)) < config.rho).astype(np.float32)
    assert record["rho_spatial"] == pytest.approx(cells.mean())
    conv1 = dilate_mask(upsample_nearest(cells, 2), spec.stride, spec.conv1_hw)
    assert record["rho_conv1"] == pytest.approx(float(np.mean(np.asarray(conv1))))
    assert record["plan"]["run"] == "sparse" and 0 < record["seconds"] <= record["median_s"]
    # the plan the engine makes for these counts with its default capacity ladder
    steps = inspect.signature(SparseEngine).parameters["capacity_steps"].default
    counts = np.asarray([cells.sum(), np.sum(np.asarray(conv1)), 0, 2])
    assert record["plan"] == dataclasses.asdict(plan_block(spec, counts, 2, steps))
    assert len(record["repeats"]) == 2
    path = str(tmp_path / "t.json")
    timing.save_measurements(path, [record])
    data = timing.to_measurements(timing.load_measurements(path))
    assert len(data) == 1 and float(data.settings.rho_conv1[0]) == pytest.approx(record["rho_conv1"])

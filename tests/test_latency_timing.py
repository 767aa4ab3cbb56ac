"""Calibration timing harness against the sparse engine (runs once laud_jax.sparse is present)."""

import numpy as np
import pytest


from laud_jax.latency import timing
from laud_jax.models.gates import dilate_mask, upsample_nearest


def test_timed_block_reports_the_densities_the_engine_executes(tmp_path):
    config = timing.TimingConfig(arch="resnet_small", image=64, block=1, mode="spatial", granularity=2, rho=0.4,
                                 batch=2, seed=3)
    record = timing.time_config(config, repeats=2, warmup=1)
    spec = config.spec()
    # the same random masks, recomputed independently of the engine's index lists
    rng = np.random.default_rng(config.seed)
    cells = (rng.random((2, *spec.mask_grid, 1)) < config.rho).astype(np.float32)
    assert record["rho_spatial"] == pytest.approx(cells.mean())
    conv1 = dilate_mask(upsample_nearest(cells, 2), spec.stride, spec.conv1_hw)
    assert record["rho_conv1"] == pytest.approx(float(np.mean(np.asarray(conv1))))
    assert record["plan"]["run"] == "sparse" and 0 < record["seconds"] <= record["median_s"]
    path = str(tmp_path / "t.json")
    timing.save_measurements(path, [record])
    data = timing.to_measurements(timing.load_measurements(path))
    assert len(data) == 1 and float(data.settings.rho_conv1[0]) == pytest.approx(record["rho_conv1"])

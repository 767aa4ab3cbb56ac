"""experiments/latency_loop.py in quick mode: the table's structure, and that its measured
columns are the benchmark's and its predicted ones the latency predictor's."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from laud_jax import config_utils, data
from laud_jax.latency import block_setting, get_profile, predict, resolve_hardware, search_config
from laud_jax.latency.launches import ENGINES, BlockShape
from laud_jax.latency.predictor import block_masker_time, block_time
from laud_jax.models import network_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("spatial", "search", "spatial_local", "demo_b1")
PROFILE = os.path.join(REPO, "docs", "latency_local_profile.json")  # a fitted local profile, tracked


def _load_script():
    spec = importlib.util.spec_from_file_location("latency_loop", os.path.join(REPO, "experiments", "latency_loop.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["latency_loop"] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    module = _load_script()
    out = tmp_path_factory.mktemp("loop") / "loop"
    flags = [f"--profile={PROFILE}", f"--cases={','.join(CASES)}", f"--out={out}", "--no-plot"]
    report = module.main(["--quick", *flags])
    return module, report, out


def test_table_structure(loop):
    _, report, out = loop
    assert [c["name"] for c in report["cases"]] == list(CASES)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [c["name"] for c in saved["cases"]] == list(CASES)
    for case in report["cases"]:
        record = case["record"]
        assert len(case["rows"]) == len(record["blocks"]) > 0
        for row in case["rows"]:
            for key in ("measured_ratio", "predicted_ratio", "error", "measured_dense_ms", "predicted_static_ms"):
                assert np.isfinite(row[key]), (case["name"], row["name"], key)
            assert row["error"] == pytest.approx(row["predicted_ratio"] / row["measured_ratio"] - 1.0)
        summary = case["summary"]
        assert summary["count"] == sum(r["plan"] != "skip" for r in case["rows"])
        assert 0.0 <= summary["within_20"] <= 1.0 and summary["median_abs"] >= 0.0
        net = case["network"]
        assert net["error"] == pytest.approx(net["predicted_ratio"] / net["measured_ratio"] - 1.0)
    assert report["overall"]["count"] == sum(c["summary"]["count"] for c in report["cases"] if c["base"] is None)
    md = out.with_suffix(".md").read_text()
    assert md.count("| **network** |") == len(CASES)
    assert "random weights and random masks" in md and "load average" in md
    for case in report["cases"]:
        assert case["title"] in md


def test_measured_columns_are_the_benchmarks(loop):
    _, report, _ = loop
    for case in report["cases"]:
        record = case["record"]
        assert case["network"]["measured_ratio"] == record["latency_ratio"]
        assert case["network"]["measured_dense_ms"] == record["dense_ms"]
        for row, block in zip(case["rows"], record["blocks"]):
            assert row["name"] == block["name"]
            assert row["measured_ratio"] == block["latency_ratio"]
            assert row["measured_dense_ms"] == block["dense_ms"]
            assert row["counts"] == block["counts"] and row["capacities"] == block["capacities"]


def test_predicted_columns_are_the_predictors_at_the_executed_counts(loop):
    module, report, _ = loop
    profile = get_profile(PROFILE)
    call_ms = 1e3 * float(profile.call_overhead)
    profile_arrays, engine = profile.as_arrays(), ENGINES["xla"].as_arrays()
    for case in report["cases"]:
        record = case["record"]
        spec = network_spec(record["model"], record["image_shape"])
        batch = record["batch"]
        # static side: the public predict() (block times without the call overhead)
        static = predict(spec, profile, "xla", rho=1.0, batch=batch)
        for row, block, expected in zip(case["rows"], spec.blocks, static.blocks):
            assert row["predicted_static_ms"] == pytest.approx(expected["static_ms"] + call_ms, rel=1e-4)
            if row["plan"] != "sparse":
                continue
            # the padded capacities are the ones the engine executed
            assert row["capacities_match"], (case["name"], row["name"])
            # dynamic side: block_time less the overhead slots, at count / total rates
            counts = row["counts"]
            grid = block.mask_grid[0] * block.mask_grid[1]
            setting = block_setting(
                block.mode,
                block.granularity,
                rho_spatial=counts["cells"] / (batch * grid) if block.spatial else None,
                rho_conv1=counts["pixels"] / (batch * block.conv1_hw[0] * block.conv1_hw[1]) if block.spatial else -1,
                rho_channel=counts["groups"] / block.channel_groups if block.channel else None,
                rho_layer=counts["samples"] / batch if block.layer else None,
                channel_granularity=block.channel_granularity,
                batch=batch,
            )
            shape = BlockShape.from_specs([block])
            shape = type(shape)(**{k: v[0] for k, v in vars(shape).items()})
            seconds = float(
                block_time(profile_arrays, engine, shape, setting)
                - block_masker_time(profile_arrays, engine, shape, setting)
            )
            assert row["predicted_dynamic_ms"] == pytest.approx(1e3 * seconds + call_ms, rel=1e-4)


def test_search_choice_and_demo_model_reach_the_benchmark(loop):
    _, report, _ = loop
    cases = {c["name"]: c for c in report["cases"]}
    stages = report["search"]["stages"]
    model = cases["search"]["record"]["model"]
    assert tuple(model["mode"]) == tuple(s["mode"] for s in stages)
    assert all(m in ("spatial", "channel", "layer") for m in model["mode"])
    demo = cases["demo_b1"]["record"]["model"]
    # the quickstart's 'auto' fields, resolved by the search on the profile as the trainer does
    config = config_utils.load_config_file(os.path.join(REPO, "configs", "quickstart.py"))
    info = data.dataset_info(config.data)
    picked = search_config(config, info.image_shape, info.num_classes, resolve_hardware(PROFILE))
    modes = [demo["mode"]] * 4 if isinstance(demo["mode"], str) else list(demo["mode"])
    assert tuple(modes) == picked.modes and tuple(demo["granularity"]) == picked.granularity
    assert demo["arch"] == "resnet_small" and tuple(demo["stage_widths"]) == (8, 16, 32, 64)
    assert tuple(demo["stage_depths"]) == (2, 2, 2, 1) and demo["num_classes"] == 10
    assert cases["demo_b1"]["record"]["image_shape"] == [64, 64, 1]


def test_choice_run_lists_the_engines_plans(loop):
    _, report, _ = loop
    choice = {c["name"]: c for c in report["cases"]}["spatial_local"]
    assert choice["base"] == "spatial"
    assert choice["record"]["latency_profile"] == PROFILE
    assert [r["plan"] for r in choice["rows"]] == list(choice["record"]["runs"])
    gated = [r for r in choice["rows"] if r["counts"] is not None and r["plan"] != "skip"]
    assert gated and all(r["chooser"] is not None for r in gated)


def test_rerender_keeps_the_reading(loop):
    module, report, out = loop
    md = out.with_suffix(".md")
    text = md.read_text().replace("(not written yet)", "A hand-written reading.")
    md.write_text(text)
    module.main([f"--from-json={out.with_suffix('.json')}", f"--out={out}", "--no-plot"])
    assert "A hand-written reading." in md.read_text()

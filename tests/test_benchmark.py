"""Benchmark CLI: the JSON record, its MAC ratio against an independent count, bad arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest

from laud_jax import benchmark
from laud_jax.models import network_spec
from laud_jax.sparse.synthetic import random_masks

TINY_ARGS = [
    "--arch",
    "resnet_tiny",
    "--image-size",
    "32",
    "--num-classes",
    "7",
    "--repeats",
    "3",
    "--block-repeats",
    "2",
    "--warmup",
    "1",
    "--no-progress",
    "--skip-masked",
]


def independent_mac_ratio(cfg, image, batch, rate, seed) -> float:
    """Dynamic / dense MACs from the spec and the masks alone (receptive fields counted in numpy)."""
    spec = network_spec(cfg, image)
    masks = random_masks(spec, batch, rate, seed=seed)
    dynamic = 0.0
    for block, mask in zip(spec.blocks, masks):
        out = np.kron(mask["spatial"][..., 0], np.ones((1, block.granularity, block.granularity)))
        read = np.zeros((batch, block.h_in, block.w_in), bool)
        s = block.stride
        for b, i, j in zip(*np.nonzero(out)):
            read[b, max(s * i - 1, 0) : s * i + 2, max(s * j - 1, 0) : s * j + 2] = True
        dynamic += (
            block.conv1_macs * read.mean()
            + (block.conv2_macs + block.conv3_macs) * out.mean()
            + block.downsample_macs
            + block.masker_macs
        )
    return (spec.fixed_macs + dynamic) / spec.dense_macs


def test_json_record_holds_side_by_side_figures(tmp_path, capsys):
    path = tmp_path / "bench.json"
    args = TINY_ARGS + [
        "--mode",
        "spatial",
        "--granularity",
        "2,2,1,1",
        "--rate",
        "0.5",
        "--batch",
        "2",
        "--json",
        str(path),
    ]
    result = benchmark.main(args)
    record = json.loads(path.read_text())
    for key in ("dense_ms", "dynamic_ms", "latency_ratio", "mac_ratio", "blocks"):
        assert key in record
    assert record["latency_ratio"] == pytest.approx(record["dynamic_ms"] / record["dense_ms"])
    assert record["dense"]["min_ms"] <= record["dense_ms"] <= record["dense"]["max_ms"]
    cfg = {"arch": "resnet_tiny", "num_classes": 7, "mode": "spatial", "granularity": (2, 2, 1, 1)}
    assert record["mac_ratio"] == pytest.approx(independent_mac_ratio(cfg, (32, 32, 3), 2, 0.5, 0), rel=1e-5)
    assert record["execution"] == "planned" and "stepwise" in record["others"]
    assert len(record["blocks"]) == len(network_spec(cfg, (32, 32, 3)).blocks)
    assert all(b["plan"] == "sparse" and 0 < b["mac_ratio"] < 1 for b in record["blocks"])
    assert max(record["max_abs_diff_vs_model"].values()) < 1e-3
    assert record["machine"]["load_before"] and record == json.loads(json.dumps(result))
    table = capsys.readouterr().out
    assert "network" in table and "layer4_0" in table and "load average" in table


def test_layer_mode_counts_executed_blocks():
    result = benchmark.main(TINY_ARGS + ["--mode", "layer", "--rate", "0.4", "--no-blocks"])
    spec = network_spec({"arch": "resnet_tiny", "num_classes": 7, "mode": "layer"}, (32, 32, 3))
    executed = round(0.4 * len(spec.blocks))
    branch = [b.dense_macs - b.downsample_macs for b in spec.blocks]
    assert executed == 2
    # Which blocks run is random; the MAC ratio must be one of the possible exact values.
    possible = {
        (spec.dense_macs - sum(branch) + branch[i] + branch[j] + sum(b.masker_macs for b in spec.blocks))
        / spec.dense_macs
        for i in range(len(branch))
        for j in range(i + 1, len(branch))
    }
    assert min(abs(result["mac_ratio"] - p) for p in possible) < 1e-6


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--rate", "1.5"], "--rate must be in"),
        (["--granularity", "4,x,2,1"], "granularity must be integers"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--backend", "cuda"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(argv)
    assert message in capsys.readouterr().err


def test_model_errors_are_reported_without_traceback():
    with pytest.raises(SystemExit, match="does not divide"):
        benchmark.main(TINY_ARGS + ["--mode", "spatial", "--granularity", "3,2,1,1"])


def test_help_describes_the_measurement(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--rate" in out and "--checkpoint" in out and "block_until_ready" in out


def test_run_benchmark_takes_keyword_arguments_like_the_cli():
    """The Python API and the CLI build the same settings; the record is the same kind."""
    kwargs = dict(
        arch="resnet_tiny",
        image_size=32,
        num_classes=7,
        repeats=3,
        warmup=1,
        mode="channel",
        rate=0.25,
        batch=2,
        blocks=False,
        masked=False,
        stepwise=False,
        progress=False,
    )
    settings, json_path = benchmark.parse_args(
        TINY_ARGS + ["--mode", "channel", "--rate", "0.25", "--batch", "2", "--no-blocks", "--skip-stepwise"]
    )
    assert json_path is None
    assert settings == benchmark.BenchmarkSettings(**{**kwargs, "block_repeats": 2})
    result = benchmark.run_benchmark(**kwargs)
    assert result["batch"] == 2 and result["rate"] == 0.25 and "blocks" not in result
    assert set(result["others"]) == set()  # stepwise and the masked reference were switched off
    assert 0 < result["mac_ratio"] < 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rate": -0.1}, "--rate must be in"),
        ({"repeats": 0}, "--repeats must be >= 1"),
        ({"backend": "cuda"}, "--backend must be one of"),
    ],
)
def test_run_benchmark_rejects_bad_keywords_before_building(kwargs, message):
    with pytest.raises(ValueError, match=message):
        benchmark.run_benchmark(arch="resnet_tiny", image_size=32, **kwargs)

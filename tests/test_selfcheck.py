"""`python -m laud_jax.gpu_check.selfcheck --quick` runs in-process on CPU (kernels in
interpret mode): pallas equals xla block by block and for the whole network, every block
really launches the three spatial kernels, and the JSON and table hold what they say."""

from __future__ import annotations

import json

import numpy as np
import pytest

from laud_jax.gpu_check import selfcheck

SPATIAL_KERNELS = ["conv1x1_scatter_add", "gather_matmul", "patch_conv"]
RECORD_KEYS = {
    "scope",
    "name",
    "stage",
    "S",
    "plan",
    "capacities",
    "density",
    "batch",
    "dtype",
    "relative_error",
    "max_abs_error",
    "kernels",
    "xla",
    "pallas",
    "speedup",
}


def test_quick_selfcheck_matches_xla_and_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "selfcheck.json"
    assert selfcheck.main(["--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"device", "implementation", "setup", "tolerance", "passed", "records"}
    assert result["passed"] is True and result["implementation"] == "interpret"
    assert result["setup"]["arch"] == "resnet_tiny" and result["setup"]["image"] == [32, 48]
    records = result["records"]
    blocks = [r for r in records if r["scope"] == "block"]
    [network] = [r for r in records if r["scope"] == "network"]
    assert [r["stage"] for r in blocks] == [1, 2, 3, 4]  # one block per stage
    for record in records:
        assert set(record) == RECORD_KEYS
        assert record["relative_error"] <= 1e-5, record  # float32, interpret mode: exact-ish
        assert record["max_abs_error"] <= record["relative_error"] * 1e3
        for backend in ("xla", "pallas"):
            stats = record[backend]
            assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
        assert record["speedup"] == pytest.approx(record["xla"]["median_ms"] / record["pallas"]["median_ms"])
    for record in blocks:
        assert record["plan"] == "sparse" and sorted(record["kernels"]) == SPATIAL_KERNELS
        assert 0 < record["capacities"]["cells"] and 0 < record["capacities"]["pixels"]
    assert sorted(set(network["kernels"])) == SPATIAL_KERNELS
    assert len(network["kernels"]) == 3 * 5  # resnet_tiny: five spatial blocks

    table = capsys.readouterr().out
    assert "rel. error" in table and "xla ms" in table and "pallas ms" in table
    assert table.count("\nblock ") == 4 and table.count("\nnetwork ") == 1


def test_relative_error_is_scaled_by_the_reference():
    expected = np.array([[2.0, -4.0], [1.0, 0.0]], np.float32)
    actual = expected + np.array([[0.0, 0.0], [0.5, 0.0]], np.float32)
    assert selfcheck.relative_error(actual, expected) == (0.125, 0.5)
    assert selfcheck.relative_error(expected, expected) == (0.0, 0.0)


def test_command_line_defaults_and_overrides():
    _, setup = selfcheck.parse_args([])  # no GPU here: the quick setup
    assert setup == selfcheck.QUICK
    _, setup = selfcheck.parse_args(
        [
            "--arch",
            "resnet50",
            "--image-size",
            "64",
            "96",
            "--granularity",
            "2",
            "2",
            "1",
            "1",
            "--densities",
            "0.25",
            "1",
            "--dtype",
            "bfloat16",
            "--batch",
            "2",
            "--all-blocks",
        ]
    )
    assert (setup.arch, setup.image, setup.granularity) == ("resnet50", (64, 96), (2, 2, 1, 1))
    assert (setup.densities, setup.dtype, setup.batch, setup.all_blocks) == ((0.25, 1.0), "bfloat16", 2, True)
    for bad in (["--densities", "1.5"], ["--batch", "0"], ["--dtype", "float16"]):
        with pytest.raises(SystemExit):
            selfcheck.parse_args(bad)


def test_help_names_the_quick_mode(capsys):
    with pytest.raises(SystemExit):
        selfcheck.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--quick" in text and "--json" in text and "pallas" in text and "xla" in text

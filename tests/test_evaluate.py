"""Evaluation: accuracy/density aggregation against a direct computation, gate offset, CLI report."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT
from fixtures.tiny_checkpoint import IMAGE_SIZE, mixed_gate_variables, shared_tiny_checkpoint, tiny_model_config

from laud_jax import evaluate
from laud_jax.models import build_model, network_spec
from laud_jax.training import steps


@pytest.fixture
def tiny_dir():
    return shared_tiny_checkpoint()


def _batches(images, labels, size):
    """Batches of ``size``; the last one padded with weight 0, as the data pipeline does."""
    for start in range(0, len(images), size):
        ids = np.arange(start, start + size)
        weight = (ids < len(images)).astype(np.float32)
        ids = np.minimum(ids, len(images) - 1)
        yield {"image": images[ids], "label": labels[ids], "weight": weight}


def test_accuracy_and_density_match_a_direct_computation():
    cfg = tiny_model_config(("spatial", "channel", "layer", "spatial+channel"))
    variables = mixed_gate_variables(cfg, seed=3)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(23, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    logits, aux = jax.jit(build_model(cfg).apply)(variables, images)
    logits = np.asarray(logits)
    labels = np.argsort(-logits, axis=1)[:, rng.integers(0, 7, len(images))].diagonal().astype(np.int32)
    result = evaluate.accuracy_and_density(cfg, variables, _batches(images, labels, 8), progress=False)
    ranks = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(axis=1)
    assert result["examples"] == 23
    assert result["top1"] == pytest.approx(np.mean(ranks == 0))
    assert result["top5"] == pytest.approx(np.mean(ranks < 5))
    assert 0 < result["top1"] < result["top5"] < 1
    spec = network_spec(cfg, images.shape[1:])
    for stage in result["stages"]:
        idx = [i for i, b in enumerate(spec.blocks) if b.stage == stage["stage"] - 1]
        dynamic = sum(float(np.mean(aux["blocks"][i]["macs"])) for i in idx)
        dense = sum(spec.blocks[i].dense_macs for i in idx)
        assert stage["density"] == pytest.approx(dynamic / dense, rel=1e-5)
    assert result["mac_ratio"] == pytest.approx(float(np.mean(aux["macs"])) / spec.dense_macs, rel=1e-5)
    layer_rate = float(np.mean(aux["blocks"][-2]["layer_gate"]))  # stage 3 is one layer-gated block
    assert result["stages"][2]["layer_rate"] == pytest.approx(layer_rate)
    assert all(0 < s["density"] < 1.2 for s in result["stages"])
    first = evaluate.accuracy_and_density(cfg, variables, _batches(images, labels, 8), max_examples=10, progress=False)
    assert first["examples"] == 10
    assert first["top1"] == pytest.approx(np.mean(ranks[:10] == 0))


def test_gate_offset_trades_work_for_nothing_else():
    cfg = tiny_model_config()
    variables = mixed_gate_variables(cfg, seed=1)
    rng = np.random.default_rng(1)
    images = rng.normal(size=(8, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 8).astype(np.int32)
    step = evaluate.make_eval_step(build_model(cfg))
    results = [
        evaluate.accuracy_and_density(
            cfg, variables, _batches(images, labels, 8), gate_offset=offset, progress=False, eval_step=step
        )
        for offset in (-100.0, 0.0, 1.0, 100.0)
    ]
    ratios = [r["mac_ratio"] for r in results]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > ratios[1] > ratios[-1]
    assert all(s["spatial_rate"] == 1.0 for s in results[0]["stages"])
    assert all(s["spatial_rate"] == 0.0 for s in results[-1]["stages"])
    assert 0 < results[1]["stages"][0]["spatial_rate"] < 1


def test_evaluate_checkpoint_reports_everything(tiny_dir):
    result = evaluate.evaluate_checkpoint(
        tiny_dir, max_examples=300, repeats=2, hardware="v100", progress=False, latency_profile="v100"
    )
    assert result["examples"] == 300 and result["data"]["name"] == "cluttered_mnist"
    # The engine chose per gated block (v100 profile); every gated block is counted once.
    gated = sum(1 for b in network_spec(result["model"], tuple(result["image_shape"])).blocks if b.mode != "static")
    assert result["latency"]["latency_profile"] == "v100" and sum(result["latency"]["gated_runs"].values()) == gated
    assert 0 <= result["top1"] <= result["top5"] <= 1
    latency = result["latency"]
    assert latency["backend"] == "xla" and latency["dense_ms"] > 0 and latency["sparse_ms"] > 0
    assert latency["max_logit_difference"] < 1e-3  # the sparse engine computes the same function
    predicted = result["predicted"]
    assert predicted["static_ms"] > 0 and predicted["dynamic_ms"] > 0
    table = evaluate.format_table(result)
    for text in ("top-1", "MAC ratio", "stage", "measured", "predicted", f"{100 * result['top1']:.2f} %"):
        assert text in table
    # how each block ran, one character per block in network order
    assert len(latency["runs"]) == len(network_spec(result["model"], tuple(result["image_shape"])).blocks)
    assert (
        f"per block (s sparse, d dense (masked, or a static block), - skipped): {evaluate.run_codes(latency['runs'])}"
        in table
    )


def test_cli_writes_json_and_reports_errors(tiny_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = evaluate.main(
        [
            f"--checkpoint={tiny_dir}",
            "--max-examples=100",
            "--no-latency",
            "--hardware=",
            f"--json={out}",
            "--no-progress",
            "--gate_offset=0.5",
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["examples"] == 100 and report["gate_offset"] == 0.5 and "latency" not in report
    assert "gate offset +0.5" in capsys.readouterr().out
    assert evaluate.main([]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err
    assert evaluate.main([f"--checkpoint={tmp_path / 'nowhere'}"]) == 1
    assert "no such file" in capsys.readouterr().err
    assert evaluate.main([f"--checkpoint={tiny_dir}", "--hardware=abacus"]) == 1
    assert "unknown hardware 'abacus'" in capsys.readouterr().err
    assert evaluate.main(["--help"]) == 0
    assert "--gate-offset" in capsys.readouterr().out


def test_gate_offset_sweep_script(tiny_dir, tmp_path, capsys):
    import importlib.util
    import os

    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "gate_offset_sweep.py"
    )
    spec = importlib.util.spec_from_file_location("gate_offset_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    out = tmp_path / "sweep"
    assert (
        sweep.main([f"--checkpoint={tiny_dir}", "--offsets=0,50", "--max-examples=64", "--repeats=1", f"--out={out}"])
        == 0
    )
    report = json.loads((tmp_path / "sweep.json").read_text())
    rows = report["rows"]
    assert [r["gate_offset"] for r in rows] == [0.0, 50.0]
    assert rows[1]["mac_ratio"] < rows[0]["mac_ratio"] and all(r["dynamic_ms"] > 0 for r in rows)
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert "| +50 |" in capsys.readouterr().out


def test_mask_coverage_sums_equal_a_pixel_loop():
    """Non-square image and grid: cells of 4 x 5 pixels; group masks executed where any group is."""
    rng = np.random.default_rng(4)
    mask = (rng.random((2, 3, 4, 2)) < 0.4).astype(np.float32)
    digit = rng.random((2, 12, 20)) < 0.1
    clutter = rng.random((2, 12, 20)) < 0.05
    digit[1, :4, :5] = clutter[1, :4, :5] = False  # at least one blank cell
    weight = np.asarray([1.0, 0.5], np.float32)
    sums = np.asarray(steps.mask_coverage_sums(mask, digit, clutter, weight), np.float64)
    expected = dict.fromkeys(steps.COVERAGE_KEYS, 0.0)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                executed = mask[b, i, j].max()
                cell_digit = digit[b, 4 * i : 4 * i + 4, 5 * j : 5 * j + 5].sum()
                cell_clutter = clutter[b, 4 * i : 4 * i + 4, 5 * j : 5 * j + 5].sum()
                blank = float(cell_digit + cell_clutter == 0)
                for key, value in (
                    ("digit_hit", cell_digit * executed),
                    ("digit_ink", cell_digit),
                    ("clutter_hit", cell_clutter * executed),
                    ("clutter_ink", cell_clutter),
                    ("blank_hit", blank * executed),
                    ("blank_cells", blank),
                ):
                    expected[key] += weight[b] * value
    np.testing.assert_allclose(sums, [expected[k] for k in steps.COVERAGE_KEYS], rtol=1e-6)
    assert expected["blank_cells"] > 0 and 0 < expected["digit_hit"] < expected["digit_ink"]


def test_evaluate_reports_mask_coverage_on_the_embedded_dataset(tiny_dir, tmp_path):
    out = tmp_path / "eval.json"
    assert (
        evaluate.main(
            [
                f"--checkpoint={tiny_dir}",
                "--no-latency",
                "--hardware=",
                f"--exp={os.path.join(REPO_ROOT, 'configs', 'tiny.py')}",
                "--exp.data.num_clutter=2",
                "--max-examples=250",
                f"--json={out}",
                "--no-progress",
            ]
        )
        == 0
    )
    coverage = json.loads(out.read_text())["mask_coverage"]
    spec = network_spec(tiny_model_config(), (IMAGE_SIZE, IMAGE_SIZE, 1))
    assert [c["stage"] for c in coverage] == sorted({b.stage + 1 for b in spec.blocks if b.spatial})
    for entry in coverage:
        assert set(entry) == {"stage", "digit", "clutter", "background"}
        assert all(0.0 <= entry[k] <= 1.0 for k in ("digit", "clutter", "background"))
    table = evaluate.format_table(json.loads(out.read_text()))
    assert "mask coverage" in table

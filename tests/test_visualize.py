"""Mask pictures: the PNG is written and shows executed and skipped patches differently."""

from __future__ import annotations

import numpy as np
from fixtures.tiny_checkpoint import IMAGE_SIZE, mixed_gate_variables, shared_tiny_checkpoint, tiny_model_config
from PIL import Image

from laud_jax import visualize
from laud_jax.models import network_spec


def _half_masks(spec, batch):
    """Force every spatial mask on in the left half of its grid, off in the right half."""
    masks = []
    for block in spec.blocks:
        hm, wm = block.mask_grid
        mask = np.zeros((batch, hm, wm, block.mask_groups), np.float32)
        mask[:, :, : wm // 2] = 1.0
        masks.append({"spatial": mask})
    return masks


def test_png_shows_executed_and_skipped_patches(tmp_path):
    cfg = tiny_model_config()
    variables = mixed_gate_variables(cfg)
    images = np.full((2, IMAGE_SIZE, IMAGE_SIZE, 1), 0.7, np.float32)  # uniform: only masks vary
    spec = network_spec(cfg, images.shape[1:])
    out = tmp_path / "masks.png"
    result = visualize.mask_figure(cfg, variables, images, str(out), masks=_half_masks(spec, 2))
    assert out.exists() and out.stat().st_size > 1000
    expected = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    expected[:, : IMAGE_SIZE // 2] = 1.0
    for stage_map in result["maps"]:
        np.testing.assert_array_equal(stage_map[0], expected)
    png = np.asarray(Image.open(out).convert("RGB"), np.float32) / 255.0
    for panel in result["panels"][0][1:]:  # image 0, one panel per stage
        x0, y0, x1, y1 = panel
        ys = int(y0 + 0.5 * (y1 - y0))
        executed = png[ys, int(x0 + 0.25 * (x1 - x0))]
        skipped = png[ys, int(x0 + 0.75 * (x1 - x0))]
        assert np.abs(executed - skipped).max() > 0.2
        assert executed[0] > executed[2] + 0.1  # tinted orange
        assert skipped.max() < executed.max()  # darkened
    for i, row in enumerate(result["titles"]):
        assert len(row) == 5
        for j, title in enumerate(row[1:]):
            assert f"density {result['densities'][i, j]:.2f}" in title
    assert np.all((result["densities"] > 0.3) & (result["densities"] < 0.9))


def test_overlay_marks_only_executed_pixels():
    image = np.random.default_rng(0).uniform(size=(8, 8, 3))
    executed = np.zeros((8, 8))
    executed[2:5, 3:6] = 1.0
    out = visualize.overlay(image, executed)
    gray = image.mean(axis=-1)
    np.testing.assert_allclose(out[executed == 0], np.repeat(gray[executed == 0, None] * 0.3, 3, axis=1))
    assert np.all(out[executed == 1][:, 0] > out[executed == 1][:, 2])


def test_cli_draws_dataset_images(tmp_path, capsys):
    directory = shared_tiny_checkpoint()
    out = tmp_path / "grid.png"
    assert visualize.main([f"--checkpoint={directory}", "--num=3", f"--out={out}"]) == 0
    assert "wrote" in capsys.readouterr().out
    image = Image.open(out)
    assert image.size[0] > image.size[1] > 100  # 3 rows x 5 columns
    digit = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).uniform(size=(40, 40)) * 255).astype(np.uint8)).save(digit)
    assert visualize.main([f"--checkpoint={directory}", f"--images={digit}", f"--out={out}"]) == 0
    capsys.readouterr()
    assert visualize.main([f"--checkpoint={directory}", "--images", str(digit), str(digit), f"--out={out}"]) == 0
    assert ": 2 images;" in capsys.readouterr().out  # --images takes several files, as the docs show
    assert visualize.main([f"--checkpoint={directory}", f"--images={tmp_path / 'no.png'}"]) == 1
    assert "no such image" in capsys.readouterr().err
    assert visualize.main([f"--checkpoint={directory}", "--num=0"]) == 1
    assert "--num must be >= 1" in capsys.readouterr().err


def test_images_flag_takes_several_files_and_repeats():
    args = visualize.build_parser().parse_args(["--images", "a.png", "b.png", "--images=c.png", "--num", "2"])
    assert args.images == ["a.png", "b.png", "c.png"] and args.num == 2

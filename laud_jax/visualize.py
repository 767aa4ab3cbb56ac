"""Mask pictures: where each stage of a dynamic network executes, over the input images.

    python -m laud_jax.visualize --checkpoint runs/quickstart --out masks.png
    python -m laud_jax.visualize --checkpoint converted/laud_r50 --exp configs/resnet50.py \\
        --images cat.jpg dog.jpg --out masks.png

One row per image: the image, then one panel per stage with the stage's executed patches
tinted (the fraction of the stage's blocks that execute each pixel: spatial masks upsampled
to the image; layer and channel gates cover the whole image with their rate) and skipped
regions darkened. Titles give the stage's density (executed / dense MACs of its blocks) for
that image. Default images: the first test canvases of the embedded dataset.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from laud_jax import config_utils
from laud_jax.evaluate import add_checkpoint_arguments, data_config, load_checkpoint
from laud_jax.models import build_model, network_spec

EXECUTED_COLOR = np.array([1.0, 0.45, 0.0])  # orange tint on executed pixels
SKIPPED_BRIGHTNESS = 0.3  # skipped pixels keep this fraction of their brightness


def stage_maps(aux: Mapping[str, Any], spec: Any, image_hw: Sequence[int]) -> np.ndarray:
    """(stages, B, H, W): fraction of each stage's blocks that execute each image pixel.

    A block executes a pixel where its spatial mask (any group) is on, scaled by its layer
    gate and by the fraction of its channel groups that run.
    """
    h, w = image_hw
    stages = sorted({b.stage for b in spec.blocks})
    out = np.zeros((len(stages), aux["blocks"][0]["layer_gate"].shape[0], h, w), np.float32)
    counts = np.zeros(len(stages), np.float32)
    for block, record in zip(spec.blocks, aux["blocks"]):
        spatial = np.asarray(record["spatial_mask"], np.float32).mean(axis=-1)  # (B, Hm, Wm)
        rows = np.minimum(np.arange(h) * spatial.shape[1] // h, spatial.shape[1] - 1)
        cols = np.minimum(np.arange(w) * spatial.shape[2] // w, spatial.shape[2] - 1)
        pixels = spatial[:, rows][:, :, cols]
        scale = np.asarray(record["layer_gate"], np.float32) * np.asarray(record["channel_mask"], np.float32).mean(-1)
        out[stages.index(block.stage)] += pixels * scale[:, None, None]
        counts[stages.index(block.stage)] += 1
    return out / counts[:, None, None, None]


def stage_densities(aux: Mapping[str, Any], spec: Any) -> np.ndarray:
    """(B, stages): executed / dense MACs of each stage's blocks, per image."""
    stages = sorted({b.stage for b in spec.blocks})
    batch = aux["blocks"][0]["layer_gate"].shape[0]
    macs = np.zeros((batch, len(stages)))
    dense = np.zeros(len(stages))
    for block, record in zip(spec.blocks, aux["blocks"]):
        macs[:, stages.index(block.stage)] += np.asarray(record["macs"], np.float64)
        dense[stages.index(block.stage)] += float(record["dense_macs"])
    return macs / dense


def display_image(image: np.ndarray) -> np.ndarray:
    """(H, W, C) model input -> (H, W, 3) in [0, 1] for display (min-max scaled)."""
    image = np.asarray(image, np.float32)
    lo, hi = float(image.min()), float(image.max())
    image = (image - lo) / (hi - lo) if hi > lo else np.full_like(image, 0.5)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def overlay(image: np.ndarray, executed: np.ndarray) -> np.ndarray:
    """(H, W, 3) display image with skipped pixels darkened and executed ones tinted."""
    gray = image.mean(axis=-1, keepdims=True)
    f = np.clip(executed, 0.0, 1.0)[..., None]
    base = gray * (SKIPPED_BRIGHTNESS + (1.0 - SKIPPED_BRIGHTNESS) * f)
    return np.clip(base * (1.0 - 0.45 * f) + EXECUTED_COLOR * 0.45 * f, 0.0, 1.0)


def mask_figure(
    model_cfg: Mapping[str, Any],
    variables: Mapping[str, Any],
    images: np.ndarray,
    out: str,
    *,
    gate_offset: float = 0.0,
    masks: Sequence[Mapping[str, Any]] | None = None,
    labels: Sequence[str] | None = None,
    dpi: int = 100,
) -> dict[str, Any]:
    """Write the PNG grid for ``images`` (B, H, W, C); returns titles, densities and panel boxes.

    ``panels[i][j]`` is the (x0, y0, x1, y1) pixel box of image ``i``'s panel ``j`` in the PNG
    (j = 0: the image, j = s: stage s), with y counted from the top.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(images, np.float32)
    spec = network_spec(model_cfg, images.shape[1:])
    model = build_model(model_cfg)
    _, aux = jax.jit(lambda v, x, o: model.apply(v, x, train=False, gate_offset=o, masks=masks))(
        variables, jnp.asarray(images), jnp.asarray(gate_offset, jnp.float32)
    )
    aux = jax.device_get(aux)
    maps = stage_maps(aux, spec, images.shape[1:3])
    densities = stage_densities(aux, spec)
    stages = sorted({b.stage for b in spec.blocks})
    modes = {b.stage: b.mode for b in spec.blocks}
    rows, cols = len(images), len(stages) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.0 * rows), squeeze=False, dpi=dpi)
    titles = []
    for i, image in enumerate(images):
        shown = display_image(image)
        row_titles = [labels[i] if labels else f"image {i}"]
        axes[i, 0].imshow(shown, interpolation="nearest")
        for j, stage in enumerate(stages):
            axes[i, j + 1].imshow(overlay(shown, maps[j, i]), interpolation="nearest")
            row_titles.append(f"stage {stage + 1} ({modes[stage]})\ndensity {densities[i, j]:.2f}")
        for ax, title in zip(axes[i], row_titles):
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        titles.append(row_titles)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fig.canvas.draw()
    height = fig.canvas.get_width_height()[1]
    panels = []
    for i in range(rows):
        row = []
        for ax in axes[i]:
            box = ax.get_window_extent()
            row.append((box.x0, height - box.y1, box.x1, height - box.y0))
        panels.append(row)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return {"titles": titles, "densities": densities, "maps": maps, "panels": panels, "path": os.path.abspath(out)}


def load_image_files(paths: Sequence[str], data_cfg: Any, image_shape: Sequence[int]) -> np.ndarray:
    """Image files -> model inputs (resize + centre crop as at evaluation, normalized as in training)."""
    from PIL import Image

    from laud_jax.data import EMBEDDED, tfds_source

    size, channels = int(image_shape[0]), int(image_shape[2])
    out = []
    for path in paths:
        with Image.open(path) as pil:
            image = np.asarray(pil.convert("L" if channels == 1 else "RGB"))
        if data_cfg.name == EMBEDDED:  # canvases are [0, 1], not normalized, and not cropped
            resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
            out.append((resized.astype(np.float32) / 255.0).reshape(size, size, channels))
            continue
        default_mean = tfds_source.IMAGENET_MEAN if channels == 3 else (0.5,) * channels
        default_std = tfds_source.IMAGENET_STD if channels == 3 else (0.25,) * channels
        mean = np.asarray(data_cfg.get("mean") or default_mean, np.float32)
        std = np.asarray(data_cfg.get("std") or default_std, np.float32)
        out.append(tfds_source.preprocess(image, size, False, None, mean, std))
    return np.stack(out)


def dataset_images(data_cfg: Any, num: int) -> tuple[np.ndarray, list[str]]:
    """``num`` test images: spread over the embedded test split (it is ordered by class),
    the first ``num`` of other datasets."""
    from laud_jax import data

    if data_cfg.name == data.EMBEDDED:
        total = data.dataset_info(data_cfg).num_eval
        batch = next(iter(data.eval_batches(data_cfg, total)))
        ids = np.linspace(0, total - 1, num).round().astype(int)
    else:
        batch = next(iter(data.eval_batches(data_cfg, num)))
        ids = np.arange(min(num, len(batch["label"])))
    labels = [f"test {i} (label {int(batch['label'][i])})" for i in ids]
    return np.asarray(batch["image"])[ids], labels


def build_parser() -> config_utils.ArgumentParser:
    """The flags of `python -m laud_jax.visualize`."""
    parser = config_utils.ArgumentParser("visualize", __doc__)
    config_utils.add_config_argument(
        parser, "Experiment config for the data (default: the config a training work dir recorded)."
    )
    add_checkpoint_arguments(parser)
    parser.add_argument(
        "--images",
        nargs="+",
        action="extend",
        default=[],
        metavar="FILE",
        help="Image files, one row each (default: the first --num test images of the dataset).",
    )
    parser.add_argument(
        "--num", metavar="N", type=int, default=6, help="Number of dataset images when --images is not given."
    )
    parser.add_argument("--out", metavar="FILE", default="masks.png", help="PNG file to write.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; `argv` without the program name (None = sys.argv[1:])."""
    import warnings

    from laud_jax import data

    try:
        args = config_utils.parse_command_line(build_parser(), argv)
    except config_utils.CommandLineExit as e:
        return e.code
    if not args.checkpoint:
        print("error: --checkpoint is required", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    try:
        model_cfg, variables, recorded = load_checkpoint(args.checkpoint, image_size=args.image_size or None)
        data_cfg = data_config(args.exp, recorded)
        info = data.dataset_info(data_cfg)
        model_cfg = {**model_cfg, "num_classes": model_cfg.get("num_classes") or info.num_classes}
        if args.images:
            missing = [p for p in args.images if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"no such image file(s): {missing}")
            images = load_image_files(args.images, data_cfg, info.image_shape)
            labels = [os.path.basename(p) for p in args.images]
        else:
            if args.num < 1:
                raise ValueError(f"--num must be >= 1, got {args.num}")
            images, labels = dataset_images(data_cfg, args.num)
        network_spec(model_cfg, images.shape[1:])
        result = mask_figure(model_cfg, variables, images, args.out, gate_offset=args.gate_offset, labels=labels)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    mean = result["densities"].mean(axis=0)
    print(f"wrote {result['path']}: {len(images)} images; mean stage densities " + ", ".join(f"{d:.2f}" for d in mean))
    return 0


if __name__ == "__main__":
    sys.exit(main())

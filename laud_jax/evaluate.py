"""Evaluate a checkpoint: accuracy, densities, MACs, measured and predicted latency.

    python -m laud_jax.evaluate --checkpoint runs/quickstart
    python -m laud_jax.evaluate --exp configs/resnet50.py --checkpoint converted/laud_r50 \\
        --backend pallas --hardware v100 --json eval.json

``--checkpoint``: a ``laud_jax.train`` work directory, a directory written by
``laud_jax.convert``, or a PyTorch ``.pth``/``.pth.tar`` file (converted on the fly). The
data come from ``--exp`` (any config; ``--exp.data.name=...`` picks the dataset) or, for a
training work directory, from the config it recorded. ``--gate-offset`` shifts every gate's
threshold (execute iff logit_execute - logit_skip >= offset): a positive offset skips more
work and runs faster, without retraining.

Reported: top-1/top-5; per-stage and overall density (the blocks' executed / dense MACs);
the network MAC ratio; gate rates; on the embedded dataset, per spatial stage, the mask
coverage (the fraction of the digit's ink and of the clutter's ink in executed cells, and
of blank cells executed); the latency of the static network and of the dynamic one
measured side by side with the sparse engine on this device (medians after warm-up); and the
latency the roofline predictor gives for a hardware profile at the measured gate rates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from laud_jax import checkpointing, config_utils, convert
from laud_jax.models import build_model, network_spec
from laud_jax.timing import stats_ms, time_side_by_side
from laud_jax.training import steps

BACKEND_CHOICES = ("auto", "xla", "pallas", "dense")


# ----------------------------------------------------------------------------- loading


def load_checkpoint(
    path: str, image_size: int | None = None, **model_overrides: Any
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(model config, variables, the directory's recorded config or None) of ``path``.

    A directory that cannot be read raises :class:`checkpointing.CheckpointError` (one line:
    what, the file, what to do).
    """
    if os.path.isdir(path):
        variables, recorded = checkpointing.load_variables(path)
        return {**recorded["model"], **model_overrides}, variables, recorded
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint {path}: no such file or directory")
    model_cfg, variables, _ = convert.convert_checkpoint(path, image_size=image_size, **model_overrides)
    return model_cfg, variables, None


def data_config(exp_config: Any | None, recorded: Mapping[str, Any] | None) -> Any:
    """The data section: ``--exp``'s, else the one a training work directory recorded."""
    import ml_collections

    if exp_config is not None:
        return exp_config.data
    if recorded and "data" in recorded and "name" in recorded["data"]:
        return ml_collections.ConfigDict(recorded["data"])
    raise ValueError(
        "the checkpoint records no data config (converted checkpoints do not): pass --exp "
        "CONFIG.py (e.g. configs/resnet50.py for ImageNet) to say what to evaluate on"
    )


# ----------------------------------------------------------------------------- accuracy


def make_eval_step(model: Any) -> Callable[..., dict[str, jax.Array]]:
    """The trainer's evaluation step (``training.steps.make_eval_step``), jitted."""
    return jax.jit(steps.make_eval_step(model))


def accuracy_and_density(
    model_cfg: Mapping[str, Any],
    variables: Mapping[str, Any],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    gate_offset: float = 0.0,
    max_examples: int = 0,
    total: int | None = None,
    progress: bool = True,
    eval_step: Callable[..., dict[str, jax.Array]] | None = None,
) -> dict[str, Any]:
    """top-1/top-5, MAC ratio, per-stage density and gate rates over ``batches``.

    ``batches`` yield ``image`` (B, H, W, C), ``label`` (B,) and optionally ``weight`` (B,)
    (0 for padding). ``max_examples`` > 0 stops after that many examples.
    """
    from tqdm import tqdm

    step = eval_step or make_eval_step(build_model(model_cfg))
    offset = jnp.asarray(gate_offset, jnp.float32)
    totals: dict[str, np.ndarray] | None = None
    image_shape = None
    bar = tqdm(total=max_examples or total, unit="img", desc="evaluate", disable=not progress, leave=False)
    for batch in batches:
        images = np.asarray(batch["image"], np.float32)
        weight = np.asarray(batch.get("weight", np.ones(len(images))), np.float32)
        if max_examples:
            seen = 0 if totals is None else float(totals["count"])
            weight = weight * (np.cumsum(weight) + seen <= max_examples)
        image_shape = images.shape[1:]
        arrays = {"image": images, "label": np.asarray(batch["label"], np.int32), "weight": weight}
        if "digit_ink" in batch:
            arrays |= {"digit_ink": batch["digit_ink"], "clutter_ink": batch["clutter_ink"]}
        totals = steps.add_eval_sums(totals, jax.device_get(step(variables, arrays, offset)))
        bar.update(int(weight.sum()))
        if max_examples and float(totals["count"]) >= max_examples:
            break
    bar.close()
    if totals is None or float(totals["count"]) == 0:
        raise ValueError("the evaluation data yielded no examples")
    return summarize(model_cfg, image_shape, totals, gate_offset)


def summarize(
    model_cfg: Mapping[str, Any], image_shape: Sequence[int], totals: Mapping[str, Any], gate_offset: float
) -> dict[str, Any]:
    """Turn summed batch statistics into rates per stage and overall."""
    spec = network_spec(model_cfg, image_shape)
    count = float(totals["count"])
    block_macs = np.asarray(totals["block_macs"], np.float64) / count
    block_dense = np.asarray(totals["block_dense_macs"], np.float64)
    rates = {g: np.asarray(totals[g], np.float64) / count for g in ("spatial", "channel", "layer")}
    stages = []
    for stage in sorted({b.stage for b in spec.blocks}):
        idx = [i for i, b in enumerate(spec.blocks) if b.stage == stage]
        modes = {spec.blocks[i].mode for i in idx}
        entry = {
            "stage": stage + 1,
            "mode": modes.pop() if len(modes) == 1 else "mixed",
            "density": float(block_macs[idx].sum() / block_dense[idx].sum()),
        }
        for gate, applies in (("spatial", "spatial"), ("channel", "channel"), ("layer", "layer")):
            active = [i for i in idx if getattr(spec.blocks[i], applies)]
            entry[f"{gate}_rate"] = float(np.mean(rates[gate][active])) if active else None
        stages.append(entry)
    blocks = [
        {
            "name": b.name,
            "mode": b.mode,
            "density": float(block_macs[i] / block_dense[i]),
            "spatial_rate": float(rates["spatial"][i]) if b.spatial else None,
            "channel_rate": float(rates["channel"][i]) if b.channel else None,
            "layer_rate": float(rates["layer"][i]) if b.layer else None,
        }
        for i, b in enumerate(spec.blocks)
    ]
    return {
        "examples": int(round(count)),
        "top1": float(totals["top1"]) / count,
        "top5": float(totals["top5"]) / count,
        "macs": float(totals["macs"]) / count,
        "dense_macs": float(totals["dense_macs"]),
        "mac_ratio": float(totals["macs"]) / count / float(totals["dense_macs"]),
        "density": float(block_macs.sum() / block_dense.sum()),
        "stages": stages,
        "blocks": blocks,
        "gate_offset": float(gate_offset),
        "image_shape": [int(s) for s in image_shape],
    } | ({"mask_coverage": mask_coverage(spec, totals["coverage"])} if "coverage" in totals else {})


def mask_coverage(spec: Any, coverage: np.ndarray) -> list[dict[str, Any]]:
    """Per spatial stage: the fractions of the digit's ink and of the clutter's ink that lie in
    executed cells, and the fraction of blank cells (no ink) executed, over its blocks."""
    coverage = np.asarray(coverage, np.float64)
    records = []
    for stage in sorted({b.stage for b in spec.blocks}):
        idx = [i for i, b in enumerate(spec.blocks) if b.stage == stage and b.spatial]
        if not idx:
            continue
        total = dict(zip(steps.COVERAGE_KEYS, coverage[idx].sum(axis=0)))

        def ratio(hit: str, all_: str, total: dict[str, float] = total) -> float | None:
            return float(total[hit] / total[all_]) if total[all_] else None

        records.append(
            {
                "stage": stage + 1,
                "digit": ratio("digit_hit", "digit_ink"),
                "clutter": ratio("clutter_hit", "clutter_ink"),
                "background": ratio("blank_hit", "blank_cells"),
            }
        )
    return records


# ----------------------------------------------------------------------------- latency


def default_backend() -> str:
    """``pallas`` on a GPU, ``xla`` elsewhere."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def measure_latency(
    model_cfg: Mapping[str, Any],
    variables: Mapping[str, Any],
    images: np.ndarray,
    *,
    backend: str = "auto",
    gate_offset: float = 0.0,
    repeats: int = 20,
    warmup: int = 3,
    latency_profile: str | None = None,
) -> dict[str, Any]:
    """Static (dense) and dynamic (sparse) latency of one batch with the sparse engine.

    Both run in the same process on the same device, alternating after ``warmup`` calls
    each (compilation included there); median, min and max of ``repeats`` timed calls are reported,
    with the largest logit difference between the engine and ``model.apply`` and how many
    gated blocks ran sparse, dense (then masked) or were skipped. ``latency_profile``: the
    engine chooses per block between sparse and masked-dense execution with this hardware
    profile (``SparseEngine(latency_profile=...)``); None: always sparse.
    """
    from laud_jax.sparse import SparseEngine

    backend = default_backend() if backend == "auto" else backend
    images = jnp.asarray(images, jnp.float32)
    engine = SparseEngine(
        model_cfg, variables, backend=backend, image_shape=images.shape[1:], latency_profile=latency_profile
    )
    offset = float(gate_offset)
    times = time_side_by_side(
        {"dense": lambda: engine.apply_static(images), "sparse": lambda: engine(images, gate_offset=offset)},
        repeats,
        warmup,
    )
    reference, _ = build_model(model_cfg).apply(variables, images, train=False, gate_offset=offset)
    logits, info = engine.apply(images, gate_offset=offset)
    difference = float(jnp.max(jnp.abs(logits - reference)))
    dense, sparse = stats_ms(times["dense"]), stats_ms(times["sparse"])
    return {
        "backend": backend,
        "device": str(jax.devices()[0].device_kind),
        "batch": int(images.shape[0]),
        "repeats": int(repeats),
        "dense_ms": dense["median_ms"],
        "sparse_ms": sparse["median_ms"],
        "speedup": dense["median_ms"] / sparse["median_ms"],
        "dense_ms_min": dense["min_ms"],
        "dense_ms_max": dense["max_ms"],
        "sparse_ms_min": sparse["min_ms"],
        "sparse_ms_max": sparse["max_ms"],
        "max_logit_difference": difference,
        "latency_profile": latency_profile,
        "gated_runs": info.gated_runs(),
        "runs": list(info.runs),
    }


def block_rates(result: Mapping[str, Any]) -> list[float]:
    """One activation rate per block for the predictor: the rate of the block's main gate.

    spatial/both: the spatial rate; channel: the channel rate; layer/lc: the layer rate;
    static: 1.
    """
    rates = []
    for block in result["blocks"]:
        for key in ("spatial_rate", "layer_rate", "channel_rate"):
            if block[key] is not None:
                rates.append(float(block[key]))
                break
        else:
            rates.append(1.0)
    return rates


def predict_latency(
    model_cfg: Mapping[str, Any], result: Mapping[str, Any], hardware: str, batch: int = 1
) -> dict[str, Any]:
    """Roofline prediction of static and dynamic latency on ``hardware`` at the measured rates."""
    from laud_jax.latency.predictor import default_engine, predict
    from laud_jax.latency.profiles import get_profile

    spec = network_spec(model_cfg, result["image_shape"])
    engine = default_engine(hardware)
    dtype = str(model_cfg.get("dtype", "float32"))
    prediction = predict(spec, get_profile(hardware), engine, rho=block_rates(result), batch=batch, dtype=dtype)
    return {
        "hardware": hardware,
        "engine": engine,
        "batch": batch,
        "static_ms": float(prediction.static_ms),
        "dynamic_ms": float(prediction.dynamic_ms),
        "latency_ratio": float(prediction.latency_ratio),
        "mac_ratio": float(prediction.mac_ratio),
    }


# ----------------------------------------------------------------------------- report


def evaluate_checkpoint(
    checkpoint: str,
    exp_config: Any | None = None,
    *,
    gate_offset: float = 0.0,
    max_examples: int = 0,
    batch_size: int | None = None,
    backend: str = "auto",
    latency: bool = True,
    latency_batch: int = 1,
    repeats: int = 20,
    hardware: str | None = "v100",
    image_size: int | None = None,
    progress: bool = True,
    latency_profile: str | None = None,
) -> dict[str, Any]:
    """Everything ``python -m laud_jax.evaluate`` reports, as a dict.

    ``latency_profile`` (a preset, ``local`` or a profile .json): the sparse engine runs each
    gated block sparse or densely-then-masked, whichever that profile predicts faster.
    """
    from laud_jax import data

    if hardware:
        from laud_jax.latency.profiles import get_profile

        get_profile(hardware)  # an unknown profile fails here, before any compute
    model_cfg, variables, recorded = load_checkpoint(checkpoint, image_size=image_size)
    data_cfg = data_config(exp_config, recorded)
    info = data.dataset_info(data_cfg)
    model_cfg = dict(model_cfg)
    if not model_cfg.get("num_classes"):
        model_cfg["num_classes"] = info.num_classes
    if int(model_cfg["num_classes"]) != info.num_classes:
        raise ValueError(
            f"the checkpoint's classifier has {model_cfg['num_classes']} classes; {info.name} has "
            f"{info.num_classes}: evaluate it on its own dataset (--exp.data.name=...)"
        )
    network_spec(model_cfg, info.image_shape)  # a granularity that does not fit fails here, before compute
    size = batch_size or (
        exp_config.eval_batch_size if exp_config is not None else int((recorded or {}).get("eval_batch_size", 256))
    )
    total = min(info.num_eval, max_examples) if max_examples else info.num_eval
    result = {
        "checkpoint": os.path.abspath(checkpoint),
        "model": model_cfg,
        "data": {"name": info.name, "split": str(data_cfg.get("eval_split", "test")), "examples": info.num_eval},
    }
    result.update(
        accuracy_and_density(
            model_cfg,
            variables,
            data.eval_batches(data_cfg, size, ink=True),
            gate_offset=gate_offset,
            max_examples=max_examples,
            total=total,
            progress=progress,
        )
    )
    if latency:
        first = next(iter(data.eval_batches(data_cfg, latency_batch)))
        result["latency"] = measure_latency(
            model_cfg,
            variables,
            first["image"],
            backend=backend,
            gate_offset=gate_offset,
            repeats=repeats,
            latency_profile=latency_profile,
        )
    if hardware:
        result["predicted"] = predict_latency(model_cfg, result, hardware, batch=latency_batch)
    return result


def _fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


RUN_CODES = {"sparse": "s", "dense": "d", "skip": "-"}
RUN_LEGEND = "s sparse, d dense (masked, or a static block), - skipped"


def run_codes(runs: Sequence[str]) -> str:
    """One character per block for how it ran (``RunInfo.runs``), in groups of five."""
    codes = "".join(RUN_CODES[run] for run in runs)
    return " ".join(codes[i : i + 5] for i in range(0, len(codes), 5))


def format_table(result: Mapping[str, Any]) -> str:
    """The report as an aligned text table."""
    model = result["model"]
    modes = model["mode"] if isinstance(model["mode"], str) else "/".join(model["mode"])
    granularity = model.get("granularity")
    lines = [
        f"checkpoint   {result['checkpoint']}",
        f"model        {model['arch']}, mode {modes}"
        + (f", S {'-'.join(str(s) for s in granularity)}" if granularity else ""),
        f"data         {result['data']['name']} {result['data']['split']}: {result['examples']} examples"
        + (f", gate offset {result['gate_offset']:+g}" if result["gate_offset"] else ""),
        f"top-1        {100 * result['top1']:.2f} %      top-5 {100 * result['top5']:.2f} %",
        f"MAC ratio    {result['mac_ratio']:.3f}  ({result['macs'] / 1e6:.2f} M of "
        f"{result['dense_macs'] / 1e6:.2f} M MACs per image)",
        "",
        f"{'stage':<7}{'mode':<9}{'density':>9}{'spatial':>9}{'channel':>9}{'layer':>9}",
    ]
    for stage in result["stages"]:
        lines.append(
            f"{stage['stage']:<7}{stage['mode']:<9}{stage['density']:>9.3f}{_fmt_rate(stage['spatial_rate']):>9}"
            f"{_fmt_rate(stage['channel_rate']):>9}{_fmt_rate(stage['layer_rate']):>9}"
        )
    lines.append(f"{'all':<7}{'':<9}{result['density']:>9.3f}")
    if result.get("mask_coverage"):
        lines += [
            "",
            "mask coverage: the fraction of the digit's and the clutter's ink in executed cells, "
            "and of blank cells executed",
            f"{'stage':<7}{'digit':>9}{'clutter':>9}{'blank':>9}",
        ]
        for entry in result["mask_coverage"]:
            lines.append(
                f"{entry['stage']:<7}"
                + "".join(f"{_fmt_rate(entry[k]):>9}" for k in ("digit", "clutter", "background"))
            )
    if "latency" in result:
        lat = result["latency"]
        lines += [
            "",
            f"measured     {lat['backend']} on {lat['device']}, batch {lat['batch']}, median of {lat['repeats']}: "
            f"static {lat['dense_ms']:.3f} ms, dynamic {lat['sparse_ms']:.3f} ms, speed-up {lat['speedup']:.2f}x",
        ]
        if "gated_runs" in lat:
            runs, choice = lat["gated_runs"], lat.get("latency_profile") or "always sparse"
            lines.append(
                f"             gated blocks ({choice}): {runs['sparse']} sparse, "
                f"{runs['dense']} dense then masked, {runs['skip']} skipped"
            )
        if "runs" in lat:
            lines.append(f"             per block ({RUN_LEGEND}): {run_codes(lat['runs'])}")
    if "predicted" in result:
        pred = result["predicted"]
        lines.append(
            f"predicted    {pred['hardware']} ({pred['engine']} kernels), batch {pred['batch']}: static "
            f"{pred['static_ms']:.3f} ms, dynamic {pred['dynamic_ms']:.3f} ms, ratio {pred['latency_ratio']:.3f}"
        )
    return "\n".join(lines)


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --gate-offset and --image-size: how evaluate and visualize load a model."""
    parser.add_argument(
        "--checkpoint", metavar="PATH", help="Training work dir, converted dir, or PyTorch .pth/.pth.tar file."
    )
    parser.add_argument(
        "--gate-offset",
        "--gate_offset",
        metavar="X",
        type=float,
        default=0.0,
        help="Gate threshold offset: execute iff l_exec - l_skip >= offset (> 0 skips more).",
    )
    parser.add_argument(
        "--image-size",
        "--image_size",
        metavar="N",
        type=int,
        default=0,
        help="For .pth files: input size the granularity is checked against.",
    )


def build_parser() -> config_utils.ArgumentParser:
    """The flags of `python -m laud_jax.evaluate`."""
    parser = config_utils.ArgumentParser("evaluate", __doc__)
    config_utils.add_config_argument(
        parser,
        "Experiment config (configs/*.py) for the data; --exp.data.name=... picks the dataset. "
        "Default: the config a training work directory recorded.",
    )
    add_checkpoint_arguments(parser)
    parser.add_argument(
        "--max-examples",
        "--max_examples",
        metavar="N",
        type=int,
        default=0,
        help="Evaluate at most this many examples (0 = the whole split).",
    )
    parser.add_argument(
        "--batch-size",
        "--batch_size",
        metavar="N",
        type=int,
        default=0,
        help="Evaluation batch size (0 = the config's eval_batch_size).",
    )
    parser.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="Sparse engine backend for the latency measurement (auto: pallas on GPU, else xla).",
    )
    parser.add_argument(
        "--latency",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Measure static vs dynamic latency on this device.",
    )
    parser.add_argument(
        "--latency-batch",
        "--latency_batch",
        metavar="N",
        type=int,
        default=1,
        help="Batch size of the latency measurement and prediction.",
    )
    parser.add_argument(
        "--repeats", metavar="N", type=int, default=20, help="Timed calls per network (median reported)."
    )
    parser.add_argument(
        "--hardware",
        metavar="NAME",
        default="v100",
        help="Hardware profile for the predicted latency (preset, 'local', a .json; '' to skip).",
    )
    parser.add_argument(
        "--latency-profile",
        metavar="NAME",
        default="",
        help="Let the sparse engine run each gated block sparse or dense-then-masked, whichever this "
        "profile (preset, 'local', a .json) predicts faster ('' = always sparse).",
    )
    parser.add_argument("--json", metavar="FILE", help="Also write the full report as JSON to this file.")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="Show a progress bar.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; `argv` without the program name (None = sys.argv[1:])."""
    try:
        args = config_utils.parse_command_line(build_parser(), argv)
    except config_utils.CommandLineExit as e:
        return e.code
    # CPU has no buffer donation; the engine's donated inputs are then simply copied.
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    if not args.checkpoint:
        print("error: --checkpoint is required (a training work dir, a converted dir or a .pth file)", file=sys.stderr)
        return 2
    try:
        result = evaluate_checkpoint(
            args.checkpoint,
            args.exp,
            gate_offset=args.gate_offset,
            max_examples=args.max_examples,
            batch_size=args.batch_size or None,
            backend=args.backend,
            latency=args.latency,
            latency_batch=args.latency_batch,
            repeats=args.repeats,
            hardware=args.hardware or None,
            image_size=args.image_size or None,
            progress=args.progress,
            latency_profile=args.latency_profile or None,
        )
    except (ValueError, FileNotFoundError, convert.ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=_json_default)
        print(f"wrote {args.json}")
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


if __name__ == "__main__":
    sys.exit(main())

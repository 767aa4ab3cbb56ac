"""Command line: ``python -m laud_jax.latency predict|search|calibrate``.

``search --exp CONFIG.py [--exp.a.b=value ...]`` searches the model of an experiment config
(the trainer's flag syntax, ``config_utils.parse_command_line``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from laud_jax.config_utils import AUTO, AUTO_FIELDS, ConfigError, add_config_argument, parse_command_line, validate
from laud_jax.latency.calibrate import DEFAULT_REPEATS
from laud_jax.latency.launches import ENGINES
from laud_jax.latency.predictor import default_engine, predict
from laud_jax.latency.profiles import HARDWARE_NAMES, get_profile, local_profile_path
from laud_jax.latency.search import (
    CHANNEL_GRANULARITIES,
    GRANULARITIES,
    NUM_RATES,
    SEARCH_MODES,
    SearchResult,
    auto_fields,
    default_rates,
    model_update,
    resolve_hardware,
    search,
    search_config,
)
from laud_jax.models.specs import ARCHS, MODE_ALIASES, MODES, SPATIAL_MODES, network_spec

SMALL_ARCHS = ("resnet_small", "resnet_tiny")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("-", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"rate must lie in (0, 1], got {value}")
    return value


# Defaults of the flags that describe the network; with `search --exp` the config sets them.
DEFAULTS = {
    "hardware": "v100",
    "arch": "resnet101",
    "batch": 1,
    "dtype": "float32",
    "num_classes": 1000,
    "rate": 0.5,
    "mode": SEARCH_MODES,
    "granularity": GRANULARITIES,
    "channel_granularity": CHANNEL_GRANULARITIES,
}
# Flags `search --exp` refuses, with the config field that takes their place.
EXP_FIELDS = {
    "arch": "model.arch",
    "image_size": "data.image_size",
    "num_classes": "model.num_classes",
    "dtype": "model.dtype",
    "rate": "loss.target_rate",
    "mode": "latency.modes",  # the candidates (model.mode fixes it)
    "granularity": "latency.granularities",
    "channel_granularity": "model.channel_granularity",
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hardware",
        default=None,
        help=f"a preset ({', '.join(HARDWARE_NAMES)}; local = the fitted profile at "
        f"{local_profile_path()}) or a profile .json file (default: v100; with --exp the config's "
        "latency.hardware)",
    )
    parser.add_argument(
        "--engine",
        choices=sorted(ENGINES),
        default=None,
        help="engine model: xla (CPU path), pallas (GPU kernels), pallas_nchw, halo "
        "(default: xla for local/.json profiles, pallas for GPU presets)",
    )
    parser.add_argument("--arch", choices=sorted(ARCHS), help="network (default: resnet101)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input side in pixels (default: 64 for resnet_small/tiny, else 224)",
    )
    parser.add_argument("--batch", type=int, help="images per call (default: 1; with --exp the config's)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="activation and weight dtype (bfloat16 = fp16 tensor cores on V100; default float32)",
    )
    parser.add_argument("--num-classes", type=int, help="classifier outputs (default: 1000)")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m laud_jax.latency",
        description="Roofline latency predictor of dynamic networks: per-block and whole-network latency, "
        "granularity search, calibration of the local profile.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{predict,search,calibrate}")

    p = sub.add_parser(
        "predict",
        help="static vs dynamic latency of every block and of the network",
        description="Predict static and dynamic latency per block and for the whole network at "
        "an activation rate (each gate keeps this fraction of its units).",
    )
    _common(p)
    p.add_argument(
        "--mode",
        type=_str_list,
        default=("spatial",),
        help=f"dynamic mode, one or one per stage, comma-separated ({', '.join(MODES)}; default spatial)",
    )
    p.add_argument(
        "--granularity",
        type=_int_list,
        default=(4, 4, 2, 1),
        help="patch size S, one or one per stage (default 4,4,2,1)",
    )
    p.add_argument("--rate", type=_rate, help="activation rate rho of every gate (default 0.5)")
    p.add_argument("--channel-granularity", type=int, default=2, help="channels per channel-mask group (default 2)")
    p.add_argument("--mask-groups", type=int, default=1, help="spatial mask groups G (default 1)")

    s = sub.add_parser(
        "search",
        help="choose mode and S per stage at a target MAC rate",
        description="For every stage, evaluate each candidate (mode, S, channel group size) over a "
        "grid of activation rates in one jitted call and pick the fastest at the target "
        "MAC rate; print a config fragment for laud_jax.train. With --exp CONFIG.py: the "
        "exact model of the experiment config (shape overrides, dataset image size and classes, "
        "eval batch, dtype, loss.target_rate, latency.* candidates); its model fields set to "
        "'auto' are searched, both when neither is.",
    )
    _common(s)
    add_config_argument(s, "Search the model of this experiment config (configs/*.py).")
    s.add_argument("--rate", type=_rate, help="target dynamic/dense MAC rate (default 0.5)")
    s.add_argument(
        "--mode",
        type=_str_list,
        help=f"candidate modes, comma-separated (default {','.join(SEARCH_MODES)})",
    )
    s.add_argument(
        "--granularity",
        type=_int_list,
        help=f"candidate S (default {','.join(map(str, GRANULARITIES))}; those not dividing a "
        "stage's feature map are skipped there)",
    )
    s.add_argument(
        "--channel-granularity",
        type=_int_list,
        help=f"candidate channel group sizes (default {','.join(map(str, CHANNEL_GRANULARITIES))})",
    )
    s.add_argument("--num-rates", type=int, default=NUM_RATES, help=f"activation-rate grid size (default {NUM_RATES})")

    c = sub.add_parser(
        "calibrate",
        help="time the sparse engine on this device and fit the local profile",
        description="Time the sparse engine's per-block execution (laud_jax.sparse) on the local "
        "device over a set of shapes, modes, S and densities, fit the local profile's "
        "free parameters, save it as JSON and report predicted vs measured on "
        "held-out configurations.",
    )
    c.add_argument(
        "--out",
        default=local_profile_path(),
        help=f"fitted profile JSON (default {local_profile_path()}; `--hardware local` reads it)",
    )
    c.add_argument(
        "--measurements",
        metavar="FILE",
        help="timings JSON: reused if it exists (no new timing), else written after timing",
    )
    c.add_argument("--configs", type=int, default=160, help="number of block configurations to time (default 160)")
    c.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help=f"timed repeats per configuration, the minimum is kept (default {DEFAULT_REPEATS})",
    )
    c.add_argument("--holdout", type=float, default=0.3, help="fraction held out of the fit (default 0.3)")
    c.add_argument("--seed", type=int, default=0, help="seed of the configuration sample and split (default 0)")
    c.add_argument("--backend", default="xla", help="sparse engine backend to time (default xla)")
    c.add_argument("--json", metavar="FILE", help="also write the report (errors per configuration) as JSON")
    return parser


def _image_shape(args) -> tuple[int, int, int]:
    size = args.image_size or (64 if args.arch in SMALL_ARCHS else 224)
    if size < 8:
        raise SystemExit(f"error: --image-size {size} is too small")
    return (size, size, 3)


def _engine(args) -> str:
    return args.engine or default_engine(args.hardware if not args.hardware.endswith(".json") else "local")


def _write_json(path: str | None, record: dict[str, Any]) -> None:
    if not path:
        return
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=float)
    print(f"wrote {path}")


def _apply_defaults(args) -> None:
    for name, value in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def _check_batch(args) -> None:
    if args.batch < 1:
        raise SystemExit(f"error: --batch must be >= 1, got {args.batch}")


def run_predict(args) -> dict[str, Any]:
    _apply_defaults(args)
    _check_batch(args)
    bad = [m for m in args.mode if m not in MODES and m not in MODE_ALIASES]
    if bad:
        raise SystemExit(f"error: unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    mode = args.mode[0] if len(args.mode) == 1 else args.mode
    granularity = args.granularity[0] if len(args.granularity) == 1 else args.granularity
    cfg = {
        "arch": args.arch,
        "num_classes": args.num_classes,
        "mode": mode,
        "granularity": granularity,
        "channel_granularity": args.channel_granularity,
        "mask_groups": args.mask_groups,
        "dtype": args.dtype,
    }
    try:
        spec = network_spec(cfg, _image_shape(args))
        profile = get_profile(args.hardware)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    engine = _engine(args)
    result = predict(spec, profile, engine, rho=args.rate, batch=args.batch, dtype=args.dtype)
    print(
        f"{args.arch} {spec.image_shape[0]}x{spec.image_shape[1]}, batch {args.batch}, {args.dtype}, "
        f"{args.hardware} ({engine} engine), activation rate {args.rate}"
    )
    print(f"{'block':<12}{'mode':<9}{'S':>3}{'static ms':>11}{'dynamic ms':>12}{'ratio':>7}{'MACs':>7}")
    for block in result.blocks:
        print(
            f"{block['name']:<12}{block['mode']:<9}{block['granularity']:>3}{block['static_ms']:>11.4f}"
            f"{block['dynamic_ms']:>12.4f}{block['latency_ratio']:>7.3f}{block['mac_ratio']:>7.3f}"
        )
    print(f"stem + head: {result.fixed_ms:.4f} ms")
    print(
        f"network: static {result.static_ms:.3f} ms, dynamic {result.dynamic_ms:.3f} ms, "
        f"latency ratio {result.latency_ratio:.3f}, MAC ratio {result.mac_ratio:.3f}"
    )
    record = {**result.to_dict(), "hardware": args.hardware, "engine": engine, "rate": args.rate}
    _write_json(args.json, record)
    return record


def run_search(args) -> dict[str, Any]:
    if args.num_rates < 2:
        raise SystemExit(f"error: --num-rates must be >= 2, got {args.num_rates}")
    if args.exp is not None:
        return _run_config_search(args)
    _apply_defaults(args)
    _check_batch(args)
    try:
        profile = get_profile(args.hardware)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    engine = _engine(args)
    kwargs = dict(
        target_rate=args.rate,
        batch=args.batch,
        dtype=args.dtype,
        image_shape=_image_shape(args),
        modes=args.mode,
        granularities=args.granularity,
        channel_granularities=args.channel_granularity,
        rates=default_rates(args.num_rates),
        num_classes=args.num_classes,
        hardware_name=args.hardware,
        engine_name=engine,
    )
    result = _timed(lambda: search(args.arch, profile, ENGINES[engine], **kwargs))
    print(
        f"{args.arch}, batch {args.batch}, {args.dtype}, {args.hardware} ({engine} engine), target MAC rate {args.rate}"
    )
    record = result.to_dict()
    _report(result, args.json, record)
    return record


def _run_config_search(args) -> dict[str, Any]:
    """`search --exp CONFIG.py`: the config's model, data, batch, dtype and target rate."""
    given = [name for name in EXP_FIELDS if getattr(args, name) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise SystemExit(f"error: {flag} is set by the --exp config: use --exp.{EXP_FIELDS[given[0]]}=... instead")
    if args.batch is not None:
        _check_batch(args)
    config = args.exp
    fields = auto_fields(config.model)
    if not fields:
        fields = AUTO_FIELDS
        print(
            "model.mode and model.granularity are fixed in the config: searching both (latency.modes x granularities)"
        )
        config.model.mode = AUTO
        config.model.granularity = AUTO
    try:
        validate(config)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    image_shape, num_classes = _config_data(config)
    try:
        if args.hardware:  # asked for on the command line: no fallback
            hardware = resolve_hardware(args.hardware, args.engine or "")
        else:
            latency = config.latency
            hardware = resolve_hardware(latency.hardware, args.engine or latency.engine, latency.fallback_hardware)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    if hardware.note:
        print(f"warning: latency.hardware={config.latency.hardware!r}: {hardware.note}", file=sys.stderr)
    result = _timed(
        lambda: search_config(
            config, image_shape, num_classes, hardware, batch=args.batch, rates=default_rates(args.num_rates)
        )
    )
    h, w, c = result.image_shape
    print(
        f"{result.arch} {h}x{w}x{c}, {config.model.num_classes or num_classes} classes, batch {result.batch}, "
        f"{result.dtype}, {hardware.name} ({hardware.engine} engine), target MAC rate "
        f"{result.target_rate:g}; searched: model.{', model.'.join(fields)}"
    )
    record = {**result.to_dict(), "model_update": model_update(result, fields)}
    _report(result, args.json, record)
    return record


def _config_data(config) -> tuple[tuple[int, int, int], int]:
    """The image shape and classes of the config's dataset (as the trainer resolves them); a
    tfds dataset not prepared here: 3 channels and model.num_classes (1000 when 0), noted."""
    from laud_jax import data

    try:
        info = data.dataset_info(config.data)
    except FileNotFoundError:
        classes = config.model.num_classes or 1000
        size = int(config.data.image_size)
        print(
            f"note: dataset {config.data.name!r} is not prepared here: assuming {size}x{size}x3 images and "
            f"{classes} classes (set --exp.model.num_classes to change)",
            file=sys.stderr,
        )
        return (size, size, 3), classes
    except ValueError as error:
        raise SystemExit(f"error: data: {error}") from None
    return tuple(info.image_shape), info.num_classes


def _timed(run: Callable[[], SearchResult]) -> SearchResult:
    """Runs a search twice: the first call compiles, the second is timed."""
    try:
        run()
        return run()
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def _report(result: SearchResult, json_path: str | None, record: dict[str, Any]) -> None:
    sizes, modes = result.candidates["granularities"], result.candidates["modes"]
    print("latency ratio at the target rate per stage (rows: S; '-' = not a valid choice):")
    for stage, table in enumerate(result.candidates["latency_ratio"]):
        print(
            f"  stage {stage + 1}: "
            + "  ".join(
                f"{mode}:"
                + ",".join(
                    ("-" if math.isnan(table[si][mi]) else f"{table[si][mi]:.3f}")
                    + ("" if mode not in SPATIAL_MODES else f"@{size}")
                    for si, size in enumerate(sizes)
                    if mode in SPATIAL_MODES or si == 0
                )
                for mi, mode in enumerate(modes)
            )
        )
    for stage in result.stages:
        detail = f" S={stage['granularity']}" if stage["mode"] in SPATIAL_MODES else ""
        print(
            f"stage {stage['stage']}: {stage['mode']}{detail}  {stage['static_ms']:.3f} -> "
            f"{stage['dynamic_ms']:.3f} ms (ratio {stage['latency_ratio']:.3f})"
        )
    print(
        f"network: static {result.static_ms:.3f} ms, dynamic {result.dynamic_ms:.3f} ms, "
        f"latency ratio {result.latency_ratio:.3f}; channel group size {result.channel_granularity}"
    )
    print(f"search time after compilation: {1e3 * result.seconds:.1f} ms")
    print("config fragment:", json.dumps(result.config_fragment()))
    print(f"train with: python -m laud_jax.train --exp CONFIG {result.flags()}")
    _write_json(json_path, record)


def run_calibrate(args) -> dict[str, Any]:
    from laud_jax.latency.calibrate import calibrate_local

    try:
        import laud_jax.sparse  # noqa: F401  (what calibration times)
    except ModuleNotFoundError:
        raise SystemExit(
            "error: calibrate times the sparse engine, laud_jax.sparse, which this checkout "
            "lacks; merge it (git merge main) first"
        ) from None

    if not 0.0 < args.holdout < 1.0:
        raise SystemExit(f"error: --holdout must lie in (0, 1), got {args.holdout}")
    if args.configs < 10 or args.repeats < 1:
        raise SystemExit("error: need --configs >= 10 and --repeats >= 1")
    report = calibrate_local(
        out=args.out,
        measurements=args.measurements,
        configs=args.configs,
        repeats=args.repeats,
        holdout=args.holdout,
        seed=args.seed,
        backend=args.backend,
    )
    _write_json(args.json, report)
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_command_line(build_parser(), argv)  # argparse + --exp CONFIG.py --exp.a.b=value
    commands = {"predict": run_predict, "search": run_search, "calibrate": run_calibrate}
    return commands[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])

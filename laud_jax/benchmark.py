"""Latency of sparse execution against the dense network, measured side by side.

    python -m laud_jax.benchmark --arch resnet50 --mode spatial --granularity 4,4,2,1 \\
        --rate 0.5 --batch 1 --json runs/r50_spatial.json

Dense (the static network, BN folded, the same conv kernels) and dynamic (the sparse
engine) run alternately in one process after warm-up; every timing ends with
``block_until_ready``. ``--rate`` forces masks of exactly that density at random places
(no trained model needed); ``--checkpoint`` runs a trained work directory with its own
gates on real inputs. The table and the JSON hold median/min/max latency, the latency
ratio and the MAC ratio per block and for the whole network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from laud_jax.models import MODES, build_model, network_spec
from laud_jax.models.specs import ARCHS
from laud_jax.sparse import BACKENDS, SparseEngine
from laud_jax.sparse.synthetic import random_masks, random_variables
from laud_jax.timing import stats_ms, time_side_by_side


def _load_checkpoint(path: str):
    try:
        from laud_jax.checkpointing import load_variables
    except ImportError as err:
        raise SystemExit(f"--checkpoint needs laud_jax.checkpointing (the training module): {err}") from err
    variables, run_config = load_variables(path)  # CheckpointError (a ValueError) if unreadable
    return run_config["model"], variables, run_config


def _inputs(args, run_config, image_shape) -> np.ndarray:
    if args.inputs == "random" or (args.inputs == "eval" and run_config is None):
        rng = np.random.default_rng(args.seed + 1)
        return rng.standard_normal((args.batch, *image_shape)).astype(np.float32)
    if args.inputs == "eval":
        import ml_collections

        from laud_jax.data.pipeline import eval_batches

        batch = next(eval_batches(ml_collections.ConfigDict(run_config["data"]), args.batch))
        return np.asarray(batch["image"], np.float32)
    images = np.load(args.inputs)
    if images.ndim != 4 or images.shape[0] < args.batch:
        raise SystemExit(f"--inputs {args.inputs}: need an (N >= {args.batch}, H, W, C) array, got {images.shape}")
    return images[: args.batch].astype(np.float32)


def _masks_from_aux(spec, aux) -> list[dict[str, np.ndarray]]:
    out = []
    for block, record in zip(spec.blocks, aux["blocks"]):
        entry = {}
        if block.spatial:
            entry["spatial"] = np.asarray(record["spatial_mask"])
        if block.channel:
            entry["channel"] = np.asarray(record["channel_mask"])
        if block.layer:
            entry["layer"] = np.asarray(record["layer_gate"])
        out.append(entry)
    return out


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, measure dense and dynamic side by side, return the result record."""
    load_before = os.getloadavg()
    run_config = None
    if args.checkpoint:
        model_cfg, variables, run_config = _load_checkpoint(args.checkpoint)
        image_size = int(run_config.get("data", {}).get("image_size", args.image_size))
    else:
        model_cfg = {
            "arch": args.arch,
            "num_classes": args.num_classes,
            "mode": args.mode,
            "granularity": args.granularity,
            "mask_groups": args.mask_groups,
            "channel_granularity": args.channel_granularity,
            "dtype": args.dtype,
        }
        image_size = args.image_size
    model = build_model(model_cfg)
    image_shape = (image_size, image_size, args.channels)
    spec = network_spec(model.config, image_shape)
    if not args.checkpoint:
        variables = random_variables(model, image_shape, args.seed)
    images = jnp.asarray(_inputs(args, run_config, image_shape))
    image_shape = tuple(images.shape[1:])

    engine = SparseEngine(model.config, variables, backend=args.backend, capacity_steps=args.capacity_steps)
    apply = jax.jit(lambda v, x, m, o: model.apply(v, x, masks=m, gate_offset=o))
    if args.checkpoint:
        reference, aux = apply(variables, images, None, args.gate_offset)
        masks = _masks_from_aux(spec, aux)  # what the gates chose, for the planned comparison
    else:
        masks = random_masks(spec, args.batch, args.rate, channel_rate=args.channel_rate, seed=args.seed)
        reference, aux = apply(variables, images, masks, args.gate_offset)
    mac_ratio = float(jnp.mean(aux["macs"]) / aux["dense_macs"])
    plan = engine.plan_masks(masks, image_shape, args.batch) if engine.backend != "dense" else masks
    execution = args.execution
    if execution == "auto":
        execution = "speculative" if args.checkpoint else "planned"
    source = None if args.checkpoint else plan  # checkpoint: the live gates decide

    def dynamic(mode: str) -> Callable[[], jax.Array]:
        masks_for = plan if mode == "planned" else source
        return lambda: engine.apply(images, masks=masks_for, gate_offset=args.gate_offset, execution=mode)[0]

    fns = {"dense": lambda: engine.apply_static(images), "dynamic": dynamic(execution)}
    if engine.backend != "dense":
        # Checkpoint: "planned" reruns the masks the gates chose, fixed ahead of time.
        others = ("planned", "stepwise") if args.checkpoint else ("stepwise",)
        for other in others:
            if other != execution and not (other == "stepwise" and args.skip_stepwise):
                fns[other] = dynamic(other)
        if not args.skip_masked:
            masked_engine = SparseEngine(model.config, variables, backend="dense")
            fns["dense_masked"] = lambda: masked_engine.apply(images, masks=masks, gate_offset=args.gate_offset)[0]
    diffs = {name: float(jnp.max(jnp.abs(fn() - reference))) for name, fn in fns.items() if name != "dense"}
    times = time_side_by_side(fns, args.repeats, args.warmup, progress=not args.no_progress, desc="network")
    dense_t, dyn_t = np.asarray(times["dense"]), np.asarray(times["dynamic"])
    result: dict[str, Any] = {
        "model": model.config.to_dict(),
        "image_shape": list(image_shape),
        "batch": args.batch,
        "rate": None if args.checkpoint else args.rate,
        "backend": engine.backend,
        "execution": execution,
        "dense_ms": float(1e3 * np.median(dense_t)),
        "dynamic_ms": float(1e3 * np.median(dyn_t)),
        "latency_ratio": float(np.median(dyn_t) / np.median(dense_t)),
        "paired_latency_ratio": float(np.median(dyn_t / dense_t)),
        "min_latency_ratio": float(dyn_t.min() / dense_t.min()),
        "mac_ratio": mac_ratio,
        "dense": stats_ms(dense_t),
        "dynamic": stats_ms(dyn_t),
        "max_abs_diff_vs_model": diffs,
        "others": {
            name: {**stats_ms(t), "latency_ratio": float(np.median(t) / np.median(dense_t))}
            for name, t in times.items()
            if name not in ("dense", "dynamic")
        },
    }
    result["efficiency"] = result["latency_ratio"] / mac_ratio if mac_ratio > 0 else None
    if not args.no_blocks and engine.backend != "dense":
        result["blocks"] = _block_table(engine, spec, images, plan if not args.checkpoint else None, aux, args)
    result["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "device": str(jax.devices()[0]),
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    return result


def _block_table(engine, spec, images, plan, aux, args) -> list[dict[str, Any]]:
    traces = engine.trace_blocks(images, masks=plan, gate_offset=args.gate_offset)
    rows = []
    iterator = traces
    if not args.no_progress:
        from tqdm import tqdm

        iterator = tqdm(traces, desc="blocks", leave=False, file=sys.stderr)
    for trace, record in zip(iterator, aux["blocks"]):
        times = time_side_by_side(
            {"dense": engine.block_program(trace, dense=True), "dynamic": engine.block_program(trace)},
            args.block_repeats, args.warmup,
        )
        dense_t, dyn_t = np.asarray(times["dense"]), np.asarray(times["dynamic"])
        rows.append({
            "name": trace.spec.name,
            "mode": trace.spec.mode,
            "plan": trace.plan.run,
            "capacities": {k: getattr(trace.plan, k) for k in ("cells", "pixels", "groups", "samples")},
            "counts": trace.counts,
            "dense_ms": float(1e3 * np.median(dense_t)),
            "dynamic_ms": float(1e3 * np.median(dyn_t)),
            "dense": stats_ms(dense_t),
            "dynamic": stats_ms(dyn_t),
            "latency_ratio": float(np.median(dyn_t) / np.median(dense_t)),
            "mac_ratio": float(jnp.mean(record["macs"]) / record["dense_macs"]),
        })
    return rows


def format_table(result: dict[str, Any]) -> str:
    """The result as a text table: per block, then the whole network."""
    def span(stats):
        return f"{stats['median_ms']:8.2f} [{stats['min_ms']:.2f}-{stats['max_ms']:.2f}]"

    header = f"{'':12s} {'dense ms (median [min-max])':>30s} {'dynamic ms (median [min-max])':>30s} {'latency':>8s} {'MACs':>6s}"
    lines = [header, "-" * len(header)]
    for row in result.get("blocks", []):
        lines.append(
            f"{row['name']:12s} {span(row['dense']):>30s} {span(row['dynamic']):>30s} "
            f"{row['latency_ratio']:8.3f} {row['mac_ratio']:6.3f}"
        )
    if result.get("blocks"):
        lines.append("-" * len(header))
    lines.append(
        f"{'network':12s} {span(result['dense']):>30s} {span(result['dynamic']):>30s} "
        f"{result['latency_ratio']:8.3f} {result['mac_ratio']:6.3f}"
    )
    for name, stats in result["others"].items():
        lines.append(f"{'  ' + name:12s} {'':>30s} {span(stats):>30s} {stats['latency_ratio']:8.3f}")
    machine = result["machine"]
    lines.append(
        f"{result['model']['arch']} mode={','.join(sorted(set(result['model']['mode'])))} "
        f"S={'-'.join(map(str, result['model']['granularity']))} batch={result['batch']} "
        f"rate={result['rate']} backend={result['backend']} dynamic={result['execution']}; "
        f"paired latency ratio {result['paired_latency_ratio']:.3f}, of minima "
        f"{result['min_latency_ratio']:.3f}; latency/MAC ratio "
        f"{result['efficiency']:.2f}; max |logits - model.apply| "
        + ", ".join(f"{k} {v:.1e}" for k, v in result["max_abs_diff_vs_model"].items())
    )
    lines.append(
        f"machine: {machine['cpus']} CPUs, load average {machine['load_before'][0]:.1f} before / "
        f"{machine['load_after'][0]:.1f} after; {machine['repeats']} repeats"
    )
    return "\n".join(lines)


def _granularity(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("-", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"granularity must be integers like 4,4,2,1; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m laud_jax.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model (without --checkpoint: random weights, forced masks)")
    model.add_argument("--arch", default="resnet50", choices=sorted(ARCHS))
    model.add_argument("--mode", default="spatial", help=f"one mode or one per stage, comma separated: {', '.join(MODES)}")
    model.add_argument("--granularity", type=_granularity, default=(4, 4, 2, 1), help="spatial patch size S per stage, e.g. 4,4,2,1")
    model.add_argument("--rate", type=float, default=0.5, help="forced mask density (spatial cells, channel groups, executed blocks)")
    model.add_argument("--channel-rate", type=float, default=None, help="channel-group density when it should differ from --rate")
    model.add_argument("--mask-groups", type=int, default=1)
    model.add_argument("--channel-granularity", type=int, default=2)
    model.add_argument("--num-classes", type=int, default=1000)
    model.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    model.add_argument("--image-size", type=int, default=224)
    model.add_argument("--channels", type=int, default=3)
    trained = parser.add_argument_group("trained model")
    trained.add_argument("--checkpoint", default=None, help="laud_jax.train work directory: its gates decide the masks")
    trained.add_argument("--inputs", default="eval", help="'eval' (the run's eval data; random without --checkpoint), 'random', or an .npy file of NHWC images")
    trained.add_argument("--gate-offset", type=float, default=0.0, help="eval gate threshold offset")
    run = parser.add_argument_group("measurement")
    run.add_argument("--batch", type=int, default=1)
    run.add_argument("--backend", default="xla", choices=BACKENDS)
    run.add_argument("--execution", default="auto", choices=("auto", "planned", "speculative", "stepwise"),
                     help="dynamic figure: planned (masks known ahead: one program), speculative (gates decide; one program under the plans earlier inputs needed, checked) or stepwise (host reads each block's counts); auto: planned with --rate, speculative with --checkpoint")
    run.add_argument("--repeats", type=int, default=30, help="timed runs of each network (medians reported)")
    run.add_argument("--block-repeats", type=int, default=15, help="timed runs of each block alone")
    run.add_argument("--warmup", type=int, default=3)
    run.add_argument("--capacity-steps", type=int, default=32, help="index-list padding at most 1/steps of the dense work")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--no-blocks", action="store_true", help="skip the per-block table")
    run.add_argument("--skip-masked", action="store_true", help="skip timing the dense masked reference")
    run.add_argument("--skip-stepwise", action="store_true", help="skip timing the stepwise driver")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--json", default=None, help="write the result record here")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if "," in args.mode:
        args.mode = tuple(m.strip() for m in args.mode.split(","))
    if not args.checkpoint and not 0.0 <= args.rate <= 1.0:
        parser.error(f"--rate must be in [0, 1], got {args.rate}")
    for name in ("batch", "repeats", "block_repeats", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        result = run_benchmark(args)
    except ValueError as err:  # bad model settings: say what, not a traceback
        raise SystemExit(f"error: {err}") from err
    print(format_table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()

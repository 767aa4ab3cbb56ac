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
import dataclasses
import json
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from laud_jax.checkpointing import load_variables
from laud_jax.models import MODES, build_model, network_spec
from laud_jax.models.specs import ARCHS
from laud_jax.sparse import BACKENDS, SparseEngine
from laud_jax.sparse.routing import COUNT_KEYS, DEFAULT_CAPACITY_STEPS, plan_block
from laud_jax.sparse.synthetic import random_masks, random_variables
from laud_jax.timing import stats_ms, time_side_by_side

EXECUTIONS = ("auto", "planned", "speculative", "stepwise")


@dataclasses.dataclass(frozen=True)
class BenchmarkSettings:
    """What ``run_benchmark`` measures; the CLI flags map one to one (``--no-blocks`` -> blocks=False)."""

    arch: str = "resnet50"
    mode: str | tuple[str, ...] = "spatial"
    granularity: tuple[int, ...] = (4, 4, 2, 1)
    rate: float = 0.5
    channel_rate: float | None = None
    mask_groups: int = 1
    channel_granularity: int = 2
    num_classes: int = 1000
    dtype: str = "float32"
    image_size: int = 224
    channels: int = 3
    checkpoint: str | None = None
    inputs: str = "eval"
    gate_offset: float = 0.0
    batch: int = 1
    backend: str = "xla"
    execution: str = "auto"
    repeats: int = 30
    block_repeats: int = 15
    warmup: int = 3
    capacity_steps: int = DEFAULT_CAPACITY_STEPS
    latency_profile: str | None = None
    seed: int = 0
    model_overrides: tuple[tuple[str, Any], ...] = ()  # other model config keys, e.g. (("stem_width", 32),)
    blocks: bool = True
    masked: bool = True
    stepwise: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.model_overrides, Mapping):
            object.__setattr__(self, "model_overrides", tuple(sorted(self.model_overrides.items())))
        if isinstance(self.mode, str) and "," in self.mode:
            object.__setattr__(self, "mode", tuple(m.strip() for m in self.mode.split(",")))
        if not self.checkpoint and not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"--rate must be in [0, 1], got {self.rate}")
        for name in ("batch", "repeats", "block_repeats", "image_size", "capacity_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"--execution must be one of {', '.join(EXECUTIONS)}, got {self.execution!r}")


def _inputs(args: BenchmarkSettings, run_config: dict[str, Any] | None, image_shape: tuple[int, ...]) -> np.ndarray:
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
        raise ValueError(f"--inputs {args.inputs}: need an (N >= {args.batch}, H, W, C) array, got {images.shape}")
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


def run_benchmark(settings: BenchmarkSettings | None = None, /, **overrides: Any) -> dict[str, Any]:
    """Build the model, measure dense and dynamic side by side, return the result record.

    ``run_benchmark(arch="resnet50", mode="channel", rate=0.3, batch=8)``: keyword arguments
    are ``BenchmarkSettings`` fields (bad values raise ValueError).
    """
    args = dataclasses.replace(settings or BenchmarkSettings(), **overrides)
    load_before = os.getloadavg()
    run_config = None
    if args.checkpoint:
        variables, run_config = load_variables(args.checkpoint)  # CheckpointError if unreadable
        model_cfg = run_config["model"]
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
            **dict(args.model_overrides),
        }
        image_size = args.image_size
    model = build_model(model_cfg)
    image_shape = (image_size, image_size, args.channels)
    spec = network_spec(model.config, image_shape)
    if not args.checkpoint:
        variables = random_variables(model, image_shape, args.seed)
    images = jnp.asarray(_inputs(args, run_config, image_shape))
    image_shape = tuple(images.shape[1:])

    engine = SparseEngine(
        model.config,
        variables,
        backend=args.backend,
        capacity_steps=args.capacity_steps,
        latency_profile=args.latency_profile,
    )
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
            if other != execution and (other != "stepwise" or args.stepwise):
                fns[other] = dynamic(other)
        if args.masked:
            masked_engine = SparseEngine(model.config, variables, backend="dense")
            fns["dense_masked"] = lambda: masked_engine.apply(images, masks=masks, gate_offset=args.gate_offset)[0]
    diffs = {name: float(jnp.max(jnp.abs(fn() - reference))) for name, fn in fns.items() if name != "dense"}
    times = time_side_by_side(fns, args.repeats, args.warmup, progress=args.progress, desc="network")
    dense_t, dyn_t = np.asarray(times["dense"]), np.asarray(times["dynamic"])
    result: dict[str, Any] = {
        "model": model.config.to_dict(),
        "image_shape": list(image_shape),
        "batch": args.batch,
        "rate": None if args.checkpoint else args.rate,
        "backend": engine.backend,
        "execution": execution,
        "latency_profile": args.latency_profile if engine.chooser is not None else None,
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
    if engine.backend != "dense":
        masks_for = plan if execution == "planned" else source
        info = engine.apply(images, masks=masks_for, gate_offset=args.gate_offset, execution=execution)[1]
        result["runs"] = list(info.runs)  # per block: sparse, dense (then masked) or skip
        result["gated_runs"] = info.gated_runs()
    if args.blocks and engine.backend != "dense":
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
    if args.progress:
        from tqdm import tqdm

        iterator = tqdm(traces, desc="blocks", leave=False, file=sys.stderr)
    for trace, record in zip(iterator, aux["blocks"]):
        programs = {"dense": engine.block_program(trace, dense=True), "dynamic": engine.block_program(trace)}
        predicted = None
        if engine.chooser is not None and trace.counts is not None:
            # The plan without the choice: its predicted times, and timed too where dense was chosen.
            counts = np.asarray([trace.counts[k] for k in COUNT_KEYS])
            sparse_plan = plan_block(trace.spec, counts, images.shape[0], engine.capacity_steps)
            if sparse_plan.run == "sparse":
                sparse_ms, dense_ms = engine.chooser.predicted_ms(trace.spec, sparse_plan, images.shape[0])
                predicted = {"sparse_ms": sparse_ms, "dense_ms": dense_ms}
            if sparse_plan != trace.plan:
                programs["sparse"] = engine.block_program(dataclasses.replace(trace, plan=sparse_plan))
        times = time_side_by_side(programs, args.block_repeats, args.warmup)
        dense_t, dyn_t = np.asarray(times["dense"]), np.asarray(times["dynamic"])
        rows.append(
            {
                "name": trace.spec.name,
                "mode": trace.spec.mode,
                "plan": trace.plan.run,
                "predicted": predicted,
                "sparse": stats_ms(np.asarray(times["sparse"])) if "sparse" in times else None,
                "capacities": {k: getattr(trace.plan, k) for k in ("cells", "pixels", "groups", "samples")},
                "counts": trace.counts,
                "dense_ms": float(1e3 * np.median(dense_t)),
                "dynamic_ms": float(1e3 * np.median(dyn_t)),
                "dense": stats_ms(dense_t),
                "dynamic": stats_ms(dyn_t),
                "latency_ratio": float(np.median(dyn_t) / np.median(dense_t)),
                "mac_ratio": float(jnp.mean(record["macs"]) / record["dense_macs"]),
            }
        )
    return rows


def format_table(result: dict[str, Any]) -> str:
    """The result as a text table: per block, then the whole network."""

    def span(stats):
        return f"{stats['median_ms']:8.2f} [{stats['min_ms']:.2f}-{stats['max_ms']:.2f}]"

    chosen = result.get("latency_profile") is not None
    header = (
        f"{'':12s} {'plan':>6s} {'dense ms (median [min-max])':>30s} {'dynamic ms (median [min-max])':>30s} "
        f"{'latency':>8s} {'MACs':>6s}"
    )
    if chosen:
        header += f" {'sparse ms if dense chosen':>30s} {'predicted sparse/dense ms':>26s}"
    lines = [header, "-" * len(header)]
    for row in result.get("blocks", []):
        line = (
            f"{row['name']:12s} {row['plan']:>6s} {span(row['dense']):>30s} {span(row['dynamic']):>30s} "
            f"{row['latency_ratio']:8.3f} {row['mac_ratio']:6.3f}"
        )
        if chosen:
            sparse = span(row["sparse"]) if row.get("sparse") else ""
            predicted = row.get("predicted")
            guess = f"{predicted['sparse_ms']:.3f} / {predicted['dense_ms']:.3f}" if predicted else ""
            line += f" {sparse:>30s} {guess:>26s}"
        lines.append(line)
    if result.get("blocks"):
        lines.append("-" * len(header))
    lines.append(
        f"{'network':12s} {'':>6s} {span(result['dense']):>30s} {span(result['dynamic']):>30s} "
        f"{result['latency_ratio']:8.3f} {result['mac_ratio']:6.3f}"
    )
    for name, stats in result["others"].items():
        lines.append(f"{'  ' + name:12s} {'':>6s} {'':>30s} {span(stats):>30s} {stats['latency_ratio']:8.3f}")
    machine = result["machine"]
    if "gated_runs" in result:
        runs = result["gated_runs"]
        lines.append(
            f"gated blocks ({result.get('latency_profile') or 'always sparse'}): {runs['sparse']} sparse, "
            f"{runs['dense']} dense then masked, {runs['skip']} skipped"
        )
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
    model.add_argument("--arch", choices=sorted(ARCHS))
    model.add_argument("--mode", help=f"one mode or one per stage, comma separated: {', '.join(MODES)}")
    model.add_argument("--granularity", type=_granularity, help="spatial patch size S per stage, e.g. 4,4,2,1")
    model.add_argument(
        "--rate", type=float, help="forced mask density (spatial cells, channel groups, executed blocks)"
    )
    model.add_argument("--channel-rate", type=float, help="channel-group density when it should differ from --rate")
    model.add_argument("--mask-groups", type=int)
    model.add_argument("--channel-granularity", type=int)
    model.add_argument("--num-classes", type=int)
    model.add_argument("--dtype", choices=("float32", "bfloat16"))
    model.add_argument("--image-size", type=int)
    model.add_argument("--channels", type=int)
    trained = parser.add_argument_group("trained model")
    trained.add_argument("--checkpoint", help="laud_jax.train work directory: its gates decide the masks")
    trained.add_argument(
        "--inputs",
        help="'eval' (the run's eval data; random without --checkpoint), 'random', or an .npy file of NHWC images",
    )
    trained.add_argument("--gate-offset", type=float, help="eval gate threshold offset")
    run = parser.add_argument_group("measurement")
    run.add_argument("--batch", type=int)
    run.add_argument("--backend", choices=BACKENDS)
    run.add_argument(
        "--execution",
        choices=EXECUTIONS,
        help="dynamic figure: planned (masks known ahead: one program), speculative (gates decide; one program "
        "under the plans earlier inputs needed, checked) or stepwise (host reads each block's counts); auto: "
        "planned with --rate, speculative with --checkpoint",
    )
    run.add_argument("--repeats", type=int, help="timed runs of each network (medians reported)")
    run.add_argument("--block-repeats", type=int, help="timed runs of each block alone")
    run.add_argument("--warmup", type=int)
    run.add_argument("--capacity-steps", type=int, help="index-list padding at most 1/steps of the dense work")
    run.add_argument(
        "--latency-profile",
        help="choose per block between sparse and dense-then-masked execution, whichever the latency predictor "
        "says is faster on this hardware profile (preset, 'local', or a profile .json); default: always sparse",
    )
    run.add_argument("--seed", type=int)
    run.add_argument("--no-blocks", dest="blocks", action="store_false", help="skip the per-block table")
    run.add_argument(
        "--skip-masked", dest="masked", action="store_false", help="skip timing the dense masked reference"
    )
    run.add_argument("--skip-stepwise", dest="stepwise", action="store_false", help="skip timing the stepwise driver")
    run.add_argument("--no-progress", dest="progress", action="store_false")
    run.add_argument("--json", help="write the result record here")
    parser.set_defaults(**{f.name: f.default for f in dataclasses.fields(BenchmarkSettings)})
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchmarkSettings, str | None]:
    """(settings, --json path) from the command line; bad values exit with a one-line message."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    json_path = args.pop("json")
    try:
        return BenchmarkSettings(**args), json_path
    except ValueError as err:
        parser.error(str(err))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    settings, json_path = parse_args(argv)
    try:
        result = run_benchmark(settings)
    except ValueError as err:  # bad model settings or inputs: say what, not a traceback
        raise SystemExit(f"error: {err}") from err
    print(format_table(result))
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {json_path}")
    return result


if __name__ == "__main__":
    main()

"""Check the sparse engine's pallas backend against its xla backend, and time both.

Builds a ResNet with random weights (`laud_jax.sparse.synthetic.random_variables`) and
forced spatial masks of exact density (`random_masks`), and runs it with
`SparseEngine(backend="pallas")` and `SparseEngine(backend="xla")`: block by block (one
block per stage by default, fed the same traced input, so each record covers exactly the
kernel launches the engine makes for that block: gather_matmul, patch_conv,
conv1x1_scatter_add, on the traced index lists, routing's row map and patch ids
included, which the network's program builds once per block with the lists: no launch of
a block builds an index) and the whole network (one planned program). Each record holds the
relative error of pallas against xla, max |pallas - xla| / max |xla|, the Pallas
kernels launched, and both latencies measured side by side (`laud_jax.timing`: warm-up,
then rotating order, `block_until_ready`).

    python -m laud_jax.gpu_check.selfcheck                      # GPU: ResNet-50 at 224
    python -m laud_jax.gpu_check.selfcheck --dtype float32 --batch 8 --json selfcheck.json
    python -m laud_jax.gpu_check.selfcheck --quick              # CPU: a tiny net, seconds

Without a GPU the kernels run in interpret mode on a tiny network (`--quick` is implied):
a correctness check whose timings mean nothing. Exits 1 when an error exceeds the
tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from laud_jax.models import build_model, network_spec
from laud_jax.sparse import SparseEngine
from laud_jax.sparse.synthetic import random_masks, random_variables
from laud_jax.timing import stats_ms, time_side_by_side

# max |pallas - xla| / max |xla|: a GPU runs float32 matmuls on tf32 tensor cores.
TOLERANCE = {"float32": 1e-2, "bfloat16": 5e-2}


@dataclasses.dataclass(frozen=True)
class Setup:
    """What to build and how to measure it."""

    arch: str
    image: tuple[int, int]
    granularity: tuple[int, ...]
    densities: tuple[float, ...]
    batch: int = 1
    dtype: str = "bfloat16"
    mode: str = "spatial"
    repeats: int = 20
    warmup: int = 3
    all_blocks: bool = False
    seed: int = 0


# On a GPU: ResNet-50 at 224 (spatial masks 4/4/2/1 as in the benchmark). On a CPU the
# kernels are interpreted: resnet_tiny (1-2 blocks per stage) on a non-square image.
FULL = Setup("resnet50", (224, 224), (4, 4, 2, 1), (0.25, 0.5, 1.0))
QUICK = Setup("resnet_tiny", (32, 48), (4, 2, 2, 1), (0.5,), dtype="float32", repeats=2, warmup=1)


def relative_error(actual: jax.Array, expected: jax.Array) -> tuple[float, float]:
    """(max |actual - expected| / max |expected|, max |actual - expected|), in float32."""
    actual = np.asarray(actual, np.float32)
    expected = np.asarray(expected, np.float32)
    error = float(np.max(np.abs(actual - expected)))
    return error / max(float(np.max(np.abs(expected))), 1e-30), error


def kernel_launches(fn: Callable[[], Any]) -> list[str]:
    """Names of the Pallas kernels `fn` launches (from its jaxpr; nothing is run)."""

    def walk(jaxpr: Any) -> list[str]:
        names = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                info = eqn.params.get("name_and_src_info")
                names.append(eqn.params.get("name") or getattr(info, "name", "?"))
                continue
            for sub in jax_core.jaxprs_in_params(eqn.params):
                names += walk(sub)
        return names

    return walk(jax.make_jaxpr(fn)().jaxpr)


def _measure(fns: dict[str, Callable[[], Any]], setup: Setup) -> dict[str, Any]:
    """Error of pallas against xla, the kernels pallas launches, both latencies."""
    error, max_abs = relative_error(fns["pallas"](), fns["xla"]())
    times = time_side_by_side(fns, setup.repeats, setup.warmup)
    xla, pallas = stats_ms(times["xla"]), stats_ms(times["pallas"])
    return {
        "relative_error": error,
        "max_abs_error": max_abs,
        "kernels": kernel_launches(fns["pallas"]),
        "xla": xla,
        "pallas": pallas,
        "speedup": xla["median_ms"] / pallas["median_ms"],
    }


def run(setup: Setup) -> list[dict[str, Any]]:
    """One record per checked block and density, and one per density for the network."""
    config = {
        "arch": setup.arch,
        "num_classes": 1000,
        "mode": setup.mode,
        "granularity": setup.granularity,
        "dtype": setup.dtype,
    }
    model = build_model(config)
    image_shape = (*setup.image, 3)
    spec = network_spec(model.config, image_shape)
    variables = random_variables(model, image_shape, setup.seed)
    engines = {b: SparseEngine(model.config, variables, backend=b) for b in ("xla", "pallas")}
    rng = np.random.default_rng(setup.seed + 1)
    images = jnp.asarray(rng.standard_normal((setup.batch, *image_shape)), jnp.float32)
    last_of_stage = {block.stage: i for i, block in enumerate(spec.blocks)}
    chosen = range(len(spec.blocks)) if setup.all_blocks else sorted(last_of_stage.values())
    records = []
    for density in setup.densities:
        masks = random_masks(spec, setup.batch, density, seed=setup.seed)
        plan = engines["xla"].plan_masks(masks, image_shape, setup.batch)
        traces = engines["xla"].trace_blocks(images, masks=plan)
        common = {"density": density, "batch": setup.batch, "dtype": setup.dtype}
        for i in chosen:
            trace = traces[i]
            fns = {name: engine.block_program(trace) for name, engine in engines.items()}
            records.append(
                {
                    "scope": "block",
                    "name": trace.spec.name,
                    "stage": trace.spec.stage + 1,
                    "S": trace.spec.granularity if trace.spec.spatial else None,
                    "plan": trace.plan.run,
                    "capacities": {"cells": trace.plan.cells, "pixels": trace.plan.pixels},
                    **common,
                    **_measure(fns, setup),
                }
            )
        fns = {
            name: (lambda engine=engine, plan=plan: engine.apply(images, masks=plan, execution="planned")[0])
            for name, engine in engines.items()
        }
        records.append(
            {
                "scope": "network",
                "name": setup.arch,
                "stage": None,
                "S": None,
                "plan": "planned",
                "capacities": None,
                **common,
                **_measure(fns, setup),
            }
        )
    return records


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """Plain-text table: one row per record."""
    header = ("scope", "name", "S", "density", "launches", "rel. error", "xla ms", "pallas ms", "xla/pallas")
    rows = [header] + [
        (
            r["scope"],
            r["name"],
            str(r["S"] or "-"),
            f"{r['density']:.2f}",
            str(len(r["kernels"])),
            f"{r['relative_error']:.2e}",
            f"{r['xla']['median_ms']:.3f}",
            f"{r['pallas']['median_ms']:.3f}",
            f"{r['speedup']:.2f}x",
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Setup]:
    """The command line and the Setup it asks for."""
    parser = argparse.ArgumentParser(
        prog="python -m laud_jax.gpu_check.selfcheck",
        description="Run a ResNet with forced spatial masks on the sparse engine's pallas and xla "
        "backends: check pallas against xla block by block and for the whole network, and time "
        "both side by side. Defaults: ResNet-50 at 224 on a GPU; --quick (implied without a GPU): "
        "resnet_tiny at 32x48, interpret mode.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny network, one density, 2 repeats (the default without a GPU)"
    )
    parser.add_argument("--arch", help=f"model architecture (default {FULL.arch}; quick: {QUICK.arch})")
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help=f"input image (default {FULL.image}; quick: {QUICK.image})",
    )
    parser.add_argument(
        "--granularity",
        type=int,
        nargs="+",
        help=f"spatial mask patch side per stage (default {FULL.granularity}; quick: {QUICK.granularity})",
    )
    parser.add_argument(
        "--mode",
        choices=["spatial", "both"],
        default="spatial",
        help="dynamic mode of every stage (both: spatial + channel masks)",
    )
    parser.add_argument("--densities", type=float, nargs="+", help="mask densities in [0, 1]")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), help="engine dtype (default bfloat16; quick: float32)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, help="timed rounds per record")
    parser.add_argument("--warmup", type=int, help="untimed calls per callable (compilation included)")
    parser.add_argument("--all-blocks", action="store_true", help="check every block, not one per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="write the device, setup, tolerance and records")
    args = parser.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    base = QUICK if args.quick or not on_gpu else FULL
    chosen = {
        "arch": args.arch,
        "image": None if args.image_size is None else tuple(args.image_size),
        "granularity": None if args.granularity is None else tuple(args.granularity),
        "densities": None if args.densities is None else tuple(args.densities),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    setup = dataclasses.replace(
        base,
        **{k: v for k, v in chosen.items() if v is not None},
        batch=args.batch,
        mode=args.mode,
        all_blocks=args.all_blocks,
        seed=args.seed,
    )
    if setup.batch < 1 or setup.repeats < 1 or setup.warmup < 0:
        parser.error("--batch and --repeats must be >= 1, --warmup >= 0")
    if not all(0.0 <= d <= 1.0 for d in setup.densities):
        parser.error("--densities must lie in [0, 1]")
    return args, setup


def main(argv: Sequence[str] | None = None) -> int:
    args, setup = parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu:
        print(
            "no GPU: the Pallas kernels run in interpret mode; a correctness check, the timings mean nothing",
            file=sys.stderr,
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*interpret mode.*")
        records = run(setup)
    device = jax.devices()[0].device_kind
    tolerance = TOLERANCE[setup.dtype]
    failures = [r for r in records if not r["relative_error"] <= tolerance]
    print(
        f"device: {device}  implementation: {'pallas' if on_gpu else 'interpret'}  arch: {setup.arch}  "
        f"image: {setup.image[0]}x{setup.image[1]}  dtype: {setup.dtype}  batch: {setup.batch}"
    )
    print(format_table(records))
    if args.json:
        result = {
            "device": device,
            "implementation": "pallas" if on_gpu else "interpret",
            "setup": dataclasses.asdict(setup),
            "tolerance": tolerance,
            "passed": not failures,
            "records": records,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    for r in failures:
        print(
            f"FAIL {r['scope']} {r['name']} density {r['density']}: relative error "
            f"{r['relative_error']:.3g} > {tolerance}",
            file=sys.stderr,
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput: dynamic vs static train step, measured side by side.

  python -m laud_jax.training.throughput --arch resnet50 --batch 8 --out bench.json

Both steps are the trainer's own jitted step (SGD Nesterov, the loss of the recipe: CE for
the static model, CE + sparsity loss with Gumbel masks for the dynamic one), timed with laud_jax.timing
(warm-up, block_until_ready, the two models alternating each round so that background
load affects both alike; median, min and max).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from laud_jax import config_utils
from laud_jax.timing import time_side_by_side
from laud_jax.training import steps as steps_lib


def build_step(model_cfg: dict[str, Any], image_size: int, batch: int, seed: int = 0):
    """(jitted step, state, batch) for one model config."""
    from laud_jax import models

    model = models.build_model(model_cfg)
    config = config_utils.imagenet_config(model_cfg["arch"])
    dynamic = any(m != "static" for m in models.model_config(model_cfg).mode)
    tx, _ = steps_lib.make_optimizer(config.optimizer, batch, 1000)
    shape = (image_size, image_size, 3)
    state = jax.jit(lambda s: steps_lib.init_state(model, tx, s, shape))(np.int32(seed))
    step = jax.jit(steps_lib.make_train_step(model, tx, config.loss, dynamic, None), donate_argnums=(0,))
    rng = np.random.default_rng(seed)
    data = {
        "image": jnp.asarray(rng.standard_normal((batch, *shape), np.float32)),
        "label": jnp.asarray(rng.integers(0, model_cfg["num_classes"], batch, np.int32)),
    }
    return step, state, data


def measure(
    configs: dict[str, dict[str, Any]], image_size: int, batch: int, warmup: int, repeats: int, log=print
) -> dict[str, dict[str, float]]:
    """Seconds per train step for each config, timed side by side (laud_jax.timing)."""
    runners = {}
    for name, cfg in configs.items():
        start = time.perf_counter()
        step, state, data = build_step(cfg, image_size, batch)
        runners[name] = {"step": step, "state": state, "data": data}
        jax.block_until_ready(advance(runners[name]))
        log(f"{name}: compiled in {time.perf_counter() - start:.1f} s")
    times = time_side_by_side(
        {name: functools.partial(advance, runner) for name, runner in runners.items()},
        repeats,
        warmup,
        progress=True,
        desc="train steps",
    )
    return {
        name: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
            "images_per_s": batch / statistics.median(t),
            "samples_s": t,
        }
        for name, t in times.items()
    }


def advance(runner: dict[str, Any]) -> Any:
    """One train step of a runner {'step', 'state', 'data'}; keeps the new state, returns it."""
    runner["state"], metrics = runner["step"](runner["state"], runner["data"], np.float32(1.0), np.float32(0.5), None)
    return runner["state"], metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--mode", default="spatial", help="dynamic mode of the compared model")
    parser.add_argument("--granularity", default="4,4,2,1", help="per-stage S (spatial modes)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench_train.json", help="JSON result file")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.warmup < 1:
        parser.error("--batch, --repeats and --warmup must be >= 1")
    base = {"arch": args.arch, "num_classes": 1000, "granularity": tuple(int(s) for s in args.granularity.split(","))}
    configs = {"static": dict(base, mode="static"), "dynamic": dict(base, mode=args.mode)}
    try:
        from laud_jax import models

        for cfg in configs.values():
            models.network_spec(models.model_config(cfg), (args.image_size, args.image_size, 3))
    except ValueError as e:
        parser.error(str(e))
    print(
        f"{args.arch}, batch {args.batch}, {args.image_size}x{args.image_size}, "
        f"{jax.devices()[0].platform} ({os.cpu_count()} cores): compiling...",
        flush=True,
    )
    results = measure(
        configs, args.image_size, args.batch, args.warmup, args.repeats, log=lambda m: print(m, flush=True)
    )
    ratio = results["dynamic"]["median_s"] / results["static"]["median_s"]
    print(f"\n{'train step':<22} {'median ms':>10} {'images/s':>10}")
    for name, r in results.items():
        label = f"{name} ({configs[name]['mode']})"
        print(f"{label:<22} {r['median_s'] * 1e3:>10.1f} {r['images_per_s']:>10.2f}")
    print(f"dynamic / static step time: {ratio:.3f}x (target <= 1.3x)")
    record = {
        "arch": args.arch,
        "batch": args.batch,
        "image_size": args.image_size,
        "mode": args.mode,
        "granularity": base["granularity"],
        "repeats": args.repeats,
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "results": results,
        "dynamic_over_static": ratio,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

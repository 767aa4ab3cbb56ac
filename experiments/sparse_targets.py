"""Measure the sparse engine's latency targets (ResNet-50 at 224) and write docs/sparse_targets.md.

    PYTHONPATH=. python experiments/sparse_targets.py [--repeats 30] [--only spatial-b1,...]

Each target is one ``python -m laud_jax.benchmark`` run (forced masks, planned execution,
dense and dynamic alternating, per-block table); the JSON of each lands beside the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from laud_jax import benchmark

# name -> (benchmark arguments, latency-ratio target)
TARGETS = {
    "spatial-b1": (["--mode", "spatial", "--granularity", "4,4,2,1", "--rate", "0.5", "--batch", "1"], 0.70),
    "spatial-b8": (["--mode", "spatial", "--granularity", "4,4,2,1", "--rate", "0.5", "--batch", "8"], 0.75),
    "spatial-8721-b1": (["--mode", "spatial", "--granularity", "8,7,2,1", "--rate", "0.5", "--batch", "1"], 0.70),
    "layer-b1": (["--mode", "layer", "--rate", "0.5", "--batch", "1"], 0.60),
    "channel-b1": (["--mode", "channel", "--rate", "0.5", "--batch", "1"], 0.60),
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--only", default=",".join(TARGETS), help=f"comma separated, from {list(TARGETS)}")
    parser.add_argument("--out", default="docs/sparse_targets")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name in args.only.split(","):
        if name not in TARGETS:
            parser.error(f"unknown target {name!r}; choose from {list(TARGETS)}")
        extra, target = TARGETS[name]
        batch = extra[extra.index("--batch") + 1]
        repeats = args.repeats if batch == "1" else max(5, args.repeats // 3)
        json_path = os.path.join(args.out, f"{name}.json")
        print(f"== {name} (target latency ratio <= {target})", file=sys.stderr)
        benchmark.main(
            [
                "--arch",
                "resnet50",
                "--repeats",
                str(repeats),
                "--block-repeats",
                str(max(5, repeats // 2)),
                "--json",
                json_path,
                *extra,
            ]
        )
    rows = [
        "| target | setting | dense ms | dynamic ms | latency ratio (paired) | MAC ratio | latency / MAC "
        "| target | met | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, (extra, target) in TARGETS.items():
        path = os.path.join(args.out, f"{name}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            r = json.load(f)
        rows.append(
            f"| {name} | {' '.join(extra)} | {r['dense_ms']:.1f} | {r['dynamic_ms']:.1f} | "
            f"{r['latency_ratio']:.3f} ({r['paired_latency_ratio']:.3f}) | {r['mac_ratio']:.3f} | "
            f"{r['efficiency']:.2f} | {target} | {'yes' if r['latency_ratio'] <= target else 'no'} | "
            f"{r['machine']['load_before'][0]:.1f} |"
        )
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""Sweep the sparse engine's latency against its MAC savings; write a table and a plot to docs/.

    PYTHONPATH=. python experiments/sweep_sparse.py                 # the full grid (hours on 2 cores)
    PYTHONPATH=. python experiments/sweep_sparse.py --archs resnet50 --batches 1 --rates 0.5

Each point is one ``python -m laud_jax.benchmark`` measurement (forced masks of the given
rate, planned execution, dense and dynamic alternating in one process). Finished points
are kept in the JSON file and skipped on a rerun, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from laud_jax import benchmark

# name -> (mode, granularity). Granularity is ignored by modes without spatial masks.
SETTINGS = {
    "spatial 2-2-1-1": ("spatial", "2,2,1,1"),
    "spatial 4-4-2-1": ("spatial", "4,4,2,1"),
    "spatial 8-7-2-1": ("spatial", "8,7,2,1"),
    "spatial+channel 4-4-2-1": ("spatial+channel", "4,4,2,1"),
    "channel": ("channel", "4,4,2,1"),
    "layer": ("layer", "4,4,2,1"),
    "lc": ("lc", "4,4,2,1"),
}


def point_key(arch: str, batch: int, rate: float, setting: str) -> str:
    return f"{arch}|b{batch}|r{rate:g}|{setting}"


def measure(arch: str, batch: int, rate: float, setting: str, repeats: int) -> dict[str, Any]:
    mode, granularity = SETTINGS[setting]
    result = benchmark.run_benchmark(
        arch=arch,
        mode=mode,
        granularity=tuple(int(g) for g in granularity.split(",")),
        rate=rate,
        batch=batch,
        repeats=repeats,
        warmup=2,
        blocks=False,
        masked=False,
        stepwise=False,
        progress=False,
    )
    keep = (
        "dense_ms",
        "dynamic_ms",
        "latency_ratio",
        "paired_latency_ratio",
        "min_latency_ratio",
        "mac_ratio",
        "efficiency",
    )
    return {
        "arch": arch,
        "batch": batch,
        "rate": rate,
        "setting": setting,
        **{k: result[k] for k in keep},
        "load": result["machine"]["load_before"][0],
        "max_abs_diff": result["max_abs_diff_vs_model"]["dynamic"],
    }


def write_markdown(points: list[dict[str, Any]], path: str) -> None:
    lines = [
        "| arch | batch | setting | rate | dense ms | dynamic ms | latency ratio | MAC ratio | latency / MAC | load |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {name: i for i, name in enumerate(SETTINGS)}
    for p in sorted(points, key=lambda p: (p["arch"], p["batch"], order.get(p["setting"], 99), p["rate"])):
        lines.append(
            f"| {p['arch']} | {p['batch']} | {p['setting']} | {p['rate']:g} | {p['dense_ms']:.1f} | "
            f"{p['dynamic_ms']:.1f} | {p['latency_ratio']:.3f} | {p['mac_ratio']:.3f} | "
            f"{p['efficiency']:.2f} | {p['load']:.1f} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(points: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    markers = dict(zip(SETTINGS, "os^Dvx*"))
    for ax, batch in zip(axes, sorted({p["batch"] for p in points})[:2] or [1]):
        for setting in SETTINGS:
            for arch, color in (("resnet50", "tab:blue"), ("resnet101", "tab:orange")):
                sel = [p for p in points if p["batch"] == batch and p["setting"] == setting and p["arch"] == arch]
                if sel:
                    ax.scatter(
                        [p["mac_ratio"] for p in sel],
                        [p["latency_ratio"] for p in sel],
                        marker=markers[setting],
                        color=color,
                        label=f"{arch} {setting}",
                    )
        ax.plot([0, 1.05], [0, 1.05], "k--", lw=0.8, label="latency = MACs")
        ax.plot([0, 1.05], [0, 1.05 * 1.15], "k:", lw=0.8, label="latency = 1.15 x MACs")
        ax.set(xlim=(0, 1.05), ylim=(0, 1.25), xlabel="MAC ratio (dynamic / dense)", title=f"batch {batch}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("latency ratio (dynamic / dense)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="resnet50,resnet101")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rates", default="0.25,0.5,0.75")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma separated, from: {list(SETTINGS)}")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default="docs/sparse_sweep.json")
    parser.add_argument("--markdown", default="docs/sparse_sweep.md")
    parser.add_argument("--plot", default="docs/sparse_sweep.png")
    args = parser.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",")]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    grid = [
        (arch, int(batch), float(rate), setting)
        for arch in args.archs.split(",")
        for batch in args.batches.split(",")
        for setting in settings
        for rate in args.rates.split(",")
    ]
    points: dict[str, dict[str, Any]] = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            points = {point_key(p["arch"], p["batch"], p["rate"], p["setting"]): p for p in json.load(f)}
    todo = [g for g in grid if point_key(*g) not in points]
    print(f"{len(grid) - len(todo)} of {len(grid)} points already measured", file=sys.stderr)
    for arch, batch, rate, setting in tqdm(todo, desc="sweep", file=sys.stderr):
        points[point_key(arch, batch, rate, setting)] = measure(arch, batch, rate, setting, args.repeats)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(list(points.values()), f, indent=1)
        write_markdown(list(points.values()), args.markdown)  # usable while the sweep runs
    measured = list(points.values())
    write_markdown(measured, args.markdown)
    write_plot(measured, args.plot)
    print(f"wrote {args.json}, {args.markdown}, {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()

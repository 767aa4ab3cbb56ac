"""Granularity ablation: predicted latency ratio vs patch size S per stage at rho = 0.5.

For ResNet-50, ResNet-101 and RegNetY-800MF on every hardware preset (server GPUs at batch
128 in bf16, the Jetson TX2 at batch 1 in fp32), each stage is made spatial with patch size
S (the other stages static) and its latency ratio (dynamic / static stage time) is
predicted; layer skipping and channel skipping at the same rate are listed for reference.
Also the sanity checks against the published analysis and the search time for ResNet-101.

    PYTHONPATH=. python experiments/latency_granularity_ablation.py [--out docs]

Writes docs/latency_granularity.md, docs/latency_granularity.png and
docs/latency_granularity.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from laud_jax.latency import ENGINES, PRESETS, BlockShape, block_setting, grid_block_times, predict, search
from laud_jax.latency.launches import MODE_CODE
from laud_jax.models import network_spec

ARCHS = ("resnet50", "resnet101", "regnety_800mf")
SIZES = (1, 2, 4, 7, 8, 14, 28)
RHO = 0.5
HARDWARE = {  # preset: (batch, dtype)
    "v100": (128, "bfloat16"),
    "rtx3090": (128, "bfloat16"),
    "a100": (128, "bfloat16"),
    "h100": (128, "bfloat16"),
    "jetson_tx2": (1, "float32"),
}


def stage_ratios(arch: str, hardware: str, engine: str) -> dict:
    """Per stage: latency ratio per valid S (spatial), and for layer / channel skipping."""
    batch, dtype = HARDWARE[hardware]
    spec = network_spec({"arch": arch, "num_classes": 1000}, (224, 224))
    shapes = BlockShape.from_specs(spec.blocks)
    modes = jnp.asarray(
        [MODE_CODE["static"], MODE_CODE["spatial"], MODE_CODE["layer"], MODE_CODE["channel"]], jnp.float32
    )
    setting = block_setting("spatial", jnp.asarray(SIZES, jnp.float32)[:, None], RHO, batch=batch, dtype=dtype)
    setting = dataclasses.replace(setting, mode=jnp.broadcast_to(modes[None, :], (len(SIZES), 4)))
    times = np.asarray(grid_block_times(PRESETS[hardware], ENGINES[engine], shapes, setting)[0], np.float64)
    result = {}
    for stage in range(spec.config.num_stages):
        members = [i for i, b in enumerate(spec.blocks) if b.stage == stage]
        static = times[members, 0, 0].sum()
        h = spec.blocks[members[-1]].h_out
        result[stage + 1] = {
            "grid": h,
            "spatial": {s: times[members, si, 1].sum() / static for si, s in enumerate(SIZES) if h % s == 0},
            "layer": times[members, 0, 2].sum() / static,
            "channel": times[members, 0, 3].sum() / static,
        }
    return result


def sanity() -> list[dict]:
    rows = []
    for hardware, (batch, dtype) in HARDWARE.items():
        for engine in ("pallas", "halo"):
            row = {"hardware": hardware, "engine": engine, "batch": batch, "dtype": dtype}
            for label, mode, size in (
                ("S=1", "spatial", 1),
                ("S=2", "spatial", (2, 2, 2, 1)),
                ("S=4,4,2,1", "spatial", (4, 4, 2, 1)),
                ("S=7", "spatial", 7),
                ("layer", "layer", 1),
                ("channel", "channel", 1),
            ):
                spec = network_spec(
                    {"arch": "resnet101", "num_classes": 1000, "mode": mode, "granularity": size}, (224, 224)
                )
                row[label] = predict(spec, PRESETS[hardware], engine, rho=RHO, batch=batch, dtype=dtype).latency_ratio
            rows.append(row)
    return rows


def search_seconds(repeats: int = 7) -> dict:
    kwargs = dict(target_rate=0.5, batch=128, dtype="bfloat16")
    start = time.perf_counter()
    result = search("resnet101", PRESETS["v100"], ENGINES["pallas"], **kwargs)
    first = time.perf_counter() - start
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = search("resnet101", PRESETS["v100"], ENGINES["pallas"], **kwargs)
        walls.append(time.perf_counter() - start)
    sizes, modes = result.candidates["granularities"], result.candidates["modes"]
    return {
        "first_call_s": first,
        "median_s": statistics.median(walls),
        "max_s": max(walls),
        "grid": f"4 stages x {len(sizes)} S x {len(modes)} modes x 3 channel group sizes x 20 rates",
        "choice": [(s["mode"], s["granularity"]) for s in result.stages],
        "latency_ratio": result.latency_ratio,
        "load_average": os.getloadavg()[0],
    }


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def write_markdown(path: str, ablation: dict, sanity_rows: list[dict], timing: dict) -> None:
    lines = [
        "# Granularity ablation (predicted)",
        "",
        f"Latency ratio (dynamic / static time of the stage) at activation rate rho = {RHO}, one stage "
        "dynamic at a time, i.i.d. patch masks. Server GPUs: batch 128, bf16 (fp16 on V100); "
        "Jetson TX2: batch 1, fp32. Engine: `pallas` (this project's kernels, driven block by block). "
        "Regenerate with `PYTHONPATH=. python experiments/latency_granularity_ablation.py`.",
        "",
    ]
    for arch in ARCHS:
        lines += [
            f"## {arch}",
            "",
            "| hardware | stage (grid) | " + " | ".join(f"S={s}" for s in SIZES) + " | layer | channel |",
            "|---|---|" + "---|" * (len(SIZES) + 2),
        ]
        for hardware in HARDWARE:
            for stage, row in ablation["pallas"][arch][hardware].items():
                cells = [_fmt(row["spatial"][s]) if s in row["spatial"] else "" for s in SIZES]
                lines.append(
                    f"| {hardware} | {stage} ({row['grid']}x{row['grid']}) | "
                    + " | ".join(cells)
                    + f" | {_fmt(row['layer'])} | {_fmt(row['channel'])} |"
                )
        lines.append("")
    lines += [
        "## Sanity against the published analysis (ResNet-101, whole network, rho = 0.5)",
        "",
        "`pallas`: this project's engine (conv1 on the dilated pixel list, NHWC, per-block host "
        "round trip). `halo`: conv1 recomputed on each patch's (S+2)^2 window with halo, single program.",
        "",
        "| hardware | engine | batch | dtype | S=1 | S=2 | S=4,4,2,1 | S=7 | layer | channel |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sanity_rows:
        lines.append(
            f"| {row['hardware']} | {row['engine']} | {row['batch']} | {row['dtype']} | "
            + " | ".join(_fmt(row[k]) for k in ("S=1", "S=2", "S=4,4,2,1", "S=7", "layer", "channel"))
            + " |"
        )
    lines += [
        "",
        "## Search time",
        "",
        f"ResNet-101 granularity search ({timing['grid']}) on V100 at batch 128: "
        f"{1e3 * timing['median_s']:.0f} ms median, {1e3 * timing['max_s']:.0f} ms max over repeats after "
        f"compilation (first call incl. compilation {timing['first_call_s']:.1f} s; load average "
        f"{timing['load_average']:.1f} on 2 shared cores). Choice: {timing['choice']}, predicted "
        f"network latency ratio {timing['latency_ratio']:.3f}.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(path: str, ablation: dict) -> None:
    fig, axes = plt.subplots(
        len(ARCHS), len(HARDWARE), figsize=(3.2 * len(HARDWARE), 2.8 * len(ARCHS)), sharex=True, squeeze=False
    )
    for r, arch in enumerate(ARCHS):
        for c, hardware in enumerate(HARDWARE):
            ax = axes[r, c]
            for stage, row in ablation["pallas"][arch][hardware].items():
                sizes = sorted(row["spatial"])
                ax.plot(sizes, [row["spatial"][s] for s in sizes], marker="o", label=f"stage {stage}")
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_xticks(SIZES, [str(s) for s in SIZES])
            if r == 0:
                ax.set_title(f"{hardware} (b={HARDWARE[hardware][0]})", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{arch}\nlatency ratio", fontsize=9)
            if r == len(ARCHS) - 1:
                ax.set_xlabel("S")
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Predicted stage latency ratio vs S at rho = {RHO} (pallas engine)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs", help="output directory (default docs)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ablation = {"pallas": {arch: {hw: stage_ratios(arch, hw, "pallas") for hw in HARDWARE} for arch in ARCHS}}
    sanity_rows = sanity()
    timing = search_seconds()
    write_markdown(os.path.join(args.out, "latency_granularity.md"), ablation, sanity_rows, timing)
    plot(os.path.join(args.out, "latency_granularity.png"), ablation)
    with open(os.path.join(args.out, "latency_granularity.json"), "w") as f:
        json.dump({"ablation": ablation, "sanity": sanity_rows, "search": timing}, f, indent=1, default=float)
    print(f"wrote {args.out}/latency_granularity.md, .png, .json; search {1e3 * timing['median_s']:.0f} ms")


if __name__ == "__main__":
    main()

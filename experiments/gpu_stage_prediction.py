"""Predicted sparse vs dense blocks of ResNet-50 per stage on the H100 and A100 presets.

For each stage of ResNet-50 at 224 x 224 made spatial (rate 0.5, bf16, the engine's
``pallas`` backend model) and every patch size S the stage's grid allows, at batch 1 and 8:
the latency predictor's time of the stage's blocks run sparse (the kernels, without the
maskers, gates and index lists, which run either way) and run dense (the static blocks),
the maskers' time on top, the launch geometry of each Pallas kernel (CTAs, K steps per CTA,
split-K) and whether the engine's per-block dense fallback (``SparseEngine(latency_profile=
...)``, ``laud_jax.latency.chooser.ExecutionChooser``) would run the blocks dense.

These are predictions from datasheet presets and assumed efficiencies, not measurements.

    PYTHONPATH=. python experiments/gpu_stage_prediction.py [--out docs]

Writes docs/gpu_stage_prediction.md and docs/gpu_stage_prediction.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

import jax
import numpy as np

from laud_jax.latency import ENGINES, PRESETS, BlockShape, block_time, dilated_density, predict
from laud_jax.latency.chooser import ExecutionChooser, setting_at_counts
from laud_jax.latency.launches import LAUNCH_NAMES, OVERHEAD_SLOTS, block_launches, static_twin
from laud_jax.latency.predictor import block_launch_times
from laud_jax.models import network_spec
from laud_jax.models.specs import BlockSpec, NetworkSpec
from laud_jax.sparse.routing import COUNT_KEYS, DEFAULT_CAPACITY_STEPS, count_totals, plan_block

ARCH = "resnet50"
RHO = 0.5
DTYPE = "bfloat16"
HARDWARE = ("h100", "a100")
BATCHES = (1, 8)
SIZES = (1, 2, 4, 7, 8)  # the engine's patch sizes; a stage takes those dividing its grid
MAIN_SIZE = 2  # the headline table (stage 4, 7 x 7, takes S = 1 and 7 instead)
KERNELS = {"conv1": "gather_matmul", "conv2": "patch_conv", "conv3": "conv1x1_scatter_add"}
GEOMETRY = ("ctas", "k_steps", "split")


def stage_network(size: int, stage: int) -> NetworkSpec:
    """ResNet-50 at 224, spatial, with ``stage`` (0-based) at patch size ``size`` (the others at 1)."""
    granularity = tuple(size if i == stage else 1 for i in range(4))
    return network_spec({"arch": ARCH, "num_classes": 1000, "mode": "spatial", "granularity": granularity}, (224, 224))


def stage_specs(size: int, stage: int) -> list[BlockSpec]:
    """The blocks of ``stage`` in :func:`stage_network`."""
    return [block for block in stage_network(size, stage).blocks if block.stage == stage]


def routing_counts(block: BlockSpec, batch: int) -> dict[str, float]:
    """Counts of a block at rate RHO: half the mask cells (rounded up) and the conv1 pixels
    those cells dilate to on average (cells active independently)."""
    totals = count_totals(block, batch)
    cells = math.ceil(RHO * totals["cells"])
    stride = block.stride if block.kind == "bottleneck" else 1
    h1, w1 = block.conv1_hw
    keep = float(dilated_density(cells / totals["cells"], block.granularity, stride, h1, w1))
    pixels = min(totals["pixels"], math.ceil(keep * totals["pixels"]))
    return {"cells": cells, "pixels": pixels, "groups": 0, "samples": batch}


def block_kernels(block: BlockSpec, counts: dict[str, float], batch: int) -> dict[str, dict[str, int]]:
    """CTAs, K steps per CTA and split-K of each Pallas kernel the block launches (from the
    predictor's launch records; a conv the engine runs densely is left out)."""
    setting = setting_at_counts(block, counts, batch, DTYPE)
    shape = jax.tree.map(lambda x: x[0], BlockShape.from_specs([block]))
    records = block_launches(shape, setting, ENGINES["pallas"])
    geometry = {}
    for conv, kernel in KERNELS.items():
        slot = LAUNCH_NAMES.index(conv)
        values = {name: int(round(float(getattr(records, name)[slot]))) for name in GEOMETRY}
        if values["k_steps"] > 0:
            geometry[conv] = {"kernel": kernel, **values}
    return geometry


def drained_extra_ms(hardware: str, block: BlockSpec, counts: dict[str, float], batch: int) -> float:
    """What the block would predict in addition with drained main loops (wait depth 0:
    every K step waits for its loads, as patch_conv's did before its pipeline fix)."""
    setting = setting_at_counts(block, counts, batch, DTYPE)
    shape = jax.tree.map(lambda x: x[0], BlockShape.from_specs([block]))
    profile, engine = PRESETS[hardware].as_arrays(), ENGINES["pallas"]
    drained = block_time(profile, engine.replace(wait_depth=0.0).as_arrays(), shape, setting)
    return 1e3 * float(drained - block_time(profile, engine.as_arrays(), shape, setting))


def slot_breakdown(hardware: str, stage: int, size: int, batch: int) -> dict[str, list]:
    """Per launch slot of the stage's first block: predicted microseconds sparse (maskers,
    gates and index lists left out) and dense, and the slot's launches."""
    block = stage_specs(size, stage)[0]
    setting = setting_at_counts(block, routing_counts(block, batch), batch, DTYPE)
    shape = jax.tree.map(lambda x: x[0], BlockShape.from_specs([block]))
    profile, engine = PRESETS[hardware].as_arrays(), ENGINES["pallas"].as_arrays()
    out = {}
    for name, s in (("sparse", setting), ("dense", static_twin(setting))):
        times = np.asarray(block_launch_times(profile, engine, shape, s)) * 1e6
        weights = np.asarray(block_launches(shape, s, ENGINES["pallas"]).weight)
        out[name] = [
            (slot, float(times[i]), float(weights[i]))
            for i, slot in enumerate(LAUNCH_NAMES)
            if times[i] > 0 and slot not in OVERHEAD_SLOTS
        ]
    return {"hardware": hardware, "stage": stage + 1, "S": size, "batch": batch, "block": block.name, **out}


def stage_rows(hardware: str) -> list[dict[str, Any]]:
    """One row per (stage, S, batch) on ``hardware``: per block and summed over the stage."""
    chooser = ExecutionChooser(hardware, "pallas", DTYPE)
    rows = []
    for stage in range(4):
        for size in SIZES:
            try:
                blocks = stage_specs(size, stage)
            except ValueError:  # S does not divide the stage's grid
                continue
            for batch in BATCHES:
                whole = stage_network(size, stage)
                masker_ms = {
                    b["name"]: b["masker_ms"]
                    for b in predict(whole, PRESETS[hardware], "pallas", rho=RHO, batch=batch, dtype=DTYPE).blocks
                }
                per_block = []
                for block in blocks:
                    counts = routing_counts(block, batch)
                    plan = plan_block(
                        block,
                        np.asarray([counts[k] for k in COUNT_KEYS]),
                        batch,
                        DEFAULT_CAPACITY_STEPS,
                    )
                    sparse_ms, dense_ms = chooser.predicted_ms(block, plan, batch)
                    per_block.append(
                        {
                            "name": block.name,
                            "cells": plan.cells,
                            "pixels": plan.pixels,
                            "sparse_ms": sparse_ms,
                            "dense_ms": dense_ms,
                            "masker_ms": masker_ms[block.name],
                            "runs": chooser.choose(block, plan, batch).run,
                            "kernels": block_kernels(block, counts, batch),
                            "drained_extra_ms": drained_extra_ms(hardware, block, counts, batch),
                        }
                    )
                sparse = sum(b["sparse_ms"] for b in per_block)
                dense = sum(b["dense_ms"] for b in per_block)
                masker = sum(b["masker_ms"] for b in per_block)
                drained = sum(b["drained_extra_ms"] for b in per_block)
                chosen = sum(b["sparse_ms"] if b["runs"] == "sparse" else b["dense_ms"] for b in per_block)
                rows.append(
                    {
                        "hardware": hardware,
                        "stage": stage + 1,
                        "S": size,
                        "batch": batch,
                        "blocks": len(per_block),
                        "sparse_ms": sparse,
                        "dense_ms": dense,
                        "masker_ms": masker,
                        "sparse_over_dense": sparse / dense,
                        "with_maskers_over_dense": (sparse + masker) / dense,
                        "dense_fallback_blocks": sum(b["runs"] == "dense" for b in per_block),
                        "drained_extra_ms": drained,
                        "engine_ms": chosen + masker,
                        "per_block": per_block,
                    }
                )
    return rows


def _geometry_cell(row: dict[str, Any], conv: str) -> str:
    """The stage's first block's launch of ``conv`` as CTAs x K steps (/ split), or '-'."""
    kernels = row["per_block"][0]["kernels"]
    if conv not in kernels:
        return "dense"
    g = kernels[conv]
    return f"{g['ctas']} x {g['k_steps']}" + (f" (/{g['split']})" if g["split"] > 1 else "")


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| preset | stage | S | batch | sparse us | dense us | sparse / dense | + maskers us "
        "| (sparse + maskers) / dense | fallback: dense blocks | drained loops would add us "
        "| conv1 CTAs x K steps | conv2 CTAs x K steps | conv3 CTAs x K steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['hardware']} | {r['stage']} | {r['S']} | {r['batch']} | {1e3 * r['sparse_ms']:.1f} | "
            f"{1e3 * r['dense_ms']:.1f} | {r['sparse_over_dense']:.2f} | {1e3 * r['masker_ms']:.1f} | "
            f"{r['with_maskers_over_dense']:.2f} | {r['dense_fallback_blocks']} of {r['blocks']} | "
            f"{1e3 * r['drained_extra_ms']:.1f} | "
            f"{_geometry_cell(r, 'conv1')} | {_geometry_cell(r, 'conv2')} | {_geometry_cell(r, 'conv3')} |"
        )
    return lines


def _breakdown_lines(breakdowns: list[dict[str, Any]]) -> list[str]:
    launch_overhead = {h: 1e6 * float(PRESETS[h].launch_overhead) for h in HARDWARE}
    lines = [
        "Per launch slot of a stage's first block (microseconds, launches in brackets; the",
        "maskers, gates and index lists left out). Each launch costs the preset's launch",
        f"overhead ({', '.join(f'{h} {v:.0f} us' for h, v in launch_overhead.items())}) before any work.",
        "",
    ]
    for b in breakdowns:
        launches = {name: sum(w for _, _, w in b[name]) for name in ("sparse", "dense")}
        totals = {name: sum(t for _, t, _ in b[name]) for name in ("sparse", "dense")}
        overhead = launch_overhead[b["hardware"]]
        lines.append(
            f"- {b['hardware']}, stage {b['stage']}, batch {b['batch']}: {launches['sparse']:g} launches sparse "
            f"({launches['sparse'] * overhead / totals['sparse']:.0%} of its time is launch overhead) vs "
            f"{launches['dense']:g} dense ({launches['dense'] * overhead / totals['dense']:.0%})."
        )
    lines.append("")
    for b in breakdowns:
        cells = {
            name: ", ".join(f"{slot} {t:.1f} ({w:g})" for slot, t, w in b[name])
            + f"; total {sum(t for _, t, _ in b[name]):.1f}"
            for name in ("sparse", "dense")
        }
        lines.append(
            f"- {b['hardware']}, stage {b['stage']} ({b['block']}), S = {b['S']}, batch {b['batch']}: "
            f"sparse: {cells['sparse']}. Dense: {cells['dense']}."
        )
    return lines


def write_markdown(path: str, rows: list[dict[str, Any]], breakdowns: list[dict[str, Any]]) -> None:
    main = [r for r in rows if r["S"] == MAIN_SIZE or (r["stage"] == 4 and r["S"] in (1, 7))]
    wins = [r for r in main if r["sparse_over_dense"] < 1.0]
    lines = [
        "# Predicted sparse vs dense blocks of ResNet-50 on H100 and A100 (per stage)",
        "",
        "**Predictions, not measurements.** No GPU was lent to this work: every figure below",
        "is the latency predictor's (`laud_jax/latency`) on its `h100` and `a100` presets",
        "(datasheet peaks, assumed efficiencies and a 0.5 us memory latency), for the engine's",
        "`pallas` backend model, which now follows the kernels' launch geometry: their default",
        "tiles and split-K rule (imported from `pallas_kernels`), CTAs and K steps per CTA, the",
        "wave count, split-K's reduction launch and the main loops' wait depth (2 copies in",
        "flight, docs/gpu_build_report.md). They have to be checked against timings on a GPU",
        "(`python -m pallas_kernels.selfcheck`, issue 16 item 6).",
        "",
        "```",
        "PYTHONPATH=. python experiments/gpu_stage_prediction.py",
        "```",
        "",
        f"Setting: ResNet-50 at 224 x 224, one stage spatial at a time, rate {RHO} (half the",
        "mask cells on, rounded up; conv1's pixel list at the dilated mask's expected size),",
        f"{DTYPE}, batch 1 and 8, index lists padded to the engine's capacity ladder. Per stage",
        "(sums over its blocks):",
        "",
        "- *sparse*: the block's kernels and XLA ops at those capacities, without the maskers,",
        "  gates and index lists (they run either way: this is what the engine's per-block",
        "  fallback compares, `ExecutionChooser.predicted_ms`);",
        "- *dense*: the static block (cuDNN-class library convs);",
        "- *+ maskers*: the maskers, gates and index lists a dynamic block adds at any rate;",
        "- *fallback*: how many blocks `ExecutionChooser.choose` (what",
        "  `SparseEngine(latency_profile=...)` runs) sends dense: those where sparse is not",
        "  faster than dense;",
        "- *drained loops would add*: the predicted cost of every gathered kernel's main loop",
        "  waiting for its loads at each K step (wait depth 0, as patch_conv through the row map",
        "  did before its pipeline fix), 0.5 us per K step per wave of CTAs: an upper estimate,",
        "  since the model runs one CTA per SM per wave and lets no co-resident CTA hide a stall;",
        "- kernel geometry of the stage's first block: CTAs x K steps per CTA (/ split-K parts),",
        "  `dense` where the engine runs that conv densely (conv1 when its pixel list would",
        "  cover the map).",
        "",
        f"## S = {MAIN_SIZE} (stage 4's 7 x 7 grid: S = 1 and 7)",
        "",
        *_table(main),
        "",
        "## Reading",
        "",
    ]
    lines += _reading(main, wins)
    lines += ["", "## Where the time goes", ""]
    lines += _breakdown_lines(breakdowns)
    lines += [
        "",
        "## Every S the stages allow",
        "",
        *_table(rows),
        "",
        "Per-block figures (and every block's geometry) are in docs/gpu_stage_prediction.json.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _reading(main: list[dict[str, Any]], wins: list[dict[str, Any]]) -> list[str]:
    """Plain statements of the headline table: where sparse is predicted to win, where the
    fallback takes over."""
    out = []
    for hardware in HARDWARE:
        for batch in BATCHES:
            rs = [r for r in main if r["hardware"] == hardware and r["batch"] == batch]
            won = [f"{r['stage']} (S={r['S']}: {r['sparse_over_dense']:.2f})" for r in rs if r["sparse_over_dense"] < 1]
            lost = [
                f"{r['stage']} (S={r['S']}: {r['sparse_over_dense']:.2f})" for r in rs if r["sparse_over_dense"] >= 1
            ]
            fallback = sum(r["dense_fallback_blocks"] for r in rs)
            total = sum(r["blocks"] for r in rs)
            out.append(
                f"- {hardware}, batch {batch}: sparse predicted faster than dense in stage "
                f"{', '.join(won) or '(none)'}; not faster in stage {', '.join(lost) or '(none)'}; the "
                f"fallback runs {fallback} of these {total} blocks dense (stage 4 counted at both S)."
            )
    out.append(f"- {len(wins)} of {len(main)} rows have the sparse kernels predicted faster than the dense block.")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs", help="output directory")
    args = parser.parse_args()
    rows = [row for hardware in HARDWARE for row in stage_rows(hardware)]
    breakdowns = [slot_breakdown("h100", stage, MAIN_SIZE, batch) for stage in (0, 2) for batch in BATCHES]
    os.makedirs(args.out, exist_ok=True)
    write_markdown(os.path.join(args.out, "gpu_stage_prediction.md"), rows, breakdowns)
    settings = {"arch": ARCH, "rho": RHO, "dtype": DTYPE, "engine": "pallas", "measured": False}
    with open(os.path.join(args.out, "gpu_stage_prediction.json"), "w") as f:
        json.dump({"settings": settings, "rows": rows, "breakdowns": breakdowns}, f, indent=1, default=float)


if __name__ == "__main__":
    main()

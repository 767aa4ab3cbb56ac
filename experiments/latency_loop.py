"""Closing the loop: predicted vs measured latency ratio (dynamic / static) on this CPU.

For each setting the sparse engine is measured with ``laud_jax.benchmark.run_benchmark``
(dense and dynamic side by side, per block and for the whole network, random forced masks)
and the latency predictor (``laud_jax.latency``, a fitted profile, the ``xla`` engine model)
is evaluated on the same block shapes at the densities the benchmark executed: each block's
recorded routing counts become its rates, and the predictor pads them with the engine's own
capacity ladder (checked against the recorded capacities). Settings:

- ``spatial``: ResNet-50 at 224, batch 1, spatial 4-4-2-1, rate 0.5;
- ``search``: ResNet-50 with what ``laud_jax.latency.search`` picks (spatial / channel /
  layer per stage) for MAC rate 0.5 at batch 1 on the profile, forced masks at rate 0.5;
- ``demo_b1`` / ``demo_b16``: the quickstart model (configs/quickstart.py, 64x64x1, 10
  classes, random weights and random masks at rate 0.5) at batch 1 and 16;
- ``*_local``: the same with ``latency_profile=PROFILE`` (the engine picks sparse or
  dense-then-masked per block).

    PYTHONPATH=. python experiments/latency_loop.py                # docs/latency_loop.{md,json,png}
    PYTHONPATH=. python experiments/latency_loop.py --quick --out runs/latency_loop   # resnet_tiny, seconds
    PYTHONPATH=. python experiments/latency_loop.py --from-json docs/latency_loop.json   # re-render only

A hand-written reading between ``<!-- reading -->`` and ``<!-- /reading -->`` in the
markdown is kept when the file is rewritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from laud_jax import benchmark, data
from laud_jax.config_utils import load_config_file, model_dict, with_model_update
from laud_jax.latency import ENGINES, BlockShape, block_setting, get_profile, search
from laud_jax.latency.chooser import setting_at_counts
from laud_jax.latency.launches import LAUNCH_NAMES, OVERHEAD_SLOTS, ladder_capacity, static_twin
from laud_jax.latency.predictor import block_launch_times, fixed_time
from laud_jax.latency.profiles import local_profile_path, profile_from_json
from laud_jax.latency.search import SEARCH_MODES, auto_fields, model_update, resolve_hardware, search_config
from laud_jax.models import network_spec
from laud_jax.models.specs import BlockSpec, NetworkSpec
from laud_jax.sparse.routing import count_totals

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "quickstart.py"
ALL_CASES = ("spatial", "search", "demo_b1", "demo_b16", "spatial_local", "demo_b1_local", "demo_b16_local")
# Slots a block timed alone does not run: the benchmark's block program gets its gates and
# index lists from the traced stepwise run (``SparseEngine.block_program``).
ALONE_DROPPED = OVERHEAD_SLOTS
# Slots the planned whole-network program does not run: no host round trip per block, and
# forced masks replace the maskers' decisions (their work is dead code). Index lists stay.
NETWORK_DROPPED = ("host_sync", "masker_pool", "masker_conv", "gate_fc")
TIE = 0.05  # a choice table calls measured sparse / dense within this of 1 a tie (single-block timing noise)
READING_OPEN, READING_CLOSE = "<!-- reading -->", "<!-- /reading -->"


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark run: its ``run_benchmark`` settings and the model-config keys the
    benchmark has no flag for (``extra_model``, merged into the model it builds)."""

    name: str
    title: str
    settings: dict[str, Any]
    extra_model: dict[str, Any] | None = None
    base: str | None = None  # choice runs: the always-sparse case they are compared with


# ----------------------------------------------------------------------------- settings


def demo_model(profile_name: str, config_path: Path = DEMO_CONFIG) -> tuple[dict[str, Any], int, int]:
    """(model config, image side, channels) of the quickstart experiment file, its 'auto'
    fields resolved by the latency search on ``profile_name`` as the trainer resolves them."""
    config = load_config_file(str(config_path))
    info = data.dataset_info(config.data)
    fields = auto_fields(config.model)
    if fields:
        result = search_config(config, info.image_shape, info.num_classes, resolve_hardware(profile_name))
        config = with_model_update(config, model_update(result, fields))
    model = model_dict(config, info.num_classes)
    height, width, channels = info.image_shape
    assert height == width, "the benchmark takes square images"
    return model, int(height), int(channels)


def describe_modes(mode: Any, granularity: Sequence[int]) -> str:
    """``spatial S=2, layer, ...`` per stage; one word when every stage has the same."""
    modes = (mode,) * len(granularity) if isinstance(mode, str) else tuple(mode)
    parts = [m + (f" S={s}" if m in ("spatial", "spatial+channel") else "") for m, s in zip(modes, granularity)]
    return parts[0] if len(set(parts)) == 1 else ", ".join(parts)


def searched(arch: str, image: int, batch: int, rate: float, profile_name: str, engine: str) -> dict[str, Any]:
    """What the granularity search picks (modes restricted to those random masks can force)."""
    result = search(
        arch,
        get_profile(profile_name),
        ENGINES[engine],
        target_rate=rate,
        batch=batch,
        image_shape=(image, image, 3),
        modes=SEARCH_MODES,
        hardware_name=profile_name,
        engine_name=engine,
    )
    return result.to_dict()


def build_cases(
    names: Sequence[str],
    *,
    quick: bool,
    repeats: int,
    repeats_b16: int,
    profile: str,
    search_record: dict[str, Any] | None,
    seed: int = 0,
) -> list[Case]:
    """The runs to make, in order (a choice run right after the run it is compared with)."""
    common = {"masked": False, "stepwise": False, "progress": False, "seed": seed, "rate": 0.5}
    if quick:
        big = {"arch": "resnet_tiny", "image_size": 32, "granularity": (2, 2, 1, 1), "num_classes": 7}
        timing = {"repeats": 3, "block_repeats": 2, "warmup": 1}
        timing16 = timing
        demo_batch = 4
    else:
        big = {"arch": "resnet50", "image_size": 224, "granularity": (4, 4, 2, 1), "num_classes": 1000}
        timing = {"repeats": repeats, "block_repeats": repeats, "warmup": 3}
        timing16 = {"repeats": repeats_b16, "block_repeats": repeats_b16, "warmup": 2}
        demo_batch = 16
    model, image, channels = demo_model(profile)
    demo = {
        "arch": model["arch"],
        "mode": model["mode"],
        "granularity": tuple(model["granularity"]),
        "mask_groups": model.get("mask_groups", 1),
        "channel_granularity": model.get("channel_granularity", 2),
        "num_classes": 10,
        "image_size": image,
        "channels": channels,
    }
    big_arch = f"{big['arch']} {big['image_size']}x{big['image_size']}"
    g = "-".join(map(str, big["granularity"]))
    dg = describe_modes(demo["mode"], demo["granularity"])
    cases: dict[str, Case] = {
        "spatial": Case(
            "spatial",
            f"{big_arch}, batch 1, spatial {g}, rate 0.5",
            {**common, **big, **timing, "mode": "spatial", "batch": 1},
        ),
        "demo_b1": Case(
            "demo_b1",
            f"demo model ({demo['arch']} {image}x{image}x{channels}), batch 1, {dg}, rate 0.5",
            {**common, **demo, **timing, "batch": 1},
            model,
        ),
        "demo_b16": Case(
            "demo_b16",
            f"demo model ({demo['arch']} {image}x{image}x{channels}), batch {demo_batch}, {dg}, rate 0.5",
            {**common, **demo, **timing16, "batch": demo_batch},
            model,
        ),
    }
    if search_record is not None:
        stages = search_record["stages"]
        modes = tuple(s["mode"] for s in stages)
        sizes = tuple(int(s["granularity"]) for s in stages)
        picked = ", ".join(f"{m}" + (f" S={s}" if m == "spatial" else "") for m, s in zip(modes, sizes))
        if "channel" in modes:
            picked += f"; channel groups of {search_record['channel_granularity']}"
        cases["search"] = Case(
            "search",
            f"{big_arch}, batch 1, searched on `{profile}` ({picked}), rate 0.5",
            {
                **common,
                **big,
                **timing,
                "mode": modes,
                "granularity": sizes,
                "channel_granularity": int(search_record["channel_granularity"]),
                "batch": 1,
            },
        )
    for base in ("spatial", "demo_b1", "demo_b16"):
        c = cases[base]
        cases[f"{base}_local"] = Case(
            f"{base}_local",
            f"{c.title}, `latency_profile={profile!r}`",
            {**c.settings, "latency_profile": profile},
            c.extra_model,
            base,
        )
    unknown = [n for n in names if n not in cases and n != "search"]
    if unknown:
        raise ValueError(f"unknown cases {unknown}; choose from {', '.join(ALL_CASES)}")
    return [cases[n] for n in names if n in cases]


def measure(case: Case) -> dict[str, Any]:
    """The benchmark record of one case (dense vs dynamic, per block and network)."""
    return benchmark.run_benchmark(**case.settings, model_overrides=case.extra_model or {})


# ----------------------------------------------------------------------------- prediction


def executed_setting(block: BlockSpec, counts: dict[str, int] | None, batch: int, dtype: str):
    """The predictor's setting for a block at the densities the engine executed (static
    blocks: the static setting)."""
    if block.mode == "static" or counts is None:
        return block_setting("static", batch=batch, dtype=dtype)
    return setting_at_counts(block, counts, batch, dtype)


def predicted_capacities(block: BlockSpec, counts: dict[str, int] | None, batch: int, steps: int) -> dict[str, int]:
    """Capacities the predictor pads these rates to (its own ``ladder_capacity`` on the rate
    times the total, as ``launches._block_execution`` does)."""
    if block.mode == "static" or counts is None:
        return {}
    totals = count_totals(block, batch)
    keys = [k for k in ("cells", "pixels", "groups") if k in totals]
    if block.layer and batch > 1:
        keys.append("samples")
    out = {}
    for key in keys:
        total = jnp.float32(totals[key])
        value = float(ladder_capacity(jnp.float32(counts[key] / totals[key]) * total, total, steps))
        out[key] = int(max(1.0, value) if key in ("groups", "samples") else value)
    return out


@jax.jit
def _slot_times(profile, engine, shapes, settings):
    """Per block and launch slot: predicted seconds of the executed setting and of its static twin."""
    one = jax.vmap(lambda shape, setting: block_launch_times(profile, engine, shape, setting))
    return one(shapes, settings), one(shapes, jax.vmap(static_twin)(settings))


def predict_record(record: dict[str, Any], profile_name: str, engine_name: str) -> dict[str, Any]:
    """Predicted per-block and network times and ratios for what a benchmark record executed.

    Per block (each timed alone with its gates and index lists given): the executed slots
    less ``ALONE_DROPPED``, plus one call overhead, against the static block plus one call
    overhead; a block the engine ran dense (the chooser's choice) is predicted as the static
    block. Network: stem, head and one call, plus every block less ``NETWORK_DROPPED``.
    """
    profile, engine = get_profile(profile_name), ENGINES[engine_name]
    batch = int(record["batch"])
    dtype = record["model"]["dtype"]
    spec: NetworkSpec = network_spec(record["model"], record["image_shape"])
    rows = record["blocks"]
    if [r["name"] for r in rows] != [b.name for b in spec.blocks]:
        raise ValueError("the record's blocks do not match the network spec")
    settings = [executed_setting(b, r["counts"], batch, dtype) for b, r in zip(spec.blocks, rows)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *settings)
    p_arrays, e_arrays = profile.as_arrays(), engine.as_arrays()
    dyn, stat = (
        np.asarray(x, np.float64) for x in _slot_times(p_arrays, e_arrays, BlockShape.from_specs(spec.blocks), stacked)
    )
    slot = {name: i for i, name in enumerate(LAUNCH_NAMES)}
    alone = dyn.sum(1) - dyn[:, [slot[n] for n in ALONE_DROPPED]].sum(1)
    in_network = dyn.sum(1) - dyn[:, [slot[n] for n in NETWORK_DROPPED]].sum(1)
    static = stat.sum(1)
    call = float(profile.call_overhead)
    half = float(dtype in ("bfloat16", "float16"))
    fixed = float(fixed_time(p_arrays, e_arrays, spec, float(batch), half))
    runs = record.get("runs") or [r["plan"] for r in rows]
    steps = int(engine.capacity_steps)
    blocks = []
    net_dynamic = fixed + call
    for i, (block, row) in enumerate(zip(spec.blocks, rows)):
        dense_run = row["plan"] == "dense" and block.mode != "static"
        dyn_alone = static[i] if dense_run else alone[i]
        # dense-then-masked in the network: the static block, and the index lists the driver builds anyway
        net_dynamic += static[i] + dyn[i, slot["index_lists"]] if runs[i] == "dense" else in_network[i]
        planned = row["capacities"]
        capacities = predicted_capacities(block, row["counts"], batch, steps)
        match = all(capacities[k] == planned[k] for k in capacities) if row["plan"] == "sparse" else None
        blocks.append(
            {
                "name": block.name,
                "static_ms": 1e3 * (static[i] + call),
                "dynamic_ms": 1e3 * (dyn_alone + call),
                "latency_ratio": (dyn_alone + call) / (static[i] + call),
                "capacities": capacities,
                "capacities_match": match,
                "slots_ms": {n: 1e3 * dyn[i, j] for n, j in slot.items() if dyn[i, j] > 0},
            }
        )
    net_static = fixed + call + static.sum()
    return {
        "profile": profile_name,
        "engine": engine_name,
        "call_overhead_ms": 1e3 * call,
        "fixed_ms": 1e3 * fixed,
        "static_ms": 1e3 * net_static,
        "dynamic_ms": 1e3 * net_dynamic,
        "latency_ratio": net_dynamic / net_static,
        "blocks": blocks,
    }


def error_summary(errors: Sequence[float]) -> dict[str, Any]:
    """Median absolute relative error and the fraction within +-20%."""
    e = np.abs(np.asarray(errors, np.float64))
    if e.size == 0:
        return {"count": 0, "median_abs": None, "within_20": None, "max_abs": None}
    return {
        "count": int(e.size),
        "median_abs": float(np.median(e)),
        "within_20": float(np.mean(e <= 0.2)),
        "max_abs": float(e.max()),
    }


def compare(case: Case, record: dict[str, Any], prediction: dict[str, Any]) -> dict[str, Any]:
    """One row per block: measured (benchmark) and predicted ratios and their relative error."""
    rows = []
    for measured, predicted in zip(record["blocks"], prediction["blocks"]):
        ratio_m, ratio_p = measured["latency_ratio"], predicted["latency_ratio"]
        rows.append(
            {
                "name": measured["name"],
                "mode": measured["mode"],
                "plan": measured["plan"],
                "counts": measured["counts"],
                "capacities": measured["capacities"],
                "mac_ratio": measured["mac_ratio"],
                "measured_dense_ms": measured["dense_ms"],
                "measured_dynamic_ms": measured["dynamic_ms"],
                "measured_ratio": ratio_m,
                "predicted_static_ms": predicted["static_ms"],
                "predicted_dynamic_ms": predicted["dynamic_ms"],
                "predicted_ratio": ratio_p,
                "error": ratio_p / ratio_m - 1.0,
                "capacities_match": predicted["capacities_match"],
                "chooser": measured.get("predicted"),
                "measured_sparse_ms": (measured["sparse"] or {}).get("median_ms") if measured.get("sparse") else None,
            }
        )
    scored = [r["error"] for r in rows if r["plan"] != "skip"]
    network_error = prediction["latency_ratio"] / record["latency_ratio"] - 1.0
    return {
        "name": case.name,
        "title": case.title,
        "base": case.base,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in case.settings.items()},
        "network": {
            "measured_dense_ms": record["dense_ms"],
            "measured_dynamic_ms": record["dynamic_ms"],
            "measured_ratio": record["latency_ratio"],
            "measured_paired_ratio": record["paired_latency_ratio"],
            "mac_ratio": record["mac_ratio"],
            "predicted_static_ms": prediction["static_ms"],
            "predicted_dynamic_ms": prediction["dynamic_ms"],
            "predicted_ratio": prediction["latency_ratio"],
            "error": network_error,
        },
        "summary": {**error_summary(scored), "skipped_blocks": sum(r["plan"] == "skip" for r in rows)},
        "runs": record.get("gated_runs"),
        "rows": rows,
        "load": {"before": record["machine"]["load_before"], "after": record["machine"]["load_after"]},
        "prediction": prediction,
        "record": record,
    }


# ----------------------------------------------------------------------------- report


def _fmt_capacity(row: dict[str, Any]) -> str:
    counts, caps = row["counts"], row["capacities"]
    if counts is None:
        return "static"

    def one(key: str, label: str) -> str:
        return f"{label} {counts[key]}" + (f"->{caps[key]}" if caps.get(key) else "")

    parts = []
    if "spatial" in row["mode"]:
        parts.append(one("cells", "cells") + ", " + one("pixels", "px"))
    if "channel" in row["mode"] or row["mode"] == "lc":
        parts.append(one("groups", "groups"))
    if row["mode"] in ("layer", "lc"):
        parts.append(one("samples", "samples"))
    return "; ".join(parts) or "-"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.0f}%"


def case_table(result: dict[str, Any]) -> list[str]:
    """Markdown lines of one case: per block and the network."""
    lines = [
        "| block | plan | executed (count->capacity) | MACs | dense ms meas. | dense ms pred. | "
        "ratio meas. | ratio pred. | error |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['plan']} | {_fmt_capacity(r)} | {r['mac_ratio']:.3f} | "
            f"{r['measured_dense_ms']:.2f} | {r['predicted_static_ms']:.2f} | {r['measured_ratio']:.3f} | "
            f"{r['predicted_ratio']:.3f} | {_pct(r['error'])} |"
        )
    n = result["network"]
    lines.append(
        f"| **network** | | | {n['mac_ratio']:.3f} | {n['measured_dense_ms']:.2f} | {n['predicted_static_ms']:.2f} | "
        f"**{n['measured_ratio']:.3f}** | **{n['predicted_ratio']:.3f}** | **{_pct(n['error'])}** |"
    )
    return lines


def choice_table(result: dict[str, Any], base: dict[str, Any] | None) -> list[str]:
    """Markdown lines of a choice run: which blocks went dense, predicted and measured."""
    lines = [
        "| block | choice | chooser: pred. sparse / dense ms | meas. sparse ms | meas. dense ms | "
        "meas. sparse / dense | choice right? |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        if r["counts"] is None:
            continue
        chooser = r["chooser"]
        guess = f"{chooser['sparse_ms']:.3f} / {chooser['dense_ms']:.3f}" if chooser else "-"
        sparse_ms = r["measured_sparse_ms"] if r["plan"] == "dense" else r["measured_dynamic_ms"]
        if sparse_ms is None or r["plan"] == "skip":
            lines.append(f"| {r['name']} | {r['plan']} | {guess} | - | {r['measured_dense_ms']:.2f} | - | - |")
            continue
        ratio = sparse_ms / r["measured_dense_ms"]
        right = "yes" if (ratio >= 1.0) == (r["plan"] == "dense") else "no"
        if abs(ratio - 1.0) < TIE:
            right = f"tie (within {100 * TIE:.0f}%)"
        lines.append(
            f"| {r['name']} | {r['plan']} | {guess} | {sparse_ms:.2f} | {r['measured_dense_ms']:.2f} | "
            f"{ratio:.3f} | {right} |"
        )
    n = result["network"]
    lines.append("")
    lines.append(
        f"Network with the choice: measured **{n['measured_ratio']:.3f}** (paired {n['measured_paired_ratio']:.3f}), "
        f"predicted {n['predicted_ratio']:.3f}; gated blocks: "
        + ", ".join(f"{v} {k}" for k, v in (result["runs"] or {}).items())
        + "."
    )
    if base is not None:
        b = base["network"]
        lines.append(
            f"Without the choice (always sparse, the run above): measured **{b['measured_ratio']:.3f}** "
            f"(paired {b['measured_paired_ratio']:.3f}), predicted {b['predicted_ratio']:.3f}."
        )
    return lines


def render_markdown(report: dict[str, Any], reading: str) -> str:
    """The whole document (the reading section is passed through)."""
    m = report["machine"]
    results = {r["name"]: r for r in report["cases"]}
    sparse = [r for r in report["cases"] if r["base"] is None]
    lines = [
        "# Closing the loop: predicted vs measured latency ratio on this CPU",
        "",
        "Measured: `laud_jax.benchmark.run_benchmark` (dense and dynamic run alternately in one process after "
        "warm-up; medians; each block also timed alone, dense vs dynamic on the same input; `planned` "
        "execution, random weights, random forced masks). Predicted: the latency predictor "
        f"(`laud_jax.latency`) with the `{report['profile']}` profile and the `{report['engine']}` engine model "
        "on the same block shapes, at the densities the benchmark executed: each block's routing counts "
        "(cells, conv1 pixels, channel groups, samples) over their totals become its rates, which the "
        "predictor pads with the engine's capacity ladder (the padded capacities equal the recorded ones: "
        f"{report['capacity_check']}).",
        "",
        "- Per block, measured: the benchmark's per-block row (the block timed alone, its gates and index "
        "lists given). Predicted: the block's launch slots less the host round trip, maskers, gates and index "
        "lists, plus one call overhead, against the static block plus one call overhead. A block the engine "
        "ran dense-then-masked is predicted as the static block (the mask multiply is not modelled).",
        "- Network, measured: ratio of the medians of the whole planned program. Predicted: stem, head and one "
        "call, plus every block's slots less the host round trip and the maskers (forced masks replace their "
        "decisions; the planned program makes no per-block host round trip); index lists included.",
        "- Error: predicted ratio / measured ratio - 1. Summaries leave out blocks planned `skip` (nothing "
        "runs; their ratio is a dispatch against a block).",
        "- The demo model: `configs/quickstart.py` with its `'auto'` mode and granularity resolved by the "
        "latency search on the same profile (what `make demo` trains on this machine), 10 classes, 64x64x1, "
        "**random weights and random masks** at rate 0.5 (a trained model's masks are its own; random ones "
        "show the predictor at a known density). `run_benchmark` has no flags for the config's widths, "
        "depths, stem and masker input: the script passes them to the model it builds.",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpus']} CPUs, {m['platform']}, {m['device']}; 1-minute load average "
        f"{m['load_start'][0]:.2f} at the start, {m['load_end'][0]:.2f} at the end (per run in the JSON: "
        f"{min(r['load']['before'][0] for r in report['cases']):.2f}-"
        f"{max(r['load']['after'][0] for r in report['cases']):.2f}); {report['started']} UTC, "
        f"{report['seconds'] / 60:.1f} min in all. Profile: `{report['profile_path']}` "
        f"({report['profile_fit']}).",
        "",
        "## Summary",
        "",
        "| setting | MAC ratio | network ratio meas. | pred. | error | blocks: median abs. error | within 20% |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["cases"]:
        n, s = r["network"], r["summary"]
        within = "-" if s["within_20"] is None else f"{100 * s['within_20']:.0f}% of {s['count']}"
        median = "-" if s["median_abs"] is None else f"{100 * s['median_abs']:.1f}%"
        lines.append(
            f"| {r['title']} | {n['mac_ratio']:.3f} | {n['measured_ratio']:.3f} | {n['predicted_ratio']:.3f} | "
            f"{_pct(n['error'])} | {median} | {within} |"
        )
    overall = report["overall"]
    lines += [
        "",
        f"All always-sparse runs together ({overall['count']} block rows): median abs. error "
        f"{100 * overall['median_abs']:.1f}%, {100 * overall['within_20']:.0f}% within +-20%, max "
        f"{100 * overall['max_abs']:.0f}%."
        if overall["count"]
        else "",
    ]
    if "search" in report:
        s = report["search"]
        lines += [
            "",
            f"The search (`laud_jax.latency.search`, `{s['hardware']}` profile, `{s['engine']}` engine model, "
            f"MAC rate {s['target_rate']}, batch {s['batch']}, modes spatial / channel / layer per stage) picked "
            f"`{s['flags']}` and predicted a network ratio of {s['latency_ratio']:.3f} "
            f"(its own model, interpolated at the MAC target).",
        ]
    lines += ["", "## Reading", "", READING_OPEN, reading.strip("\n"), READING_CLOSE, ""]
    for r in sparse:
        lines += ["", f"## {r['title']}", ""] + case_table(r)
        choice = results.get(f"{r['name']}_local")
        if choice is not None:
            lines += ["", f"### With `latency_profile` ({report['profile']})", ""]
            lines += choice_table(choice, r)
            lines += ["", "Predicted vs measured in that run:", ""] + case_table(choice)
    lines += ["", "Every benchmark record, prediction and per-slot predicted time: the JSON beside this file."]
    if report.get("plot"):
        lines += ["", f"![predicted vs measured block ratios]({report['plot']})"]
    return "\n".join(lines) + "\n"


def existing_reading(path: Path) -> str:
    """The hand-written reading of an existing document (empty placeholder otherwise)."""
    if path.exists():
        match = re.search(re.escape(READING_OPEN) + r"\n?(.*?)\n?" + re.escape(READING_CLOSE), path.read_text(), re.S)
        if match:
            return match.group(1)
    return "(not written yet)"


def plot(report: dict[str, Any], path: Path) -> None:
    """Scatter of predicted against measured block ratios, one colour per always-sparse run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for r in report["cases"]:
        if r["base"] is not None:
            continue
        rows = [x for x in r["rows"] if x["plan"] != "skip"]
        dots = ax.scatter(
            [x["measured_ratio"] for x in rows], [x["predicted_ratio"] for x in rows], s=18, label=r["name"]
        )
        n = r["network"]
        ax.scatter(
            [n["measured_ratio"]],
            [n["predicted_ratio"]],
            marker="*",
            s=160,
            color=dots.get_facecolor()[0],
            edgecolor="k",
        )
    lo, hi = ax.get_xlim()[0], ax.get_xlim()[1]
    lo, hi = min(lo, ax.get_ylim()[0]), max(hi, ax.get_ylim()[1])
    grid = np.linspace(lo, hi, 2)
    ax.plot(grid, grid, "k-", lw=0.8)
    ax.fill_between(grid, 0.8 * grid, 1.2 * grid, color="0.85", zorder=0, label="+-20%")
    ax.set_xlabel("measured latency ratio (dynamic / static)")
    ax.set_ylabel("predicted latency ratio")
    ax.set_title("blocks (dots) and networks (stars)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out: Path, *, with_plot: bool = True) -> None:
    """JSON, markdown (keeping the reading) and, optionally, the scatter plot."""
    md = out.with_suffix(".md")
    if with_plot and report["cases"]:
        plot(report, out.with_suffix(".png"))
        report["plot"] = out.with_suffix(".png").name
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    md.write_text(render_markdown(report, existing_reading(md)))


def finalize(report: dict[str, Any]) -> None:
    """Overall error summary and the capacity check over the runs so far."""
    errors = [r["error"] for c in report["cases"] if c["base"] is None for r in c["rows"] if r["plan"] != "skip"]
    report["overall"] = error_summary(errors)
    checked = [r["capacities_match"] for c in report["cases"] for r in c["rows"] if r["capacities_match"] is not None]
    report["capacity_check"] = f"{sum(checked)} of {len(checked)} sparse blocks"


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "docs" / "latency_loop"), help="output path without suffix")
    parser.add_argument("--cases", default=",".join(ALL_CASES), help=f"comma-separated, of {', '.join(ALL_CASES)}")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per network and per block, batch 1")
    parser.add_argument("--repeats-b16", type=int, default=8, help="the same for the demo at batch 16")
    parser.add_argument("--profile", default="local", help="hardware profile (preset, 'local' or a .json)")
    parser.add_argument("--engine", default="xla", choices=sorted(ENGINES), help="engine model of the predictor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="resnet_tiny 32x32 instead of ResNet-50, 3 repeats")
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    parser.add_argument("--from-json", help="re-render the markdown (and plot) from this JSON; no measuring")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        write_outputs(report, out, with_plot=args.plot)
        return report
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    start, started = time.perf_counter(), datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    profile_path = local_profile_path() if args.profile == "local" else args.profile
    fit = ""
    if profile_path.endswith(".json") and os.path.exists(profile_path):
        meta = profile_from_json(profile_path)[1].get("meta", {})
        held = meta.get("held_out") or {}
        if "median_abs_rel_error" in held:
            fit = (
                f"calibration: held-out median abs. error {100 * held['median_abs_rel_error']:.1f}%, "
                f"{100 * held['within_20pct']:.0f}% within 20%, {held['count']} blocks"
            )
    report: dict[str, Any] = {
        "command": " ".join(
            ["PYTHONPATH=. python experiments/latency_loop.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "started": started,
        "profile": args.profile,
        "profile_path": os.path.relpath(profile_path, REPO) if os.path.isabs(profile_path) else profile_path,
        "profile_fit": fit or "fitted by `python -m laud_jax.latency calibrate`",
        "engine": args.engine,
        "quick": args.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "device": str(jax.devices()[0]),
            "load_start": list(os.getloadavg()),
        },
        "cases": [],
    }
    search_record = None
    if "search" in names:
        arch, image = ("resnet_tiny", 32) if args.quick else ("resnet50", 224)
        search_record = searched(arch, image, 1, 0.5, args.profile, args.engine)
        report["search"] = search_record
    cases = build_cases(
        names,
        quick=args.quick,
        repeats=args.repeats,
        repeats_b16=args.repeats_b16,
        profile=args.profile,
        search_record=search_record,
        seed=args.seed,
    )
    done: dict[str, dict[str, Any]] = {}
    for case in tqdm(cases, desc="runs", unit="run", file=sys.stderr):
        record = measure(case)
        prediction = predict_record(record, args.profile, args.engine)
        done[case.name] = compare(case, record, prediction)
        report["cases"].append(done[case.name])
        report["machine"]["load_end"] = list(os.getloadavg())
        report["seconds"] = time.perf_counter() - start
        finalize(report)
        write_outputs(report, out, with_plot=False)  # partial results survive an interruption
    write_outputs(report, out, with_plot=args.plot)
    return report


if __name__ == "__main__":
    main()

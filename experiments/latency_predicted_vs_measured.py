"""Predicted vs measured per-block latency of the sparse engine on this machine.

Runs `python -m laud_jax.latency calibrate` (or reads the report it wrote) and writes the
held-out errors as a markdown table and a scatter plot.

    PYTHONPATH=. python experiments/latency_predicted_vs_measured.py \
        [--report runs/latency/calibration_report.json] [--configs 120] [--out docs]

Writes docs/latency_calibration.md and docs/latency_calibration.png.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from laud_jax.latency.calibrate import DEFAULT_REPEATS, FIT_FIELDS, error_summary

UNITS = {
    "flops_fp32": (1e-9, "GFLOP/s"),
    "dram_bw": (1e-9, "GB/s"),
    "l2_bw": (1e-9, "GB/s"),
    "launch_overhead": (1e6, "us"),
    "loop_overhead": (1e6, "us"),
    "call_overhead": (1e6, "us"),
}


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def write_markdown(path: str, report: dict) -> None:
    configs = report["configurations"]
    held = [c for c in configs if c["held_out"]]
    loads = [c["load_average"] for c in configs]
    median_ratio = float(np.median([c["median_s"] / c["seconds"] for c in configs]))
    lines = [
        "# Latency predictor: predicted vs measured (local CPU)",
        "",
        f"The sparse engine (`laud_jax.sparse`, backend xla) timed per block on {report['machine']['cpus']} "
        f"CPU cores ({report['machine']['platform']}), {len(configs)} random configurations (block shapes of "
        "resnet_small at 64x64 and ResNet-50 / ResNet-18 / RegNetY-400MF at 112x112; every mode; S; "
        "activation rates 0.1-1; batch 1-8). Each time is the minimum of the repeats after warm-up: the "
        f"machine is shared, with a 1-minute load average of {min(loads):.1f}-{max(loads):.1f} during the "
        f"timings on 2 cores, and the median of the repeats was {median_ratio:.2f}x their minimum (median "
        "over configurations); other processes only add time. The local profile was fitted on "
        f"{report['train']['count']} configurations and is evaluated on {report['held_out']['count']} "
        "held-out ones.",
        "",
        "| split | configurations | median abs. rel. error | within +-20% | mean abs. rel. error | max |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("train", "held_out"):
        s = report[name]
        lines.append(
            f"| {name.replace('_', '-')} | {s['count']} | {_pct(s['median_abs_rel_error'])} | "
            f"{_pct(s['within_20pct'])} | {_pct(s['mean_abs_rel_error'])} | {_pct(s['max_abs_rel_error'])} |"
        )
    lines += [
        "",
        "Held-out errors by mode:",
        "",
        "| mode | configurations | median abs. rel. error | within +-20% |",
        "|---|---|---|---|",
    ]
    by_mode = defaultdict(list)
    for c in held:
        by_mode[c["mode"]].append(c["rel_error"])
    for mode, errors in sorted(by_mode.items()):
        s = error_summary(np.asarray(errors))
        lines.append(f"| {mode} | {s['count']} | {_pct(s['median_abs_rel_error'])} | {_pct(s['within_20pct'])} |")
    profile = report["profile"]
    lines += ["", "Fitted parameters:", "", "| parameter | value |", "|---|---|"]
    for field in FIT_FIELDS:
        scale, unit = UNITS.get(field, (1.0, ""))
        lines.append(f"| {field} | {profile[field] * scale:.4g} {unit} |")
    worst = sorted(held, key=lambda c: -abs(c["rel_error"]))[:10]
    lines += [
        "",
        "Largest held-out errors:",
        "",
        "| arch | block | mode | S | rho | batch | measured ms | predicted ms | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in worst:
        lines.append(
            f"| {c['arch']} | {c['block']} | {c['mode']} | {c['granularity']} | {c['rho']:.2f} | {c['batch']} | "
            f"{1e3 * c['seconds']:.3f} | {1e3 * c['predicted_s']:.3f} | {100 * c['rel_error']:+.0f}% |"
        )
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(path: str, report: dict) -> None:
    configs = report["configurations"]
    fig, ax = plt.subplots(figsize=(5, 5))
    for held, color, label in ((False, "tab:blue", "fit"), (True, "tab:red", "held out")):
        points = [c for c in configs if c["held_out"] == held]
        ax.scatter(
            [1e3 * c["seconds"] for c in points],
            [1e3 * c["predicted_s"] for c in points],
            s=12,
            color=color,
            label=label,
            alpha=0.8,
        )
    low = min(1e3 * min(c["seconds"], c["predicted_s"]) for c in configs) * 0.8
    high = max(1e3 * max(c["seconds"], c["predicted_s"]) for c in configs) * 1.25
    line = np.geomspace(low, high, 50)
    ax.plot(line, line, color="black", lw=0.8)
    ax.fill_between(line, line * 0.8, line * 1.2, color="gray", alpha=0.2, label="+-20%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured block time (ms)")
    ax.set_ylabel("predicted block time (ms)")
    ax.set_title("Sparse engine blocks on the local CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--report",
        default=os.path.join("runs", "latency", "calibration_report.json"),
        help="calibration report JSON (run calibration when it does not exist)",
    )
    parser.add_argument("--configs", type=int, default=120, help="configurations to time when calibrating")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed repeats per configuration")
    parser.add_argument("--out", default="docs", help="output directory (default docs)")
    args = parser.parse_args()
    if not os.path.exists(args.report):
        from laud_jax.latency.calibrate import calibrate_local, write_report

        directory = os.path.dirname(args.report)
        report = calibrate_local(
            out=os.path.join(directory, "local_profile.json"),
            measurements=os.path.join(directory, "timings.json"),
            configs=args.configs,
            repeats=args.repeats,
            holdout=0.3,
            seed=0,
        )
        write_report(args.report, report)
    with open(args.report) as f:
        report = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    write_markdown(os.path.join(args.out, "latency_calibration.md"), report)
    plot(os.path.join(args.out, "latency_calibration.png"), report)
    held = report["held_out"]
    print(
        f"held-out median |error| {_pct(held['median_abs_rel_error'])}, {_pct(held['within_20pct'])} within +-20%; "
        f"wrote {args.out}/latency_calibration.md and .png"
    )


if __name__ == "__main__":
    main()

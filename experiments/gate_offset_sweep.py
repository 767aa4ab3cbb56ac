"""Runtime budget control: sweep the gate-threshold offset, plot accuracy vs measured latency.

    python experiments/gate_offset_sweep.py --checkpoint runs/quickstart \\
        --offsets=-1,-0.5,0,0.5,1,2,3 --out docs/gate_offset_sweep

For each offset (execute iff logit_execute - logit_skip >= offset) the model is evaluated
(top-1, MAC ratio) and the static and dynamic networks are timed side by side with the
sparse engine (medians after warm-up). Writes OUT.json, OUT.png and prints a Markdown table.
No retraining: one trained model covers a range of latency budgets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from laud_jax import evaluate
from laud_jax.models import build_model


def sweep(
    checkpoint: str,
    offsets: list[float],
    *,
    exp_config=None,
    max_examples: int = 0,
    backend: str = "auto",
    latency_batch: int = 1,
    repeats: int = 30,
) -> dict:
    """Evaluation and measured latency at every offset (one compiled eval step for all)."""
    from laud_jax import data

    model_cfg, variables, recorded = evaluate.load_checkpoint(checkpoint)
    data_cfg = evaluate.data_config(exp_config, recorded)
    batch_size = (
        exp_config.eval_batch_size if exp_config is not None else int((recorded or {}).get("eval_batch_size", 256))
    )
    step = evaluate.make_eval_step(build_model(model_cfg))
    timing_images = next(iter(data.eval_batches(data_cfg, latency_batch)))["image"]
    rows = []
    for offset in offsets:
        result = evaluate.accuracy_and_density(
            model_cfg,
            variables,
            data.eval_batches(data_cfg, batch_size),
            gate_offset=offset,
            max_examples=max_examples,
            progress=False,
            eval_step=step,
        )
        latency = evaluate.measure_latency(
            model_cfg, variables, timing_images, backend=backend, gate_offset=offset, repeats=repeats
        )
        rows.append(
            {
                "gate_offset": offset,
                "top1": result["top1"],
                "mac_ratio": result["mac_ratio"],
                "density": result["density"],
                "stage_density": [s["density"] for s in result["stages"]],
                "static_ms": latency["dense_ms"],
                "dynamic_ms": latency["sparse_ms"],
                "speedup": latency["speedup"],
                "examples": result["examples"],
            }
        )
        print(
            f"offset {offset:+.2f}: top-1 {100 * result['top1']:.2f} %, MAC ratio {result['mac_ratio']:.3f}, "
            f"dynamic {latency['sparse_ms']:.3f} ms vs static {latency['dense_ms']:.3f} ms",
            flush=True,
        )
    return {
        "checkpoint": checkpoint,
        "model": model_cfg,
        "backend": latency["backend"],
        "device": latency["device"],
        "latency_batch": latency_batch,
        "repeats": repeats,
        "rows": rows,
    }


def plot(report: dict, path: str) -> None:
    """Left: top-1 vs measured dynamic latency (static network dashed). Right: top-1 vs the
    dynamic/static latency ratio (timed interleaved, so robust to machine load) and MAC ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    top1 = [100 * r["top1"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.8), dpi=120)
    left.plot([r["dynamic_ms"] for r in rows], top1, "o-", label="dynamic (sparse engine)")
    for r, acc in zip(rows, top1):
        left.annotate(
            f"{r['gate_offset']:+g}", (r["dynamic_ms"], acc), textcoords="offset points", xytext=(4, 4), fontsize=7
        )
    static = float(np.median([r["static_ms"] for r in rows]))
    left.axvline(static, color="gray", linestyle="--", label=f"static network ({static:.2f} ms)")
    left.set_xlabel(f"measured latency, batch {report['latency_batch']} ({report['backend']}, {report['device']}) [ms]")
    left.set_ylabel("top-1 accuracy [%]")
    left.legend(fontsize=7)
    right.plot([r["dynamic_ms"] / r["static_ms"] for r in rows], top1, "o-", label="measured latency ratio")
    right.plot([r["mac_ratio"] for r in rows], top1, "s--", label="MAC ratio")
    right.axvline(1.0, color="gray", linestyle=":")
    right.set_xlabel("dynamic / static")
    right.legend(fontsize=7)
    fig.suptitle("gate-threshold offset (labels): accuracy vs cost, no retraining", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(report: dict) -> str:
    lines = [
        "| gate offset | top-1 | MAC ratio | dynamic ms | static ms | speed-up |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['gate_offset']:+g} | {100 * r['top1']:.2f} % | {r['mac_ratio']:.3f} | "
            f"{r['dynamic_ms']:.3f} | {r['static_ms']:.3f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="training work dir or converted dir (its config names the data)")
    parser.add_argument("--exp", help="config file for the data, if the checkpoint records none")
    parser.add_argument("--offsets", default="-1,-0.5,0,0.5,1,2,3", help="comma-separated gate offsets")
    parser.add_argument("--max-examples", type=int, default=0, help="examples per evaluation (0 = all)")
    parser.add_argument("--backend", default="auto", choices=evaluate.BACKEND_CHOICES)
    parser.add_argument("--latency-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="docs/gate_offset_sweep", help="output prefix: writes OUT.json and OUT.png")
    parser.add_argument("--replot", action="store_true", help="redraw OUT.png from an existing OUT.json")
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.out + ".json") as f:
            report = json.load(f)
        plot(report, args.out + ".png")
        print(markdown(report))
        return 0
    if not args.checkpoint:
        parser.error("--checkpoint is required")
    try:
        offsets = [float(v) for v in args.offsets.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--offsets must be comma-separated numbers, got {args.offsets!r}")
    exp_config = None
    if args.exp:
        from laud_jax.config_utils import load_config_file

        exp_config = load_config_file(args.exp)
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    report = sweep(
        args.checkpoint,
        offsets,
        exp_config=exp_config,
        max_examples=args.max_examples,
        backend=args.backend,
        latency_batch=args.latency_batch,
        repeats=args.repeats,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    plot(report, args.out + ".png")
    print(markdown(report))
    print(f"wrote {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

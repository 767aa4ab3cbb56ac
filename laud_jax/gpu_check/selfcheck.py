"""Check and time the kernels on the local device against dense XLA convolutions.

For bottleneck blocks of ResNet-50 at 224 (one per stage) and random patch masks, runs
the spatial pipeline (gather_conv1x1 -> gather_conv3x3 -> conv1x1_scatter_add) and a
channel-skipping conv1 (channel_gather_matmul), compares each with the dense masked
computation in XLA (cuDNN convolutions on a GPU) and times both side by side (medians
after warm-up, `block_until_ready`).

    python -m laud_jax.gpu_check.selfcheck                        # on a GPU: Triton kernels
    python -m laud_jax.gpu_check.selfcheck --json selfcheck.json

Without a GPU it runs the kernels in interpret mode on the small last stage only: a
correctness check, and its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import indices
from pallas_kernels.channel_gather_matmul import channel_gather_matmul
from pallas_kernels.conv1x1_scatter_add import conv1x1_scatter_add
from pallas_kernels.gather_conv1x1 import gather_conv1x1
from pallas_kernels.gather_conv3x3 import gather_conv3x3

# ResNet-50 at 224, a later block of each stage: (name, input size, Cin, width, Cout, S)
BLOCKS = (
    ("stage1", 56, 256, 64, 256, 4),
    ("stage2", 28, 512, 128, 512, 4),
    ("stage3", 14, 1024, 256, 1024, 2),
    ("stage4", 7, 2048, 512, 2048, 7),
)
# max |error| / max(1, max |expected|): tf32 (float32) and bf16 matmul inputs on a GPU
TOLERANCE = {"float32": 1e-2, "bfloat16": 5e-2}
HIGHEST = jax.lax.Precision.HIGHEST


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _relative_error(actual: jax.Array, expected: jax.Array) -> float:
    actual, expected = actual.astype(jnp.float32), expected.astype(jnp.float32)
    scale = jnp.maximum(1.0, jnp.max(jnp.abs(expected)))
    return float(jnp.max(jnp.abs(actual - expected)) / scale)


def _dense_block(x, mask, w1, b1, w2, b2, w3, b3, size):
    """The dense masked bottleneck (stride 1, identity = x) in XLA."""
    conv = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(jax.lax.conv_general_dilated(x, w1[None, None], (1, 1), "VALID", **conv) + b1)
    h = jax.nn.relu(jax.lax.conv_general_dilated(h, w2, (1, 1), ((1, 1), (1, 1)), **conv) + b2)
    h = jax.lax.conv_general_dilated(h, w3[None, None], (1, 1), "VALID", **conv) + b3
    hw = x.shape[1]
    up = jnp.repeat(jnp.repeat(mask, size, 1), size, 2)[:, :hw, :hw, None]
    return jax.nn.relu(x + up * h.astype(jnp.float32)).astype(x.dtype)


def _sparse_block(x, mask, w1, b1, w2, b2, w3, b3, size, implementation):
    batch, hw = x.shape[0], x.shape[1]
    grid = mask.shape[1]
    pixels, n_pixels = indices.active_indices(
        indices.dilated_pixel_mask(mask, size, 1, (hw, hw)), batch * hw * hw
    )
    patches, n_patches = indices.active_indices(mask, batch * grid * grid)
    run = dict(implementation=implementation)
    h1 = gather_conv1x1(x, pixels, n_pixels, w1, b1, **run)
    h2 = gather_conv3x3(h1, patches, n_patches, w2, b2, patch_size=size, stride=1, **run)
    return conv1x1_scatter_add(h2, patches, n_patches, w3, b3, x, **run)


def check(
    implementation: str, dtype_name: str, batch: int, densities: Sequence[float],
    blocks: Sequence[tuple], repeats: int, group_size: int = 2,
) -> list[dict[str, Any]]:
    """One record per block, density and path (spatial block, channel conv1)."""
    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(0)
    records = []
    for name, hw, cin, width, cout, size in blocks:
        def normal(*shape, scale=1.0, dt=dtype):
            return jnp.asarray(rng.standard_normal(shape) * scale, dt)

        x = jnp.abs(normal(batch, hw, hw, cin))
        w1, b1 = normal(cin, width, scale=cin**-0.5), normal(width, scale=0.1, dt=jnp.float32)
        w2, b2 = normal(3, 3, width, width, scale=(9 * width) ** -0.5), normal(width, scale=0.1, dt=jnp.float32)
        w3, b3 = normal(width, cout, scale=width**-0.5), normal(cout, scale=0.1, dt=jnp.float32)
        grid = -(-hw // size)
        for density in densities:
            mask = jnp.asarray(rng.random((batch, grid, grid)) < density)
            sparse = jax.jit(lambda *a: _sparse_block(*a, size, implementation))
            dense = jax.jit(lambda *a: _dense_block(*a, size))
            args = (x, mask, w1, b1, w2, b2, w3, b3)
            error = _relative_error(sparse(*args), dense(*args))
            records.append(dict(
                block=name, path="spatial block", S=size, density=density, batch=batch,
                dtype=dtype_name, implementation=implementation, relative_error=error,
                dense_ms=_median_ms(lambda: dense(*args), repeats),
                sparse_ms=_median_ms(lambda: sparse(*args), repeats),
            ))

            groups = width // group_size
            order = jnp.asarray(np.stack([rng.permutation(groups) for _ in range(batch)]).astype(np.int32))
            counts = jnp.full((batch,), int(round(density * groups)), jnp.int32)
            rows = x.reshape(batch, hw * hw, cin)
            channel = jax.jit(lambda rows, order, counts: channel_gather_matmul(
                rows, w1, b1, group_size=group_size, out_groups=order, out_count=counts,
                implementation=implementation))
            dense_conv1 = jax.jit(lambda rows: jax.nn.relu(
                jnp.einsum("bmk,kn->bmn", rows, w1, preferred_element_type=jnp.float32) + b1))
            reference = channel_gather_matmul(
                rows, w1, b1, group_size=group_size, out_groups=order, out_count=counts,
                implementation="reference")
            error = _relative_error(channel(rows, order, counts), reference)
            records.append(dict(
                block=name, path="channel conv1", S=None, density=density, batch=batch,
                dtype=dtype_name, implementation=implementation, relative_error=error,
                dense_ms=_median_ms(lambda: dense_conv1(rows), repeats),
                sparse_ms=_median_ms(lambda: channel(rows, order, counts), repeats),
            ))
    return records


def format_table(records: Sequence[dict[str, Any]]) -> str:
    header = ("block", "path", "S", "density", "rel. error", "dense ms", "sparse ms", "speed-up")
    rows = [header] + [
        (r["block"], r["path"], str(r["S"] or "-"), f"{r['density']:.2f}", f"{r['relative_error']:.2e}",
         f"{r['dense_ms']:.3f}", f"{r['sparse_ms']:.3f}", f"{r['dense_ms'] / r['sparse_ms']:.2f}x")
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m laud_jax.gpu_check.selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--implementation", choices=["pallas", "interpret"],
                        help="default: pallas on a GPU, interpret (last stage only) otherwise")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or not all(0.0 <= d <= 1.0 for d in args.densities):
        parser.error("--batch and --repeats must be >= 1 and densities in [0, 1]")
    on_gpu = jax.default_backend() == "gpu"
    implementation = args.implementation or ("pallas" if on_gpu else "interpret")
    blocks = BLOCKS if implementation == "pallas" else BLOCKS[-1:]
    if implementation == "interpret":
        print("interpret mode on CPU: a correctness check; the timings mean nothing", file=sys.stderr)
    records = check(implementation, args.dtype, args.batch, args.densities, blocks, args.repeats)
    print(f"device: {jax.devices()[0].device_kind}  dtype: {args.dtype}  batch: {args.batch}")
    print(format_table(records))
    failures = [r for r in records if not r["relative_error"] <= TOLERANCE[args.dtype]]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "records": records}, f, indent=1)
    for r in failures:
        print(f"FAIL {r['block']} {r['path']} density {r['density']}: relative error "
              f"{r['relative_error']:.3g} > {TOLERANCE[args.dtype]}",
              file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

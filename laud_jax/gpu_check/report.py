"""GPU build report: compile every Pallas kernel for H100 (sm_90) and A100 (sm_80) on this
CPU host and read what the GPU would run.

For every kernel launch the sparse engine makes in ResNet-50 / ResNet-101 at 224 x 224
(shapes from laud_jax's network_spec: each stage, first and later blocks, every S in
{1, 2, 4, 7, 8} that divides the stage's grid, batch 1 and 8, float32 and bfloat16;
spatial and channel modes), the kernel is lowered for CUDA (laud_jax.gpu_check.cuda_build), compiled by the
triton package to PTX and a cubin, and measured with the NVIDIA tools Triton ships:
`ptxas -v` (registers, spill stores/loads, stack frame) and `cuobjdump` (resource
usage, SASS). From those: shared memory per block, theoretical occupancy (resident warps
per SM under the register, shared-memory and warp limits) and whether the matmul runs
on tensor cores (HGMMA on Hopper / HMMA on Ampere in the SASS, not FFMA loops). Each
record also carries the latency predictor's time for that launch on the target's preset
(`laud_jax.latency`: sm_90 -> `h100`, sm_80 -> `a100`; the `pallas` engine model at
density 1, the capacities the report compiles).

    python -m laud_jax.gpu_check.report                     # full table (minutes; cached)
    python -m laud_jax.gpu_check.report --quick             # one S, batch 1, sm_90
    python -m laud_jax.gpu_check.report --json out.json --markdown docs/gpu_build_report.md
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from laud_jax.gpu_check import cuda_build
from laud_jax.latency import PRESETS, BlockShape, block_setting
from laud_jax.latency.launches import LAUNCH_NAMES, get_engine
from laud_jax.latency.predictor import block_launch_times
from laud_jax.models.specs import ARCHS, BlockSpec, network_spec
from pallas_kernels._common import TileConfig, channel_tile
from pallas_kernels.channel_gather_matmul import channel_gather_matmul
from pallas_kernels.channel_gather_matmul import default_tiles as channel_tiles
from pallas_kernels.conv1x1_scatter_add import conv1x1_scatter_add
from pallas_kernels.conv1x1_scatter_add import default_tiles as scatter_tiles
from pallas_kernels.gather_matmul import default_tiles as gather_matmul_tiles
from pallas_kernels.gather_matmul import gather_matmul
from pallas_kernels.patch_conv import default_tiles as patch_conv_tiles
from pallas_kernels.patch_conv import patch_conv

# ---- hardware limits (CUDA occupancy calculator, per SM) -------------------------------


@dataclasses.dataclass(frozen=True)
class SmLimits:
    registers: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    shared_bytes: int = 233472  # usable shared memory per SM
    register_unit: int = 256  # registers are allocated per warp in units of 256


SM_LIMITS = {90: SmLimits(shared_bytes=233472), 80: SmLimits(shared_bytes=167936)}
MIN_OCCUPANCY_WARPS = 4  # the bar: at least 4 resident warps per SM


def occupancy(arch: int, registers: int, shared_bytes: int, num_warps: int) -> tuple[int, str]:
    """Theoretical resident warps per SM and the resource that limits them."""
    limits = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // limits.register_unit) * limits.register_unit
    by = {
        "registers": (limits.registers // per_warp) // num_warps if per_warp else limits.max_blocks,
        "shared": limits.shared_bytes // shared_bytes if shared_bytes else limits.max_blocks,
        "warps": limits.max_warps // num_warps,
        "blocks": limits.max_blocks,
    }
    limiter = min(by, key=by.get)
    return by[limiter] * num_warps, limiter


# ---- parsing the NVIDIA tools' output ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PtxasInfo:
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int


def parse_ptxas_log(log: str) -> PtxasInfo:
    """The function properties `ptxas -v` prints for a single-kernel module."""
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    used = re.search(r"Used (\d+) registers", log)
    if not frame or not used:
        raise ValueError(f"unrecognised ptxas -v output:\n{log}")
    return PtxasInfo(
        registers=int(used.group(1)),
        stack_bytes=int(frame.group(1)),
        spill_store_bytes=int(frame.group(2)),
        spill_load_bytes=int(frame.group(3)),
    )


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """`cuobjdump -res-usage`: per function, REG/STACK/SHARED/LOCAL/... as ints."""
    usage = {}
    for name, fields in re.findall(r"Function (\S+?):\s*\n\s*(REG:.*)", text):
        usage[name] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", fields)}
    return usage


TENSOR_CORE_OPS = ("HGMMA", "HMMA")


def sass_op_counts(sass: str) -> dict[str, int]:
    """Counts of the SASS opcodes that tell tensor-core from CUDA-core math, with the
    full tensor-core variants (e.g. HGMMA.64x64x16.F32.BF16)."""
    counts: collections.Counter[str] = collections.Counter()
    for op in re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]+)", sass):
        base = op.split(".")[0]
        if base in TENSOR_CORE_OPS:
            counts[op] += 1
        if base in (*TENSOR_CORE_OPS, "FFMA", "LDGSTS", "LDG", "STG", "STL", "LDL"):
            counts[base] += 1
    return dict(counts)


def _run(tool: str, *args: str) -> str:
    result = subprocess.run([tool, *args], capture_output=True, text=True, check=True)
    return result.stdout + result.stderr


# ---- measuring one kernel ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What the GPU toolchain says about one compiled kernel."""

    registers: int
    spill_bytes: int  # spill stores + spill loads (ptxas)
    stack_bytes: int
    local_bytes: int
    shared_bytes: int  # per block: Triton's dynamic shared memory + static (incl. reserved)
    num_warps: int
    num_stages: int
    occupancy_warps: int
    occupancy_limiter: str
    tensor_core: bool
    mma: str  # the tensor-core instruction variants, or "" when none
    ffma: int


def measure(kernel: cuda_build.TritonKernel, arch: int) -> Measurement:
    """Compile `kernel` for sm_<arch> and measure it (no GPU needed)."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    compiled = cuda_build.compile_kernel(kernel, arch)
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.ptx)
        with open(cubin, "wb") as f:
            f.write(compiled.cubin)
        ptxas = parse_ptxas_log(
            _run(
                get_ptxas(arch).path,
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={sm_arch_from_capability(arch)}",
                ptx,
                "-o",
                os.path.join(tmp, "v.o"),
            )
        )
        cuobjdump = triton.knobs.nvidia.cuobjdump.path
        usage = parse_res_usage(_run(cuobjdump, "-res-usage", cubin))[kernel.name]
        ops = sass_op_counts(_run(cuobjdump, "-sass", cubin))
    shared = compiled.shared_bytes + usage.get("SHARED", 0)
    warps, limiter = occupancy(arch, usage["REG"], shared, compiled.num_warps)
    mma = sorted(op for op in ops if "." in op and op.split(".")[0] in TENSOR_CORE_OPS)
    return Measurement(
        registers=usage["REG"],
        spill_bytes=ptxas.spill_store_bytes + ptxas.spill_load_bytes,
        stack_bytes=max(ptxas.stack_bytes, usage.get("STACK", 0)),
        local_bytes=usage.get("LOCAL", 0),
        shared_bytes=shared,
        num_warps=compiled.num_warps,
        num_stages=compiled.num_stages,
        occupancy_warps=warps,
        occupancy_limiter=limiter,
        tensor_core=bool(mma),
        mma=",".join(mma),
        ffma=ops.get("FFMA", 0),
    )


# ---- the launches of the sparse engine ---------------------------------------------------

S = jax.ShapeDtypeStruct
I32 = jnp.int32
F32 = jnp.float32
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FUSED_ARCHS = tuple(
    name for name, arch in ARCHS.items() if arch.block == "bottleneck" and not arch.group_width
)  # the kernels fuse bottlenecks with a dense 3x3 conv2


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch of the sparse engine, ready to lower."""

    kernel: str
    where: str  # e.g. "stage3.first conv2"
    blocks: str  # how many blocks of each model launch it, e.g. "R50 1 / R101 1"
    mode: str
    patch_size: int | None
    batch: int
    dtype: str
    shape: str
    tiles: TileConfig
    fn: Callable[..., Any]
    args: tuple[jax.ShapeDtypeStruct, ...]
    block: BlockSpec  # the block whose work it does (for the latency prediction)
    group_size: int = 2  # channels per channel-mask group (channel mode)
    label: str = ""  # the tuning candidate it belongs to

    @property
    def slot(self) -> str:
        """The latency predictor's launch slot: the conv named at the end of ``where``."""
        return self.where.rsplit(" ", 1)[1]


def _block_shapes(models: Sequence[str], image_size: int) -> list[tuple[str, str, BlockSpec, dict]]:
    """Distinct bottleneck shapes of the models, in network order: (block label, conv3
    label, a representative BlockSpec, {model: number of blocks with this shape})."""
    shapes: dict[tuple, tuple[str, str, BlockSpec, dict]] = {}
    for model in models:
        if model not in FUSED_ARCHS:
            raise ValueError(
                f"{model}: the kernels fuse bottleneck blocks with a dense conv2; choose from {FUSED_ARCHS}"
            )
        spec = network_spec({"arch": model, "num_classes": 1000}, (image_size, image_size))
        for block in spec.blocks:
            key = (
                block.stage,
                block.in_channels,
                block.width,
                block.out_channels,
                block.stride,
                block.h_in,
                block.w_in,
            )
            label = f"stage{block.stage + 1}.{'first' if block.index == 0 else 'rest'}"
            entry = shapes.setdefault(key, (label, f"stage{block.stage + 1}", block, {}))
            entry[3][model] = entry[3].get(model, 0) + 1
    return list(shapes.values())


def _counts(counts: dict[str, int]) -> str:
    return " / ".join(f"{m.replace('resnet', 'R')} {n}" for m, n in counts.items())


def engine_launches(
    models: Sequence[str],
    batches: Sequence[int],
    dtypes: Sequence[str],
    patch_sizes: Sequence[int],
    group_size: int = 2,
    tiles_for: Callable[[str, int, int], TileConfig] | None = None,
    image_size: int = 224,
) -> list[Launch]:
    """Every distinct kernel launch of spatial and channel modes for the models' blocks
    (from laud_jax's network_spec). A patch size S is used on the stages whose output
    grid it divides (the models accept no other). Capacities are full (density 1): the
    compiled code does not depend on the density."""
    tiles_for = tiles_for or default_tiles
    shapes = _block_shapes(models, image_size)
    conv3_counts: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for _, stage, _block, counts in shapes:
        for model, n in counts.items():
            conv3_counts[stage][model] = conv3_counts[stage].get(model, 0) + n
    launches, conv3_done = [], set()
    for label, stage, block, counts in shapes:
        cin, width, cout, stride = block.in_channels, block.width, block.out_channels, block.stride
        in_hw, out_hw = block.h_in, block.h_out
        sizes = [size for size in patch_sizes if out_hw % size == 0]
        first_of_stage = stage not in conv3_done  # every block of a stage has the same conv3
        conv3_done.add(stage)
        for batch in batches:
            for dtype_name in dtypes:
                dt = DTYPES[dtype_name]
                common = dict(blocks=_counts(counts), batch=batch, dtype=dtype_name)
                stage_common = {**common, "blocks": _counts(conv3_counts[stage])}
                pixels = batch * in_hw * in_hw
                t = tiles_for("gather_matmul", cin, width)
                launches.append(
                    Launch(
                        kernel="gather_matmul",
                        where=f"{label} conv1",
                        mode="spatial",
                        block=block,
                        patch_size=None,
                        shape=f"{pixels}x{cin}->{width}",
                        tiles=t,
                        fn=functools.partial(gather_matmul, tiles=t),
                        args=(S((pixels, cin), dt), S((pixels, 1), I32), S((cin, width), dt), S((width,), F32)),
                        **common,
                    )
                )
                for size in sizes:
                    grid = out_hw // size  # the mask grid (S divides the output side)
                    capacity = batch * grid * grid
                    t = tiles_for("patch_conv", width, width)
                    launches.append(
                        Launch(
                            kernel="patch_conv",
                            where=f"{label} conv2",
                            mode="spatial",
                            block=block,
                            patch_size=size,
                            tiles=t,
                            shape=f"{capacity}x{size}x{size}x{width}<-{pixels}x{width}/s{stride}",
                            fn=functools.partial(
                                patch_conv, grid=(batch, in_hw, in_hw), size=size, stride=stride, tiles=t
                            ),
                            args=(
                                S((pixels, width), dt),
                                S((pixels, 3), I32),
                                S((capacity, 3), I32),
                                S((3, 3, width, width), dt),
                                S((width,), F32),
                            ),
                            **common,
                        )
                    )
                    if first_of_stage:
                        t = tiles_for("conv1x1_scatter_add", width, cout)
                        launches.append(
                            Launch(
                                kernel="conv1x1_scatter_add",
                                where=f"{stage} conv3",
                                mode="spatial",
                                block=block,
                                patch_size=size,
                                tiles=t,
                                shape=f"{capacity}x{size}x{size}x{width}->{batch}x{out_hw}x{out_hw}x{cout}",
                                fn=functools.partial(conv1x1_scatter_add, tiles=t),
                                args=(
                                    S((capacity, size, size, width), dt),
                                    S((capacity,), I32),
                                    S((), I32),
                                    S((width, cout), dt),
                                    S((cout,), F32),
                                    S((batch, out_hw, out_hw, cout), dt),
                                ),
                                **stage_common,
                            )
                        )
                groups = width // group_size
                t = tiles_for("channel_gather_matmul", cin, width)
                launches.append(
                    Launch(
                        kernel="channel_gather_matmul",
                        where=f"{label} conv1",
                        mode="channel",
                        block=block,
                        group_size=group_size,
                        patch_size=None,
                        tiles=t,
                        shape=f"{batch}x{in_hw * in_hw}x{cin}->{groups}g{group_size}",
                        fn=_channel_fn(group_size, "out", t),
                        args=(
                            S((batch, in_hw * in_hw, cin), dt),
                            S((cin, width), dt),
                            S((width,), F32),
                            S((batch, groups), I32),
                            S((batch,), I32),
                        ),
                        **common,
                    )
                )
                if first_of_stage:
                    t = tiles_for("channel_gather_matmul", width, cout)
                    launches.append(
                        Launch(
                            kernel="channel_gather_matmul",
                            where=f"{stage} conv3",
                            mode="channel",
                            block=block,
                            group_size=group_size,
                            patch_size=None,
                            tiles=t,
                            shape=f"{batch}x{out_hw * out_hw}x{groups}g{group_size}->{cout}",
                            fn=_channel_fn(group_size, "compact", t),
                            args=(
                                S((batch, out_hw * out_hw, width), dt),
                                S((width, cout), dt),
                                S((cout,), F32),
                                S((batch, groups), I32),
                                S((batch,), I32),
                            ),
                            **stage_common,
                        )
                    )
    return launches


def _channel_fn(group_size: int, mode: str, tiles: TileConfig) -> Callable[..., jax.Array]:
    def fn(x, w, b, groups, count):
        if mode == "out":
            kwargs = dict(out_groups=groups, out_count=count)
        else:
            kwargs = dict(in_groups=groups, in_count=count, x_compact=True)
        return channel_gather_matmul(x, w, b, group_size=group_size, tiles=tiles, **kwargs)

    return fn


DEFAULT_TILES = {
    "gather_matmul": gather_matmul_tiles,
    "patch_conv": patch_conv_tiles,
    "conv1x1_scatter_add": scatter_tiles,
    "channel_gather_matmul": channel_tiles,
}
KERNELS = tuple(DEFAULT_TILES)


def default_tiles(kernel: str, cin: int, cout: int) -> TileConfig:
    """The kernels' own default tile heuristics (what the engine launches)."""
    return DEFAULT_TILES[kernel](cin, cout)


# ---- the latency predictor's figure -------------------------------------------------------

PROFILE_FOR_ARCH = {90: "h100", 80: "a100"}  # the latency predictor's preset per target


@jax.jit
def _slot_times(profile, shapes: BlockShape, settings):
    engine = get_engine("pallas").as_arrays()
    return jax.vmap(lambda shape, setting: block_launch_times(profile, engine, shape, setting))(shapes, settings)


def predicted_us(launches: Sequence[Launch], arch: int) -> list[float]:
    """The latency predictor's time in microseconds of each launch on sm_<arch>'s preset:
    its block's slot (conv1 / conv2 / conv3) in the `pallas` engine model, at density 1."""
    if not launches:
        return []
    shapes = BlockShape.from_specs([launch.block for launch in launches])
    settings = jax.tree.map(
        lambda *xs: jnp.stack(xs),
        *[
            block_setting(
                launch.mode,
                launch.patch_size or 1,
                1.0,
                channel_granularity=launch.group_size,
                batch=launch.batch,
                dtype=launch.dtype,
            )
            for launch in launches
        ],
    )
    times = jax.device_get(_slot_times(PRESETS[PROFILE_FOR_ARCH[arch]], shapes, settings))
    return [float(times[i, LAUNCH_NAMES.index(launch.slot)]) * 1e6 for i, launch in enumerate(launches)]


# ---- running the report -----------------------------------------------------------------


def build_records(
    launches: Sequence[Launch], archs: Sequence[int], jobs: int, progress: bool = True
) -> list[dict[str, Any]]:
    """Lower every launch for every target (here), compile and measure (in `jobs`
    worker processes); one flat record per launch and target."""
    from tqdm import tqdm

    work, predicted = [], []
    for arch in archs:
        predicted += predicted_us(launches, arch)
        for launch in launches:
            [kernel] = cuda_build.triton_kernels(cuda_build.lower_for_cuda(launch.fn, *launch.args, arch=arch))
            work.append((launch, arch, kernel))
    records: list[dict[str, Any] | None] = [None] * len(work)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(measure, kernel, arch): i for i, (_, arch, kernel) in enumerate(work)}
        done = concurrent.futures.as_completed(futures)
        for future in tqdm(done, total=len(futures), desc="compiling", disable=not progress):
            i = futures[future]
            launch, arch, kernel = work[i]
            records[i] = _record(launch, arch, kernel, future.result(), predicted[i])
    return [r for r in records if r is not None]


def _record(
    launch: Launch, arch: int, kernel: cuda_build.TritonKernel, m: Measurement, predicted: float
) -> dict[str, Any]:
    return {
        "kernel": launch.kernel,
        "where": launch.where,
        "blocks": launch.blocks,
        "mode": launch.mode,
        "S": launch.patch_size,
        "batch": launch.batch,
        "dtype": launch.dtype,
        "shape": launch.shape,
        "target": f"sm_{arch}",
        "block_m": launch.tiles.block_m,
        "block_n": launch.tiles.block_n,
        "block_k": launch.tiles.block_k,
        "grid": list(kernel.grid),
        **dataclasses.asdict(m),
        "predicted_us": predicted,
        "predicted_on": PROFILE_FOR_ARCH[arch],
        **({"candidate": launch.label} if launch.label else {}),
    }


def check_bar(record: dict[str, Any]) -> list[str]:
    """The quality bar of a shipped kernel configuration; returns the failures."""
    where = f"{record['kernel']} {record['shape']} {record['dtype']} {record['target']}"
    failures = []
    if record["spill_bytes"]:
        failures.append(f"{where}: {record['spill_bytes']} spill bytes (want 0)")
    if record["stack_bytes"]:
        failures.append(f"{where}: {record['stack_bytes']} stack bytes (want 0)")
    if not record["tensor_core"]:
        failures.append(f"{where}: no HGMMA/HMMA in SASS ({record['ffma']} FFMA): matmul off tensor cores")
    if record["occupancy_warps"] < MIN_OCCUPANCY_WARPS:
        failures.append(
            f"{where}: occupancy {record['occupancy_warps']} warps/SM "
            f"(limited by {record['occupancy_limiter']}; want >= {MIN_OCCUPANCY_WARPS})"
        )
    return failures


COLUMNS = (
    ("kernel", "kernel"),
    ("where", "where"),
    ("blocks", "blocks"),
    ("S", "S"),
    ("batch", "B"),
    ("dtype", "dtype"),
    ("target", "target"),
    ("tiles", "tiles m/n/k w/s"),
    ("registers", "regs"),
    ("spill_bytes", "spill"),
    ("stack_bytes", "stack"),
    ("shared_bytes", "smem"),
    ("occupancy_warps", "warps/SM"),
    ("occupancy_limiter", "limit"),
    ("mma", "tensor-core op"),
    ("predicted_us", "predicted us"),
)


def _cell(record: dict[str, Any], key: str) -> str:
    if key == "tiles":
        return (
            f"{record['block_m']}/{record['block_n']}/{record['block_k']} {record['num_warps']}/{record['num_stages']}"
        )
    if key == "mma":
        return record["mma"].split(",")[0] if record["mma"] else f"none ({record['ffma']} FFMA)"
    value = record[key]
    if key == "predicted_us":
        return f"{value:.1f} ({record['predicted_on']})"
    return "-" if value is None else str(value)


def format_table(records: Iterable[dict[str, Any]], markdown: bool = False) -> str:
    rows = [[title for _, title in COLUMNS]] + [[_cell(r, key) for key, _ in COLUMNS] for r in records]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "|".join("---" for _ in COLUMNS) + "|")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def summarize(records: Sequence[dict[str, Any]]) -> str:
    """One line per kernel/dtype/target: worst registers, spills, min occupancy, tensor cores."""
    groups: dict[tuple, list] = collections.defaultdict(list)
    for r in records:
        groups[(r["kernel"], r["dtype"], r["target"])].append(r)
    lines = [
        "| kernel | dtype | target | launches | max regs | spill bytes | stack bytes | max smem | min warps/SM "
        "| tensor cores | predicted us (min-max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, dtype, target), rs in sorted(groups.items()):
        lines.append(
            f"| {kernel} | {dtype} | {target} | {len(rs)} | {max(r['registers'] for r in rs)} | "
            f"{max(r['spill_bytes'] for r in rs)} | {max(r['stack_bytes'] for r in rs)} | "
            f"{max(r['shared_bytes'] for r in rs)} | {min(r['occupancy_warps'] for r in rs)} | "
            f"{sum(r['tensor_core'] for r in rs)}/{len(rs)} | "
            f"{min(r['predicted_us'] for r in rs):.1f}-{max(r['predicted_us'] for r in rs):.1f} "
            f"({rs[0]['predicted_on']}) |"
        )
    return "\n".join(lines)


# ---- tuning -----------------------------------------------------------------------------

# (block_m, block_n cap, block_k cap, num_warps, num_stages); the n/k tiles shrink to the
# channel counts. The first row is the initial heuristic (bf16; float32 used block_k 32).
TUNING_CANDIDATES = (
    (64, 128, 64, 4, 3),
    (64, 128, 32, 4, 3),
    (64, 64, 64, 4, 3),
    (64, 64, 32, 4, 3),
    (64, 64, 32, 4, 2),
    (64, 64, 32, 4, 4),
    (64, 64, 32, 8, 3),
    (128, 64, 32, 8, 3),
    (32, 64, 32, 4, 3),
)
TUNING_SHAPES = ("stage1.rest", "stage1 conv3", "stage3.rest", "stage3 conv3")


def _candidate_label(candidate: tuple[int, ...]) -> str:
    return "m{}/n<={}/k<={} w{}/s{}".format(*candidate)


def tuning_launches(dtypes: Sequence[str], group_size: int = 2) -> list[Launch]:
    """Every candidate on the stage-1 and stage-3 ResNet-50 launches (batch 8, S=2)."""
    launches = []
    for candidate in TUNING_CANDIDATES:
        block_m, n_cap, k_cap, warps, stages = candidate

        def tiles_for(kernel, cin, cout, m=block_m, n=n_cap, k=k_cap, w=warps, s=stages):
            return TileConfig(m, channel_tile(cout, n), channel_tile(cin, k), w, s)

        for launch in engine_launches(["resnet50"], [8], dtypes, [2], group_size, tiles_for):
            if launch.where.startswith(TUNING_SHAPES):
                launches.append(dataclasses.replace(launch, label=_candidate_label(candidate)))
    return launches


def tuning_table(records: Sequence[dict[str, Any]]) -> tuple[str, dict[tuple[str, str], str]]:
    """Per kernel and dtype, every candidate's worst figures over shapes and targets, and
    the pick: holds the bar everywhere, then uses Hopper's warpgroup MMA (HGMMA) on sm_90,
    then most resident warps per SM (latency hiding for the gathered loads), then fewest
    registers."""
    groups: dict[tuple, list] = collections.defaultdict(list)
    for r in records:
        groups[(r["kernel"], r["dtype"], r["candidate"])].append(r)
    rows, picks, best = [], {}, {}
    for (kernel, dtype, label), rs in sorted(groups.items()):
        passes = not any(check_bar(r) for r in rs)
        wgmma = all("HGMMA" in r["mma"] for r in rs if r["target"] == "sm_90")
        score = (passes, wgmma, min(r["occupancy_warps"] for r in rs), -max(r["registers"] for r in rs))
        rows.append((kernel, dtype, label, passes, rs, score))
        if (kernel, dtype) not in best or score > best[(kernel, dtype)]:
            best[(kernel, dtype)], picks[(kernel, dtype)] = score, label
    lines = [
        "| kernel | dtype | candidate | bar | min warps/SM | max regs | max spill | max smem | tensor-core ops "
        "| pick |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kernel, dtype, label, passes, rs, _ in rows:
        ops = sorted({r["mma"].split(",")[0].split(".")[1] if r["mma"] else "none" for r in rs})
        lines.append(
            f"| {kernel} | {dtype} | {label} | {'ok' if passes else 'FAIL'} | "
            f"{min(r['occupancy_warps'] for r in rs)} | {max(r['registers'] for r in rs)} | "
            f"{max(r['spill_bytes'] for r in rs)} | {max(r['shared_bytes'] for r in rs)} | "
            f"{' '.join(ops)} | {'<-' if picks[(kernel, dtype)] == label else ''} |"
        )
    return "\n".join(lines), picks


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m laud_jax.gpu_check.report",
        description="Compile every Pallas kernel launch of the sparse engine (ResNet-50/101 "
        "at 224) for H100/A100 on this CPU host and report registers, spills, shared memory, "
        "occupancy and tensor-core use.",
    )
    parser.add_argument(
        "--arch",
        type=int,
        nargs="+",
        default=[90, 80],
        choices=sorted(SM_LIMITS),
        help="compute capabilities to compile for (90 = H100, 80 = A100)",
    )
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet101"], choices=FUSED_ARCHS)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument(
        "--patch-sizes",
        type=int,
        nargs="+",
        default=[1, 2, 4, 7, 8],
        help="S values; each stage uses those that divide its output grid",
    )
    parser.add_argument("--group-size", type=int, default=2, help="channels per channel-mask group")
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--stages", type=int, nargs="+", choices=[1, 2, 3, 4], default=[1, 2, 3, 4])
    parser.add_argument("--quick", action="store_true", help="S=2, batch 1, sm_90 only (CI smoke run)")
    parser.add_argument(
        "--tune", action="store_true", help="compare the tile candidates on stage-1/3 shapes instead of the report"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--json", metavar="FILE", help="write one record per kernel/shape/target")
    parser.add_argument("--markdown", metavar="FILE", help="write the summary and table as Markdown")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.batch, args.patch_sizes = [90], [1], [2]
    if min(args.batch) < 1 or min(args.patch_sizes) < 1 or args.jobs < 1 or args.group_size < 1:
        parser.error("--batch, --patch-sizes, --jobs and --group-size take positive integers")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import triton  # noqa: F401  (compiles the kernels; its NVIDIA tools measure them)
    except ImportError:
        print(
            "error: the triton package is not installed (python -m laud_jax.gpu_check.report compiles "
            "with it): pip install -e '.[dev]' (the dev extra pins triton)",
            file=sys.stderr,
        )
        return 2
    if args.tune:
        records = build_records(
            tuning_launches(args.dtype, args.group_size), args.arch, args.jobs, progress=not args.no_progress
        )
        table, picks = tuning_table(records)
        print(table)
        for (kernel, dtype), label in sorted(picks.items()):
            print(f"pick {kernel} {dtype}: {label}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(table + "\n")
        return 0
    launches = [
        launch
        for launch in engine_launches(
            args.models, args.batch, args.dtype, args.patch_sizes, args.group_size, image_size=args.image_size
        )
        if launch.kernel in args.kernels and int(launch.where[len("stage")]) in args.stages
    ]
    print(f"{len(launches)} launches x {len(args.arch)} targets", file=sys.stderr)
    records = build_records(launches, args.arch, args.jobs, progress=not args.no_progress)
    failures = [f for r in records for f in check_bar(r)]
    print(summarize(records))
    print()
    print(format_table(records))
    print(f"\n{len(records)} kernels compiled; {len(failures)} below the bar", file=sys.stderr)
    for failure in failures:
        print("  " + failure, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(summarize(records) + "\n\n" + format_table(records, markdown=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
on tensor cores (HGMMA on Hopper / HMMA on Ampere in the SASS, not FFMA loops). From the
PTX main loop (the K loop): how many async copies stay in flight at its wait and its
barriers per step; from the launch: the grid's CTAs and the K steps each runs. Launches
are listed with full index lists (density 1) and at the engine's capacities for rate 0.5.
Each record also carries the latency predictor's time for that launch on the target's
preset (`laud_jax.latency`: sm_90 -> `h100`, sm_80 -> `a100`; the `pallas` engine model
at the launch's density).

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
import itertools
import json
import math
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
from jax.experimental import pallas as pl

from laud_jax.gpu_check import cuda_build
from laud_jax.latency import PRESETS, BlockShape, block_setting
from laud_jax.latency.launches import LAUNCH_NAMES, dilated_density, get_engine
from laud_jax.latency.predictor import block_launch_times
from laud_jax.models.specs import ARCHS, BlockSpec, network_spec
from laud_jax.sparse.routing import DEFAULT_CAPACITY_STEPS, capacity
from pallas_kernels._common import TileConfig, channel_tile, choose_split
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


# ---- reading the main loop (the K loop) from the PTX --------------------------------------
# Triton emits one PTX loop per K loop, one K step per trip (ptxas may unroll it in the
# SASS); its `cp.async.wait_group N` becomes the SASS `DEPBAR.LE SB0, N`.


@dataclasses.dataclass(frozen=True)
class MainLoop:
    """The K loop of a kernel, per trip (one K step)."""

    wait_depth: int | None  # N of its tightest cp.async.wait_group N (0: drained every step; None: no wait)
    barriers: int  # CTA-wide barriers (bar.sync)


PTX_LABEL = re.compile(r"^(\$?[\w$]+):")
PTX_BRANCH = re.compile(r"^(?:@(!?)(%p\d+)\s+)?bra(?:\.uni)?\s+(\$?[\w$]+);")
PTX_MATH = re.compile(r"^(?:@!?%p\d+\s+)?(?:wgmma\.mma_async|mma\.sync|fma\.rn\.f32)\b")


def ptx_loop(ptx: str) -> tuple[list[str], int, int] | None:
    """The PTX lines (comments stripped) and the main loop's (header, back edge) lines:
    of the loops (a branch back to an earlier label), the one holding the most matmul
    instructions (wgmma / mma / fma), the innermost one on a tie. None without one."""
    lines = [line.split("//")[0].strip() for line in ptx.splitlines()]
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := PTX_LABEL.match(line))}
    math_lines = [bool(PTX_MATH.match(line)) for line in lines]
    best, span = (0, 0), None
    for last, line in enumerate(lines):
        branch = PTX_BRANCH.match(line)
        first = labels.get(branch.group(3), last) if branch else last
        key = (sum(math_lines[first : last + 1]), first - last)
        if first < last and key[0] and key > best:
            best, span = key, (first, last)
    return None if span is None else (lines, *span)


def ptx_main_loop(ptx: str) -> MainLoop | None:
    """Wait depth and barriers of the PTX main loop (None without a loop)."""
    found = ptx_loop(ptx)
    if found is None:
        return None
    lines, first, last = found
    body = lines[first : last + 1]
    waits = [int(m.group(1)) for line in body if (m := re.match(r"cp\.async\.wait_group\s+(\d+);", line))]
    barriers = sum(bool(re.match(r"(?:@!?%p\d+\s+)?bar(?:rier)?\.sync\b", line)) for line in body)
    return MainLoop(wait_depth=min(waits, default=None), barriers=barriers)


def ptx_loop_trips(ptx: str) -> int | None:
    """Trips of the PTX main loop when its counter runs between constants: `mov.b32 %r, A`
    (or a copy of a register set to A) before the loop, `add.s32 %r, %r, step` and
    `setp.ne|lt.* %p, %r, B` in it, and the back edge taken on %p (`@%p bra`; `@!%p` with
    eq|ge). None for any other form."""
    found = ptx_loop(ptx)
    if found is None:
        return None
    lines, first, last = found
    branch = PTX_BRANCH.match(lines[last])
    if branch is None or branch.group(2) is None:
        return None
    negated, predicate = branch.group(1) == "!", re.escape(branch.group(2))
    compares = [
        (i, m.group(1), m.group(2), int(m.group(3)))
        for i in range(first, last)
        if (m := re.match(rf"setp\.(\w+)\.[bsu]32\s+{predicate},\s*(%r\d+),\s*(-?\d+);", lines[i]))
    ]
    if not compares:
        return None
    at, op, counter, bound = compares[-1]
    if (op, negated) not in {("ne", False), ("lt", False), ("eq", True), ("ge", True)}:
        return None
    reg = re.escape(counter)
    steps = [
        (i, int(m.group(1)))
        for i in range(first, last)
        if (m := re.match(rf"add\.s32\s+{reg},\s*{reg},\s*(-?\d+);", lines[i]))
    ]
    start = _constant_before(lines[:first], counter)
    if len(steps) != 1 or steps[0][1] <= 0 or start is None:
        return None
    added, step = steps[0]
    if op in ("ne", "eq") and (bound - start) % step:
        return None
    trips = -(-(bound - start) // step) + (added > at)  # compared before the add: one trip more
    return trips if trips >= 1 else None


def _constant_before(lines: Sequence[str], reg: str) -> int | None:
    """The constant the last `mov` into `reg` in `lines` sets, directly or through one
    register copy (`mov.b32 %r1, 0;` ... `mov.b32 %r2, %r1;`); None for anything else."""
    movs = [
        m.group(1) for line in lines if (m := re.match(rf"mov\.[bsu]32\s+{re.escape(reg)},\s*(-?\d+|%r\d+);", line))
    ]
    if not movs:
        return None
    if not movs[-1].startswith("%"):
        return int(movs[-1])
    source = [
        m.group(1) for line in lines if (m := re.match(rf"mov\.[bsu]32\s+{re.escape(movs[-1])},\s*(-?\d+);", line))
    ]
    return int(source[-1]) if source else None


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
    wait_depth: int | None  # the main loop's cp.async.wait_group N (None: no loop, or no wait in it)
    barriers_per_step: int | None  # bar.sync in the main loop (None: no loop)
    loop_trips: int | None  # the main loop's trip count, where its bounds are constants


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
    loop = ptx_main_loop(compiled.ptx)
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
        wait_depth=None if loop is None else loop.wait_depth,
        barriers_per_step=None if loop is None else loop.barriers,
        loop_trips=ptx_loop_trips(compiled.ptx),
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
    density: float  # the rate its index lists are sized for
    k_steps: int  # K-loop trips per CTA (channel conv3: its K loop runs to the sample's count, here the capacity)
    split_k: int = 1  # CTAs sharing one output tile's K loop (grids under one wave; not conv1x1_scatter_add)
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


def spatial_capacities(block: BlockSpec, size: int, batch: int, density: float) -> tuple[int, int]:
    """(patches, conv1 pixels): the lengths the engine's routing pads its index lists to
    when a fraction `density` of the S x S patches is active: the capacity ladder at
    ceil(density * patches), and at the conv1 pixels that many patches dilate to on
    average (patches active independently)."""
    cells = batch * (block.h_out // size) ** 2
    pixels = batch * block.h_in * block.w_in
    active = math.ceil(density * cells)
    keep = float(dilated_density(active / cells, size, block.stride, block.h_in, block.w_in))
    return (
        capacity(active, cells, DEFAULT_CAPACITY_STEPS),
        capacity(min(pixels, math.ceil(keep * pixels)), pixels, DEFAULT_CAPACITY_STEPS),
    )


def group_capacity(groups: int, density: float) -> int:
    """Channel-group slots the engine's routing pads to when a fraction `density` is on."""
    return max(1, capacity(math.ceil(density * groups), groups, DEFAULT_CAPACITY_STEPS))


def engine_launches(
    models: Sequence[str],
    batches: Sequence[int],
    dtypes: Sequence[str],
    patch_sizes: Sequence[int],
    group_size: int = 2,
    tiles_for: Callable[..., TileConfig] | None = None,
    image_size: int = 224,
    densities: Sequence[float] = (1.0,),
) -> list[Launch]:
    """Every distinct kernel launch of spatial and channel modes for the models' blocks
    (from laud_jax's network_spec). A patch size S is used on the stages whose output
    grid it divides (the models accept no other).

    The compiled code does not depend on the density, the grid does. At density 1 every
    index list is full (each kernel's largest grid, through its index lists). Below 1 the
    lists have the capacities the engine pads to (`spatial_capacities`, `group_capacity`),
    and, as in the engine, where the conv1 pixel list would cover the whole map conv1 runs
    densely (no gather_matmul) and patch_conv reads the map without a row map."""
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
        for batch, density, dtype_name in itertools.product(batches, densities, dtypes):
            dt = DTYPES[dtype_name]
            common = dict(blocks=_counts(counts), batch=batch, dtype=dtype_name, density=density, block=block)
            stage_common = {**common, "blocks": _counts(conv3_counts[stage])}
            map_pixels = batch * in_hw * in_hw
            # full lists: one conv1 for every S; below: the pixel list depends on S
            conv1_sizes: list[int | None] = [None] if density >= 1 else list(sizes)
            for size in conv1_sizes:
                pixels = map_pixels if size is None else spatial_capacities(block, size, batch, density)[1]
                if size is not None and pixels == map_pixels:
                    continue  # the engine runs conv1 densely
                t = tiles_for("gather_matmul", cin, width)
                steps = pl.cdiv(cin, t.block_k)
                split = choose_split("", t, pixels, width, steps)
                launches.append(
                    Launch(
                        kernel="gather_matmul",
                        where=f"{label} conv1",
                        mode="spatial",
                        patch_size=size,
                        shape=f"{pixels}x{cin}->{width}",
                        tiles=t,
                        k_steps=steps // split,
                        split_k=split,
                        fn=functools.partial(gather_matmul, tiles=t),
                        args=(S((map_pixels, cin), dt), S((pixels, 1), I32), S((cin, width), dt), S((width,), F32)),
                        **common,
                    )
                )
            for size in sizes:
                cells, pixels = spatial_capacities(block, size, batch, density)
                row_map = density >= 1 or pixels < map_pixels
                t = tiles_for("patch_conv", width, width)
                steps = 9 * pl.cdiv(width, t.block_k)
                split = choose_split("", t, cells * size * size, width, steps)
                conv = functools.partial(patch_conv, grid=(batch, in_hw, in_hw), size=size, stride=stride, tiles=t)
                # through routing's row map: one int32 per pixel of the conv1 grid
                rows = (S((pixels, width), dt), S((map_pixels,), I32)) if row_map else (S((pixels, width), dt),)
                launches.append(
                    Launch(
                        kernel="patch_conv",
                        where=f"{label} conv2",
                        mode="spatial",
                        patch_size=size,
                        tiles=t,
                        k_steps=steps // split,
                        split_k=split,
                        shape=f"{cells}x{size}x{size}x{width}<-{pixels}x{width}{'' if row_map else ' map'}/s{stride}",
                        fn=conv if row_map else _without_row_map(conv),
                        args=(*rows, S((cells, 3), I32), S((3, 3, width, width), dt), S((width,), F32)),
                        **common,
                    )
                )
                if first_of_stage:
                    t = tiles_for("conv1x1_scatter_add", width, cout, rows=cells * size * size)
                    launches.append(
                        Launch(
                            kernel="conv1x1_scatter_add",
                            where=f"{stage} conv3",
                            mode="spatial",
                            patch_size=size,
                            tiles=t,
                            k_steps=pl.cdiv(width, t.block_k),
                            shape=f"{cells}x{size}x{size}x{width}->{batch}x{out_hw}x{out_hw}x{cout}",
                            fn=functools.partial(conv1x1_scatter_add, tiles=t),
                            args=(
                                S((cells, size, size, width), dt),
                                S((cells,), I32),
                                S((), I32),
                                S((width, cout), dt),
                                S((cout,), F32),
                                S((batch, out_hw, out_hw, cout), dt),
                            ),
                            **stage_common,
                        )
                    )
            groups = group_capacity(width // group_size, density)
            t = tiles_for("channel_gather_matmul", cin, width)
            steps = pl.cdiv(cin, t.block_k)
            split = choose_split("", t, in_hw * in_hw, groups * group_size, steps, batches=batch)
            launches.append(
                Launch(
                    kernel="channel_gather_matmul",
                    where=f"{label} conv1",
                    mode="channel",
                    group_size=group_size,
                    patch_size=None,
                    tiles=t,
                    k_steps=steps // split,
                    split_k=split,
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
                steps = pl.cdiv(groups * group_size, t.block_k)
                split = choose_split("", t, out_hw * out_hw, cout, steps, batches=batch)
                launches.append(
                    Launch(
                        kernel="channel_gather_matmul",
                        where=f"{stage} conv3",
                        mode="channel",
                        group_size=group_size,
                        patch_size=None,
                        tiles=t,
                        k_steps=steps // split,
                        split_k=split,
                        shape=f"{batch}x{out_hw * out_hw}x{groups}g{group_size}->{cout}",
                        fn=_channel_fn(group_size, "compact", t),
                        args=(
                            S((batch, out_hw * out_hw, groups * group_size), dt),
                            S((width, cout), dt),
                            S((cout,), F32),
                            S((batch, groups), I32),
                            S((batch,), I32),
                        ),
                        **stage_common,
                    )
                )
    return launches


def _without_row_map(conv: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """patch_conv on the whole map in row-major order (row_map=None)."""

    def fn(rows: jax.Array, starts: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
        return conv(rows, None, starts, w, b)

    return fn


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


def default_tiles(kernel: str, cin: int, cout: int, rows: int | None = None) -> TileConfig:
    """The kernels' own default tile heuristics (what the engine launches); conv3's also
    depend on its `rows`."""
    if kernel == "conv1x1_scatter_add":
        return scatter_tiles(cin, cout, rows)
    return DEFAULT_TILES[kernel](cin, cout)


# ---- the latency predictor's figure -------------------------------------------------------

PROFILE_FOR_ARCH = {90: "h100", 80: "a100"}  # the latency predictor's preset per target


@jax.jit
def _slot_times(profile, shapes: BlockShape, settings):
    engine = get_engine("pallas").as_arrays()
    return jax.vmap(lambda shape, setting: block_launch_times(profile, engine, shape, setting))(shapes, settings)


def predicted_us(launches: Sequence[Launch], arch: int) -> list[float]:
    """The latency predictor's time in microseconds of each launch on sm_<arch>'s preset:
    its block's slot (conv1 / conv2 / conv3) in the `pallas` engine model, at its density."""
    if not launches:
        return []
    shapes = BlockShape.from_specs([launch.block for launch in launches])
    settings = jax.tree.map(
        lambda *xs: jnp.stack(xs),
        *[
            block_setting(
                launch.mode,
                launch.patch_size or 1,
                launch.density,
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
        "density": launch.density,
        "dtype": launch.dtype,
        "shape": launch.shape,
        "target": f"sm_{arch}",
        "block_m": launch.tiles.block_m,
        "block_n": launch.tiles.block_n,
        "block_k": launch.tiles.block_k,
        "grid": list(kernel.grid),
        "ctas": math.prod(kernel.grid),
        "k_steps": launch.k_steps,
        "split_k": launch.split_k,
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
    ("density", "rate"),
    ("dtype", "dtype"),
    ("target", "target"),
    ("tiles", "tiles m/n/k w/s"),
    ("ctas", "CTAs"),
    ("k_steps", "K steps"),
    ("split_k", "split"),
    ("wait_depth", "wait"),
    ("barriers_per_step", "bar/step"),
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
    if key == "k_steps" and record["loop_trips"] not in (None, value):
        return f"{value} (loop {record['loop_trips']})"
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


def _values(rs: Sequence[dict[str, Any]], key: str) -> str:
    """The distinct values of `key` ("-" for None), in order."""
    return " ".join(sorted({"-" if r[key] is None else str(r[key]) for r in rs}, key=lambda v: (len(v), v)))


def summarize(records: Sequence[dict[str, Any]]) -> str:
    """One line per kernel/dtype/target: worst registers, spills, min occupancy, tensor
    cores, the grids and K loops, and the main loops' wait depths and barriers."""
    groups: dict[tuple, list] = collections.defaultdict(list)
    for r in records:
        groups[(r["kernel"], r["dtype"], r["target"])].append(r)
    lines = [
        "| kernel | dtype | target | launches | max regs | spill bytes | stack bytes | max smem | min warps/SM "
        "| tensor cores | CTAs (min-max) | K steps (min-max) | wait depths | bar/step | predicted us (min-max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, dtype, target), rs in sorted(groups.items()):
        lines.append(
            f"| {kernel} | {dtype} | {target} | {len(rs)} | {max(r['registers'] for r in rs)} | "
            f"{max(r['spill_bytes'] for r in rs)} | {max(r['stack_bytes'] for r in rs)} | "
            f"{max(r['shared_bytes'] for r in rs)} | {min(r['occupancy_warps'] for r in rs)} | "
            f"{sum(r['tensor_core'] for r in rs)}/{len(rs)} | "
            f"{min(r['ctas'] for r in rs)}-{max(r['ctas'] for r in rs)} | "
            f"{min(r['k_steps'] for r in rs)}-{max(r['k_steps'] for r in rs)} | "
            f"{_values(rs, 'wait_depth')} | {_values(rs, 'barriers_per_step')} | "
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

        def tiles_for(kernel, cin, cout, rows=None, m=block_m, n=n_cap, k=k_cap, w=warps, s=stages):
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
    parser.add_argument(
        "--density",
        type=float,
        nargs="+",
        default=[1.0, 0.5],
        help="rates the index lists are sized for (1: full lists; below: the engine's capacities)",
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
    if not all(0 < d <= 1 for d in args.density):
        parser.error("--density takes rates in (0, 1]")
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
            args.models,
            args.batch,
            args.dtype,
            args.patch_sizes,
            args.group_size,
            image_size=args.image_size,
            densities=args.density,
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

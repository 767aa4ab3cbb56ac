"""GPU build report: the shipped kernel configurations hold the bar on sm_90,
and the report's parsing of the NVIDIA tools is right on kernels of known resource use."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from laud_jax.gpu_check import cuda_build, report
from laud_jax.latency import PRESETS


def _bar_launches():
    """The default configuration of every kernel on its smallest- and largest-channel
    ResNet-50 shapes (stage 1 with S=1, stage 4 with S=7), float32 and bfloat16."""
    launches = []
    for stage, size in (("stage1", 1), ("stage4", 7)):
        for launch in report.engine_launches(["resnet50"], [8], ["float32", "bfloat16"], [size]):
            if launch.where.startswith(stage) and ".first" not in launch.where:
                launches.append(launch)
    return launches


BAR_LAUNCHES = _bar_launches()


def test_bar_covers_every_kernel_and_dtype():
    covered = {(launch.kernel, launch.dtype) for launch in BAR_LAUNCHES}
    assert covered == {(k, d) for k in report.KERNELS for d in ("float32", "bfloat16")}


@pytest.mark.parametrize("launch", BAR_LAUNCHES, ids=[f"{b.kernel}-{b.where}-{b.dtype}" for b in BAR_LAUNCHES])
def test_default_configuration_holds_the_bar_on_sm90(launch):
    [kernel] = cuda_build.triton_kernels(cuda_build.lower_for_cuda(launch.fn, *launch.args, arch=90))
    m = report.measure(kernel, 90)
    where = f"{launch.kernel} {launch.where} {launch.shape} {launch.dtype} sm_90"
    assert m.spill_bytes == 0, f"{where}: {m.spill_bytes} spill bytes"
    assert m.stack_bytes == 0, f"{where}: {m.stack_bytes} stack bytes"
    assert m.tensor_core, f"{where}: no HGMMA/HMMA in SASS ({m.ffma} FFMA): matmul off tensor cores"
    assert m.occupancy_warps >= report.MIN_OCCUPANCY_WARPS, (
        f"{where}: occupancy {m.occupancy_warps} warps/SM (limited by {m.occupancy_limiter})"
    )
    assert m.loop_trips in (None, launch.k_steps), f"{where}: main loop runs {m.loop_trips} trips, not {launch.k_steps}"


def test_split_conv2_holds_the_bar_on_sm80():
    """Stage-1 conv2 at batch 1 with full lists (S = 2, bf16) runs its 18 K steps split
    over 3 CTAs of 6. With the K loop counting 0..6 and adding the CTA's first step,
    ptxas held it to 64 registers on sm_80 and spilled 16 bytes; the loop now runs
    between the range's bounds (74 registers, no spill)."""
    [launch] = [
        launch
        for launch in report.engine_launches(["resnet50"], [1], ["bfloat16"], [2])
        if launch.where == "stage1.rest conv2"
    ]
    assert launch.split_k == 3 and launch.k_steps == 6
    [kernel] = cuda_build.triton_kernels(cuda_build.lower_for_cuda(launch.fn, *launch.args, arch=80))
    m = report.measure(kernel, 80)
    assert (m.spill_bytes, m.stack_bytes, m.loop_trips, m.wait_depth) == (0, 0, 6, 2)


# ---- parsing, on kernels whose resource use is known ------------------------------------


def _add_one(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0


def _matmul(a_ref, b_ref, o_ref):
    o_ref[...] = jnp.dot(a_ref[...], b_ref[...], preferred_element_type=jnp.float32)


def _compile(kernel_fn, out_shape, *args, arch, num_warps=4):
    call = pl.pallas_call(
        kernel_fn,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
    )
    [kernel] = cuda_build.triton_kernels(cuda_build.lower_for_cuda(call, *args, arch=arch))
    return kernel


def test_elementwise_kernel_measures_as_known():
    """x + 1 on 1024 floats: no dot, no Triton shared memory, few registers, no spills;
    so occupancy reaches the 64-warp SM limit."""
    x = jax.ShapeDtypeStruct((1024,), jnp.float32)
    kernel = _compile(_add_one, x, x, arch=90)
    m = report.measure(kernel, 90)
    assert m.registers <= 32
    assert (m.spill_bytes, m.stack_bytes, m.local_bytes) == (0, 0, 0)
    assert not m.tensor_core and m.mma == ""
    assert m.shared_bytes <= 1024  # only the 1 KiB the driver reserves per block
    assert m.occupancy_warps == 64


@pytest.mark.parametrize("arch, op", [(90, "HGMMA.64x64x16.F32.BF16"), (80, "HMMA.16816.F32.BF16")])
def test_bf16_matmul_is_found_on_tensor_cores(arch, op):
    a = jax.ShapeDtypeStruct((64, 64), jnp.bfloat16)
    kernel = _compile(_matmul, jax.ShapeDtypeStruct((64, 64), jnp.float32), a, a, arch=arch)
    m = report.measure(kernel, arch)
    assert m.tensor_core and op in m.mma.split(","), m.mma
    assert m.ffma == 0


def test_forced_register_limit_is_reported_as_spills():
    """The matmul for sm_80 assembled with `.maxnreg 32` must spill: ptxas -v,
    cuobjdump's resource usage and the SASS (local stores/loads) all have to say so.
    (sm_80: ptxas rejects so low a limit for Hopper's warpgroup MMA.)"""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    a = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    kernel = _compile(_matmul, a, a, a, arch=80)
    ptx = cuda_build.compile_kernel(kernel, 80).ptx
    assert ".reqntid 128" in ptx
    ptx = ptx.replace(".reqntid 128", ".reqntid 128\n.maxnreg 32", 1)
    with tempfile.TemporaryDirectory() as tmp:
        source, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(source, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [get_ptxas(80).path, "-v", "--gpu-name=sm_80", source, "-o", cubin],
            capture_output=True,
            text=True,
            check=True,
        )
        cuobjdump = triton.knobs.nvidia.cuobjdump.path
        usage = report.parse_res_usage(
            subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True).stdout
        )[kernel.name]
        ops = report.sass_op_counts(subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout)
    info = report.parse_ptxas_log(log.stdout + log.stderr)
    assert info.registers == usage["REG"] == 32
    assert info.spill_store_bytes > 0 and info.spill_load_bytes > 0
    assert info.stack_bytes == usage["STACK"] > 0
    assert ops.get("STL", 0) > 0 and ops.get("LDL", 0) > 0


# ---- reading the main loop --------------------------------------------------------------

PTX_TWO_LOOPS = """
.visible .entry k(
)
{
	mov.b32 	%r9, 0;
$L__BB0_1:                              // a copy loop: no matmul
	add.s32 	%r9, %r9, 1;
	setp.lt.s32 	%p1, %r9, 4;
	bar.sync 	0;
	@%p1 bra 	$L__BB0_1;
	mov.b32 	%r265, 2;
	mov.b32 	%r264, 32;
$L__BB0_2:                              // =>This Inner Loop Header: Depth=1
	setp.ne.b32 	%p15, %r265, 73;
	cp.async.wait_group 	2;
	bar.sync 	0;
	wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%r1,%r2}, %rd20, %rd21, %p13, 1, 1, 0, 1;
	cp.async.wait_group 	1;
	@%p5 cp.async.ca.shared.global [ %r115 + 0 ], [ %rd28 + 0 ], 0x4, %r116;
	cp.async.commit_group;
	bar.sync 	0;
	bar.sync 	0;
	add.s32 	%r265, %r265, 1;
	add.s32 	%r264, %r264, 32;
	setp.ne.b32 	%p21, %r265, 74;
	@%p21 bra 	$L__BB0_2;
// %bb.3:
	cp.async.wait_group 	0;
	bar.sync 	0;
	ret;
}
"""


def test_ptx_main_loop_is_the_matmul_loop():
    lines, first, last = report.ptx_loop(PTX_TWO_LOOPS)
    assert lines[first].startswith("$L__BB0_2:") and lines[last] == "@%p21 bra \t$L__BB0_2;"
    # the tightest wait in the loop (wait_group 1), its three barriers; not the loop
    # before it, nor the drain after it
    assert report.ptx_main_loop(PTX_TWO_LOOPS) == report.MainLoop(wait_depth=1, barriers=3)
    assert report.ptx_loop_trips(PTX_TWO_LOOPS) == 72  # %r265 runs 2 .. 74


def test_ptx_main_loop_without_loop_or_wait():
    no_matmul = PTX_TWO_LOOPS.replace("wgmma.mma_async", "mov.b32")
    assert report.ptx_loop(no_matmul) is None and report.ptx_main_loop(no_matmul) is None
    # only the first loop, its barrier turned into an MMA: no wait, no barrier
    first_only = PTX_TWO_LOOPS.split("$L__BB0_2:")[0].replace("bar.sync \t0", "wgmma.mma_async.sync.aligned")
    assert report.ptx_main_loop(first_only) == report.MainLoop(wait_depth=None, barriers=0)
    assert report.ptx_loop_trips(first_only) == 4  # %r9 runs 0 .. 4 (lt)


@pytest.mark.parametrize(
    "edit, trips",
    [
        (("setp.ne.b32 \t%p21, %r265, 74;", "setp.lt.u32 \t%p21, %r265, 75;"), 73),  # lt: ceil
        (("add.s32 \t%r265, %r265, 1;", "add.s32 \t%r265, %r265, 2;"), 36),
        (("add.s32 \t%r265, %r265, 1;", "add.s32 \t%r265, %r265, 5;"), None),  # ne never met
        (("@%p21 bra", "@!%p21 bra"), None),  # ne with a negated branch: not a counted loop
        (("setp.ne.b32 \t%p21, %r265, 74;", "setp.eq.s32 \t%p21, %r265, 74;"), None),
        (("mov.b32 \t%r265, 2;", "mov.b32 \t%r265, %r7;"), None),  # start not a constant
        (("mov.b32 \t%r265, 2;", "mov.b32 \t%r7, 2;\n\tmov.b32 \t%r265, %r7;"), 72),  # a copy of one
        (("setp.ne.b32 \t%p21, %r265, 74;", "setp.ne.b32 \t%p21, %r265, %r8;"), None),  # dynamic bound
    ],
)
def test_ptx_loop_trips_forms(edit, trips):
    assert report.ptx_loop_trips(PTX_TWO_LOOPS.replace(*edit)) == trips


def test_ptx_loop_trips_compared_before_the_increment():
    ptx = PTX_TWO_LOOPS.replace("\tsetp.ne.b32 \t%p21, %r265, 74;\n", "").replace(
        "\tadd.s32 \t%r265, %r265, 1;\n", "\tsetp.ne.b32 \t%p21, %r265, 73;\n\tadd.s32 \t%r265, %r265, 1;\n"
    )
    assert report.ptx_loop_trips(ptx) == 72  # compares 2 .. 73 before each add


@pytest.mark.parametrize("arch", [90, 80])
def test_main_loop_of_a_compiled_conv2_keeps_copies_in_flight(arch):
    """The engine's conv2 at rate 0.5 on the stage-3 first block (batch 8, S = 2, bf16,
    through the row map): 13 x 4 output tiles, each K loop of 9 taps x 8 channel chunks
    split over 6 CTAs (12 steps each, 312 CTAs), and the loop keeps copies in flight
    (`cp.async.wait_group 2` with 3 stages). The 9 taps' rows are looked up in the row
    map before the loop; looked up inside it (the kernel before), every step drained the
    pipeline (`wait_group 0`, `DEPBAR.LE SB0, 0x0`)."""
    import triton

    [launch] = [
        launch
        for launch in report.engine_launches(["resnet50"], [8], ["bfloat16"], [2], densities=[0.5])
        if launch.where == "stage3.first conv2"
    ]
    assert len(launch.args) == 5  # rows, row_map, starts, w, b: through routing's row map
    assert launch.args[1].shape == (8 * 28 * 28,)  # one int32 per pixel of the conv1 grid
    [kernel] = cuda_build.triton_kernels(cuda_build.lower_for_cuda(launch.fn, *launch.args, arch=arch))
    assert kernel.grid == (13, 4, 6) and launch.k_steps == 12 and launch.split_k == 6
    compiled = cuda_build.compile_kernel(kernel, arch)
    assert report.ptx_loop_trips(compiled.ptx) == 12
    loop = report.ptx_main_loop(compiled.ptx)
    assert loop.wait_depth == kernel.num_stages - 1 >= 1 and loop.barriers <= 3
    if arch == 90:  # ptxas keeps the depth: DEPBAR.LE SB0, 0x2 in the SASS loop
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(compiled.cubin)
            sass = subprocess.run(
                [triton.knobs.nvidia.cuobjdump.path, "-sass", cubin], capture_output=True, text=True, check=True
            ).stdout
        assert "DEPBAR.LE SB0, 0x2" in sass


def test_capacities_at_half_rate():
    """Rate 0.5 sizes the lists as the engine's routing does: half the cells rounded up
    to the capacity ladder, conv1 pixels from the dilated mask; where that covers the map
    (S = 1 at stride 1, or stage 4's single 7 x 7 patch) the engine runs conv1 densely and
    conv2 without a row map."""
    launches = report.engine_launches(["resnet50"], [1], ["bfloat16"], [1, 2, 7], densities=[1.0, 0.5])
    by = {(launch.where, launch.patch_size, launch.density, launch.kernel): launch for launch in launches}
    stage3 = by[("stage3.first conv2", 2, 1.0, "patch_conv")].block
    cells, pixels = report.spatial_capacities(stage3, 2, 1, 0.5)
    assert cells == 25 and pixels < 28 * 28  # 49 cells: ceil(24.5), on the ladder
    assert report.spatial_capacities(stage3, 2, 1, 1.0) == (49, 784)
    assert ("stage3.first conv1", 2, 0.5, "gather_matmul") in by
    for where, size, hw in (("stage3.rest", 1, 14), ("stage4.rest", 7, 7)):
        assert (f"{where} conv1", size, 0.5, "gather_matmul") not in by  # dense conv1
        whole = by[(f"{where} conv2", size, 0.5, "patch_conv")]
        assert len(whole.args) == 4 and f"<-{hw * hw}x" in whole.shape and " map/" in whole.shape
    assert report.group_capacity(128, 0.5) == 64 and report.group_capacity(128, 1.0) == 128


def test_parsers_on_tool_output():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    48 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers\n"
    )
    assert report.parse_ptxas_log(log) == report.PtxasInfo(255, 40, 36, 48)
    usage = report.parse_res_usage(
        "\nResource usage:\n Common:\n  GLOBAL:0\n Function k:\n"
        "  REG:168 STACK:8 SHARED:1024 LOCAL:4 CONSTANT[0]:592 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
    )
    assert usage["k"]["REG"] == 168 and usage["k"]["STACK"] == 8 and usage["k"]["LOCAL"] == 4
    assert usage["k"]["SHARED"] == 1024 and usage["k"]["CONSTANT[0]"] == 592
    sass = (
        "        /*1880*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, RZ ;\n"
        "        /*18d0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ;\n"
        "        /*1900*/              @!P0 FFMA R3, R4, R5, R3 ;\n"
        "        /*1910*/               @P1 LDGSTS.E.BYPASS.128 [R7], desc[UR4][R8.64] ;\n"
    )
    assert report.sass_op_counts(sass) == {"HGMMA.64x128x16.F32.BF16": 2, "HGMMA": 2, "FFMA": 1, "LDGSTS": 1}
    with pytest.raises(ValueError, match="unrecognised ptxas"):
        report.parse_ptxas_log("garbage")


@pytest.mark.parametrize(
    "arch, registers, shared, warps, expected",
    [
        (90, 168, 74752, 4, (12, "registers")),  # 168*32 -> 5376 regs/warp -> 12 warps
        (90, 64, 200000, 4, (4, "shared")),  # one block fits in 228 KiB
        (80, 24, 0, 4, (64, "warps")),
        (80, 96, 90000, 8, (8, "shared")),  # 164 KiB holds one 90 KB block
    ],
)
def test_occupancy_limits(arch, registers, shared, warps, expected):
    assert report.occupancy(arch, registers, shared, warps) == expected


def test_cli_writes_json_records(tmp_path):
    out = tmp_path / "report.json"
    md = tmp_path / "report.md"
    report.main(
        [
            "--quick",
            "--kernels",
            "gather_matmul",
            "--stages",
            "3",
            "--models",
            "resnet50",
            "--dtype",
            "bfloat16",
            "--jobs",
            "1",
            "--no-progress",
            "--json",
            str(out),
            "--markdown",
            str(md),
        ]
    )
    records = json.loads(out.read_text())
    assert len(records) == 4  # stage 3's first and later blocks (S = 2) at rates 1 and 0.5
    for record in records:
        for key in (
            "kernel",
            "target",
            "dtype",
            "registers",
            "spill_bytes",
            "shared_bytes",
            "occupancy_warps",
            "tensor_core",
            "predicted_us",
            "density",
            "ctas",
            "k_steps",
            "wait_depth",
            "barriers_per_step",
            "split_k",
        ):
            assert key in record
        assert record["kernel"] == "gather_matmul" and record["target"] == "sm_90"
        assert record["tensor_core"] is True
        assert record["predicted_on"] == "h100" and record["predicted_us"] > 0
        assert record["ctas"] == record["grid"][0] * record["grid"][1] * record["grid"][2]
        assert record["k_steps"] == record["loop_trips"]
        assert record["wait_depth"] == 2  # 3 stages: two copies in flight
    # K = 512 / 1024 in 16 / 32 steps of 32 channels; 784 / 196 rows at rate 1, 490 / 178
    # at 0.5, in 64-row tiles times 256 / 64 output-channel tiles: 52 / 16 and 32 / 12
    # tiles, under one wave (132), so each K loop is split (4 steps per CTA at most)
    grids = sorted((r["density"], r["k_steps"], r["split_k"], r["ctas"]) for r in records)
    assert grids == [(0.5, 4, 4, 8 * 4 * 4), (0.5, 4, 8, 3 * 4 * 8), (1.0, 4, 4, 13 * 4 * 4), (1.0, 4, 8, 4 * 4 * 8)]
    text = md.read_text()
    assert "| gather_matmul | bfloat16 | sm_90 | 4 |" in text
    assert "| CTAs | K steps | split | wait | bar/step |" in text


def test_bar_failures_name_kernel_shape_and_figure():
    record = dict(
        kernel="patch_conv",
        shape="8x14x14x256",
        dtype="bfloat16",
        target="sm_90",
        spill_bytes=16,
        stack_bytes=0,
        tensor_core=False,
        ffma=512,
        occupancy_warps=2,
        occupancy_limiter="registers",
    )
    failures = report.check_bar(record)
    assert len(failures) == 3
    assert all("patch_conv 8x14x14x256 bfloat16 sm_90" in f for f in failures)
    assert any("16 spill bytes" in f for f in failures)
    assert any("512 FFMA" in f for f in failures)
    assert any("occupancy 2 warps/SM" in f for f in failures)


def test_predicted_time_respects_the_roofline_and_orders_the_targets():
    """The predictor's figure per launch is never below the work's compute time at the
    preset's peak nor below reading its weights from DRAM once; H100 beats A100, bf16 beats
    float32 on a large conv1 matmul, batch 8 never costs less than batch 1."""
    launches = [
        launch
        for launch in report.engine_launches(["resnet50"], [1, 8], ["float32", "bfloat16"], [2])
        if launch.kernel == "gather_matmul"
    ]
    times = {arch: report.predicted_us(launches, arch) for arch in (90, 80)}
    by_key = {}
    for i, launch in enumerate(launches):
        block = launch.block
        macs = launch.batch * block.h_in * block.w_in * block.in_channels * block.width
        item = 2 if launch.dtype == "bfloat16" else 4
        for arch, preset in ((90, "h100"), (80, "a100")):
            p = PRESETS[preset]
            peak = float(p.flops_half if launch.dtype == "bfloat16" else p.flops_fp32)
            seconds = times[arch][i] * 1e-6
            assert seconds >= 2 * macs / peak, (launch.where, preset)
            assert seconds >= block.in_channels * block.width * item / float(p.dram_bw), (launch.where, preset)
        assert times[90][i] < times[80][i], launch.where
        by_key[(launch.where, launch.batch, launch.dtype)] = times[90][i]
    for (where, batch, dtype), t in by_key.items():
        if batch == 8:
            assert t >= by_key[(where, 1, dtype)], where  # equal while one wave holds both
    big = "stage1.first conv1"
    assert by_key[(big, 8, "float32")] > by_key[(big, 1, "float32")]
    assert by_key[(big, 8, "bfloat16")] < by_key[(big, 8, "float32")]

"""The two gather kernels' machine code, compiled on this CPU host for sm_90 / sm_80, and
their transposed weight layout:

- K loops keep copies in flight where a step's addresses come from an index list:
  channel_gather_matmul with an input-channel list looks the list up one step ahead,
  gather_matmul with K > 1 taps reads every tap's rows before the loop (looked up in the
  step that uses them, each step waited for all its copies: `cp.async.wait_group 0`);
- `transposed_w` ((N, K) weights) computes the same in interpret mode, and gives 16-byte
  weight copies on sm_90 where the (K, N) layout needs 4-byte ones (float32's TF32
  wgmma reads only K-major tiles; an output-channel list is contiguous only per group).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laud_jax.gpu_check import cuda_build, report
from pallas_kernels.channel_gather_matmul import channel_gather_matmul
from pallas_kernels.gather_matmul import gather_matmul

S = jax.ShapeDtypeStruct
I32 = jnp.int32
CP_ASYNC = re.compile(r"cp\.async\.\w+\.shared\.global(?:\.L2::\w+)? \[[^]]*\], \[[^]]*\], (\w+)[,;]")


def cp_async_sizes(ptx: str) -> dict[int, int]:
    """How many `cp.async` copies of each width (bytes) the PTX issues."""
    sizes: dict[int, int] = {}
    for size in CP_ASYNC.findall(ptx):
        sizes[int(size, 0)] = sizes.get(int(size, 0), 0) + 1
    return sizes


def test_cp_async_sizes_reads_ptx():
    ptx = (
        "\tcp.async.cg.shared.global [ %r1 + 0 ], [ %rd2 + 0 ], 0x10, %r3;\n"
        "\tcp.async.ca.shared.global [ %r4 + 0 ], [ %rd5 + 0 ], 0x4, %r6;\n"
        "\tcp.async.ca.shared.global [ %r7 + 128 ], [ %rd8 + 4 ], 0x4, %r9;\n"
        "\tcp.async.commit_group;\n"
    )
    assert cp_async_sizes(ptx) == {16: 1, 4: 2}


@pytest.mark.parametrize("arch", [90, 80])
def test_nine_taps_keep_copies_in_flight(arch):
    """A 3x3 conv by index (9 taps, Cin 64): 9 x 2 K steps split over 3 CTAs. The taps'
    source rows are read once, before the K loop: `cp.async.wait_group 2` (3 stages) in
    the PTX main loop. Read inside the loop (the kernel before), each step waited for all
    its copies (`wait_group 0`, 3 barriers per step)."""
    args = (S((8 * 3136, 64), jnp.bfloat16), S((4096, 9), I32), S((576, 64), jnp.bfloat16), S((64,), jnp.float32))
    [kernel] = cuda_build.triton_kernels(cuda_build.lower_for_cuda(gather_matmul, *args, arch=arch))
    assert kernel.grid == (64, 1, 3)
    compiled = cuda_build.compile_kernel(kernel, arch)
    assert report.ptx_loop_trips(compiled.ptx) == 6
    loop = report.ptx_main_loop(compiled.ptx)
    assert loop.wait_depth == kernel.num_stages - 1 >= 1, f"sm_{arch}: wait_group {loop.wait_depth}"
    assert loop.barriers <= 3


def _inputs(rng, rows, taps, cin, cout, n, dtype):
    ids = rng.integers(-2, rows + 3, (n, taps)).astype(np.int32)  # some outside [0, rows): zeros
    src = jnp.asarray(rng.standard_normal((rows, cin)), dtype)
    w = jnp.asarray(rng.standard_normal((taps * cin, cout)) * (taps * cin) ** -0.5, dtype)
    b = jnp.asarray(rng.standard_normal(cout), jnp.float32)
    return src, jnp.asarray(ids), w, b


@pytest.mark.parametrize(
    "rows, taps, cin, cout, n, dtype, split",
    [
        (50, 1, 24, 40, 64, jnp.float32, None),
        (40, 9, 16, 24, 33, jnp.float32, 3),
        (70, 1, 64, 32, 100, jnp.bfloat16, None),
        (30, 9, 8, 20, 16, jnp.bfloat16, None),
    ],
)
def test_gather_transposed_weights_compute_the_same(rows, taps, cin, cout, n, dtype, split):
    """transposed_w=True on w.T == the reference on w (and the default layout)."""
    src, ids, w, b = _inputs(np.random.default_rng(rows), rows, taps, cin, cout, n, dtype)
    expected = gather_matmul(src, ids, w, b, implementation="reference")
    plain = gather_matmul(src, ids, w, b, split_k=split, implementation="interpret")
    transposed = gather_matmul(src, ids, w.T, b, split_k=split, transposed_w=True, implementation="interpret")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(transposed, np.float32), np.asarray(expected, np.float32), **tol)
    np.testing.assert_allclose(np.asarray(transposed, np.float32), np.asarray(plain, np.float32), **tol)
    reference_t = gather_matmul(src, ids, w.T, b, transposed_w=True, implementation="reference")
    np.testing.assert_array_equal(np.asarray(reference_t), np.asarray(expected))


def test_transposed_weight_shape_is_checked():
    src, ids, w, b = _inputs(np.random.default_rng(0), 16, 1, 8, 24, 4, jnp.float32)
    with pytest.raises(ValueError, match=r"w.shape=\(8, 24\) has 24 columns, expected K \* C = 1 \* 8"):
        gather_matmul(src, ids, w, b, transposed_w=True, implementation="interpret")


def test_float32_weight_tile_is_copied_16_bytes_wide_on_sm90_when_transposed():
    """The engine's stage-3 first-block conv1 (6272 x 512 -> 256, batch 8) in float32 for
    sm_90. TF32 wgmma reads both operands K-major from shared memory; a (K, N) weight
    tile is N-major, so Triton copies it element by element into a transposed tile (the
    4-byte `cp.async` below). Stored (N, K), the tile is K-major in memory: every copy is
    16 bytes wide, and the MMA still runs on the TF32 tensor cores."""
    src, taps = S((8 * 784, 512), jnp.float32), S((6272, 1), I32)
    bias = S((256,), jnp.float32)

    def compiled(transposed):
        w = S((256, 512) if transposed else (512, 256), jnp.float32)

        def fn(s, t, w, b):
            return gather_matmul(s, t, w, b, transposed_w=transposed)

        [kernel] = cuda_build.triton_kernels(cuda_build.lower_for_cuda(fn, src, taps, w, bias, arch=90))
        return kernel, cuda_build.compile_kernel(kernel, 90)

    _, plain = compiled(False)
    kernel, transposed = compiled(True)
    assert cp_async_sizes(plain.ptx).get(4, 0) > 0, "the (K, N) layout no longer needs 4-byte copies"
    assert set(cp_async_sizes(transposed.ptx)) == {16}, cp_async_sizes(transposed.ptx)
    measured = report.measure(kernel, 90)
    assert measured.mma.startswith("HGMMA") and "TF32" in measured.mma
    assert (measured.spill_bytes, measured.wait_depth) == (0, 2)


# ---- channel_gather_matmul ----


def _sass(compiled: cuda_build.CompiledKernel) -> str:
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.cubin)
        return subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "-sass", cubin], capture_output=True, text=True, check=True
        ).stdout


def _engine_launch(where: str, batch: int, dtype: str) -> report.Launch:
    [launch] = [
        launch
        for launch in report.engine_launches(["resnet50"], [batch], [dtype], [2])
        if launch.kernel == "channel_gather_matmul" and launch.where == where
    ]
    return launch


def _full_x_in_list(x, w, b, groups, count):
    """An input-channel list on a full-width x: the listed columns of x are gathered too."""
    return channel_gather_matmul(x, w, b, group_size=2, in_groups=groups, in_count=count)


# (name, fn, args, grid, K steps per CTA): conv3 of a channel-skipping bottleneck as the
# build report launches it (compact x, input-channel list), once whole and once split
# over CTAs, and an input list on a full-width x.
CONV3_STAGE3 = _engine_launch("stage3 conv3", 8, "bfloat16")
CONV3_STAGE4_SPLIT = _engine_launch("stage4 conv3", 1, "float32")
IN_LIST_CASES = {
    "stage3-conv3-b8-bf16": (CONV3_STAGE3.fn, CONV3_STAGE3.args, (4, 16, 8), 8),
    "stage4-conv3-b1-f32-split": (CONV3_STAGE4_SPLIT.fn, CONV3_STAGE4_SPLIT.args, (1, 32, 4), 4),
    "full-x-f32": (
        _full_x_in_list,
        (
            S((8, 784, 256), jnp.float32),
            S((256, 128), jnp.float32),
            S((128,), jnp.float32),
            S((8, 128), jnp.int32),
            S((8,), jnp.int32),
        ),
        (13, 2, 8),
        8,
    ),
}


def test_in_list_cases_are_the_report_launches():
    assert (CONV3_STAGE3.split_k, CONV3_STAGE3.k_steps) == (1, 8)
    assert (CONV3_STAGE4_SPLIT.split_k, CONV3_STAGE4_SPLIT.k_steps) == (4, 4)


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("name", list(IN_LIST_CASES))
def test_input_channel_list_keeps_copies_in_flight(name, arch):
    """`cp.async.wait_group num_stages - 1` (2 with 3 stages) in the PTX main loop, at
    most 3 barriers per step, and on sm_90 `DEPBAR.LE SB0, 0x2` in the SASS. Looked up in
    the step that uses it (the kernel before), the list made every step wait for all its
    copies: `wait_group 0`, 3 barriers per step."""
    fn, args, grid, k_steps = IN_LIST_CASES[name]
    [kernel] = cuda_build.triton_kernels(cuda_build.lower_for_cuda(fn, *args, arch=arch))
    assert kernel.grid == grid
    compiled = cuda_build.compile_kernel(kernel, arch)
    loop = report.ptx_main_loop(compiled.ptx)
    assert loop is not None, f"{name} sm_{arch}: no K loop in the PTX ({k_steps} steps expected)"
    assert loop.wait_depth == kernel.num_stages - 1 >= 1, f"{name} sm_{arch}: wait_group {loop.wait_depth}"
    assert loop.barriers <= 3, f"{name} sm_{arch}: {loop.barriers} barriers per step"
    if arch == 90:
        assert "DEPBAR.LE SB0, 0x2" in _sass(compiled)


def _groups(rng, batch, total, count):
    return (
        jnp.asarray(np.stack([rng.permutation(total) for _ in range(batch)]).astype(np.int32)),
        jnp.asarray(np.array([count - s % 2 for s in range(batch)], np.int32)),  # counts differ
    )


@pytest.mark.parametrize(
    "mode, k, n, g, dtype, split",
    [
        ("out", 32, 48, 4, jnp.float32, None),
        ("in", 48, 40, 8, jnp.bfloat16, None),
        ("compact", 64, 24, 4, jnp.float32, 2),
        ("both", 24, 36, 2, jnp.float32, None),
        ("dense", 64, 20, 1, jnp.bfloat16, 2),
    ],
)
def test_channel_transposed_weights_compute_the_same(mode, k, n, g, dtype, split):
    """transposed_w=True on w.T == the reference on w, for every list mode."""
    rng = np.random.default_rng(k + n)
    batch, m = 3, 20
    kwargs = dict(group_size=g, split_k=split)
    if mode in ("in", "compact", "both"):
        kwargs["in_groups"], kwargs["in_count"] = _groups(rng, batch, k // g, k // g // 2 + 1)
        kwargs["x_compact"] = mode == "compact"
    if mode in ("out", "both"):
        kwargs["out_groups"], kwargs["out_count"] = _groups(rng, batch, n // g, n // g // 2 + 1)
    x = jnp.asarray(rng.standard_normal((batch, m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)) * k**-0.5, dtype)
    b = jnp.asarray(rng.standard_normal(n), jnp.float32)
    reference = {key: v for key, v in kwargs.items() if key != "split_k"}
    expected = channel_gather_matmul(x, w, b, **reference, implementation="reference")
    actual = channel_gather_matmul(x, w.T, b, **kwargs, transposed_w=True, implementation="interpret")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), **tol)
    reference_t = channel_gather_matmul(x, w.T, b, **reference, transposed_w=True, implementation="reference")
    np.testing.assert_array_equal(np.asarray(reference_t), np.asarray(expected))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_list_weight_tile_is_copied_16_bytes_wide_on_sm90_when_transposed(dtype):
    """Channel conv1 (output-channel list) as the build report launches it (stage-3 first
    block, batch 8). In the (K, N) layout the weight tile's columns are the listed
    channels, contiguous only within a group (2 channels: 4-byte copies in bf16), and
    float32's TF32 wgmma needs a K-major tile besides (4-byte copies). Stored (N, K), the
    listed channels pick whole rows and each row's K positions are contiguous: every
    copy of the tile is 16 bytes wide."""
    [launch] = [
        launch
        for launch in report.engine_launches(["resnet50"], [8], [dtype], [2])
        if launch.kernel == "channel_gather_matmul" and launch.where == "stage3.first conv1"
    ]
    x, w, b, groups, count = launch.args

    def transposed(x, w_t, b, groups, count):
        return channel_gather_matmul(
            x, w_t, b, group_size=2, out_groups=groups, out_count=count, tiles=launch.tiles, transposed_w=True
        )

    [plain] = cuda_build.compile_for_cuda(launch.fn, *launch.args, arch=90)
    w_t = S(w.shape[::-1], w.dtype)
    [kernel] = cuda_build.triton_kernels(cuda_build.lower_for_cuda(transposed, x, w_t, b, groups, count, arch=90))
    compiled = cuda_build.compile_kernel(kernel, 90)
    assert cp_async_sizes(plain.ptx).get(4, 0) > 0, "the (K, N) layout no longer needs 4-byte copies"
    assert set(cp_async_sizes(compiled.ptx)) == {16}, cp_async_sizes(compiled.ptx)
    measured = report.measure(kernel, 90)
    assert measured.mma.startswith("HGMMA") and measured.spill_bytes == 0 and measured.wait_depth == 2

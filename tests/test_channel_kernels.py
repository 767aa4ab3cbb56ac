"""The channel kernel's machine code (compiled on this CPU host for sm_90 / sm_80): with an
input-channel list its K loop keeps copies in flight (the list is looked up one step
ahead, so no load of a step waits on a load of the same step)."""

from __future__ import annotations

import os
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import pytest

from laud_jax.gpu_check import cuda_build, report
from pallas_kernels.channel_gather_matmul import channel_gather_matmul

S = jax.ShapeDtypeStruct


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

"""Every kernel lowers for CUDA on this CPU host (abstract H100 / A100 device), and the
Triton module it produces is accepted by Triton's verifier and compiler, so a shape the
GPU toolchain rejects fails here rather than on a user's GPU."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from laud_jax.gpu_check import cuda_build, report
from pallas_kernels.channel_gather_matmul import channel_gather_matmul
from pallas_kernels.conv1x1_scatter_add import conv1x1_scatter_add
from pallas_kernels.gather_matmul import gather_matmul
from pallas_kernels.patch_conv import patch_conv

S = jax.ShapeDtypeStruct
I32 = jnp.int32
F32 = jnp.float32
BF16 = jnp.bfloat16


def _scatter(batch, hw, cin, cout, size, capacity, dtype, base=False):
    args = (
        S((capacity, size, size, cin), dtype),
        S((capacity,), I32),
        S((), I32),
        S((cin, cout), dtype),
        S((cout,), F32),
        S((batch, hw, hw, cout), dtype),
    )
    if not base:
        return conv1x1_scatter_add, args
    return (lambda *a: conv1x1_scatter_add(*a[:-1], base=a[-1])), (*args, args[-1])


def _gather_matmul(rows, taps, cin, cout, n, dtype):
    return gather_matmul, (S((rows, cin), dtype), S((n, taps), I32), S((taps * cin, cout), dtype), S((cout,), F32))


def _patch_conv(batch, hw, cin, cout, size, stride, patches, dtype, whole_map=False):
    height, width = (hw, hw) if isinstance(hw, int) else hw
    pixels = batch * height * width
    fn = functools.partial(patch_conv, grid=(batch, height, width), size=size, stride=stride)
    if whole_map:  # conv1 ran everywhere: no row map
        return (lambda rows, starts, w, b: fn(rows, None, starts, w, b)), (
            S((pixels, cin), dtype),
            S((patches, 3), I32),
            S((3, 3, cin, cout), dtype),
            S((cout,), F32),
        )
    return fn, (
        S((pixels, cin), dtype),
        S((pixels,), I32),  # row map: one int32 per pixel of the map
        S((patches, 3), I32),
        S((3, 3, cin, cout), dtype),
        S((cout,), F32),
    )


def _channels(batch, m, k, n, group, mode, dtype):
    gi, go = k // group, n // group
    arrays = [S((batch, m, k), dtype), S((k, n), dtype), S((n,), F32)]
    if mode == "dense":
        return functools.partial(channel_gather_matmul, group_size=group), tuple(arrays)

    def fn(x, w, b, groups, count):
        kwargs = (
            {"in_groups": groups, "in_count": count} if mode == "in" else {"out_groups": groups, "out_count": count}
        )
        return channel_gather_matmul(x, w, b, group_size=group, **kwargs)

    groups = gi if mode == "in" else go
    return fn, (*arrays, S((batch, groups), I32), S((batch,), I32))


CASES = {
    # ResNet-50-like shapes and odd ones (channels not powers of two, S = 7, partial
    # patches, a non-square map)
    "scatter-S1-f32": _scatter(8, 56, 64, 256, 1, 8192, F32),
    "scatter-S7-bf16": _scatter(1, 7, 512, 2048, 7, 1, BF16),
    "scatter-S4-odd-f32": _scatter(2, 13, 24, 40, 4, 16, F32),
    "scatter-base-S2-bf16": _scatter(8, 28, 128, 512, 2, 1568, BF16, base=True),
    "gather-matmul-1tap-bf16": _gather_matmul(25088, 1, 256, 64, 25088, BF16),
    "gather-matmul-r50-f32": _gather_matmul(25088, 1, 256, 64, 4096, F32),
    "gather-matmul-odd-bf16": _gather_matmul(784, 1, 24, 40, 100, BF16),
    "gather-matmul-9tap-f32": _gather_matmul(3136, 9, 64, 64, 4096, F32),
    "patch-conv-S1-s1-bf16": _patch_conv(1, 56, 64, 64, 1, 1, 2048, BF16),
    "patch-conv-S2-s2-f32": _patch_conv(4, 56, 128, 128, 2, 2, 784, F32),
    "patch-conv-S4-s1-bf16": _patch_conv(1, 28, 128, 128, 4, 1, 32, BF16),
    "patch-conv-S7-s1-f32": _patch_conv(2, 14, 256, 256, 7, 1, 8, F32),
    "patch-conv-S7-s1-bf16": _patch_conv(1, 14, 256, 256, 7, 1, 4, BF16),
    "patch-conv-S8-s2-odd-bf16": _patch_conv(1, (27, 17), 40, 104, 8, 2, 4, BF16),
    "patch-conv-whole-map-f32": _patch_conv(2, 28, 128, 128, 4, 1, 98, F32, whole_map=True),
    "channels-dense-bf16": _channels(1, 3136, 256, 64, 2, "dense", BF16),
    "channels-in-f32": _channels(8, 784, 128, 512, 2, "in", F32),
    "channels-out-bf16": _channels(2, 49, 2048, 440, 8, "out", BF16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_lowers_for_h100_and_verifies(name):
    fn, args = CASES[name]
    kernels = cuda_build.triton_kernels(cuda_build.lower_for_cuda(fn, *args, arch=90))
    assert len(kernels) == 1, f"{name}: expected one Triton kernel, found {len(kernels)}"
    assert all(g >= 1 for g in kernels[0].grid), f"{name}: empty grid {kernels[0].grid}"
    assert "tt.dot" in kernels[0].ttir, f"{name}: no tt.dot in the Triton module"


@pytest.mark.parametrize(
    "name, arch",
    [
        ("gather-matmul-odd-bf16", 80),
        ("patch-conv-S7-s1-f32", 90),
        ("patch-conv-S8-s2-odd-bf16", 80),
        ("scatter-S4-odd-f32", 90),
        ("channels-out-bf16", 90),
        ("patch-conv-S7-s1-bf16", 80),
        ("gather-matmul-9tap-f32", 90),
    ],
)
def test_odd_shapes_compile_to_cubin(name, arch):
    fn, args = CASES[name]
    [compiled] = cuda_build.compile_for_cuda(fn, *args, arch=arch)
    assert compiled.cubin[:4] == b"\x7fELF", f"{name}: sm_{arch} compile gave no cubin"


def test_lowers_inside_shard_map_with_vma_checks():
    """A kernel inside jax.shard_map (check_vma on) lowers for CUDA."""
    fn, args = CASES["channels-in-f32"]
    with cuda_build.abstract_gpu(90):
        mesh = jax.sharding.get_abstract_mesh()
        specs = (jax.P("gpu"), jax.P(), jax.P(), jax.P("gpu"), jax.P("gpu"))
        placed = [S(a.shape, a.dtype, sharding=jax.NamedSharding(mesh, spec)) for a, spec in zip(args, specs)]
        sharded = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=jax.P("gpu"))
        lowered = jax.jit(sharded).trace(*placed).lower(lowering_platforms=("cuda",))
    assert len(cuda_build.triton_kernels(lowered)) == 1


def _dot_accumulates_in_loop(ttir: str) -> bool:
    """The K loop's tt.dot takes the loop-carried accumulator as its third operand."""
    loop = re.search(r"scf\.for .*iter_args\((%\w+) = ", ttir)
    dot = re.search(r"tt\.dot %\w+, %\w+, (%\w+)", ttir)
    return bool(loop and dot and dot.group(1) == loop.group(1))


def test_compiles_what_xla_compiles_the_accumulator_add_folds_into_the_dot():
    """Pallas emits acc + dot(a, b) in the K loop; Triton's ttir passes (which XLA runs and
    `triton.compile` skips for a .ttir file) fold the add into tt.dot. compile_kernel must
    run them: the PTX main loop then accumulates in the MMA, with no float add per step."""
    fn, args = CASES["gather-matmul-1tap-bf16"]
    [kernel] = cuda_build.triton_kernels(cuda_build.lower_for_cuda(fn, *args, arch=90))
    assert not _dot_accumulates_in_loop(kernel.ttir)
    assert _dot_accumulates_in_loop(cuda_build.ttir_passes(kernel.ttir, 90, kernel.num_warps, kernel.num_stages))
    lines, first, last = report.ptx_loop(cuda_build.compile_kernel(kernel, 90).ptx)
    body = lines[first : last + 1]
    assert any(line.startswith("wgmma.mma_async") for line in body)
    assert not [line for line in body if line.startswith("add.f32")], "accumulator added outside the MMA"

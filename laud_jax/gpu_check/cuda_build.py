"""Lower the Pallas kernels for CUDA on a CPU-only host and compile them to GPU code.

Route (JAX 0.12, triton 3.9): a jitted call is traced under an abstract mesh whose
AbstractDevice is an NVIDIA GPU, then lowered with `lowering_platforms=('cuda',)`. The
Pallas Triton lowering runs for real and embeds each kernel as a Triton-dialect module
(MLIR bytecode) in a `__gpu$xla.gpu.triton` custom call. `triton_kernels` extracts those
modules with their launch parameters; `compile_kernel` runs Triton's first-stage (ttir)
passes on the module, as XLA does, then hands it to the `triton` package, which compiles
it for a `GPUTarget` to PTX and a cubin with the ptxas it ships. (XLA compiles the same
module with its own bundled Triton on a real GPU, so the cubin here is a faithful proxy,
not byte-identical.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"
DEVICE_KINDS = {90: H100, 80: A100}
NUM_SMS = {90: 132, 80: 108}
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


@contextlib.contextmanager
def abstract_gpu(arch: int = 90) -> Iterator[None]:
    """Make an abstract CUDA GPU of compute capability `arch` the lowering target."""
    if arch not in DEVICE_KINDS:
        raise ValueError(f"arch={arch}: supported compute capabilities are {sorted(DEVICE_KINDS)}.")
    device = jax.sharding.AbstractDevice(device_kind=DEVICE_KINDS[arch], num_cores=NUM_SMS[arch], platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=device)
    with warnings.catch_warnings():
        # The Pallas Triton backend warns that it is deprecated (see docs/kernels.md).
        warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
        with jax.sharding.use_abstract_mesh(mesh):
            yield


def lower_for_cuda(fn: Callable[..., Any], *args: Any, arch: int = 90) -> jax.stages.Lowered:
    """jit(fn) lowered for CUDA on this host; args may be arrays or ShapeDtypeStructs."""
    with abstract_gpu(arch):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One Triton kernel found in a lowered module, with its launch parameters."""

    name: str
    ttir: str  # Triton-dialect MLIR text
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


def _walk(op: Any) -> Iterator[Any]:
    op = op.operation if hasattr(op, "operation") else op
    yield op
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield from _walk(child)


def triton_kernels(lowered: jax.stages.Lowered) -> list[TritonKernel]:
    """Every Pallas Triton kernel in `lowered` (in program order)."""
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering as triton_lowering

    module = lowered.compiler_ir("stablehlo")
    found = []
    for op in _walk(module.operation):
        if op.name != "stablehlo.custom_call":
            continue
        if ir.StringAttr(op.attributes["call_target_name"]).value != TRITON_CUSTOM_CALL:
            continue
        config = ir.DictAttr(op.attributes["mhlo.backend_config"])
        bytecode = ir.StringAttr(config["ir"]).value_bytes
        with triton_lowering._new_ir_context():
            ttir = ir.Module.parse(bytecode).operation.get_asm(enable_debug_info=False)

        def as_int(key: str, config: ir.DictAttr = config) -> int:
            return ir.IntegerAttr(config[key]).value

        found.append(
            TritonKernel(
                name=ir.StringAttr(config["name"]).value,
                ttir=ttir,
                num_warps=as_int("num_warps"),
                num_stages=as_int("num_stages"),
                grid=(as_int("grid_x"), as_int("grid_y"), as_int("grid_z")),
            )
        )
    return found


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    """A kernel compiled by the triton package for one GPU target."""

    name: str
    arch: int
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]
    shared_bytes: int  # dynamic shared memory Triton allocates at launch
    ptx: str
    cubin: bytes


def ttir_passes(ttir: str, arch: int, num_warps: int, num_stages: int) -> str:
    """`ttir` after the passes of Triton's ttir stage for sm_<arch> (inlining, canonicalization,
    combining an add of the accumulator into `tt.dot`, CSE, ...).

    `triton.compile` skips the passes of the stage a file's IR belongs to, so a module
    handed over as a `.ttir` file would otherwise reach the GPU stages unoptimized; XLA
    runs them. The stage function is the one `triton.compile` itself calls.
    """
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget, Language
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    stages: dict[str, Callable[[Any, dict[str, Any]], Any]] = {}
    backend.add_stages(stages, options, Language.TRITON)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        module = ir.parse_mlir_module(path, context)
    module.context = context  # the stage's pass manager reads it (as triton.compile sets it)
    return str(stages["ttir"](module, {}))


def compile_kernel(kernel: TritonKernel, arch: int = 90) -> CompiledKernel:
    """Compile a Triton-dialect module to PTX and cubin for sm_<arch> (no GPU needed),
    through the whole Triton pipeline (see `ttir_passes`)."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, silenced
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{kernel.name}.ttir")
        with open(path, "w") as f:
            f.write(ttir_passes(kernel.ttir, arch, kernel.num_warps, kernel.num_stages))
        compiled = triton.compile(
            path,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": kernel.num_warps, "num_stages": kernel.num_stages},
        )
    return CompiledKernel(
        name=kernel.name,
        arch=arch,
        num_warps=kernel.num_warps,
        num_stages=kernel.num_stages,
        grid=kernel.grid,
        shared_bytes=int(compiled.metadata.shared),
        ptx=compiled.asm["ptx"],
        cubin=compiled.asm["cubin"],
    )


def compile_for_cuda(fn: Callable[..., Any], *args: Any, arch: int = 90) -> list[CompiledKernel]:
    """Lower jit(fn)(*args) for sm_<arch> and compile every Pallas kernel in it."""
    return [compile_kernel(k, arch) for k in triton_kernels(lower_for_cuda(fn, *args, arch=arch))]

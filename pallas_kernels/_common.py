"""Shared pieces of the Pallas kernels: tile configuration, implementation choice,
argument checks and the masked gather/scatter helpers used inside kernels.

Every kernel addresses its operands as flat 1-D buffers through computed element
offsets (Triton style) with masked loads and stores, so padding slots never write.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Implementation = Literal["pallas", "interpret", "reference"]
IMPLEMENTATIONS: tuple[str, ...] = ("pallas", "interpret", "reference")
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
MIN_DOT_DIM = 16  # Triton's tl.dot wants every tile dimension >= 16.
INT32_LIMIT = 2**31 - 1


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _is_power_of_2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile sizes and Triton launch parameters of one kernel launch.

    block_m: output rows (pixels) per program; block_n: output channels per program;
    block_k: reduction channels per step. All powers of two >= 16 (Triton's dot needs
    M, N, K >= 16 and power-of-two block shapes); channel counts that are not powers of
    two are handled by masking the last tile, never by padding the arrays.
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for field in ("block_m", "block_n", "block_k"):
            value = getattr(self, field)
            if not isinstance(value, int) or not _is_power_of_2(value) or value < MIN_DOT_DIM:
                raise ValueError(
                    f"TileConfig.{field}={value!r}: must be a power of two >= {MIN_DOT_DIM} "
                    "(Triton block shapes are powers of two and tl.dot needs M, N, K >= 16)."
                )
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"TileConfig.num_warps={self.num_warps!r}: must be 1, 2, 4, 8 or 16.")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"TileConfig.num_stages={self.num_stages!r}: must be an int >= 1.")


def channel_tile(channels: int, cap: int) -> int:
    """Power-of-two tile for a channel dimension: covers `channels`, within [16, cap]."""
    return max(MIN_DOT_DIM, min(cap, next_power_of_2(channels)))


def tuned_tiles(k: int, n: int) -> TileConfig:
    """The default of every kernel, picked with `python -m laud_jax.gpu_check.report --tune`
    (docs/gpu_build_report.md): 64-row tiles (one Hopper warpgroup MMA per 4 warps), up to
    64 output and 32 reduction channels, 8 warps, 3 pipeline stages. No spills on sm_80 /
    sm_90 in float32 and bfloat16, HGMMA on sm_90, 24-40 resident warps per SM."""
    return TileConfig(
        block_m=64,
        block_n=channel_tile(n, 64),
        block_k=channel_tile(k, 32),
        num_warps=8,
        num_stages=3,
    )


TARGET_CTAS = 132  # one wave of CTAs on an H100 (132 SMs; an A100 has 108)
MAX_SPLIT_STEPS = 16  # K steps a split CTA runs at most, where splitting allows it
MIN_SPLIT_STEPS = 4  # K steps a split CTA keeps at least (a 3-stage pipeline's worth)


def split_k(tiles: int, k_steps: int) -> int:
    """How many CTAs share one output tile's K loop (split-K), for `tiles` output tiles
    of `k_steps` K steps each: 1 when the tiles fill a wave of TARGET_CTAS; otherwise
    the smallest divisor of k_steps that fills one with at most MAX_SPLIT_STEPS steps per
    CTA, or failing that the largest divisor, always keeping >= MIN_SPLIT_STEPS steps."""
    if tiles >= TARGET_CTAS:
        return 1
    allowed = [d for d in range(1, k_steps + 1) if k_steps % d == 0 and k_steps // d >= MIN_SPLIT_STEPS]
    for d in allowed:
        if tiles * d >= TARGET_CTAS and k_steps // d <= MAX_SPLIT_STEPS:
            return d
    return allowed[-1] if allowed else 1


def choose_split(
    kernel: str, tiles: TileConfig, rows: int, cols: int, k_steps: int, requested: int | None = None, batches: int = 1
) -> int:
    """Split-K parts of a launch of cdiv(rows, block_m) x cdiv(cols, block_n) output tiles
    (times `batches`) of `k_steps` K steps each: `split_k`'s choice, or `requested`, checked."""
    if requested is None:
        n_tiles = pl.cdiv(rows, tiles.block_m) * pl.cdiv(cols, tiles.block_n) * batches
        return split_k(n_tiles, k_steps)
    if not isinstance(requested, int) or requested < 1 or k_steps % requested:
        raise ValueError(f"{kernel}: split_k={requested!r}; must be an int >= 1 dividing the {k_steps} K steps.")
    return requested


def reduce_split(partials: jax.Array, relu: bool, dtype: Any) -> jax.Array:
    """act(sum of the split-K partial sums (split, ...)) in `dtype` (one XLA fusion)."""
    y = jnp.sum(partials, axis=0)
    return (jnp.maximum(y, 0.0) if relu else y).astype(dtype)


def gpu_is_target() -> bool:
    """True when a CUDA/ROCm GPU is the default device or the abstract lowering target."""
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    if abstract is not None:
        return abstract.platform in ("gpu", "cuda", "rocm")
    return jax.default_backend() == "gpu"


def check_implementation(kernel: str, implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{kernel}: implementation={implementation!r}; choose one of {IMPLEMENTATIONS}.")
    if implementation == "pallas" and not gpu_is_target():
        raise ValueError(
            f"{kernel}: implementation='pallas' compiles a Triton GPU kernel, but the default "
            f"backend is {jax.default_backend()!r} and no abstract GPU device is set. Use "
            "implementation='interpret' on CPU (slow, for correctness) or 'reference'."
        )


def check_dtype(kernel: str, name: str, array: jax.Array, dtype: Any | None = None) -> None:
    if dtype is None:
        if array.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{kernel}: {name}.dtype={array.dtype}; supported: float32, bfloat16.")
    elif array.dtype != jnp.dtype(dtype):
        raise TypeError(f"{kernel}: {name}.dtype={array.dtype}, expected {jnp.dtype(dtype)}.")


def check_ndim(kernel: str, name: str, array: jax.Array, ndim: int, layout: str) -> None:
    if array.ndim != ndim:
        raise ValueError(f"{kernel}: {name} must be {ndim}-D {layout}, got shape {array.shape}.")


def check_shape(kernel: str, name: str, array: jax.Array, expected: Sequence[int]) -> None:
    if tuple(array.shape) != tuple(expected):
        raise ValueError(f"{kernel}: {name}.shape={tuple(array.shape)}, expected {tuple(expected)}.")


def check_addressable(kernel: str, name: str, array: jax.Array) -> None:
    """Kernels use int32 element offsets: every buffer must hold < 2**31 elements."""
    if array.size >= INT32_LIMIT:
        raise ValueError(
            f"{kernel}: {name} has {array.size} elements (shape {array.shape}); the kernels "
            f"address buffers with int32 offsets, so split the batch to stay below {INT32_LIMIT}."
        )


def check_index_list(kernel: str, name: str, indices: jax.Array) -> None:
    check_ndim(kernel, name, indices, 1, "(capacity,) index list")
    if indices.dtype != jnp.int32:
        raise TypeError(f"{kernel}: {name}.dtype={indices.dtype}, expected int32.")


def as_count(kernel: str, name: str, count: jax.Array | int, shape: tuple[int, ...] = ()) -> jax.Array:
    """A valid-entry count (python int or int array of `shape`) as an int32 array."""
    count = jnp.asarray(count)
    if not jnp.issubdtype(count.dtype, jnp.integer):
        raise TypeError(f"{kernel}: {name}.dtype={count.dtype}, expected an integer count.")
    if count.shape != shape:
        raise ValueError(f"{kernel}: {name}.shape={count.shape}, expected {shape}.")
    return count.astype(jnp.int32)


def pallas_call(
    kernel: Callable[..., None],
    operands: Sequence[jax.Array],
    *,
    name: str,
    grid: tuple[int, ...],
    out_shape: tuple[tuple[int, ...], Any],
    tiles: TileConfig,
    implementation: str,
    input_output_aliases: dict[int, int] | None = None,
) -> jax.Array:
    """Run `kernel` on whole (flat) buffers: compiled by Triton or interpreted on CPU.

    Inside `jax.shard_map` the output varies over the mesh axes its operands vary over.
    """
    if min(grid) < 1:
        raise AssertionError(f"{name}: refusing to launch an empty grid {grid}.")
    if implementation == "interpret":
        extra: dict[str, Any] = {"interpret": True}
    else:
        extra = {"compiler_params": plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)}
    varying = frozenset().union(*(jax.typeof(op).manual_axis_type.varying for op in operands))
    # Replicated operands (weights) are marked varying like the rest (a no-op at run time).
    operands = [
        jax.lax.pcast(op, tuple(sorted(varying - jax.typeof(op).manual_axis_type.varying)), to="varying")
        for op in operands
    ]
    shape, dtype = out_shape
    result = jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying))
    call = pl.pallas_call(
        kernel,
        out_shape=result,
        grid=grid,
        input_output_aliases=input_output_aliases or {},
        name=name,
        **extra,
    )
    return call(*operands)


# ---- helpers used inside kernel bodies ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Memory:
    """Masked gathers and scatters on flat refs, for the GPU or the CPU interpreter.

    On the GPU masked lanes are never dereferenced, so offsets are used as computed
    (keeping Triton's contiguity analysis, i.e. vectorized accesses). The interpreter
    turns a masked store into a scatter that writes the old value back at masked lanes,
    which could race with a real write to the same address: there masked stores are
    sent one past the end, where the scatter drops them. (Its gathers clamp or wrap any
    address, and masked lanes are replaced by 0.)
    """

    interpret: bool

    def load(self, ref: Any, offsets: jax.Array, mask: jax.Array) -> jax.Array:
        """Masked gather; masked lanes read as 0."""
        return plgpu.load(ref.at[offsets], mask=mask, other=0)

    def store(self, ref: Any, offsets: jax.Array, value: jax.Array, mask: jax.Array) -> None:
        """Masked scatter; masked lanes write nothing."""
        if self.interpret:
            offsets = jnp.where(mask, offsets, ref.shape[0])
        plgpu.store(ref.at[offsets], value.astype(ref.dtype), mask=mask)


def load_scalar(ref: Any) -> jax.Array:
    """The single element of a (1,) ref."""
    return ref[0]


def tile_range(program: jax.Array, block: int) -> jax.Array:
    """Indices covered by tile number `program` (a power-of-two range).

    Read `pl.program_id` at the top of the kernel body, outside `pl.when`: the CPU
    interpreter does not substitute program ids inside nested control flow.
    """
    return program * block + jnp.arange(block, dtype=jnp.int32)


def div(a: jax.Array, b: int | jax.Array) -> jax.Array:
    """a // b for non-negative ints (plain truncating division, no sign fix-ups)."""
    return jax.lax.div(a, jnp.asarray(b, a.dtype))


def rem(a: jax.Array, b: int | jax.Array) -> jax.Array:
    """a % b for non-negative ints."""
    return jax.lax.rem(a, jnp.asarray(b, a.dtype))


def patch_rows(
    mem: Memory,
    rows: jax.Array,
    count: jax.Array,
    idx_ref: Any,
    size: int,
    grid_h: int,
    grid_w: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Decode compact rows slot * S * S + y * S + x of the patch list into
    (slot is valid, image, output row, output column)."""
    slot = div(rows, size * size)
    within = rem(rows, size * size)
    slot_ok = slot < count
    patch = mem.load(idx_ref, slot, slot_ok)
    image = div(patch, grid_h * grid_w)
    cell = rem(patch, grid_h * grid_w)
    oy = div(cell, grid_w) * size + div(within, size)
    ox = rem(cell, grid_w) * size + rem(within, size)
    return slot_ok, image, oy, ox


def tap_matmul(
    mem: Memory,
    src_ref: Any,
    w_ref: Any,
    *,
    source: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    n_taps: int,
    cin: int,
    cout: int,
    cols: jax.Array,
    col_ok: jax.Array,
    tiles: TileConfig,
    split: tuple[jax.Array, int] = (0, 1),
    transposed_w: bool = False,
) -> jax.Array:
    """sum_t src[rows_t] @ w[t * cin : (t + 1) * cin, cols] for one (block_m, block_n) tile
    (`transposed_w`: w is stored transposed, (cout, n_taps * cin), the reduction along memory).

    `source(t)` gives the tile's source rows for tap t and which of them are valid
    (invalid rows read as 0). One pipelined loop runs over taps x channel chunks; with
    `split` = (part, parts) only over the part-th of `parts` equal ranges of its steps
    (the loop runs between those bounds: counting from 0 and adding the range's start,
    ptxas held some sm_80 conv2 launches to 64 registers and spilled).
    """
    bk = tiles.block_k
    k_steps = pl.cdiv(cin, bk)
    part, parts = split
    steps = n_taps * k_steps // parts

    def step(it, acc):
        tap = div(it, k_steps) if n_taps > 1 else 0
        ks = rem(it, k_steps) * bk + jnp.arange(bk, dtype=jnp.int32)
        k_ok = ks < cin
        rows, ok = source(tap)
        a = mem.load(src_ref, rows[:, None] * cin + ks[None, :], ok[:, None] & k_ok[None, :])
        w_rows = tap * cin + ks
        if transposed_w:
            w_offsets = cols[None, :] * (n_taps * cin) + w_rows[:, None]
        else:
            w_offsets = w_rows[:, None] * cout + cols[None, :]
        wt = mem.load(w_ref, w_offsets, k_ok[:, None] & col_ok[None, :])
        return acc + dot(a, wt)

    zeros = jnp.zeros((tiles.block_m, tiles.block_n), jnp.float32)
    return jax.lax.fori_loop(part * steps, part * steps + steps, step, zeros)


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """Tile matmul with float32 accumulation (tf32 tensor cores for float32 on GPU)."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32)

"""Pallas kernels in interpret mode on CPU against independent references.

One parameterized base class drives every kernel: random inputs (never zeros), index
lists whose padding slots hold real-looking ids or the engine's out-of-range sentinel,
outputs poisoned with NaN before the run where a kernel writes into a buffer, and
several densities per compiled shape (the count is a traced value, so one compile serves
densities 0, small, 0.5 and 1). Maps and mask grids are non-square where geometry
matters, so a height/width swap fails.
"""

from __future__ import annotations

import ast
import functools
import importlib
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laud_jax.sparse.routing import active_first
from pallas_kernels import TileConfig, _common
from pallas_kernels.channel_gather_matmul import channel_gather_matmul
from pallas_kernels.conv1x1_scatter_add import conv1x1_scatter_add
from pallas_kernels.gather_matmul import gather_matmul
from pallas_kernels.patch_conv import make_row_map, output_size, patch_conv

DENSITIES = (0.0, 0.1, 0.5, 1.0)
TOLERANCE = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}
KERNEL_DIR = pathlib.Path(__file__).resolve().parents[1] / "pallas_kernels"
KERNEL_MODULES = ("gather_matmul", "patch_conv", "conv1x1_scatter_add", "channel_gather_matmul")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = metafunc.cls.CASES
        metafunc.parametrize("case", cases, ids=[metafunc.cls.case_id(c) for c in cases])


def _hw(case: dict) -> tuple[int, int]:
    """(H, W) of a case's map: ``hw`` is one side (square) or an (H, W) pair."""
    hw = case["hw"]
    return (hw, hw) if isinstance(hw, int) else hw


def _normal(rng, shape, dtype, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def _index_list(rng, active: np.ndarray, capacity: int, total: int) -> jnp.ndarray:
    """Active ids first, then padding filled with random ids (which must be ignored)."""
    padding = rng.integers(0, total, capacity - active.size)
    return jnp.asarray(np.concatenate([active, padding]).astype(np.int32))


def _random_mask(rng, shape, density: float) -> np.ndarray:
    """A mask with round(density * size) True entries at random places."""
    size = int(np.prod(shape))
    flat = np.zeros(size, bool)
    flat[rng.permutation(size)[: int(round(density * size))]] = True
    return flat.reshape(shape)


def _assert_close(actual, expected, dtype, what):
    np.testing.assert_allclose(
        np.asarray(actual, np.float32),
        np.asarray(expected, np.float32),
        err_msg=what,
        **TOLERANCE[dtype],
    )


class KernelTestBase:
    """Subclasses define CASES, make(case, density, rng) -> inputs dict, run(inputs,
    implementation) and expected(inputs); the base runs them per density."""

    CASES: list[dict] = []

    @staticmethod
    def case_id(case: dict) -> str:
        def text(v):
            if isinstance(v, type):
                return v.__name__
            return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)

        return "-".join(f"{k}{text(v)}" for k, v in case.items())

    def make(self, case, density, rng):
        raise NotImplementedError

    def run(self, inputs, implementation):
        raise NotImplementedError

    def expected(self, inputs):
        raise NotImplementedError

    def interpret_jitted(self, inputs):
        """jit of the interpret-mode kernel; non-array inputs (S, stride, ...) are static."""
        static = {k: v for k, v in inputs.items() if not isinstance(v, jax.Array)}
        return jax.jit(lambda arrays: self.run({**arrays, **static}, "interpret"))

    def test_interpret_matches_reference(self, case):
        rng = np.random.default_rng(0)
        compiled = None
        for density in DENSITIES:
            inputs = self.make(case, density, rng)
            compiled = compiled or self.interpret_jitted(inputs)  # one compile per case
            actual = compiled({k: v for k, v in inputs.items() if isinstance(v, jax.Array)})
            expected = self.expected(inputs)
            # Unwritten outputs stay NaN in both; everything else must agree.
            np.testing.assert_array_equal(
                np.isnan(np.asarray(actual, np.float32)),
                np.isnan(np.asarray(expected, np.float32)),
                err_msg=f"written/unwritten elements differ at density {density}",
            )
            _assert_close(actual, expected, case["dtype"], f"values at density {density}")

    def test_reference_implementation_matches_expected(self, case):
        rng = np.random.default_rng(1)
        inputs = self.make(case, 0.5, rng)
        actual = self.run(inputs, "reference")
        _assert_close(actual, self.expected(inputs), case["dtype"], "reference implementation")


def _mask_grid(size: int, stride: int, patch_size: int) -> int:
    """Patches along one axis of a 3x3/stride conv's output grid (the last may be partial)."""
    return -(-output_size(size, stride) // patch_size)


class TestConv1x1ScatterAdd(KernelTestBase):
    CASES = [
        dict(batch=1, hw=8, cin=16, cout=16, S=1, dtype=jnp.float32),
        dict(batch=2, hw=8, cin=24, cout=16, S=2, dtype=jnp.bfloat16),
        dict(batch=2, hw=9, cin=16, cout=40, S=4, dtype=jnp.float32),
        dict(batch=1, hw=7, cin=16, cout=16, S=7, dtype=jnp.bfloat16),
        dict(batch=2, hw=12, cin=8, cout=24, S=8, dtype=jnp.float32),
        dict(batch=2, hw=8, cin=16, cout=16, S=2, dtype=jnp.float32, base=True),
        dict(batch=1, hw=14, cin=32, cout=24, S=7, dtype=jnp.bfloat16, base=True),
        # non-square maps and mask grids, partial border patches
        dict(batch=2, hw=(8, 14), cin=16, cout=16, S=4, dtype=jnp.float32),
        dict(batch=1, hw=(11, 6), cin=16, cout=24, S=2, dtype=jnp.float32, base=True),
    ]

    def make(self, case, density, rng):
        b, size, dtype = case["batch"], case["S"], case["dtype"]
        height, width = _hw(case)
        grid = (-(-height // size), -(-width // size))
        patches = _random_mask(rng, (b, *grid), density)
        capacity = b * grid[0] * grid[1]
        return dict(
            h=_normal(rng, (capacity, size, size, case["cin"]), dtype),
            patch_indices=_index_list(rng, np.flatnonzero(patches), capacity, capacity),
            patch_count=jnp.int32(patches.sum()),
            w=_normal(rng, (case["cin"], case["cout"]), dtype, case["cin"] ** -0.5),
            b=_normal(rng, (case["cout"],), jnp.float32),
            # The identity (or the base) is the output buffer: untouched pixels keep it exactly.
            identity=_normal(rng, (b, height, width, case["cout"]), dtype),
            **({"base": _normal(rng, (b, height, width, case["cout"]), dtype)} if case.get("base") else {}),
        )

    def run(self, inputs, implementation):
        return conv1x1_scatter_add(**inputs, implementation=implementation)

    def expected(self, inputs):
        identity = np.array(inputs["identity"], np.float32)
        size = inputs["h"].shape[1]
        grid_h, grid_w = -(-identity.shape[1] // size), -(-identity.shape[2] // size)
        h = np.asarray(inputs["h"], np.float32)
        w, bias = np.asarray(inputs["w"], np.float32), np.asarray(inputs["b"])
        out = np.array(inputs.get("base", identity), np.float32)
        for slot, patch in enumerate(np.asarray(inputs["patch_indices"])[: int(inputs["patch_count"])]):
            image, cell = divmod(int(patch), grid_h * grid_w)
            i, j = divmod(cell, grid_w)
            rows, cols = slice(i * size, (i + 1) * size), slice(j * size, (j + 1) * size)
            region = identity[image, rows, cols]
            branch = h[slot, : region.shape[0], : region.shape[1]] @ w + bias
            out[image, rows, cols] = np.maximum(region + branch, 0.0)
        return out

    def test_untouched_pixels_keep_base_bits(self, case):
        rng = np.random.default_rng(2)
        inputs = self.make(case, 0.5, rng)
        actual = np.asarray(self.run(inputs, "interpret"), np.float32)
        expected = self.expected(inputs)
        base = np.asarray(inputs.get("base", inputs["identity"]), np.float32)
        untouched = expected == base
        np.testing.assert_array_equal(actual[untouched], base[untouched])


def _random_ids(rng, shape, total: int, density: float) -> jnp.ndarray:
    """Row ids in [0, total) with probability `density`, else out of range (sentinel
    `total`, or -1): those must read as zeros."""
    ids = rng.integers(0, total, shape)
    off = rng.random(shape) >= density
    ids = np.where(off, np.where(rng.random(shape) < 0.5, total, -1), ids)
    return jnp.asarray(ids.astype(np.int32))


class TestGatherMatmul(KernelTestBase):
    """The sparse engine's conv1 primitive: compact rows from (N, K) tap tables."""

    CASES = [
        dict(rows=50, taps=1, cin=24, cout=40, n=64, relu=True, dtype=jnp.float32),
        dict(rows=40, taps=9, cin=16, cout=16, n=33, relu=False, dtype=jnp.float32),
        dict(rows=70, taps=1, cin=64, cout=32, n=100, relu=True, dtype=jnp.bfloat16),
        dict(rows=30, taps=9, cin=8, cout=24, n=16, relu=True, dtype=jnp.bfloat16),
        dict(rows=45, taps=1, cin=3, cout=20, n=45, relu=True, dtype=jnp.float32),  # Cin < 16
        # The engine's conv1 list: active pixels of a non-square (B, H, W) map in order,
        # then the sentinel B * H * W, cut to a capacity (`n`) below the total.
        dict(map=(2, 7, 11), taps=1, cin=24, cout=40, n=120, relu=True, dtype=jnp.float32),
        dict(map=(1, 9, 5), taps=1, cin=16, cout=16, n=40, relu=True, dtype=jnp.bfloat16),
        # split-K: float32 partial sums of the K steps' ranges, added after the kernel
        dict(rows=50, taps=9, cin=40, cout=24, n=70, relu=True, dtype=jnp.float32, split=6),
        dict(rows=60, taps=1, cin=128, cout=16, n=50, relu=False, dtype=jnp.bfloat16, split=4),
    ]

    def make(self, case, density, rng):
        dtype = case["dtype"]
        if "map" in case:
            total = int(np.prod(case["map"]))
            flags = jnp.asarray(_random_mask(rng, case["map"], density).reshape(-1))
            taps = active_first(flags)[0][: case["n"], None]
        else:
            total = case["rows"]
            taps = _random_ids(rng, (case["n"], case["taps"]), total, density)
        return dict(
            src=_normal(rng, (total, case["cin"]), dtype),
            taps=taps,
            w=_normal(rng, (case["taps"] * case["cin"], case["cout"]), dtype, (case["taps"] * case["cin"]) ** -0.5),
            b=_normal(rng, (case["cout"],), jnp.float32),
            relu=case["relu"],
            split_k=case.get("split"),
        )

    def run(self, inputs, implementation):
        return gather_matmul(**inputs, implementation=implementation)

    def expected(self, inputs):
        src, taps = np.asarray(inputs["src"], np.float32), np.asarray(inputs["taps"])
        inside = (taps >= 0) & (taps < src.shape[0])
        gathered = np.where(inside[..., None], src[np.clip(taps, 0, src.shape[0] - 1)], 0.0)
        y = gathered.reshape(taps.shape[0], -1) @ np.asarray(inputs["w"], np.float32) + np.asarray(inputs["b"])
        return np.maximum(y, 0.0) if inputs["relu"] else y


def _numpy_row_map(coords: np.ndarray, grid: tuple[int, int, int], rng=None) -> np.ndarray:
    """Row map by a loop over the coordinate list: pixel (b, y, x) -> its row, rows with
    b >= B listed nowhere. Unlisted pixels hold ``len(coords)``, or with ``rng`` any value
    outside [0, N) (N, N + 5, -1, int32 max: the kernel must read zeros for each)."""
    batch, height, width = grid
    n_src = len(coords)
    fill = np.full(batch * height * width, n_src, np.int64)
    if rng is not None:
        fill = rng.choice([n_src, n_src + 5, -1, np.iinfo(np.int32).max], fill.size)
    out = fill.astype(np.int32)
    for row, (sample, y, x) in enumerate(coords):
        if sample < batch:
            out[(sample * height + y) * width + x] = row
    return out


class TestPatchConv(KernelTestBase):
    """The sparse engine's conv2 primitive: compact conv1 rows at listed pixels of a map
    that is zero elsewhere (found through a row map built here by a NumPy loop, unlisted
    pixels holding assorted out-of-range values), 3x3 conv on listed patches (some of
    them padding). The expected output pastes the rows by their coordinates."""

    CASES = [
        dict(batch=1, hw=8, cin=16, cout=16, S=1, s=1, patches=20, dtype=jnp.float32),
        dict(batch=2, hw=8, cin=24, cout=40, S=2, s=2, patches=6, dtype=jnp.bfloat16),
        dict(batch=2, hw=9, cin=16, cout=16, S=4, s=1, patches=5, dtype=jnp.float32),
        dict(batch=1, hw=14, cin=8, cout=16, S=7, s=2, patches=2, dtype=jnp.float32),
        dict(batch=2, hw=14, cin=16, cout=32, S=7, s=1, patches=4, dtype=jnp.bfloat16),
        # conv1 ran on the whole map: rows are the map itself (coords=None)
        dict(batch=2, hw=8, cin=16, cout=24, S=2, s=2, patches=5, dtype=jnp.float32, whole_map=True),
        dict(batch=2, hw=15, cin=8, cout=16, S=8, s=2, patches=3, dtype=jnp.float32),
        dict(batch=1, hw=13, cin=3, cout=32, S=7, s=2, patches=2, dtype=jnp.float32),
        # non-square maps and mask grids, partial border patches
        dict(batch=2, hw=(8, 13), cin=16, cout=16, S=2, s=2, patches=8, dtype=jnp.float32),
        dict(batch=1, hw=(10, 6), cin=16, cout=16, S=4, s=1, patches=5, dtype=jnp.float32, whole_map=True),
        dict(batch=2, hw=(9, 14), cin=16, cout=16, S=4, s=1, patches=6, dtype=jnp.float32),
        dict(batch=1, hw=(13, 6), cin=16, cout=24, S=2, s=2, patches=7, dtype=jnp.bfloat16),
        dict(batch=2, hw=(11, 15), cin=24, cout=40, S=2, s=2, patches=9, dtype=jnp.float32),
        # split-K: each CTA runs 2 (or 6) of the 18 K steps
        dict(batch=2, hw=(9, 14), cin=40, cout=24, S=2, s=2, patches=7, dtype=jnp.float32, split=9),
        dict(batch=1, hw=(10, 6), cin=40, cout=16, S=4, s=1, patches=4, dtype=jnp.bfloat16, whole_map=True, split=3),
    ]

    def make(self, case, density, rng):
        b, size, stride, dtype = case["batch"], case["S"], case["s"], case["dtype"]
        height, width = _hw(case)
        if case.get("whole_map"):
            coords = np.argwhere(np.ones((b, height, width), bool))  # row-major: not passed
        else:
            listed = np.argwhere(_random_mask(rng, (b, height, width), density))
            padding = np.tile([[b, 0, 0]], (4, 1))  # padding rows: sample >= B
            coords = rng.permutation(np.concatenate([listed, padding]))
        grid = (_mask_grid(height, stride, size), _mask_grid(width, stride, size))
        cells = np.argwhere(np.ones((b, *grid), bool))[rng.permutation(b * grid[0] * grid[1])]
        starts = cells[: case["patches"] - 1] * [1, size, size]
        starts = np.concatenate([starts, [[b, 0, 0]]])  # one padding patch
        rows = _normal(rng, (coords.shape[0], case["cin"]), dtype)
        if not case.get("whole_map"):  # padding rows are never read: poison them
            rows = jnp.where(jnp.asarray(coords[:, :1] >= b), jnp.nan, rows)
        return dict(
            rows=rows,
            row_map=None if case.get("whole_map") else jnp.asarray(_numpy_row_map(coords, (b, height, width), rng)),
            coords=coords,  # for the expected output only
            starts=jnp.asarray(starts.astype(np.int32)),
            w=_normal(rng, (3, 3, case["cin"], case["cout"]), dtype, (9 * case["cin"]) ** -0.5),
            b=_normal(rng, (case["cout"],), jnp.float32),
            grid=(b, height, width),
            size=size,
            stride=stride,
            split_k=case.get("split"),
        )

    def run(self, inputs, implementation):
        inputs = {k: v for k, v in inputs.items() if k != "coords"}
        return patch_conv(**inputs, implementation=implementation)

    def expected(self, inputs):
        batch, height, width = inputs["grid"]
        size, stride = inputs["size"], inputs["stride"]
        rows = np.asarray(inputs["rows"], np.float32)
        coords = inputs["coords"]
        w = np.asarray(inputs["w"], np.float32)
        canvas = np.zeros((batch, height + 2, width + 2, rows.shape[1]), np.float32)  # zero border
        for row, (sample, y, x) in zip(rows, coords):
            if sample < batch:
                canvas[sample, y + 1, x + 1] = row
        out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
        out = np.zeros((len(inputs["starts"]), size, size, w.shape[-1]), np.float32)
        for p, (sample, y0, x0) in enumerate(np.asarray(inputs["starts"])):
            for y in range(size):
                for x in range(size):
                    oy, ox = y0 + y, x0 + x
                    if sample >= batch or oy >= out_h or ox >= out_w:
                        continue  # padding patch / outside the image: zeros
                    window = canvas[sample, oy * stride : oy * stride + 3, ox * stride : ox * stride + 3]
                    out[p, y, x] = np.maximum(np.einsum("hwc,hwcd->d", window, w) + np.asarray(inputs["b"]), 0.0)
        return out


def test_make_row_map_matches_a_loop_over_the_coordinates():
    """Non-square grid, batch 2, rows in random order, padding rows (sample >= B) listed
    nowhere; unlisted pixels hold N."""
    rng = np.random.default_rng(3)
    grid = (2, 5, 7)
    listed = np.argwhere(_random_mask(rng, grid, 0.4))
    coords = rng.permutation(np.concatenate([listed, np.tile([[2, 1, 3]], (3, 1))])).astype(np.int32)
    actual = np.asarray(make_row_map(jnp.asarray(coords), grid))
    np.testing.assert_array_equal(actual, _numpy_row_map(coords, grid))
    assert np.sum(actual < len(coords)) == len(listed)


class TestChannelGatherMatmul(KernelTestBase):
    CASES = [
        dict(batch=1, m=40, k=32, n=48, g=4, mode="out", dtype=jnp.float32),
        dict(batch=2, m=33, k=48, n=40, g=8, mode="in", dtype=jnp.bfloat16),
        dict(batch=2, m=20, k=24, n=36, g=2, mode="both", dtype=jnp.float32),
        dict(batch=3, m=16, k=40, n=24, g=4, mode="compact", dtype=jnp.bfloat16),
        dict(batch=2, m=24, k=20, n=18, g=1, mode="dense", dtype=jnp.float32),
        # split-K: each part runs its range of the sample's steps (none past its count)
        dict(batch=2, m=40, k=128, n=32, g=4, mode="out", dtype=jnp.float32, split=4),
        dict(batch=2, m=33, k=64, n=40, g=8, mode="in", dtype=jnp.bfloat16, split=2),
        dict(batch=3, m=16, k=64, n=24, g=4, mode="compact", dtype=jnp.float32, split=2),
    ]

    def make(self, case, density, rng):
        b, m, k, n, g, mode, dtype = (case[f] for f in ("batch", "m", "k", "n", "g", "mode", "dtype"))
        inputs = dict(
            w=_normal(rng, (k, n), dtype, k**-0.5),
            b=_normal(rng, (n,), jnp.float32),
            group_size=g,
            relu=mode != "both",
            split_k=case.get("split"),
        )

        def groups(total):
            order = np.stack([rng.permutation(total) for _ in range(b)]).astype(np.int32)
            counts = np.array([int(round(density * total))] * b, np.int32)
            counts[0] = max(0, counts[0] - 1) if b > 1 else counts[0]  # per-sample counts differ
            return jnp.asarray(order), jnp.asarray(counts)

        if mode in ("in", "both", "compact"):
            inputs["in_groups"], inputs["in_count"] = groups(k // g)
        if mode == "compact":
            inputs["x_compact"] = True
        if mode in ("out", "both"):
            inputs["out_groups"], inputs["out_count"] = groups(n // g)
        inputs["x"] = _normal(rng, (b, m, k), dtype)
        # Every group is listed (capacity = all groups), so the output has N columns.
        inputs["out"] = jnp.full((b, m, n), jnp.nan, dtype)
        return inputs

    def run(self, inputs, implementation):
        return channel_gather_matmul(**inputs, implementation=implementation)

    def expected(self, inputs):
        """Per sample: gather the active weight rows/columns and do a dense matmul."""
        x = np.asarray(inputs["x"], np.float32)
        w, bias, g = np.asarray(inputs["w"], np.float32), np.asarray(inputs["b"]), inputs["group_size"]
        out = np.zeros(inputs["out"].shape, np.float32)

        def channels(groups, count):
            return (np.asarray(groups)[:count, None] * g + np.arange(g)).reshape(-1)

        for s in range(x.shape[0]):
            if "in_groups" in inputs:
                rows = channels(inputs["in_groups"][s], int(inputs["in_count"][s]))
                xs = x[s, :, : rows.size] if inputs.get("x_compact") else x[s][:, rows]
            else:
                rows = np.arange(w.shape[0])
                xs = x[s]
            if "out_groups" in inputs:
                cols = channels(inputs["out_groups"][s], int(inputs["out_count"][s]))
            else:
                cols = np.arange(w.shape[1])
            y = xs @ w[np.ix_(rows, cols)] + bias[cols]
            out[s, :, : cols.size] = np.maximum(y, 0.0) if inputs["relu"] else y
        return out


def test_zero_capacity_launches_nothing():
    src = jnp.ones((16, 16))
    identity = jnp.arange(2 * 4 * 6 * 16, dtype=jnp.float32).reshape(2, 4, 6, 16)
    no_taps = jnp.zeros((0, 1), jnp.int32)
    no_starts = jnp.zeros((0, 3), jnp.int32)
    no_patches = jnp.zeros((0,), jnp.int32)
    run = dict(implementation="interpret")

    def sparse_block(src, identity):
        rows = gather_matmul(src, no_taps, jnp.ones((16, 16)), jnp.ones(16), **run)
        h = patch_conv(
            rows,
            jnp.zeros((2 * 4 * 6,), jnp.int32),
            no_starts,
            jnp.ones((3, 3, 16, 16)),
            jnp.ones(16),
            grid=(2, 4, 6),
            size=2,
            stride=1,
            **run,
        )
        out = conv1x1_scatter_add(h, no_patches, 0, jnp.ones((16, 16)), jnp.ones(16), identity, **run)
        return rows, h, out

    assert "pallas_call" not in str(jax.make_jaxpr(sparse_block)(src, identity))
    rows, h, out = sparse_block(src, identity)
    assert rows.shape == (0, 16) and h.shape == (0, 2, 2, 16)
    np.testing.assert_array_equal(out, identity)


def test_jit_and_shard_map():
    """The wrappers trace under jit and jax.shard_map (one list per shard).

    check_vma=False: JAX 0.12's Pallas CPU interpreter mixes varying and replicated
    values in its grid loop and trips the check (the CUDA lowering test runs with it on).
    """
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",))
    rng = np.random.default_rng(4)
    batch = len(devices)
    x = _normal(rng, (batch, 24, 32), jnp.float32)
    w, b = _normal(rng, (32, 16), jnp.float32, 0.2), _normal(rng, (16,), jnp.float32)
    groups = jnp.asarray(np.stack([rng.permutation(8) for _ in range(batch)]).astype(np.int32))
    counts = jnp.full((batch,), 3, jnp.int32)
    spec = jax.P("data")

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    def sharded(x, groups, counts):
        return channel_gather_matmul(
            x, w, b, group_size=2, out_groups=groups, out_count=counts, implementation="interpret"
        )

    expected = channel_gather_matmul(
        x, w, b, group_size=2, out_groups=groups, out_count=counts, implementation="reference"
    )
    placed = jax.device_put((x, groups, counts), jax.NamedSharding(mesh, spec))
    np.testing.assert_allclose(sharded(*placed), expected, rtol=1e-5, atol=1e-5)


def _gather_matmul_call(**changes):
    """A valid small gather_matmul call (interpret mode) with ``changes`` applied."""
    args = (
        dict(
            src=jnp.ones((16, 8)),
            taps=jnp.zeros((4, 1), jnp.int32),
            w=jnp.ones((8, 8)),
            b=jnp.ones(8),
            implementation="interpret",
        )
        | changes
    )
    return lambda: gather_matmul(**args)


def _patch_conv_call(**changes):
    """A valid small patch_conv call on a whole 1x4x8 grid with ``changes`` applied."""
    args = (
        dict(
            rows=jnp.ones((32, 8)),
            row_map=None,
            starts=jnp.zeros((4, 3), jnp.int32),
            w=jnp.ones((3, 3, 8, 8)),
            b=jnp.ones(8),
            grid=(1, 4, 8),
            size=2,
            stride=1,
            implementation="interpret",
        )
        | changes
    )
    return lambda: patch_conv(**args)


def _scatter_call(**changes):
    """A valid small conv1x1_scatter_add call with ``changes`` applied."""
    args = (
        dict(
            h=jnp.ones((4, 2, 2, 8)),
            patch_indices=jnp.zeros(4, jnp.int32),
            patch_count=1,
            w=jnp.ones((8, 8)),
            b=jnp.ones(8),
            identity=jnp.ones((1, 4, 4, 8)),
            implementation="interpret",
        )
        | changes
    )
    return lambda: conv1x1_scatter_add(**args)


@pytest.mark.parametrize(
    "call, message",
    [
        (_gather_matmul_call(src=jnp.ones((4, 4, 8))), r"src must be 2-D \(R, C\) rows.*\(4, 4, 8\)"),
        (
            _gather_matmul_call(taps=jnp.zeros((4, 9), jnp.int32)),
            r"w.shape=\(8, 8\) has 8 rows, expected K \* C = 9 \* 8",
        ),
        (_gather_matmul_call(taps=jnp.zeros((4, 1), jnp.int16)), r"taps.dtype=int16, expected int32"),
        (
            _gather_matmul_call(src=jnp.ones((16, 8), jnp.float16), w=jnp.ones((8, 8), jnp.float16)),
            r"src.dtype=float16; supported: float32, bfloat16",
        ),
        (_gather_matmul_call(implementation="cuda"), r"choose one of"),
        (_patch_conv_call(stride=3), r"stride=3"),
        (_patch_conv_call(w=jnp.ones((1, 1, 8, 8))), r"w.shape=\(1, 1, 8, 8\), expected \(3, 3, 8, Cout\)"),
        (_patch_conv_call(rows=jnp.ones((30, 8))), r"row_map=None needs rows for all 1x4x8 pixels, got 30"),
        (
            _patch_conv_call(rows=jnp.ones((5, 8)), row_map=jnp.zeros((4, 8), jnp.int32)),
            r"row_map must be 1-D",
        ),
        (
            _patch_conv_call(rows=jnp.ones((5, 8)), row_map=jnp.zeros((8 * 4,), jnp.int16)),
            r"row_map.dtype=int16, expected int32",
        ),
        (
            _patch_conv_call(rows=jnp.ones((5, 8)), row_map=jnp.zeros((8 * 3,), jnp.int32)),
            r"row_map.shape=\(24,\), expected \(32,\)",
        ),
        (
            lambda: make_row_map(jnp.zeros((5, 2), jnp.int32), (1, 4, 8)),
            r"coords.shape=\(5, 2\), expected \(5, 3\)",
        ),
        (_patch_conv_call(starts=jnp.zeros((4, 3), jnp.int16)), r"starts.dtype=int16, expected int32"),
        (_patch_conv_call(size=0), r"size=0; must be an int >= 1"),
        (_patch_conv_call(split_k=4), r"split_k=4; must be an int >= 1 dividing the 9 K steps"),
        (_gather_matmul_call(split_k=0), r"split_k=0; must be an int >= 1 dividing the 1 K steps"),
        (_scatter_call(w=jnp.ones((8, 16)), b=jnp.ones(16)), r"w.shape=\(8, 16\), expected \(Cin, Cout\)=\(8, 8\)"),
        (_scatter_call(h=jnp.ones((4, 2, 3, 8))), r"patches must be square S x S"),
        (
            lambda: channel_gather_matmul(
                jnp.ones((1, 4, 10)),
                jnp.ones((10, 8)),
                jnp.ones(8),
                group_size=4,
                in_groups=jnp.zeros((1, 2), jnp.int32),
                in_count=jnp.ones(1, jnp.int32),
                implementation="interpret",
            ),
            r"K=10 is not a multiple of group_size=4",
        ),
        (
            lambda: channel_gather_matmul(
                jnp.ones((1, 4, 8)), jnp.ones((8, 8)), jnp.ones(8), group_size=2, implementation="pallas"
            ),
            r"implementation='pallas' compiles a Triton GPU kernel",
        ),
        (lambda: TileConfig(block_m=48), r"block_m=48: must be a power of two >= 16"),
        (lambda: TileConfig(block_k=8), r"block_k=8"),
        (lambda: TileConfig(num_warps=3), r"num_warps=3"),
    ],
)
def test_bad_arguments_fail_before_compute(call, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((ValueError, TypeError), match=message):
            call()


@pytest.mark.parametrize(
    "tiles, k_steps, split",
    [
        (196, 18, 1),  # a full wave: no split
        (98, 36, 3),  # 294 CTAs of 12 steps (2 would leave 18 steps each)
        (52, 72, 6),
        (32, 144, 9),  # 288 CTAs of 16 steps
        (8, 72, 18),  # 144 CTAs of 4 steps
        (14, 36, 9),  # no divisor fills a wave with >= 4 steps: the largest one
        (40, 3, 1),  # too few steps to split
    ],
)
def test_split_k_fills_a_wave(tiles, k_steps, split):
    assert _common.split_k(tiles, k_steps) == split


def test_kernel_package_does_not_import_laud_jax():
    """pallas_kernels/ holds generic array ops: no module of it may import laud_jax."""
    files = sorted(KERNEL_DIR.glob("*.py"))
    assert {f.stem for f in files} >= set(KERNEL_MODULES)
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            offenders += [
                f"{path.name}:{node.lineno} imports {n}" for n in names if n == "laud_jax" or n.startswith("laud_jax.")
            ]
    assert not offenders, offenders


@pytest.mark.parametrize("name", KERNEL_MODULES)
def test_every_kernel_module_has_its_reference(name):
    """One op per module: the kernel `<name>` and its pure-jnp `<name>_reference`."""
    module = importlib.import_module(f"pallas_kernels.{name}")
    assert callable(getattr(module, name)) and callable(getattr(module, f"{name}_reference"))
    assert module.NAME == name

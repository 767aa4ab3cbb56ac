"""The ``xla`` backend: the engine's compute primitives in pure JAX (the CPU path).

A backend is an object with the methods of :class:`XlaOps`. The block executor
(``laud_jax.sparse.executor``) calls only these, so a backend that fuses differently (the
Pallas GPU kernels) subclasses this one and overrides what it does better; see
``docs/sparse.md``. Weights come BN-folded: 1x1 kernels as (C_in, C_out) matrices, others
HWIO; biases are (C_out,).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _act(y: jax.Array, relu: bool) -> jax.Array:
    return jax.nn.relu(y) if relu else y


@dataclasses.dataclass(frozen=True)
class XlaOps:
    """Pure-JAX primitives: dense convs, gather-fused conv1, patch conv2, scatter-fused conv3.

    Hashable by value: an instance is a static argument of the compiled programs.
    ``im2col_max_pixels``: 3x3 convs with at most this many output pixels gather their taps
    and run one matmul instead of XLA's convolution (faster on CPU for small maps, many
    channels). ``writeback``: ``loop`` (one in-place window update per active patch) or
    ``scatter`` (one scatter op).
    """

    name: str = "xla"
    im2col_max_pixels: int = 256
    writeback: str = "loop"

    def conv(
        self, x: jax.Array, w: jax.Array, b: jax.Array, *, stride: int = 1, groups: int = 1, relu: bool = False
    ) -> jax.Array:
        """Dense NHWC convolution with symmetric padding k // 2, plus bias, optional relu."""
        if w.ndim == 2:  # 1x1
            if stride > 1:
                x = x[:, ::stride, ::stride, :]
            return _act(jnp.dot(x, w) + b, relu)
        k = w.shape[0]
        pad = k // 2
        h_out = (x.shape[1] + 2 * pad - k) // stride + 1
        w_out = (x.shape[2] + 2 * pad - k) // stride + 1
        if groups == 1 and x.shape[-1] >= 16 and h_out * w_out <= self.im2col_max_pixels:
            xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
            cols = [
                xp[:, dy : dy + stride * (h_out - 1) + 1 : stride, dx : dx + stride * (w_out - 1) + 1 : stride, :]
                for dy in range(k)
                for dx in range(k)
            ]
            y = jnp.dot(jnp.concatenate(cols, axis=-1), w.reshape(-1, w.shape[-1]))
        else:
            y = lax.conv_general_dilated(
                x,
                w,
                (stride, stride),
                ((pad, pad), (pad, pad)),
                dimension_numbers=_NHWC,
                feature_group_count=groups,
            )
        return _act(y + b, relu)

    def gather_matmul(self, src: jax.Array, taps: jax.Array, w: jax.Array, b: jax.Array, *, relu: bool) -> jax.Array:
        """``act(concat_k src[taps[:, k]] @ w + b)``: conv1 on gathered pixels; taps past the end read 0."""
        gathered = jnp.take(src, taps, axis=0, mode="fill", fill_value=0)
        return _act(jnp.dot(gathered.reshape(taps.shape[0], -1), w) + b, relu)

    def patch_conv(
        self,
        rows: jax.Array,
        row_map: jax.Array | None,
        starts: jax.Array,
        w: jax.Array,
        b: jax.Array,
        *,
        grid: tuple[int, int, int],
        size: int,
        stride: int,
        groups: int,
        relu: bool,
    ) -> jax.Array:
        """3x3 conv (stride) of conv1's output on the active patches -> (P, size, size, C_out).

        ``rows`` (N, C): conv1's output at listed pixels of a ``grid`` = (B, H1, W1) map
        that is zero elsewhere; ``row_map`` (B * H1 * W1,) int32: each pixel's row in
        ``rows``, outside [0, N) where the pixel has none (routing's ``row_map``). None:
        the rows are the whole grid in row-major order. ``starts`` (P, 3): (sample, row,
        col) of each patch's first output pixel.

        The zero-bordered map is one gather of the rows through the (bordered) row map, not
        a scatter of the rows onto zeros. On CPU (ResNet-50 conv2 shapes at rate 0.5,
        batch 1 and 8, side by side) the map and windows took 0.58-0.91x of the scatter's
        time at all but the smallest map (7 x 7 at batch 1: 1.03-1.28x, +13 us at most),
        the whole call 0.91-1.02x.
        """
        batch, height, width = grid
        channels = rows.shape[-1]
        span = stride * (size - 1) + 3
        border = ((0, 0), (1, 1), (1, 1))
        if row_map is None:  # rows cover the whole grid, in order
            canvas = jnp.pad(rows.reshape(batch, height, width, channels), (*border, (0, 0)))
        else:
            n_src = rows.shape[0]
            index = jnp.where((row_map >= 0) & (row_map < n_src), row_map, n_src)
            index = jnp.pad(index.reshape(batch, height, width), border, constant_values=n_src)
            canvas = jnp.take(rows, index, axis=0, mode="fill", fill_value=0)
        origin = starts * jnp.asarray([1, stride, stride], starts.dtype)
        windows = jax.vmap(lambda o: lax.dynamic_slice(canvas, (o[0], o[1], o[2], 0), (1, span, span, channels))[0])(
            origin
        )
        if groups == 1 and size <= 2:
            taps = [
                windows[:, dy : dy + stride * (size - 1) + 1 : stride, dx : dx + stride * (size - 1) + 1 : stride, :]
                for dy in range(3)
                for dx in range(3)
            ]
            y = jnp.dot(jnp.concatenate(taps, axis=-1), w.reshape(-1, w.shape[-1]))
        else:
            y = lax.conv_general_dilated(
                windows, w, (stride, stride), "VALID", dimension_numbers=_NHWC, feature_group_count=groups
            )
        return _act(y + b, relu)

    def scatter_residual(
        self, h: jax.Array, identity: jax.Array, base: jax.Array, starts: jax.Array, count: jax.Array, *, in_place: bool
    ) -> jax.Array:
        """``base`` with each of the first ``count`` patches set to relu(identity + h[p]).

        ``starts`` (P, 3) holds each patch's (sample, row, col); slots from ``count`` on are
        never written. ``in_place``: ``base`` is the identity itself (read before written).
        """
        size = h.shape[1]
        channels = h.shape[-1]
        if self.writeback == "scatter":
            valid = jnp.arange(h.shape[0]) < count
            sample = jnp.where(valid, starts[:, 0], identity.shape[0])  # out of range: dropped
            offsets = jnp.arange(size)
            rows = (starts[:, 1, None] + offsets)[:, :, None]
            cols = (starts[:, 2, None] + offsets)[:, None, :]
            index = (sample[:, None, None], rows, cols)
            window = (base if in_place else identity).at[index].get(mode="fill", fill_value=0)
            value = jax.nn.relu(window + h.astype(window.dtype))
            return base.at[index].set(value, mode="drop", unique_indices=True)

        def write(p, out):
            sample, row, col = starts[p, 0], starts[p, 1], starts[p, 2]
            source = out if in_place else identity
            window = lax.dynamic_slice(source, (sample, row, col, 0), (1, size, size, channels))
            value = jax.nn.relu(window + h[p][None].astype(window.dtype))
            return lax.dynamic_update_slice(out, value, (sample, row, col, 0))

        return lax.fori_loop(0, count, write, base)

    def conv3_scatter(
        self,
        h: jax.Array,
        w: jax.Array,
        b: jax.Array,
        identity: jax.Array,
        base: jax.Array,
        starts: jax.Array,
        cells: jax.Array,
        count: jax.Array,
        *,
        in_place: bool,
    ) -> jax.Array:
        """conv3 (1x1) on patches (P, S, S, C), then :meth:`scatter_residual`.

        ``cells`` (P,): each patch's flat index on the (B, H / S, W / S) patch grid
        (routing's ``cells``; the same patches as ``starts``), for backends that address
        patches by index; this one writes at ``starts``.
        """
        return self.scatter_residual(jnp.dot(h, w) + b, identity, base, starts, count, in_place=in_place)

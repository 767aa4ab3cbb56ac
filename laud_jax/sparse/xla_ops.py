"""The ``xla`` backend: the engine's compute primitives in pure JAX (the CPU path).

A backend is an object with the methods of :class:`XlaOps`. The block executor
(``laud_jax.sparse.executor``) calls only these, so a backend that fuses differently (the
Pallas GPU kernels) subclasses this one and overrides what it does better; see
``docs/sparse.md``. Weights come BN-folded: 1x1 kernels as (C_in, C_out) matrices, others
HWIO; biases are (C_out,).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _act(y: jax.Array, relu: bool) -> jax.Array:
    return jax.nn.relu(y) if relu else y


class XlaOps:
    """Pure-JAX primitives: dense convs, gather-fused conv1, patch conv2, scatter-fused conv3."""

    name = "xla"

    # im2col (gather the 3x3 taps, one matmul) beats XLA:CPU's convolution when the
    # spatial extent is small and channels are many (late stages, small patches); see
    # docs/sparse.md for the per-shape measurements behind these thresholds.
    im2col_max_pixels = 256

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
                x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=_NHWC,
                feature_group_count=groups,
            )
        return _act(y + b, relu)

    def gather_matmul(self, src: jax.Array, taps: jax.Array, w: jax.Array, b: jax.Array, *, relu: bool) -> jax.Array:
        """``act(concat_k src[taps[:, k]] @ w + b)``: conv1 on gathered pixels; taps past the end read 0."""
        gathered = jnp.take(src, taps, axis=0, mode="fill", fill_value=0)
        return _act(jnp.dot(gathered.reshape(taps.shape[0], -1), w) + b, relu)

    def patch_conv(
        self, rows: jax.Array, slots: jax.Array, w: jax.Array, b: jax.Array, *, stride: int, groups: int, relu: bool
    ) -> jax.Array:
        """3x3 VALID conv (stride) over patches gathered from ``rows``: (P, T, T) slots -> (P, S, S, C_out).

        Slots past the end of ``rows`` read zeros (image border, pixels outside conv1's mask).
        """
        patches, span, _ = slots.shape
        size = (span - 3) // stride + 1
        if groups == 1 and size <= 2:
            offsets = np.arange(size) * stride
            taps = np.arange(3)
            # (P, S, S, 3, 3) slots of every output pixel's 3x3 window, in HWIO tap order.
            window = slots[:, (offsets[:, None] + taps)[:, None, :, None], (offsets[:, None] + taps)[None, :, None, :]]
            gathered = jnp.take(rows, window.reshape(-1, 9), axis=0, mode="fill", fill_value=0)
            y = jnp.dot(gathered.reshape(-1, 9 * rows.shape[-1]), w.reshape(-1, w.shape[-1]))
            y = y.reshape(patches, size, size, -1)
        else:
            gathered = jnp.take(rows, slots.reshape(-1), axis=0, mode="fill", fill_value=0)
            gathered = gathered.reshape(patches, span, span, rows.shape[-1])
            y = lax.conv_general_dilated(
                gathered, w, (stride, stride), "VALID", dimension_numbers=_NHWC, feature_group_count=groups
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
        count: jax.Array,
        *,
        in_place: bool,
    ) -> jax.Array:
        """conv3 (1x1) on patches (P, S, S, C), then :meth:`scatter_residual`."""
        return self.scatter_residual(jnp.dot(h, w) + b, identity, base, starts, count, in_place=in_place)

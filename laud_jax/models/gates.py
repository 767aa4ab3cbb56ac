"""Maskers and gates: spatial masker, channel masker, layer gate, LC-Net scale head.

Every masker emits logits with a leading class axis of size 2 (index 0 "execute",
index 1 "skip") and turns them into a hard {0, 1} mask: hard Gumbel-softmax with a
straight-through gradient in training, a deterministic threshold at evaluation.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

EXECUTE_BIAS_SPATIAL = 5.0
SKIP_BIAS_SPATIAL = 0.0
EXECUTE_BIAS_CHANNEL = 2.0
SKIP_BIAS_CHANNEL = -2.0


def hard_gate(
    logits: jax.Array,
    *,
    train: bool,
    tau: jax.Array,
    rng: jax.Array | None,
    gate_offset: jax.Array | float = 0.0,
    noise: bool = True,
) -> jax.Array:
    """Hard {0,1} execute-mask from logits shaped (..., 2, K).

    Training: hard Gumbel-softmax with straight-through gradient at temperature ``tau``
    (``noise=False``: the same without the Gumbel noise, i.e. the hard argmax of the logits
    with the gradient of ``softmax(logits / tau)``; for tests and debugging).
    Evaluation: execute where ``logit_execute - logit_skip >= gate_offset``.
    """
    logits = logits.astype(jnp.float32)
    if not train:
        diff = logits[..., 0, :] - logits[..., 1, :]
        return (diff >= gate_offset).astype(jnp.float32)
    if noise:
        logits = logits + jax.random.gumbel(rng, logits.shape, jnp.float32)
    y_soft = jax.nn.softmax(logits / tau, axis=-2)[..., 0, :]
    y_hard = (y_soft >= 0.5).astype(jnp.float32)
    return y_hard - jax.lax.stop_gradient(y_soft) + y_soft


def _bias_init(execute: float, skip: float, groups: int):
    def init(key, shape, dtype=jnp.float32):
        del key
        assert shape == (2 * groups,), shape
        return jnp.concatenate([jnp.full((groups,), execute, dtype), jnp.full((groups,), skip, dtype)])

    return init


def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) averaging matrix with torch's adaptive_avg_pool bin edges."""
    matrix = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """torch-style adaptive average pooling of NHWC ``x`` to ``out_hw``.

    Equal bins (the output divides the input) are a reshape and a mean, which XLA fuses;
    other sizes use torch's bin edges as averaging matrices.
    """
    h, w = x.shape[1:3]
    if (h, w) == tuple(out_hw):
        return x
    if h % out_hw[0] == 0 and w % out_hw[1] == 0:
        b, _, _, c = x.shape
        bins = x.astype(jnp.float32).reshape(b, out_hw[0], h // out_hw[0], out_hw[1], w // out_hw[1], c)
        return jnp.mean(bins, axis=(2, 4))
    ph = jnp.asarray(adaptive_pool_matrix(h, out_hw[0]))
    pw = jnp.asarray(adaptive_pool_matrix(w, out_hw[1]))
    return jnp.einsum("ih,bhwc,jw->bijc", ph, x.astype(jnp.float32), pw)


class SpatialMasker(nn.Module):
    """Pooled 1x1-conv masker: one execute/skip decision per cell of a ``grid`` and group.

    ``standardize`` normalizes each channel of the pooled features over the grid cells of
    each sample (zero mean, unit variance): the bias then sets how many cells execute and
    the weights which ones. Without it, on inputs whose background is flat (features near a
    constant), a uniform push towards sparsity moves the logits of the cells with large
    features most and switches off the informative cells first.
    """

    grid: tuple[int, int]
    groups: int = 1
    standardize: bool = False

    @nn.compact
    def __call__(self, x, *, train, tau, gate_offset=0.0, noise=True):
        z = adaptive_avg_pool(x, self.grid).astype(jnp.float32)
        if self.standardize:
            mean = jnp.mean(z, axis=(1, 2), keepdims=True)
            var = jnp.var(z, axis=(1, 2), keepdims=True)
            z = (z - mean) * jax.lax.rsqrt(var + 1e-5)
        logits = nn.Conv(
            2 * self.groups,
            (1, 1),
            bias_init=_bias_init(EXECUTE_BIAS_SPATIAL, SKIP_BIAS_SPATIAL, self.groups),
            name="conv",
        )(z)
        logits = logits.reshape(*logits.shape[:-1], 2, self.groups)
        rng = self.make_rng("gumbel") if train and noise else None
        return hard_gate(logits, train=train, tau=tau, rng=rng, gate_offset=gate_offset, noise=noise)

    @staticmethod
    def macs(in_channels: int, grid: tuple[int, int], groups: int) -> int:
        return grid[0] * grid[1] * in_channels * 2 * groups


class ChannelMasker(nn.Module):
    """GAP -> Dense -> relu -> Dense: one execute/skip decision per channel group."""

    groups: int

    @staticmethod
    def hidden(groups: int) -> int:
        return max(groups // 16, 16)

    @nn.compact
    def __call__(self, pooled, *, train, tau, gate_offset=0.0, noise=True):
        h = nn.relu(nn.Dense(self.hidden(self.groups), name="fc1")(pooled))
        logits = nn.Dense(
            2 * self.groups,
            bias_init=_bias_init(EXECUTE_BIAS_CHANNEL, SKIP_BIAS_CHANNEL, self.groups),
            name="fc2",
        )(h)
        logits = logits.reshape(*logits.shape[:-1], 2, self.groups)
        rng = self.make_rng("gumbel") if train and noise else None
        return hard_gate(logits, train=train, tau=tau, rng=rng, gate_offset=gate_offset, noise=noise)

    @staticmethod
    def macs(in_channels: int, groups: int) -> int:
        hidden = ChannelMasker.hidden(groups)
        return in_channels * hidden + hidden * 2 * groups


class ScaleHead(nn.Module):
    """LC-Net: positive scales (softplus) for the kept channel groups and the block."""

    groups: int

    @nn.compact
    def __call__(self, pooled):
        inverse_softplus_one = math.log(math.e - 1.0)
        raw = nn.Dense(self.groups + 1, bias_init=nn.initializers.constant(inverse_softplus_one))(pooled)
        scales = jax.nn.softplus(raw)
        return scales[:, : self.groups], scales[:, self.groups]

    @staticmethod
    def macs(in_channels: int, groups: int) -> int:
        return in_channels * (groups + 1)


def upsample_nearest(mask: jax.Array, factor: int) -> jax.Array:
    """Repeat each cell of a (B, h, w, G) mask ``factor`` times along h and w."""
    return jnp.repeat(jnp.repeat(mask, factor, axis=1), factor, axis=2)


def dilate_mask(mask: jax.Array, stride: int, out_hw: tuple[int, int]) -> jax.Array:
    """Pixels of a stride-``stride`` 3x3 conv's input that an output ``mask`` reads.

    Places each output cell at the top-left of its ``stride`` x ``stride`` cell on the input
    grid (a transposed one-hot scatter), takes a 3x3 max, and crops to ``out_hw``.
    """
    b, h, w, g = mask.shape
    if stride > 1:
        grid = jnp.zeros((b, h * stride, w * stride, g), mask.dtype)
        mask = grid.at[:, ::stride, ::stride, :].set(mask)
    dilated = nn.max_pool(mask, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    return dilated[:, : out_hw[0], : out_hw[1], :]

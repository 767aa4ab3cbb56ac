"""Dynamic residual blocks (training form: dense compute, multiplied by hard masks).

A block computes its gates from its input, applies them, and returns its output with the
per-block record that the losses, the evaluator and the sparse engine read (see
:func:`block_record`). The semantics are those of the released LAUDNet / LASNet code, in
training and in evaluation: conv1, conv2 and their batch norms run densely; spatial masks
and layer gates multiply only the residual branch's output (after the last batch norm);
channel masks multiply conv1's and conv2's outputs. With running statistics, an executed
output never reads a value the sparse engine skips, so the dense result equals the sparse
one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from laud_jax.models.gates import (
    ChannelMasker,
    ScaleHead,
    SpatialMasker,
    dilate_mask,
    upsample_nearest,
)
from laud_jax.models.specs import BlockSpec

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, name: str, zero_scale: bool = False) -> nn.BatchNorm:
    """BatchNorm with torch's momentum (0.1) and epsilon (1e-5)."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        use_fast_variance=False,
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        name=name,
    )


def expand_groups(mask: jax.Array, channels: int) -> jax.Array:
    """Repeat a (..., G) group mask to (..., channels); channel k belongs to group k // (C / G)."""
    return jnp.repeat(mask, channels // mask.shape[-1], axis=-1)


def apply_group_mask(h: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``h`` (..., C) times a (..., G) group mask (None: unmasked); a single mask broadcasts
    over the channels instead of being repeated."""
    if mask is None:
        return h
    if mask.shape[-1] > 1:
        mask = expand_groups(mask, h.shape[-1])
    return h * mask.astype(h.dtype)


class BlockGates(nn.Module):
    """All gates of one block, computed from the block input ``x``.

    Returns a dict with ``spatial`` (B, Hm, Wm, G), ``channel`` (B, Gc), ``layer`` (B,)
    (``None`` where the mode has no such gate) and, in ``lc`` mode, ``channel_scale``
    (B, Gc) and ``layer_scale`` (B,). Entries of ``forced`` replace the gates' decisions.
    """

    spec: BlockSpec

    @nn.compact
    def __call__(self, x, *, train, tau, gate_offset, forced: Mapping[str, Any] | None, noise=True):
        spec = self.spec
        forced = forced or {}
        kwargs = dict(train=train, tau=tau, gate_offset=gate_offset, noise=noise)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        gates: dict[str, Any] = {"spatial": None, "channel": None, "layer": None}
        if spec.spatial:
            standardize = spec.masker_input == "standardized" and spec.mask_grid != (1, 1)
            gates["spatial"] = SpatialMasker(spec.mask_grid, spec.mask_groups, standardize, name="masker_spatial")(
                x, **kwargs
            )
        if spec.channel:
            gates["channel"] = ChannelMasker(spec.channel_groups, name="masker_channel")(pooled, **kwargs)
        if spec.layer:
            gates["layer"] = SpatialMasker((1, 1), 1, name="layer_gate")(x, **kwargs)[:, 0, 0, 0]
        if spec.mode == "lc":
            gates["channel_scale"], gates["layer_scale"] = ScaleHead(spec.channel_groups, name="scale_head")(pooled)
        for key, value in forced.items():
            if gates.get(key) is None:
                raise ValueError(f"block {spec.name} (mode {spec.mode!r}) has no {key!r} gate to force")
            gates[key] = jnp.broadcast_to(jnp.asarray(value, jnp.float32), gates[key].shape)
        return gates


def block_record(spec: BlockSpec, gates: Mapping[str, Any], masks: BlockMasks, batch: int) -> dict[str, Any]:
    """The per-block aux record: hard masks, per-conv densities and MACs.

    ``density`` and ``macs`` are per sample. ``batch_macs`` is what the sparsity loss reads,
    computed as the released code does: each conv's MACs times the batch mean of its
    spatial (or layer) density times the batch mean of its channel density (squared for
    conv2 of a bottleneck). Spatial masks and layer gates reach the loss only through the
    branch's last conv: the densities of the convs before it count (the dilated and union
    masks) but carry no gradient, as the released code's boolean masks do. Channel
    densities carry gradient in every conv.
    """
    stop = jax.lax.stop_gradient
    ones = jnp.ones((batch,), jnp.float32)
    layer = ones if gates["layer"] is None else gates["layer"]
    if gates["spatial"] is None:
        spatial_out = spatial_mid = spatial_in = ones
        spatial_mask = jnp.ones((batch, 1, 1, 1), jnp.float32)
    else:
        spatial_out = jnp.mean(masks.spatial_out, axis=(1, 2, 3))
        spatial_mid = stop(jnp.mean(masks.spatial_union, axis=(1, 2, 3)))
        spatial_in = stop(jnp.mean(masks.spatial_conv1, axis=(1, 2, 3)))
        spatial_mask = gates["spatial"]
    if gates["channel"] is None:
        channel_mask, channel = jnp.ones((batch, 1), jnp.float32), ones
    else:
        channel_mask, channel = gates["channel"], jnp.mean(gates["channel"], axis=-1)
    # Per conv: (MACs, spatial/layer density, power of the channel density).
    if spec.kind == "bottleneck":
        convs = {
            "conv1": (spec.conv1_macs, spatial_in * stop(layer), 1),
            "conv2": (spec.conv2_macs, spatial_mid * stop(layer), 2),
            "conv3": (spec.conv3_macs, spatial_out * layer, 1),
        }
    else:
        convs = {
            "conv1": (spec.conv1_macs, spatial_in * stop(layer), 1),
            "conv2": (spec.conv2_macs, spatial_out * layer, 1),
        }
    fixed = spec.downsample_macs + spec.masker_macs
    density = {name: where * channel**power for name, (_, where, power) in convs.items()}
    macs = sum(m * density[name] for name, (m, _, _) in convs.items()) + spec.se_macs * layer + fixed
    mean_channel = jnp.mean(channel)
    batch_macs = (
        sum(m * jnp.mean(where) * mean_channel**power for m, where, power in convs.values())
        + spec.se_macs * jnp.mean(layer)
        + fixed
    )
    return {
        "stage": spec.stage,
        "index": spec.index,
        "spatial_mask": spatial_mask,
        "channel_mask": channel_mask,
        "layer_gate": layer,
        "density": density,
        "macs": macs,
        "batch_macs": batch_macs,
        "dense_macs": jnp.asarray(spec.dense_macs, jnp.float32),
        "masker_macs": jnp.asarray(spec.masker_macs, jnp.float32),
        "dynamic": jnp.asarray(spec.mode != "static", jnp.float32),
    }


class BlockMasks:
    """A block's spatial masks at every conv's resolution, and its channel-mask multiply.

    ``spatial_out`` (B, H_out, W_out, G) multiplies the residual branch's output: output
    channel group g is kept where mask g executes. ``spatial_union`` (its union over the
    groups) is where conv2 must run, since conv3 mixes all channels; ``spatial_conv1`` (the
    union dilated to conv2's receptive field) where conv1 must run. The latter two only
    count MACs and tell the sparse engine what to compute.
    """

    def __init__(self, spec: BlockSpec, gates: Mapping[str, Any]):
        self.channel = gates["channel"]
        self.spatial_out = self.spatial_union = self.spatial_conv1 = None
        if gates["spatial"] is not None:
            self.spatial_out = upsample_nearest(gates["spatial"], spec.granularity)
            self.spatial_union = jnp.max(self.spatial_out, axis=-1, keepdims=True)
            stride = spec.stride if spec.kind == "bottleneck" else 1
            self.spatial_conv1 = dilate_mask(self.spatial_union, stride, spec.conv1_hw)

    def channel_mask(self, h: jax.Array) -> jax.Array:
        if self.channel is None:
            return h
        return apply_group_mask(h, self.channel[:, None, None, :])

    def out_spatial(self, h: jax.Array) -> jax.Array:
        return apply_group_mask(h, self.spatial_out)


class _DynamicBlockBase(nn.Module):
    spec: BlockSpec
    dtype: Any = jnp.float32
    zero_init_residual: bool = False

    def conv(self, features, kernel, stride=1, groups=1, name=None):
        pad = kernel // 2
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            feature_group_count=groups,
            use_bias=False,
            kernel_init=conv_init,
            dtype=self.dtype,
            name=name,
        )

    def conv_bn_relu(self, h, conv, bn, masks: BlockMasks):
        """conv -> [channel mask if pre_bn] -> bn -> relu -> [channel mask if post_act]."""
        h = conv(h)
        pre_bn = self.spec.channel_mask_position == "pre_bn"
        if pre_bn:
            h = masks.channel_mask(h)
        h = nn.relu(bn(h))
        if not pre_bn:
            h = masks.channel_mask(h)
        return h

    def finish(self, x, h, gates, masks, train):
        """Identity / downsample, layer gate, residual add, relu, and the aux record."""
        spec = self.spec
        if gates["layer"] is not None:
            scale = gates["layer"]
            if spec.mode == "lc":
                scale = scale * gates["layer_scale"]
            h = h * scale[:, None, None, None].astype(h.dtype)
        identity = x
        if spec.downsample:
            identity = self.conv(spec.out_channels, 1, spec.stride, name="downsample_conv")(x)
            identity = batch_norm(train, "downsample_bn")(identity)
        out = nn.relu(identity + h)
        return out, block_record(spec, gates, masks, x.shape[0])


class DynamicBottleneck(_DynamicBlockBase):
    """1x1 -> 3x3 (stride, groups) [-> SE] -> 1x1 bottleneck with dynamic gates."""

    @nn.compact
    def __call__(self, x, *, train, tau, gate_offset, forced=None, noise=True):
        spec = self.spec
        gates = BlockGates(spec, name="gates")(
            x, train=train, tau=tau, gate_offset=gate_offset, forced=forced, noise=noise
        )
        masks = BlockMasks(spec, gates)
        h = self.conv_bn_relu(x, self.conv(spec.width, 1, name="conv1"), batch_norm(train, "bn1"), masks)
        h = self.conv_bn_relu(
            h, self.conv(spec.width, 3, spec.stride, spec.groups, name="conv2"), batch_norm(train, "bn2"), masks
        )
        if spec.mode == "lc":
            h = apply_group_mask(h, gates["channel_scale"][:, None, None, :])
        if spec.se_channels:
            pool_mask = masks.spatial_union if spec.se_pool == "masked" else None
            h = h * SqueezeExcitation(spec.se_channels, name="se")(h, pool_mask)
        h = self.conv(spec.out_channels, 1, name="conv3")(h)
        h = batch_norm(train, "bn3", zero_scale=self.zero_init_residual)(h)
        h = masks.out_spatial(h)
        return self.finish(x, h, gates, masks, train)


class DynamicBasicBlock(_DynamicBlockBase):
    """3x3 (stride) -> 3x3 basic block with dynamic gates."""

    @nn.compact
    def __call__(self, x, *, train, tau, gate_offset, forced=None, noise=True):
        spec = self.spec
        gates = BlockGates(spec, name="gates")(
            x, train=train, tau=tau, gate_offset=gate_offset, forced=forced, noise=noise
        )
        masks = BlockMasks(spec, gates)
        h = self.conv_bn_relu(x, self.conv(spec.width, 3, spec.stride, name="conv1"), batch_norm(train, "bn1"), masks)
        if spec.mode == "lc":
            h = apply_group_mask(h, gates["channel_scale"][:, None, None, :])
        h = self.conv(spec.out_channels, 3, name="conv2")(h)
        h = batch_norm(train, "bn2", zero_scale=self.zero_init_residual)(h)
        h = masks.out_spatial(h)
        return self.finish(x, h, gates, masks, train)


class SqueezeExcitation(nn.Module):
    """SE: mean over the pixels in ``spatial_mask`` (all when None) -> 1x1 -> relu -> 1x1 -> sigmoid."""

    squeeze: int

    @nn.compact
    def __call__(self, h, spatial_mask=None):
        channels = h.shape[-1]
        h32 = h.astype(jnp.float32)
        if spatial_mask is None:
            pooled = jnp.mean(h32, axis=(1, 2))
        else:
            mask = expand_groups(spatial_mask, channels)
            pooled = jnp.sum(h32 * mask, axis=(1, 2)) / jnp.maximum(jnp.sum(mask, axis=(1, 2)), 1.0)
        s = nn.relu(nn.Dense(self.squeeze, name="reduce")(pooled))
        s = nn.sigmoid(nn.Dense(channels, name="expand")(s))
        return s[:, None, None, :].astype(h.dtype)

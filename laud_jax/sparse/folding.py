"""Inference weights: batch norm folded into the convs, checked against the network spec.

Every conv followed by eval-mode batch norm becomes ``conv(x, w * a) + b`` with
``a = scale / sqrt(var + eps)`` and ``b = bias - mean * a``. Kernels of 1x1 convs are stored
as (C_in, C_out) matrices; 3x3 kernels stay HWIO.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from laud_jax.models.specs import BlockSpec, NetworkSpec

BN_EPSILON = 1e-5  # laud_jax.models.blocks.batch_norm
# Key, among a block's folded gate parameters, of the layer gate as one reduction (fold_layer_gate).
LAYER_GATE_FUSED = "layer_gate_fused"


def _node(tree: Mapping[str, Any], path: tuple[str, ...], what: str) -> Any:
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise ValueError(
                f"variables have no {what} entry {'/'.join(path)}: they do not belong to this "
                "model config (another arch, mode or width?). Build the engine with the config "
                "the variables were trained with."
            )
        node = node[key]
    return node


def _expect_shape(name: str, value: Any, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"variables entry {name} has shape {tuple(value.shape)}, but the model config "
            f"expects {tuple(shape)}: the variables belong to another architecture or width"
        )


def fold_conv_bn(
    params: Mapping[str, Any],
    stats: Mapping[str, Any],
    conv: str,
    bn: str,
    kernel_shape: tuple[int, ...],
    scope: str,
) -> tuple[jax.Array, jax.Array]:
    """Fold eval-mode batch norm ``bn`` into ``conv``'s kernel; returns (kernel, bias)."""
    prefix = f"{scope}/" if scope else ""
    kernel = _node(params, (conv, "kernel"), "parameter")
    _expect_shape(f"params/{prefix}{conv}/kernel", kernel, kernel_shape)
    channels = kernel_shape[-1]
    scale = _node(params, (bn, "scale"), "parameter")
    bias = _node(params, (bn, "bias"), "parameter")
    mean = _node(stats, (bn, "mean"), "batch_stats")
    var = _node(stats, (bn, "var"), "batch_stats")
    for name, value in (("scale", scale), ("bias", bias), ("mean", mean), ("var", var)):
        _expect_shape(f"{prefix}{bn}/{name}", value, (channels,))
    factor = jnp.asarray(scale, jnp.float32) * jax.lax.rsqrt(jnp.asarray(var, jnp.float32) + BN_EPSILON)
    folded = jnp.asarray(kernel, jnp.float32) * factor
    shift = jnp.asarray(bias, jnp.float32) - jnp.asarray(mean, jnp.float32) * factor
    if kernel_shape[:2] == (1, 1):
        folded = folded.reshape(kernel_shape[2], channels)
    return folded, shift


def fold_block(spec: BlockSpec, params: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
    """Folded weights of one block plus its raw gate parameters (for the model's own gates)."""
    scope = spec.name
    p = _node(params, (scope,), "parameter")
    s = _node(stats, (scope,), "batch_stats")
    out: dict[str, Any] = {}
    if spec.kind == "bottleneck":
        out["w1"], out["b1"] = fold_conv_bn(p, s, "conv1", "bn1", (1, 1, spec.in_channels, spec.width), scope)
        out["w2"], out["b2"] = fold_conv_bn(p, s, "conv2", "bn2", (3, 3, spec.width // spec.groups, spec.width), scope)
        out["w3"], out["b3"] = fold_conv_bn(p, s, "conv3", "bn3", (1, 1, spec.width, spec.out_channels), scope)
    else:
        out["w1"], out["b1"] = fold_conv_bn(p, s, "conv1", "bn1", (3, 3, spec.in_channels, spec.width), scope)
        out["w2"], out["b2"] = fold_conv_bn(p, s, "conv2", "bn2", (3, 3, spec.width, spec.out_channels), scope)
    if spec.downsample:
        out["wd"], out["bd"] = fold_conv_bn(
            p, s, "downsample_conv", "downsample_bn", (1, 1, spec.in_channels, spec.out_channels), scope
        )
    if spec.se_channels:
        se = _node(p, ("se",), "parameter")
        for layer, shape in (("reduce", (spec.width, spec.se_channels)), ("expand", (spec.se_channels, spec.width))):
            kernel = _node(se, (layer, "kernel"), "parameter")
            _expect_shape(f"params/{scope}/se/{layer}/kernel", kernel, shape)
            out[f"se_{layer}_w"] = jnp.asarray(kernel, jnp.float32)
            out[f"se_{layer}_b"] = jnp.asarray(_node(se, (layer, "bias"), "parameter"), jnp.float32)
    if spec.channel:
        out.update(group_major(spec, out))
    if spec.mode != "static":
        gates = _node(p, ("gates",), "parameter")
        _check_gates(spec, gates)
        out["gates"] = dict(gates)
        if spec.layer:
            out["gates"][LAYER_GATE_FUSED] = fold_layer_gate(spec, gates)
    return out


def fold_layer_gate(spec: BlockSpec, gates: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The layer gate's decision as one weighted sum over the block input.

    The model pools x to 1 x 1 (mean over H x W), applies the 1 x 1 conv (execute and skip
    logits) and executes where ``logit_execute - logit_skip >= offset``. The same number is
    ``sum_hwc x * w + b`` with ``w = (k_execute - k_skip) / (H W)`` per channel and
    ``b = b_execute - b_skip``: one fused reduction instead of a pool, a division, a conv
    and a subtraction (equal up to float rounding of the sum).
    """
    conv = _node(gates, ("layer_gate", "conv"), "gate parameter")
    kernel = jnp.asarray(conv["kernel"], jnp.float32).reshape(spec.in_channels, 2)
    bias = jnp.asarray(conv["bias"], jnp.float32)
    pixels = spec.h_in * spec.w_in
    return {"w": (kernel[:, 0] - kernel[:, 1]) / pixels, "b": bias[0] - bias[1]}


def conv2_group_layout(spec: BlockSpec) -> str:
    """Group-major layout of a channel-gated bottleneck's conv2 kernel (see :func:`group_major`).

    ``out``: (G_out, G_in, 3, 3, cg, cg), gathered slab by slab and then transposed (best
    while the gathered kernel fits in cache); ``in``: (G_in, 3, 3, cg, G_out, cg), whose
    transpose back to HWIO moves large contiguous chunks (best for big kernels).
    """
    gathered_bytes = 9 * spec.width * spec.width  # a quarter of the fp32 kernel
    return "out" if gathered_bytes <= 1 << 20 else "in"


def group_major(spec: BlockSpec, folded: dict[str, Any]) -> dict[str, jax.Array]:
    """Copies of conv1/conv2 kernels with the channel-mask group as the leading axis.

    Channel skipping gathers whole groups; in these layouts each gathered group is one
    contiguous slab (the HWIO kernels would be gathered element by element).
    ``w1g``: (G, cg, C_in) for a bottleneck (used transposed), (G, 3, 3, C_in, cg) for a
    basic block; ``w2g``: see :func:`conv2_group_layout` (bottleneck, dense conv2) or
    (G_in, 3, 3, cg, C_out) (basic block).
    """
    groups, cg = spec.channel_groups, spec.channel_granularity
    w1, w2 = folded["w1"], folded["w2"]
    out = {}
    if spec.kind == "bottleneck":
        out["w1g"] = jnp.transpose(w1.reshape(spec.in_channels, groups, cg), (1, 2, 0))
        if spec.groups == 1:
            blocks = w2.reshape(3, 3, groups, cg, groups, cg)
            order = (4, 2, 0, 1, 3, 5) if conv2_group_layout(spec) == "out" else (2, 0, 1, 3, 4, 5)
            out["w2g"] = jnp.transpose(blocks, order)
    else:
        out["w1g"] = jnp.transpose(w1.reshape(3, 3, spec.in_channels, groups, cg), (3, 0, 1, 2, 4))
        out["w2g"] = jnp.transpose(w2.reshape(3, 3, groups, cg, spec.out_channels), (2, 0, 1, 3, 4))
    return out


def _check_gates(spec: BlockSpec, gates: Mapping[str, Any]) -> None:
    needed = []
    if spec.spatial:
        needed.append((("masker_spatial", "conv", "kernel"), (1, 1, spec.in_channels, 2 * spec.mask_groups)))
    if spec.channel:
        hidden = max(spec.channel_groups // 16, 16)
        needed.append((("masker_channel", "fc2", "kernel"), (hidden, 2 * spec.channel_groups)))
    if spec.layer:
        needed.append((("layer_gate", "conv", "kernel"), (1, 1, spec.in_channels, 2)))
    for path, shape in needed:
        kernel = _node(gates, path, "gate parameter")
        _expect_shape(f"params/{spec.name}/gates/{'/'.join(path)}", kernel, shape)


def fold_network(spec: NetworkSpec, variables: Mapping[str, Any]) -> dict[str, Any]:
    """All inference weights of the network: stem, blocks (in order) and classifier."""
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a dict with 'params' and 'batch_stats' (what model.init returns)")
    params = variables["params"]
    stats = variables.get("batch_stats")
    if stats is None:
        raise ValueError("variables have no 'batch_stats': pass the full variables dict, not only params")
    stem = spec.stem[0]
    folded: dict[str, Any] = {}
    folded["stem_w"], folded["stem_b"] = fold_conv_bn(
        params, stats, "stem_conv", "stem_bn", (stem.kernel, stem.kernel, stem.in_channels, stem.out_channels), ""
    )
    folded["blocks"] = [fold_block(block, params, stats) for block in spec.blocks]
    head = spec.head[0]
    kernel = _node(params, ("fc", "kernel"), "parameter")
    _expect_shape("params/fc/kernel", kernel, (head.in_channels, head.out_channels))
    folded["fc_w"] = jnp.asarray(kernel, jnp.float32)
    folded["fc_b"] = jnp.asarray(_node(params, ("fc", "bias"), "parameter"), jnp.float32)
    extra = sorted(k for k in params if k.startswith("layer") and k not in {b.name for b in spec.blocks})
    if extra:
        raise ValueError(
            f"variables have blocks {extra} that the model config does not: they belong to a deeper architecture"
        )
    return folded


def cast_weights(folded: dict[str, Any], dtype: np.dtype) -> dict[str, Any]:
    """Cast conv/dense weights to the compute dtype; gate parameters stay float32."""

    def cast(path, leaf):
        if any(getattr(key, "key", None) == "gates" for key in path):
            return leaf
        return leaf.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, folded)

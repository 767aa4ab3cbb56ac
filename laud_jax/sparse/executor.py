"""Block executors: run one residual block on BN-folded weights, doing only the unmasked work.

``run_block`` executes a block under a static :class:`~laud_jax.sparse.routing.BlockPlan`
with the backend's primitives (plan ``dense`` on a gated block: the whole block, then the
gates applied, see :func:`masked_branch`); ``dense_masked_block`` is the reference that computes
everything and multiplies by the masks (what the training-form model does).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from laud_jax.models.blocks import apply_group_mask, expand_groups
from laud_jax.models.gates import dilate_mask, upsample_nearest
from laud_jax.models.specs import BlockSpec
from laud_jax.sparse import routing as rt
from laud_jax.sparse.folding import conv2_group_layout
from laud_jax.sparse.routing import BlockPlan


@dataclasses.dataclass
class Branch:
    """Weights of a block's residual branch restricted to its active channels.

    ``channels``: indices of the kept conv1/conv2 output channels (None: all). With
    ``pre_bn`` channel masks a skipped channel is not zero but the constant relu(bias):
    conv1's constants enter conv2 through an extra all-ones input channel (``indicator``),
    conv2's enter conv3 as ``const2`` (a full-width vector).
    """

    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array
    w3: jax.Array | None = None
    b3: jax.Array | None = None
    channels: jax.Array | None = None
    groups: int = 1
    indicator: bool = False
    expand_const1: jax.Array | None = None  # grouped conv2: conv1 constants at full width
    scale1: jax.Array | None = None  # lc, basic block: scale on conv1's kept channels
    scale2: jax.Array | None = None  # lc, bottleneck: scale on conv2's kept channels
    const2: jax.Array | None = None
    layer_scale: jax.Array | None = None  # lc: (B,) scale of the whole branch


def _take(a: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    return jnp.take(a, index, axis=axis, mode="fill", fill_value=0)


def full_branch(spec: BlockSpec, p: dict[str, Any]) -> Branch:
    return Branch(p["w1"], p["b1"], p["w2"], p["b2"], p.get("w3"), p.get("b3"), groups=spec.groups)


def select_branch(spec: BlockSpec, p: dict[str, Any], gates: dict[str, Any], groups: jax.Array) -> Branch:
    """The branch of one sample: weights of its listed active channel groups (sentinel -> zeros).

    ``gates`` hold that sample's gates without the batch axis. Weights are gathered from
    the group-major copies made at folding (``w1g``, ``w2g``), so each gathered piece is
    contiguous, then laid out as the convs expect.
    """
    idx = rt.channel_index(groups, spec.channel_granularity)
    width = spec.width
    kept_channels = idx.shape[0]
    pre_bn = spec.channel_mask_position == "pre_bn"
    kept = expand_groups(gates["channel"], width)  # (width,)
    scale = None
    if spec.mode == "lc":
        scale = expand_groups(gates["channel_scale"], width)
    w1 = _take(p["w1g"], groups, 0)
    if spec.kind == "bottleneck":  # (K, cg, C_in): XLA folds the transpose into the matmul
        w1 = w1.reshape(kept_channels, spec.in_channels).T
    else:
        w1 = jnp.transpose(w1, (1, 2, 3, 0, 4)).reshape(3, 3, spec.in_channels, kept_channels)
    branch = Branch(w1, _take(p["b1"], idx, 0), p["w2"], p["b2"], channels=idx, groups=spec.groups)
    const1 = jax.nn.relu(p["b1"]) * (1.0 - kept) if pre_bn else None
    if spec.kind == "basic":
        if scale is not None:
            branch.scale1 = _take(scale, idx, 0)
            const1 = None if const1 is None else const1 * scale
        w2 = _take(p["w2g"], groups, 0)  # (K, 3, 3, cg, C_out)
        branch.w2 = jnp.transpose(w2, (1, 2, 0, 3, 4)).reshape(3, 3, kept_channels, spec.out_channels)
        if const1 is not None:
            extra = jnp.einsum("hwkc,k->hwc", p["w2"], const1)
            branch.w2 = jnp.concatenate([branch.w2, extra[:, :, None, :]], axis=2)
            branch.indicator = True
        return branch
    if spec.groups == 1:
        if conv2_group_layout(spec) == "out":
            rows = _take(p["w2g"], groups, 0)  # (K_out, G_in, 3, 3, cg_in, cg_out)
            w2 = jnp.transpose(_take(rows, groups, 1), (2, 3, 1, 4, 0, 5))
        else:
            rows = _take(p["w2g"], groups, 4)  # (G_in, 3, 3, cg_in, K_out, cg_out)
            w2 = jnp.transpose(_take(rows, groups, 0), (1, 2, 0, 3, 4, 5))
        branch.w2 = w2.reshape(3, 3, kept_channels, kept_channels)
        if const1 is not None:
            skipped = jnp.einsum("yxkc,k->yxc", p["w2"], const1)  # (3, 3, width)
            extra = _take(skipped, idx, 2)
            branch.w2 = jnp.concatenate([branch.w2, extra[:, :, None, :]], axis=2)
            branch.indicator = True
    else:  # grouped conv2 runs at full width on the scattered kept channels
        branch.expand_const1 = const1 if const1 is not None else jnp.zeros((width,), p["b1"].dtype)
    branch.b2 = _take(p["b2"], idx, 0)
    if scale is not None:
        branch.scale2 = _take(scale, idx, 0)
    branch.w3 = _take(p["w3"], idx, 0)
    branch.b3 = p["b3"]
    if pre_bn:
        const2 = jax.nn.relu(p["b2"]) * (1.0 - kept)
        branch.const2 = const2 * scale if scale is not None else const2
    return branch


def _expand(h: jax.Array, channels: jax.Array, width: int, const: jax.Array) -> jax.Array:
    """Scatter kept channels (..., K) into full width; skipped channels take ``const``."""
    full = jnp.broadcast_to(const.astype(h.dtype), (*h.shape[:-1], width))
    return full.at[..., channels].set(h, mode="drop")


def _squeeze_excite(spec: BlockSpec, p: dict[str, Any], branch: Branch, pooled: jax.Array):
    """SE scales for the kept channels and conv3's extra bias from skipped constants.

    ``pooled``: (B, K) mean of the kept conv2 channels over the executed pixels.
    """
    if branch.channels is not None:
        const = branch.const2 if branch.const2 is not None else jnp.zeros((spec.width,), pooled.dtype)
        pooled = _expand(pooled, branch.channels, spec.width, const)
    hidden = jax.nn.relu(pooled @ p["se_reduce_w"] + p["se_reduce_b"])
    scale = jax.nn.sigmoid(hidden @ p["se_expand_w"] + p["se_expand_b"])  # (B, width)
    extra = None
    if branch.const2 is not None:
        extra = (branch.const2 * scale) @ p["w3"]
    if branch.channels is not None:
        scale = _take(scale, branch.channels, 1)
    return scale, extra


def _conv3_bias(spec: BlockSpec, p: dict[str, Any], branch: Branch, se_extra: jax.Array | None) -> jax.Array:
    if se_extra is not None:
        return branch.b3 + se_extra
    if branch.const2 is not None:
        return branch.b3 + branch.const2 @ p["w3"]
    return branch.b3


def _dense_conv12(ops, spec: BlockSpec, p: dict[str, Any], x: jax.Array, branch: Branch):
    """A bottleneck's conv1, conv2 (and SE) on the whole grid; returns (h, SE's conv3 extra bias)."""
    h = ops.conv(x, branch.w1, branch.b1, relu=True)
    if branch.indicator:
        h = jnp.concatenate([h, jnp.ones((*h.shape[:-1], 1), h.dtype)], axis=-1)
    if branch.expand_const1 is not None:
        h = _expand(h, branch.channels, spec.width, branch.expand_const1)
    h = ops.conv(
        h,
        branch.w2,
        p["b2"] if branch.expand_const1 is not None else branch.b2,
        stride=spec.stride,
        groups=branch.groups,
        relu=True,
    )
    if branch.expand_const1 is not None:
        h = _take(h, branch.channels, -1)
    if branch.scale2 is not None:
        h = h * branch.scale2
    se_extra = None
    if spec.se_channels:
        scale, se_extra = _squeeze_excite(spec, p, branch, jnp.mean(h.astype(jnp.float32), axis=(1, 2)))
        h = h * scale[:, None, None, :].astype(h.dtype)
    return h, se_extra


def dense_branch(ops, spec: BlockSpec, p: dict[str, Any], x: jax.Array, branch: Branch) -> jax.Array:
    """Residual branch on the whole grid (all pixels; channels as ``branch`` selects)."""
    if spec.kind == "basic":
        h = ops.conv(x, branch.w1, branch.b1, stride=spec.stride, relu=True)
        if branch.scale1 is not None:
            h = h * branch.scale1
        if branch.indicator:
            h = jnp.concatenate([h, jnp.ones((*h.shape[:-1], 1), h.dtype)], axis=-1)
        out = ops.conv(h, branch.w2, branch.b2)
    else:
        h, se_extra = _dense_conv12(ops, spec, p, x, branch)
        bias = _conv3_bias(spec, p, branch, se_extra)
        if bias.ndim == 2:  # per-sample bias (SE with skipped constants)
            out = jnp.dot(h, branch.w3) + bias[:, None, None, :]
        else:
            out = ops.conv(h, branch.w3, bias)
    if branch.layer_scale is not None:
        out = out * branch.layer_scale[:, None, None, None].astype(out.dtype)
    return out


def spatial_branch(
    ops,
    spec: BlockSpec,
    plan: BlockPlan,
    p: dict[str, Any],
    x: jax.Array,
    identity: jax.Array,
    base: jax.Array,
    routing: dict[str, Any],
    cell_count: jax.Array,
    branch: Branch,
) -> jax.Array:
    """Gather conv1's pixels -> conv1 -> conv2 on patches -> [conv3] -> scatter into the identity."""
    batch = x.shape[0]
    starts = routing["starts"][: plan.cells]
    cells = routing["cells"][: plan.cells]
    in_place = not spec.downsample
    if spec.se_channels and spec.se_pool == "dense":
        # SE pools conv2's output over every pixel: conv1 and conv2 run densely; conv3 and
        # the write-back only on the active patches.
        full, se_extra = _dense_conv12(ops, spec, p, x, branch)
        size = spec.granularity
        h = jax.vmap(lambda o: lax.dynamic_slice(full, (o[0], o[1], o[2], 0), (1, size, size, full.shape[-1]))[0])(
            starts
        )
        bias = _conv3_bias(spec, p, branch, None if se_extra is None else se_extra[0])
        return ops.conv3_scatter(h, branch.w3, bias, identity, base, starts, cells, cell_count, in_place=in_place)
    h1, w1_ = spec.conv1_hw
    if plan.pixels == batch * h1 * w1_:  # conv1 runs everywhere: no gather, no scatter
        row_map = None
        stride1 = spec.stride if spec.kind == "basic" else 1
        rows = ops.conv(x, branch.w1, branch.b1, stride=stride1, relu=True).reshape(-1, branch.w1.shape[-1])
    else:
        # each conv1-grid pixel's row in ``rows`` (routing's, built with the pixel list;
        # inactive pixels point past every capacity and read zeros)
        row_map = routing["row_map"]
        taps = routing["taps"][: plan.pixels] if spec.kind == "basic" else routing["pixels"][: plan.pixels, None]
        w1 = branch.w1.reshape(-1, branch.w1.shape[-1])
        rows = ops.gather_matmul(x.reshape(-1, x.shape[-1]), taps, w1, branch.b1, relu=True)
    if branch.scale1 is not None:
        rows = rows * branch.scale1
    if branch.indicator:
        rows = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=-1)
    if branch.expand_const1 is not None:
        rows = _expand(rows, branch.channels, spec.width, branch.expand_const1)
    stride, _ = rt.patch_geometry(spec)
    geometry = dict(grid=(batch, *spec.conv1_hw), size=spec.granularity, stride=stride)
    if spec.kind == "basic":
        h = ops.patch_conv(rows, row_map, starts, branch.w2, branch.b2, groups=1, relu=False, **geometry)
        return ops.scatter_residual(h, identity, base, starts, cell_count, in_place=in_place)
    grouped = branch.expand_const1 is not None
    h = ops.patch_conv(
        rows,
        row_map,
        starts,
        branch.w2,
        p["b2"] if grouped else branch.b2,
        groups=branch.groups,
        relu=True,
        **geometry,
    )
    if grouped:
        h = _take(h, branch.channels, -1)
    if branch.scale2 is not None:
        h = h * branch.scale2
    se_extra = None
    if spec.se_channels:
        sample = starts[:, 0]
        valid = (jnp.arange(plan.cells) < cell_count).astype(jnp.float32)
        sums = (
            jnp.zeros((batch + 1, h.shape[-1]), jnp.float32)
            .at[sample]
            .add(jnp.sum(h.astype(jnp.float32), axis=(1, 2)) * valid[:, None], mode="drop")[:batch]
        )
        pixels_on = (
            jnp.zeros((batch + 1,), jnp.float32).at[sample].add(valid * spec.granularity**2, mode="drop")[:batch]
        )
        scale, se_extra = _squeeze_excite(spec, p, branch, sums / jnp.maximum(pixels_on, 1.0)[:, None])
        h = h * jnp.take(scale, sample, axis=0, mode="clip")[:, None, None, :].astype(h.dtype)
        if se_extra is not None:
            se_extra = se_extra[0]  # per-sample execution: batch is 1
    bias = _conv3_bias(spec, p, branch, se_extra)
    return ops.conv3_scatter(h, branch.w3, bias, identity, base, starts, cells, cell_count, in_place=in_place)


def _identity(ops, spec: BlockSpec, p: dict[str, Any], x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(identity, base): the shortcut, and the block output where the branch adds nothing."""
    if spec.downsample:
        identity = ops.conv(x, p["wd"], p["bd"], stride=spec.stride)
        return identity, jax.nn.relu(identity)
    return x, x  # block inputs are relu outputs: relu(x) == x


def _sample_gates(gates: dict[str, Any], b: jax.Array) -> dict[str, Any]:
    return {k: (None if v is None else lax.dynamic_index_in_dim(v, b, keepdims=False)) for k, v in gates.items()}


def _one_sample(ops, spec, plan, p, x, identity, base, gates, routing, b) -> jax.Array:
    """Branch of sample ``b`` (channel gates; batch 1 or one iteration of the per-sample loop)."""
    sample_gates = _sample_gates(gates, b)
    branch = select_branch(spec, p, sample_gates, routing["groups"][b, : plan.groups])
    if spec.mode == "lc":
        # Times the gate: exact even where a speculative plan runs a gated-off block.
        branch.layer_scale = (sample_gates["layer"] * sample_gates["layer_scale"])[None]
    xb = lax.dynamic_slice_in_dim(x, b, 1)
    ib = lax.dynamic_slice_in_dim(identity, b, 1)
    bb = lax.dynamic_slice_in_dim(base, b, 1)
    if spec.spatial:
        if plan.per_sample:
            keys = ("starts", "cells", "pixels", "row_map", "taps")
            sample_routing = {k: routing[k][b] for k in keys if k in routing}
            count = routing["n_cells"][b]
        else:
            sample_routing, count = routing, routing["n_cells"]
        return spatial_branch(ops, spec, plan, p, xb, ib, bb, sample_routing, count, branch)
    return jax.nn.relu(ib + dense_branch(ops, spec, p, xb, branch))


def run_block(
    ops,
    spec: BlockSpec,
    plan: BlockPlan,
    p: dict[str, Any],
    x: jax.Array,
    gates: dict[str, Any],
    routing: dict[str, Any],
) -> jax.Array:
    """One block's output, executing only what ``plan`` and the routing leave active.

    The shortcut is computed first and fenced off (an optimization barrier): XLA:CPU would
    otherwise run it concurrently with the branch, and on a busy machine the extra thread
    hand-offs cost more than the overlap gains.
    """
    identity, base = _identity(ops, spec, p, x)
    if spec.downsample:
        identity, base, x = lax.optimization_barrier((identity, base, x))
    if plan.run == "skip":
        return base
    work = _any_output(gates)
    if work is None:
        return _gated_block(ops, spec, plan, p, x, gates, routing, identity, base)
    # Gates that switch off every sample's output: the block is its shortcut, decided on the
    # device (exact for any gate values, so a plan kept across inputs stays exact and fast).
    return lax.cond(
        work,
        lambda: _gated_block(ops, spec, plan, p, x, gates, routing, identity, base).astype(base.dtype),
        lambda: base,
    )


def _any_output(gates: dict[str, Any]) -> jax.Array | None:
    """Whether the gates may let any output of the block differ from the shortcut: some
    spatial cell and some layer gate on (channel gates alone never switch a block off:
    skipped channels may carry constants). None: the block has neither gate."""
    terms = [jnp.any(gates[key] > 0) for key in ("spatial", "layer") if gates.get(key) is not None]
    if not terms:
        return None
    return functools.reduce(jnp.logical_and, terms)


def _gated_block(ops, spec, plan, p, x, gates, routing, identity, base) -> jax.Array:
    """``run_block`` past the shortcut, for a plan that runs the branch."""
    if plan.run == "dense":  # gated blocks: computed densely, then masked (exact for any masks)
        branch = masked_branch(ops, spec, p, x, gates) if gates else dense_branch(ops, spec, p, x, full_branch(spec, p))
        return jax.nn.relu(identity + branch)
    batch = x.shape[0]
    if spec.channel:
        if not plan.per_sample:
            return _one_sample(ops, spec, plan, p, x, identity, base, gates, routing, 0)
        samples = routing["samples"]
        count = jnp.sum(gates["layer"] > 0).astype(jnp.int32) if spec.layer else batch

        def one(i, out):
            b = samples[i]
            value = _one_sample(ops, spec, plan, p, x, identity, base, gates, routing, b)
            return lax.dynamic_update_slice_in_dim(out, value.astype(out.dtype), b, 0)

        return lax.fori_loop(0, count, one, base)
    if spec.spatial:
        return spatial_branch(ops, spec, plan, p, x, identity, base, routing, routing["n_cells"], full_branch(spec, p))
    # layer mode (no channel gate)
    gate = gates["layer"]
    if plan.samples == batch:
        h = dense_branch(ops, spec, p, x, full_branch(spec, p))
        return jax.nn.relu(identity + h * gate[:, None, None, None].astype(h.dtype))
    samples = routing["samples"][: plan.samples]  # padding slots hold ``batch``: dropped by the scatter
    h = dense_branch(ops, spec, p, _take(x, samples, 0), full_branch(spec, p))
    value = jax.nn.relu(_take(identity, samples, 0) + h).astype(base.dtype)
    return base.at[samples].set(value, mode="drop", unique_indices=True)


# ----------------------------------------------------------------------------- dense reference


def dense_masked_block(ops, spec: BlockSpec, p: dict[str, Any], x: jax.Array, gates: dict[str, Any]) -> jax.Array:
    """The training-form computation on folded weights: everything computed, then masked."""
    identity, _ = _identity(ops, spec, p, x)
    return jax.nn.relu(identity + _reference_branch(ops, spec, p, x, gates))


def masked_branch(ops, spec: BlockSpec, p: dict[str, Any], x: jax.Array, gates: dict[str, Any]) -> jax.Array:
    """The residual branch computed densely and gated as ``model.apply`` gates it in eval.

    Without channel gates or SE pooling over the executed pixels, the plain dense branch
    times the upsampled spatial mask and the layer gate is exact (an executed output never
    reads a masked inner value); otherwise every stage is masked as in the reference.
    """
    masked_pool = spec.spatial and bool(spec.se_channels) and spec.se_pool != "dense"
    if spec.channel or masked_pool:
        return _reference_branch(ops, spec, p, x, gates)
    h = dense_branch(ops, spec, p, x, full_branch(spec, p))
    if spec.spatial:
        h = apply_group_mask(h, upsample_nearest(gates["spatial"], spec.granularity))
    if spec.layer:
        h = h * gates["layer"][:, None, None, None].astype(h.dtype)
    return h


def _reference_branch(ops, spec: BlockSpec, p: dict[str, Any], x: jax.Array, gates: dict[str, Any]) -> jax.Array:
    """The residual branch with every gate applied where the training-form model applies it."""
    pre_bn = spec.channel_mask_position == "pre_bn"
    channel = None if gates.get("channel") is None else expand_groups(gates["channel"], spec.width)[:, None, None, :]
    # Output channel group g is kept where mask g executes; the inner convs run on the union
    # of the groups (conv3 mixes all channels); SE pooling densely leaves them unmasked.
    out_mask = union = conv1_mask = None
    if gates.get("spatial") is not None:
        out_mask = upsample_nearest(gates["spatial"], spec.granularity)  # (B, H, W, G)
        union = jnp.max(out_mask, axis=-1, keepdims=True)
        stride = spec.stride if spec.kind == "bottleneck" else 1
        conv1_mask = dilate_mask(union, stride, spec.conv1_hw)
    dense_se = bool(spec.se_channels) and spec.se_pool == "dense"
    inner_conv1, inner_union = (None, None) if dense_se else (conv1_mask, union)

    def conv_bn_relu(h, w, b, stride, groups, mask):
        h = ops.conv(h, w, jnp.zeros_like(b), stride=stride, groups=groups)
        if channel is not None and pre_bn:
            h = h * channel
        h = jax.nn.relu(h + b)
        if channel is not None and not pre_bn:
            h = h * channel
        return apply_group_mask(h, mask)

    first_stride = spec.stride if spec.kind == "basic" else 1
    h = conv_bn_relu(x, p["w1"], p["b1"], first_stride, 1, inner_conv1)
    if spec.kind == "bottleneck":
        h = conv_bn_relu(h, p["w2"], p["b2"], spec.stride, spec.groups, inner_union)
        if spec.mode == "lc":
            h = h * expand_groups(gates["channel_scale"], spec.width)[:, None, None, :]
        if spec.se_channels:
            h32 = h.astype(jnp.float32)
            if union is None or dense_se:
                pooled = jnp.mean(h32, axis=(1, 2))
            else:
                m = expand_groups(union, spec.width)
                pooled = jnp.sum(h32 * m, axis=(1, 2)) / jnp.maximum(jnp.sum(m, axis=(1, 2)), 1.0)
            hidden = jax.nn.relu(pooled @ p["se_reduce_w"] + p["se_reduce_b"])
            h = h * jax.nn.sigmoid(hidden @ p["se_expand_w"] + p["se_expand_b"])[:, None, None, :].astype(h.dtype)
        h = ops.conv(h, p["w3"], p["b3"])
    else:
        if spec.mode == "lc":
            h = h * expand_groups(gates["channel_scale"], spec.width)[:, None, None, :]
        h = ops.conv(h, p["w2"], p["b2"])
    h = apply_group_mask(h, out_mask)
    if gates.get("layer") is not None:
        scale = gates["layer"] * gates["layer_scale"] if spec.mode == "lc" else gates["layer"]
        h = h * scale[:, None, None, None].astype(h.dtype)
    return h

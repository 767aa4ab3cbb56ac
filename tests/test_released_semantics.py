"""Training mode against the released LAUDNet semantics, and the straight-through gradient.

The reference (tests/fixtures/released_laudnet.py) is an independent float64 reimplementation
of the released bottleneck network written from its description. With the Gumbel noise off,
the same weights and the same input, laud_jax's training-mode logits, MAC ratio and the
gradients of CE + lambda * sparsity reaching every parameter (maskers and gates included)
must equal the reference's, on a non-square input with stride-2 blocks and S > 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import released_laudnet

from laud_jax import losses
from laud_jax.models import build_model, network_spec
from laud_jax.models.gates import ChannelMasker, SpatialMasker

IMAGE = (32, 48, 3)  # stem 16 x 24, stages 16x24 / 8x12 / 4x6 / 2x3
BATCH = 4
TAU = 0.7
PROGRESS = 0.1  # bounds part-way relaxed: both block and network terms act
SPARSITY_WEIGHT = 10.0
TARGET = 0.5
CASES = {
    "spatial": {"mode": "spatial", "granularity": (2, 2, 2, 1)},
    "spatial_groups": {"mode": "spatial", "granularity": (2, 4, 1, 1), "mask_groups": 2},
    "layer": {"mode": "layer"},
    "channel_pre_bn": {"mode": "channel", "channel_mask_position": "pre_bn"},
    "both_pre_bn": {"mode": "spatial+channel", "granularity": (2, 2, 2, 1), "channel_mask_position": "pre_bn"},
}


def model_config(case: str) -> dict:
    return {"arch": "resnet_tiny", "num_classes": 5, **CASES[case]}


def randomized_params(cfg: dict, seed: int) -> dict:
    """Initial parameters with random gates (about half the decisions skip) and random BN affines."""
    model = build_model(cfg)
    variables = model.init({"params": jax.random.key(seed)}, jnp.zeros((1, *IMAGE)), train=False)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables["params"])
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if "gates" in name and "kernel" in name:
            leaf = jax.random.normal(key, leaf.shape) * 2.0 / np.sqrt(leaf.shape[-2])
        elif "gates" in name and "bias" in name:
            leaf = 0.3 * jax.random.normal(key, leaf.shape)
        elif "bn" in name and "scale" in name:
            leaf = jax.random.uniform(key, leaf.shape, minval=0.5, maxval=1.5)
        elif "bn" in name and "bias" in name:
            leaf = 0.2 * jax.random.normal(key, leaf.shape)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out), variables["batch_stats"]


def batch(seed: int):
    key_x, key_y = jax.random.split(jax.random.key(seed))
    images = jax.random.normal(key_x, (BATCH, *IMAGE))
    labels = jax.random.randint(key_y, (BATCH,), 0, 5)
    return images, labels


GATE_BIASES = {
    "spatial_mask": ("masker_spatial", "conv"),
    "channel_mask": ("masker_channel", "fc2"),
    "layer_gate": ("layer_gate", "conv"),
}


def mixed_gate_params(cfg: dict, seed: int, images) -> tuple[dict, dict]:
    """Random parameters whose every gate executes 20-80% of its decisions on ``images``
    (training mode, noise off).

    Block by block, the execute biases of each gate are shifted (bisection) until its mean
    mask lies in that range: random gates alone tend to switch whole blocks on or off.
    """
    model = build_model(cfg)
    params, batch_stats = randomized_params(cfg, seed)
    rates = jax.jit(
        lambda p: [
            {key: jnp.mean(b[key]) for key in GATE_BIASES}
            for b in model.apply(
                {"params": p, "batch_stats": batch_stats},
                images,
                train=True,
                tau=1.0,
                gumbel_noise=False,
                mutable=["batch_stats"],
            )[0][1]["blocks"]
        ]
    )
    spec = network_spec(cfg, IMAGE)
    for i, block in enumerate(spec.blocks):
        for key, (gate, layer) in GATE_BIASES.items():
            if gate not in params[block.name]["gates"]:
                continue
            bias = params[block.name]["gates"][gate][layer]["bias"]
            half = bias.shape[0] // 2

            def shifted(delta, bias=bias, half=half):
                return bias.at[:half].add(delta)

            low, high = -20.0, 20.0
            for _ in range(40):
                mid = (low + high) / 2
                params[block.name]["gates"][gate][layer]["bias"] = shifted(mid)
                rate = float(rates(params)[i][key])
                if 0.2 <= rate <= 0.8:
                    break
                low, high = (mid, high) if rate < 0.2 else (low, mid)
            assert 0.2 <= rate <= 0.8, (block.name, gate, rate)
    return params, batch_stats


def reference_kwargs(cfg: dict) -> dict:
    spec = network_spec(cfg, IMAGE)
    modes = tuple(spec.config.mode)
    strides = tuple(next(b.stride for b in spec.blocks if b.stage == s) for s in range(len(modes)))
    return dict(modes=modes, strides=strides, granularity=tuple(spec.config.granularity), tau=TAU)


@functools.cache
def ours_and_reference(case: str):
    cfg = model_config(case)
    model = build_model(cfg)
    images, labels = batch(seed=11)
    params, batch_stats = mixed_gate_params(cfg, 3, images)

    def our_loss(p):
        (logits, aux), _ = model.apply(
            {"params": p, "batch_stats": batch_stats},
            images,
            train=True,
            tau=jnp.asarray(TAU),
            gumbel_noise=False,
            mutable=["batch_stats"],
        )
        loss, parts = losses.total_loss(
            logits,
            labels,
            aux,
            jnp.asarray(PROGRESS),
            target_rate=TARGET,
            sparsity_weight=SPARSITY_WEIGHT,
            kd_alpha=0.0,
        )
        return loss, (logits, parts["mac_ratio"], aux)

    (loss, (logits, mac_ratio, aux)), grads = jax.jit(jax.value_and_grad(our_loss, has_aux=True))(params)
    ours = {"loss": loss, "logits": logits, "mac_ratio": mac_ratio, "grads": grads, "aux": aux}

    kwargs = reference_kwargs(cfg)
    with jax.enable_x64(True):

        def ref_loss(p):
            return released_laudnet.loss(
                p,
                np.asarray(images, np.float64),
                jnp.asarray(labels),
                target_rate=TARGET,
                sparsity_weight=SPARSITY_WEIGHT,
                progress=PROGRESS,
                **kwargs,
            )

        (ref_value, ref_parts), ref_grads = jax.value_and_grad(ref_loss, has_aux=True)(
            released_laudnet.to_numpy(params)
        )
        reference = released_laudnet.to_numpy(
            {
                "loss": ref_value,
                "logits": ref_parts["logits"],
                "mac_ratio": ref_parts["mac_ratio"],
                "grads": ref_grads,
                "margin": ref_parts["margin"],
            }
        )
    return jax.device_get(ours), reference


@pytest.mark.parametrize("case", list(CASES))
def test_training_logits_and_mac_ratio_equal_the_released_network(case):
    ours, ref = ours_and_reference(case)
    # Every gate mixes execute and skip (else the semantics would not show), and no decision
    # sits so close to its threshold that float32 and float64 could disagree.
    densities = [float(np.mean(b["density"]["conv3"])) for b in ours["aux"]["blocks"]]
    assert all(0.04 <= d <= 0.8 for d in densities), densities
    assert float(ref["margin"]) > 1e-4
    scale = float(np.max(np.abs(ref["logits"])))
    np.testing.assert_allclose(ours["logits"], ref["logits"], rtol=1e-4, atol=1e-4 * scale)
    assert float(ours["mac_ratio"]) == pytest.approx(float(ref["mac_ratio"]), rel=1e-5)
    assert float(ours["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_training_gradients_equal_the_released_network(case):
    ours, ref = ours_and_reference(case)
    ours_flat = {
        jax.tree_util.keystr(p): np.asarray(v, np.float64)
        for p, v in jax.tree_util.tree_leaves_with_path(ours["grads"])
    }
    ref_flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(ref["grads"])}
    assert ours_flat.keys() == ref_flat.keys()
    gate_leaves = [name for name in ref_flat if "gates" in name]
    assert gate_leaves
    for name, expected in ref_flat.items():
        norm = float(np.linalg.norm(expected))
        if name in gate_leaves and "bias" in name:
            assert norm > 1e-6, f"{name}: no gradient reaches this gate in the reference"
        error = float(np.linalg.norm(ours_flat[name] - expected))
        assert error <= 2e-3 * norm + 1e-7, f"{name}: |ours - released| = {error:.3g}, |released| = {norm:.3g}"


# ----------------------------------------------------------------------------- straight-through


GATE_NAMES = {"spatial": "masker_spatial", "layer": "layer_gate", "channel": "masker_channel"}


def gate_biases(params, mode: str):
    """Paths of every execute/skip bias of the mode's gates."""
    name = GATE_NAMES[mode]
    return [
        p
        for p, _ in jax.tree_util.tree_leaves_with_path(params)
        if name in jax.tree_util.keystr(p)
        and "bias" in jax.tree_util.keystr(p)
        and ("fc2" in jax.tree_util.keystr(p) or mode != "channel")
    ]


def mac_ratio_bias_gradient(mode: str, tau: float, execute_bias: float | None = None):
    """d(network MAC ratio)/d(bias) of each gate (noise off), as {path: (B, 2G) gradient}."""
    cfg = {"arch": "resnet_tiny", "num_classes": 5, "mode": mode, "granularity": (2, 2, 2, 1)}
    model = build_model(cfg)
    images, _ = batch(seed=2)
    params, batch_stats = mixed_gate_params(cfg, 5, images)
    paths = gate_biases(params, mode)
    if execute_bias is not None:  # every gate undecided: zero kernels, execute a hair above skip

        def set_gate(path, value):
            name = jax.tree_util.keystr(path)
            if GATE_NAMES[mode] not in name:
                return value
            if "kernel" in name and (mode != "channel" or "fc2" in name):
                return jnp.zeros_like(value)
            if path in paths:
                half = value.shape[0] // 2
                return jnp.concatenate([jnp.full((half,), execute_bias), jnp.zeros((half,))])
            return value

        params = jax.tree_util.tree_map_with_path(set_gate, params)

    def mac_ratio(p):
        (_, aux), _ = model.apply(
            {"params": p, "batch_stats": batch_stats},
            images,
            train=True,
            tau=jnp.asarray(tau),
            gumbel_noise=False,
            mutable=["batch_stats"],
        )
        return aux["batch_macs"] / aux["dense_macs"]

    grads = jax.grad(mac_ratio)(params)
    flat = dict(jax.tree_util.tree_leaves_with_path(grads))
    return {p: np.asarray(flat[p]) for p in paths}


@pytest.mark.parametrize("mode", ["spatial", "layer", "channel"])
def test_raising_the_execute_bias_raises_the_mac_ratio(mode):
    """Straight-through sign: d ratio / d execute-bias > 0 and d ratio / d skip-bias < 0, every gate."""
    grads = mac_ratio_bias_gradient(mode, tau=1.0)
    assert grads
    for path, g in grads.items():
        half = g.shape[0] // 2
        assert np.all(g[:half] > 0), (jax.tree_util.keystr(path), g)
        assert np.all(g[half:] < 0), (jax.tree_util.keystr(path), g)
        np.testing.assert_allclose(g[:half], -g[half:], rtol=1e-4)


@pytest.mark.parametrize("mode", ["spatial", "layer", "channel"])
def test_straight_through_gradient_scales_with_inverse_temperature(mode):
    """At logits near the threshold the soft gate's slope is 1 / (4 tau): tau 0.5 gives 10x tau 5."""
    cold = mac_ratio_bias_gradient(mode, tau=0.5, execute_bias=0.01)
    hot = mac_ratio_bias_gradient(mode, tau=5.0, execute_bias=0.01)
    for path in cold:
        ratio = cold[path] / hot[path]
        np.testing.assert_allclose(ratio, 10.0, rtol=0.01, err_msg=jax.tree_util.keystr(path))


def test_noise_off_gates_are_the_evaluation_threshold_and_need_no_rng():
    x = jax.random.normal(jax.random.key(0), (3, 8, 12, 6))
    for masker, inputs in ((SpatialMasker((4, 6), 2), x), (ChannelMasker(5), jnp.mean(x, axis=(1, 2)))):
        variables = masker.init(jax.random.key(1), inputs, train=False, tau=1.0)
        variables = jax.tree.map(lambda v: jax.random.normal(jax.random.key(2), v.shape), variables)
        train = masker.apply(variables, inputs, train=True, tau=0.3, noise=False)  # no 'gumbel' rng given
        evaluation = masker.apply(variables, inputs, train=False, tau=0.3)
        np.testing.assert_array_equal(np.asarray(train), np.asarray(evaluation))
        assert 0 < float(jnp.mean(evaluation)) < 1

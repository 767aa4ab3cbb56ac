"""Model zoo: layout, MAC accounting, gate semantics and gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from laud_jax.models import build_model, init_variables, model_config, network_spec

DYNAMIC_MODES = ("spatial", "channel", "layer", "spatial+channel", "lc")
# Small variants: bottleneck (resnet_tiny), basic (ResNet-18 layout, narrow), RegNetY (SE, groups).
TINY = {"arch": "resnet_tiny", "num_classes": 7}
TINY_BASIC = {"arch": "resnet18", "num_classes": 7, "stage_widths": (4, 8, 8, 16), "stem_width": 8}
TINY_REGNET = {"arch": "regnety_400mf", "num_classes": 7}
IMAGE = {"resnet_tiny": (32, 32, 3), "resnet18": (64, 64, 3), "regnety_400mf": (64, 64, 3)}


def count_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def shapes(cfg, image_shape=(224, 224, 3)):
    model = build_model(cfg)
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x), images)


def strip_gates(variables):
    """The static model's variables: drop every block's gate parameters."""

    def strip(tree):
        return {k: strip(v) for k, v in tree.items() if k != "gates"} if isinstance(tree, dict) else tree

    return {col: strip(tree) for col, tree in variables.items()}


def randomize_bn(variables, key):
    """Non-trivial BN statistics and affine parameters, so eval mode is a real test."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, leaf), k in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if "'mean'" in name or ("bn" in name and "'bias'" in name):
            leaf = 0.1 * jax.random.normal(k, leaf.shape)
        elif "'var'" in name or ("bn" in name and "'scale'" in name):
            leaf = jax.random.uniform(k, leaf.shape, minval=0.5, maxval=1.5)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def unit_lc_scales(variables):
    """LC-Net scale heads with zero kernel and bias softplus^-1(1): every scale is 1."""

    def fix(path, value):
        name = jax.tree_util.keystr(path)
        if "scale_head" not in name:
            return value
        return jnp.full_like(value, np.log(np.e - 1)) if "bias" in name else jnp.zeros_like(value)

    return jax.tree_util.tree_map_with_path(fix, variables)


@functools.cache
def model_and_vars(cfg_items):
    cfg = dict(cfg_items)
    model = build_model(cfg)
    image = IMAGE[cfg["arch"]]
    variables = init_variables(model, 0, image)
    return model, randomize_bn(variables, jax.random.key(1)), image


def images_for(image, batch=2, seed=3):
    return jax.random.normal(jax.random.key(seed), (batch, *image))


def forced(spec, value):
    """Force every gate of every block to ``value``."""
    out = []
    for block in spec.blocks:
        gates = {}
        if block.spatial:
            gates["spatial"] = value
        if block.channel:
            gates["channel"] = value
        if block.layer:
            gates["layer"] = value
        out.append(gates)
    return out


# ----------------------------------------------------------------------------- layout, MACs


@pytest.mark.parametrize(
    "arch,expected",
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("resnet101", 44_549_160),
        ("regnety_400mf", 4_344_144),
        ("regnety_800mf", 6_432_512),
        ("regnety_1_6gf", 11_202_430),
    ],
)
def test_parameter_count_equals_torchvision(arch, expected):
    variables = shapes({"arch": arch, "num_classes": 1000})
    assert count_params(variables["params"]) == expected


def test_resnet50_parameter_shapes_follow_torchvision_layout():
    params = shapes({"arch": "resnet50"})["params"]
    # torchvision OIHW shapes, transposed to HWIO.
    expected = {
        ("stem_conv", "kernel"): (7, 7, 3, 64),
        ("layer1_0", "conv1", "kernel"): (1, 1, 64, 64),
        ("layer1_0", "conv2", "kernel"): (3, 3, 64, 64),
        ("layer1_0", "conv3", "kernel"): (1, 1, 64, 256),
        ("layer1_0", "downsample_conv", "kernel"): (1, 1, 64, 256),
        ("layer2_0", "conv1", "kernel"): (1, 1, 256, 128),
        ("layer2_0", "conv2", "kernel"): (3, 3, 128, 128),  # v1.5: stride on the 3x3
        ("layer4_2", "conv3", "kernel"): (1, 1, 512, 2048),
        ("fc", "kernel"): (2048, 1000),
        ("fc", "bias"): (1000,),
    }
    for path, shape in expected.items():
        node = params
        for key in path:
            node = node[key]
        assert node.shape == shape, path
    blocks = [k for k in params if k.startswith("layer")]
    assert len(blocks) == 16
    assert not any("downsample_conv" in params[k] for k in ("layer1_1", "layer2_1", "layer4_2"))


def hand_count_macs(cfg, image_shape) -> int:
    """MACs of every conv/dense layer from traced output shapes and kernel shapes."""
    model = build_model(cfg)
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)

    def run(x):
        variables = model.init({"params": jax.random.key(0)}, x)
        _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
        return variables["params"], state["intermediates"]

    params, inter = jax.eval_shape(run, images)
    flat_params = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
    total = 0
    for path, out in jax.tree_util.tree_leaves_with_path(inter):
        name = jax.tree_util.keystr(path[:-2])  # strip "__call__" and tuple index
        kernel = flat_params.get(name + "['kernel']")
        if kernel is None:
            continue
        if len(kernel.shape) == 4:  # conv: H_out * W_out * C_out * (kh * kw * C_in / groups)
            kh, kw, cin_per_group, cout = kernel.shape
            total += out.shape[1] * out.shape[2] * cout * kh * kw * cin_per_group
        else:  # dense on pooled features
            total += int(np.prod(kernel.shape))
    return total


@pytest.mark.parametrize(
    "arch,pinned",
    [("resnet50", 4_089_184_256), ("resnet101", 7_801_405_440), ("regnety_800mf", 833_856_256)],
)
def test_dense_macs_match_independent_count(arch, pinned):
    cfg = {"arch": arch, "num_classes": 1000}
    spec = network_spec(cfg, (224, 224, 3))
    assert spec.dense_macs == pinned
    assert hand_count_macs(cfg, (224, 224, 3)) == pinned


@pytest.mark.parametrize("groups", [1, 2])
def test_dynamic_mac_ratio_follows_forced_densities(groups):
    """Forced spatial + channel masks of known density give the independently computed MACs.

    With G mask groups, conv1 and conv2 run where any group executes (conv1 on the dilated
    union), conv3's output group g where group g executes.
    """
    cfg = {**TINY, "mode": "spatial+channel", "granularity": (4, 2, 2, 1), "mask_groups": groups}
    model, variables, image = model_and_vars(tuple(cfg.items()))
    spec = network_spec(cfg, image)
    rng = np.random.default_rng(0)
    masks, expected = [], spec.fixed_macs
    for block in spec.blocks:
        gh, gw = block.mask_grid
        spatial = np.zeros((1, gh, gw, groups), np.float32)
        for g in range(groups):
            cells = rng.permutation(gh * gw)[: max(1, (gh * gw) // 3)]
            spatial[0, :, :, g].flat[cells] = 1.0
        channel = np.zeros((1, block.channel_groups), np.float32)
        channel[0, rng.permutation(block.channel_groups)[: block.channel_groups // 2]] = 1.0
        masks.append({"spatial": spatial, "channel": channel})
        # Independent receptive-field count: input pixel (r, c) is read by output (i, j)
        # iff |r - s*i| <= 1 and |c - s*j| <= 1 (3x3 conv2, padding 1, stride s).
        cell = np.ones((block.granularity,) * 2)
        out_masks = [np.kron(spatial[0, :, :, g], cell) for g in range(groups)]
        union = np.max(out_masks, axis=0)
        s = block.stride
        read = np.zeros((block.h_in, block.w_in), bool)
        for i, j in zip(*np.nonzero(union)):
            read[max(s * i - 1, 0) : s * i + 2, max(s * j - 1, 0) : s * j + 2] = True
        rho_in, rho_mid, rho_c = read.mean(), union.mean(), channel.mean()
        rho_out = np.mean([m.mean() for m in out_masks])
        expected += (
            block.conv1_macs * rho_in * rho_c
            + block.conv2_macs * rho_mid * rho_c**2
            + block.conv3_macs * rho_out * rho_c
            + block.downsample_macs
            + block.masker_macs
        )
    x = images_for(image, batch=1)
    _, aux = jax.jit(lambda v, x, m: model.apply(v, x, masks=m))(variables, x, masks)
    np.testing.assert_allclose(float(aux["macs"][0]), expected, rtol=1e-5)
    assert float(aux["macs"][0]) / float(aux["dense_macs"]) < 0.75


def test_layer_gate_macs_and_per_sample_accounting():
    cfg = {**TINY, "mode": "layer"}
    model, variables, image = model_and_vars(tuple(cfg.items()))
    spec = network_spec(cfg, image)
    gate = np.array([1.0, 0.0], np.float32)
    masks = [{"layer": gate} for _ in spec.blocks]
    _, aux = jax.jit(lambda v, x, m: model.apply(v, x, masks=m))(variables, images_for(image), masks)
    on = spec.fixed_macs + sum(b.dense_macs + b.masker_macs for b in spec.blocks)
    off = spec.fixed_macs + sum(b.downsample_macs + b.masker_macs for b in spec.blocks)
    np.testing.assert_allclose(np.asarray(aux["macs"]), [on, off], rtol=1e-6)


# ----------------------------------------------------------------------------- gate semantics


def equivalence_cases():
    cases = [(TINY, mode, "post_act") for mode in DYNAMIC_MODES]
    cases += [(TINY, "spatial+channel", "pre_bn"), (TINY, "lc", "pre_bn")]
    # Basic blocks and RegNetY (SE, group conv): one model mixing the modes per stage.
    cases += [(TINY_BASIC, ("spatial", "spatial+channel", "lc", "layer"), "post_act")]
    cases += [(TINY_REGNET, ("spatial+channel", "lc", "spatial", "channel"), "post_act")]
    cases += [({**TINY_REGNET, "se_pool": "dense", "mask_groups": 2}, "spatial+channel", "post_act")]
    return cases


@pytest.mark.parametrize("base,mode,position", equivalence_cases())
def test_all_ones_masks_equal_static_model(base, mode, position):
    granularity = (2, 2, 1, 1)
    cfg = {**base, "mode": mode, "granularity": granularity, "channel_mask_position": position}
    model, variables, image = model_and_vars(tuple(cfg.items()))
    spec = network_spec(cfg, image)
    static = build_model({**base, "mode": "static"})
    x = images_for(image)
    masks = forced(spec, 1.0)
    if "lc" in mode:  # LC-Net's learned scales multiply what is kept: make them exactly 1
        variables = unit_lc_scales(variables)
    logits, aux = jax.jit(lambda v, x, m: model.apply(v, x, masks=m))(variables, x, masks)
    expected, static_aux = jax.jit(static.apply)(strip_gates(variables), x)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=2e-5, atol=2e-5)
    masker = sum(b.masker_macs for b in spec.blocks)
    np.testing.assert_allclose(np.asarray(aux["macs"]), float(static_aux["dense_macs"]) + masker, rtol=1e-6)


@pytest.mark.parametrize("mode,gate", [("spatial", "spatial"), ("layer", "layer"), ("lc", "layer")])
def test_skipped_non_downsampling_block_outputs_relu_identity(mode, gate):
    cfg = {**TINY, "mode": mode, "granularity": (2, 2, 1, 1)}
    model, variables, image = model_and_vars(tuple(cfg.items()))
    spec = network_spec(cfg, image)
    target = next(i for i, b in enumerate(spec.blocks) if not b.downsample)
    masks = [{} for _ in spec.blocks]
    masks[target] = {gate: 0.0}

    def run(v, x):
        _, state = model.apply(v, x, masks=masks, capture_intermediates=True, mutable=["intermediates"])
        inter = state["intermediates"]
        return inter[spec.blocks[target - 1].name]["__call__"][0][0], inter[spec.blocks[target].name]["__call__"][0][0]

    block_in, block_out = jax.jit(run)(variables, images_for(image))
    assert float(jnp.max(block_in)) > 0  # a real input, not zeros
    np.testing.assert_allclose(np.asarray(block_out), np.asarray(jax.nn.relu(block_in)), atol=1e-6)


def test_eval_masks_are_deterministic_and_follow_threshold():
    cfg = {**TINY, "mode": "spatial+channel", "granularity": (2, 2, 1, 1)}
    model, variables, image = model_and_vars(tuple(cfg.items()))
    # Push the spatial masker biases near the threshold so masks are mixed.
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: (
            v * 0.0 if "masker_spatial" in jax.tree_util.keystr(p) and "bias" in jax.tree_util.keystr(p) else v
        ),
        variables,
    )
    x = images_for(image, batch=4)
    apply = jax.jit(lambda v, x, o: model.apply(v, x, gate_offset=o))
    _, aux1 = apply(variables, x, 0.0)
    _, aux2 = apply(variables, x, 0.0)
    for b1, b2 in zip(aux1["blocks"], aux2["blocks"]):
        np.testing.assert_array_equal(np.asarray(b1["spatial_mask"]), np.asarray(b2["spatial_mask"]))
    densities = [float(jnp.mean(b["spatial_mask"])) for b in aux1["blocks"]]
    assert any(0.0 < d < 1.0 for d in densities), densities
    # A large positive offset turns every gate off; a large negative one turns all on.
    _, off = apply(variables, x, 1e6)
    _, on = apply(variables, x, -1e6)
    for b_off, b_on in zip(off["blocks"], on["blocks"]):
        assert float(jnp.max(b_off["spatial_mask"])) == 0.0 and float(jnp.max(b_off["channel_mask"])) == 0.0
        assert float(jnp.min(b_on["spatial_mask"])) == 1.0 and float(jnp.min(b_on["channel_mask"])) == 1.0


# ----------------------------------------------------------------------------- training form


@pytest.mark.parametrize("mode", DYNAMIC_MODES)
def test_straight_through_gradient_reaches_maskers(mode):
    cfg = {**TINY, "mode": mode, "granularity": (2, 2, 1, 1)}
    model, variables, image = model_and_vars(tuple(cfg.items()))
    x = images_for(image, batch=4)
    weights = jax.random.normal(jax.random.key(5), (4, 7))

    @jax.jit
    def grads(params):
        def loss(params):
            (logits, aux), _ = model.apply(
                {**variables, "params": params},
                x,
                train=True,
                tau=jnp.asarray(5.0),
                rngs={"gumbel": jax.random.key(9)},
                mutable=["batch_stats"],
            )
            return jnp.sum(logits * weights) + jnp.mean(aux["macs"]) / aux["dense_macs"]

        return jax.grad(loss)(params)

    g = grads(variables["params"])
    names = {
        "spatial": ["masker_spatial"],
        "channel": ["masker_channel"],
        "layer": ["layer_gate"],
        "spatial+channel": ["masker_spatial", "masker_channel"],
        "lc": ["layer_gate", "masker_channel", "scale_head"],
    }[mode]
    for name in names:
        leaves = [v for p, v in jax.tree_util.tree_leaves_with_path(g) if name in jax.tree_util.keystr(p)]
        assert leaves, name
        norm = float(sum(jnp.sum(jnp.abs(v)) for v in leaves))
        assert np.isfinite(norm) and norm > 0, (name, norm)


def test_new_temperature_does_not_recompile():
    cfg = {**TINY, "mode": "spatial+channel", "granularity": (2, 2, 1, 1)}
    model, variables, image = model_and_vars(tuple(cfg.items()))

    @jax.jit
    def step(v, x, tau, key):
        (logits, _), _ = model.apply(v, x, train=True, tau=tau, rngs={"gumbel": key}, mutable=["batch_stats"])
        return logits

    x = images_for(image)
    for tau in (5.0, 1.0, 0.1):
        step(variables, x, jnp.asarray(tau, jnp.float32), jax.random.key(0)).block_until_ready()
    assert step._cache_size() == 1


def test_training_masks_are_stochastic_hard_and_batch_stats_update():
    cfg = {**TINY, "mode": "spatial", "granularity": (2, 2, 1, 1)}
    model, variables, image = model_and_vars(tuple(cfg.items()))
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: (
            v * 0.0 if "masker_spatial" in jax.tree_util.keystr(p) and "bias" in jax.tree_util.keystr(p) else v
        ),
        variables,
    )
    x = images_for(image, batch=4)

    @jax.jit
    def run(key):
        return model.apply(
            variables, x, train=True, tau=jnp.asarray(1.0), rngs={"gumbel": key}, mutable=["batch_stats"]
        )

    (_, aux_a), updates = run(jax.random.key(0))
    (_, aux_b), _ = run(jax.random.key(1))
    mask_a = np.asarray(aux_a["blocks"][0]["spatial_mask"])
    mask_b = np.asarray(aux_b["blocks"][0]["spatial_mask"])
    assert set(np.unique(mask_a)) <= {0.0, 1.0}
    assert not np.array_equal(mask_a, mask_b)
    old = variables["batch_stats"]["stem_bn"]["mean"]
    assert not np.allclose(np.asarray(updates["batch_stats"]["stem_bn"]["mean"]), np.asarray(old))


# ----------------------------------------------------------------------------- registry


def test_registry_accepts_dicts_configdicts_and_overrides():
    cfg = ml_collections.ConfigDict({"arch": "resnet_tiny", "num_classes": 5, "mode": "spatial"})
    model = build_model(cfg, granularity="2-2-1-1")
    assert model.config.granularity == (2, 2, 1, 1)
    assert model.config.mode == ("spatial",) * 4
    assert build_model(model.config).config == model.config
    mixed = build_model(arch="resnet_tiny", mode="spatial, spatial,layer,lc", granularity="4,2,1,1")
    assert mixed.config.mode == ("spatial", "spatial", "layer", "lc")
    assert mixed.config.granularity == (4, 2, 1, 1)


@pytest.mark.parametrize(
    "cfg,message",
    [
        ({"arch": "resnet51"}, "unknown arch"),
        ({"arch": "resnet50", "mode": "sparse"}, "unknown mode"),
        ({"arch": "resnet50", "granularity": (4, 4, 2)}, "4 stages"),
        ({"arch": "resnet50", "widht": 3}, "unknown model config keys"),
        ({"arch": "resnet50", "mode": "channel", "channel_granularity": 3}, "must divide"),
        ({"arch": "resnet50", "channel_mask_position": "after"}, "channel_mask_position"),
        ({"arch": "regnety_400mf", "se_pool": "global"}, "se_pool"),
    ],
)
def test_bad_model_configs_are_rejected(cfg, message):
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_granularity_that_does_not_divide_the_feature_map_is_rejected():
    with pytest.raises(ValueError, match="does not divide its 14x14"):
        network_spec({"arch": "resnet50", "mode": "spatial", "granularity": (4, 4, 4, 1)}, (224, 224, 3))


def test_standardized_spatial_masker_ignores_per_channel_offset_and_scale():
    """With masker_input='standardized', the masker sees each channel relative to its grid."""
    from laud_jax.models.gates import SpatialMasker

    masker = SpatialMasker((4, 4), 1, standardize=True)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 5))
    variables = masker.init(jax.random.key(1), x, train=False, tau=1.0)
    variables["params"]["conv"]["bias"] = jnp.zeros_like(variables["params"]["conv"]["bias"])
    shifted = 3.0 * x + jnp.arange(5.0)

    def logits_fn(v, x):
        return masker.apply(v, x, train=False, tau=1.0, gate_offset=0.0)

    np.testing.assert_array_equal(np.asarray(logits_fn(variables, x)), np.asarray(logits_fn(variables, shifted)))
    mask = np.asarray(logits_fn(variables, x))
    assert 0.0 < mask.mean() < 1.0
    plain = SpatialMasker((4, 4), 1)
    assert not np.array_equal(
        np.asarray(plain.apply(variables, x, train=False, tau=1.0)),
        np.asarray(plain.apply(variables, shifted + 10.0, train=False, tau=1.0)),
    )


@pytest.mark.parametrize(
    "size_in,size_out", [((16, 12), (4, 3)), ((14, 14), (4, 4)), ((7, 9), (2, 3)), ((8, 8), (8, 8))]
)
def test_adaptive_avg_pool_equals_torch_bins(size_in, size_out):
    """Equal bins (reshape + mean) and unequal ones (averaging matrices) both follow torch's
    adaptive_avg_pool2d bin edges: start = floor(i * n / m), end = ceil((i + 1) * n / m)."""
    from laud_jax.models.gates import adaptive_avg_pool

    x = np.random.default_rng(0).standard_normal((2, *size_in, 3))
    expected = np.zeros((2, *size_out, 3))
    for i in range(size_out[0]):
        for j in range(size_out[1]):
            h0, h1 = (i * size_in[0]) // size_out[0], -((-(i + 1) * size_in[0]) // size_out[0])
            w0, w1 = (j * size_in[1]) // size_out[1], -((-(j + 1) * size_in[1]) // size_out[1])
            expected[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    got = adaptive_avg_pool(jnp.asarray(x, jnp.float32), size_out)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_mode_alias_both_is_stored_as_spatial_plus_channel():
    """'both' (the old name) is accepted and normalized; the two configs build the same spec."""
    old = model_config({**TINY, "mode": ("both", "spatial", "both", "static")})
    new = model_config({**TINY, "mode": ("spatial+channel", "spatial", "spatial+channel", "static")})
    assert old == new and old.mode[0] == "spatial+channel"
    blocks = network_spec(old, (32, 32, 3)).blocks
    assert blocks[0].spatial and blocks[0].channel and not blocks[0].layer

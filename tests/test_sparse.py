"""Sparse engine: equivalence to the dense masked model, index construction, bad input."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laud_jax.models import build_model, network_spec
from laud_jax.models.gates import dilate_mask, upsample_nearest
from laud_jax.sparse import SparseEngine, capacity, capacity_ladder, gate_shapes
from laud_jax.sparse import engine as engine_module
from laud_jax.sparse.folding import fold_layer_gate
from laud_jax.sparse.routing import BlockPlan, active_first, conv1_mask, plan_block
from laud_jax.sparse.synthetic import random_masks, random_variables
from laud_jax.sparse.xla_ops import XlaOps

TINY = {"arch": "resnet_tiny", "num_classes": 7}
TINY_BASIC = {"arch": "resnet18", "num_classes": 7, "stage_widths": (4, 8, 8, 16), "stem_width": 8}
TINY_REGNET = {"arch": "regnety_400mf", "num_classes": 7, "stage_depths": (1, 2, 1, 1)}
IMAGE = {"resnet_tiny": (32, 32, 3), "resnet18": (32, 32, 3), "regnety_400mf": (64, 64, 3)}


@functools.cache
def setup(items: tuple, gate_bias: float | None = None, image: tuple | None = None):
    """Model, random variables (random batch norm, so folding is exercised) and image shape."""
    cfg = dict(items)
    model = build_model(cfg)
    image = image or IMAGE[cfg["arch"]]
    return model, random_variables(model, image, seed=1, random_bn=True, gate_bias=gate_bias), image


def images_for(image, batch, seed=3):
    return jax.random.normal(jax.random.key(seed), (batch, *image))


def reference(model, variables, x, masks=None, gate_offset=0.0):
    return jax.jit(lambda v, x, m, o: model.apply(v, x, masks=m, gate_offset=o))(variables, x, masks, gate_offset)


def assert_close(out, ref):
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=2e-5 * max(scale, 1.0))


def cfg_items(base, **kw):
    return tuple(sorted({**base, **kw}.items()))


# ----------------------------------------------------------------------------- equivalence


# Each case mixes modes per stage, so few compiled programs cover every mode, both channel
# mask positions, granularities S = 1, 2, 4, strides 1 and 2, basic blocks and RegNetY (SE,
# group conv).
EQUIVALENCE = [
    (TINY, ("spatial", "spatial+channel", "channel", "lc"), (2, 2, 1, 1), "post_act", 1),
    (TINY, ("spatial", "spatial+channel", "channel", "lc"), (2, 2, 1, 1), "post_act", 3),
    (TINY, ("spatial+channel", "layer", "spatial", "lc"), (4, 1, 2, 1), "pre_bn", 1),
    (TINY, ("spatial+channel", "layer", "spatial", "lc"), (4, 1, 2, 1), "pre_bn", 3),
    (TINY_BASIC, ("spatial", "spatial+channel", "lc", "layer"), (2, 2, 1, 1), "pre_bn", 2),
    (TINY_REGNET, ("spatial+channel", "lc", "spatial", "channel"), (2, 2, 1, 1), "post_act", 2),
    # SE pooling over every pixel (the released RegNets): conv1/conv2 dense, conv3 sparse.
    (
        {**TINY_REGNET, "se_pool": "dense", "masker_input": "standardized"},
        ("spatial", "spatial+channel", "lc", "spatial+channel"),
        (2, 2, 1, 1),
        "pre_bn",
        2,
    ),
]


@pytest.mark.parametrize("base,mode,granularity,position,batch", EQUIVALENCE)
def test_forced_masks_match_dense_masked_model(base, mode, granularity, position, batch):
    items = cfg_items(base, mode=mode, granularity=granularity, channel_mask_position=position)
    model, variables, image = setup(items)
    spec = network_spec(dict(items), image)
    masks = random_masks(spec, batch, 0.5, seed=batch)
    x = images_for(image, batch)
    expected, _ = reference(model, variables, x, masks)
    logits, info = SparseEngine(dict(items), variables).apply(x, masks=masks)
    assert info.execution == "planned"
    assert {p.run for p in info.plans} >= {"sparse"}
    assert_close(logits, expected)


# Non-square images: every block's map and mask grid has H != W, and S differs between
# stages, so a height/width mix-up in the index lists, the patch starts or either write-back
# changes the logits. Each case runs backend="xla" with one write-back, and backend="dense".
NON_SQUARE = [
    (TINY, (32, 64, 3), ("spatial", "spatial+channel", "spatial", "spatial+channel"), (2, 4, 1, 1), "loop"),
    (TINY, (96, 64, 3), ("spatial+channel", "spatial", "spatial+channel", "spatial"), (4, 2, 2, 1), "scatter"),
    (TINY_BASIC, (32, 64, 3), ("spatial", "spatial+channel", "spatial", "spatial"), (2, 2, 1, 1), "scatter"),
    # SE pooling over every pixel: conv3 runs on patches cut from the dense conv2 output.
    (
        {**TINY_REGNET, "se_pool": "dense"},
        (64, 96, 3),
        ("spatial+channel", "spatial", "spatial+channel", "spatial"),
        (2, 2, 1, 1),
        "loop",
    ),
]


@pytest.mark.parametrize(
    "base,image,mode,granularity,writeback", NON_SQUARE, ids=["tiny-32x64", "tiny-96x64", "basic-32x64", "regnet-64x96"]
)
def test_non_square_images_match_model(base, image, mode, granularity, writeback):
    items = cfg_items(base, mode=mode, granularity=granularity)
    model, variables, _ = setup(items, image=image)
    spec = network_spec(dict(items), image)
    assert all(b.mask_grid[0] != b.mask_grid[1] for b in spec.blocks)
    masks = random_masks(spec, 2, 0.5, seed=5)
    x = images_for(image, 2)
    expected, _ = reference(model, variables, x, masks)
    engine = SparseEngine(dict(items), variables)
    engine.ops = XlaOps(writeback=writeback)  # the engine's backend="xla" with this write-back
    logits, info = engine.apply(x, masks=masks)
    assert [p.run for p in info.plans] == ["sparse"] * len(spec.blocks)
    assert_close(logits, expected)
    assert_close(SparseEngine(dict(items), variables, backend="dense")(x, masks=masks), expected)


@pytest.mark.parametrize("mode", [("spatial", "spatial+channel", "layer", "lc"), "lc"])
def test_model_gates_stepwise_and_speculative_match_model(mode):
    """Gates computed by the model's own maskers; zero gate biases make about half execute."""
    items = cfg_items(TINY, mode=mode, granularity=(2, 2, 1, 1))
    model, variables, image = setup(items, gate_bias=0.0)
    x = images_for(image, 2, seed=5)
    expected, aux = reference(model, variables, x)
    gates = [
        np.asarray(b["spatial_mask"]).mean() * np.asarray(b["channel_mask"]).mean() * np.asarray(b["layer_gate"]).mean()
        for b in aux["blocks"]
    ]
    assert any(0.0 < g < 1.0 for g in gates), gates
    engine = SparseEngine(dict(items), variables)
    logits, info = engine.apply(x)  # no earlier input: stepwise, which primes the plans
    assert info.execution == "stepwise"
    assert_close(logits, expected)
    logits, info = engine.apply(x)  # the same counts fit: one program, no per-block round trips
    assert info.execution == "speculative"
    assert_close(logits, expected)
    other = images_for(image, 2, seed=6)  # counts may or may not fit: exact either way
    expected_other, _ = reference(model, variables, other)
    logits, info = engine.apply(other)
    assert info.execution in ("speculative", "stepwise")
    assert_close(logits, expected_other)


def test_folded_layer_gate_decides_as_the_model_pool_and_conv():
    """The engine's layer gate (one weighted sum, ``folding.fold_layer_gate``) against a
    float64 NumPy evaluation of the model's form: mean over the block input's H x W, 1 x 1
    conv, execute - skip >= offset. A stride-2 block on non-square input, so dividing by the
    output's pixels or swapping H and W in the fold would move the threshold."""
    items = cfg_items(TINY, mode="layer", granularity=1)
    _, variables, _ = setup(items)
    spec = next(b for b in network_spec(dict(items), (24, 40, 3)).blocks if b.stride == 2)
    assert spec.h_in * spec.w_in != spec.h_out * spec.w_out and spec.h_in != spec.w_in
    gates = variables["params"][spec.name]["gates"]
    fused = fold_layer_gate(spec, gates)
    x = np.abs(np.random.default_rng(0).standard_normal((64, spec.h_in, spec.w_in, spec.in_channels)))
    kernel = np.asarray(gates["layer_gate"]["conv"]["kernel"], np.float64).reshape(spec.in_channels, 2)
    bias = np.asarray(gates["layer_gate"]["conv"]["bias"], np.float64)
    logits = x.mean(axis=(1, 2)) @ kernel + bias
    diff = logits[:, 0] - logits[:, 1]
    for offset in np.quantile(diff, [0.25, 0.5, 0.75]):
        decided = np.asarray(engine_module.fused_layer_gate(fused, jnp.asarray(x, jnp.float32), jnp.float32(offset)))
        clear = np.abs(diff - offset) > 1e-4 * np.abs(diff).max()
        assert 0 < decided[clear].sum() < clear.sum()
        np.testing.assert_array_equal(decided[clear], (diff >= offset)[clear].astype(np.float32))


def test_layer_gates_at_batch_one_skip_what_the_model_skips():
    """Batch 1, the model's own layer gates (the first block's on for some inputs, off for
    others; every gate off past a large offset): each block's executing-sample count is the
    model's gate, and the logits match, stepwise and speculative."""
    items = cfg_items(TINY, mode="layer", granularity=1)
    model, variables, image = setup(items, gate_bias=0.0)
    engine = SparseEngine(dict(items), variables)
    seen = set()
    for seed, offset in [(s, 0.1) for s in range(6)] + [(0, 100.0)]:
        x = images_for(image, 1, seed=seed)
        expected, aux = reference(model, variables, x, gate_offset=offset)
        logits, info = engine.apply(x, gate_offset=offset)
        assert_close(logits, expected)
        gates = tuple(int(np.asarray(b["layer_gate"])[0]) for b in aux["blocks"])
        assert [c["samples"] for c in info.counts] == list(gates)
        if info.execution == "stepwise":  # kept plans run a gated-off block's skip on the device
            assert info.runs == tuple("sparse" if g else "skip" for g in gates)
        seen.add((info.execution, gates))
    assert len({g for _, g in seen}) == 3 and "speculative" in {e for e, _ in seen}


def test_speculative_program_refuses_counts_past_its_plans():
    """The fit test runs inside the speculative program: plans kept from an input where few
    cells and groups execute must not be used for one where all do (stepwise instead, exact),
    and the grown plans then hold for it (speculative)."""
    items = cfg_items(TINY, mode=("spatial", "spatial+channel", "layer", "lc"), granularity=(2, 2, 1, 1))
    model, variables, image = setup(items, gate_bias=0.0)
    x = images_for(image, 2, seed=5)
    engine = SparseEngine(dict(items), variables)
    engine.apply(x, gate_offset=2.0)  # primes small plans
    assert engine.apply(x, gate_offset=2.0)[1].execution == "speculative"
    expected, _ = reference(model, variables, x, gate_offset=-50.0)
    logits, info = engine.apply(x, gate_offset=-50.0)  # every gate on: past the kept capacities
    assert info.execution == "stepwise"
    assert_close(logits, expected)
    logits, info = engine.apply(x, gate_offset=-50.0)
    assert info.execution == "speculative"
    assert_close(logits, expected)
    assert all(c is None or c["samples"] == 2 for c in info.counts)


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_all_skipped_and_all_active_masks(value):
    items = cfg_items(TINY, mode=("spatial", "spatial+channel", "channel", "lc"), granularity=(2, 2, 1, 1))
    model, variables, image = setup(items)
    spec = network_spec(dict(items), image)
    masks = [{k: np.full(s, value, np.float32) for k, s in gate_shapes(b, 2).items()} for b in spec.blocks]
    x = images_for(image, 2)
    expected, _ = reference(model, variables, x, masks)
    logits, info = SparseEngine(dict(items), variables).apply(x, masks=masks)
    assert_close(logits, expected)
    runs = {p.run for p, b in zip(info.plans, spec.blocks) if b.spatial or b.layer}
    assert runs == ({"skip"} if value == 0.0 else {"sparse"})
    groups = [p.groups for p, b in zip(info.plans, spec.blocks) if b.mode == "channel"]
    assert groups == ([1] if value == 0.0 else [b.channel_groups for b in spec.blocks if b.mode == "channel"])


def test_stepwise_at_batch_one_matches_and_skips_gated_off_blocks():
    items = cfg_items(TINY, mode=("spatial", "spatial+channel", "channel", "lc"), granularity=(2, 2, 1, 1))
    model, variables, image = setup(items)
    spec = network_spec(dict(items), image)
    masks = random_masks(spec, 1, 0.5, seed=4)
    x = images_for(image, 1)
    expected, _ = reference(model, variables, x, masks)
    engine = SparseEngine(dict(items), variables)
    logits, info = engine.apply(x, masks=masks, execution="stepwise")
    assert_close(logits, expected)
    lc = spec.blocks[-1]
    assert lc.mode == "lc" and info.plans[-1].run == ("skip" if masks[-1]["layer"][0] == 0 else "sparse")


def test_dense_backend_and_static_baseline():
    items = cfg_items(TINY, mode="spatial", granularity=(2, 2, 1, 1), mask_groups=2)  # G > 1: dense only
    model, variables, image = setup(items)
    spec = network_spec(dict(items), image)
    x = images_for(image, 2)
    masks = random_masks(spec, 2, 0.25, seed=9)
    expected, _ = reference(model, variables, x, masks)
    assert_close(SparseEngine(dict(items), variables, backend="dense")(x, masks=masks), expected)
    static = build_model({**dict(items), "mode": "static"})
    strip = {
        c: {k: ({n: m for n, m in v.items() if n != "gates"} if isinstance(v, dict) else v) for k, v in t.items()}
        for c, t in variables.items()
    }
    expected_static, _ = jax.jit(static.apply)(strip, x)
    assert_close(SparseEngine(dict(items), variables, backend="dense").apply_static(x), expected_static)


def test_backends_map_names_to_their_ops():
    from laud_jax.sparse import backends
    from laud_jax.sparse.pallas_ops import PallasOps

    assert type(backends.get_ops("pallas")) is PallasOps
    assert type(backends.get_ops("xla")) is XlaOps and backends.get_ops("xla") is backends.get_ops("xla")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        backends.get_ops("cuda")


# ----------------------------------------------------------------------------- index construction


@pytest.mark.parametrize("total,steps", [(1, 32), (49, 32), (196, 32), (3136, 16), (12544, 32)])
def test_capacity_ladder_bounds_padding_and_compiled_shapes(total, steps):
    ladder = capacity_ladder(total, steps)
    assert ladder[-1] == total and list(ladder) == sorted(set(ladder))
    assert len(ladder) <= int(np.log2(max(total / steps, 1))) + 1 + steps
    assert capacity(0, total, steps) == 0
    for count in range(1, total + 1, max(1, total // 97)):
        cap = capacity(count, total, steps)
        assert count <= cap <= total and cap in ladder
        assert cap - count <= max(total / steps, count)  # absolute waste bounded, or < 2x below
    with pytest.raises(ValueError, match="exceeds"):
        capacity(total + 1, total, steps)


def test_active_first_lists_true_entries_in_order_then_sentinels():
    rng = np.random.default_rng(0)
    for size in (1, 5, 128, 300):
        for density in (0.0, 0.3, 1.0):
            flags = rng.random(size) < density
            index, count = active_first(jnp.asarray(flags))
            expected = np.concatenate([np.flatnonzero(flags), np.full(size - flags.sum(), size)])
            np.testing.assert_array_equal(np.asarray(index), expected)
            assert int(count) == flags.sum()


@pytest.mark.parametrize(
    "cfg,image",
    [
        ({"arch": "resnet50", "mode": "spatial", "granularity": (4, 4, 2, 1)}, (96, 96, 3)),
        ({"arch": "resnet50", "mode": "spatial", "granularity": (8, 3, 3, 3)}, (96, 96, 3)),
        ({**TINY_BASIC, "mode": "spatial", "granularity": (2, 1, 1, 1)}, (32, 32, 3)),
    ],
)
def test_conv1_pixels_equal_the_models_dilated_mask(cfg, image):
    spec = network_spec(cfg, image)
    rng = np.random.default_rng(1)
    for block in spec.blocks:
        grid = jnp.asarray((rng.random((2, *block.mask_grid, 1)) < 0.3).astype(np.float32))
        stride = block.stride if block.kind == "bottleneck" else 1
        expected = dilate_mask(upsample_nearest(grid, block.granularity), stride, block.conv1_hw)[..., 0] > 0
        np.testing.assert_array_equal(np.asarray(conv1_mask(block, grid)), np.asarray(expected))


@pytest.mark.parametrize("writeback", ["loop", "scatter"])
@pytest.mark.parametrize("in_place", [True, False])
def test_padding_slots_never_write(writeback, in_place):
    """Slots past the count hold poison values and point at real places: nothing may change there.

    The map is not square and every patch's row differs from its column: a height/width
    mix-up writes elsewhere.
    """
    ops = XlaOps(writeback=writeback)
    rng = np.random.default_rng(2)
    identity = jnp.asarray(rng.random((2, 8, 12, 3)).astype(np.float32))
    starts = jnp.asarray([[0, 0, 8], [1, 4, 0], [0, 4, 4], [1, 0, 4]], jnp.int32)  # last two: padding
    h = jnp.asarray(rng.standard_normal((4, 4, 4, 3)).astype(np.float32))
    h = h.at[2:].set(1e6)
    base = identity if in_place else jax.nn.relu(identity - 0.5)
    out = np.asarray(ops.scatter_residual(h, identity, base, starts, jnp.int32(2), in_place=in_place))
    expected = np.array(base)
    expected[0, 0:4, 8:12] = np.maximum(np.asarray(identity)[0, 0:4, 8:12] + np.asarray(h[0]), 0)
    expected[1, 4:8, 0:4] = np.maximum(np.asarray(identity)[1, 4:8, 0:4] + np.asarray(h[1]), 0)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_zero_active_cells_plan_a_skip_not_a_zero_size_program():
    spec = network_spec({**TINY, "mode": "spatial+channel", "granularity": (2, 2, 1, 1)}, (32, 32, 3))
    block = spec.blocks[1]
    assert plan_block(block, np.array([0, 0, 3, 1]), 1, 32) == BlockPlan("skip", per_sample=False)
    plan = plan_block(block, np.array([3, 20, 0, 1]), 1, 32)  # every channel group off
    assert plan.run == "sparse" and plan.groups == 1 and plan.cells >= 3


def test_counts_in_one_capacity_bucket_reuse_the_compiled_steps():
    items = cfg_items(TINY, mode="spatial", granularity=(1, 1, 1, 1))
    _, variables, image = setup(items)
    spec = network_spec(dict(items), image)
    engine = SparseEngine(dict(items), variables, capacity_steps=1)  # buckets: powers of two, all
    x = images_for(image, 1)
    _, first = engine.apply(x, masks=random_masks(spec, 1, 0.5, seed=0), execution="stepwise")

    def compiled():
        return engine_module._block_step_jit._cache_size() + engine_module._block_step_in_place._cache_size()

    before = compiled()
    _, second = engine.apply(x, masks=random_masks(spec, 1, 0.5, seed=1), execution="stepwise")
    assert [c["pixels"] for c in first.counts] != [c["pixels"] for c in second.counts]  # other masks...
    assert first.plans == second.plans  # ...the same capacities...
    assert compiled() == before  # ...so nothing new to compile


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def tiny_engine():
    items = cfg_items(TINY, mode="spatial+channel", granularity=(2, 2, 1, 1))
    model, variables, image = setup(items)
    return SparseEngine(dict(items), variables), network_spec(dict(items), image), image


@pytest.mark.parametrize(
    "images,message",
    [
        (np.zeros((32, 32, 3), np.float32), "NHWC"),
        (np.zeros((1, 32, 32, 3), np.int32), "floating point"),
        (np.zeros((1, 32, 32, 1), np.float32), "channels"),
    ],
)
def test_bad_images_are_rejected(tiny_engine, images, message):
    engine, _, _ = tiny_engine
    with pytest.raises(ValueError, match=message):
        engine(images)


def test_bad_masks_are_rejected(tiny_engine):
    engine, spec, image = tiny_engine
    x = np.ones((2, *image), np.float32)
    good = random_masks(spec, 2, 0.5)
    with pytest.raises(ValueError, match="entries"):
        engine(x, masks=good[:-1])
    bad = [dict(m) for m in good]
    bad[1]["spatial"] = np.ones((2, 3, 3, 1), np.float32)
    with pytest.raises(ValueError, match=r"masks\[1\]\['spatial'\] has shape"):
        engine(x, masks=bad)
    bad = [dict(m) for m in good]
    bad[0]["layer"] = np.ones((2,), np.float32)
    with pytest.raises(ValueError, match="has only"):
        engine(x, masks=bad)
    bad = [dict(m) for m in good]
    bad[2]["channel"] = bad[2]["channel"] * 0.5
    with pytest.raises(ValueError, match="hard 0/1"):
        engine(x, masks=bad)
    plan = engine.plan_masks(good, image, 2)
    with pytest.raises(ValueError, match="MaskPlan was made for batch 2"):
        engine(np.ones((1, *image), np.float32), masks=plan)


def test_granularity_that_does_not_fit_is_rejected():
    items = cfg_items(TINY, mode="spatial", granularity=(2, 2, 1, 1))
    _, variables, _ = setup(items)
    with pytest.raises(ValueError, match="does not divide"):
        SparseEngine({**dict(items), "granularity": (3, 2, 1, 1)}, variables, image_shape=(32, 32, 3))


def test_variables_of_another_architecture_are_rejected():
    items = cfg_items(TINY, mode="spatial", granularity=(2, 2, 1, 1))
    _, variables, _ = setup(items)
    other = {"arch": "resnet_small", "num_classes": 7, "mode": "spatial", "granularity": (2, 2, 1, 1)}
    with pytest.raises(ValueError, match="another architecture"):
        SparseEngine(other, variables, image_shape=(32, 32, 3))
    deeper = {**dict(items), "stage_depths": (1, 1, 1, 1)}
    with pytest.raises(ValueError, match="deeper architecture"):
        SparseEngine(deeper, variables, image_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="batch_stats"):
        SparseEngine(dict(items), {"params": variables["params"]}, image_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="unknown backend"):
        SparseEngine(dict(items), variables, backend="cuda")
    with pytest.raises(ValueError, match="only by backend='dense'"):
        SparseEngine({**dict(items), "mask_groups": 2}, variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SparseEngine(dict(items), variables, image_shape=(32, 32, 3))  # the right ones load quietly

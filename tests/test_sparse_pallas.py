"""The engine's ``pallas`` backend (kernels in interpret mode on CPU) equals the ``xla``
backend and the dense masked model, on a small ResNet in every spatial/channel mode; its
three primitives on routing's index lists equal a dense masked bottleneck; routing's
conv1 pixels are exactly conv2's receptive field."""

from __future__ import annotations

import warnings
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laud_jax.models import build_model
from laud_jax.models.registry import init_variables
from laud_jax.models.specs import network_spec
from laud_jax.sparse import SparseEngine, capacity, gate_shapes, pallas_ops
from laud_jax.sparse.pallas_ops import PallasOps
from laud_jax.sparse.routing import block_routing, conv1_mask

IMAGE = (32, 32, 3)


def _random_batch_stats(variables, rng):
    """Non-trivial BN statistics, so folding matters (a fresh init has mean 0, var 1)."""

    def perturb(path, leaf):
        name = path[-1].key
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        return jnp.asarray(0.2 * noise if name == "mean" else 1.0 + 0.3 * np.abs(noise))

    return {**variables, "batch_stats": jax.tree_util.tree_map_with_path(perturb, variables["batch_stats"])}


def _forced_masks(spec, batch, rng, density):
    masks = []
    for block in spec.blocks:
        entry = {}
        for key, shape in gate_shapes(block, batch).items():
            mask = rng.random(shape) < density
            if key == "spatial":
                mask.reshape(batch, -1)[:, 0] = True  # every sample keeps a patch
            entry[key] = jnp.asarray(mask, jnp.float32)
        masks.append(entry)
    return masks


@pytest.mark.parametrize(
    "config",
    [
        # one network: a stage per mode (spatial, both = spatial + channel, channel, lc)
        dict(mode=("spatial", "spatial+channel", "channel", "lc"), granularity=(4, 2, 2, 1)),
        # pre-BN channel masks (an extra indicator channel into conv2), S = 1 and stride 2
        dict(
            mode=("spatial+channel", "spatial", "spatial", "channel"),
            granularity=(2, 1, 4, 1),
            channel_mask_position="pre_bn",
        ),
    ],
    ids=["modes", "pre_bn"],
)
def test_pallas_backend_matches_xla_and_dense(config):
    rng = np.random.default_rng(0)
    cfg = dict(arch="resnet_tiny", num_classes=10, **config)
    model = build_model(cfg)
    variables = _random_batch_stats(init_variables(model, 0, IMAGE), rng)
    images = jnp.asarray(rng.standard_normal((2, *IMAGE)), jnp.float32)
    engines = {b: SparseEngine(cfg, variables, backend=b) for b in ("pallas", "xla", "dense")}
    assert isinstance(engines["pallas"].ops, PallasOps)
    spec, _ = engines["xla"].network(IMAGE)
    masks = _forced_masks(spec, images.shape[0], rng, 0.5)
    pallas_ops._warn_interpret.cache_clear()  # the warning is once per process
    kernels = ("gather_matmul", "patch_conv", "conv1x1_scatter_add")
    spies = {k: mock.patch.object(pallas_ops, k, wraps=getattr(pallas_ops, k)) for k in kernels}
    with (
        warnings.catch_warnings(record=True) as caught,
        spies["gather_matmul"] as conv1,
        spies["patch_conv"] as conv2,
        spies["conv1x1_scatter_add"] as conv3,
    ):
        warnings.simplefilter("always")
        pallas, info = engines["pallas"].apply(images, masks=masks)
    assert any("interpret mode" in str(w.message) for w in caught)
    for spy in (conv1, conv2, conv3):  # the kernels ran (no fallback to the xla primitives)
        assert spy.call_count > 0 and all(call.kwargs["implementation"] == "interpret" for call in spy.call_args_list)
    xla, _ = engines["xla"].apply(images, masks=masks)
    dense, _ = engines["dense"].apply(images, masks=masks)
    assert any(plan.run == "sparse" for plan in info.plans)
    np.testing.assert_allclose(pallas, xla, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pallas, dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "image,granularity", [((32, 64, 3), (2, 4, 1, 1)), ((96, 64, 3), (4, 2, 2, 1))], ids=["32x64", "96x64"]
)
def test_pallas_backend_on_non_square_images_matches_model(image, granularity):
    """Every map and mask grid has H != W: the kernels' patch ids and pixel offsets must
    keep height and width apart."""
    rng = np.random.default_rng(1)
    cfg = dict(
        arch="resnet_tiny",
        num_classes=10,
        mode=("spatial", "spatial+channel", "spatial", "spatial+channel"),
        granularity=granularity,
    )
    model = build_model(cfg)
    variables = _random_batch_stats(init_variables(model, 0, image), rng)
    images = jnp.asarray(rng.standard_normal((2, *image)), jnp.float32)
    engine = SparseEngine(cfg, variables, backend="pallas")
    spec, _ = engine.network(image)
    assert all(b.mask_grid[0] != b.mask_grid[1] for b in spec.blocks)
    masks = _forced_masks(spec, images.shape[0], rng, 0.5)
    assert all(0.0 < float(jnp.mean(m["spatial"])) < 1.0 for m in masks)
    kernels = ("patch_conv", "conv1x1_scatter_add")
    spies = {k: mock.patch.object(pallas_ops, k, wraps=getattr(pallas_ops, k)) for k in kernels}
    with warnings.catch_warnings(), spies["patch_conv"] as conv2, spies["conv1x1_scatter_add"] as conv3:
        warnings.simplefilter("ignore")  # interpret mode
        logits, info = engine.apply(images, masks=masks)
    assert conv2.call_count > 0 and conv3.call_count > 0
    assert [plan.run for plan in info.plans] == ["sparse"] * len(spec.blocks)
    expected, _ = jax.jit(lambda v, x, m: model.apply(v, x, masks=m))(variables, images, masks)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the engine's launches


def _primitives(jaxpr) -> list[str]:
    """Primitive names of a jaxpr and its sub-jaxprs, not looking inside Pallas kernels."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        if eqn.primitive.name != "pallas_call":
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                names += _primitives(sub)
    return names


@pytest.mark.parametrize("backend", ["pallas", "xla"])
def test_sparse_spatial_blocks_take_routings_row_map_without_a_scatter(backend):
    """A sparse spatial bottleneck (stride 2 with a downsample shortcut, then stride 1 in
    place; batch 2, non-square maps) runs on routing's lists as they are: no scatter between
    routing and the block output (patch_conv's row map used to be scattered per call, and
    the xla canvas was a scatter of the rows; both now read routing's row map), and the
    output equals the xla backend's."""
    rng = np.random.default_rng(3)
    image = (40, 24, 3)
    cfg = dict(arch="resnet_tiny", num_classes=10, mode="spatial", granularity=(2, 2, 1, 1))
    model = build_model(cfg)
    variables = _random_batch_stats(init_variables(model, 0, image), rng)
    images = jnp.asarray(rng.standard_normal((2, *image)), jnp.float32)
    engines = {b: SparseEngine(cfg, variables, backend=b) for b in {"xla", backend}}
    spec, _ = engines["xla"].network(image)
    masks = _forced_masks(spec, 2, rng, 0.4)
    traces = engines["xla"].trace_blocks(images, masks=masks)
    chosen = [t for t in traces if t.spec.name in ("layer2_0", "layer2_1")]
    assert [t.plan.run for t in chosen] == ["sparse", "sparse"] and chosen[0].spec.downsample
    assert all(t.plan.pixels < 2 * t.spec.conv1_hw[0] * t.spec.conv1_hw[1] for t in chosen)  # a pixel list
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # interpret mode
        for trace in chosen:
            program = engines[backend].block_program(trace)
            names = _primitives(jax.make_jaxpr(program)().jaxpr)
            assert not [n for n in names if n.startswith("scatter")], (trace.spec.name, names)
            if backend == "pallas":
                assert names.count("pallas_call") == 3, trace.spec.name
            expected = engines["xla"].block_program(trace)()
            np.testing.assert_allclose(program(), expected, rtol=1e-5, atol=1e-5)


def _block(image, granularity, name):
    cfg = dict(arch="resnet_tiny", num_classes=10, mode="spatial", granularity=granularity)
    return next(b for b in network_spec(cfg, image).blocks if b.name == name)


@pytest.mark.parametrize(
    "image, granularity, name, in_place",
    [
        ((22, 30, 3), (1, 2, 1, 1), "layer2_0", False),  # 11x15 -> 6x8, stride 2, S = 2
        ((22, 30, 3), (1, 2, 1, 1), "layer2_1", True),  # 6x8, stride 1, S = 2, in place
        ((22, 30, 3), (1, 2, 1, 1), "layer1_0", False),  # 11x15, stride 1, S = 1
    ],
)
def test_pallas_primitives_on_routing_lists_equal_a_dense_masked_bottleneck(image, granularity, name, in_place):
    """conv1 -> conv2 -> conv3 + scatter as the engine launches them (routing's index lists
    cut to a padded capacity, PallasOps in interpret mode) equal a dense bottleneck whose
    branch is masked to the active patches, on odd non-square maps."""
    spec = _block(image, granularity, name)
    rng = np.random.default_rng(7)
    batch, size, stride = 2, spec.granularity, spec.stride
    (gh, gw), (height, width), (out_h, out_w) = spec.mask_grid, spec.conv1_hw, (spec.h_out, spec.w_out)
    assert gh != gw and height != width
    cells = (rng.random((batch, gh, gw, 1)) < 0.4).astype(np.float32)
    cells[0, 0, -1] = 1.0  # at least one active patch
    routing, counts = block_routing(spec, {"spatial": jnp.asarray(cells)}, batch)
    n_cells, n_pixels = int(counts[0]), int(counts[1])
    cell_cap = capacity(n_cells, batch * gh * gw, 4)
    pixel_cap = capacity(n_pixels, batch * height * width, 4)
    assert cell_cap > n_cells or pixel_cap > n_pixels  # padding slots are exercised

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

    cin, mid, cout = spec.in_channels, spec.width, spec.out_channels
    x = jnp.abs(normal(batch, height, width, cin))
    w1, b1 = normal(cin, mid, scale=cin**-0.5), normal(mid, scale=0.1)
    w2, b2 = normal(3, 3, mid, mid, scale=(9 * mid) ** -0.5), normal(mid, scale=0.1)
    w3, b3 = normal(mid, cout, scale=mid**-0.5), normal(cout, scale=0.1)
    identity = jnp.abs(normal(batch, out_h, out_w, cout)) if in_place else normal(batch, out_h, out_w, cout)
    base = identity if in_place else jax.nn.relu(identity)

    ops = PallasOps(implementation="interpret")
    starts = routing["starts"][:cell_cap]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # interpret mode
        rows = ops.gather_matmul(x.reshape(-1, cin), routing["pixels"][:pixel_cap, None], w1, b1, relu=True)
        h = ops.patch_conv(
            rows,
            routing["row_map"],
            starts,
            w2,
            b2,
            grid=(batch, height, width),
            size=size,
            stride=stride,
            groups=1,
            relu=True,
        )
        out = ops.conv3_scatter(
            h, w3, b3, identity, base, starts, routing["cells"][:cell_cap], counts[0], in_place=in_place
        )

    hi = jax.lax.Precision.HIGHEST
    dense = jax.nn.relu(jnp.einsum("bhwc,cd->bhwd", x, w1, precision=hi) + b1)
    dense = jax.lax.conv_general_dilated(
        dense, w2, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=hi
    )
    dense = jnp.einsum("bhwc,cd->bhwd", jax.nn.relu(dense + b2), w3, precision=hi) + b3
    active = np.kron(cells[..., 0], np.ones((1, size, size)))[:, :out_h, :out_w, None] > 0
    expected = np.where(active, jax.nn.relu(identity + dense), base)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("image, granularity", [((22, 30, 3), (1, 2, 1, 1)), ((26, 18, 3), (1, 1, 1, 1))])
def test_conv1_pixels_are_exactly_conv2s_receptive_field(image, granularity):
    """Brute force over odd non-square maps, strides 1 and 2: routing's conv1 pixels (what
    gather_matmul computes and patch_conv reads) are every input pixel a 3x3 conv reads
    for an active output pixel, and nothing else."""
    cfg = dict(arch="resnet_tiny", num_classes=10, mode="spatial", granularity=granularity)
    rng = np.random.default_rng(5)
    for spec in network_spec(cfg, image).blocks:
        size, stride = spec.granularity, spec.stride
        height, width = spec.conv1_hw
        cells = rng.random((2, *spec.mask_grid, 1)) < 0.3
        expected = np.zeros((2, height, width), bool)
        active = np.kron(cells[..., 0], np.ones((1, size, size), bool))[:, : spec.h_out, : spec.w_out]
        for b, oy, ox in np.argwhere(active):
            for dy in range(3):
                for dx in range(3):
                    y, x = oy * stride + dy - 1, ox * stride + dx - 1
                    if 0 <= y < height and 0 <= x < width:
                        expected[b, y, x] = True
        actual = conv1_mask(spec, jnp.asarray(cells, jnp.float32))
        np.testing.assert_array_equal(np.asarray(actual), expected, err_msg=spec.name)

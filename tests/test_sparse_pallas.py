"""The engine's ``pallas`` backend (kernels in interpret mode on CPU) equals the ``xla``
backend and the dense masked model, on a small ResNet in every spatial/channel mode."""

from __future__ import annotations

import warnings
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laud_jax.models import build_model
from laud_jax.models.registry import init_variables

from laud_jax.sparse import SparseEngine, gate_shapes
from laud_jax.sparse import pallas_ops
from laud_jax.sparse.pallas_ops import PallasOps

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
        dict(mode=("spatial", "both", "channel", "lc"), granularity=(4, 2, 2, 1)),
        # pre-BN channel masks (an extra indicator channel into conv2), S = 1 and stride 2
        dict(mode=("both", "spatial", "spatial", "channel"), granularity=(2, 1, 4, 1),
             channel_mask_position="pre_bn"),
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
    with warnings.catch_warnings(record=True) as caught, spies["gather_matmul"] as conv1, \
            spies["patch_conv"] as conv2, spies["conv1x1_scatter_add"] as conv3:
        warnings.simplefilter("always")
        pallas, info = engines["pallas"].apply(images, masks=masks)
    assert any("interpret mode" in str(w.message) for w in caught)
    for spy in (conv1, conv2, conv3):  # the kernels ran (no fallback to the xla primitives)
        assert spy.call_count > 0 and all(
            call.kwargs["implementation"] == "interpret" for call in spy.call_args_list)
    xla, _ = engines["xla"].apply(images, masks=masks)
    dense, _ = engines["dense"].apply(images, masks=masks)
    assert any(plan.run == "sparse" for plan in info.plans)
    np.testing.assert_allclose(pallas, xla, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pallas, dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("image,granularity", [((32, 64, 3), (2, 4, 1, 1)), ((96, 64, 3), (4, 2, 2, 1))],
                         ids=["32x64", "96x64"])
def test_pallas_backend_on_non_square_images_matches_model(image, granularity):
    """Every map and mask grid has H != W: the kernels' patch ids and pixel offsets must
    keep height and width apart."""
    rng = np.random.default_rng(1)
    cfg = dict(arch="resnet_tiny", num_classes=10, mode=("spatial", "both", "spatial", "both"),
               granularity=granularity)
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

"""Latency predictor: hand-computed roofline cases, the engine's index arithmetic against
independent references, monotonicity, jit/vmap grids, presets, search, calibration, CLI."""

import dataclasses
import functools
import inspect
import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from laud_jax.gpu_check import report
from laud_jax.latency import (
    ENGINES,
    PRESETS,
    BlockShape,
    HardwareProfile,
    block_launches,
    block_macs,
    block_setting,
    block_time,
    dilated_density,
    get_profile,
    grid_block_times,
    grid_network_times,
    predict,
    profile_from_json,
    profile_to_json,
    search,
)
from laud_jax.latency.calibrate import (
    FIT_FIELDS,
    Measurements,
    error_summary,
    fit_profile,
    predict_measured,
    relative_errors,
)
from laud_jax.latency.cli import main as cli
from laud_jax.latency.launches import (
    KIND_CONV,
    KIND_DENSE,
    KIND_GATHERED,
    KIND_HOST,
    KIND_LOOP,
    KIND_MEMORY,
    LAUNCH_FIELDS,
    LAUNCH_NAMES,
    MODE_CODE,
    OVERHEAD_SLOTS,
    BlockSetting,
    Launches,
    ladder_capacity,
)
from laud_jax.latency.predictor import block_launch_times
from laud_jax.latency.profiles import LOCAL_INITIAL
from laud_jax.latency.roofline import launch_times
from laud_jax.latency.search import default_rates
from laud_jax.models import build_model, init_variables, network_spec
from laud_jax.models.gates import dilate_mask, upsample_nearest
from laud_jax.models.specs import MODES
from laud_jax.sparse import SparseEngine, capacity
from laud_jax.sparse.executor import select_branch
from laud_jax.sparse.folding import fold_network
from laud_jax.sparse.routing import plan_block

# A toy device: 4 cores, one 64 x 64 dense tile, no cache, round numbers.
TOY = HardwareProfile(
    flops_fp32=1e12,
    flops_half=2e12,
    dram_bw=1e11,
    l2_bw=1e12,
    l2_size=0.0,
    cores=4.0,
    tiles_per_core=1.0,
    launch_overhead=2e-6,
    loop_overhead=3e-6,
    call_overhead=1e-5,
    eff_dense=1.0,
    eff_conv=0.25,
    eff_grouped=0.1,
    eff_sparse=0.5,
    mem_eff=0.5,
    gather_eff=0.5,
    sector_bytes=32.0,
    k_half=0.0,
    sum_weight=0.0,
    dense_tiles=((64.0, 64.0),),
)


def one_launch(**fields) -> Launches:
    defaults = dict(weight=1.0, kind=KIND_DENSE, batches=1.0)
    return Launches(**{f: jnp.asarray([float(fields.get(f, defaults.get(f, 0.0)))]) for f in LAUNCH_FIELDS})


def seconds(profile: HardwareProfile, launch: Launches, half: float = 0.0) -> float:
    return float(launch_times(profile.as_arrays(), launch, half)[0])


# ----------------------------------------------------------------------------- roofline by hand


def test_compute_bound_matmul_matches_hand_count():
    m = n = 256
    k = 1024
    a, w, o = m * k * 4, k * n * 4, m * n * 4
    launch = one_launch(m=m, n=n, k=k, a_bytes=a, w_bytes=w, o_bytes=o)
    # 16 tiles of 64 x 64 on 4 cores: 4 waves of 2*64*64*k flops at 1e12 / 4 FLOP/s per core
    compute = 4 * 2 * 64 * 64 * k / (1e12 / 4)
    memory = (a + w + o) / (1e11 * 0.5) + (3 * a + 3 * w) / 1e12  # stream + A/W panel re-reads
    assert compute > memory
    assert seconds(TOY, launch) == pytest.approx(2e-6 + compute, rel=1e-6)
    assert seconds(TOY.replace(sum_weight=1.0), launch) == pytest.approx(2e-6 + compute + memory, rel=1e-6)
    # bf16 doubles the peak of the toy device; a direct convolution runs at eff_conv = 1/4
    assert seconds(TOY, launch, half=1.0) == pytest.approx(2e-6 + max(compute / 2, memory), rel=1e-6)
    conv = one_launch(kind=KIND_CONV, m=m, n=n, k=k, a_bytes=a, w_bytes=w, o_bytes=o)
    assert seconds(TOY, conv) == pytest.approx(2e-6 + 4 * compute, rel=1e-6)


def test_memory_bound_copy_and_gather_sector_waste():
    copy = one_launch(kind=KIND_MEMORY, o_bytes=2e8)
    assert seconds(TOY, copy) == pytest.approx(2e-6 + 2e8 / (1e11 * 0.5), rel=1e-6)
    # runs of 8 bytes cost a whole 32-byte sector each (4x the bytes), at half the bandwidth
    gather = one_launch(kind=KIND_MEMORY, a_bytes=1e6, a_seg=8.0)
    assert seconds(TOY, gather) == pytest.approx(2e-6 + 2 * 4e6 / 5e10, rel=1e-6)
    # a loop step pays the loop overhead, a host round trip only the call overhead
    assert seconds(TOY, one_launch(kind=KIND_LOOP, o_bytes=2e8)) == pytest.approx(3e-6 + 2e8 / 5e10, rel=1e-6)
    assert seconds(TOY, one_launch(kind=KIND_HOST, weight=2.0)) == pytest.approx(2e-5, rel=1e-6)
    # a cache that holds the whole working set serves it at cache bandwidth
    cached = TOY.replace(l2_size=1e9)
    assert seconds(cached, copy) == pytest.approx(2e-6 + 2e8 / 1e12, rel=1e-6)
    # expected executions scale launch overhead and body alike
    assert seconds(TOY, one_launch(kind=KIND_MEMORY, o_bytes=2e8, weight=0.25)) == pytest.approx(
        0.25 * seconds(TOY, copy), rel=1e-6
    )


@pytest.mark.parametrize("rows, waves", [(255, 1), (256, 1), (257, 2), (512, 2), (513, 3)])
def test_wave_quantization_at_the_boundary(rows, waves):
    fast_memory = TOY.replace(dram_bw=1e16, l2_bw=1e16)
    k = 4096
    launch = one_launch(m=rows, n=64, k=k, a_bytes=rows * k * 4, w_bytes=k * 64 * 4, o_bytes=rows * 64 * 4)
    one_wave = 2 * 64 * 64 * k / (1e12 / 4)
    assert seconds(fast_memory, launch) == pytest.approx(2e-6 + waves * one_wave, rel=1e-5)


# ----------------------------------------------------------------------------- index arithmetic


@pytest.mark.parametrize("size, stride", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2)])
def test_dilated_density_matches_monte_carlo_of_the_models_dilation(size, stride):
    out = 8  # output grid; conv1 grid is out * stride
    rng = np.random.default_rng(size * 10 + stride)
    for rho in (0.2, 0.6):
        cells = (rng.random((400, out // size, out // size, 1)) < rho).astype(np.float32)
        mask = dilate_mask(upsample_nearest(jnp.asarray(cells), size), stride, (out * stride, out * stride))
        empirical = float(jnp.mean(mask))
        predicted = float(dilated_density(rho, float(size), float(stride), float(out * stride), float(out * stride)))
        assert predicted == pytest.approx(empirical, abs=0.012)


def test_predictor_pads_to_the_engines_capacity_ladder():
    """Every count of several (total, steps) ladders, jitted and vmapped, against routing.capacity."""
    cases = [(c, t, s) for t in (1, 7, 50, 97, 300, 2300) for s in (1, 3, 16, 32, 33) for c in range(t + 1)]
    counts, totals, steps = (jnp.asarray(column, jnp.float32) for column in zip(*cases))
    predicted = jax.jit(jax.vmap(ladder_capacity))(counts, totals, steps)
    assert np.asarray(predicted).tolist() == [capacity(c, t, s) for c, t, s in cases]
    # an expected count needs its whole units; without a ladder nothing is padded
    assert float(ladder_capacity(3.2, 100.0, 32.0)) == capacity(4, 100, 32)
    assert float(ladder_capacity(37.0, 100.0, 0.0)) == 37.0


def test_predictor_pads_with_the_engines_default_steps():
    """The engine pads with its ladder on every backend (plan_block does not look at it)."""
    default = inspect.signature(SparseEngine).parameters["capacity_steps"].default
    assert ENGINES["xla"].capacity_steps == default
    assert ENGINES["pallas"].capacity_steps == default
    assert ENGINES["pallas_nchw"].capacity_steps == default


@pytest.mark.parametrize("engine", ["xla", "pallas"])
@pytest.mark.parametrize(
    "mode, counts, batch",
    [
        ("spatial", (37, 411, 0, 2), 2),
        ("channel", (0, 0, 5, 1), 1),
        ("layer", (0, 0, 0, 3), 8),  # 3 of 8 samples: capacity 3 (a power-of-two bucket: 4)
        ("layer", (0, 0, 0, 5), 8),
    ],
)
def test_block_records_hold_the_capacities_the_engine_plans(mode, counts, batch, engine):
    """Rows and channels of the predicted convs are plan_block's capacities for the same counts."""
    spec = network_spec({"arch": "resnet_small", "num_classes": 10, "mode": mode, "granularity": 2}, (64, 64)).blocks[1]
    steps = inspect.signature(SparseEngine).parameters["capacity_steps"].default
    plan = plan_block(spec, np.asarray(counts), batch, steps)
    cells, pixels, groups, samples = counts
    h1, w1 = spec.conv1_hw
    setting = block_setting(
        mode,
        2,
        rho_spatial=cells / (batch * spec.mask_grid[0] * spec.mask_grid[1]),
        rho_channel=groups / max(spec.channel_groups, 1),
        rho_layer=samples / batch,
        rho_conv1=pixels / (batch * h1 * w1),
        batch=batch,
    )
    shape = jax.tree.map(lambda x: x[0], BlockShape.from_specs([spec]))
    launches = block_launches(shape, setting, ENGINES[engine])
    conv1, conv2 = LAUNCH_NAMES.index("conv1"), LAUNCH_NAMES.index("conv2")
    if mode == "spatial":
        assert float(launches.m[conv1]) == plan.pixels
        assert float(launches.m[conv2]) == plan.cells * spec.granularity**2
    elif mode == "channel":
        assert float(launches.n[conv1]) == plan.groups * spec.channel_granularity
    else:
        assert float(launches.m[conv1]) == plan.samples * h1 * w1


def _weight_gathers(closed_jaxpr) -> int:
    """Gathers of weight matrices (operands of two or more axes) in a jaxpr and its sub-jaxprs."""
    count = 0
    for eqn in closed_jaxpr.jaxpr.eqns:
        if eqn.primitive.name == "gather" and eqn.invars[0].aval.ndim >= 2:
            count += 1
        count += sum(_weight_gathers(v) for v in eqn.params.values() if isinstance(v, jax.extend.core.ClosedJaxpr))
    return count


@pytest.mark.parametrize("batch", [1, 4])
def test_channel_blocks_cost_the_weight_gathers_the_executor_makes(batch):
    """The engine's pallas backend runs the channel path like xla: executor.select_branch
    gathers conv1's, conv2's and conv3's active-channel weights (counted in its jaxpr) and
    the convs are dense calls on them, one sample after another at batch > 1. Only the
    hypothetical halo engine reads conv1's / conv3's weights in-kernel."""
    cfg = {"arch": "resnet_small", "num_classes": 10, "mode": "channel", "channel_granularity": 2}
    network = network_spec(cfg, (64, 64))
    spec = network.blocks[1]
    params = fold_network(network, init_variables(build_model(cfg), 0, (64, 64, 3)))["blocks"][1]

    def weights(p, groups):
        branch = select_branch(spec, p, {"channel": jnp.ones((spec.channel_groups,))}, groups)
        return branch.w1, branch.w2, branch.w3

    executed = _weight_gathers(jax.make_jaxpr(weights)(params, jnp.arange(5, dtype=jnp.int32)))
    assert executed == 4  # w1, w2 (output then input groups), w3
    shape = jax.tree.map(lambda x: x[0], BlockShape.from_specs([spec]))
    setting = block_setting("channel", 1, 5 / spec.channel_groups, batch=batch)
    gathers = np.asarray([LAUNCH_NAMES.index("channel_weight_cols"), LAUNCH_NAMES.index("channel_weight_rows")])
    conv1, conv3 = LAUNCH_NAMES.index("conv1"), LAUNCH_NAMES.index("conv3")
    for engine, per_sample_gathers in (("xla", executed), ("pallas", executed), ("halo", 2)):
        launches = block_launches(shape, setting, ENGINES[engine])
        samples = batch if engine != "halo" else 1  # halo: one launch for every sample
        assert float(launches.weight[gathers].sum()) == per_sample_gathers * samples, engine
        in_kernel = engine == "halo"
        for conv in (conv1, conv3):
            assert float(launches.weight[conv]) == samples, engine
            assert (float(launches.kind[conv]) == KIND_GATHERED) == in_kernel, engine
        # conv1 in-kernel reads runs of one group per weight row; gathered copies are contiguous
        assert (float(launches.w_seg[conv1]) > 0) == in_kernel, engine
        # the gathers take whole slabs of the group-major conv2 copy (G_out, G_in, 3, 3, cg, cg)
        slabs = params["w2g"].shape
        assert float(launches.a_seg[gathers[0]]) == 4 * np.prod(slabs[1:]), engine
        assert float(launches.a_seg[gathers[1]]) == 4 * np.prod(slabs[2:]), engine


def test_block_macs_follow_the_model_spec():
    for arch, image in (("resnet_small", (64, 64)), ("regnety_400mf", (64, 64)), ("resnet18", (64, 64))):
        blocks = network_spec({"arch": arch, "num_classes": 10}, image).blocks
        shapes = BlockShape.from_specs(blocks)
        for mode, rho in (("static", 1.0), ("spatial", 1.0), ("channel", 1.0), ("layer", 1.0), ("lc", 1.0)):
            spatial_spec = network_spec({"arch": arch, "num_classes": 10, "mode": mode, "granularity": 2}, image)
            setting = block_setting(mode, 2, rho)
            dynamic, dense = jax.vmap(block_macs, in_axes=(0, None))(shapes, setting)
            np.testing.assert_allclose(dense, [b.dense_macs for b in blocks], rtol=1e-6)
            np.testing.assert_allclose(dynamic, [b.dense_macs + b.masker_macs for b in spatial_spec.blocks], rtol=1e-5)
    # half of the samples skip the branch: branch MACs halve, downsample and gate stay
    blocks = network_spec({"arch": "resnet_small", "num_classes": 10, "mode": "layer"}, (64, 64)).blocks
    dynamic, _ = jax.vmap(block_macs, in_axes=(0, None))(BlockShape.from_specs(blocks), block_setting("layer", 1, 0.5))
    expected = [0.5 * (b.dense_macs - b.downsample_macs) + b.downsample_macs + b.masker_macs for b in blocks]
    np.testing.assert_allclose(dynamic, expected, rtol=1e-6)


# ----------------------------------------------------------------------------- grids


SMALL_BLOCKS = network_spec({"arch": "resnet_small", "num_classes": 10}, (64, 64)).blocks
GRID_MODES = jnp.asarray([MODE_CODE[m] for m in MODES], jnp.float32)
GRID_SIZES = jnp.asarray([1.0, 2.0, 4.0])
GRID_RATES = jnp.linspace(0.0, 1.0, 11)
GRID_BATCH = jnp.asarray([1.0, 8.0])


def _grid_setting() -> BlockSetting:
    shape = (len(MODES), 3, 11, 2)
    b = lambda x: jnp.broadcast_to(x, shape)  # noqa: E731
    rates = b(GRID_RATES[None, None, :, None])
    return BlockSetting(
        mode=b(GRID_MODES[:, None, None, None]),
        granularity=b(GRID_SIZES[None, :, None, None]),
        rho_spatial=rates,
        rho_channel=rates,
        rho_layer=rates,
        rho_conv1=b(-1.0),
        channel_granularity=b(2.0),
        mask_groups=b(1.0),
        batch=b(GRID_BATCH[None, None, None, :]),
        half=b(0.0),
    )


@jax.jit
def _slot_grid(profile, engine, shapes, setting):
    """Per-slot seconds for every block x grid setting."""
    flat = jax.tree.map(lambda x: x.reshape(-1), setting)
    per_setting = jax.vmap(lambda shape, s: block_launch_times(profile, engine, shape, s), in_axes=(None, 0))
    times = jax.vmap(per_setting, in_axes=(0, None))(shapes, flat)
    return times.reshape(shapes.in_channels.shape[0], *setting.mode.shape, len(LAUNCH_NAMES))


@jax.jit
def _geometry_grid(engine, shapes, setting):
    """Per-slot (split-K parts, CTAs, kind) for every block x grid setting."""
    flat = jax.tree.map(lambda x: x.reshape(-1), setting)

    def geometry(shape, s):
        launches = block_launches(shape, s, engine)
        return jnp.stack([launches.split, launches.ctas, launches.kind])

    values = jax.vmap(jax.vmap(geometry, in_axes=(None, 0)), in_axes=(0, None))(shapes, flat)
    return values.reshape(shapes.in_channels.shape[0], *setting.mode.shape, 3, len(LAUNCH_NAMES))


@pytest.mark.parametrize("engine", ["xla", "pallas", "halo"])
@pytest.mark.parametrize("hardware", ["v100", "jetson_tx2", "local_initial"])
def test_latency_is_monotone_in_rho_and_full_rate_beats_static_by_less_than_the_maskers(engine, hardware):
    profile = LOCAL_INITIAL if hardware == "local_initial" else PRESETS[hardware]
    slots = np.asarray(
        _slot_grid(
            profile.as_arrays(), ENGINES[engine].as_arrays(), BlockShape.from_specs(SMALL_BLOCKS), _grid_setting()
        ),
        np.float64,
    )
    total = slots.sum(-1)  # (blocks, modes, S, rates, batch)
    assert np.all(np.isfinite(total)) and np.all(total > 0)
    steps = np.diff(total, axis=3)
    geometry = np.asarray(
        _geometry_grid(ENGINES[engine].as_arrays(), BlockShape.from_specs(SMALL_BLOCKS), _grid_setting())
    )
    splits, ctas, kinds = geometry[..., 0, :], geometry[..., 1, :], geometry[..., 2, :]
    # Where the pixel capacity reaches the whole grid the engine stops gathering: conv1 runs
    # dense, without a gather op (xla) or the gather_matmul kernel (Pallas; conv2 then
    # reads the rows without the row map), so it may get faster there.
    gathering = (slots[..., LAUNCH_NAMES.index("gather_x")] > 0) | (
        kinds[..., LAUNCH_NAMES.index("conv1")] == KIND_GATHERED
    )
    dense_conv1 = gathering[:, :, :, :-1] & ~gathering[:, :, :, 1:]
    # The Pallas kernels split K over fewer CTAs as their grid grows (pallas_kernels'
    # split_k), and a grid under one CTA per SM streams at its fraction of the SMs: a
    # launch can get cheaper where its split changes or such a grid gains a CTA.
    resplit = np.any(splits[:, :, :, :-1] != splits[:, :, :, 1:], axis=-1)
    spread = np.any((ctas[:, :, :, :-1] != ctas[:, :, :, 1:]) & (ctas[:, :, :, :-1] < float(profile.cores)), axis=-1)
    monotone = ~dense_conv1 & ~resplit & ~spread
    assert np.all(steps[monotone] >= -1e-9 * total[:, :, :, 1:][monotone]), "latency decreases as rho grows"
    static = total[:, MODES.index("static")][:, None, :, -1]
    masker = slots[..., : len(OVERHEAD_SLOTS)].sum(-1)[:, :, :, -1]  # host round trip, maskers, index lists
    full = total[:, :, :, -1]  # every gate fully on
    if profile.eff_sparse <= profile.eff_conv:  # else a gathered conv2 may beat the direct one
        assert np.all(full >= (static - masker) * (1 - 1e-6))


# The search grid of resnet_small (64 x 64): candidate S x modes x channel group sizes x rates.
SEARCH_SIZES, SEARCH_MODES, SEARCH_GROUPS = (1, 2, 4, 8), ("spatial", "channel", "layer"), (2, 4, 8)


def _search_setting(batch: float, half: float) -> BlockSetting:
    rates = default_rates()
    shape = (len(SEARCH_SIZES), len(SEARCH_MODES), len(SEARCH_GROUPS), len(rates))
    b = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), shape)  # noqa: E731
    return BlockSetting(
        mode=b(np.asarray([MODE_CODE[m] for m in SEARCH_MODES])[None, :, None, None]),
        granularity=b(np.asarray(SEARCH_SIZES)[:, None, None, None]),
        rho_spatial=b(rates),
        rho_channel=b(rates),
        rho_layer=b(rates),
        rho_conv1=b(-1.0),
        channel_granularity=b(np.asarray(SEARCH_GROUPS)[None, None, :, None]),
        mask_groups=b(1.0),
        batch=b(batch),
        half=b(half),
    )


def test_grid_evaluation_equals_the_per_configuration_loop():
    setting = _search_setting(4.0, 0.0)
    times, dynamic, dense = grid_block_times(
        PRESETS["a100"], ENGINES["pallas"], BlockShape.from_specs(SMALL_BLOCKS), setting
    )
    assert times.shape == (len(SMALL_BLOCKS), *setting.mode.shape)
    profile, engine = PRESETS["a100"].as_arrays(), ENGINES["pallas"].as_arrays()
    rng = np.random.default_rng(0)
    for _ in range(6):
        i = int(rng.integers(len(SMALL_BLOCKS)))
        index = tuple(int(rng.integers(n)) for n in setting.mode.shape)
        one = jax.tree.map(lambda x, index=index: x[index], setting)
        shape = jax.tree.map(lambda x: x[0], BlockShape.from_specs([SMALL_BLOCKS[i]]))
        assert float(times[(i, *index)]) == pytest.approx(float(block_time(profile, engine, shape, one)), rel=1e-5)
        assert float(dynamic[(i, *index)]) == pytest.approx(float(block_macs(shape, one)[0]), rel=1e-5)
        assert float(dense[(i, *index)]) == pytest.approx(SMALL_BLOCKS[i].dense_macs, rel=1e-6)


# ----------------------------------------------------------------------------- kernel geometry


def geometry_launch(**fields) -> Launches:
    """One gathered launch of known geometry on a 64 x 64 tile with 32-channel K steps."""
    return one_launch(kind=KIND_GATHERED, tile_m=64.0, tile_n=64.0, block_k=32.0, **fields)


def test_kernel_grid_runs_in_waves_of_ctas_and_drained_steps_wait_for_memory():
    """Hand counts on the toy device (4 SMs, 2.5e11 FLOP/s per SM at eff_sparse 0.5 x 1/4):
    one CTA's chain is k_steps MMA steps; 5 CTAs take two waves; a drained main loop adds
    the memory latency at every step of every wave, a pipelined one once."""
    fast_memory = TOY.replace(dram_bw=1e16, l2_bw=1e16)
    step = 2 * 64 * 64 * 32 / (1e12 * 0.5 / 4)
    work = dict(m=256.0, n=64.0, k=320.0, a_bytes=1.0, k_steps=10.0, latency=1e-6)
    pipelined = {ctas: seconds(fast_memory, geometry_launch(ctas=ctas, wait_depth=2.0, **work)) for ctas in (4, 5, 8)}
    assert pipelined[4] == pytest.approx(2e-6 + 10 * step + 1e-6, rel=1e-6)
    assert pipelined[5] == pytest.approx(2e-6 + 2 * 10 * step + 1e-6, rel=1e-6)
    assert pipelined[8] == pytest.approx(pipelined[5], rel=1e-6)
    drained = seconds(fast_memory, geometry_launch(ctas=5.0, wait_depth=0.0, **work))
    assert drained - pipelined[5] == pytest.approx((2 * 10 - 1) * 1e-6, rel=1e-6)


def test_under_filled_kernel_grid_streams_at_its_fraction_of_the_sms():
    """A memory-bound launch on 1 of the toy device's 4 SMs moves its bytes at a quarter of
    the bandwidth; on 4 or more SMs at all of it."""
    work = dict(m=64.0, n=64.0, k=32.0, o_bytes=2e8, k_steps=1.0, wait_depth=2.0)
    full = seconds(TOY, geometry_launch(ctas=4.0, **work)) - 2e-6
    assert full == pytest.approx(2e8 / (1e11 * 0.5), rel=1e-3)
    assert seconds(TOY, geometry_launch(ctas=1.0, **work)) - 2e-6 == pytest.approx(4 * full, rel=1e-6)
    assert seconds(TOY, geometry_launch(ctas=8.0, **work)) - 2e-6 == pytest.approx(full, rel=1e-6)


def test_h100_kernel_grid_steps_at_132_ctas():
    """Wave quantization on the H100 preset (132 SMs): 133 CTAs take twice as long as 132,
    264 as long as 133."""
    work = dict(m=64.0, n=64.0, k=2304.0, k_steps=72.0, wait_depth=2.0, a_bytes=1.0)
    times = {ctas: seconds(PRESETS["h100"], geometry_launch(ctas=float(ctas), **work), 1.0) for ctas in (132, 133, 264)}
    overhead = float(PRESETS["h100"].launch_overhead)
    assert times[133] - overhead == pytest.approx(2 * (times[132] - overhead), rel=1e-6)
    assert times[264] == pytest.approx(times[133], rel=1e-6)


def _report_launches():
    """The engine's Pallas launches of ResNet-50 at rate 0.5, S = 2, batch 1 and 8 (bf16)
    as the GPU build report lists them (laud_jax.gpu_check.report), with the predictor's
    setting whose capacities are the report's."""
    launches = [
        launch
        for launch in report.engine_launches(["resnet50"], [1, 8], ["bfloat16"], [2], densities=(0.5,))
        if launch.kernel != "channel_gather_matmul"  # the engine's channel mode does not call it
    ]
    settings = []
    for launch in launches:
        block, size = launch.block, launch.patch_size
        cells = launch.batch * (block.h_out // size) ** 2
        pixels = report.spatial_capacities(block, size, launch.batch, 0.5)[1]
        settings.append(
            block_setting(
                "spatial",
                size,
                rho_spatial=np.ceil(0.5 * cells) / cells,
                rho_conv1=pixels / (launch.batch * block.h_in * block.w_in),
                batch=launch.batch,
                dtype="bfloat16",
            )
        )
    return launches, jax.tree.map(lambda *xs: jnp.stack(xs), *settings)


@jax.jit
def _pallas_records(shapes, settings):
    return jax.vmap(lambda shape, setting: block_launches(shape, setting, ENGINES["pallas"]))(shapes, settings)


def test_pallas_engine_launches_the_kernels_own_grid():
    """Per engine launch (conv1 gather_matmul, conv2 patch_conv, conv3 conv1x1_scatter_add):
    the predictor's tile, K steps per CTA and split-K equal the build report's, its CTAs the
    grid of the kernel traced at that shape, and a split launch writes the kernel's float32
    partial sums and adds one reduction launch reading them."""
    launches, settings = _report_launches()
    records = _pallas_records(BlockShape.from_specs([launch.block for launch in launches]), settings)
    splits = {launch.split_k for launch in launches}
    assert 1 in splits and max(splits) > 1  # both kinds are covered
    for i, launch in enumerate(launches):
        slot = LAUNCH_NAMES.index(launch.slot)
        record = jax.tree.map(lambda x, i=i, slot=slot: float(x[i, slot]), records)
        label = (launch.where, launch.batch)
        assert record.kind == KIND_GATHERED, label
        assert (record.tile_m, record.tile_n) == (launch.tiles.block_m, launch.tiles.block_n), label
        assert (record.k_steps, record.split, record.block_k) == (launch.k_steps, launch.split_k, launch.tiles.block_k)
        assert record.wait_depth == 2.0, label
        jaxpr = jax.make_jaxpr(functools.partial(launch.fn, implementation="interpret"))(*launch.args)
        (call,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "pallas_call"]
        grid = call.params["grid_mapping"].grid
        if launch.kernel == "conv1x1_scatter_add":  # tiles past the active rows exit at once
            rows = launch.args[0].shape[0] * launch.patch_size**2
            assert grid == (-(-rows // launch.tiles.block_m), -(-launch.block.out_channels // launch.tiles.block_n))
            assert 0 < record.ctas <= np.prod(grid), label
            continue
        assert record.ctas == np.prod(grid), label
        (out,) = call.outvars
        reduce = jax.tree.map(lambda x, i=i, slot=slot: float(x[i, slot + 1]), records)
        assert LAUNCH_NAMES[slot + 1] == f"{launch.slot}_reduce"
        if launch.split_k > 1:
            assert record.o_bytes == out.aval.size * out.aval.dtype.itemsize, label
            partials_and_result = record.o_bytes * (1 + 2 / (4 * launch.split_k))  # float32 in, bf16 out
            assert reduce.weight == 1.0 and reduce.o_bytes == pytest.approx(partials_and_result, rel=1e-6), label
        else:
            assert reduce.weight == 0.0, label


def test_drained_conv2_costs_a_memory_latency_per_k_step():
    """The stage-3 conv2 at batch 8 (bf16, S = 2, rate 0.5) predicted with every K step
    waiting for its loads (patch_conv before its pipeline fix) costs about k_steps x the
    memory latency per wave of CTAs more than with the copies in flight."""
    spec = network_spec({"arch": "resnet50", "num_classes": 1000}, (224, 224)).blocks[7]
    shape = jax.tree.map(lambda x: x[0], BlockShape.from_specs([spec]))
    setting = block_setting("spatial", 2, 0.5, batch=8, dtype="bfloat16")
    profile, slot = PRESETS["h100"].as_arrays(), LAUNCH_NAMES.index("conv2")
    pipelined = ENGINES["pallas"]
    drained = pipelined.replace(wait_depth=0.0)
    record = jax.tree.map(lambda x: float(x[slot]), block_launches(shape, setting, pipelined))
    waves = np.ceil(record.ctas / 132)
    assert waves > 1 and record.k_steps > 1
    extra = float(block_launch_times(profile, drained.as_arrays(), shape, setting)[slot]) - float(
        block_launch_times(profile, pipelined.as_arrays(), shape, setting)[slot]
    )
    stalls = (waves * record.k_steps - 1) * float(pipelined.memory_latency)
    # at most the stalls; a little less where the pipelined launch streams its bytes longer
    # than its chain of steps (its time is the larger of the two)
    assert 0.8 * stalls < extra <= stalls * (1 + 1e-6)


# ----------------------------------------------------------------------------- network and presets


def _ratio(hardware, engine, mode, granularity, batch, dtype="float32", rho=0.5):
    spec = network_spec(
        {"arch": "resnet101", "num_classes": 1000, "mode": mode, "granularity": granularity}, (224, 224)
    )
    return predict(spec, PRESETS[hardware], engine, rho=rho, batch=batch, dtype=dtype)


def test_network_prediction_adds_up_and_static_mode_is_exact():
    static = _ratio("v100", "pallas", "static", 1, 8)
    assert static.latency_ratio == pytest.approx(1.0) and static.mac_ratio == pytest.approx(1.0)
    dynamic = _ratio("v100", "pallas", "spatial", (4, 4, 2, 1), 8)
    blocks = sum(b["dynamic_ms"] for b in dynamic.blocks)
    overhead = 1e3 * float(PRESETS["v100"].call_overhead)
    assert dynamic.dynamic_ms == pytest.approx(dynamic.fixed_ms + blocks + overhead, rel=1e-6)
    assert dynamic.static_ms == pytest.approx(static.static_ms, rel=1e-6)
    assert 0.4 < dynamic.mac_ratio < 0.75


def test_network_grid_equals_per_configuration_predictions():
    spec = network_spec({"arch": "resnet_small", "num_classes": 10}, (64, 64))
    modes = ("static", "spatial", "layer")
    setting = block_setting("spatial", 2, jnp.asarray([0.3, 0.8])[None, :, None], batch=jnp.asarray([1.0, 4.0]))
    setting = dataclasses.replace(setting, mode=jnp.asarray([MODE_CODE[m] for m in modes], jnp.float32)[:, None, None])
    grid = np.asarray(grid_network_times(PRESETS["rtx3090"], ENGINES["pallas"], spec, setting))
    assert grid.shape == (3, 2, 2)
    for mi, ri, bi in ((1, 0, 1), (2, 1, 0), (0, 1, 1)):
        configured = network_spec(
            {"arch": "resnet_small", "num_classes": 10, "mode": modes[mi], "granularity": 2}, (64, 64)
        )
        expected = predict(configured, PRESETS["rtx3090"], "pallas", rho=(0.3, 0.8)[ri], batch=(1, 4)[bi])
        assert 1e3 * grid[mi, ri, bi] == pytest.approx(expected.dynamic_ms, rel=1e-5)


def test_presets_agree_with_the_published_analysis():
    # Server GPU, batch 128: per-pixel masks lose at rho = 0.5, coarse patches and layer
    # skipping gain. Our Pallas engine on an A100 (its layer path writes the executing
    # samples back in a loop, one step each: it loses); the halo formulation on every
    # server preset.
    assert _ratio("a100", "pallas", "spatial", 1, 128, "bfloat16").latency_ratio > 1.0
    assert _ratio("a100", "pallas", "spatial", 7, 128, "bfloat16").latency_ratio < 1.0
    for hardware in ("v100", "rtx3090", "a100", "h100"):
        assert _ratio(hardware, "halo", "spatial", 1, 128, "bfloat16").latency_ratio > 1.0, hardware
        assert _ratio(hardware, "halo", "spatial", 7, 128, "bfloat16").latency_ratio < 1.0, hardware
        assert _ratio(hardware, "halo", "layer", 1, 128, "bfloat16").latency_ratio < 1.0, hardware
    # Edge GPU, batch 1: every S gains.
    for size in (1, (2, 2, 2, 1), (4, 4, 2, 1), 7):
        assert _ratio("jetson_tx2", "pallas", "spatial", size, 1).latency_ratio < 1.0, size


def test_granularity_trend_of_the_published_analysis():
    """LASNet: per-pixel masks (S = 1) pay off on a weak device at batch 1 (Jetson TX2) but
    lose to the static network on a V100 at batch 128, where coarse S gains. Our engine
    reproduces it with the V100 on its fp16 tensor cores; in fp32 (LASNet's predictor) the
    V100 is compute-bound and S = 1 still gains (docs/latency.md, "Granularity trend")."""
    edge = _ratio("jetson_tx2", "pallas", "spatial", 1, 1)
    server = _ratio("v100", "pallas", "spatial", 1, 128, "bfloat16")
    # direction: S = 1 gains on the edge device and loses on the server
    assert edge.latency_ratio < 1.0 < server.latency_ratio
    # scale: the edge device, compute-bound, gains no more than the MACs allow (maskers and
    # index lists cost); the server loses by tens of percent, not by multiples
    assert edge.mac_ratio < edge.latency_ratio < 0.95
    assert server.latency_ratio < 1.3
    # coarse patches beat S = 1 on the server in either dtype, and beat the static network
    for dtype in ("bfloat16", "float32"):
        fine = _ratio("v100", "pallas", "spatial", 1, 128, dtype).latency_ratio
        for coarse in ((7, 7, 7, 7), (8, 4, 7, 7)):
            assert _ratio("v100", "pallas", "spatial", coarse, 128, dtype).latency_ratio < min(fine, 1.0), (
                dtype,
                coarse,
            )
    with pytest.raises(ValueError, match="does not divide"):
        _ratio("v100", "pallas", "spatial", (8, 8, 7, 7), 128)


# ----------------------------------------------------------------------------- search


def test_search_picks_the_fastest_valid_option_per_stage():
    profile, engine = PRESETS["v100"], ENGINES["pallas"]
    result = search(
        "resnet_small",
        profile,
        engine,
        target_rate=0.5,
        batch=4,
        image_shape=(64, 64, 3),
        granularities=SEARCH_SIZES,
        modes=SEARCH_MODES,
        channel_granularities=SEARCH_GROUPS,
    )
    assert len(result.stages) == 4 and len(result.candidates["latency_ratio"][0]) == len(SEARCH_SIZES)
    # Independent brute force: the grid of block times, MAC ratios interpolated with numpy.
    times, dynamic, dense = (
        np.asarray(x, np.float64)
        for x in grid_block_times(profile, engine, BlockShape.from_specs(SMALL_BLOCKS), _search_setting(4.0, 0.0))
    )
    fixed = result.static_ms - sum(s["static_ms"] for s in result.stages)
    network = []
    for g, group in enumerate(SEARCH_GROUPS):
        choices, total = [], 0.0
        for stage in range(4):
            members = [i for i, blk in enumerate(SMALL_BLOCKS) if blk.stage == stage]
            best, best_time = None, np.inf
            for si, size in enumerate(SEARCH_SIZES):
                for mi, mode in enumerate(SEARCH_MODES):
                    if mode == "spatial" and any(SMALL_BLOCKS[i].h_out % size for i in members):
                        continue
                    if mode != "spatial" and si:
                        continue
                    if mode == "channel" and any(SMALL_BLOCKS[i].width % group for i in members):
                        continue
                    ratio = dynamic[members, si, mi, g].sum(0) / dense[members, si, mi, g].sum(0)
                    t = np.interp(0.5, ratio, times[members, si, mi, g].sum(0), left=np.inf, right=np.inf)
                    if t < best_time:
                        best, best_time = (mode, size if mode == "spatial" else 1), t
            choices.append((best, best_time))
            total += best_time
        network.append((total, group, choices))
    total, group, choices = min(network, key=lambda item: item[0])
    assert result.channel_granularity == group
    for stage, (best, best_time) in enumerate(choices):
        chosen = result.stages[stage]
        assert (chosen["mode"], chosen["granularity"]) == best
        assert 1e-3 * chosen["dynamic_ms"] == pytest.approx(best_time, rel=1e-4)
    assert result.dynamic_ms == pytest.approx(fixed + 1e3 * total, rel=1e-4)
    fragment = result.config_fragment()["model"]
    assert fragment["granularity"] == result.granularity
    assert "--exp.model.granularity=" + ",".join(map(str, result.granularity)) in result.flags()


def test_search_rejects_bad_requests():
    with pytest.raises(ValueError, match="target rate"):
        search("resnet101", PRESETS["v100"], ENGINES["pallas"], target_rate=0.0)
    with pytest.raises(ValueError, match="search modes"):
        search("resnet101", PRESETS["v100"], ENGINES["pallas"], modes=("spatial", "fast"))
    with pytest.raises(ValueError, match="no valid"):
        search("resnet101", PRESETS["v100"], ENGINES["pallas"], modes=("spatial",), granularities=(3,))


# ----------------------------------------------------------------------------- calibration


def test_calibration_recovers_a_known_profile_from_its_timings():
    rng = np.random.default_rng(1)
    specs = (
        list(SMALL_BLOCKS)
        + list(network_spec({"arch": "resnet50", "num_classes": 10}, (112, 112)).blocks[::3])
        + list(network_spec({"arch": "regnety_400mf", "num_classes": 10}, (112, 112)).blocks[::4])
    )
    n = 240
    picks = rng.integers(0, len(specs), n)
    settings = []
    for i in picks:
        sizes = [s for s in (1, 2, 4, 7) if specs[i].h_out % s == 0]
        settings.append(
            block_setting(
                str(rng.choice(MODES)),
                int(rng.choice(sizes)),
                float(rng.uniform(0.1, 1.0)),
                batch=int(rng.choice([1, 2, 4, 8])),
            )
        )
    shapes = BlockShape.from_specs([specs[i] for i in picks])
    settings = jax.tree.map(lambda *x: jnp.stack(x), *settings)
    truth = LOCAL_INITIAL.replace(
        flops_fp32=90e9,
        eff_conv=0.6,
        eff_grouped=0.08,
        dram_bw=12e9,
        l2_bw=45e9,
        gather_eff=0.4,
        launch_overhead=8e-6,
        loop_overhead=3e-6,
        call_overhead=45e-6,
        k_half=24.0,
        sum_weight=0.3,
    )
    exact = np.asarray(predict_measured(truth.as_arrays(), ENGINES["xla"].as_arrays(), shapes, settings))
    # exact timings: every parameter comes back
    fitted, _ = fit_profile(Measurements(shapes, settings, jnp.asarray(exact, jnp.float32)), ENGINES["xla"])
    for field in FIT_FIELDS:
        assert float(getattr(fitted, field)) == pytest.approx(float(getattr(truth, field)), rel=0.01), field
    # 2% timing noise: the parameters that carry most of the time stay within 10%, the
    # weakly determined ones (bandwidths, max/sum blend) within 30%, predictions within 3%
    noisy = exact * np.exp(rng.normal(0.0, 0.02, n))
    data = Measurements(shapes, settings, jnp.asarray(noisy, jnp.float32))
    fitted, _ = fit_profile(data, ENGINES["xla"])
    for field in FIT_FIELDS:
        weak = field in ("dram_bw", "l2_bw", "gather_eff", "k_half", "sum_weight")
        assert float(getattr(fitted, field)) == pytest.approx(float(getattr(truth, field)), rel=0.3 if weak else 0.1), (
            field
        )
    errors = error_summary(relative_errors(fitted, ENGINES["xla"], Measurements(shapes, settings, jnp.asarray(exact))))
    assert errors["median_abs_rel_error"] < 0.03 and errors["within_20pct"] == 1.0
    with pytest.raises(ValueError, match="cannot fit"):
        fit_profile(data, ENGINES["xla"], fields=("cores",))


# ----------------------------------------------------------------------------- profiles and CLI


def test_profiles_are_pytrees_and_round_trip_through_json(tmp_path):
    leaves = jax.tree.leaves(PRESETS["h100"].as_arrays())
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert float(PRESETS["h100"].cores) == 132
    path = str(tmp_path / "p.json")
    profile_to_json(PRESETS["rtx3090"], path, name="rtx3090", meta={"note": "x"})
    loaded, record = profile_from_json(path)
    assert record["meta"]["note"] == "x"
    for field in dataclasses.fields(HardwareProfile):
        np.testing.assert_allclose(
            np.asarray(getattr(loaded, field.name)), np.asarray(getattr(PRESETS["rtx3090"], field.name))
        )
    assert get_profile(path).dram_bw == PRESETS["rtx3090"].dram_bw
    with pytest.raises(ValueError, match="unknown hardware"):
        get_profile("tpu9000")


def test_local_profile_needs_a_fit(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUD_JAX_LOCAL_PROFILE", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="calibrate"):
        get_profile("local")


def test_cli_predict_and_search_write_their_json(tmp_path, capsys):
    out = tmp_path / "predict.json"
    cli(
        [
            "predict",
            "--hardware",
            "v100",
            "--arch",
            "resnet101",
            "--mode",
            "spatial",
            "--granularity",
            "4,4,2,1",
            "--rate",
            "0.5",
            "--batch",
            "8",
            "--json",
            str(out),
        ]
    )
    record = json.loads(out.read_text())
    assert {"static_ms", "dynamic_ms", "latency_ratio", "blocks"} <= set(record)
    assert len(record["blocks"]) == 33 and record["dynamic_ms"] / record["static_ms"] == pytest.approx(
        record["latency_ratio"]
    )
    out = tmp_path / "search.json"
    cli(
        [
            "search",
            "--hardware",
            "v100",
            "--arch",
            "resnet_small",
            "--granularity",
            "1,2,4,8",
            "--batch",
            "16",
            "--json",
            str(out),
        ]
    )
    record = json.loads(out.read_text())
    assert len(record["stages"]) == 4 and record["config"]["model"]["granularity"]
    assert "--exp.model.granularity=" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "--mode", "sparse"], "unknown mode"),
        (["predict", "--arch", "resnet50", "--granularity", "3"], "does not divide"),
        (["predict", "--hardware", "tpu9000"], "unknown hardware"),
        (["search", "--batch", "0"], "--batch"),
    ],
)
def test_cli_rejects_bad_input_before_computing(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        cli(argv)
    assert message in str(error.value)

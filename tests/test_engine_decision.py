"""The engine's per-block choice between sparse execution and the dense block with its masks.

Whatever a block gets, the logits equal ``model.apply``'s; the choice follows the latency
predictor (dense where gathers are expensive, sparse where compute dominates); without a
profile the plans are today's.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from laud_jax.latency import PRESETS
from laud_jax.latency.chooser import ExecutionChooser
from laud_jax.models import build_model, network_spec
from laud_jax.sparse import BlockPlan, SparseEngine, capacity
from laud_jax.sparse.synthetic import random_masks, random_variables

IMAGE = (32, 48, 3)  # every map and mask grid has H != W
MIXED = {
    "arch": "resnet_tiny",
    "num_classes": 7,
    "mode": ("spatial", "spatial+channel", "layer", "lc"),
    "granularity": (4, 2, 2, 1),
}
# RegNetY (SE, group conv): SE pooling over the executed pixels masks every stage of the
# dense fallback; over every pixel only the output is masked.
REGNET = {
    "arch": "regnety_400mf",
    "num_classes": 7,
    "stage_depths": (1, 2, 1, 1),
    "mode": ("spatial", "spatial+channel", "lc", "spatial"),
    "granularity": (2, 2, 1, 1),
}
REGNET_IMAGE = (64, 96, 3)
# Every stage a bottleneck with spatial gates (the blocks whose dense fallback only masks the output).
SPATIAL = {**MIXED, "mode": "spatial"}
# Gathers and scatters a million times slower than streaming: sparse execution never pays.
GATHER_BOUND = PRESETS["v100"].replace(gather_eff=1e-6, eff_sparse=1e-6)
# Compute a million times slower on one core running one tile at a time (no wave rounding
# hides the rows saved), no per-op or per-loop-step cost: MACs decide.
COMPUTE_BOUND = PRESETS["v100"].replace(
    flops_fp32=15.7e6,
    flops_half=125e6,
    cores=1.0,
    tiles_per_core=1.0,
    launch_overhead=0.0,
    loop_overhead=0.0,
    call_overhead=0.0,
)


@functools.cache
def setup(cfg_items: tuple, image: tuple = IMAGE):
    cfg = dict(cfg_items)
    model = build_model(cfg)
    return cfg, model, random_variables(model, image, seed=1, random_bn=True)


def reference(model, variables, x, masks=None):
    return jax.jit(lambda v, x, m: model.apply(v, x, masks=m, train=False, gate_offset=0.0))(variables, x, masks)[0]


def assert_close(out, ref):
    scale = float(np.max(np.abs(np.asarray(ref))))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=2e-5 * max(scale, 1.0))


MIXES = [
    ({**MIXED, "channel_mask_position": "post_act"}, IMAGE, 1),
    ({**MIXED, "channel_mask_position": "post_act"}, IMAGE, 2),
    ({**MIXED, "channel_mask_position": "pre_bn"}, IMAGE, 1),
    ({**MIXED, "channel_mask_position": "pre_bn"}, IMAGE, 2),
    ({**REGNET, "se_pool": "masked"}, REGNET_IMAGE, 2),
    ({**REGNET, "se_pool": "dense", "channel_mask_position": "pre_bn"}, REGNET_IMAGE, 2),
]


@pytest.mark.parametrize(
    "cfg,image,batch", MIXES, ids=["post_act-b1", "post_act-b2", "pre_bn-b1", "pre_bn-b2", "regnet-se-masked", "regnet"]
)
def test_logits_equal_model_apply_for_every_mix_of_sparse_and_masked_dense(cfg, image, batch):
    cfg, model, variables = setup(tuple(sorted(cfg.items())), image)
    spec = network_spec(cfg, image)
    masks = random_masks(spec, batch, 0.5, seed=batch)
    x = jax.random.normal(jax.random.key(3), (batch, *image))
    expected = reference(model, variables, x, masks)
    engine = SparseEngine(cfg, variables)
    planned = engine.plan_masks(masks, image, batch)
    n = len(spec.blocks)
    mixes = {
        "as planned": [False] * n,
        "every block dense": [True] * n,
        "even blocks dense": [i % 2 == 0 for i in range(n)],
        "odd blocks dense": [i % 2 == 1 for i in range(n)],
    }
    for name, dense in mixes.items():
        plans = tuple(BlockPlan("dense") if d and p.run == "sparse" else p for d, p in zip(dense, planned.plans))
        logits, info = engine.apply(x, masks=dataclasses.replace(planned, plans=plans))
        assert info.runs == tuple(p.run for p in plans), name
        assert_close(logits, expected)


def test_every_block_masked_dense_with_live_gates_stepwise_and_speculative():
    """A chooser that never picks sparse: stepwise and speculative runs on the model's own gates."""
    cfg, model, variables = setup(tuple(sorted(MIXED.items())))
    x = jax.random.normal(jax.random.key(5), (2, *IMAGE))
    expected = reference(model, variables, x)
    engine = SparseEngine(cfg, variables, latency_profile=GATHER_BOUND)
    for execution in ("stepwise", "speculative"):
        logits, info = engine.apply(x)
        assert info.execution == execution
        assert set(info.runs) <= {"dense", "skip"} and "dense" in info.runs
        assert_close(logits, expected)


@pytest.mark.parametrize(
    "profile,expected_run", [(GATHER_BOUND, "dense"), (COMPUTE_BOUND, "sparse")], ids=["gather-bound", "compute-bound"]
)
def test_decisions_follow_the_profile(profile, expected_run):
    cfg, model, variables = setup(tuple(sorted(SPATIAL.items())))
    spec = network_spec(cfg, IMAGE)
    masks = random_masks(spec, 1, 0.5, seed=7)
    engine = SparseEngine(cfg, variables, latency_profile=profile)
    plan = engine.plan_masks(masks, IMAGE, 1)
    assert set(p.run for p in plan.plans) == {expected_run}
    x = jax.random.normal(jax.random.key(4), (1, *IMAGE))
    logits, info = engine.apply(x, masks=plan)
    assert info.gated_runs()[expected_run] == len(spec.blocks)
    assert_close(logits, reference(model, variables, x, masks))


def test_the_decision_flips_where_the_predicted_times_cross():
    """Sweeping the gather efficiency: the sparse block's predicted time falls as gathers
    get cheaper, the dense block's stays, and the plan is dense exactly where sparse is
    predicted no faster: one flip, at the crossing."""
    spec = network_spec(SPATIAL, IMAGE).blocks[0]
    cells = capacity(12, spec.mask_grid[0] * spec.mask_grid[1], 32)
    h1, w1 = spec.conv1_hw
    sparse_plan = BlockPlan("sparse", cells=cells, pixels=capacity(h1 * w1 * 3 // 4, h1 * w1, 32))
    sparse_ms, dense_ms, runs = [], [], []
    for efficiency in np.logspace(-10, 0, 11):
        chooser = ExecutionChooser(COMPUTE_BOUND.replace(gather_eff=efficiency, eff_sparse=efficiency), "xla")
        sparse, dense = chooser.predicted_ms(spec, sparse_plan, 1)
        sparse_ms.append(sparse)
        dense_ms.append(dense)
        runs.append(chooser.choose(spec, sparse_plan, 1).run)
    assert np.all(np.diff(sparse_ms) <= 1e-9) and np.ptp(dense_ms) < 1e-6 * dense_ms[0]
    assert runs == ["sparse" if s < d else "dense" for s, d in zip(sparse_ms, dense_ms)]
    assert runs[0] == "dense" and runs[-1] == "sparse"
    assert runs == sorted(runs)  # "dense" < "sparse": a single flip


def test_without_a_profile_the_plans_are_todays():
    """Every gated block with work runs sparse, at the ladder capacity of its mask's counts."""
    cfg, _, variables = setup(tuple(sorted(SPATIAL.items())))
    spec = network_spec(cfg, IMAGE)
    masks = random_masks(spec, 2, 0.5, seed=8)
    engine = SparseEngine(cfg, variables)
    assert engine.chooser is None
    plan = engine.plan_masks(masks, IMAGE, 2)
    for block, block_plan, mask in zip(spec.blocks, plan.plans, masks):
        cells = int(np.sum(mask["spatial"]))
        assert block_plan.run == "sparse"
        assert block_plan.cells == capacity(cells, 2 * block.mask_grid[0] * block.mask_grid[1], 32)
    # A profile under which sparse always wins changes nothing.
    assert SparseEngine(cfg, variables, latency_profile=COMPUTE_BOUND).plan_masks(masks, IMAGE, 2).plans == plan.plans


def test_benchmark_and_evaluate_report_the_choice(tmp_path, capsys):
    """``--latency-profile`` (a profile JSON here) reaches the engine; the per-block table
    shows each block's plan and both report the count of sparse / dense / skipped blocks."""
    from laud_jax import benchmark, evaluate
    from laud_jax.latency import profile_to_json

    path = str(tmp_path / "gather_bound.json")
    profile_to_json(GATHER_BOUND, path, name="gather_bound")
    args = ["--arch", "resnet_tiny", "--image-size", "32", "--num-classes", "7", "--mode", "spatial"]
    args += ["--granularity", "2,2,1,1", "--rate", "0.5", "--repeats", "2", "--block-repeats", "2", "--warmup", "1"]
    result = benchmark.main(args + ["--no-progress", "--skip-masked", "--skip-stepwise", "--latency-profile", path])
    blocks = len(result["blocks"])
    assert result["runs"] == ["dense"] * blocks and result["gated_runs"] == {"sparse": 0, "dense": blocks, "skip": 0}
    assert [row["plan"] for row in result["blocks"]] == ["dense"] * blocks
    assert all(row["predicted"]["sparse_ms"] >= row["predicted"]["dense_ms"] for row in result["blocks"])
    assert all(row["sparse"]["median_ms"] > 0 for row in result["blocks"])  # the sparse plan timed beside it
    assert result["max_abs_diff_vs_model"]["dynamic"] < 1e-4
    assert f"{blocks} dense then masked" in capsys.readouterr().out

    cfg, model, variables = setup(tuple(sorted(SPATIAL.items())))
    x = np.asarray(jax.random.normal(jax.random.key(6), (1, *IMAGE)))
    latency = evaluate.measure_latency(cfg, variables, x, backend="xla", repeats=2, warmup=1, latency_profile=path)
    assert latency["gated_runs"]["dense"] + latency["gated_runs"]["skip"] == len(network_spec(cfg, IMAGE).blocks)
    assert set(latency["runs"]) <= {"dense", "skip"} and len(latency["runs"]) == len(network_spec(cfg, IMAGE).blocks)
    assert evaluate.run_codes(["sparse", "dense", "skip", "sparse", "sparse", "dense"]) == "sd-ss d"
    assert latency["max_logit_difference"] < 1e-3


def test_blocks_whose_gates_switch_everything_off_are_skipped_on_the_device():
    """Plans made for inputs that execute every block, run on masks that switch some blocks
    off entirely: the logits stay exact, and the compiled program decides per block with one
    conditional (the switched-off block is not computed and masked, it is skipped)."""
    cfg, model, variables = setup(tuple(sorted(MIXED.items())))
    spec = network_spec(cfg, IMAGE)
    batch = 1
    on = random_masks(spec, batch, 1.0, seed=2)
    off = random_masks(spec, batch, 0.5, seed=4)
    gated = [i for i, block in enumerate(spec.blocks) if block.spatial or block.layer]
    for i in gated[::2]:  # every other gated block: nothing executes
        off[i] = {key: np.zeros_like(value) if key in ("spatial", "layer") else value for key, value in off[i].items()}
    engine = SparseEngine(cfg, variables)
    planned = engine.plan_masks(on, IMAGE, batch)
    assert set(planned.plans[i].run for i in gated) == {"sparse"}
    kept = dataclasses.replace(planned, forced=engine.plan_masks(off, IMAGE, batch).forced)
    x = jax.random.normal(jax.random.key(6), (batch, *IMAGE))
    logits, info = engine.apply(x, masks=kept)
    assert info.plans == list(planned.plans)
    assert_close(logits, reference(model, variables, x, off))
    from laud_jax.sparse import engine as engine_module

    _, folded = engine.network(IMAGE)
    text = engine_module._planned_network.lower(
        engine.ops, spec, planned.plans, engine.dtype, folded, x, kept.forced, np.float32(0.0)
    ).as_text()
    assert text.count("stablehlo.case") + text.count("stablehlo.if") == len(gated)


@pytest.mark.parametrize("batch", [1, 3])
def test_speculative_fit_test_agrees_with_planning_every_block(batch):
    """The speculative driver's vectorized check (counts within the kept plans' capacities)
    says exactly what planning each block from its counts and ``_covers`` say."""
    from laud_jax.sparse import engine as engine_module
    from laud_jax.sparse.routing import COUNT_KEYS, count_totals, plan_block

    spec = network_spec(dict(MIXED), IMAGE)
    rng = np.random.default_rng(batch)

    def random_counts():
        rows = []
        for block in spec.blocks:
            if block.mode == "static":
                rows.append([0, 0, 0, 0])
                continue
            totals = count_totals(block, batch)
            row = [int(rng.integers(0, totals[k] + 1)) if k in totals else 0 for k in COUNT_KEYS]
            if not block.layer:
                row[COUNT_KEYS.index("samples")] = batch
            rows.append(row)
        return np.asarray(rows)

    agree = {True: 0, False: 0}
    for _ in range(300):
        made = random_counts()
        plans = tuple(
            BlockPlan("dense") if rng.random() < 0.1 else plan_block(b, c, batch, 32) for b, c in zip(spec.blocks, made)
        )
        counts = random_counts()
        if rng.random() < 0.5:  # often at or under the counts the plans were made for
            counts = np.minimum(counts, made + rng.integers(0, 2, made.shape))
        expected = all(
            engine_module._covers(have, plan_block(b, c, batch, 32)) for b, have, c in zip(spec.blocks, plans, counts)
        )
        assert engine_module._fits(*engine_module._limits(spec, plans), counts) == expected
        agree[expected] += 1
    assert min(agree.values()) > 10  # both outcomes were exercised

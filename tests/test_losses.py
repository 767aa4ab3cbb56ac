"""Losses against small hand-computed cases."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from laud_jax import losses


def fake_aux(block_macs, block_dense, dynamic, fixed=100.0, masker=None):
    """Records as the model writes them; ``batch_macs`` is the batch mean of ``macs`` here."""
    masker = masker or [0.0] * len(block_macs)
    blocks = [
        {
            "macs": jnp.asarray(m, jnp.float32),
            "batch_macs": jnp.mean(jnp.asarray(m, jnp.float32)),
            "dense_macs": jnp.asarray(d, jnp.float32),
            "masker_macs": jnp.asarray(k, jnp.float32),
            "dynamic": jnp.asarray(float(dyn)),
        }
        for m, d, k, dyn in zip(block_macs, block_dense, masker, dynamic)
    ]
    macs = fixed + sum(jnp.asarray(m, jnp.float32) for m in block_macs)
    return {
        "blocks": blocks,
        "macs": macs,
        "batch_macs": jnp.mean(macs),
        "dense_macs": jnp.asarray(fixed + sum(block_dense)),
    }


def test_bounds_start_at_target_and_relax_to_unit_interval():
    lower, upper = losses.sparsity_bounds(0.4, jnp.asarray(0.0))
    assert float(lower) == pytest.approx(0.4) and float(upper) == pytest.approx(0.4)
    # Half-way through the relaxation (progress 0.165): pi = cos^2(pi / 4) = 0.5.
    lower, upper = losses.sparsity_bounds(0.4, jnp.asarray(0.165))
    assert float(lower) == pytest.approx(0.2) and float(upper) == pytest.approx(0.7)
    lower, upper = losses.sparsity_bounds(0.4, jnp.asarray(0.9))
    assert float(lower) == pytest.approx(0.0, abs=1e-7) and float(upper) == pytest.approx(1.0)


@pytest.mark.parametrize("fraction", [0.1, 0.6, 1.5])
def test_bounds_relax_over_the_given_fraction(fraction):
    """Tight at the start, half-relaxed at fraction / 2, monotone, fully relaxed at the fraction."""
    t = 0.3
    grid = np.linspace(0.0, 1.0, 41)
    lowers, uppers = zip(*(losses.sparsity_bounds(t, jnp.asarray(p), fraction) for p in grid))
    lowers, uppers = np.asarray(lowers), np.asarray(uppers)
    assert np.all(np.diff(lowers) <= 1e-7) and np.all(np.diff(uppers) >= -1e-7)
    lower, upper = losses.sparsity_bounds(t, jnp.asarray(fraction / 2), fraction)
    assert float(lower) == pytest.approx(t / 2) and float(upper) == pytest.approx(1 - (1 - t) / 2)
    for p in grid:
        pi = math.cos(min(p / fraction, 1.0) * math.pi / 2) ** 2
        lower, upper = losses.sparsity_bounds(t, jnp.asarray(p), fraction)
        assert float(lower) == pytest.approx(pi * t, abs=1e-6)
        assert float(upper) == pytest.approx(1 - pi * (1 - t), abs=1e-6)
    if fraction < 1:
        lower, upper = losses.sparsity_bounds(t, jnp.asarray(fraction), fraction)
        assert float(lower) == pytest.approx(0.0, abs=1e-7) and float(upper) == pytest.approx(1.0)
    else:  # never fully relaxed within training
        lower, _ = losses.sparsity_bounds(t, jnp.asarray(1.0), fraction)
        assert float(lower) > 0.01


def test_block_ratio_counts_masker_macs_in_numerator_and_denominator():
    # Block: 40 of 100 MACs executed, masker 25 MACs: ratio (40 + 25) / (100 + 25) = 0.52.
    aux = fake_aux(block_macs=[[65.0, 65.0]], block_dense=[100.0], dynamic=[1], fixed=0.0, masker=[25.0])
    _, metrics = losses.sparsity_loss(aux, 0.5, jnp.asarray(0.0))
    assert float(metrics["sparsity_block"]) == pytest.approx((0.52 - 0.5) ** 2, rel=1e-5)
    # The network ratio divides by the static network's MACs (no maskers): 65 / 100.
    assert float(metrics["mac_ratio"]) == pytest.approx(0.65)


def test_sparsity_loss_hand_computed():
    # Two dynamic blocks, per-sample MACs (batch of 2), and one static block.
    aux = fake_aux(
        block_macs=[[80.0, 80.0], [20.0, 40.0], [50.0, 50.0]],
        block_dense=[100.0, 100.0, 50.0],
        dynamic=[1, 1, 0],
        fixed=50.0,
    )
    loss, metrics = losses.sparsity_loss(aux, 0.5, jnp.asarray(0.0))
    # Bounds [0.5, 0.5]; block ratios 0.8 and 0.3: penalties 0.09 and 0.04, mean 0.065.
    # Network: (50 + 80 + 30 + 50) / 300 = 0.7; (0.7 - 0.5)^2 = 0.04.
    assert float(metrics["sparsity_block"]) == pytest.approx(0.065)
    assert float(metrics["mac_ratio"]) == pytest.approx(0.7)
    assert float(loss) == pytest.approx(0.105)
    # After the relaxation, only the network term remains.
    loss, metrics = losses.sparsity_loss(aux, 0.5, jnp.asarray(0.5))
    assert float(metrics["sparsity_block"]) == pytest.approx(0.0, abs=1e-12)
    assert float(loss) == pytest.approx(0.04)


def test_kd_loss_hand_computed_and_zero_for_identical_logits():
    student = jnp.asarray([[1.0, 0.0]])
    teacher = jnp.asarray([[0.0, 2.0]])
    t = 2.0
    p = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()  # softmax(teacher / T)
    q = np.exp([0.5, 0.0]) / np.exp([0.5, 0.0]).sum()  # softmax(student / T)
    expected = t * t * float(np.sum(p * np.log(p / q)))
    assert float(losses.kd_loss(student, teacher, t)) == pytest.approx(expected, rel=1e-5)
    assert float(losses.kd_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)


def test_cross_entropy_and_total_loss_combine_terms():
    logits = jnp.asarray([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = jnp.asarray([0, 2])
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
    ce1 = -math.log(1 / (2 + math.e))
    assert float(losses.cross_entropy(logits, labels)) == pytest.approx((ce0 + ce1) / 2, rel=1e-5)
    aux = fake_aux([[60.0, 60.0]], [100.0], [1], fixed=0.0)
    teacher = logits[:, ::-1]
    total, metrics = losses.total_loss(
        logits,
        labels,
        aux,
        jnp.asarray(1.0),
        teacher_logits=teacher,
        target_rate=0.5,
        sparsity_weight=10.0,
        kd_alpha=0.5,
        kd_temperature=4.0,
    )
    expected = metrics["ce"] + 10.0 * (0.6 - 0.5) ** 2 + 0.5 * losses.kd_loss(logits, teacher, 4.0)
    assert float(total) == pytest.approx(float(expected), rel=1e-5)
    static_total, static_metrics = losses.total_loss(logits, labels, aux, jnp.asarray(1.0), dynamic=False)
    assert float(static_total) == pytest.approx(float(static_metrics["ce"]))
    assert "sparsity" not in static_metrics

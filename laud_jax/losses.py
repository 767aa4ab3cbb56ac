"""Training losses: cross-entropy, the sparsity loss and knowledge distillation.

All are pure functions of the model outputs ``(logits, aux)``, the labels, the teacher's
logits and ``progress`` (the fraction of training done, a traced scalar).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

# The per-block bounds relax from [t, t] to [0, 1] over this fraction of training (default).
BOUND_RELAX_FRACTION = 0.33


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against integer labels."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels))


def sparsity_bounds(
    target_rate: float, progress: jax.Array, relax_fraction: float = BOUND_RELAX_FRACTION
) -> tuple[jax.Array, jax.Array]:
    """(lower, upper) per-block MAC-ratio bounds.

    p = progress / relax_fraction, pi = cos^2(clip(p, 0, 1) * pi / 2); upper = 1 - pi (1 - t),
    lower = pi t. At the start (pi = 1) both are t; once ``relax_fraction`` of training is
    done (pi = 0) the bounds are [0, 1], leaving only the global MAC-ratio term.
    """
    p = jnp.clip(jnp.asarray(progress, jnp.float32) / relax_fraction, 0.0, 1.0)
    pi = jnp.cos(p * jnp.pi / 2) ** 2
    return pi * target_rate, 1.0 - pi * (1.0 - target_rate)


def sparsity_loss(
    aux: Mapping[str, Any],
    target_rate: float,
    progress: jax.Array,
    relax_fraction: float = BOUND_RELAX_FRACTION,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-block bound penalties (mean over dynamic blocks) + (F_dyn / F_full - t)^2.

    As in the released LAUDNet code: MACs come from batch-mean densities (the records'
    ``batch_macs``); a block's ratio has its maskers' MACs in the numerator and the
    denominator; F_full is the static network's MACs (no maskers). Static blocks
    (``dynamic`` = 0 in their record) are left out of the per-block term.
    """
    lower, upper = sparsity_bounds(target_rate, progress, relax_fraction)
    penalties, weights = [], []
    for block in aux["blocks"]:
        ratio = block["batch_macs"] / (block["dense_macs"] + block["masker_macs"])
        penalties.append(jnp.maximum(ratio - upper, 0.0) ** 2 + jnp.maximum(lower - ratio, 0.0) ** 2)
        weights.append(block["dynamic"])
    weights = jnp.stack(weights)
    block_term = jnp.sum(weights * jnp.stack(penalties)) / jnp.maximum(jnp.sum(weights), 1.0)
    mac_ratio = aux["batch_macs"] / aux["dense_macs"]
    network_term = (mac_ratio - target_rate) ** 2
    return block_term + network_term, {
        "sparsity_block": block_term,
        "sparsity_network": network_term,
        "mac_ratio": mac_ratio,
    }


def kd_loss(logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean."""
    t = temperature
    teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    student = jax.nn.log_softmax(logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
    return t * t * jnp.mean(kl)


def total_loss(
    logits: jax.Array,
    labels: jax.Array,
    aux: Mapping[str, Any],
    progress: jax.Array,
    *,
    teacher_logits: jax.Array | None = None,
    target_rate: float = 0.5,
    sparsity_weight: float = 10.0,
    kd_alpha: float = 0.5,
    kd_temperature: float = 4.0,
    bound_relax_fraction: float = BOUND_RELAX_FRACTION,
    dynamic: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = CE + lambda * L_sparse + alpha * KD; terms drop out when not applicable."""
    ce = cross_entropy(logits, labels)
    loss = ce
    metrics = {"ce": ce}
    if dynamic:
        sparse, sparse_metrics = sparsity_loss(aux, target_rate, progress, bound_relax_fraction)
        loss = loss + sparsity_weight * sparse
        metrics.update(sparse_metrics, sparsity=sparse)
    if teacher_logits is not None and kd_alpha > 0:
        kd = kd_loss(logits, teacher_logits, kd_temperature)
        loss = loss + kd_alpha * kd
        metrics["kd"] = kd
    metrics["loss"] = loss
    return loss, metrics

"""Optimizer, schedules, train state and the jitted train / eval steps."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from laud_jax import losses

State = dict[str, Any]  # {'step', 'params', 'batch_stats', 'opt_state', 'rng'}
MASKER_MODULES = ("gates",)  # parameters under these module names are mask/gate heads


def is_masker_path(path: tuple[Any, ...]) -> bool:
    """True for parameters of the maskers / gates (module 'gates' in every block)."""
    return any(getattr(k, "key", None) in MASKER_MODULES for k in path)


def peak_learning_rate(opt: ml_collections.ConfigDict, batch_size: int) -> float:
    """learning_rate scaled by batch_size / lr_reference_batch (when that is > 0)."""
    scale = batch_size / opt.lr_reference_batch if opt.lr_reference_batch else 1.0
    return float(opt.learning_rate) * scale


def lr_schedule(opt: ml_collections.ConfigDict, batch_size: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up, then cosine to zero per step (or constant)."""
    peak = peak_learning_rate(opt, batch_size)
    warmup = min(int(opt.warmup_steps), max(total_steps - 1, 0))
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), 0.0)
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
    return optax.constant_schedule(peak)


def make_optimizer(
    opt: ml_collections.ConfigDict, batch_size: int, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD (Nesterov, weight decay on all parameters) or AdamW, with the masker lr factor."""
    schedule = lr_schedule(opt, batch_size, total_steps)
    if opt.name == "sgd":
        parts = [optax.add_decayed_weights(opt.weight_decay)] if opt.weight_decay else []
        parts.append(optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov))
    else:
        parts = [optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)]
    if opt.grad_clip_norm:
        parts.insert(0, optax.clip_by_global_norm(opt.grad_clip_norm))
    if opt.masker_lr_multiplier != 1.0:
        masker_mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda path, _: is_masker_path(path), params
        )
        parts.append(optax.masked(optax.scale(opt.masker_lr_multiplier), masker_mask))
    return optax.chain(*parts), schedule


def temperature(step: int, total_steps: int, tau_start: float, tau_end: float) -> float:
    """Gumbel temperature tau_k = tau0 (tau1 / tau0)^(k / K), exponential per step."""
    fraction = min(step / max(total_steps, 1), 1.0)
    return tau_start * math.exp(fraction * math.log(tau_end / tau_start))


def init_state(
    model: Any,
    tx: optax.GradientTransformation,
    seed: int | jax.Array,
    image_shape: tuple[int, int, int],
    variables: dict[str, Any] | None = None,
) -> State:
    """Fresh train state; `variables` (if given) replace the initial params / batch stats.

    Parameters are drawn with the 'rbg' generator (compiles several times faster than
    threefry for a whole network); the per-step Gumbel noise uses threefry, whose bits do not
    depend on how the batch is sharded.
    """
    init_key = jax.random.key(seed, impl="rbg")
    rng_key = jax.random.fold_in(jax.random.key(seed), 1)
    if variables is None:
        variables = model.init({"params": init_key}, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": variables.get("batch_stats", {}),
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(rng_key),
    }


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    loss_cfg: ml_collections.ConfigDict,
    dynamic: bool,
    teacher: Any | None,
    gumbel_noise: bool = True,
) -> Callable[..., tuple[State, dict]]:
    """train_step(state, batch, tau, progress, teacher_variables) -> (state, metrics).

    `gumbel_noise=False` trains with deterministic hard gates (same straight-through gradient).
    """
    use_teacher = teacher is not None and loss_cfg.kd_alpha > 0

    def train_step(
        state: State, batch: dict[str, jax.Array], tau: jax.Array, progress: jax.Array, teacher_variables: Any
    ) -> tuple[State, dict[str, jax.Array]]:
        images, labels = batch["image"], batch["label"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        teacher_logits = None
        if use_teacher:
            teacher_logits = jax.lax.stop_gradient(teacher.apply(teacher_variables, images, train=False)[0])

        def loss_fn(params):
            (logits, aux), updates = model.apply(
                {"params": params, "batch_stats": state["batch_stats"]},
                images,
                train=True,
                tau=tau,
                gumbel_noise=gumbel_noise,
                rngs={"gumbel": rng},
                mutable=["batch_stats"],
            )
            loss, parts = losses.total_loss(
                logits,
                labels,
                aux,
                progress,
                teacher_logits=teacher_logits,
                target_rate=loss_cfg.target_rate,
                sparsity_weight=loss_cfg.sparsity_weight,
                kd_alpha=loss_cfg.kd_alpha,
                kd_temperature=loss_cfg.kd_temperature,
                bound_relax_fraction=loss_cfg.bound_relax_fraction,
                dynamic=dynamic,
            )
            parts["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == labels)
            parts["mac_ratio"] = jnp.mean(aux["macs"]) / aux["dense_macs"]
            return loss, (parts, updates)

        (loss, (metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        param_updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(state["params"], param_updates),
            "batch_stats": updates.get("batch_stats", state["batch_stats"]),
            "opt_state": opt_state,
            "rng": state["rng"],
        }
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.tree.norm(grads)
        return new_state, metrics

    return train_step


COVERAGE_KEYS = ("digit_hit", "digit_ink", "clutter_hit", "clutter_ink", "blank_hit", "blank_cells")
UNSUMMED_EVAL_KEYS = ("dense_macs", "block_dense_macs")  # per-example constants, not batch sums


def _cell_matrix(pixels: int, cells: int) -> jax.Array:
    """(pixels, cells) one-hot: pixel y lies in mask cell y * cells // pixels."""
    return jax.nn.one_hot(np.arange(pixels) * cells // pixels, cells, dtype=jnp.float32)


def mask_coverage_sums(
    spatial_mask: jax.Array, digit_ink: jax.Array, clutter_ink: jax.Array, weight: jax.Array
) -> jax.Array:
    """Weighted sums of one block's coverage, in the order of ``COVERAGE_KEYS``.

    ``spatial_mask`` (B, gh, gw, G): a cell executes where any group does. Ink maps
    (B, H, W) bool. digit/clutter: ink pixels in executed cells and all ink pixels; blank:
    executed cells without any ink and all such cells.
    """
    executed = jnp.max(spatial_mask, axis=-1)
    rows = _cell_matrix(digit_ink.shape[1], executed.shape[1])
    cols = _cell_matrix(digit_ink.shape[2], executed.shape[2])

    def per_cell(ink):
        return jnp.einsum("bhw,hi,wj->bij", ink.astype(jnp.float32), rows, cols)

    digit, clutter = per_cell(digit_ink), per_cell(clutter_ink)
    blank = ((digit + clutter) == 0).astype(jnp.float32)
    w = weight[:, None, None]
    return jnp.stack(
        [
            jnp.sum(w * digit * executed),
            jnp.sum(w * digit),
            jnp.sum(w * clutter * executed),
            jnp.sum(w * clutter),
            jnp.sum(w * blank * executed),
            jnp.sum(w * blank),
        ]
    )


def make_eval_step(model: Any) -> Callable[..., dict[str, jax.Array]]:
    """eval_step(variables, batch, gate_offset=0.0) -> weighted sums of one batch.

    The one evaluation step of the trainer and of ``laud_jax.evaluate``. ``batch`` holds
    ``image``, ``label``, ``weight`` (0 for padding) and optionally ``digit_ink`` and
    ``clutter_ink`` maps, which add ``coverage`` (blocks x COVERAGE_KEYS). Returned: count,
    top1, top5, macs, per-block macs and gate rates (all weighted sums) and the dense MACs.
    """

    def eval_step(
        variables: dict[str, Any], batch: dict[str, jax.Array], gate_offset: float | jax.Array = 0.0
    ) -> dict[str, jax.Array]:
        logits, aux = model.apply(variables, batch["image"], train=False, gate_offset=gate_offset)
        weight = batch["weight"]
        hit = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1] == batch["label"][:, None]
        blocks = aux["blocks"]

        def per_block(values):
            return jnp.stack([jnp.sum(v * weight) for v in values])

        sums = {
            "count": jnp.sum(weight),
            "top1": jnp.sum(hit[:, 0] * weight),
            "top5": jnp.sum(jnp.any(hit, axis=-1) * weight),
            "macs": jnp.sum(aux["macs"] * weight),
            "dense_macs": aux["dense_macs"],
            "block_macs": per_block([b["macs"] for b in blocks]),
            "block_dense_macs": jnp.stack([jnp.asarray(b["dense_macs"], jnp.float32) for b in blocks]),
            "spatial": per_block([jnp.mean(b["spatial_mask"], axis=(1, 2, 3)) for b in blocks]),
            "channel": per_block([jnp.mean(b["channel_mask"], axis=-1) for b in blocks]),
            "layer": per_block([b["layer_gate"] for b in blocks]),
        }
        if "digit_ink" in batch:
            sums["coverage"] = jnp.stack(
                [
                    mask_coverage_sums(b["spatial_mask"], batch["digit_ink"], batch["clutter_ink"], weight)
                    for b in blocks
                ]
            )
        return sums

    return eval_step


def add_eval_sums(totals: dict[str, Any] | None, sums: dict[str, Any]) -> dict[str, Any]:
    """Running totals of eval_step outputs over batches (dense MACs are kept, not summed)."""
    if totals is None:
        return dict(sums)
    return {k: v if k in UNSUMMED_EVAL_KEYS else totals[k] + v for k, v in sums.items()}

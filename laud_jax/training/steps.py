"""Optimizer, schedules, train state and the jitted train / eval steps."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from laud_jax import losses

State = dict[str, Any]   # {'step', 'params', 'batch_stats', 'opt_state', 'rng'}
MASKER_MODULES = ('gates',)  # parameters under these module names are mask/gate heads


def is_masker_path(path: tuple[Any, ...]) -> bool:
  """True for parameters of the maskers / gates (module 'gates' in every block)."""
  return any(getattr(k, 'key', None) in MASKER_MODULES for k in path)


def peak_learning_rate(opt: ml_collections.ConfigDict, batch_size: int) -> float:
  """learning_rate scaled by batch_size / lr_reference_batch (when that is > 0)."""
  scale = batch_size / opt.lr_reference_batch if opt.lr_reference_batch else 1.0
  return float(opt.learning_rate) * scale


def lr_schedule(opt: ml_collections.ConfigDict, batch_size: int, total_steps: int) -> optax.Schedule:
  """Linear warm-up, then cosine to zero per step (or constant)."""
  peak = peak_learning_rate(opt, batch_size)
  warmup = min(int(opt.warmup_steps), max(total_steps - 1, 0))
  if opt.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), 0.0)
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                 optax.constant_schedule(peak)], [warmup])
  return optax.constant_schedule(peak)


def make_optimizer(opt: ml_collections.ConfigDict, batch_size: int,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD (Nesterov, weight decay on all parameters) or AdamW, with the masker lr factor."""
  schedule = lr_schedule(opt, batch_size, total_steps)
  if opt.name == 'sgd':
    parts = [optax.add_decayed_weights(opt.weight_decay)] if opt.weight_decay else []
    parts.append(optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov))
  else:
    parts = [optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)]
  if opt.grad_clip_norm:
    parts.insert(0, optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.masker_lr_multiplier != 1.0:
    masker_mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: is_masker_path(path), params)
    parts.append(optax.masked(optax.scale(opt.masker_lr_multiplier), masker_mask))
  return optax.chain(*parts), schedule


def temperature(step: int, total_steps: int, tau_start: float, tau_end: float) -> float:
  """Gumbel temperature tau_k = tau0 (tau1 / tau0)^(k / K), exponential per step."""
  fraction = min(step / max(total_steps, 1), 1.0)
  return tau_start * math.exp(fraction * math.log(tau_end / tau_start))


def init_state(model: Any, tx: optax.GradientTransformation, seed: int | jax.Array,
               image_shape: tuple[int, int, int],
               variables: dict[str, Any] | None = None) -> State:
  """Fresh train state; `variables` (if given) replace the initial params / batch stats.

  Parameters are drawn with the 'rbg' generator (compiles several times faster than
  threefry for a whole network); the per-step Gumbel noise uses threefry, whose bits do not
  depend on how the batch is sharded.
  """
  init_key = jax.random.key(seed, impl='rbg')
  rng_key = jax.random.fold_in(jax.random.key(seed), 1)
  if variables is None:
    variables = model.init({'params': init_key}, jnp.zeros((1, *image_shape), jnp.float32),
                           train=False)
  params = variables['params']
  return {
      'step': jnp.zeros((), jnp.int32),
      'params': params,
      'batch_stats': variables.get('batch_stats', {}),
      'opt_state': tx.init(params),
      'rng': jax.random.key_data(rng_key),
  }


def make_train_step(model: Any, tx: optax.GradientTransformation, loss_cfg: ml_collections.ConfigDict,
                    dynamic: bool, teacher: Any | None,
                    gumbel_noise: bool = True) -> Callable[..., tuple[State, dict]]:
  """train_step(state, batch, tau, progress, teacher_variables) -> (state, metrics).

  `gumbel_noise=False` trains with deterministic hard gates (same straight-through gradient).
  """
  use_teacher = teacher is not None and loss_cfg.kd_alpha > 0

  def train_step(state: State, batch: dict[str, jax.Array], tau: jax.Array, progress: jax.Array,
                 teacher_variables: Any) -> tuple[State, dict[str, jax.Array]]:
    images, labels = batch['image'], batch['label']
    rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    teacher_logits = None
    if use_teacher:
      teacher_logits = jax.lax.stop_gradient(teacher.apply(teacher_variables, images, train=False)[0])

    def loss_fn(params):
      (logits, aux), updates = model.apply(
          {'params': params, 'batch_stats': state['batch_stats']}, images, train=True, tau=tau,
          gumbel_noise=gumbel_noise, rngs={'gumbel': rng}, mutable=['batch_stats'])
      loss, parts = losses.total_loss(
          logits, labels, aux, progress, teacher_logits=teacher_logits,
          target_rate=loss_cfg.target_rate, sparsity_weight=loss_cfg.sparsity_weight,
          kd_alpha=loss_cfg.kd_alpha, kd_temperature=loss_cfg.kd_temperature,
          bound_relax_fraction=loss_cfg.bound_relax_fraction, dynamic=dynamic)
      parts['accuracy'] = jnp.mean(jnp.argmax(logits, -1) == labels)
      parts['mac_ratio'] = jnp.mean(aux['macs']) / aux['dense_macs']
      return loss, (parts, updates)

    (loss, (metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    param_updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = {
        'step': state['step'] + 1,
        'params': optax.apply_updates(state['params'], param_updates),
        'batch_stats': updates.get('batch_stats', state['batch_stats']),
        'opt_state': opt_state,
        'rng': state['rng'],
    }
    metrics['loss'] = loss
    metrics['grad_norm'] = optax.tree.norm(grads)
    return new_state, metrics

  return train_step


def make_eval_step(model: Any) -> Callable[..., dict[str, jax.Array]]:
  """eval_step(variables, batch) -> weighted sums: correct, count, macs, per-block macs."""

  def eval_step(variables: dict[str, Any], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    logits, aux = model.apply(variables, batch['image'], train=False)
    weight = batch['weight']
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    return {
        'correct': jnp.sum(correct * weight),
        'count': jnp.sum(weight),
        'macs': jnp.sum(aux['macs'] * weight),
        'block_macs': jnp.stack([jnp.sum(b['macs'] * weight) for b in aux['blocks']]),
        'dense_macs': aux['dense_macs'],
        'block_dense_macs': jnp.stack([jnp.asarray(b['dense_macs'], jnp.float32)
                                       for b in aux['blocks']]),
    }

  return eval_step

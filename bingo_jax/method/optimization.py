"""The optimiser: SGD with momentum and weight decay, as ``torch.optim.SGD``, and the
learning-rate schedule (linear batch scaling, cosine decay to 0; docs/method.md §7).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bingo_jax.method import config_checks


def learning_rate_schedule(train_config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
  """Learning rate as a function of the step: linear batch scaling, cosine decay to 0.

  ``'cosine_epoch'`` (released ``adjust_learning_rate``) holds
  ``base * 0.5 * (1 + cos(pi * epoch / epochs))`` for a whole epoch; ``'cosine_step'``
  evaluates the same curve at the fractional epoch ``step / steps_per_epoch``.

  Args:
    train_config: ``config.train`` (``base_lr``, ``batch_size``, ``epochs``, ``lr_schedule``).
    steps_per_epoch: optimizer steps in one epoch.
  Returns:
    ``schedule(step) -> float32 scalar``.
  """
  if steps_per_epoch <= 0:
    raise ValueError(f'steps_per_epoch must be positive, got {steps_per_epoch}.')
  peak_lr = train_config.base_lr * train_config.batch_size / 256
  epochs = train_config.epochs
  mode = train_config.lr_schedule
  if mode not in config_checks.LR_SCHEDULES:
    raise ValueError(f'config.train.lr_schedule = {mode!r}; expected one of '
                     f'{config_checks.LR_SCHEDULES}.')

  def schedule(step: jax.Array) -> jax.Array:
    step = jnp.asarray(step, jnp.int32)
    if mode == 'cosine_epoch':
      progress = (step // steps_per_epoch).astype(jnp.float32) / epochs
    else:
      progress = step.astype(jnp.float32) / (steps_per_epoch * epochs)
    return (peak_lr * 0.5 * (1.0 + jnp.cos(math.pi * progress))).astype(jnp.float32)
  return schedule


def make_optimizer(train_config: ml_collections.ConfigDict,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """``torch.optim.SGD(momentum, weight_decay)`` with the BINGO learning-rate schedule.

  torch adds ``weight_decay * param`` to the gradient of every parameter (BatchNorm scales
  and biases included), accumulates ``buf = momentum * buf + grad`` and steps
  ``param -= lr * buf``: the learning rate multiplies the buffer after accumulation, so a
  change of learning rate acts at once and is not folded into the momentum history.

  Args:
    train_config: ``config.train`` (``momentum``, ``weight_decay`` and the schedule keys).
    steps_per_epoch: optimizer steps in one epoch.
  Returns:
    An optax transformation; its step counter starts at 0 with the state.
  """
  return optax.chain(
      optax.add_decayed_weights(train_config.weight_decay),
      optax.trace(decay=train_config.momentum, nesterov=False),
      optax.scale_by_learning_rate(learning_rate_schedule(train_config, steps_per_epoch)))

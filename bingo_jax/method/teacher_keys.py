"""The teacher's keys: its embeddings of the key views, without gradient (docs/method.md §5).

``config.teacher.bn_mode``: ``'frozen'`` runs the teacher in evaluation mode; the shuffle
modes run it in training mode with BatchNorm statistics over groups of a random permutation
of the global batch, one permutation per view (docs/training.md, "The teacher's batch
shuffle"): ``'shuffle'`` moves the images as released, ``'shuffle_stats'`` leaves them where
they are and sums each group's statistics (``layers.BatchNorm``'s ``positions``). MoCo's key
encoder uses ``shuffled_forward`` too.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bingo_jax.method import losses
from bingo_jax.models import layers

Batch = dict[str, jax.Array]
Rngs = dict[str, jax.Array]



def teacher_embeddings(teacher_model: nn.Module, teacher_variables: Any, images: jax.Array,
                       bn_mode: str, rng: jax.Array,
                       sharding: Optional[jax.sharding.Sharding] = None) -> jax.Array:
  """L2-normalised teacher embeddings of normalised images, without gradient.

  Args:
    teacher_model: the teacher; in the shuffle modes built with the teacher's BatchNorm
      group size.
    teacher_variables: ``{'params', 'batch_stats'}`` of the teacher.
    images: ``(batch, height, width, 3)`` normalised images.
    bn_mode: ``'shuffle_stats'`` or ``'shuffle'`` (training-mode statistics on groups of a
      random permutation of the batch: ``shuffled_forward``) or ``'frozen'`` (stored running
      statistics).
    rng: PRNG key of the permutation (unused when frozen).
    sharding: the batch's sharding (``shuffled_forward``).
  Returns:
    ``(batch, dim)`` float32 embeddings in the order of ``images``.
  """
  if bn_mode == 'frozen':
    _, embeddings = teacher_model.apply(teacher_variables, images, train=False)
  else:
    embeddings, _ = shuffled_forward(teacher_model, teacher_variables, images, rng,
                                     move_images=bn_mode == 'shuffle', sharding=sharding)
  return jax.lax.stop_gradient(losses.l2_normalize(embeddings))


def shuffled_forward(model: nn.Module, variables: Any, images: jax.Array, rng: jax.Array,
                     move_images: bool = False,
                     sharding: Optional[jax.sharding.Sharding] = None
                     ) -> tuple[jax.Array, Any]:
  """A training-mode pass whose BatchNorm groups are those of a random permutation.

  The model's BatchNorm takes its statistics over groups of ``bn_group_size`` examples of a
  random permutation of the global batch (released: each GPU's share of a shuffled batch),
  so no group sees only neighbours of the unshuffled batch. Two forms, equal up to float
  rounding on the same permutation (docs/training.md, "The teacher's batch shuffle"):

  * ``move_images=True``, the released form (``'shuffle'``): permute the images, run the
    consecutive groups, un-permute the outputs. On a sharded batch the permutation moves
    every image of the global batch to every device; ``sharding`` (the batch's) puts the
    permuted batch back in shards, so that each device embeds only its share, as each
    released GPU does (without it XLA embeds the whole permuted batch on every device).
  * ``move_images=False`` (``'shuffle_stats'``): the images stay; each example is told the
    group of its position in the permutation and every BatchNorm sums its statistics by
    group (``layers.BatchNorm``'s ``positions``), so only ``(groups, channels)`` per layer
    crosses devices.

  Args:
    model: built with the shuffle's BatchNorm group size.
    variables: ``{'params', 'batch_stats'}``.
    images: ``(batch, height, width, 3)`` normalised images.
    rng: PRNG key of the permutation.
    move_images: which form.
    sharding: the batch's sharding, or None (one device, or outside a sharded step).
  Returns:
    ``(embeddings, batch_stats)``: the ``(batch, dim)`` head outputs in the order of
    ``images`` (not normalised) and the running statistics this pass computed.
  """
  batch = images.shape[0]
  if not move_images:
    return _forward_at_positions(model, variables, images, shuffled_positions(rng, batch))
  permutation = jax.random.permutation(rng, batch)
  shuffled_images = images[permutation]
  if sharding is not None:
    shuffled_images = jax.lax.with_sharding_constraint(shuffled_images, sharding)
  (_, shuffled), updates = model.apply(variables, shuffled_images, train=True,
                                       mutable=['batch_stats'])
  # Row permutation[i] of the batch was embedded at position i: scatter it back.
  return jnp.zeros_like(shuffled).at[permutation].set(shuffled), updates['batch_stats']


def shuffled_positions(rng: jax.Array, batch: int) -> jax.Array:
  """``(batch,)`` int32: each example's position in the permutation ``rng`` draws (the one
  ``shuffled_forward``'s images form applies: example ``permutation[i]`` sits at ``i``)."""
  permutation = jax.random.permutation(rng, batch)
  return jnp.zeros((batch,), jnp.int32).at[permutation].set(jnp.arange(batch, dtype=jnp.int32))


def _forward_at_positions(model: nn.Module, variables: Any, images: jax.Array,
                          positions: jax.Array) -> tuple[jax.Array, Any]:
  """A training-mode pass whose every BatchNorm groups the examples by ``positions``."""

  def pass_positions(next_fn, args, kwargs, context):
    if isinstance(context.module, layers.BatchNorm) and context.method_name == '__call__':
      kwargs = dict(kwargs, positions=positions)
    return next_fn(*args, **kwargs)

  with nn.intercept_methods(pass_positions):
    (_, embeddings), updates = model.apply(variables, images, train=True,
                                           mutable=['batch_stats'])
  return embeddings, updates['batch_stats']


def keys_by_view(teacher_model: nn.Module, teacher_variables: Any, images: Batch,
                 bn_mode: str, rngs: Rngs,
                 sharding: Optional[jax.sharding.Sharding] = None) -> Batch:
  """``teacher_embeddings`` of every view, view ``v`` shuffled by ``rngs[v]``.

  In ``'shuffle_stats'`` mode the views share one pass: their examples interleaved (row
  ``views * i + v``, so each device keeps its own rows) and each view's groups numbered
  apart, so no group mixes views. The keys are those of one pass per view; each BatchNorm
  layer all-reduces its statistics once for all views, not once per view.

  Returns:
    ``(batch, dim)`` float32 L2-normalised keys by view, without gradient.
  """
  names = list(images)
  if bn_mode != 'shuffle_stats' or len(names) < 2:
    return {view: teacher_embeddings(teacher_model, teacher_variables, images[view], bn_mode,
                                     rngs[view], sharding) for view in names}
  batch = images[names[0]].shape[0]
  together = jnp.stack([images[view] for view in names], axis=1)
  together = together.reshape((batch * len(names),) + together.shape[2:])
  if sharding is not None:
    together = jax.lax.with_sharding_constraint(together, sharding)
  positions = jnp.stack([shuffled_positions(rngs[view], batch) + index * batch
                         for index, view in enumerate(names)], axis=1).reshape(-1)
  embeddings, _ = _forward_at_positions(teacher_model, teacher_variables, together, positions)
  embeddings = jax.lax.stop_gradient(losses.l2_normalize(embeddings))
  embeddings = embeddings.reshape((batch, len(names)) + embeddings.shape[1:])
  return {view: embeddings[:, index] for index, view in enumerate(names)}

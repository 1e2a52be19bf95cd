"""MoCo v2 pre-training (``config.train.method = 'moco'``): the teacher is the student's own
momentum encoder (docs/training.md, from a MoCo run to a teacher checkpoint).

Follows the released ``moco/builder.py``: the query encoder (the student) embeds ``query`` in
training mode; the key encoder (``state.key_params`` / ``state.key_batch_stats``, built as
the student's architecture with the teacher's BatchNorm group size) embeds ``key`` with the
batch shuffle; the loss is ``CE(q, k)`` against the queue (the ``'anchor_only'`` objective); the
queue then receives the keys (FIFO). The key encoder's parameters follow
``k = m * k + (1 - m) * q`` with the updated query parameters: MoCo does this at the start of
the next forward, which is the same sequence of values (at step 0 the two encoders are equal,
so the update there is the identity).

``config.train.moco_loss`` names the objective (``config_checks.loss_name``; default
``'anchor_only'``, plain MoCo). A bag objective (``'bingo'``, ``'paper_eq8'``) is the paper's
"teacher relation only" (Table 8 row 3, docs/method.md §6): the momentum key encoder takes the
teacher's place, embedding every one of the objective's key views (``key``, and ``pos_k`` for
the released loss) with its own shuffled BatchNorm pass, in that order, its running statistics
threaded through the passes; the positives come from the bag file; only ``key`` enters the
queue, as in BINGO.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import ml_collections

from bingo_jax.data import parallel
from bingo_jax.data import views
from bingo_jax.method import config_checks
from bingo_jax.method import losses
from bingo_jax.method import objectives
from bingo_jax.method import teacher_keys
from bingo_jax.method import train_step

BATCH_VIEWS = views.ANCHOR_VIEWS
RNG_STREAMS = (views.KEY,)  # plain MoCo: the key encoder's batch shuffle


def objective(config: ml_collections.ConfigDict) -> objectives.Objective:
  """The objective of the MoCo step: ``config.train.moco_loss`` (plain MoCo: 'anchor_only')."""
  return objectives.make_objective(config.train, config_checks.loss_name(config))


def batch_views(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The views a MoCo step reads: the anchor's ``query`` and ``key`` (plain MoCo), plus the
  bag positive's views under a bag objective."""
  return objective(config).batch_views


def rng_streams(step_objective: objectives.Objective) -> tuple[str, ...]:
  """The PRNG streams of the step: CutMix's when it mixes, then one shuffle per key view.

  Plain MoCo gives ``RNG_STREAMS``, so its random numbers are those of the step before bag
  objectives existed; the released loss gives ``distill_step.RNG_STREAMS``' order, so a
  relation-only run draws the CutMix boxes of the BINGO run of the same seed.
  """
  return (('cutmix',) if step_objective.uses_cutmix else ()) + step_objective.teacher_views


def shuffled_key_embeddings(key_model: nn.Module, key_variables: Any, images: jax.Array,
                            rng: jax.Array, move_images: bool = False,
                            sharding: Optional[jax.sharding.Sharding] = None
                            ) -> tuple[jax.Array, Any]:
  """MoCo's key encoder forward: shuffled training-mode BatchNorm, its own statistics kept.

  BatchNorm statistics over the groups of a random permutation of the batch (the model's
  ``bn_group_size``), as ``teacher_keys.teacher_embeddings`` takes them in its shuffle modes
  (same permutation for the same ``rng``; ``move_images``: the released form that permutes
  the images, ``teacher_keys.shuffled_forward``); unlike a frozen BINGO teacher, MoCo's ``encoder_k`` runs
  in training mode and so updates its running statistics with these batch statistics (its
  buffers are not part of the momentum update, which covers parameters only).

  Args:
    key_model: the key encoder (student architecture, teacher BatchNorm group size).
    key_variables: ``{'params', 'batch_stats'}`` of the key encoder.
    images: ``(batch, height, width, 3)`` normalised images.
    rng: PRNG key of the permutation.
    move_images: the released shuffle (``config.teacher.bn_mode = 'shuffle'``).
    sharding: the batch's sharding (``teacher_keys.shuffled_forward``).
  Returns:
    ``(keys, batch_stats)``: ``(batch, dim)`` L2-normalised float32 keys in the order of
    ``images`` (no gradient) and the key encoder's updated running statistics.
  """
  keys, batch_stats = teacher_keys.shuffled_forward(key_model, key_variables, images, rng,
                                                  move_images=move_images, sharding=sharding)
  return (jax.lax.stop_gradient(losses.l2_normalize(keys)),
          jax.lax.stop_gradient(batch_stats))


def momentum_update(key_params: Any, query_params: Any, momentum: float) -> Any:
  """``k = m * k + (1 - m) * q`` leaf by leaf (MoCo ``_momentum_update_key_encoder``)."""
  return jax.tree.map(lambda k, q: momentum * k + (1.0 - momentum) * q, key_params,
                      query_params)


def make_moco_step(config: ml_collections.ConfigDict, student_model: nn.Module,
                   key_model: nn.Module, mesh: jax.sharding.Mesh,
                   steps_per_epoch: int) -> train_step.TrainStepFn:
  """Builds the jitted MoCo v2 step ``(state, unused, batch) -> (state, metrics)``.

  Args:
    config: the experiment config (``train.moco_momentum``, ``train.moco_loss``, the
      optimizer keys).
    student_model: the query encoder, built with ``config.student.bn_group_size``.
    key_model: the key encoder: the student's architecture with ``bn_group_size`` =
      ``config.teacher.bn_group_size``.
    mesh: the device mesh.
    steps_per_epoch: optimizer steps per epoch.
  Returns:
    ``train_step(state, unused_variables, batch)``; the second argument is ignored (pass
    ``{}``), the batch needs ``batch_views(config)`` (``'query'`` and ``'key'`` for plain
    MoCo; ``'pos_q'``, ``'pos_k'`` too for the released loss); the state must come from
    ``train_step.create_train_state`` under ``method = 'moco'`` (it holds the key encoder).
  """
  config_checks.check_step(config, student_model, key_model, mesh)
  momentum = float(config.train.moco_momentum)
  step_objective = objective(config)
  move_images = config_checks.shuffle_moves_images(config)
  batch_sharding = parallel.data_sharding(mesh)

  def embed_keys(state: train_step.TrainState, unused_variables: Any,
                 images: train_step.Batch, rngs: train_step.Rngs
                 ) -> tuple[train_step.Batch, dict[str, Any]]:
    del unused_variables
    if state.key_params is None:
      raise ValueError('train_step (moco): the state has no key encoder; create it with '
                       "create_train_state under config.train.method = 'moco'.")
    # One pass per key view in the objective's order (``key`` first), each updating the key
    # encoder's running statistics as encoder_k's forward does.
    keys, key_batch_stats = {}, state.key_batch_stats
    for view in step_objective.teacher_views:
      keys[view], key_batch_stats = shuffled_key_embeddings(
          key_model, {'params': state.key_params, 'batch_stats': key_batch_stats},
          images[view], rngs[view], move_images, batch_sharding)
    return keys, {'key_batch_stats': key_batch_stats}

  def after_update(state: train_step.TrainState, params: Any) -> dict[str, Any]:
    return {'key_params': momentum_update(state.key_params, params, momentum)}

  method = train_step.StepMethod(
      name='train_step (moco)',
      objective=step_objective, rng_streams=rng_streams(step_objective),
      embed_keys=embed_keys, after_update=after_update)
  return train_step.build_train_step(config, student_model, mesh, steps_per_epoch, method)

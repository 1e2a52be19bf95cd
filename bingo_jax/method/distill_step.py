"""The BINGO distillation step (``config.train.method = 'bingo'``; docs/method.md §4 to §6).

The teacher embeds the objective's key views (``key``, and ``pos_k`` for the released loss;
``query`` too for the Table 9 baselines, ``objectives.TEACHER_QUERY``) under ``stop_gradient``; the student, the objective's student views. ``config.teacher.bn_mode``:

* ``'shuffle_stats'`` (the default) and ``'shuffle'`` (released, docs/method.md §5):
  training-mode BatchNorm on groups of ``config.teacher.bn_group_size`` examples of a freshly
  permuted global batch, a separate permutation for each view (``teacher_keys.shuffled_forward``:
  ``'shuffle'`` permutes the images and un-permutes the outputs, ``'shuffle_stats'`` sums
  each group's statistics where the images are); the teacher's running statistics are not
  kept (only the frozen mode reads them).
* ``'frozen'``: eval mode with the stored running statistics.

The loss is ``config.train.loss`` (``objectives.OBJECTIVES``); the anchors' teacher keys then
enter the negative queue.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections

from bingo_jax.data import parallel
from bingo_jax.data import views
from bingo_jax.method import config_checks
from bingo_jax.method import objectives
from bingo_jax.method import teacher_keys
from bingo_jax.method import train_step

# The PRNG streams of each step, in the order they are split from the state's key (their
# order fixes the random numbers a seed gives).
RNG_STREAMS = ('cutmix', views.KEY, views.POS_K)


def rng_streams(objective: objectives.Objective) -> tuple[str, ...]:
  """``RNG_STREAMS``, plus the batch shuffle of the teacher's ``TEACHER_QUERY`` pass for the
  objectives that have one (appended, so the released loss's streams stay as they were)."""
  extra = tuple(view for view in objective.teacher_views if view not in RNG_STREAMS)
  return RNG_STREAMS + extra


def batch_views(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The views the configured BINGO step reads (those of ``config.train.loss``)."""
  return objectives.make_objective(config.train).batch_views


def make_distill_step(config: ml_collections.ConfigDict, student_model: nn.Module,
                      teacher_model: nn.Module, mesh: jax.sharding.Mesh,
                      steps_per_epoch: int) -> train_step.TrainStepFn:
  """Builds the jitted BINGO step ``(state, teacher_variables, batch) -> (state, metrics)``.

  Args:
    config: the experiment config (``train``, ``student``, ``teacher`` sections).
    student_model: ``create_model`` of the student, ``bn_group_size`` =
      ``config.student.bn_group_size`` and ``dtype`` = the compute dtype.
    teacher_model: ``create_model`` of the teacher with its head; ``bn_group_size`` =
      ``config.teacher.bn_group_size`` in the shuffle modes.
    mesh: the device mesh.
    steps_per_epoch: optimizer steps per epoch.
  Returns:
    ``train_step(state, teacher_variables, batch)`` (``train_step.build_train_step``);
    the batch holds ``batch_views(config)``, ``teacher_variables`` is
    ``{'params', 'batch_stats'}`` of the teacher.
  """
  config_checks.check_step(config, student_model, teacher_model, mesh)
  bn_mode = config.teacher.bn_mode
  batch_sharding = parallel.data_sharding(mesh)

  def embed_keys(state: train_step.TrainState, teacher_variables: Any,
                 images: train_step.Batch, rngs: train_step.Rngs
                 ) -> tuple[train_step.Batch, dict[str, Any]]:
    del state
    return teacher_keys.keys_by_view(teacher_model, teacher_variables, images, bn_mode,
                                     rngs, batch_sharding), {}

  objective = objectives.make_objective(config.train)
  method = train_step.StepMethod(name='train_step', objective=objective,
                                 rng_streams=rng_streams(objective), embed_keys=embed_keys)
  return train_step.build_train_step(config, student_model, mesh, steps_per_epoch, method)

"""The step builder of each training method (``config.train.method``).

A method module has a builder ``(config, student_model, key_model, mesh, steps_per_epoch)
-> train_step(state, variables, batch)`` (built on ``train_step.build_train_step``) and
``batch_views(config)``, the views its step reads. A new method is such a module, an entry in
``METHODS`` here and its name in ``config_checks.METHODS``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import ml_collections

from bingo_jax.method import config_checks
from bingo_jax.method import distill_step
from bingo_jax.method import moco_step
from bingo_jax.method import train_step

StepBuilder = Callable[[ml_collections.ConfigDict, nn.Module, nn.Module, jax.sharding.Mesh, int],
                       train_step.TrainStepFn]


class Method(NamedTuple):
  """A training method's step builder and the batch views its step reads."""
  build_step: StepBuilder
  batch_views: Callable[[ml_collections.ConfigDict], tuple[str, ...]]


METHODS: dict[str, Method] = {
    'bingo': Method(distill_step.make_distill_step, distill_step.batch_views),
    'moco': Method(moco_step.make_moco_step, moco_step.batch_views),
}


def step_builder(config: ml_collections.ConfigDict) -> StepBuilder:
  """The step builder of ``config.train.method``.

  Raises:
    ValueError: naming an unknown ``config.train.method``.
  """
  return METHODS[config_checks.checked_method(config)].build_step


def batch_views(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The image views the configured step reads: the views the input pipeline makes and the
  trainer hands the step (``views.VIEW_KEYS`` order)."""
  return METHODS[config_checks.checked_method(config)].batch_views(config)


def make_train_step(config: ml_collections.ConfigDict, student_model: nn.Module,
                    key_model: nn.Module, mesh: jax.sharding.Mesh,
                    steps_per_epoch: int) -> train_step.TrainStepFn:
  """``step_builder(config)(config, student_model, key_model, mesh, steps_per_epoch)``;
  ``key_model`` is the teacher for BINGO, the key encoder for MoCo."""
  return step_builder(config)(config, student_model, key_model, mesh, steps_per_epoch)

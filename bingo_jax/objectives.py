"""The distillation objectives (``config.train.loss``): which views are embedded, and the loss
of those embeddings (docs/method.md §6).

An ``Objective`` names the views the student embeds (one training-mode pass each, in order),
the views the teacher embeds (no gradient) and a loss function of the embeddings. The step
skeleton (``train_step.build_train_step``) does the rest, the same for every objective, so a
new objective is one entry of ``OBJECTIVES``: a function of ``config.train`` returning an
``Objective``.

Embeddings are keyed by view name (``views.QUERY`` ... and ``MIX_Q``): the student's for the
student views, the teacher's for the teacher views. In the notation of docs/method.md §6:
q = student(query), p = student(pos_q), m = student(mix_q), k = teacher(key),
kp = teacher(pos_k).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from bingo_jax import losses
from bingo_jax import views

Embeddings = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# A view the student embeds that no batch holds: the CutMix of ``query`` and ``pos_q``, made
# inside the step (m).
MIX_Q = 'mix_q'


@dataclasses.dataclass(frozen=True)
class LossInputs:
  """What a loss reads besides the embeddings.

  Attributes:
    negative_queue: ``(K, dim)`` L2-normalised teacher keys of earlier batches, as before
      this step.
    temperature: tau.
    epoch: int32 scalar, the epoch of this step.
    lam: ``(batch,)`` float32, the fraction of each ``mix_q`` image taken from ``query``
      (ones when the objective has no ``MIX_Q`` view).
  """
  negative_queue: jax.Array
  temperature: float
  epoch: jax.Array
  lam: jax.Array


LossFn = Callable[[Embeddings, LossInputs], tuple[jax.Array, Metrics]]


@dataclasses.dataclass(frozen=True)
class Objective:
  """One distillation objective.

  Attributes:
    student_views: views the student embeds, one separate pass each in this order (the
      order of the running-statistics updates); ``MIX_Q`` is the CutMix of ``query`` and
      ``pos_q``.
    teacher_views: views the teacher embeds; the first must be ``views.KEY``, the anchor's
      key, which enters the negative queue.
    loss: ``(embeddings, inputs) -> (scalar loss, metrics)``; ``metrics`` holds the loss's
      own terms (``ce_*``) and ``own_weight``.
  """
  student_views: tuple[str, ...]
  teacher_views: tuple[str, ...]
  loss: LossFn

  @property
  def uses_cutmix(self) -> bool:
    return MIX_Q in self.student_views

  @property
  def batch_views(self) -> tuple[str, ...]:
    """The batch views this objective reads, in ``views.VIEW_KEYS`` order."""
    read = set(self.student_views) | set(self.teacher_views)
    if self.uses_cutmix:
      read = (read - {MIX_Q}) | {views.QUERY, views.POS_Q}
    return views.ordered(read)


def _unit_weight() -> jax.Array:
  return jnp.ones((), jnp.float32)


def _bingo(train_config: ml_collections.ConfigDict) -> Objective:
  """The released loss, ``losses.bingo_loss``: own and cross pairs of the anchor and its bag
  positive, plus the CutMix terms unless ``config.train.cutmix = 'none'``."""
  cutmix = train_config.cutmix != 'none'
  warmup_epochs = train_config.own_key_warmup_epochs

  def loss(embeddings: Embeddings, inputs: LossInputs) -> tuple[jax.Array, Metrics]:
    # Warm-up: each student view is pulled towards the teacher key of its own image only.
    warm_up = inputs.epoch < warmup_epochs
    own_weight = jnp.where(warm_up, 1.0, 0.5).astype(jnp.float32)
    other_weight = jnp.where(warm_up, 0.0, 0.5).astype(jnp.float32)
    value, terms = losses.bingo_loss(
        embeddings[views.QUERY], embeddings[views.POS_Q],
        embeddings[MIX_Q] if cutmix else None, embeddings[views.KEY], embeddings[views.POS_K],
        inputs.negative_queue, inputs.temperature, own_weight, other_weight,
        inputs.lam if cutmix else None)
    return value, dict(terms, own_weight=own_weight)

  student_views = (views.QUERY, views.POS_Q) + ((MIX_Q,) if cutmix else ())
  return Objective(student_views, (views.KEY, views.POS_K), loss)


def _paper_eq8(train_config: ml_collections.ConfigDict) -> Objective:
  """The paper's Eq. 8/9, ``losses.paper_eq8_loss``: CE(q, k) + CE(p, k), no CutMix."""
  del train_config

  def loss(embeddings: Embeddings, inputs: LossInputs) -> tuple[jax.Array, Metrics]:
    value, terms = losses.paper_eq8_loss(embeddings[views.QUERY], embeddings[views.POS_Q],
                                         embeddings[views.KEY], inputs.negative_queue,
                                         inputs.temperature)
    return value, dict(terms, own_weight=_unit_weight())

  return Objective((views.QUERY, views.POS_Q), (views.KEY,), loss)


def _anchor_only(train_config: ml_collections.ConfigDict) -> Objective:
  """CE(q, k) alone: the anchor against its own teacher key; no bags, no CutMix (the
  paper's "w/o bag" ablation, SEED-like distillation; also MoCo's loss)."""
  del train_config

  def loss(embeddings: Embeddings, inputs: LossInputs) -> tuple[jax.Array, Metrics]:
    value = jnp.mean(losses.info_nce(embeddings[views.QUERY], embeddings[views.KEY],
                                     inputs.negative_queue, inputs.temperature))
    return value, {'ce_q_k': value, 'own_weight': _unit_weight()}

  return Objective((views.QUERY,), (views.KEY,), loss)


# config.train.loss -> the objective's factory.
OBJECTIVES: dict[str, Callable[[ml_collections.ConfigDict], Objective]] = {
    'bingo': _bingo,
    'paper_eq8': _paper_eq8,
    'anchor_only': _anchor_only,
}
LOSS_NAMES = tuple(OBJECTIVES)
# MoCo pre-training's loss: the query against its own key from the momentum encoder.
ANCHOR_ONLY = 'anchor_only'


def make_objective(train_config: ml_collections.ConfigDict,
                   name: str | None = None) -> Objective:
  """The objective ``name`` (default ``config.train.loss``) for this ``config.train``.

  Raises:
    ValueError: naming ``config.train.loss`` and the known names.
  """
  name = train_config.loss if name is None else name
  if name not in OBJECTIVES:
    raise ValueError(f'config.train.loss = {name!r}; expected one of {LOSS_NAMES}.')
  return OBJECTIVES[name](train_config)

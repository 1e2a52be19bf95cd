"""The distillation objectives (``config.train.loss``): which views are embedded, and the loss
of those embeddings (docs/method.md §6).

An ``Objective`` names the views the student embeds (one training-mode pass each, in order),
the views the teacher embeds (no gradient) and a loss function of the embeddings. The step
skeleton (``train_step.build_train_step``) does the rest, the same for every objective, so a
new objective is one entry of ``OBJECTIVES``: a function of ``config.train`` returning an
``Objective``.

Embeddings are keyed by view name (``views.QUERY`` ... and ``MIX_Q``, ``TEACHER_QUERY``): the
student's for the student views, the teacher's for the teacher views. In the notation of
docs/method.md §6: q = student(query), p = student(pos_q), m = student(mix_q), k = teacher(key),
kp = teacher(pos_k); the baselines add tq = teacher(query), the teacher's embedding of the
very image the student embeds as q.

Two groups: ``OBJECTIVES``, BINGO's own losses and its ablations (``LOSS_NAMES``), and
``BASELINES``, the other distillation methods of paper Table 9 (KD, RKD) run through the same
step (``BASELINE_NAMES``); ``config.train.loss`` names one of either.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from bingo_jax.data import views
from bingo_jax.method import losses

Embeddings = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# A view the student embeds that no batch holds: the CutMix of ``query`` and ``pos_q``, made
# inside the step (m).
MIX_Q = 'mix_q'
# A view the teacher embeds that is not one of its key views: the batch's ``query`` image, the
# one the student embeds as q (tq). ``query`` and ``key`` are two independent augmentations of
# the anchor (views.py), so the objectives that compare the two networks on the same
# augmented image (KD, RKD) need the teacher on ``query`` itself.
TEACHER_QUERY = 'teacher_query'


def source_view(view: str) -> str:
  """The batch view whose images ``view`` embeds: ``query`` for ``TEACHER_QUERY``, else the
  view itself (``MIX_Q`` is made from two views, see ``Objective.batch_views``)."""
  return views.QUERY if view == TEACHER_QUERY else view


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
      key, which enters the negative queue; ``TEACHER_QUERY`` is the ``query`` image.
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
    read = set(self.student_views) | {source_view(view) for view in self.teacher_views}
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


def _kd(train_config: ml_collections.ConfigDict) -> Objective:
  """Table 9's KD, ``losses.kd_l2_loss``: mean ||q - tq||^2 of the normalised student and
  teacher embeddings of the same augmented image; no queue term, no bags, no CutMix.

  The teacher also embeds ``key``: the framework's queue (unused by this loss) and the
  logged ``top1``/``top5`` (q against k) keep their meaning.
  """
  del train_config

  def loss(embeddings: Embeddings, inputs: LossInputs) -> tuple[jax.Array, Metrics]:
    del inputs
    value = losses.kd_l2_loss(embeddings[views.QUERY], embeddings[TEACHER_QUERY])
    return value, {'kd_l2': value, 'own_weight': _unit_weight()}

  return Objective((views.QUERY,), (views.KEY, TEACHER_QUERY), loss)


def _rkd(train_config: ml_collections.ConfigDict) -> Objective:
  """Table 9's RKD in its similarity-preserving form, ``losses.similarity_matching_loss``:
  the batch's cosine-similarity matrix of q matched to that of tq (mean squared difference
  over the off-diagonal entries); no queue term, no bags, no CutMix. The teacher also embeds
  ``key`` (the queue and the logged accuracy), as for KD."""
  del train_config

  def loss(embeddings: Embeddings, inputs: LossInputs) -> tuple[jax.Array, Metrics]:
    del inputs
    value = losses.similarity_matching_loss(embeddings[views.QUERY], embeddings[TEACHER_QUERY])
    return value, {'rkd_similarity_mse': value, 'own_weight': _unit_weight()}

  return Objective((views.QUERY,), (views.KEY, TEACHER_QUERY), loss)


# config.train.loss -> the objective's factory: BINGO's losses and its ablations ...
OBJECTIVES: dict[str, Callable[[ml_collections.ConfigDict], Objective]] = {
    'bingo': _bingo,
    'paper_eq8': _paper_eq8,
    'anchor_only': _anchor_only,
}
# ... and the other methods of paper Table 9, run through the same step for comparison.
BASELINES: dict[str, Callable[[ml_collections.ConfigDict], Objective]] = {
    'kd': _kd,
    'rkd': _rkd,
}
LOSS_NAMES = tuple(OBJECTIVES)
BASELINE_NAMES = tuple(BASELINES)
# MoCo pre-training's loss: the query against its own key from the momentum encoder.
ANCHOR_ONLY = 'anchor_only'


def make_objective(train_config: ml_collections.ConfigDict,
                   name: str | None = None) -> Objective:
  """The objective ``name`` (default ``config.train.loss``) for this ``config.train``.

  Raises:
    ValueError: naming ``config.train.loss`` and the known names.
  """
  name = train_config.loss if name is None else name
  check_loss_name(name)
  return {**OBJECTIVES, **BASELINES}[name](train_config)


def check_loss_name(name: str) -> None:
  """Raises ValueError naming ``config.train.loss`` and the known names unless ``name`` is
  one of ``LOSS_NAMES`` or ``BASELINE_NAMES``."""
  if name not in OBJECTIVES and name not in BASELINES:
    raise ValueError(f'config.train.loss = {name!r}; expected one of {LOSS_NAMES} or a '
                     f'Table 9 baseline, one of {BASELINE_NAMES}.')

"""The data-parallel training step shared by every method (docs/method.md §2 to §7).

``build_train_step`` is the skeleton: one ``jax.jit`` over a device ``Mesh``, the global batch
sharded along ``'data'``, the state, the negative queue and the teacher variables replicated.
XLA inserts the collectives (gradient all-reduce, the all-reduce of the teacher's shuffled
BatchNorm statistics: ``teacher_keys``), so the step computes the same numbers, up to float
rounding, on 1 device, 8 devices or several hosts (bench/scaling.py reads what they send). A
method (``distill_step``: BINGO, ``moco_step``: MoCo v2) hands it a ``StepMethod``: where the
keys come from, its objective (``objectives``) and what else changes in the state. Each step:

1. checks the batch and the queue, splits ``state.rng`` into the method's named streams;
2. makes the CutMix view when the objective embeds one (docs/method.md §3; ``config.train.cutmix``:
   ``'batch'`` one box for the global batch, ``'group'`` one per student BatchNorm group as
   the released per-GPU loop draws, ``'sample'`` one per example);
3. embeds the key views without gradient (the method's ``embed_keys``);
4. applies the student once per student view, each a separate training-mode pass in the
   objective's order (released ``moco/builder.py`` calls ``encoder_q`` per view): BatchNorm
   statistics are per group of ``config.student.bn_group_size`` examples and the running
   statistics are updated once per pass, in that order. One concatenated call would give the
   same outputs and gradients but a single running-statistics update. (Released DDP
   broadcasts GPU 0's buffers at every forward, so its stored running statistics follow GPU
   0's group alone; ``layers.BatchNorm`` averages the groups' statistics instead.)
5. takes the SGD step, then the method's ``after_update`` (MoCo's momentum update);
6. the loss used the queue as it was before the step; the anchors' keys now replace the
   oldest queue entries (FIFO, docs/method.md §7).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bingo_jax.data import images as images_lib
from bingo_jax.data import parallel
from bingo_jax.data import views
from bingo_jax.method import config_checks
from bingo_jax.method import cutmix as cutmix_lib
from bingo_jax.method import losses
from bingo_jax.method import objectives
from bingo_jax.method import optimization

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Rngs = dict[str, jax.Array]
TrainStepFn = Callable[['TrainState', Any, Batch], tuple['TrainState', Metrics]]


@flax.struct.dataclass
class TrainState:
  """Everything that changes from step to step (all replicated over the mesh).

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: student parameters (float32).
    batch_stats: student BatchNorm running statistics.
    opt_state: optax state of ``optimization.make_optimizer``.
    negative_queue: ``(queue_size, embed_dim)`` float32, L2-normalised rows.
    queue_pointer: int32 scalar, row where the next batch of keys is written.
    rng: raw uint32 PRNG key data ``(2,)`` (``jax.random.key_data``; checkpoint-friendly),
      consumed by CutMix and the teacher's batch shuffle.
    key_params: MoCo pre-training only (``config.train.method = 'moco'``): the key
      encoder's parameters, a momentum average of ``params``; None for BINGO.
    key_batch_stats: MoCo only: the key encoder's own BatchNorm running statistics; None
      for BINGO (None fields add no leaves, so BINGO checkpoints keep their layout).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  negative_queue: jax.Array
  queue_pointer: jax.Array
  rng: jax.Array
  key_params: Any = None
  key_batch_stats: Any = None


# ---------------------------------------------------------------------------------------------
# State


def _key_data(rng: jax.Array) -> jax.Array:
  """Raw uint32 key data of a typed or raw PRNG key."""
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return rng


def create_train_state(config: ml_collections.ConfigDict, student_model: nn.Module,
                       rng: jax.Array, mesh: jax.sharding.Mesh,
                       steps_per_epoch: int = 1) -> TrainState:
  """Initial student, optimizer state and negative queue, replicated over ``mesh``.

  Runs as one jitted computation with replicated outputs, so every process of a multi-host
  run builds the same state from the same ``rng``.

  Args:
    config: the experiment config (``student.head_output_dim``, ``train.queue_size`` and
      the optimizer keys).
    student_model: ``create_model(...)`` of the student, with a projection head.
    rng: PRNG key (typed or raw).
    mesh: the device mesh.
    steps_per_epoch: only shapes the optimizer's schedule (its state has no such field).
  Returns:
    ``TrainState`` at step 0. The queue is random normal, then L2-normalised
    (docs/method.md §7).
  """
  embed_dim = config.student.head_output_dim
  queue_size = config.train.queue_size
  optimizer = optimization.make_optimizer(config.train, steps_per_epoch)
  image_size = 32  # parameter shapes do not depend on the image size

  def init(rng_data: jax.Array) -> TrainState:
    init_rng, queue_rng, state_rng = jax.random.split(jax.random.wrap_key_data(rng_data), 3)
    variables = student_model.init(init_rng, jnp.zeros((1, image_size, image_size, 3)),
                                   train=False)
    _, embeddings = jax.eval_shape(
        lambda v: student_model.apply(v, jnp.zeros((1, image_size, image_size, 3)),
                                      train=False), variables)
    if embeddings is None or embeddings.shape[-1] != embed_dim:
      raise ValueError(f'The student model must have a head with output dimension '
                       f'config.student.head_output_dim = {embed_dim}; it returns '
                       f'{None if embeddings is None else embeddings.shape}.')
    queue = losses.l2_normalize(jax.random.normal(queue_rng, (queue_size, embed_dim)))
    batch_stats = variables.get('batch_stats', {})
    moco = config_checks.method(config) == 'moco'
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables['params'],
        batch_stats=batch_stats,
        opt_state=optimizer.init(variables['params']),
        negative_queue=queue,
        queue_pointer=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(state_rng),
        # MoCo's key encoder starts as a copy of the query encoder (builder.py copies
        # parameters and buffers alike).
        key_params=jax.tree.map(jnp.copy, variables['params']) if moco else None,
        key_batch_stats=jax.tree.map(jnp.copy, batch_stats) if moco else None)

  return jax.jit(init, out_shardings=parallel.replicated(mesh))(_key_data(rng))


# ---------------------------------------------------------------------------------------------
# The step skeleton

# (state, teacher_variables, normalised key-side images by view, rngs)
#   -> (L2-normalised keys by view, without gradient; TrainState fields to replace)
EmbedKeysFn = Callable[[TrainState, Any, Batch, Rngs], tuple[Batch, dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class StepMethod:
  """What a training method adds to ``build_train_step``.

  Attributes:
    name: how errors name the step, e.g. ``'train_step (moco)'``.
    objective: the views and the loss (``objectives.make_objective``).
    rng_streams: names of the PRNG keys split from ``state.rng`` each step, in order
      (``'cutmix'`` is read when the objective has a CutMix view).
    embed_keys: embeds ``objective.teacher_views`` without gradient, before the student.
    after_update: ``(old state, updated params) -> TrainState fields to replace``, or None.
  """
  name: str
  objective: objectives.Objective
  rng_streams: tuple[str, ...]
  embed_keys: EmbedKeysFn
  after_update: Optional[Callable[[TrainState, Any], dict[str, Any]]] = None


def build_train_step(config: ml_collections.ConfigDict, student_model: nn.Module,
                     mesh: jax.sharding.Mesh, steps_per_epoch: int,
                     method: StepMethod) -> TrainStepFn:
  """The jitted step ``(state, teacher_variables, batch) -> (state, metrics)`` of ``method``.

  Args:
    config: the experiment config, already checked (``config_checks.check_step``).
    student_model: the student, built with ``config.student.bn_group_size`` and the compute
      dtype.
    mesh: the device mesh (``parallel.make_mesh()``).
    steps_per_epoch: optimizer steps per epoch (epoch = step // steps_per_epoch drives the
      per-epoch learning rate and the loss warm-up).
    method: the method's parts.
  Returns:
    ``train_step(state, teacher_variables, batch)``: ``state`` replicated (donated),
    ``teacher_variables`` replicated, ``batch`` a dict of global arrays sharded on
    ``'data'`` (``parallel.global_batch``) holding uint8 ``(B, S, S, 3)`` images under
    ``method.objective.batch_views``. Metrics (replicated float32 scalars): the objective's
    (its ``ce_*`` terms and ``own_weight``), ``loss``, ``top1``, ``top5`` (percent, q against
    k), ``learning_rate`` (the one this update used), ``lam`` (mean over the batch; 1
    without CutMix) and ``epoch``.
  """
  train = config.train
  optimizer = optimization.make_optimizer(train, steps_per_epoch)
  schedule = optimization.learning_rate_schedule(train, steps_per_epoch)
  compute_dtype = jnp.dtype(train.compute_dtype)
  objective = method.objective
  skip_non_finite = train.get('nan_policy', 'stop') == 'skip'

  def step_fn(state: TrainState, teacher_variables: Any, batch: Batch
              ) -> tuple[TrainState, Metrics]:
    batch_size = _check_step_inputs(method.name, objective.batch_views, batch, state)
    epoch = state.step // steps_per_epoch
    next_rng, *streams = jax.random.split(jax.random.wrap_key_data(state.rng),
                                          1 + len(method.rng_streams))
    rngs = dict(zip(method.rng_streams, streams))
    normalize = lambda images: images_lib.normalize(images, compute_dtype)  # noqa: E731
    # Named scopes label the compiled program's operations (bench/scaling.py reads them).
    with jax.named_scope('cutmix'):
      student_images, lam = _student_images(config, objective, batch, batch_size, rngs)
    with jax.named_scope('teacher_keys'):
      keys, key_state = method.embed_keys(
          state, teacher_variables, {view: normalize(batch[objectives.source_view(view)])
                                     for view in objective.teacher_views}, rngs)
    inputs = objectives.LossInputs(state.negative_queue, train.temperature, epoch, lam)

    def loss_fn(params):
      with jax.named_scope('student'):
        embeddings, batch_stats = _student_passes(
            student_model, params, state.batch_stats,
            {view: normalize(student_images[view]) for view in objective.student_views})
      with jax.named_scope('loss'):
        loss, metrics = objective.loss({**embeddings, **keys}, inputs)
        top1, top5 = losses.contrastive_accuracy(
            jax.lax.stop_gradient(embeddings[views.QUERY]), keys[views.KEY],
            state.negative_queue, train.temperature, (1, 5))
      return loss, (batch_stats, dict(metrics, loss=loss, top1=top1, top5=top5))

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    with jax.named_scope('optimizer'):
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      method_state = dict(key_state, **(method.after_update(state, params)
                                        if method.after_update else {}))
    with jax.named_scope('queue'):
      negative_queue, queue_pointer = enqueue(state.negative_queue, state.queue_pointer,
                                              keys[views.KEY])
    metrics.update(learning_rate=schedule(state.step), lam=jnp.mean(lam),
                   epoch=epoch.astype(jnp.float32))
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
        negative_queue=negative_queue, queue_pointer=queue_pointer,
        rng=jax.random.key_data(next_rng), **method_state)
    if skip_non_finite:
      new_state = _keep_if_finite(state, new_state, grads, metrics)
    return new_state, {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}

  return _jit_step(step_fn, mesh)


def _student_images(config: ml_collections.ConfigDict, objective: objectives.Objective,
                    batch: Batch, batch_size: int, rngs: Rngs) -> tuple[Batch, jax.Array]:
  """The student's images by view: the batch's, plus the CutMix image where the objective
  has one (docs/method.md §3).

  Returns:
    ``(images, lam)``: uint8 ``(B, S, S, 3)`` images by view and float32 ``(B,)`` the share
    of the query in each mixed image (ones without CutMix).
  """
  student_images = dict(batch)
  lam = jnp.ones((batch_size,), jnp.float32)
  if objective.uses_cutmix:
    student_images[objectives.MIX_Q], lam = cutmix_lib.cutmix(
        rngs['cutmix'], batch[views.QUERY], batch[views.POS_Q], mode=config.train.cutmix,
        beta=config.train.cutmix_beta, group_size=config.student.bn_group_size)
  return student_images, lam


def _keep_if_finite(state: TrainState, new_state: TrainState, grads: Any,
                    metrics: Metrics) -> TrainState:
  """``config.train.nan_policy = 'skip'``: the update, unless it is not finite.

  A non-finite loss, gradient norm or updated state leaves the learned state as it was; the
  step counter and the RNG still advance (the data position and the next draws are those of
  a run without the fault). 'stop' is the loop's check. The updated state is checked too: a
  finite gradient times a huge learning rate can overflow to Inf with a finite loss and norm.

  Returns:
    The state after the step; ``metrics`` gains ``grad_norm`` and ``skipped`` (1 when the
    update was dropped).
  """
  grad_norm = optax.tree.norm(grads)
  finite = (jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
            & _all_finite(new_state))
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics.update(grad_norm=grad_norm, skipped=1.0 - finite.astype(jnp.float32))
  return kept.replace(step=new_state.step, rng=new_state.rng)


def _all_finite(tree: Any) -> jax.Array:
  """A boolean scalar: no floating-point leaf of ``tree`` holds NaN or Inf."""
  checks = [jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def _check_step_inputs(name: str, batch_views: tuple[str, ...], batch: Batch,
                       state: TrainState) -> int:
  """Trace-time checks of the batch's views and the queue's shape; returns the batch size."""
  missing = [view for view in batch_views if view not in batch]
  if missing:
    raise ValueError(f'{name}: batch lacks {missing}; it has {sorted(batch)}.')
  batch_size = batch[views.QUERY].shape[0]
  queue_size = state.negative_queue.shape[0]
  if queue_size % batch_size:
    raise ValueError(f'{name}: queue size {queue_size} is not divisible by the global '
                     f'batch size {batch_size}.')
  return batch_size


def _student_passes(student_model: nn.Module, params: Any, batch_stats: Any,
                    images: Batch) -> tuple[Batch, Any]:
  """One training-mode student pass per view, in order, threading the running statistics.

  Args:
    student_model: the student.
    params, batch_stats: its variables.
    images: normalised ``(batch, S, S, 3)`` images by view, in pass order.
  Returns:
    ``(embeddings, batch_stats)``: L2-normalised ``(batch, dim)`` float32 embeddings by view
    and the running statistics after the last pass.
  """
  embeddings = {}
  for view, view_images in images.items():
    (_, output), updates = student_model.apply(
        {'params': params, 'batch_stats': batch_stats}, view_images, train=True,
        mutable=['batch_stats'])
    batch_stats = updates['batch_stats']
    embeddings[view] = losses.l2_normalize(output)
  return embeddings, batch_stats


def enqueue(negative_queue: jax.Array, queue_pointer: jax.Array,
            keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """FIFO: ``keys`` ``(batch, dim)`` replace the oldest rows, from ``queue_pointer`` on.

  Returns:
    ``(negative_queue, queue_pointer)`` after the write (the queue size is a multiple of the
    batch, so a batch never wraps around the end).
  """
  negative_queue = jax.lax.dynamic_update_slice(
      negative_queue, keys.astype(negative_queue.dtype),
      (queue_pointer, jnp.zeros((), jnp.int32)))
  return negative_queue, (queue_pointer + keys.shape[0]) % negative_queue.shape[0]


def _jit_step(step_fn: Callable, mesh: jax.sharding.Mesh) -> TrainStepFn:
  """``jax.jit`` of ``step_fn(state, teacher_variables, batch)``: state and teacher
  replicated, the batch sharded on ``'data'``, the old state donated."""
  replicated = parallel.replicated(mesh)
  return jax.jit(step_fn,
                 in_shardings=(replicated, replicated, parallel.data_sharding(mesh)),
                 out_shardings=(replicated, replicated),
                 donate_argnums=(0,))

"""The data-parallel BINGO distillation step (docs/method.md §2 to §7).

One ``jax.jit`` over a device ``Mesh``: the global batch is sharded along ``'data'``; the
student state, the negative queue and the teacher variables are replicated. XLA inserts the
collectives (gradient all-reduce, the all-gather behind the teacher's batch shuffle), so the
step computes the same numbers on 1 device, 8 devices or several hosts.

How the networks are called follows the released ``moco/builder.py``:

* The student is applied three times, to ``query``, ``pos_q`` and ``mix_q``, each a separate
  forward pass in training mode. Its BatchNorm statistics are per group of
  ``config.student.bn_group_size`` examples of the global batch (released: each GPU's 32
  images), and the running statistics are updated three times in that order, as the three
  ``encoder_q`` calls do. One concatenated call would give the same outputs and gradients
  (the groups never straddle two views) but a single running-statistics update. (Released
  DDP broadcasts GPU 0's buffers at every forward, so its stored running statistics follow
  GPU 0's group alone; ``layers.BatchNorm`` averages the groups' statistics instead.)
* CutMix (``config.train.cutmix``, docs/method.md §3): ``'batch'`` draws one box for the
  global batch; the released loop draws one per GPU batch, which ``'group'`` reproduces with
  the student's BatchNorm groups; ``'sample'`` one per example.
* The teacher embeds ``key`` and ``pos_k`` under ``stop_gradient``. ``bn_mode='shuffle'``
  (released): training-mode BatchNorm on groups of ``config.teacher.bn_group_size`` examples
  of a freshly permuted global batch (a separate permutation for each view), outputs
  un-permuted; its running statistics are not kept (only the frozen mode reads them).
  ``'frozen'``: eval mode with the stored running statistics.
* The loss uses the queue as it was before the step; then the anchors' teacher keys replace
  the oldest queue entries.
* ``config.train.loss = 'intra'`` (the "w/o bag" ablation, SEED-like distillation): only
  ``query`` (student) and ``key`` (teacher) are embedded and the loss is the mean
  ``CE(q, k)`` against the queue; no positive, no bags, no CutMix.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bingo_jax import cutmix as cutmix_lib
from bingo_jax import images as images_lib
from bingo_jax import losses
from bingo_jax import parallel

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
TrainStepFn = Callable[['TrainState', Any, Batch], tuple['TrainState', Metrics]]

IMAGE_KEYS = ('query', 'key', 'pos_q', 'pos_k')
MOCO_IMAGE_KEYS = ('query', 'key')
METHODS = ('bingo', 'moco')
# docs/method.md §6. 'bingo': released loss; 'paper': Eq. 8/9, CE(q, k) + CE(p, k); 'intra':
# CE(q, k) alone, the anchor's own teacher key (the paper's "w/o bag" ablation, SEED-like).
LOSSES = ('bingo', 'paper', 'intra')


def uses_bag_positive(config: ml_collections.ConfigDict) -> bool:
  """Whether the step reads a bag positive (``pos_q``/``pos_k`` views), i.e. needs bags.

  MoCo pre-training and the ``'intra'`` loss see only the anchor's ``query`` and ``key``.
  """
  return config.train.get('method', 'bingo') != 'moco' and config.train.loss != 'intra'


def batch_image_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The image views the step reads from a batch (the views the input pipeline must make)."""
  return IMAGE_KEYS if uses_bag_positive(config) else MOCO_IMAGE_KEYS


@flax.struct.dataclass
class TrainState:
  """Everything that changes from step to step (all replicated over the mesh).

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: student parameters (float32).
    batch_stats: student BatchNorm running statistics.
    opt_state: optax state of ``make_optimizer``.
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
# Optimizer (docs/method.md §7)


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
  if mode not in ('cosine_epoch', 'cosine_step'):
    raise ValueError(f"config.train.lr_schedule = {mode!r}; expected 'cosine_epoch' or "
                     "'cosine_step'.")

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
  optimizer = make_optimizer(config.train, steps_per_epoch)
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
    moco = config.train.get('method', 'bingo') == 'moco'
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
# Step


def _bn_group_size(model: nn.Module) -> Any:
  return getattr(getattr(model, 'backbone', None), 'bn_group_size', None)


def _check_bn_group(model: nn.Module, section: str, group: Any, batch: int) -> None:
  """The model's BatchNorm group must be ``config.<section>.bn_group_size`` and divide the batch."""
  if _bn_group_size(model) != group:
    raise ValueError(f'The {section} model was built with bn_group_size={_bn_group_size(model)} '
                     f'but config.{section}.bn_group_size = {group}; create it with '
                     f'create_model(..., bn_group_size=config.{section}.bn_group_size).')
  if group and batch % group:
    raise ValueError(f'config.train.batch_size = {batch} is not divisible by '
                     f'config.{section}.bn_group_size = {group}.')


def _check_config(config: ml_collections.ConfigDict, student_model: nn.Module,
                  teacher_model: nn.Module, mesh: jax.sharding.Mesh) -> None:
  """Clear errors for settings the step cannot honour, before anything is compiled."""
  train = config.train
  batch = train.batch_size
  method = train.get('method', 'bingo')
  if method not in METHODS:
    raise ValueError(f'config.train.method = {method!r}; expected one of {METHODS}.')
  if train.queue_size % batch:
    raise ValueError(f'config.train.queue_size = {train.queue_size} is not divisible by '
                     f'config.train.batch_size = {batch} (the queue advances by whole batches).')
  if batch % mesh.devices.size:
    raise ValueError(f'config.train.batch_size = {batch} is not divisible by the '
                     f'{mesh.devices.size} devices of the mesh.')
  if train.loss not in LOSSES:
    raise ValueError(f'config.train.loss = {train.loss!r}; expected one of {LOSSES}.')
  if train.cutmix not in cutmix_lib.MODES:
    raise ValueError(f'config.train.cutmix = {train.cutmix!r}; expected one of '
                     f'{cutmix_lib.MODES}.')
  if config.teacher.bn_mode not in ('shuffle', 'frozen'):
    raise ValueError(f"config.teacher.bn_mode = {config.teacher.bn_mode!r}; expected "
                     "'shuffle' or 'frozen'.")
  student_group = config.student.bn_group_size
  _check_bn_group(student_model, 'student', student_group, batch)
  if train.cutmix == 'group' and train.loss == 'bingo' and not student_group:
    raise ValueError("config.train.cutmix = 'group' draws one box per student BatchNorm group, "
                     f'but config.student.bn_group_size = {student_group}.')
  # MoCo's key encoder always runs with the shuffle, whatever config.teacher.bn_mode says.
  if config.teacher.bn_mode == 'shuffle' or method == 'moco':
    _check_bn_group(teacher_model, 'teacher', config.teacher.bn_group_size, batch)


def teacher_embeddings(teacher_model: nn.Module, teacher_variables: Any, images: jax.Array,
                       bn_mode: str, rng: jax.Array) -> jax.Array:
  """L2-normalised teacher embeddings of normalised images, without gradient.

  Args:
    teacher_model: the teacher; in ``'shuffle'`` mode built with the teacher's BatchNorm
      group size.
    teacher_variables: ``{'params', 'batch_stats'}`` of the teacher.
    images: ``(batch, height, width, 3)`` normalised images.
    bn_mode: ``'shuffle'`` (training-mode statistics on groups of a random permutation of
      the batch) or ``'frozen'`` (stored running statistics).
    rng: PRNG key of the permutation (unused when frozen).
  Returns:
    ``(batch, dim)`` float32 embeddings in the order of ``images``.
  """
  if bn_mode == 'frozen':
    _, embeddings = teacher_model.apply(teacher_variables, images, train=False)
  else:
    permutation = jax.random.permutation(rng, images.shape[0])
    (_, shuffled), _ = teacher_model.apply(teacher_variables, images[permutation], train=True,
                                           mutable=['batch_stats'])
    # Row permutation[i] of the batch was embedded at position i: scatter it back.
    embeddings = jnp.zeros_like(shuffled).at[permutation].set(shuffled)
  return jax.lax.stop_gradient(losses.l2_normalize(embeddings))


def shuffled_key_embeddings(key_model: nn.Module, key_variables: Any, images: jax.Array,
                            rng: jax.Array) -> tuple[jax.Array, Any]:
  """MoCo's key encoder forward: shuffled training-mode BatchNorm, its own statistics kept.

  The batch is permuted, embedded in groups of the model's ``bn_group_size`` and
  un-permuted, as ``teacher_embeddings(..., 'shuffle', rng)`` does (same permutation for the
  same ``rng``); unlike a frozen BINGO teacher, MoCo's ``encoder_k`` runs in training mode
  and so updates its running statistics with these batch statistics (its buffers are not
  part of the momentum update, which covers parameters only).

  Args:
    key_model: the key encoder (student architecture, teacher BatchNorm group size).
    key_variables: ``{'params', 'batch_stats'}`` of the key encoder.
    images: ``(batch, height, width, 3)`` normalised images.
    rng: PRNG key of the permutation.
  Returns:
    ``(keys, batch_stats)``: ``(batch, dim)`` L2-normalised float32 keys in the order of
    ``images`` (no gradient) and the key encoder's updated running statistics.
  """
  permutation = jax.random.permutation(rng, images.shape[0])
  (_, shuffled), updates = key_model.apply(key_variables, images[permutation], train=True,
                                           mutable=['batch_stats'])
  keys = jnp.zeros_like(shuffled).at[permutation].set(shuffled)
  return (jax.lax.stop_gradient(losses.l2_normalize(keys)),
          jax.lax.stop_gradient(updates['batch_stats']))


def momentum_update(key_params: Any, query_params: Any, momentum: float) -> Any:
  """``k = m * k + (1 - m) * q`` leaf by leaf (MoCo ``_momentum_update_key_encoder``)."""
  return jax.tree.map(lambda k, q: momentum * k + (1.0 - momentum) * q, key_params,
                      query_params)


def _jit_step(step_fn: Callable, mesh: jax.sharding.Mesh) -> TrainStepFn:
  """``jax.jit`` of ``step_fn(state, teacher_variables, batch)``: state and teacher
  replicated, the batch sharded on ``'data'``, the old state donated."""
  replicated = parallel.replicated(mesh)
  return jax.jit(step_fn,
                 in_shardings=(replicated, replicated, parallel.data_sharding(mesh)),
                 out_shardings=(replicated, replicated),
                 donate_argnums=(0,))


def make_train_step(config: ml_collections.ConfigDict, student_model: nn.Module,
                    teacher_model: nn.Module, mesh: jax.sharding.Mesh,
                    steps_per_epoch: int) -> TrainStepFn:
  """Builds the jitted step ``(state, teacher_variables, batch) -> (state, metrics)``.

  Args:
    config: the experiment config (``train``, ``student``, ``teacher`` sections).
    student_model: ``create_model`` of the student, ``bn_group_size`` =
      ``config.student.bn_group_size`` and ``dtype`` = the compute dtype.
    teacher_model: ``create_model`` of the teacher with its head; ``bn_group_size`` =
      ``config.teacher.bn_group_size`` in ``'shuffle'`` mode.
    mesh: the device mesh (``parallel.make_mesh()``).
    steps_per_epoch: optimizer steps per epoch (epoch = step // steps_per_epoch drives the
      per-epoch learning rate and the loss warm-up).
  Returns:
    ``train_step(state, teacher_variables, batch)``: ``state`` replicated (donated),
    ``teacher_variables`` replicated, ``batch`` a dict of global arrays sharded on
    ``'data'`` (``parallel.global_batch``) with uint8 ``(B, S, S, 3)`` images under
    ``batch_image_keys(config)``: ``'query'``, ``'key'``, ``'pos_q'``, ``'pos_k'``, or only
    ``'query'`` and ``'key'`` for ``loss = 'intra'`` (other keys are ignored). Metrics
    (replicated float32 scalars): ``loss``, ``top1``, ``top5`` (percent, q against k),
    ``learning_rate`` (the one used by this update), ``lam`` (mean over the batch; 1 without
    CutMix), ``own_weight`` (1 for 'paper' and 'intra'), ``epoch`` and the CE terms ``ce_*``
    of the loss (``losses.bingo_loss``, ``losses.paper_loss``; ``ce_q_k`` alone for 'intra').
  """
  _check_config(config, student_model, teacher_model, mesh)
  if config.train.get('method', 'bingo') == 'moco':
    return _make_moco_train_step(config, student_model, teacher_model, mesh, steps_per_epoch)
  train = config.train
  optimizer = make_optimizer(train, steps_per_epoch)
  schedule = learning_rate_schedule(train, steps_per_epoch)
  compute_dtype = jnp.dtype(train.compute_dtype)
  temperature = train.temperature
  use_cutmix = train.loss == 'bingo' and train.cutmix != 'none'
  bn_mode = config.teacher.bn_mode
  image_keys = batch_image_keys(config)

  def step_fn(state: TrainState, teacher_variables: Any, batch: Batch
              ) -> tuple[TrainState, Metrics]:
    missing = [name for name in image_keys if name not in batch]
    if missing:
      raise ValueError(f'train_step: batch lacks {missing}; it has {sorted(batch)}.')
    batch_size = batch['query'].shape[0]
    queue_size = state.negative_queue.shape[0]
    if queue_size % batch_size:
      raise ValueError(f'train_step: queue size {queue_size} is not divisible by the global '
                       f'batch size {batch_size}.')
    epoch = state.step // steps_per_epoch
    rng, cutmix_rng, key_rng, pos_k_rng = jax.random.split(
        jax.random.wrap_key_data(state.rng), 4)

    if use_cutmix:
      mix_images, lam = cutmix_lib.cutmix(cutmix_rng, batch['query'], batch['pos_q'],
                                          mode=train.cutmix, beta=train.cutmix_beta,
                                          group_size=config.student.bn_group_size)
    else:
      mix_images, lam = None, jnp.ones((batch_size,), jnp.float32)

    normalize = lambda x: images_lib.normalize(x, compute_dtype)
    key = teacher_embeddings(teacher_model, teacher_variables, normalize(batch['key']),
                             bn_mode, key_rng)
    # The 'paper' and 'intra' losses do not look at the positive's teacher view.
    pos_k = (teacher_embeddings(teacher_model, teacher_variables, normalize(batch['pos_k']),
                                bn_mode, pos_k_rng) if train.loss == 'bingo' else None)

    def loss_fn(params):
      batch_stats = state.batch_stats

      def student(images):
        nonlocal batch_stats
        (_, embeddings), updates = student_model.apply(
            {'params': params, 'batch_stats': batch_stats}, normalize(images), train=True,
            mutable=['batch_stats'])
        batch_stats = updates['batch_stats']
        return losses.l2_normalize(embeddings)

      # Separate passes in the released order, query first (see the module docstring).
      query = student(batch['query'])
      if train.loss == 'intra':
        loss = jnp.mean(losses.info_nce(query, key, state.negative_queue, temperature))
        terms = {'ce_q_k': loss}
        own_weight = jnp.ones((), jnp.float32)
      elif train.loss == 'paper':
        pos_q = student(batch['pos_q'])
        loss, terms = losses.paper_loss(query, pos_q, key, state.negative_queue, temperature)
        own_weight = jnp.ones((), jnp.float32)
      else:
        pos_q = student(batch['pos_q'])
        mix_q = student(mix_images) if use_cutmix else None
        warm_up = epoch < train.own_only_epochs
        own_weight = jnp.where(warm_up, 1.0, 0.5).astype(jnp.float32)
        other_weight = jnp.where(warm_up, 0.0, 0.5).astype(jnp.float32)
        loss, terms = losses.bingo_loss(query, pos_q, mix_q, key, pos_k, state.negative_queue,
                                        temperature, own_weight, other_weight,
                                        lam if use_cutmix else None)
      top1, top5 = losses.contrastive_accuracy(
          jax.lax.stop_gradient(query), key, state.negative_queue, temperature, (1, 5))
      metrics = dict(terms, loss=loss, top1=top1, top5=top5, own_weight=own_weight)
      return loss, (batch_stats, metrics)

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    # FIFO: the anchors' teacher keys replace the oldest entries (docs/method.md §7).
    negative_queue = jax.lax.dynamic_update_slice(
        state.negative_queue, key.astype(state.negative_queue.dtype),
        (state.queue_pointer, jnp.zeros((), jnp.int32)))
    queue_pointer = (state.queue_pointer + batch_size) % queue_size

    metrics.update(learning_rate=schedule(state.step), lam=jnp.mean(lam),
                   epoch=epoch.astype(jnp.float32))
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
        negative_queue=negative_queue, queue_pointer=queue_pointer,
        rng=jax.random.key_data(rng))
    return new_state, {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}

  return _jit_step(step_fn, mesh)


def _make_moco_train_step(config: ml_collections.ConfigDict, student_model: nn.Module,
                          key_model: nn.Module, mesh: jax.sharding.Mesh,
                          steps_per_epoch: int) -> TrainStepFn:
  """MoCo v2 pre-training step (``config.train.method = 'moco'``); see ``make_train_step``.

  Follows the released ``moco/builder.py``: the query encoder (the student) embeds
  ``query`` in training mode; the key encoder (``state.key_params`` /
  ``state.key_batch_stats``, built as ``key_model`` = the student's architecture with the
  teacher's BatchNorm group size) embeds ``key`` with the batch shuffle; the loss is
  ``CE(q, k)`` against the queue; the queue then receives the keys (FIFO). The key encoder's
  parameters follow ``k = m * k + (1 - m) * q`` with the updated query parameters: MoCo does
  this at the start of the next forward, which is the same sequence of values (at step 0 the
  two encoders are equal, so the update there is the identity).

  Returns:
    ``train_step(state, unused_variables, batch)``; the second argument is ignored (pass
    ``{}``), the batch needs ``'query'`` and ``'key'``. Metrics: ``loss``, ``top1``, ``top5``,
    ``learning_rate``, ``epoch``.
  """
  train = config.train
  optimizer = make_optimizer(train, steps_per_epoch)
  schedule = learning_rate_schedule(train, steps_per_epoch)
  compute_dtype = jnp.dtype(train.compute_dtype)
  temperature = train.temperature
  momentum = float(train.moco_momentum)
  if not 0.0 <= momentum <= 1.0:
    raise ValueError(f'config.train.moco_momentum = {momentum} must lie in [0, 1].')

  def step_fn(state: TrainState, unused_variables: Any, batch: Batch
              ) -> tuple[TrainState, Metrics]:
    del unused_variables
    missing = [name for name in MOCO_IMAGE_KEYS if name not in batch]
    if missing:
      raise ValueError(f'train_step (moco): batch lacks {missing}; it has {sorted(batch)}.')
    if state.key_params is None:
      raise ValueError('train_step (moco): the state has no key encoder; create it with '
                       "create_train_state under config.train.method = 'moco'.")
    batch_size = batch['query'].shape[0]
    queue_size = state.negative_queue.shape[0]
    if queue_size % batch_size:
      raise ValueError(f'train_step: queue size {queue_size} is not divisible by the global '
                       f'batch size {batch_size}.')
    epoch = state.step // steps_per_epoch
    rng, key_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    normalize = lambda x: images_lib.normalize(x, compute_dtype)

    key, key_batch_stats = shuffled_key_embeddings(
        key_model, {'params': state.key_params, 'batch_stats': state.key_batch_stats},
        normalize(batch['key']), key_rng)

    def loss_fn(params):
      (_, embeddings), updates = student_model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, normalize(batch['query']),
          train=True, mutable=['batch_stats'])
      query = losses.l2_normalize(embeddings)
      loss = jnp.mean(losses.info_nce(query, key, state.negative_queue, temperature))
      top1, top5 = losses.contrastive_accuracy(
          jax.lax.stop_gradient(query), key, state.negative_queue, temperature, (1, 5))
      return loss, (updates['batch_stats'], dict(loss=loss, top1=top1, top5=top5))

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    key_params = momentum_update(state.key_params, params, momentum)

    negative_queue = jax.lax.dynamic_update_slice(
        state.negative_queue, key.astype(state.negative_queue.dtype),
        (state.queue_pointer, jnp.zeros((), jnp.int32)))
    queue_pointer = (state.queue_pointer + batch_size) % queue_size

    metrics.update(learning_rate=schedule(state.step), epoch=epoch.astype(jnp.float32))
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
        negative_queue=negative_queue, queue_pointer=queue_pointer,
        rng=jax.random.key_data(rng), key_params=key_params, key_batch_stats=key_batch_stats)
    return new_state, {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}

  return _jit_step(step_fn, mesh)

"""Linear probes: a linear classifier on the frozen pooled features of a network.

``train_linear_probe`` is the released protocol (main_lincls.py, docs/method.md §8): the
backbone is frozen with BatchNorm in eval mode (stored statistics), the classifier
``Linear(feature_dim, num_classes)`` starts from N(0, 0.01) weights and zero bias, SGD with
momentum 0.9, no weight decay, lr 30 at batch 256 (scaled linearly with the batch), cosine
decay set once per epoch down to ``min_lr`` (released default 0.01), training views
RandomResizedCrop + flip; top-1/top-5 on the centre-cropped evaluation split. The backbone
variables are never given to the optimizer nor written: they leave the probe bit-identical.

``train_linear_on_features`` is the *fast linear probe on cached features*: the same
classifier and optimiser on centre-crop features computed once (no augmentation), the
features standardised with the training split's per-dimension statistics and scaled to unit
mean squared norm (``standardizer``), so that one learning rate (``eval.linear_fast_lr``) fits
any feature scale and dimension, raw pixels included. Its numbers are for quick comparisons
only and are labelled as such everywhere they are reported.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from bingo_jax.data import images as images_lib
from bingo_jax.data import parallel
from bingo_jax.eval import pipeline

FAST_PROBE_LABEL = 'fast linear probe on cached features'


def cosine_epoch_lr(base_lr: float, epoch: int, epochs: int, min_lr: float = 0.0) -> float:
  """Learning rate of ``epoch`` (0-based): ``min + (base - min) (1 + cos(pi epoch / epochs)) / 2``."""
  return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def init_classifier(feature_dim: int, num_classes: int, seed: int = 0) -> dict:
  """``{'kernel': (feature_dim, num_classes) ~ N(0, 0.01), 'bias': zeros (num_classes,)}``, the
  released (and MoCo) initialisation of the linear classifier."""
  kernel = 0.01 * jax.random.normal(jax.random.key(seed), (feature_dim, num_classes), jnp.float32)
  return {'kernel': kernel, 'bias': jnp.zeros((num_classes,), jnp.float32)}


def classifier_logits(classifier: dict, features: jax.Array) -> jax.Array:
  """``(batch, feature_dim) -> (batch, num_classes)``."""
  return jnp.dot(features, classifier['kernel'],
                 precision=jax.lax.Precision.HIGHEST) + classifier['bias']


def make_sgd(momentum: float = 0.9, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """torch.optim.SGD (weight decay added to the gradient before momentum) with an injectable
  learning rate (``opt_state.hyperparams['learning_rate']``), set once per epoch."""
  def sgd(learning_rate):
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, momentum=momentum))
  return optax.inject_hyperparams(sgd)(learning_rate=0.0)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _top1(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels) * 100


def evaluate_classifier(classifier: dict, features: np.ndarray, labels: np.ndarray,
                        mesh: Optional[Mesh] = None, block_size: int = 4096) -> dict:
  """Top-1 / top-5 accuracy (percent) of a linear classifier on features.

  Args:
    classifier: ``{'kernel', 'bias'}``.
    features: ``(n, feature_dim)`` (already transformed as in training).
    labels: ``(n,)`` int labels.
    mesh: device mesh (default all devices); blocks are sharded over it.
    block_size: rows per block (rounded up to a multiple of the devices).
  Returns:
    ``{'top1': ..., 'top5': ..., 'num_eval': n}``.
  """
  mesh = mesh or parallel.make_mesh()
  devices = mesh.devices.size
  block_size = math.ceil(block_size / devices) * devices
  num_classes = int(classifier['bias'].shape[0])
  top = min(5, num_classes)

  top_classes = jax.jit(lambda c, x: jax.lax.top_k(classifier_logits(c, x), top)[1],
                        out_shardings=parallel.replicated(mesh))

  classifier = parallel.replicate(classifier, mesh)
  ranked = []
  for start in range(0, len(features), block_size):
    block = np.asarray(features[start:start + block_size], np.float32)
    valid = len(block)
    block = np.pad(block, ((0, block_size - valid), (0, 0)))
    block = jax.device_put(block, parallel.data_sharding(mesh))
    ranked.append(np.asarray(top_classes(classifier, block).addressable_data(0))[:valid])
  ranked = np.concatenate(ranked)
  labels = np.asarray(labels)
  return {'top1': float(np.mean(ranked[:, 0] == labels) * 100),
          'top5': float(np.mean((ranked == labels[:, None]).any(1)) * 100),
          'num_eval': int(len(labels))}


# ---------------------------------------------------------------------------------------------
# Fast probe on cached features.
# ---------------------------------------------------------------------------------------------

def standardizer(train_features: np.ndarray):
  """``x -> (x - mean) / (std sqrt(D))`` with the training split's per-dimension statistics
  (float64 accumulation; constant dimensions keep std 1).

  Every dimension gets variance ``1 / D``, so a training row has squared norm 1 on average
  whatever D and the feature scale are, and the size of an SGD step on the logits
  (``lr x ||x||^2``) no longer depends on them: one learning rate fits 128-d random-network
  features and 3072-d pixels alike."""
  mean = train_features.mean(0, dtype=np.float64)
  std = train_features.std(0, dtype=np.float64)
  std = np.where(std > 1e-8, std, 1.0) * np.sqrt(train_features.shape[1])
  return lambda x: ((np.asarray(x, np.float64) - mean) / std).astype(np.float32)


def _make_feature_epoch(optimizer: optax.GradientTransformation, mesh: Mesh):
  """Jitted ``(classifier, opt_state, features, labels, order, lr) -> (classifier, opt_state,
  mean loss)``: one epoch of SGD on replicated cached features, as one ``lax.scan`` over the
  ``(steps, batch)`` positions of ``order``, each batch sharded over ``mesh``."""
  replicated = parallel.replicated(mesh)
  batch_sharding = parallel.data_sharding(mesh)

  def run_epoch(classifier, opt_state, features, labels, order, lr):
    opt_state.hyperparams['learning_rate'] = lr

    def step(carry, batch_positions):
      classifier, opt_state = carry
      x = jax.lax.with_sharding_constraint(features[batch_positions], batch_sharding)
      y = jax.lax.with_sharding_constraint(labels[batch_positions], batch_sharding)
      loss, grads = jax.value_and_grad(
          lambda c: _cross_entropy(classifier_logits(c, x), y))(classifier)
      updates, opt_state = optimizer.update(grads, opt_state, classifier)
      return (optax.apply_updates(classifier, updates), opt_state), loss

    (classifier, opt_state), losses = jax.lax.scan(step, (classifier, opt_state), order)
    return classifier, opt_state, losses.mean()

  return jax.jit(run_epoch, donate_argnums=(0, 1),
                 out_shardings=(replicated, replicated, replicated))


def train_linear_on_features(train_features: np.ndarray, train_labels: np.ndarray,
                             eval_features: np.ndarray, eval_labels: np.ndarray, *,
                             num_classes: int, epochs: int = 100, batch_size: int = 256,
                             base_lr: float = 30.0, min_lr: float = 0.01,
                             momentum: float = 0.9, weight_decay: float = 0.0,
                             standardize: bool = True, mesh: Optional[Mesh] = None,
                             seed: int = 0, writer: Any = None,
                             progress: bool = True) -> tuple[dict, dict]:
  """The fast linear probe: SGD on cached features, one jitted ``lax.scan`` per epoch.

  Args:
    train_features: ``(n_train, D)`` features (centre crops, computed once).
    train_labels: ``(n_train,)`` int labels.
    eval_features: ``(n_eval, D)``.
    eval_labels: ``(n_eval,)``.
    num_classes: classifier outputs.
    epochs: passes over the training features (a fresh permutation each, last partial batch
      dropped).
    batch_size: global batch; the learning rate is ``base_lr * batch_size / 256``.
    base_lr: at batch 256.
    min_lr: end of the cosine.
    momentum, weight_decay: SGD.
    standardize: standardise features with the training statistics (see module docstring).
    mesh: device mesh (default all devices): every batch is sharded over it.
    seed: classifier initialisation and batch order.
    writer: optional ``progress.MetricWriter`` (per-epoch loss, lr and eval accuracy).
    progress: progress bar.
  Returns:
    ``(metrics, classifier)``: ``metrics`` has ``top1``, ``top5`` (percent, eval split),
    ``train_loss`` (last epoch), ``protocol`` = ``FAST_PROBE_LABEL`` and the settings;
    ``classifier`` is ``{'kernel', 'bias'}`` numpy arrays (acting on transformed features).
  """
  mesh = mesh or parallel.make_mesh()
  if batch_size % mesh.devices.size:
    raise ValueError(f'linear probe batch size {batch_size} does not divide over '
                     f'{mesh.devices.size} devices (config.eval.batch_size).')
  train_features = np.asarray(train_features, np.float32)
  transform = standardizer(train_features) if standardize else (
      lambda x: np.asarray(x, np.float32))
  train_features = transform(train_features)
  eval_features = transform(eval_features)
  train_labels = np.asarray(train_labels, np.int32)
  learning_rate = base_lr * batch_size / 256

  optimizer = make_sgd(momentum, weight_decay)
  replicated = parallel.replicated(mesh)
  classifier = init_classifier(train_features.shape[1], num_classes, seed)
  classifier, opt_state = jax.device_put((classifier, optimizer.init(classifier)), replicated)
  features_on_device = jax.device_put(train_features, replicated)
  labels_on_device = jax.device_put(train_labels, replicated)

  run_epoch = _make_feature_epoch(optimizer, mesh)
  loss = float('nan')
  bar = tqdm(range(epochs), desc='fast linear probe', unit='epoch',
             disable=not progress or jax.process_index() != 0)
  for epoch in bar:
    lr = cosine_epoch_lr(learning_rate, epoch, epochs, min_lr)
    order = jax.device_put(pipeline.epoch_order(len(train_features), batch_size, seed, epoch),
                           replicated)
    classifier, opt_state, loss = run_epoch(classifier, opt_state, features_on_device,
                                            labels_on_device, order, lr)
    loss = float(loss)
    bar.set_postfix(loss=f'{loss:.4f}', lr=f'{lr:.3g}')
    if writer is not None:
      writer.write_scalars(epoch + 1, {'fast_linear/train_loss': loss,
                                       'fast_linear/learning_rate': lr})
  metrics = evaluate_classifier(classifier, eval_features, eval_labels, mesh)
  if writer is not None:
    writer.write_scalars(epochs, {'fast_linear/eval_top1': metrics['top1'],
                                  'fast_linear/eval_top5': metrics['top5']})
  metrics.update({'protocol': FAST_PROBE_LABEL, 'train_loss': loss, 'epochs': epochs,
                  'batch_size': batch_size, 'learning_rate': learning_rate,
                  'standardized': bool(standardize), 'num_train': int(len(train_features))})
  return metrics, jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), classifier)


# ---------------------------------------------------------------------------------------------
# The released protocol: frozen backbone on augmented images.
# ---------------------------------------------------------------------------------------------

def backbone_features(model, variables: dict, images: jax.Array) -> jax.Array:
  """Pooled backbone features of uint8 images, BatchNorm in eval mode (head not run)."""
  return model.apply(variables, images_lib.normalize(images), False,
                     method=lambda module, x, train: module.backbone(x, train=train))


def make_linear_train_step(model, optimizer: optax.GradientTransformation, mesh: Mesh):
  """Jitted ``(classifier, opt_state, backbone_variables, batch, lr) -> (classifier, opt_state,
  metrics)``. Only the classifier and its optimizer state are donated and returned."""
  def step(classifier, opt_state, backbone_variables, batch, lr):
    # Frozen: no gradient reaches the backbone, and its variables are an input only.
    features = jax.lax.stop_gradient(backbone_features(model, backbone_variables, batch['image']))

    def loss_fn(c):
      logits = classifier_logits(c, features)
      return _cross_entropy(logits, batch['label']), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(classifier)
    opt_state.hyperparams['learning_rate'] = lr
    updates, opt_state = optimizer.update(grads, opt_state, classifier)
    return (optax.apply_updates(classifier, updates), opt_state,
            {'loss': loss, 'top1': _top1(logits, batch['label'])})

  replicated = parallel.replicated(mesh)
  return jax.jit(step, donate_argnums=(0, 1),
                 in_shardings=(replicated, replicated, replicated,
                               parallel.data_sharding(mesh), replicated),
                 out_shardings=(replicated, replicated, replicated))


def train_linear_probe(loaded_model: Any, train_source: Any, eval_features: np.ndarray,
                       eval_labels: np.ndarray, *, num_classes: int, image_size: int,
                       epochs: int = 100, batch_size: int = 256, base_lr: float = 30.0,
                       min_lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0,
                       mesh: Optional[Mesh] = None, seed: int = 0, writer: Any = None,
                       progress: bool = True) -> tuple[dict, dict]:
  """The released linear protocol on augmented training images.

  Args:
    loaded_model: ``model_io.LoadedModel``; its variables are read, never changed.
    train_source: labelled ``ImageSource`` of the training split.
    eval_features: ``(n_eval, D)`` unnormalised centre-crop pooled features of the
      evaluation split (``features.extract_features(..., normalize_features=False)``); the
      backbone is frozen, so they are computed once and reused every epoch.
    eval_labels: ``(n_eval,)``.
    num_classes: classifier outputs.
    image_size: training crop side.
    epochs, batch_size, base_lr, min_lr, momentum, weight_decay: the SGD schedule; lr is
      ``base_lr * batch_size / 256``.
    mesh: device mesh (default all devices).
    seed: classifier initialisation, order and views.
    writer: optional ``progress.MetricWriter``.
    progress: progress bar.
  Returns:
    ``(metrics, classifier)``: top-1/top-5 (percent) on the evaluation split after the last
    epoch, plus the settings; the classifier as numpy arrays.
  """
  mesh = mesh or parallel.make_mesh()
  labels = train_source.labels
  if labels is None:
    raise ValueError(f'{train_source.description} has no labels: the linear probe needs them.')
  parallel.local_batch_size(batch_size, mesh)  # checks divisibility
  learning_rate = base_lr * batch_size / 256
  model = loaded_model.model
  optimizer = make_sgd(momentum, weight_decay)
  replicated = parallel.replicated(mesh)
  classifier = init_classifier(model.feature_dim, num_classes, seed)
  classifier, opt_state = jax.device_put((classifier, optimizer.init(classifier)), replicated)
  # The frozen variables live on the devices once; the step never donates them.
  backbone_variables = parallel.replicate(loaded_model.variables, mesh)
  step_fn = make_linear_train_step(model, optimizer, mesh)
  all_indices = np.arange(len(train_source))
  steps = len(train_source) // batch_size
  bar = tqdm(total=epochs * steps, desc='linear probe', unit='step',
             disable=not progress or jax.process_index() != 0)
  metrics = {}

  def step(local_batch: dict) -> dict:
    nonlocal classifier, opt_state
    classifier, opt_state, step_metrics = step_fn(
        classifier, opt_state, backbone_variables, parallel.global_batch(local_batch, mesh), lr)
    return step_metrics

  for epoch in range(epochs):
    lr = cosine_epoch_lr(learning_rate, epoch, epochs, min_lr)
    train_loss, train_top1 = pipeline.run_epoch(pipeline.labelled_batches(
        train_source, all_indices, labels, image_size=image_size, global_batch_size=batch_size,
        seed=seed, epoch=epoch, process_index=jax.process_index(),
        process_count=jax.process_count()), step, bar)
    metrics = evaluate_classifier(classifier, eval_features, eval_labels, mesh)
    bar.set_postfix(loss=f'{train_loss:.3f}', eval_top1=f'{metrics["top1"]:.2f}')
    if writer is not None:
      writer.write_scalars(epoch + 1, {'linear/train_loss': train_loss,
                                       'linear/train_top1': train_top1,
                                       'linear/learning_rate': lr,
                                       'linear/eval_top1': metrics['top1'],
                                       'linear/eval_top5': metrics['top5']})
  bar.close()
  metrics.update({'train_loss': train_loss, 'train_top1': train_top1,
                  'protocol': 'linear probe (released protocol: RandomResizedCrop + flip, '
                              'frozen backbone, BatchNorm in eval mode)',
                  'epochs': epochs, 'batch_size': batch_size, 'learning_rate': learning_rate,
                  'num_train': int(len(train_source))})
  return metrics, jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), classifier)

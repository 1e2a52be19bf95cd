"""Semi-supervised fine-tuning: the whole student plus a new classifier on 1% / 10% of labels.

Paper section 4 (Table 5): the student is fine-tuned for 60 epochs with SGD on the SimCLR 1% /
10% ImageNet splits, "the learning rate of the last randomly initialized fc layer is set as
10". The backbone's learning rate is not published; here it is a config value
(``eval.finetune_lr``, at batch 256) and the classifier runs at ``eval.finetune_classifier_lr_
multiplier`` (10) times it, through ``optax.multi_transform`` so that the two groups are
visible on the optimizer. BatchNorm trains (batch statistics, running statistics updated, in
the student's statistics groups); views are RandomResizedCrop + flip; the schedule is cosine,
set once per epoch. Top-1/top-5 are measured on the centre-cropped evaluation split.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh
from tqdm.auto import tqdm

from bingo_jax.data import images as images_lib
from bingo_jax.data import parallel
from bingo_jax.eval import linear, pipeline
from bingo_jax.models import create_model

BACKBONE, CLASSIFIER = 'backbone', 'classifier'


def param_groups(params: dict) -> dict:
  """The optimizer group of every parameter: the ``head`` subtree is the new classifier."""
  return {name: jax.tree.map(lambda _: CLASSIFIER if name == 'head' else BACKBONE, subtree)
          for name, subtree in params.items()}


def epoch_cosine_schedule(base_lr: float, epochs: int, steps_per_epoch: int,
                          min_lr: float = 0.0) -> optax.Schedule:
  """``step -> cosine_epoch_lr(base_lr, step // steps_per_epoch, epochs, min_lr)``."""
  def schedule(step):
    epoch = jnp.asarray(step) // steps_per_epoch
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
  return schedule


def make_finetune_optimizer(backbone_lr: optax.ScalarOrSchedule, *,
                            classifier_lr_multiplier: float = 10.0, momentum: float = 0.9,
                            weight_decay: float = 0.0) -> optax.GradientTransformation:
  """SGD (torch style) with two groups: backbone at ``backbone_lr``, classifier at
  ``classifier_lr_multiplier x backbone_lr``.

  Args:
    backbone_lr: learning rate or schedule of the backbone.
    classifier_lr_multiplier: the classifier's factor (10 in the paper's protocol).
    momentum: SGD momentum.
    weight_decay: added to the gradient of every parameter before momentum.
  Returns:
    An optax transformation over ``{'backbone': ..., 'head': ...}`` parameters.
  """
  if callable(backbone_lr):
    classifier_lr = lambda step: classifier_lr_multiplier * backbone_lr(step)  # noqa: E731
  else:
    classifier_lr = classifier_lr_multiplier * backbone_lr

  def sgd(lr):
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(lr, momentum=momentum))
  return optax.multi_transform({BACKBONE: sgd(backbone_lr), CLASSIFIER: sgd(classifier_lr)},
                               param_groups)


def finetune_model(loaded_model: Any, num_classes: int, seed: int = 0) -> tuple[Any, dict]:
  """The student's backbone with a new ``linear`` head of ``num_classes`` outputs.

  Returns:
    ``(model, variables)``: the backbone variables copied from ``loaded_model``, the head
    ``fc`` initialised N(0, 0.01) / zero (as the linear protocol).
  """
  model_config = dict(loaded_model.model_config)
  model_config.update(head='linear', num_classes=num_classes)
  model = create_model(**model_config)
  classifier = linear.init_classifier(model.feature_dim, num_classes, seed)
  variables = {'params': {'backbone': loaded_model.variables['params']['backbone'],
                          'head': {'fc': classifier}},
               'batch_stats': {'backbone': loaded_model.variables['batch_stats']['backbone']}}
  return model, variables


def make_finetune_step(model, optimizer: optax.GradientTransformation, mesh: Mesh):
  """Jitted ``(params, batch_stats, opt_state, batch) -> (params, batch_stats, opt_state,
  metrics)``: one SGD step of the whole network, BatchNorm in training mode."""
  def step(params, batch_stats, opt_state, batch):
    def loss_fn(p):
      (_, logits), updated = model.apply({'params': p, 'batch_stats': batch_stats},
                                         images_lib.normalize(batch['image']), train=True,
                                         mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
      return loss, (logits, updated['batch_stats'])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    top1 = jnp.mean(jnp.argmax(logits, -1) == batch['label']) * 100
    return optax.apply_updates(params, updates), batch_stats, opt_state, {'loss': loss,
                                                                          'top1': top1}

  replicated = parallel.replicated(mesh)
  return jax.jit(step, donate_argnums=(0, 1, 2),
                 in_shardings=(replicated, replicated, replicated, parallel.data_sharding(mesh)),
                 out_shardings=(replicated, replicated, replicated, replicated))


def _evaluate_finetuned(loaded_model: Any, model: Any, params: Any, batch_stats: Any,
                        eval_source: Any, *, num_classes: int, image_size: int,
                        batch_size: int, mesh: Mesh, progress: bool,
                        extract_features) -> tuple[dict, Any]:
  """Top-1/top-5 of the fine-tuned network on ``eval_source``, and the network itself.

  The backbone embeds the centre-cropped evaluation images (``extract_features``) and the
  fine-tuned classifier ``params['head']['fc']`` scores them.

  Returns:
    ``(metrics, finetuned)``: ``{'top1', 'top5'}`` (percent) and a ``LoadedModel`` of the
    fine-tuned network with its ``linear`` head, on the host.
  """
  from bingo_jax.store import model_io
  host = lambda tree: jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)  # noqa
  params, batch_stats = host(params), host(batch_stats)
  backbone_config = dict(loaded_model.model_config, head=None)
  backbone = model_io.LoadedModel(
      model=create_model(**backbone_config),
      variables={'params': {'backbone': params['backbone']},
                 'batch_stats': {'backbone': batch_stats['backbone']}},
      model_config=backbone_config,
      metadata=dict(loaded_model.metadata, finetuned=True))
  eval_features = extract_features(backbone, eval_source, image_size=image_size,
                                   global_batch_size=batch_size, mesh=mesh,
                                   normalize_features=False, progress=progress)
  metrics = linear.evaluate_classifier(params['head']['fc'], eval_features,
                                       eval_source.labels, mesh)
  finetuned_config = dict(loaded_model.model_config, head='linear', num_classes=num_classes)
  finetuned = model_io.LoadedModel(model=model,
                                   variables={'params': params, 'batch_stats': batch_stats},
                                   model_config=finetuned_config,
                                   metadata=dict(loaded_model.metadata, finetuned=True))
  return metrics, finetuned


def _train_epochs(step_fn: Callable, params: Any, batch_stats: Any, opt_state: Any,
                  train_source: Any, subset_indices: np.ndarray, subset_labels: np.ndarray, *,
                  mesh: Mesh, image_size: int, batch_size: int, epochs: int,
                  steps_per_epoch: int, lr_at: Callable[[int], float],
                  classifier_lr_multiplier: float, seed: int, writer: Any, progress: bool
                  ) -> tuple[Any, Any, float, float]:
  """The fine-tuning epochs: ``step_fn`` over the labelled subset's batches.

  Returns:
    ``(params, batch_stats, train_loss, train_top1)``: the trained variables (replicated) and
    the last epoch's mean loss and top-1 (percent).
  """
  bar = tqdm(total=epochs * steps_per_epoch, desc='finetune', unit='step',
             disable=not progress or jax.process_index() != 0)

  def step(local_batch: dict) -> dict:
    nonlocal params, batch_stats, opt_state
    params, batch_stats, opt_state, step_metrics = step_fn(
        params, batch_stats, opt_state, parallel.global_batch(local_batch, mesh))
    return step_metrics

  for epoch in range(epochs):
    train_loss, train_top1 = pipeline.run_epoch(pipeline.labelled_batches(
        train_source, subset_indices, subset_labels, image_size=image_size,
        global_batch_size=batch_size, seed=seed, epoch=epoch,
        process_index=jax.process_index(), process_count=jax.process_count()), step, bar)
    lr = lr_at(epoch)
    bar.set_postfix(loss=f'{train_loss:.3f}', top1=f'{train_top1:.1f}')
    if writer is not None:
      writer.write_scalars(epoch + 1, {'finetune/train_loss': train_loss,
                                       'finetune/train_top1': train_top1,
                                       'finetune/backbone_lr': lr,
                                       'finetune/classifier_lr': lr * classifier_lr_multiplier})
  bar.close()
  if not np.isfinite(train_loss):
    logging.warning('finetune: the training loss is %s after %d epochs: the learning rates '
                    '(backbone %g, classifier %g at batch %d) are too high for this network; '
                    'lower config.eval.finetune_lr.', train_loss, epochs, lr_at(0),
                    lr_at(0) * classifier_lr_multiplier, batch_size)
  return params, batch_stats, train_loss, train_top1


def finetune(loaded_model: Any, train_source: Any, subset_indices: np.ndarray,
             eval_source: Any, *, num_classes: int, image_size: int, epochs: int = 60,
             batch_size: int = 256, base_lr: float = 1.0,
             classifier_lr_multiplier: float = 10.0, min_lr: float = 0.0,
             momentum: float = 0.9, weight_decay: float = 0.0, mesh: Optional[Mesh] = None,
             seed: int = 0, writer: Any = None, progress: bool = True,
             extract_features=None) -> tuple[dict, Any]:
  """Fine-tunes the whole student on a labelled subset and evaluates it.

  Args:
    loaded_model: ``model_io.LoadedModel`` of the student (not modified).
    train_source: labelled ``ImageSource`` of the training split.
    subset_indices: ``(n,)`` indices of the labelled subset (``subsets.finetune_subset``).
    eval_source: labelled ``ImageSource`` of the evaluation split.
    num_classes: classes.
    image_size: crop side.
    epochs: passes over the subset.
    batch_size: global batch; learning rates scale with ``batch_size / 256``.
    base_lr: backbone learning rate at batch 256.
    classifier_lr_multiplier: classifier lr / backbone lr.
    min_lr: end of the cosine (backbone; the classifier's is ``multiplier x`` it).
    momentum, weight_decay: SGD.
    mesh: device mesh (default all devices).
    seed: classifier initialisation, order and views.
    writer: optional ``progress.MetricWriter``.
    progress: progress bar.
    extract_features: the feature pass (default ``bingo_jax.bags.features.extract_features``).
  Returns:
    ``(metrics, loaded)``: top-1/top-5 (percent) on the evaluation split and the settings;
    ``loaded`` is a ``LoadedModel`` of the fine-tuned network (``linear`` head).
  """
  if extract_features is None:
    from bingo_jax.bags.features import extract_features
  mesh = mesh or parallel.make_mesh()
  labels = train_source.labels
  if labels is None:
    raise ValueError(f'{train_source.description} has no labels: fine-tuning needs them.')
  parallel.local_batch_size(batch_size, mesh)
  subset_indices = np.asarray(subset_indices, np.int64)
  subset_labels = np.asarray(labels)[subset_indices]
  steps_per_epoch = len(subset_indices) // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'the labelled subset has {len(subset_indices)} images, fewer than one '
                     f'batch of {batch_size} (config.eval.batch_size).')
  scale = batch_size / 256
  optimizer = make_finetune_optimizer(
      epoch_cosine_schedule(base_lr * scale, epochs, steps_per_epoch, min_lr * scale),
      classifier_lr_multiplier=classifier_lr_multiplier, momentum=momentum,
      weight_decay=weight_decay)
  model, variables = finetune_model(loaded_model, num_classes, seed)
  # device_put copies: the loaded model's own buffers are never donated.
  replicated = parallel.replicated(mesh)
  params, batch_stats = (
      jax.tree.map(lambda x: jax.device_put(jnp.array(x, copy=True), replicated), variables[name])
      for name in ('params', 'batch_stats'))
  opt_state = jax.device_put(optimizer.init(params), replicated)
  step_fn = make_finetune_step(model, optimizer, mesh)
  params, batch_stats, train_loss, train_top1 = _train_epochs(
      step_fn, params, batch_stats, opt_state, train_source, subset_indices, subset_labels,
      mesh=mesh, image_size=image_size, batch_size=batch_size, epochs=epochs,
      steps_per_epoch=steps_per_epoch, lr_at=lambda epoch: float(linear.cosine_epoch_lr(
          base_lr * scale, epoch, epochs, min_lr * scale)),
      classifier_lr_multiplier=classifier_lr_multiplier, seed=seed, writer=writer,
      progress=progress)
  metrics, finetuned = _evaluate_finetuned(
      loaded_model, model, params, batch_stats, eval_source, num_classes=num_classes,
      image_size=image_size, batch_size=batch_size, mesh=mesh, progress=progress,
      extract_features=extract_features)
  if writer is not None:
    writer.write_scalars(epochs, {'finetune/eval_top1': metrics['top1'],
                                  'finetune/eval_top5': metrics['top5']})
  metrics.update({'protocol': 'semi-supervised fine-tuning (whole network, new classifier at '
                              f'{classifier_lr_multiplier:g}x the backbone lr)',
                  'train_loss': train_loss, 'train_top1': train_top1,
                  'num_labelled': int(len(subset_indices)), 'epochs': epochs,
                  'batch_size': batch_size, 'backbone_lr': base_lr * scale,
                  'classifier_lr': base_lr * scale * classifier_lr_multiplier})
  return metrics, finetuned

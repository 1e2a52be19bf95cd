"""Labelled training batches for the linear and fine-tuning protocols.

The released linear protocol (main_lincls.py) trains on ``RandomResizedCrop(224)`` (torchvision
defaults: scale (0.08, 1), ratio (3/4, 4/3)) + ``RandomHorizontalFlip``; semi-supervised
fine-tuning uses the same views. Views are stateless functions of ``(image, seed)``
(``bingo_jax.data.augment.sample_crop_window``), the epoch order a function of ``(seed, epoch)``,
so every process derives the same global batches and reads only its own slice of each.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np

from bingo_jax.data import augment

CLASSIFICATION_CROP_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop default


def classification_view(image, seed, image_size: int, *, encoded: bool):
  """RandomResizedCrop(image_size, scale=(0.08, 1)) + horizontal flip (p = 0.5), as TF ops.

  Args:
    image: encoded bytes (scalar tf.string) or uint8 ``(H, W, 3)`` tensor.
    seed: ``(2,)`` int tensor.
    image_size: output side.
    encoded: which kind ``image`` is.
  Returns:
    uint8 ``(image_size, image_size, 3)``.
  """
  import tensorflow as tf
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  if encoded:
    image = tf.io.decode_image(image, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
  shape = tf.shape(image)
  window = augment.sample_crop_window(crop_seed, shape[0], shape[1],
                                      scale=CLASSIFICATION_CROP_SCALE)
  crop = augment.crop_to_window(image, window)
  view = tf.image.resize(tf.cast(crop, tf.float32), [image_size, image_size],
                         method='bilinear', antialias=True)
  view = tf.round(tf.clip_by_value(view, 0.0, 255.0))
  view = tf.cond(tf.random.stateless_uniform([], flip_seed) < 0.5,
                 lambda: tf.reverse(view, axis=[1]), lambda: view)
  return tf.cast(tf.ensure_shape(view, [image_size, image_size, 3]), tf.uint8)


def epoch_order(num_examples: int, global_batch_size: int, seed: int, epoch: int) -> np.ndarray:
  """The global batches of one epoch: ``(steps, global_batch_size)`` positions in
  ``[0, num_examples)``, a fresh permutation per epoch, the incomplete last batch dropped."""
  steps = num_examples // global_batch_size
  if steps == 0:
    raise ValueError(f'{num_examples} training examples are fewer than one global batch of '
                     f'{global_batch_size} (config.eval.batch_size).')
  permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return permutation[:steps * global_batch_size].reshape(steps, global_batch_size)


def labelled_batches(source, indices: np.ndarray, labels: np.ndarray, *, image_size: int,
                     global_batch_size: int, seed: int, epoch: int, process_index: int = 0,
                     process_count: int = 1) -> Iterator[dict]:
  """This process's slices of one epoch of augmented labelled batches.

  Args:
    source: an ``ImageSource`` (``tf_read_batch``, ``encoded``).
    indices: ``(n,)`` source indices of the training examples (all or a labelled subset).
    labels: ``(n,)`` their labels.
    image_size: crop side.
    global_batch_size: examples per step over all processes.
    seed, epoch: fix the order and the views.
    process_index, process_count: this process's slice of each global batch.
  Yields:
    ``{'image': uint8 (local, S, S, 3), 'label': int32 (local,)}`` numpy batches,
    ``len(indices) // global_batch_size`` of them.
  """
  from bingo_jax import input_pipeline  # tf.data: imported by the image protocols only
  if global_batch_size % process_count:
    raise ValueError(f'global batch {global_batch_size} does not divide over '
                     f'{process_count} processes.')
  local = global_batch_size // process_count
  order = epoch_order(len(indices), global_batch_size, seed, epoch)
  mine = order[:, process_index * local:(process_index + 1) * local].reshape(-1)
  source_indices = np.asarray(indices, np.int64)[mine]
  example_labels = np.asarray(labels, np.int32)[mine]
  # One stateless seed per (run seed, epoch, example position): views never repeat.
  seeds = np.stack([np.full(len(mine), seed * 100003 + epoch, np.int64),
                    np.asarray(mine, np.int64)], axis=1)
  encoded = bool(getattr(source, 'encoded', True))

  def view(example):
    return {'image': classification_view(example['image'], example['seed'], image_size,
                                         encoded=encoded),
            'label': example['label']}

  yield from input_pipeline.source_batches(
      source, {'index': source_indices, 'label': example_labels, 'seed': seeds}, view, local,
      read_size=64)


def run_epoch(batches: Iterable[dict], step: Callable[[dict], dict],
              bar: Any) -> tuple[float, float]:
  """Runs ``step`` on every batch of an epoch; the epoch's mean loss and top-1.

  Args:
    batches: this process's numpy batches (``labelled_batches``).
    step: local batch -> metrics (``loss``, ``top1`` device scalars); it holds the training
      state and updates it.
    bar: a tqdm bar, advanced by one per finished step.
  Returns:
    ``(mean loss, mean top-1 in percent)`` over the epoch's steps.
  """
  metrics = []
  for batch in batches:
    step_metrics = step(batch)
    if metrics:
      # At most two steps in flight: the host must not queue a whole epoch of batches on
      # the devices, and the progress bar's ETA then measures finished steps.
      jax.block_until_ready(metrics[-1])
      bar.update(1)
    metrics.append(step_metrics)
  bar.update(1)
  return (float(np.mean([float(m['loss']) for m in metrics])),
          float(np.mean([float(m['top1']) for m in metrics])))

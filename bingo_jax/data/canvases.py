"""The host side of ``config.data.augment_on = 'device'``: images shipped as canvases.

``input_pipeline.create_train_iterator(..., output='canvases')`` reads the same anchors,
positives and seeds as the host views (docs/data.md); instead of augmenting, it decodes each
anchor and positive once into the top-left of a fixed canvas (``decode_to_canvas``) and ships
it with its true size and every view's seed as JAX key data (``seeds_to_keys``). The jitted
step draws the views from the canvases (bingo_jax/run/device_data.py, device_augment.py).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

from bingo_jax.data import lazy_modules
from bingo_jax.data import views as views_lib
from bingo_jax.data.sources import ImageSource

tf = lazy_modules.ImportedOnUse('tensorflow')

# JPEG DCT-domain down-scaling factors libjpeg offers (tf.io.decode_jpeg's ``ratio``).
DCT_RATIOS = (1, 2, 4, 8)


def decode_to_canvas(encoded, canvas_size: int):
  """Encoded image -> ``(canvas, sizes)``: decoded once, in the top-left of a fixed canvas.

  JPEGs are decoded at the smallest DCT-domain scale 1/r (r in 1, 2, 4, 8) whose output fits
  the canvas, which costs less than a full decode; an image still larger than the canvas (a
  PNG, or a JPEG over 8 canvas sides) is resized to fit on the host (antialiased bilinear,
  aspect kept). Nothing is resized when the image fits: ``canvas_size`` >= the longer side.

  Args:
    encoded: scalar tf.string.
    canvas_size: C.
  Returns:
    ``canvas`` uint8 ``(C, C, 3)`` (zeros outside the image) and ``sizes`` int32 ``(4,)``
    ``[valid_height, valid_width, original_height, original_width]``: crop windows are drawn
    on the original size and mapped to the canvas on the device (device_augment.py).
  """
  def fitting_ratio(height, width):
    fits = tf.stack([((height + r - 1) // r <= canvas_size) & ((width + r - 1) // r <= canvas_size)
                     for r in DCT_RATIOS])
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    return tf.where(tf.reduce_any(fits), first, len(DCT_RATIOS) - 1)

  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    # INTEGER_ACCURATE: libjpeg's islow IDCT, as PIL (the released pipeline) decodes.
    branches = [functools.partial(tf.io.decode_jpeg, encoded, channels=3, ratio=r,
                                  dct_method='INTEGER_ACCURATE')
                for r in DCT_RATIOS]
    return tf.switch_case(fitting_ratio(shape[0], shape[1]), branches), shape[0], shape[1]

  def generic():
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return image, tf.shape(image)[0], tf.shape(image)[1]

  image, height, width = tf.cond(tf.io.is_jpeg(encoded), jpeg, generic)
  image.set_shape([None, None, 3])

  def shrink():
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    new = tf.maximum(tf.cast(tf.floor(shape * canvas_size / tf.reduce_max(shape)), tf.int32), 1)
    resized = tf.image.resize(image, new, method='bilinear', antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

  too_large = tf.reduce_any(tf.shape(image)[:2] > canvas_size)
  image = tf.cond(too_large, shrink, lambda: image)
  valid = tf.shape(image)[:2]
  # Two concatenations with zeros: tf.pad costs about twice as much CPU on uint8 images.
  canvas = tf.concat([image, tf.zeros([valid[0], canvas_size - valid[1], 3], tf.uint8)], 1)
  canvas = tf.concat([canvas, tf.zeros([canvas_size - valid[0], canvas_size, 3], tf.uint8)], 0)
  canvas = tf.ensure_shape(canvas, [canvas_size, canvas_size, 3])
  return canvas, tf.cast(tf.stack([valid[0], valid[1], height, width]), tf.int32)


def seeds_to_keys(seeds):
  """TF stateless seeds (int64 ``(..., 2)``) -> JAX raw PRNG key data (uint32 ``(..., 2)``).

  A fixed mix of the four 32-bit words, so the device views are still a function of the
  seeds, hence of ``(train.seed, epoch, position)``.
  """
  words = tf.bitcast(tf.cast(seeds, tf.int64), tf.uint32)  # (..., 2, 2): [low, high] words
  return tf.bitwise.bitwise_xor(words[..., 0], tf.reverse(words[..., 1], axis=[-1]))


def canvas_size_of(config, source: ImageSource) -> tuple[int, int]:
  """The canvas of a source: its own image shape when fixed, else ``data.canvas_size``."""
  if not source.encoded and source.image_shape is not None:
    return int(source.image_shape[0]), int(source.image_shape[1])
  side = int(config.data.get('canvas_size', 512))
  if side <= 0:
    raise ValueError(f'config.data.canvas_size = {side} must be positive.')
  return side, side


def canvas_batches(dataset, config, source: ImageSource, views: tuple[str, ...],
                   view_seed_slots: list[int], local_batch_size: int, parallel: int,
                   read_images: Optional[Callable] = None):
  """Batches of examples -> batches of canvases (``create_train_iterator(output='canvases')``).

  Args:
    dataset: a tf.data dataset of batches of B examples: ``anchor_index``, ``positive_index``
      int64 ``(B,)``, ``seeds`` int64 ``(B, 5, 2)`` (``input_pipeline.example_seeds``).
    config: the experiment config (``data.canvas_size``).
    source: the training images.
    views: the views the step draws (``views.VIEW_KEYS`` names).
    view_seed_slots: each view's slot in ``seeds``.
    local_batch_size: B.
    parallel: read and decode parallelism (tf.data.AUTOTUNE or a count).
    read_images: ``indices -> images`` (default ``source.tf_read_batch``).
  Returns:
    A dataset of batches as ``create_train_iterator`` documents for ``'canvases'``.
  """
  with_positive = views_lib.needs_bags(views)
  images_per_example = 2 if with_positive else 1
  canvas_height, canvas_width = canvas_size_of(config, source)

  @tf.autograph.experimental.do_not_convert
  def read(batch):
    indices = [batch['anchor_index']] + ([batch['positive_index']] if with_positive else [])
    images = [(read_images or source.tf_read_batch)(index) for index in indices]
    seeds = tf.stack([batch['seeds'][:, slot] for slot in view_seed_slots], axis=1)
    out = {'anchor_index': tf.cast(batch['anchor_index'], tf.int32),
           'positive_index': tf.cast(batch['positive_index'], tf.int32),
           'view_keys': seeds_to_keys(seeds)}
    if source.encoded:
      for name, image in zip(('anchor', 'positive'), images):
        out[f'{name}_encoded'] = image
    else:
      # Fixed-shape images are their own canvas: no per-image work at all.
      sizes = tf.constant([canvas_height, canvas_width, canvas_height, canvas_width], tf.int32)
      for name, image in zip(('anchor', 'positive'), images):
        out[f'{name}_canvas'] = image
        out[f'{name}_size'] = tf.tile(sizes[None], [local_batch_size, 1])
    return out

  dataset = dataset.map(read, num_parallel_calls=parallel)
  if not source.encoded:
    return dataset

  @tf.autograph.experimental.do_not_convert
  def decode(encoded):
    return decode_to_canvas(encoded, canvas_height)

  @tf.autograph.experimental.do_not_convert
  def decode_all(batch):
    # One map per image role: each writes its canvases straight into their batch (a single
    # example-major map would need a strided copy per role afterwards).
    for name in ('anchor', 'positive')[:images_per_example]:
      batch[f'{name}_canvas'], batch[f'{name}_size'] = tf.map_fn(
          decode, batch.pop(f'{name}_encoded'), fn_output_signature=(
              tf.TensorSpec([canvas_height, canvas_width, 3], tf.uint8),
              tf.TensorSpec([4], tf.int32)),
          parallel_iterations=1)
    return batch

  return dataset.map(decode_all, num_parallel_calls=parallel)

"""tf.data input pipelines: BINGO training batches (4 views of (anchor, positive) pairs) and
deterministic, padded evaluation batches.

Training (docs/method.md §2). Epoch ``e`` visits the images in a permutation that is a pure
function of ``(seed, e)``; the first ``steps_per_epoch * global_batch`` positions are used
(the remainder dropped, as ``DistributedSampler`` + ``drop_last``). Global step ``t`` of the
epoch takes positions ``[t * G, (t + 1) * G)`` and process ``p`` the slice
``[p * B, (p + 1) * B)`` of it (``B = G / process_count``), so the global batch does not depend
on the number of processes. The example at position ``q`` of epoch ``e`` gets the seed
``fold_in(fold_in(seed, e), q)``, from which its positive (a uniform draw from the anchor's bag,
fresh each epoch) and its four augmentation draws are derived. Everything is thus a function of
``(seed, global step)``: resuming at step ``s`` computes the epoch and the offset by arithmetic
and yields exactly the batches a straight run yields from step ``s`` on.

Throughput: indices, positives and seeds are TF ops; images are read a batch at a time through
the source's ``tf_read_batch`` (file reads, array_record reads or an in-memory gather) and
augmented in a parallel, order-preserving map; no Python runs per example.
"""

# size: holds both the host (tf.data) views and the canvas path of the device mode; the canvas
# path is to move next to device_data (open follow-up of issue 11).

from __future__ import annotations

import functools
import importlib
from typing import Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from bingo_jax import bad_images
from bingo_jax import views as views_lib
from bingo_jax.data_sources import ImageSource


class _ImportedOnUse:
  """A module imported at its first attribute access.

  The on-device data path (bingo_jax/device_data.py) trains without TensorFlow, yet
  ``bingo_jax.train`` imports this module for ``steps_per_epoch``; TF (and ``augment``, which
  needs it) load only when a tf.data pipeline is built.
  """

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attribute: str):
    return getattr(importlib.import_module(self._name), attribute)


tf = _ImportedOnUse('tensorflow')
augment = _ImportedOnUse('bingo_jax.augment')

# Independent RNG streams derived from the run seed.
_PERMUTATION_STREAM = 1
_EXAMPLE_STREAM = 2
# Per-example seeds: the positive draw, then one per view in views.VIEW_KEYS order.
_POSITIVE, _FIRST_VIEW = 0, 1
OUTPUTS = ('views', 'canvases')
# JPEG DCT-domain down-scaling factors libjpeg offers (tf.io.decode_jpeg's ``ratio``).
DCT_RATIOS = (1, 2, 4, 8)


def steps_per_epoch(num_images: int, global_batch_size: int) -> int:
  """Full global batches per epoch (the remainder of the permutation is dropped)."""
  if global_batch_size <= 0:
    raise ValueError(f'global batch size must be positive, got {global_batch_size}.')
  steps = num_images // global_batch_size
  if steps == 0:
    raise ValueError(f'{num_images} training images do not fill one global batch of '
                     f'{global_batch_size} (config.train.batch_size).')
  return steps


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # parallel maps still yield in order
  options.autotune.enabled = True
  options.experimental_optimization.map_parallelization = True
  options.experimental_optimization.inject_prefetch = True
  # Parallelism comes from the maps; one thread per op avoids oversubscribing the host.
  options.threading.max_intra_op_parallelism = 1
  return options


def _parallelism(value: Optional[int]) -> int:
  return tf.data.AUTOTUNE if value is None or value < 0 else int(value)


# ---------------------------------------------------------------- evaluation


def eval_num_batches(num_images: int, local_batch_size: int, process_count: int) -> int:
  """Batches every process yields in ``make_eval_dataset`` (the same on every process)."""
  per_process = -(-num_images // process_count)
  return max(1, -(-per_process // local_batch_size))


def source_batches(source: ImageSource, columns: dict, view: Callable[[dict], dict],
                   batch_size: int, *, read_size: Optional[int] = None,
                   with_labels: bool = False, padding_index: int = 0,
                   num_parallel_calls: int = -1,
                   options: Optional[tf.data.Options] = None) -> Iterator[dict]:
  """Batches of one view of listed images: the one reader of every evaluation pipeline.

  Images (and, with ``with_labels``, labels) are read ``read_size`` indices per
  ``tf_read_batch`` call, ``view`` maps every example in a parallel, order-preserving map,
  and the examples are regrouped into batches of ``batch_size`` (the remainder dropped).

  Args:
    source: the images.
    columns: per-example numpy columns of one length n; ``columns['index']`` int ``(n,)`` are
      source indices, ``-1`` on padding rows (which read image ``padding_index`` and get
      label -1).
    view: example dict (``image``: encoded bytes or uint8 ``(H, W, 3)``, ``label`` if read,
      the columns) -> output dict, as TF ops.
    batch_size: examples per output batch.
    read_size: indices per read (default ``batch_size``).
    with_labels: read ``label`` (int64) with the images (``tf_read_labeled_batch``).
    padding_index: a valid source index, read for the padding rows (``make_eval_dataset``
      uses the range's first, so that no image outside the range is read).
    num_parallel_calls: read and view parallelism (-1: autotune).
    options: ``tf.data.Options`` (default: tf.data's).
  Returns:
    An iterator of numpy dicts, ``len(columns['index']) // batch_size`` of them.
  """
  parallel = _parallelism(num_parallel_calls)
  policy = bad_images.policy_of(source)
  columns = {key: np.asarray(value) for key, value in columns.items()}

  def build(first_batch: int, table: Optional[np.ndarray]) -> Iterator[dict]:
    # table: config.data.on_bad_image='skip' reads bad image i as table[i] (bad_images.py).
    table_t = None if table is None else tf.constant(table, tf.int64)

    @tf.autograph.experimental.do_not_convert
    def read(batch):
      index = tf.cast(batch['index'], tf.int64)
      read_index = tf.where(index >= 0, index, tf.constant(padding_index, tf.int64))
      if table_t is not None:
        read_index = tf.gather(table_t, read_index)
      if with_labels:
        batch['image'], labels = source.tf_read_labeled_batch(read_index)
        batch['label'] = tf.cast(tf.where(index >= 0, labels, -1), tf.int64)
      else:
        batch['image'] = source.tf_read_batch(read_index)
      return batch

    rest = {key: value[first_batch * batch_size:] for key, value in columns.items()}
    dataset = tf.data.Dataset.from_tensor_slices(rest).batch(read_size or batch_size)
    dataset = dataset.map(read, num_parallel_calls=parallel).unbatch()
    dataset = dataset.map(tf.autograph.experimental.do_not_convert(view),
                          num_parallel_calls=parallel, deterministic=True)
    dataset = dataset.batch(batch_size, drop_remainder=True).prefetch(2)
    if options is not None:
      dataset = dataset.with_options(options)
    return dataset.as_numpy_iterator()

  def batch_indices(k: int) -> np.ndarray:
    index = columns['index'][k * batch_size:(k + 2) * batch_size]
    return np.where(index >= 0, index, padding_index)

  return bad_images.guarded_batches(build, batch_indices, source, policy)


def make_eval_dataset(source: ImageSource, image_size: int, local_batch_size: int, *,
                      start: int = 0, stop: Optional[int] = None,
                      process_index: Optional[int] = None,
                      process_count: Optional[int] = None,
                      num_parallel_calls: int = -1) -> Iterator[dict]:
  """Centre-cropped images ``[start, stop)`` of a source in index order, padded to full batches.

  Process ``p`` reads the contiguous slice ``[start + p * ceil(N / P), start + (p + 1) *
  ceil(N / P))`` of the indices (``N = stop - start``); every process yields
  ``eval_num_batches(N, B, P)`` batches, the padding rows masked.

  Args:
    source: the images.
    image_size: output side S (resize shorter side to ``S / CENTER_CROP_FRACTION``, centre
      crop S: ``augment.center_crop``).
    local_batch_size: B, this process's rows per batch.
    start, stop: the range of source indices (default: all of them).
    process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
    num_parallel_calls: decode/resize parallelism (-1: autotune).
  Returns:
    An iterator of numpy dicts: ``image`` uint8 ``(B, S, S, 3)``, ``index`` int32 ``(B,)``
    source indices (-1 on padding rows), ``label`` int32 ``(B,)`` (-1 when unlabelled or
    padding), ``mask`` bool ``(B,)``.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count}).')
  if local_batch_size <= 0:
    raise ValueError(f'local_batch_size must be positive, got {local_batch_size}.')
  stop = len(source) if stop is None else stop
  if not 0 <= start < stop <= len(source):
    raise ValueError(f'{source.description}: image range [{start}:{stop}] is empty or outside '
                     f'its {len(source)} images.')
  per_process = -(-(stop - start) // process_count)
  num_batches = eval_num_batches(stop - start, local_batch_size, process_count)
  first = min(start + process_index * per_process, stop)
  last = min(first + per_process, stop)
  indices = np.full(num_batches * local_batch_size, -1, np.int64)
  indices[:last - first] = np.arange(first, last)

  def crop(example):
    return {'image': augment.eval_view(example['image'], image_size, encoded=source.encoded),
            'index': tf.cast(example['index'], tf.int32),
            'label': tf.cast(example['label'], tf.int32),
            'mask': example['index'] >= 0}

  return source_batches(source, {'index': indices}, crop, local_batch_size, with_labels=True,
                        padding_index=start, num_parallel_calls=num_parallel_calls,
                        options=_options())


# ---------------------------------------------------------------- training


def _stream_seed(seed: int, stream: int) -> tf.Tensor:
  return tf.constant([seed, stream], tf.int64)


def epoch_permutation(seed: int, epoch, num_images: int) -> tf.Tensor:
  """The visiting order of epoch ``epoch``: int64 ``(num_images,)``, a function of (seed, epoch)."""
  epoch_seed = tf.random.experimental.stateless_fold_in(
      _stream_seed(seed, _PERMUTATION_STREAM), tf.cast(epoch, tf.int64))
  return tf.random.experimental.stateless_shuffle(
      tf.range(num_images, dtype=tf.int64), epoch_seed)


def example_seeds(seed: int, epoch, position) -> tf.Tensor:
  """Seeds of the example at ``position`` (scalar) of ``epoch``: int64 ``(5, 2)``
  (positive draw, query, key, pos_q, pos_k)."""
  epoch_seed = tf.random.experimental.stateless_fold_in(
      _stream_seed(seed, _EXAMPLE_STREAM), tf.cast(epoch, tf.int64))
  example_seed = tf.random.experimental.stateless_fold_in(epoch_seed,
                                                          tf.cast(position, tf.int64))
  return tf.random.experimental.stateless_split(example_seed,
                                                 num=_FIRST_VIEW + len(views_lib.VIEW_KEYS))


def anchor_stream(seed: int, num_images: int, global_batch_size: int, start_step: int,
                  process_index: int, process_count: int) -> tf.data.Dataset:
  """This process's anchors from global step ``start_step`` on, endlessly.

  Returns:
    A dataset of ``{'anchor_index', 'epoch', 'position'}`` int64 scalars, B per step
    (``position``: the anchor's place in the epoch's permutation).
  """
  if global_batch_size % process_count:
    raise ValueError(f'global batch size {global_batch_size} is not divisible by '
                     f'{process_count} processes.')
  steps = steps_per_epoch(num_images, global_batch_size)
  local_batch = global_batch_size // process_count
  start_epoch, start_offset = divmod(int(start_step), steps)

  def epoch_elements(epoch):
    permutation = epoch_permutation(seed, epoch, num_images)
    # Positions in the epoch's permutation: [step, process, row] -> this process's column.
    positions = tf.reshape(tf.range(steps * global_batch_size, dtype=tf.int64),
                           [steps, process_count, local_batch])[:, process_index]
    first = tf.where(epoch == start_epoch, tf.constant(start_offset, tf.int64), 0)
    positions = tf.reshape(positions[first:], [-1])
    return tf.data.Dataset.from_tensor_slices({
        'anchor_index': tf.gather(permutation, positions),
        'epoch': tf.fill(tf.shape(positions), tf.cast(epoch, tf.int64)),
        'position': positions})

  epochs = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
  return epochs.flat_map(epoch_elements)


def _checked_views(views: Sequence[str], source: ImageSource, bags) -> tuple[str, ...]:
  """``views`` as a tuple, refused unless distinct known names, with bags where they need them
  and bags that belong to ``source``."""
  views = tuple(views)
  unknown = [view for view in views if view not in views_lib.VIEW_KEYS]
  if unknown or not views or len(set(views)) != len(views):
    raise ValueError(f'views = {views}: expected distinct names from {views_lib.VIEW_KEYS}.')
  if bags is None:
    if views_lib.needs_bags(views):
      raise ValueError(f'views = {views} include views of the positive, which need bags.')
  else:
    bags.check_matches(len(source), source.fingerprint, f'training data {source.description}')
  return views


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


# size: one reader for both output modes and the bad-image guard; to be split with the module.
def create_train_iterator(config, source: ImageSource, bags, *, start_step: int,
                          local_batch_size: int, process_index: Optional[int] = None,
                          process_count: Optional[int] = None,
                          views: Sequence[str] = views_lib.VIEW_KEYS,
                          output: str = 'views') -> Iterator[dict]:
  """Per-process BINGO training batches from global step ``start_step`` on (endless).

  ``output='views'`` augments on the host (``config.data.augment_on = 'host'``, the
  reference path): the batch holds the finished views. ``output='canvases'``
  (``augment_on = 'device'``) decodes each anchor and positive once into a canvas
  (``decode_to_canvas``) and ships it with every view's seed; the jitted step draws the views
  (bingo_jax/device_data.py, device_augment.py). Both use the same anchors, positives and
  seeds.

  Args:
    config: the experiment config (uses ``data.image_size``, ``data.num_parallel_calls``,
      ``train.seed``).
    source: the training images (``make_source(config.data, config.data.train_split)``).
    bags: ``bag_file.Bags`` for exactly these images (checked first), or None when no
      view of the positive is asked for (MoCo pre-training): the positive is then the anchor.
    start_step: global step of the first batch (0, or the step a checkpoint resumes at).
    local_batch_size: B, this process's share of the global batch ``B * process_count``.
    process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
    views: which of ``views.VIEW_KEYS`` to generate (each view keeps its own augmentation seed,
      so a subset yields the same images as the full set for those keys).
    output: ``'views'`` or ``'canvases'``.
  Returns:
    An iterator of numpy dicts with ``anchor_index`` and ``positive_index`` int32 ``(B,)``
    and, for ``'views'``, the ``views`` (default ``query``, ``key``, ``pos_q``, ``pos_k``)
    uint8 ``(B, S, S, 3)`` (S = ``data.image_size``); for ``'canvases'``,
    ``anchor_canvas`` uint8 ``(B, Hc, Wc, 3)`` and ``anchor_size`` int32 ``(B, 4)``
    (``decode_to_canvas``), the same for ``positive_*`` when a view of the positive is asked
    for, and ``view_keys`` uint32 ``(B, len(views), 2)`` (JAX key data, ``views`` order).
  Raises:
    ValueError: the bags were made for another image list, or the batch does not fit.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  views = _checked_views(views, source, bags)
  num_views = len(views)
  view_seed_slots = [views_lib.VIEW_KEYS.index(view) + _FIRST_VIEW for view in views]
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  if output not in OUTPUTS:
    raise ValueError(f'output = {output!r}; expected one of {OUTPUTS}.')
  image_size = int(config.data.image_size)
  seed = int(config.train.seed)
  parallel = _parallelism(config.data.get('num_parallel_calls', -1))
  global_batch_size = local_batch_size * process_count

  policy = config.data.get('on_bad_image', None) or bad_images.policy_of(source)

  # The map functions are plain TF (no Python control flow on tensors): skipping autograph
  # halves the tracing time.
  @tf.autograph.experimental.do_not_convert
  def sample_positive(example):
    seeds = example_seeds(seed, example['epoch'], example['position'])
    positive_index = (example['anchor_index'] if bags is None else
                      bags.tf_sample_positive(example['anchor_index'], seeds[_POSITIVE]))
    return {'anchor_index': example['anchor_index'], 'seeds': seeds,
            'positive_index': positive_index}

  uses_positive = views_lib.needs_bags(views)

  def index_batches(first_step: int) -> tf.data.Dataset:
    dataset = anchor_stream(seed, len(source), global_batch_size, first_step, process_index,
                            process_count)
    dataset = dataset.map(sample_positive, num_parallel_calls=parallel)
    return dataset.batch(local_batch_size, drop_remainder=True)

  table_t = None  # config.data.on_bad_image='skip': bad image i is read as table_t[i]

  def read(indices):
    return source.tf_read_batch(indices if table_t is None else tf.gather(table_t, indices))

  @tf.autograph.experimental.do_not_convert
  def augment_view(request):
    # One traced augmentation serves all four views (four separate traces take seconds).
    request['image'] = augment.moco_v2_view(request['image'], request['seed'], image_size,
                                            encoded=source.encoded)
    return request

  @tf.autograph.experimental.do_not_convert
  def regroup(requests):
    grouped = tf.reshape(requests['image'],
                         [local_batch_size, num_views, image_size, image_size, 3])
    batch = {key: grouped[:, slot] for slot, key in enumerate(views)}
    batch['anchor_index'] = tf.cast(requests['anchor_index'][::num_views], tf.int32)
    batch['positive_index'] = tf.cast(requests['positive_index'][::num_views], tf.int32)
    return batch

  def build(first_batch: int, table: Optional[np.ndarray]) -> Iterator[dict]:
    nonlocal table_t
    table_t = None if table is None else tf.constant(table, tf.int64)
    dataset = index_batches(start_step + first_batch)
    if output == 'canvases':
      dataset = _canvas_batches(dataset, config, source, views, view_seed_slots,
                                local_batch_size, parallel, read_images=read)
      return dataset.prefetch(2).with_options(_options()).as_numpy_iterator()
    read_views = _view_reader(source, views, view_seed_slots, read=read)
    dataset = dataset.map(read_views, num_parallel_calls=parallel).unbatch()
    dataset = dataset.map(augment_view, num_parallel_calls=parallel)
    dataset = dataset.batch(num_views * local_batch_size, drop_remainder=True)
    dataset = dataset.map(regroup).prefetch(2)
    dataset = dataset.with_options(_options())
    return dataset.as_numpy_iterator()

  def batch_indices(k: int) -> np.ndarray:
    # Only indices and positives: nothing is decoded.
    batches = list(index_batches(start_step + k).take(2).as_numpy_iterator())
    return np.concatenate([b[key] for b in batches for key in
                           (('anchor_index', 'positive_index') if uses_positive else
                            ('anchor_index',))])

  return bad_images.guarded_batches(build, batch_indices, source, policy,
                                    where=lambda k: f' in training step {start_step + k + 1}')


def _view_reader(source: ImageSource, views: tuple[str, ...], view_seed_slots: list[int],
                 read: Optional[Callable] = None):
  """The tf.data map of ``create_train_iterator`` from a batch of B examples
  (``anchor_index``, ``positive_index``, ``seeds``) to B * len(views) view requests
  (``image``, ``seed`` and both indices), example-major in ``views`` order: the anchor's image
  for its views and the positive's for the positive's, each with its view's seed slot.
  ``read(indices)`` reads the images (default ``source.tf_read_batch``)."""
  num_views = len(views)
  read = read or source.tf_read_batch

  @tf.autograph.experimental.do_not_convert
  def read_views(batch):
    anchor_images = read(batch['anchor_index'])
    positive_images = read(batch['positive_index']) if views_lib.needs_bags(views) else None
    images = tf.stack([positive_images if view in views_lib.POSITIVE_VIEWS else anchor_images
                       for view in views], axis=1)
    seeds = tf.stack([batch['seeds'][:, slot] for slot in view_seed_slots], axis=1)
    repeat = lambda x: tf.repeat(x, num_views, axis=0)  # noqa: E731
    return {'image': tf.reshape(images, tf.concat([[-1], tf.shape(images)[2:]], 0)),
            'seed': tf.reshape(seeds, [-1, 2]),
            'anchor_index': repeat(batch['anchor_index']),
            'positive_index': repeat(batch['positive_index'])}
  return read_views


def _canvas_batches(dataset, config, source: ImageSource, views: tuple, view_seed_slots: list,
                    local_batch_size: int, parallel: int,
                    read_images: Optional[Callable] = None):
  """Batches of examples (anchor, positive, seeds) -> canvas batches (``output='canvases'``)."""
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

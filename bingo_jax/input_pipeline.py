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

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from bingo_jax.data import bad_images
from bingo_jax.data import canvases
from bingo_jax.data import lazy_modules
from bingo_jax.data import views as views_lib
from bingo_jax.data.sources import ImageSource


# TensorFlow and augment (which needs it) load when a tf.data pipeline is built: the on-device
# data path trains without them, yet train.py imports this module (``steps_per_epoch``).
tf = lazy_modules.ImportedOnUse('tensorflow')
augment = lazy_modules.ImportedOnUse('bingo_jax.data.augment')

# Independent RNG streams derived from the run seed.
_PERMUTATION_STREAM = 1
_EXAMPLE_STREAM = 2
# Per-example seeds: the positive draw, then one per view in views.VIEW_KEYS order.
_POSITIVE, _FIRST_VIEW = 0, 1
OUTPUTS = ('views', 'canvases')


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
    bags.check_matches(len(source), source.fingerprint, f'training data {source.description}',
                       content_fingerprint=source.content_fingerprint)
  return views


def create_train_iterator(config, source: ImageSource, bags, *, start_step: int,
                          local_batch_size: int, process_index: Optional[int] = None,
                          process_count: Optional[int] = None,
                          views: Sequence[str] = views_lib.VIEW_KEYS,
                          output: str = 'views') -> Iterator[dict]:
  """Per-process BINGO training batches from global step ``start_step`` on (endless).

  ``output='views'`` augments on the host (``config.data.augment_on = 'host'``, the
  reference path): the batch holds the finished views. ``output='canvases'``
  (``augment_on = 'device'``) decodes each anchor and positive once into a canvas
  (``canvases.decode_to_canvas``) and ships it with every view's seed; the jitted step draws the views
  (bingo_jax/run/device_data.py, device_augment.py). Both use the same anchors, positives and
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
    (``canvases.decode_to_canvas``), the same for ``positive_*`` when a view of the positive is asked
    for, and ``view_keys`` uint32 ``(B, len(views), 2)`` (JAX key data, ``views`` order).
  Raises:
    ValueError: the bags were made for another image list, or the batch does not fit.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  views = _checked_views(views, source, bags)
  view_seed_slots = [views_lib.VIEW_KEYS.index(view) + _FIRST_VIEW for view in views]
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  if output not in OUTPUTS:
    raise ValueError(f'output = {output!r}; expected one of {OUTPUTS}.')
  image_size = int(config.data.image_size)
  seed = int(config.train.seed)
  parallel = _parallelism(config.data.get('num_parallel_calls', -1))
  policy = config.data.get('on_bad_image', None) or bad_images.policy_of(source)

  def index_batches(first_step: int) -> tf.data.Dataset:
    return _example_batches(seed, source, bags, first_step, local_batch_size, process_index,
                            process_count, parallel)

  def build(first_batch: int, table: Optional[np.ndarray]) -> Iterator[dict]:
    # config.data.on_bad_image='skip': bad image i is read as table[i] (bad_images.py).
    table_t = None if table is None else tf.constant(table, tf.int64)

    def read(indices):
      return source.tf_read_batch(indices if table_t is None else tf.gather(table_t, indices))

    dataset = index_batches(start_step + first_batch)
    if output == 'canvases':
      dataset = canvases.canvas_batches(dataset, config, source, views, view_seed_slots,
                                        local_batch_size, parallel, read_images=read)
    else:
      dataset = _view_batches(dataset, source, views, view_seed_slots, image_size,
                              local_batch_size, parallel, read)
    return dataset.prefetch(2).with_options(_options()).as_numpy_iterator()

  uses_positive = views_lib.needs_bags(views)

  def batch_indices(k: int) -> np.ndarray:
    # Only indices and positives: nothing is decoded.
    batches = list(index_batches(start_step + k).take(2).as_numpy_iterator())
    return np.concatenate([b[key] for b in batches for key in
                           (('anchor_index', 'positive_index') if uses_positive else
                            ('anchor_index',))])

  return bad_images.guarded_batches(build, batch_indices, source, policy,
                                    where=lambda k: f' in training step {start_step + k + 1}')


def _example_batches(seed: int, source: ImageSource, bags, first_step: int,
                     local_batch_size: int, process_index: int, process_count: int,
                     parallel: int) -> tf.data.Dataset:
  """This process's examples from global step ``first_step`` on, in batches of B (endless).

  Returns:
    A dataset of ``anchor_index``, ``positive_index`` int64 ``(B,)`` (the positive drawn from
    the anchor's bag; the anchor itself without bags) and ``seeds`` int64 ``(B, 5, 2)``
    (``example_seeds``).
  """
  # The map functions are plain TF (no Python control flow on tensors): skipping autograph
  # halves the tracing time.
  @tf.autograph.experimental.do_not_convert
  def sample_positive(example):
    seeds = example_seeds(seed, example['epoch'], example['position'])
    positive_index = (example['anchor_index'] if bags is None else
                      bags.tf_sample_positive(example['anchor_index'], seeds[_POSITIVE]))
    return {'anchor_index': example['anchor_index'], 'seeds': seeds,
            'positive_index': positive_index}

  dataset = anchor_stream(seed, len(source), local_batch_size * process_count, first_step,
                          process_index, process_count)
  dataset = dataset.map(sample_positive, num_parallel_calls=parallel)
  return dataset.batch(local_batch_size, drop_remainder=True)


def _view_batches(dataset: tf.data.Dataset, source: ImageSource, views: tuple[str, ...],
                  view_seed_slots: list[int], image_size: int, local_batch_size: int,
                  parallel: int, read: Callable) -> tf.data.Dataset:
  """Batches of examples -> batches of finished views (the host path, ``output='views'``).

  Returns:
    A dataset of ``{view: uint8 (B, S, S, 3) for view in views}`` with ``anchor_index`` and
    ``positive_index`` int32 ``(B,)``.
  """
  num_views = len(views)

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

  read_views = _view_reader(source, views, view_seed_slots, read=read)
  dataset = dataset.map(read_views, num_parallel_calls=parallel).unbatch()
  dataset = dataset.map(augment_view, num_parallel_calls=parallel)
  dataset = dataset.batch(num_views * local_batch_size, drop_remainder=True)
  return dataset.map(regroup)


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

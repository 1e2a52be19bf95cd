"""Views made inside the jitted step (``config.data.augment_on = 'device'``).

Two ways to feed the step, both ending in ``device_augment.augment_views``:

* **canvases from the host** (any source): ``input_pipeline.create_train_iterator(...,
  output='canvases')`` decodes each anchor and positive once into a fixed-size canvas and
  ships it with the views' seeds; ``canvas_step`` wraps the training step so that it first
  draws the views from the canvases.
* **the data set held on the devices** (a decoded, fixed-shape source small enough for
  accelerator memory: Fashion-MNIST, CIFAR, STL-10 at 96 px): ``place_on_devices`` copies the
  images and the bag tables to every device once; ``on_device_step`` computes, inside the
  jitted step and from ``(train.seed, state.step)`` alone, the epoch's permutation, the
  step's anchors, their bag positives and the view keys, gathers the images and draws the
  views. No host work per step, and no TensorFlow anywhere (this module does not import it).

The order of examples follows docs/data.md (epoch ``e`` is a permutation that is a function of
``(seed, e)``, global step ``t`` of the epoch takes positions ``[t G, (t + 1) G)``, the
remainder dropped), with JAX's RNG instead of TF's, so the on-device order differs from the
host pipeline's but has the same law; resuming at a step reproduces the straight run exactly,
since everything is a function of the step held in the train state.

The wrapped step keeps the signature ``(state, teacher_variables, batch)`` of
``steps.make_train_step``'s step, which it calls inside its own jit (the inner jit's
shardings become constraints); ``batch`` is the host canvas batch, or the device-resident
data set.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bingo_jax.data import device_augment
from bingo_jax.data import parallel
from bingo_jax.data import views as views_lib
from bingo_jax.method import config_checks

AUGMENT_ON = config_checks.AUGMENT_ON
ON_DEVICE = config_checks.ON_DEVICE
# RNG streams of the on-device order (as the host pipeline's _PERMUTATION_STREAM, ...).
_PERMUTATION_STREAM = 1
_EXAMPLE_STREAM = 2
# Per-example keys: the positive draw, then the four views.
_NUM_EXAMPLE_KEYS = 5
_DEFAULT_MAX_MB = 2048


def augment_on(config: ml_collections.ConfigDict) -> str:
  """``config.data.augment_on`` ('device' by default), checked."""
  value = config.data.get('augment_on', 'device')
  if value not in AUGMENT_ON:
    raise ValueError(f'config.data.augment_on = {value!r}; expected one of {AUGMENT_ON}.')
  return value


# ---------------------------------------------------------------- views from canvases


def views_from_canvases(batch: dict, views: Sequence[str], image_size: int) -> dict:
  """The step's uint8 views from a canvas batch (``create_train_iterator(output='canvases')``).

  Args:
    batch: ``anchor_canvas`` ``(B, Hc, Wc, C)`` (C = 3, or 1 for grey images, which are
      augmented on one channel and replicated to RGB at the end), ``anchor_size`` ``(B, 4)``, the same for
      ``positive_*`` when a view of the positive is asked for, ``view_keys`` uint32
      ``(B, len(views), 2)`` in ``views`` order.
    views: view names (``VIEW_KEYS`` subset): ``pos_*`` views come from the positive.
    image_size: S.
  Returns:
    ``{view: uint8 (B, S, S, 3)}``, exactly the ``views`` (the step's batch contract,
    bingo_jax/data/views.py).
  """
  out = {}
  for image in ('anchor', 'positive'):
    slots = [i for i, view in enumerate(views)
             if (view in views_lib.POSITIVE_VIEWS) == (image == 'positive')]
    if not slots:
      continue
    drawn = device_augment.augment_views(batch[f'{image}_canvas'], batch[f'{image}_size'],
                                         batch['view_keys'][:, np.asarray(slots)], image_size)
    if drawn.shape[-1] == 1:  # grey canvases: drawn on one channel, shipped as RGB
      drawn = jnp.repeat(drawn, 3, axis=-1)
    for column, slot in enumerate(slots):
      out[views[slot]] = drawn[:, column]
  return out


def canvas_keys(views: Sequence[str]) -> tuple[str, ...]:
  """The entries of a canvas batch that the step reads for ``views`` (the indices stay on
  the host)."""
  images = ('anchor', 'positive') if views_lib.needs_bags(views) else ('anchor',)
  return tuple(f'{image}_{part}' for image in images for part in ('canvas', 'size')) + (
      'view_keys',)


def canvas_step(train_step: Callable, config: ml_collections.ConfigDict,
                mesh: jax.sharding.Mesh, views: Sequence[str]) -> Callable:
  """``train_step`` fed with canvas batches: the views are drawn first, in the same jit.

  Args:
    train_step: ``steps.make_train_step(...)``'s ``(state, teacher_variables, batch)``.
    config: uses ``data.image_size``.
    mesh: the device mesh (the canvas batch is sharded on ``'data'``).
    views: the views the step reads (``steps.batch_views(config)``).
  Returns:
    ``step(state, teacher_variables, canvas_batch) -> (state, metrics)``, state donated.
  """
  views = tuple(views)
  image_size = int(config.data.image_size)
  sharding = parallel.data_sharding(mesh)

  def step(state, teacher_variables, batch):
    drawn = views_from_canvases(batch, views, image_size)
    drawn = jax.lax.with_sharding_constraint(drawn, sharding)
    return train_step(state, teacher_variables, drawn)

  replicated = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, replicated, sharding),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


# ---------------------------------------------------------------- the data set on the devices


def source_array(source) -> Optional[np.ndarray]:
  """The uint8 ``(N, H, W, C)`` array behind an in-memory, fixed-shape source, else None.

  Knows ``data_sources.ArraySource`` (Fashion-MNIST from its files, arrays) and contiguous
  subsets of one (``train[:12800]``); other sources are read through the host pipeline.
  """
  if getattr(source, 'encoded', True) or getattr(source, 'image_shape', None) is None:
    return None
  images = getattr(source, '_images', None)
  if isinstance(images, np.ndarray):
    return images
  base = getattr(source, 'base', None)
  if base is not None and hasattr(source, 'start'):
    array = source_array(base)
    return None if array is None else array[source.start:source.stop]
  return None


def use_on_device_source(config: ml_collections.ConfigDict, source) -> bool:
  """Whether to hold the training images on the devices (``config.data.on_device``).

  ``'auto'`` (default): with device augmentation, for an in-memory fixed-shape source of at
  most ``data.on_device_max_mb`` MiB (2048 by default; every device holds a copy).
  ``'always'`` insists (an error if the source cannot be held), ``'never'`` never does.
  """
  setting = config.data.get('on_device', 'auto')
  if setting not in ON_DEVICE:
    raise ValueError(f'config.data.on_device = {setting!r}; expected one of {ON_DEVICE}.')
  if setting == 'never':
    return False
  if augment_on(config) != 'device':
    if setting == 'always':
      raise ValueError("config.data.on_device = 'always' needs config.data.augment_on = "
                       "'device'.")
    return False
  array = source_array(source)
  if array is None:
    if setting == 'always':
      raise ValueError(f"config.data.on_device = 'always', but {source.description} is not "
                       'an in-memory array of fixed-shape images.')
    return False
  limit = float(config.data.get('on_device_max_mb', _DEFAULT_MAX_MB))
  return setting == 'always' or array.nbytes <= limit * 2**20


def place_on_devices(source, bags, mesh: jax.sharding.Mesh) -> dict:
  """Copies the images and the bag tables to every device of ``mesh`` (once per run).

  Args:
    source: a source ``source_array`` knows.
    bags: ``bag_file.Bags`` for these images, or None (no bag positives).
    mesh: the device mesh.
  Returns:
    A replicated pytree: ``images`` uint8 ``(N, H, W, C)`` (C = 1 or 3, as stored), and the
    bags' tables (``neighbors``, or ``group_of`` / ``group_offsets`` / ``group_members`` /
    ``position_in_group``) as int32.
  """
  array = source_array(source)
  if array is None:
    raise ValueError(f'{source.description} cannot be held on the devices.')
  data = parallel.replicate({'images': np.ascontiguousarray(array)}, mesh)
  return data if bags is None else dict(data, **bag_tables(bags, mesh))


def bag_tables(bags, mesh: jax.sharding.Mesh) -> dict:
  """The bags' tables as replicated int32 arrays (``neighbors``, or ``group_of`` /
  ``group_offsets`` / ``group_members`` / ``position_in_group``): ``place_on_devices``'s, and
  what a run whose bags change replaces (docs/method.md §1, student relation)."""
  keys = (('neighbors',) if bags.kind == 'fixed' else
          ('group_of', 'group_offsets', 'group_members', 'position_in_group'))
  return parallel.replicate({key: np.asarray(getattr(bags, key), np.int32) for key in keys},
                            mesh)


def _positive(data: dict, anchor: jax.Array, key: jax.Array) -> jax.Array:
  """A uniform draw from the anchor's bag (``Bags.sample_positive``'s law), in jnp."""
  if 'neighbors' in data:
    neighbors = data['neighbors']
    draw = jax.random.randint(key, (), 0, neighbors.shape[1])
    return neighbors[anchor, draw]
  group = data['group_of'][anchor]
  start = data['group_offsets'][group]
  size = data['group_offsets'][group + 1] - start
  draw = jax.random.randint(key, (), 0, jnp.maximum(size - 1, 1))
  # Skip the anchor's own slot, so every other member has probability 1 / (size - 1).
  draw = draw + (draw >= data['position_in_group'][anchor]).astype(draw.dtype)
  other = data['group_members'][start + jnp.minimum(draw, jnp.maximum(size - 1, 0))]
  return jnp.where(size > 1, other, anchor)


def device_batch(data: dict, step: jax.Array, *, seed: int, steps_per_epoch: int,
                 global_batch_size: int, views: Sequence[str]) -> dict:
  """The canvas batch of global step ``step``, computed on the devices.

  Args:
    data: ``place_on_devices``'s pytree.
    step: int32 scalar, the global step (``state.step``).
    seed: ``config.train.seed``.
    steps_per_epoch: ``N // global_batch_size``.
    global_batch_size: G.
    views: the view names (``pos_*`` need bag tables in ``data``).
  Returns:
    A canvas batch (``views_from_canvases``) of G examples, with ``anchor_index`` and
    ``positive_index`` int32 ``(G,)``.
  """
  images = data['images']
  num_images, height, width = images.shape[:3]
  step = jnp.asarray(step, jnp.int32)
  epoch, offset = step // steps_per_epoch, step % steps_per_epoch
  base = jax.random.key(seed)
  order = jax.random.permutation(
      jax.random.fold_in(jax.random.fold_in(base, _PERMUTATION_STREAM), epoch), num_images)
  positions = offset * global_batch_size + jnp.arange(global_batch_size, dtype=jnp.int32)
  anchor = order[positions]
  epoch_key = jax.random.fold_in(jax.random.fold_in(base, _EXAMPLE_STREAM), epoch)
  example_keys = jax.vmap(
      lambda position: jax.random.split(jax.random.fold_in(epoch_key, position),
                                        _NUM_EXAMPLE_KEYS))(positions)
  with_positive = views_lib.needs_bags(views)
  positive = (jax.vmap(lambda a, k: _positive(data, a, k))(anchor, example_keys[:, 0])
              if with_positive else anchor)
  slots = np.asarray([1 + views_lib.VIEW_KEYS.index(view) for view in views])
  sizes = jnp.broadcast_to(jnp.asarray([height, width, height, width], jnp.int32),
                           (global_batch_size, 4))

  # Grey images stay one channel: views_from_canvases draws them on one channel (saturation,
  # hue and RandomGrayscale are identities there) and replicates the views to RGB.
  batch = {'anchor_canvas': images[anchor], 'anchor_size': sizes,
           'view_keys': jax.random.key_data(example_keys[:, slots]),
           'anchor_index': anchor.astype(jnp.int32),
           'positive_index': positive.astype(jnp.int32)}
  if with_positive:
    batch.update(positive_canvas=images[positive], positive_size=sizes)
  return batch


def on_device_step(train_step: Callable, config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh, views: Sequence[str], steps_per_epoch: int
                   ) -> Callable:
  """``train_step`` fed from the data set on the devices (``place_on_devices``).

  Returns:
    ``step(state, teacher_variables, data) -> (state, metrics)``: the batch of global step
    ``state.step`` is gathered and augmented inside the jit; state donated.
  """
  views = tuple(views)
  image_size = int(config.data.image_size)
  seed = int(config.train.seed)
  global_batch_size = int(config.train.batch_size)
  sharding = parallel.data_sharding(mesh)

  def step(state, teacher_variables, data):
    batch = device_batch(data, state.step, seed=seed, steps_per_epoch=steps_per_epoch,
                         global_batch_size=global_batch_size, views=views)
    # Each device augments its own slice of the batch.
    batch = jax.lax.with_sharding_constraint(batch, sharding)
    drawn = views_from_canvases(batch, views, image_size)
    return train_step(state, teacher_variables, drawn)

  replicated = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, replicated, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))

"""The on-device MoCo v2 ops (bingo_jax/data/device_augment.py) against the TF host ops of
bingo_jax/data/augment.py (themselves checked against PIL and torchvision in test_augment.py) with
the same window and parameters, and the distribution of every sampled parameter against
torchvision's definition (a numpy transcription of RandomResizedCrop.get_params) or the
closed-form law (uniform factors, Bernoulli rates, uniform permutations)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from bingo_jax.data import augment
from bingo_jax.data import device_augment as dev

import transforms_reference


def _test_image(height, width, seed=0):
  """A smooth colour gradient with noise: natural-image-like statistics, every level used."""
  rng = np.random.default_rng(seed)
  rows, cols = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing='ij')
  base = np.stack([rows, cols, 1 - 0.5 * (rows + cols)], axis=-1) * 200 + 20
  noisy = base + rng.normal(0, 25, base.shape)
  return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _canvas(image, side):
  canvas = np.zeros((side, side, 3), np.uint8)
  canvas[:image.shape[0], :image.shape[1]] = image
  return canvas


def _close(ours, reference, what):
  """The acceptance criterion: >= 99% of pixels within 1 grey level, mean |diff| <= 0.5."""
  diff = np.abs(np.asarray(ours, np.float64) - np.asarray(reference, np.float64))
  within = np.mean(diff <= 1.0)
  assert within >= 0.99 and diff.mean() <= 0.5, (
      f'{what}: {within:.4f} within 1 level, mean {diff.mean():.3f}, max {diff.max()}')
  return diff


def _tf_resize(image, window, size):
  crop = augment.crop_to_window(tf.constant(image), tf.constant(window, tf.int32))
  return augment._quantise(augment._resize(crop, size, size)).numpy()


# ---------------------------------------------------------------- single ops vs the TF ops


@pytest.mark.parametrize('window,size', [
    ((0, 0, 60, 80), 32),      # whole image, down-scaled
    ((7, 11, 37, 29), 32),     # a crop, mixed up/down
    ((20, 5, 14, 19), 40),     # up-scaled
    ((3, 40, 57, 40), 16)])    # strong down-scaling (antialiasing matters)
def test_crop_and_resize_of_a_canvas_equals_tf_resize_of_the_crop(window, size):
  image = _test_image(60, 80)
  reference = _tf_resize(image, window, size)
  canvas = _canvas(image, 96)  # the pixels outside the window must not leak in
  ours = jax.jit(dev.crop_and_resize, static_argnums=2)(
      jnp.asarray(canvas), jnp.asarray(window, jnp.float32), size)
  diff = _close(ours, reference, f'resize {window} -> {size}')
  assert diff.max() <= 1


@pytest.mark.parametrize('name,factor', [('brightness', 0.7), ('brightness', 1.3),
                                         ('contrast', 0.65), ('contrast', 1.35),
                                         ('saturation', 0.6), ('saturation', 1.4),
                                         ('hue', -0.08), ('hue', 0.05)])
def test_jitter_ops_equal_the_tf_ops(name, factor):
  image = _test_image(24, 20, seed=1).astype(np.float32)
  reference = getattr(augment, f'adjust_{name}')(tf.constant(image), factor).numpy()
  ours = jax.jit(getattr(dev, f'adjust_{name}'))(jnp.asarray(image), jnp.float32(factor))
  diff = _close(ours, reference, name)
  if name != 'hue':
    # The same float formula; XLA may fuse multiply-adds, which moves a floor() by one
    # level on a rare pixel.
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.01


def test_grayscale_and_blur_equal_the_tf_ops():
  image = _test_image(30, 26, seed=2).astype(np.float32)
  np.testing.assert_array_equal(dev.to_grayscale(jnp.asarray(image)),
                                augment.to_grayscale(tf.constant(image)).numpy())
  for sigma in (0.1, 0.7, 2.0):
    reference = augment.gaussian_blur(tf.constant(image), sigma).numpy()
    ours = dev.gaussian_blur(jnp.asarray(image), jnp.float32(sigma))
    assert _close(ours, reference, f'blur {sigma}').max() <= 1


def _tf_view(image, draws, size):
  """The TF host ops of augment.moco_v2_view composed with the device side's draws."""
  view = _tf_resize(image, np.asarray(draws['window']), size)
  view = tf.constant(view)
  ops = (augment.adjust_brightness, augment.adjust_contrast, augment.adjust_saturation,
         augment.adjust_hue)
  if draws['jitter']:
    for op in np.asarray(draws['order']):
      view = ops[op](view, float(draws['factors'][op]))
  if draws['gray']:
    view = augment.to_grayscale(view)
  if draws['blur']:
    view = augment.gaussian_blur(view, float(draws['sigma']))
  if draws['flip']:
    view = tf.reverse(view, axis=[1])
  return tf.cast(view, tf.uint8).numpy()


def test_whole_views_equal_the_tf_host_ops_with_the_same_draws():
  image = _test_image(50, 70, seed=3)
  sizes = jnp.asarray([50, 70, 50, 70], jnp.int32)
  canvas = jnp.asarray(_canvas(image, 80))
  size = 24
  draw_fn = jax.jit(jax.vmap(dev.view_draws, in_axes=(0, None)))
  view_fn = jax.jit(jax.vmap(dev.apply_view, in_axes=(None, None, 0, None)),
                    static_argnums=3)
  keys = jax.random.key_data(jax.random.split(jax.random.key(0), 24))
  draws = draw_fn(keys, sizes)
  ours = np.asarray(view_fn(canvas, sizes, draws, size))
  # augment_views is apply_view(view_draws(key)) (another compilation: fused float ops may
  # move a rare pixel by a level or two).
  batched = dev.augment_views(canvas[None], sizes[None], keys[None], size)[0]
  assert np.mean(np.asarray(batched) != ours) < 1e-3
  host = np.stack([_tf_view(image, jax.tree.map(lambda x, i=i: np.asarray(x)[i], draws), size)
                   for i in range(len(keys))])
  _close(ours, host, 'MoCo v2 views')
  # The draws exercised every op.
  for flag in ('jitter', 'gray', 'blur', 'flip'):
    assert 0 < np.asarray(draws[flag]).sum() < len(keys), flag


def test_grey_views_drawn_on_one_channel_equal_the_tf_host_ops():
  """A grey canvas is augmented on one channel (saturation, hue and RandomGrayscale are
  skipped as identities). Reference: the TF host ops on the grey image stored as RGB, whose
  views must themselves be grey."""
  image = np.repeat(_test_image(40, 36, seed=5)[..., :1], 3, axis=-1)
  sizes = jnp.asarray([40, 36, 40, 36], jnp.int32)
  size = 20
  # 12 views; key 37 draws each of jitter, grayscale, blur and flip in some but not all.
  keys = jax.random.key_data(jax.random.split(jax.random.key(37), 12))
  draws = jax.jit(jax.vmap(dev.view_draws, in_axes=(0, None)))(keys, sizes)
  grey = np.asarray(dev.augment_views(jnp.asarray(_canvas(image, 48)[None, ..., :1]),
                                      sizes[None], keys[None], size)[0])
  assert grey.shape == (12, size, size, 1)
  host = np.stack([_tf_view(image, jax.tree.map(lambda x, i=i: np.asarray(x)[i], draws), size)
                   for i in range(len(keys))])
  np.testing.assert_array_equal(host, np.repeat(host[..., :1], 3, axis=-1))
  _close(np.repeat(grey, 3, axis=-1), host, 'grey MoCo v2 views')
  for flag in ('jitter', 'gray', 'blur', 'flip'):
    assert 0 < np.asarray(draws[flag]).sum() < len(keys), flag


def test_canvas_window_maps_original_to_canvas_pixels():
  # A 400 x 600 image held down-scaled by 2 in its canvas (200 x 300 valid pixels).
  window = dev.canvas_window(jnp.asarray([40, 100, 200, 300]), jnp.asarray([200, 300, 400, 600]))
  np.testing.assert_allclose(window, [20, 50, 100, 150])


# ---------------------------------------------------------------- distributions of the draws


def _windows(height, width, count):
  keys = jax.random.split(jax.random.key(1), count)
  return np.asarray(jax.jit(jax.vmap(dev.sample_crop_window, in_axes=(0, None, None)))(
      keys, height, width))


@pytest.mark.parametrize('height,width', [(375, 500), (60, 100), (28, 28)])
def test_crop_window_distribution_matches_torchvision(height, width):
  count = 4000
  ours = _windows(height, width, count)
  rng = np.random.default_rng(0)
  reference = np.array([transforms_reference.random_resized_crop_params(rng, height, width)
                        for _ in range(count)])
  assert (ours[:, :2] >= 0).all()
  assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
  for column, what in ((2, 'height'), (3, 'width')):
    assert scipy.stats.ks_2samp(ours[:, column], reference[:, column]).pvalue > 1e-3, what
  area = ours[:, 2] * ours[:, 3] / (height * width)
  reference_area = reference[:, 2] * reference[:, 3] / (height * width)
  assert scipy.stats.ks_2samp(area, reference_area).pvalue > 1e-3
  assert abs(area.mean() - reference_area.mean()) < 0.02
  aspect = np.log(ours[:, 3] / ours[:, 2])
  reference_aspect = np.log(reference[:, 3] / reference[:, 2])
  assert scipy.stats.ks_2samp(aspect, reference_aspect).pvalue > 1e-3
  # Positions uniform over the free space: mean relative offset 1/2 (where there is room).
  for axis, side in ((0, height), (1, width)):
    free = side - ours[:, 2 + axis]
    room = free > 0
    assert abs(np.mean(ours[room, axis] / free[room]) - 0.5) < 0.03


def test_crop_window_fallback_is_centred_ratio_clamp():
  # A 10 x 1000 strip: no attempt fits; torchvision takes h = 10, w = round(10 * 4/3) = 13.
  np.testing.assert_array_equal(_windows(10, 1000, 5),
                                np.tile([0, (1000 - 13) // 2, 10, 13], (5, 1)))
  # The same for a tall strip: w = 10, h = round(10 / (3/4)) = 13.
  np.testing.assert_array_equal(_windows(1000, 10, 5),
                                np.tile([(1000 - 13) // 2, 0, 13, 10], (5, 1)))


def test_op_rates_factors_and_orders_follow_their_laws():
  count = 6000
  keys = jax.random.key_data(jax.random.split(jax.random.key(2), count))
  draws = jax.jit(jax.vmap(dev.view_draws, in_axes=(0, None)))(
      keys, jnp.asarray([64, 64, 64, 64]))
  draws = jax.tree.map(np.asarray, draws)
  for flag, probability in (('jitter', 0.8), ('gray', 0.2), ('blur', 0.5), ('flip', 0.5)):
    rate = draws[flag].mean()
    assert abs(rate - probability) <= 4 * math.sqrt(probability * (1 - probability) / count), (
        flag, rate)
  # Factors uniform on their ranges, sigma uniform on [0.1, 2].
  for column, (low, high) in enumerate(((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))):
    assert scipy.stats.kstest(draws['factors'][:, column], 'uniform',
                              (low, high - low)).pvalue > 1e-3, column
  assert scipy.stats.kstest(draws['sigma'], 'uniform', (0.1, 1.9)).pvalue > 1e-3
  # Orders: every one of the 24 permutations equally likely (chi-square).
  index = {p: i for i, p in enumerate(itertools.permutations(range(4)))}
  counts = np.bincount([index[tuple(o)] for o in draws['order']], minlength=24)
  assert scipy.stats.chisquare(counts).pvalue > 1e-3
  # The decisions are independent of one another (jitter vs gray, blur vs flip).
  both = np.mean(draws['jitter'] & draws['gray'])
  assert abs(both - 0.16) < 4 * math.sqrt(0.16 * 0.84 / count)
  both = np.mean(draws['blur'] & draws['flip'])
  assert abs(both - 0.25) < 4 * math.sqrt(0.25 * 0.75 / count)

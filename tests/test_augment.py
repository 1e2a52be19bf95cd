"""MoCo v2 augmentation ops against references: PIL (ImageEnhance, convert('L'), HSV), scipy's
Gaussian filter, a numpy transcription of torchvision's RandomResizedCrop.get_params, and the
rates of docs/method.md §2 measured on synthetic images that make each op detectable."""

import io
import math

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageFilter

from bingo_jax.data import augment

import transforms_reference

_RANDOM_IMAGE = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)


def _views(image, count, seed_offset=0, encoded=False, size=16):
  """``count`` MoCo v2 views of one image (seeds [7, i]) in one traced map."""
  image = tf.constant(image)
  seeds = tf.stack([tf.fill([count], tf.constant(7, tf.int64)),
                    tf.range(seed_offset, seed_offset + count, dtype=tf.int64)], axis=1)
  fn = tf.function(lambda s: augment.moco_v2_view(image, s, size, encoded=encoded),
                   autograph=False)
  dataset = tf.data.Dataset.from_tensor_slices(seeds).map(fn, num_parallel_calls=2)
  return np.stack(list(dataset.batch(count).as_numpy_iterator())[0])


def _z_ok(successes, trials, probability, z=4.0):
  return abs(successes / trials - probability) <= z * math.sqrt(
      probability * (1 - probability) / trials)


# ---------------------------------------------------------------- single ops vs PIL / scipy


@pytest.mark.parametrize('factor', [0.63, 1.37])
@pytest.mark.parametrize('name,enhancer', [('brightness', ImageEnhance.Brightness),
                                           ('contrast', ImageEnhance.Contrast),
                                           ('saturation', ImageEnhance.Color)])
def test_jitter_ops_equal_pil_imageenhance(name, enhancer, factor):
  op = getattr(augment, f'adjust_{name}')
  ours = op(tf.constant(_RANDOM_IMAGE, tf.float32), factor).numpy()
  reference = np.asarray(enhancer(Image.fromarray(_RANDOM_IMAGE)).enhance(factor))
  np.testing.assert_array_equal(ours, reference)


def test_hue_close_to_torchvision_pil_hue():
  for delta in (0.05, -0.08):
    hue, saturation, value = Image.fromarray(_RANDOM_IMAGE).convert('HSV').split()
    shifted = (np.asarray(hue).astype(int) + int(round(delta * 255))) % 256  # uint8 wrap
    reference = np.asarray(Image.merge('HSV', (Image.fromarray(shifted.astype(np.uint8)),
                                               saturation, value)).convert('RGB'))
    difference = np.abs(augment.adjust_hue(tf.constant(_RANDOM_IMAGE, tf.float32),
                                           delta).numpy() - reference)
    # PIL holds the hue in 8 bits (steps of 1.4 degrees); the mean stays below a level.
    assert difference.mean() < 1.0 and difference.max() <= 8, (difference.mean(),
                                                                 difference.max())
    assert np.abs(_RANDOM_IMAGE.astype(int) - reference).mean() > 10  # the shift is visible


def test_grayscale_equals_pil_luma():
  ours = augment.to_grayscale(tf.constant(_RANDOM_IMAGE, tf.float32)).numpy()
  reference = np.asarray(Image.fromarray(_RANDOM_IMAGE).convert('L'))
  for channel in range(3):
    np.testing.assert_array_equal(ours[..., channel], reference)


@pytest.mark.parametrize('sigma', [0.5, 2.0])
def test_blur_equals_gaussian_filter_and_approximates_pil(sigma):
  ours = augment.gaussian_blur(tf.constant(_RANDOM_IMAGE, tf.float32), sigma).numpy()
  reference = np.stack([scipy.ndimage.gaussian_filter(
      _RANDOM_IMAGE[..., c].astype(float), sigma, mode='nearest',
      truncate=augment.BLUR_KERNEL_RADIUS / sigma) for c in range(3)], -1)
  np.testing.assert_array_equal(ours, np.round(reference))
  pil = np.asarray(Image.fromarray(_RANDOM_IMAGE).filter(ImageFilter.GaussianBlur(sigma)))
  # PIL approximates the Gaussian with three box blurs: close on average (the unblurred
  # noise image is 26-64 levels away from PIL's result).
  assert np.abs(ours - pil).mean() < 2.5


# ---------------------------------------------------------------- RandomResizedCrop


def _tf_windows(height, width, count):
  fn = tf.function(lambda s: augment.sample_crop_window(s, height, width), autograph=False)
  seeds = tf.stack([tf.zeros([count], tf.int64), tf.range(count, dtype=tf.int64)], axis=1)
  return tf.map_fn(fn, seeds, fn_output_signature=tf.int32).numpy()


def test_crop_window_distribution_matches_torchvision():
  height, width, count = 60, 100, 3000
  ours = _tf_windows(height, width, count)
  rng = np.random.default_rng(0)
  reference = np.array([transforms_reference.random_resized_crop_params(rng, height, width)
                        for _ in range(count)])
  for windows in (ours, reference):
    assert (windows[:, 0] >= 0).all() and (windows[:, 1] >= 0).all()
  assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
  area = ours[:, 2] * ours[:, 3] / (height * width)
  reference_area = reference[:, 2] * reference[:, 3] / (height * width)
  # Area fraction in [0.2, 1] up to the rounding of the sides.
  assert area.min() >= 0.19 and area.max() <= 1.0
  assert scipy.stats.ks_2samp(area, reference_area).pvalue > 1e-3
  aspect = ours[:, 3] / ours[:, 2]
  reference_aspect = reference[:, 3] / reference[:, 2]
  assert scipy.stats.ks_2samp(aspect, reference_aspect).pvalue > 1e-3
  # Position uniform over the free space: the mean relative offset is 1/2.
  free = np.maximum(height - ours[:, 2], 1)
  assert abs(np.mean(ours[:, 0] / free) - 0.5) < 0.03


def test_crop_window_fallback_is_centred_ratio_clamp():
  # A 10 x 1000 strip: no attempt fits, torchvision falls back to h=10, w=round(10 * 4/3).
  windows = _tf_windows(10, 1000, 5)
  np.testing.assert_array_equal(windows, np.tile([0, (1000 - 13) // 2, 10, 13], (5, 1)))


@pytest.mark.parametrize('subsampling', [0, 2])  # JPEG chroma 4:4:4 and 4:2:0
def test_fused_jpeg_crop_equals_full_decode_then_crop(subsampling):
  image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG', quality=90, subsampling=subsampling)
  encoded = tf.constant(buffer.getvalue())
  decoded = tf.io.decode_jpeg(encoded, channels=3)
  for index in range(5):
    seed = tf.constant([3, index], tf.int64)
    fused = augment.decode_and_random_crop(encoded, seed).numpy().astype(int)
    window = augment.sample_crop_window(seed, 48, 64)
    reference = augment.crop_to_window(decoded, window).numpy()
    assert fused.shape == reference.shape == (window[2], window[3], 3)
    if subsampling == 0:
      np.testing.assert_array_equal(fused, reference)
    else:
      # With subsampled chroma libjpeg upsamples the crop's outermost pixels from the crop
      # alone: the interior is identical.
      np.testing.assert_array_equal(fused[1:-1, 1:-1], reference[1:-1, 1:-1])


# ---------------------------------------------------------------- whole view: rates, determinism


def test_view_is_deterministic_and_uint8():
  a = _views(_RANDOM_IMAGE, 4)
  b = _views(_RANDOM_IMAGE, 4)
  assert a.dtype == np.uint8 and a.shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a[0], a[1])


def test_grayscale_and_jitter_rates_on_a_flat_colour():
  # A flat colour is unchanged by crop, resize, blur and flip; jitter almost surely moves it
  # (brightness, saturation and hue factors at exactly 1 have probability ~0) and never makes
  # it grey (saturation >= 0.6); grayscale makes R = G = B.
  colour = np.array([200, 100, 50], np.uint8)
  views = _views(np.broadcast_to(colour, (12, 14, 3)).copy(), 1200, size=8)
  pixel = views[:, 0, 0].astype(int)
  assert (views == views[:, :1, :1]).all()  # still flat
  gray = (pixel[:, 0] == pixel[:, 1]) & (pixel[:, 1] == pixel[:, 2])
  assert _z_ok(gray.sum(), len(gray), augment.GRAYSCALE_PROB), gray.mean()
  jittered = (pixel[~gray] != colour).any(axis=1)
  assert _z_ok(jittered.sum(), len(jittered), augment.JITTER_PROB), jittered.mean()


def test_flip_rate_on_a_horizontal_gradient(monkeypatch):
  # Red rises from left to right over a dim constant: every crop keeps the rise and every
  # colour op keeps the brightest channel rising (monotone maps of the pixel values).
  width = 32
  red = np.linspace(60, 180, width)
  image = np.stack([np.broadcast_to(red, (24, width)), np.full((24, width), 30.0),
                    np.full((24, width), 30.0)], -1).astype(np.uint8)

  def flipped(views):
    brightness = views.max(axis=-1).astype(float)
    half = views.shape[2] // 2
    return brightness[:, :, :half].mean(axis=(1, 2)) > brightness[:, :, half:].mean(axis=(1, 2))

  # The detector is exact when flipping is off...
  monkeypatch.setattr(augment, 'FLIP_PROB', 0.0)
  assert not flipped(_views(image, 300, seed_offset=10_000)).any()
  monkeypatch.undo()
  views = _views(image, 1000)
  assert _z_ok(flipped(views).sum(), len(views), augment.FLIP_PROB), flipped(views).mean()

"""Image augmentation as TF ops for tf.data: the MoCo v2 training view and the centre crop.

Every random function here is a pure function of ``(image, seed)`` built on stateless RNG
(``tf.random.stateless_*``), so the example order and the views of a training run are fixed by
its seed and a resumed run sees exactly what a straight run would (input_pipeline.py).

The released code runs torchvision transforms on PIL images (docs/method.md §2):

    RandomResizedCrop(224, scale=(0.2, 1.0))
    RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
    RandomGrayscale(p=0.2)
    RandomApply([GaussianBlur([0.1, 2.0])], p=0.5)    # PIL ImageFilter.GaussianBlur(sigma)
    RandomHorizontalFlip()

Each op here follows the torchvision/PIL definition; PIL works on uint8 images, so values are
quantised after every op as PIL does (floor in ``Image.blend``, rounding in resizes and
blurs). Residual differences, all of one or two grey levels or below the resolution of any
statistic: PIL's bilinear resize uses 8-bit fixed-point weights and stores the horizontal pass
as uint8 (TF: float throughout); the hue shift works on float HSV (PIL: 8-bit HSV); the blur
is an exact Gaussian (PIL: three box blurs of the same variance). Outputs are uint8; the
jitted step normalises them with ``images.normalize``.
"""

from __future__ import annotations

import math
from typing import Tuple

import tensorflow as tf

from bingo_jax.data import images as images_lib

from bingo_jax.data.augment_params import (BLUR_KERNEL_RADIUS, BLUR_PROB, BLUR_SIGMA, CROP_ATTEMPTS,
                                           CROP_RATIO, CROP_SCALE, FLIP_PROB, GRAYSCALE_PROB,
                                           JITTER_PROB, JITTER_STRENGTH)

# PIL's ITU-R 601-2 luma ("L" mode), in its 16-bit fixed point.
_LUMA_WEIGHTS_16 = (19595, 38470, 7471)

# Seed slots of one view: each random decision uses its own stream.
_CROP, _JITTER_APPLY, _JITTER_PARAMS, _GRAY, _BLUR_APPLY, _BLUR_SIGMA, _FLIP = range(7)
_NUM_SEEDS = 7


# ---------------------------------------------------------------- shared helpers


def _quantise(image: tf.Tensor, mode: str = 'round') -> tf.Tensor:
  """float image -> float image holding uint8 values (as PIL stores every intermediate)."""
  image = tf.clip_by_value(image, 0.0, 255.0)
  return tf.floor(image) if mode == 'floor' else tf.round(image)


def _resize(image: tf.Tensor, height, width) -> tf.Tensor:
  """Bilinear resize with PIL's antialiasing (triangle filter widened when shrinking)."""
  return tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]),
                         method='bilinear', antialias=True)


def luma(image: tf.Tensor) -> tf.Tensor:
  """PIL ``convert('L')`` of an RGB image holding uint8 values: ``(..., H, W, 3) -> (..., H, W)``
  float with integer values, ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``."""
  # In float32 the sum (< 255 * 2^16 < 2^24) and the division by 2^16 are exact, so this is
  # PIL's integer formula, without int conversions.
  weights = tf.constant(_LUMA_WEIGHTS_16, tf.float32)
  weighted = tf.reduce_sum(tf.cast(image, tf.float32) * weights, axis=-1) + float(1 << 15)
  return tf.floor(weighted / float(1 << 16))


# ---------------------------------------------------------------- evaluation centre crop


def resize_shorter_side_size(height, width, target):
  """torchvision ``Resize(target)``: shorter side -> target, longer side truncated
  ``int(target * long / short)``. Returns ``(new_height, new_width)`` int32 tensors."""
  height = tf.cast(height, tf.int64)
  width = tf.cast(width, tf.int64)
  target = tf.cast(target, tf.int64)
  short = tf.minimum(height, width)
  long = tf.maximum(height, width)
  new_long = (target * long) // short  # exact integer form of int(target * long / short)
  new_height = tf.where(height <= width, target, new_long)
  new_width = tf.where(height <= width, new_long, target)
  return tf.cast(new_height, tf.int32), tf.cast(new_width, tf.int32)


def center_crop(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Evaluation view (docs/method.md §1): ``Resize(round(S / CENTER_CROP_FRACTION))`` then
  ``CenterCrop(S)``, as torchvision on PIL images (256/224 for S = 224).

  Args:
    image: uint8 ``(H, W, 3)`` of any size (small images are upscaled).
    image_size: S.
  Returns:
    uint8 ``(S, S, 3)``.
  """
  resize_to = int(round(image_size / images_lib.CENTER_CROP_FRACTION))
  shape = tf.shape(image)
  new_height, new_width = resize_shorter_side_size(shape[0], shape[1], resize_to)
  resized = _quantise(_resize(image, new_height, new_width))
  # torchvision CenterCrop: offset int(round((size - crop) / 2)), round half to even (as tf).
  top = tf.cast(tf.round(tf.cast(new_height - image_size, tf.float64) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_width - image_size, tf.float64) / 2.0), tf.int32)
  cropped = resized[top:top + image_size, left:left + image_size]
  cropped = tf.ensure_shape(cropped, [image_size, image_size, 3])
  return tf.cast(cropped, tf.uint8)


# ---------------------------------------------------------------- RandomResizedCrop


def sample_crop_window(seed: tf.Tensor, height, width,
                       scale: Tuple[float, float] = CROP_SCALE,
                       ratio: Tuple[float, float] = CROP_RATIO) -> tf.Tensor:
  """torchvision ``RandomResizedCrop.get_params``, statelessly.

  Up to 10 attempts: area fraction ~ U(scale), log aspect ratio ~ U(log ratio), side lengths
  ``round(sqrt(area * ratio))`` / ``round(sqrt(area / ratio))``; the first attempt that fits
  is taken, at a uniform position. If none fits, the whole image clamped to the ratio range,
  centred. All 10 attempts are drawn at once and the first valid one selected, which gives the
  same distribution as torchvision's loop.

  Args:
    seed: ``(2,)`` int tensor.
    height, width: image size (int scalars or tensors).
    scale, ratio: as torchvision.
  Returns:
    int32 ``(4,)``: ``[top, left, crop_height, crop_width]``.
  """
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=4))
  area = tf.cast(height * width, tf.float32)
  target_area = area * tf.random.stateless_uniform([CROP_ATTEMPTS], area_seed, scale[0], scale[1])
  log_ratio = tf.random.stateless_uniform([CROP_ATTEMPTS], ratio_seed, math.log(ratio[0]),
                                          math.log(ratio[1]))
  aspect = tf.exp(log_ratio)
  crop_widths = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  crop_heights = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  fits = ((crop_widths > 0) & (crop_widths <= width) & (crop_heights > 0)
          & (crop_heights <= height))
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

  # Fallback (torchvision): whole image, clamped to the aspect ratio range, centred.
  in_ratio = tf.cast(width, tf.float32) / tf.cast(height, tf.float32)
  fallback_width = tf.where(
      in_ratio > ratio[1],
      tf.cast(tf.round(tf.cast(height, tf.float32) * ratio[1]), tf.int32), width)
  fallback_height = tf.where(
      in_ratio < ratio[0],
      tf.cast(tf.round(tf.cast(width, tf.float32) / ratio[0]), tf.int32), height)

  any_fits = tf.reduce_any(fits)
  crop_height = tf.where(any_fits, crop_heights[first], fallback_height)
  crop_width = tf.where(any_fits, crop_widths[first], fallback_width)
  # torch.randint(0, size - crop + 1): uniform over every position that keeps the crop inside.
  random_top = tf.random.stateless_uniform([], top_seed, 0, height - crop_height + 1,
                                           dtype=tf.int32)
  random_left = tf.random.stateless_uniform([], left_seed, 0, width - crop_width + 1,
                                            dtype=tf.int32)
  top = tf.where(any_fits, random_top, (height - crop_height) // 2)
  left = tf.where(any_fits, random_left, (width - crop_width) // 2)
  return tf.stack([top, left, crop_height, crop_width])


def decode_and_random_crop(encoded: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Encoded image -> uint8 crop ``(h, w, 3)`` of a ``sample_crop_window`` window.

  JPEGs are decoded only inside the window (``decode_and_crop_jpeg``), so a full ImageNet image
  is never decoded; other formats (PNG, and the odd PNG named .JPEG) are decoded whole. With
  subsampled chroma (4:2:0, most JPEGs) libjpeg upsamples the crop's outermost pixel ring from
  inside the crop, so that ring may differ slightly from a full decode; the interior is equal.
  """
  def jpeg_crop():
    shape = tf.image.extract_jpeg_shape(encoded)
    window = sample_crop_window(seed, shape[0], shape[1])
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

  def generic_crop():
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return crop_to_window(image, sample_crop_window(seed, tf.shape(image)[0],
                                                    tf.shape(image)[1]))

  crop = tf.cond(tf.io.is_jpeg(encoded), jpeg_crop, generic_crop)
  crop.set_shape([None, None, 3])
  return crop


def crop_to_window(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  """``image[top:top + h, left:left + w]`` for ``window = [top, left, h, w]``."""
  return tf.slice(image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], 3]))


# ---------------------------------------------------------------- ColorJitter (PIL ImageEnhance)


def adjust_brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ``ImageEnhance.Brightness``: blend with black, ``floor(clip(factor * x))``."""
  return _quantise(image * factor, 'floor')


def adjust_contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ``ImageEnhance.Contrast``: blend with the grey level ``int(mean(L) + 0.5)``."""
  mean = tf.floor(tf.reduce_mean(luma(image)) + 0.5)
  return _quantise(mean + factor * (image - mean), 'floor')


def adjust_saturation(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ``ImageEnhance.Color``: blend with the image's own ``L`` conversion."""
  gray = luma(image)[..., None]
  return _quantise(gray + factor * (image - gray), 'floor')


def adjust_hue(image: tf.Tensor, delta) -> tf.Tensor:
  """torchvision ``adjust_hue``: rotate the HSV hue by ``delta`` turns (in [-0.5, 0.5])."""
  return _quantise(tf.image.adjust_hue(image / 255.0, delta) * 255.0)


def color_jitter(image: tf.Tensor, seed: tf.Tensor,
                 strength: Tuple[float, float, float, float] = JITTER_STRENGTH) -> tf.Tensor:
  """torchvision ``ColorJitter(b, c, s, h)``: four factors, applied in a random order.

  Args:
    image: float ``(H, W, 3)`` holding uint8 values.
    seed: ``(2,)`` int tensor.
    strength: brightness, contrast, saturation (factor ~ U[1 - x, 1 + x]) and hue
      (delta ~ U[-x, x]).
  Returns:
    float ``(H, W, 3)`` holding uint8 values.
  """
  order_seed, factor_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  # torch.randperm(4): a uniform permutation, here the argsort of four uniforms.
  order = tf.cast(tf.argsort(tf.random.stateless_uniform([4], order_seed)), tf.int32)
  brightness, contrast, saturation, hue = strength
  low = tf.constant([1 - brightness, 1 - contrast, 1 - saturation, -hue])
  high = tf.constant([1 + brightness, 1 + contrast, 1 + saturation, hue])
  factors = low + (high - low) * tf.random.stateless_uniform([4], factor_seed)
  ops = [lambda x: adjust_brightness(x, factors[0]), lambda x: adjust_contrast(x, factors[1]),
         lambda x: adjust_saturation(x, factors[2]), lambda x: adjust_hue(x, factors[3])]
  for position in range(4):
    image = tf.switch_case(order[position], [lambda op=op, x=image: op(x) for op in ops])
    image.set_shape([None, None, 3])
  return image


# ---------------------------------------------------------------- grayscale, blur, flip


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
  """torchvision ``RandomGrayscale`` on RGB: PIL ``L`` luma replicated to three channels."""
  return tf.tile(luma(image)[..., None], [1, 1, 3])


def gaussian_kernel(sigma, radius: int = BLUR_KERNEL_RADIUS) -> tf.Tensor:
  """Normalised 1-D Gaussian ``(2 * radius + 1,)`` float32."""
  offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
  weights = tf.exp(-0.5 * tf.square(offsets / sigma))
  return weights / tf.reduce_sum(weights)


def gaussian_blur(image: tf.Tensor, sigma, radius: int = BLUR_KERNEL_RADIUS) -> tf.Tensor:
  """Separable Gaussian blur with edge pixels repeated beyond the border (as PIL).

  Args:
    image: float ``(H, W, 3)``.
    sigma: standard deviation in pixels (PIL's ``GaussianBlur(radius=sigma)``).
    radius: kernel half-width.
  Returns:
    float ``(H, W, 3)`` holding uint8 values.
  """
  kernel = gaussian_kernel(sigma, radius)
  image = image[None]
  height, width = tf.shape(image)[1], tf.shape(image)[2]
  # Edge replication = gather with clamped indices (tf.pad has no 'edge' mode).
  rows = tf.clip_by_value(tf.range(-radius, height + radius), 0, height - 1)
  image = tf.gather(image, rows, axis=1)
  vertical = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, 3, 1])
  image = tf.nn.depthwise_conv2d(image, vertical, [1, 1, 1, 1], 'VALID')
  cols = tf.clip_by_value(tf.range(-radius, width + radius), 0, width - 1)
  image = tf.gather(image, cols, axis=2)
  horizontal = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, 3, 1])
  image = tf.nn.depthwise_conv2d(image, horizontal, [1, 1, 1, 1], 'VALID')
  return _quantise(image[0])


def _coin(seed: tf.Tensor, probability: float) -> tf.Tensor:
  return tf.random.stateless_uniform([], seed) < probability


# ---------------------------------------------------------------- the MoCo v2 view


def moco_v2_view(image: tf.Tensor, seed: tf.Tensor, image_size: int, *,
                 encoded: bool) -> tf.Tensor:
  """One draw of the MoCo v2 augmentation (docs/method.md §2), torchvision's order.

  Args:
    image: encoded bytes (scalar tf.string, ``encoded=True``; JPEG decoding is fused with the
      crop) or uint8 ``(H, W, 3)``.
    seed: ``(2,)`` int tensor; the view is a pure function of ``(image, seed)``.
    image_size: output side S.
    encoded: which kind ``image`` is.
  Returns:
    uint8 ``(S, S, 3)``.
  """
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, num=_NUM_SEEDS))
  if encoded:
    crop = decode_and_random_crop(image, seeds[_CROP])
  else:
    shape = tf.shape(image)
    crop = crop_to_window(image, sample_crop_window(seeds[_CROP], shape[0], shape[1]))
  view = _quantise(_resize(crop, image_size, image_size))
  view = tf.cond(_coin(seeds[_JITTER_APPLY], JITTER_PROB),
                 lambda: color_jitter(view, seeds[_JITTER_PARAMS]), lambda: view)
  view = tf.cond(_coin(seeds[_GRAY], GRAYSCALE_PROB), lambda: to_grayscale(view), lambda: view)
  sigma = tf.random.stateless_uniform([], seeds[_BLUR_SIGMA], BLUR_SIGMA[0], BLUR_SIGMA[1])
  view = tf.cond(_coin(seeds[_BLUR_APPLY], BLUR_PROB), lambda: gaussian_blur(view, sigma),
                 lambda: view)
  view = tf.cond(_coin(seeds[_FLIP], FLIP_PROB), lambda: tf.reverse(view, axis=[1]),
                 lambda: view)
  view = tf.ensure_shape(view, [image_size, image_size, 3])
  return tf.cast(view, tf.uint8)


def eval_view(image: tf.Tensor, image_size: int, *, encoded: bool) -> tf.Tensor:
  """Decode (if ``encoded``) and ``center_crop``: uint8 ``(S, S, 3)``."""
  if encoded:
    image = tf.io.decode_image(image, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
  return center_crop(image, image_size)

"""The MoCo v2 training view as pure ``jax.numpy`` ops, run inside the jitted step.

``config.data.augment_on = 'device'`` (the default) moves the augmentation off the host: the
host decodes each image once (anchor and positive: two decodes per anchor instead of four
fused decode-and-crops), places it in a fixed-size uint8 *canvas* with its valid and original
sizes, and ships canvases and per-view seeds. Here, vectorised over every view of the batch:

    RandomResizedCrop(S, scale (0.2, 1), ratio (3/4, 4/3))   window of the ORIGINAL image
    RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)   random order
    RandomGrayscale(p=0.2)
    RandomApply([GaussianBlur([0.1, 2.0])], p=0.5)
    RandomHorizontalFlip()

Each op is the definition of ``bingo_jax/data/augment.py`` (the TF host ops, which are checked
     against PIL and torchvision; docs/data.md), written again in jnp: the same sampling
distribution, the same uint8 quantisation after every op (PIL stores every intermediate as
uint8), the same formulas. Only the random numbers differ (JAX's threefry instead of TF's
Philox), so a view is a pure function of ``(canvas, sizes, seed)``, and the seeds are pure
functions of ``(train.seed, global step)``: a resumed run sees exactly the straight run's views.

The antialiased resize is two small matrix products per view (one per axis) whose weights
are those of ``tf.image.resize(..., 'bilinear', antialias=True)`` on the cropped window:
the triangle filter, widened by the down-scaling factor, restricted to the window and
renormalised. The products run at ``Precision.HIGHEST`` so that bf16/TF32 matmul units do not
cost grey levels. A conditional op (jitter, grey, blur, flip) is computed for every view and
selected, so no shape or control flow depends on a draw.

Cost (XLA cost analysis, bench/input_pipeline.py): about 0.5 GFLOP per 224 px view from a
512 px canvas, mostly the resize, against about 97 GFLOP per anchor for the R-18 <- R-50x2
step.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

# The parameters are shared with the host path (bingo_jax/data/augment.py), in a module that
# imports no TensorFlow.
from bingo_jax.data.augment_params import (BLUR_KERNEL_RADIUS, BLUR_PROB, BLUR_SIGMA, CROP_ATTEMPTS,
                                           CROP_RATIO, CROP_SCALE, FLIP_PROB, GRAYSCALE_PROB,
                                           JITTER_PROB, JITTER_STRENGTH)
_LUMA_WEIGHTS_16 = (19595.0, 38470.0, 7471.0)

# Key slots of one view (each random decision has its own stream).
_CROP, _JITTER_APPLY, _JITTER_PARAMS, _GRAY, _BLUR_APPLY, _BLUR_SIGMA, _FLIP = range(7)
_NUM_KEYS = 7
_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------- shared helpers


def _quantise(image: jax.Array, mode: str = 'round') -> jax.Array:
  """float -> float holding uint8 values (PIL's storage after each op)."""
  image = jnp.clip(image, 0.0, 255.0)
  return jnp.floor(image) if mode == 'floor' else jnp.round(image)


def luma(image: jax.Array) -> jax.Array:
  """PIL ``convert('L')``: ``(..., 3) -> (...)``, ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``.

  Exact in float32 (the sum stays below 2^24), whatever order XLA sums in.
  """
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  weighted = (r * _LUMA_WEIGHTS_16[0] + g * _LUMA_WEIGHTS_16[1] + b * _LUMA_WEIGHTS_16[2]
              + float(1 << 15))
  return jnp.floor(weighted / float(1 << 16))


def grey_levels(image: jax.Array) -> jax.Array:
  """``luma`` of an RGB image ``(..., 3)``; a grey image ``(..., 1)`` is its own luma.

  For R = G = B = g (uint8 values), ``luma`` is ``floor(g + 1/2) = g`` exactly, so the
  one-channel form of a grey image gives the same values as its RGB form.
  """
  return image[..., 0] if image.shape[-1] == 1 else luma(image)


# ---------------------------------------------------------------- RandomResizedCrop


def sample_crop_window(key: jax.Array, height: jax.Array, width: jax.Array,
                       scale: tuple[float, float] = CROP_SCALE,
                       ratio: tuple[float, float] = CROP_RATIO) -> jax.Array:
  """torchvision ``RandomResizedCrop.get_params`` for one image of ``height x width``.

  Ten attempts drawn at once: area fraction ~ U(scale), log aspect ratio ~ U(log ratio),
  sides ``round(sqrt(area * ratio))`` x ``round(sqrt(area / ratio))``; the first attempt that
  fits is taken, at a uniform position; if none fits, the whole image clamped to the ratio
  range, centred. Sizes are those of the original image, not of its canvas.

  Args:
    key: PRNG key.
    height, width: int32 scalars, the original image size.
    scale, ratio: as torchvision.
  Returns:
    int32 ``(4,)``: ``[top, left, crop_height, crop_width]``.
  """
  height = jnp.asarray(height, jnp.int32)
  width = jnp.asarray(width, jnp.int32)
  area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
  area = (height * width).astype(jnp.float32)
  target_area = area * jax.random.uniform(area_key, (CROP_ATTEMPTS,), jnp.float32, scale[0],
                                          scale[1])
  aspect = jnp.exp(jax.random.uniform(ratio_key, (CROP_ATTEMPTS,), jnp.float32,
                                      math.log(ratio[0]), math.log(ratio[1])))
  # jnp.round rounds half to even, as Python's round() in torchvision.
  crop_widths = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
  crop_heights = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
  fits = ((crop_widths > 0) & (crop_widths <= width) & (crop_heights > 0)
          & (crop_heights <= height))
  first = jnp.argmax(fits)
  any_fits = jnp.any(fits)

  in_ratio = width.astype(jnp.float32) / height.astype(jnp.float32)
  fallback_width = jnp.where(in_ratio > ratio[1],
                             jnp.round(height.astype(jnp.float32) * ratio[1]).astype(jnp.int32),
                             width)
  fallback_height = jnp.where(in_ratio < ratio[0],
                              jnp.round(width.astype(jnp.float32) / ratio[0]).astype(jnp.int32),
                              height)
  crop_height = jnp.where(any_fits, crop_heights[first], fallback_height)
  crop_width = jnp.where(any_fits, crop_widths[first], fallback_width)
  # torch.randint(0, size - crop + 1).
  random_top = jax.random.randint(top_key, (), 0, height - crop_height + 1, jnp.int32)
  random_left = jax.random.randint(left_key, (), 0, width - crop_width + 1, jnp.int32)
  top = jnp.where(any_fits, random_top, (height - crop_height) // 2)
  left = jnp.where(any_fits, random_left, (width - crop_width) // 2)
  return jnp.stack([top, left, crop_height, crop_width])


def resize_weights(start: jax.Array, length: jax.Array, in_size: int,
                   out_size: int) -> jax.Array:
  """Antialiased bilinear weights of one axis: window ``[start, start + length)`` -> out_size.

  ``tf.image.resize(crop, ..., 'bilinear', antialias=True)`` samples output pixel ``o`` at
  ``(o + 0.5) * length / out_size`` of the crop with a triangle of half-width
  ``max(length / out_size, 1)`` and renormalises over the crop's pixels. Here the crop is a
  window of a larger canvas, so pixels whose centres lie outside the window get weight 0.

  Args:
    start, length: float32 scalars, the window in canvas pixels (fractional when the canvas
      holds a down-scaled image).
    in_size: the canvas side along this axis.
    out_size: the output side.
  Returns:
    float32 ``(out_size, in_size)``, rows summing to 1.
  """
  scale = length / out_size
  support = jnp.maximum(scale, 1.0)
  sample = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  centres = jnp.arange(in_size, dtype=jnp.float32) + 0.5
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(centres[None, :] - sample[:, None]) / support)
  inside = (centres >= start) & (centres < start + length)
  weights = jnp.where(inside[None, :], weights, 0.0)
  return weights / jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1e-12)


def crop_and_resize(canvas: jax.Array, window: jax.Array, image_size: int) -> jax.Array:
  """The window of a canvas resized to ``image_size`` (antialiased bilinear), rounded.

  Args:
    canvas: uint8 or float ``(Hc, Wc, C)``.
    window: float32 ``(4,)`` ``[top, left, height, width]`` in canvas pixels.
    image_size: S.
  Returns:
    float32 ``(S, S, C)`` holding uint8 values.
  """
  rows = resize_weights(window[0], window[2], canvas.shape[0], image_size)
  cols = resize_weights(window[1], window[3], canvas.shape[1], image_size)
  image = canvas.astype(jnp.float32)
  # Rows first: (S, Hc) x (Hc, Wc, 3), then (S, Wc) on the narrower intermediate.
  image = jnp.einsum('oh,hwc->owc', rows, image, precision=_HIGHEST)
  image = jnp.einsum('pw,owc->opc', cols, image, precision=_HIGHEST)
  return _quantise(image)


# ---------------------------------------------------------------- ColorJitter


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL ``ImageEnhance.Brightness``: ``floor(clip(factor * x))``."""
  return _quantise(image * factor, 'floor')


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL ``ImageEnhance.Contrast``: blend with the grey level ``int(mean(L) + 0.5)``."""
  mean = jnp.floor(jnp.mean(grey_levels(image)) + 0.5)
  return _quantise(mean + factor * (image - mean), 'floor')


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL ``ImageEnhance.Color``: blend with the image's own ``L`` conversion."""
  gray = grey_levels(image)[..., None]
  return _quantise(gray + factor * (image - gray), 'floor')


def adjust_hue(image: jax.Array, delta: jax.Array) -> jax.Array:
  """Rotates the HSV hue by ``delta`` turns (``tf.image.adjust_hue`` on ``image / 255``).

  A grey image (one channel) has no hue (chroma 0): it is returned as it is, which is what
  the RGB formula gives for R = G = B after rounding.
  """
  if image.shape[-1] == 1:
    return image
  x = image / 255.0
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  value = jnp.maximum(jnp.maximum(r, g), b)
  minimum = jnp.minimum(jnp.minimum(r, g), b)
  chroma = value - minimum
  safe = jnp.where(chroma > 0, chroma, 1.0)
  # Hue in sixths of a turn, as the hexcone model.
  hue = jnp.where(value == r, (g - b) / safe,
                  jnp.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
  hue = jnp.where(chroma > 0, hue, 0.0) / 6.0
  hue = jnp.mod(hue + delta, 1.0) * 6.0
  # hsv -> rgb: each channel n in (5, 3, 1) is v - c * clip(min(k, 4 - k), 0, 1),
  # k = (n + h) mod 6.
  def channel(n):
    k = jnp.mod(n + hue, 6.0)
    return value - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
  rgb = jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)
  return _quantise(rgb * 255.0)


def jitter_draws(key: jax.Array, strength: Sequence[float] = JITTER_STRENGTH
                 ) -> tuple[jax.Array, jax.Array]:
  """ColorJitter's random order (``torch.randperm(4)``) and its four factors.

  Returns:
    ``(order, factors)``: int32 ``(4,)`` a uniform permutation of the ops (brightness,
    contrast, saturation, hue), float32 ``(4,)``: brightness/contrast/saturation factors
    ~ U[1 - x, 1 + x], hue delta ~ U[-x, x].
  """
  order_key, factor_key = jax.random.split(key)
  order = jnp.argsort(jax.random.uniform(order_key, (4,))).astype(jnp.int32)
  brightness, contrast, saturation, hue = strength
  low = jnp.array([1 - brightness, 1 - contrast, 1 - saturation, -hue], jnp.float32)
  high = jnp.array([1 + brightness, 1 + contrast, 1 + saturation, hue], jnp.float32)
  return order, low + (high - low) * jax.random.uniform(factor_key, (4,))


def _blend(image: jax.Array, op: jax.Array, factors: jax.Array) -> jax.Array:
  """Brightness (op 0), contrast (1) or saturation (2): PIL's blend with a reference image
  (black, the mean grey level, the image's own grey), ``floor(clip(ref + f * (x - ref)))``."""
  gray = grey_levels(image)[..., None]
  mean = jnp.floor(jnp.mean(gray) + 0.5)
  reference = jnp.where(op == 0, 0.0, jnp.where(op == 1, mean, gray))
  return _quantise(reference + factors[jnp.minimum(op, 2)] * (image - reference), 'floor')


def color_jitter(image: jax.Array, order: jax.Array, factors: jax.Array) -> jax.Array:
  """The four jitter ops in ``order`` with ``factors`` (``jitter_draws``).

  Equal to applying ``adjust_brightness``, ``adjust_contrast``, ``adjust_saturation`` and
  ``adjust_hue`` one after the other in ``order``, but vectorisable without evaluating every
  op at every position (a ``switch`` under ``vmap`` computes all its branches): the three
  blends share one formula, and the hue rotation, the expensive op, runs once, between the
  blends that precede it and those that follow it. On a grey image (one channel) the
  saturation blend and the hue rotation are identities, and the hue rotation is skipped.
  """
  hue_position = jnp.argmax(order == 3)
  for position in range(3):  # the blends before the hue rotation: order[:hue_position]
    image = jnp.where(position < hue_position, _blend(image, order[position], factors), image)
  image = adjust_hue(image, factors[3])
  for rank in range(3):  # and after it: order[hue_position + 1:]
    position = hue_position + 1 + rank
    image = jnp.where(position < 4, _blend(image, order[jnp.minimum(position, 3)], factors),
                      image)
  return image


# ---------------------------------------------------------------- grayscale, blur


def to_grayscale(image: jax.Array) -> jax.Array:
  """PIL ``L`` luma replicated to three channels; a grey image (one channel) is unchanged."""
  if image.shape[-1] == 1:
    return image
  return jnp.repeat(luma(image)[..., None], 3, axis=-1)


def gaussian_kernel(sigma: jax.Array, radius: int = BLUR_KERNEL_RADIUS) -> jax.Array:
  """Normalised 1-D Gaussian ``(2 * radius + 1,)`` float32."""
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-0.5 * jnp.square(offsets / sigma))
  return weights / jnp.sum(weights)


def blur_matrix(sigma: jax.Array, size: int, radius: int = BLUR_KERNEL_RADIUS) -> jax.Array:
  """One axis of the Gaussian blur as a ``(size, size)`` matrix, edge pixels repeated.

  Row ``o`` holds the kernel's taps at the input pixels ``clip(o + t, 0, size - 1)``,
  ``t`` in ``[-radius, radius]``, so ``matrix @ column`` equals the padded convolution.
  """
  positions = jnp.clip(jnp.arange(size)[None, :] + jnp.arange(-radius, radius + 1)[:, None],
                       0, size - 1)  # (taps, size): a constant of the trace
  taps = jax.nn.one_hot(positions, size, dtype=jnp.float32)  # (taps, size, size)
  return jnp.einsum('t,toi->oi', gaussian_kernel(sigma, radius), taps, precision=_HIGHEST)


def gaussian_blur(image: jax.Array, sigma: jax.Array,
                  radius: int = BLUR_KERNEL_RADIUS) -> jax.Array:
  """Separable Gaussian blur, edge pixels repeated beyond the border; rounded to uint8 values.

  Each axis is one matrix product (``blur_matrix``): a product is computed once and stored,
  where a sum of shifted slices is fused by XLA into its consumers, which then recompute the
  jitter before it for every tap (measured: blur and flip took 5x the rest of the view on
  XLA:CPU that way).

  Args:
    image: float ``(H, W, C)``.
    sigma: standard deviation in pixels.
    radius: kernel half-width.
  Returns:
    float ``(H, W, C)``.
  """
  rows = blur_matrix(sigma, image.shape[0], radius)
  cols = blur_matrix(sigma, image.shape[1], radius)
  image = jnp.einsum('oh,hwc->owc', rows, image, precision=_HIGHEST)
  image = jnp.einsum('pw,owc->opc', cols, image, precision=_HIGHEST)
  return _quantise(image)


# ---------------------------------------------------------------- the MoCo v2 view


def canvas_window(window: jax.Array, sizes: jax.Array) -> jax.Array:
  """A window of the original image -> the same window in canvas pixels (float32 ``(4,)``).

  Args:
    window: int32 ``(4,)`` ``[top, left, h, w]`` in original pixels.
    sizes: int32 ``(4,)`` ``[valid_height, valid_width, original_height, original_width]``.
  """
  sizes = sizes.astype(jnp.float32)
  row_scale, col_scale = sizes[0] / sizes[2], sizes[1] / sizes[3]
  window = window.astype(jnp.float32)
  return jnp.stack([window[0] * row_scale, window[1] * col_scale, window[2] * row_scale,
                    window[3] * col_scale])


def view_draws(key: jax.Array, sizes: jax.Array) -> dict[str, jax.Array]:
  """Every random draw of one MoCo v2 view.

  Args:
    key: PRNG key (typed, or raw uint32 ``(2,)`` key data).
    sizes: int32 ``(4,)`` ``[valid_height, valid_width, original_height, original_width]``.
  Returns:
    ``window`` int32 ``(4,)`` (original pixels), ``jitter`` / ``gray`` / ``blur`` / ``flip``
    bool scalars (whether the op applies), ``order`` int32 ``(4,)`` and ``factors`` float32
    ``(4,)`` (``jitter_draws``), ``sigma`` float32 scalar.
  """
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  keys = jax.random.split(key, _NUM_KEYS)
  coin = lambda slot, p: jax.random.uniform(keys[slot]) < p  # noqa: E731
  order, factors = jitter_draws(keys[_JITTER_PARAMS])
  return {'window': sample_crop_window(keys[_CROP], sizes[2], sizes[3]),
          'jitter': coin(_JITTER_APPLY, JITTER_PROB), 'order': order, 'factors': factors,
          'gray': coin(_GRAY, GRAYSCALE_PROB), 'blur': coin(_BLUR_APPLY, BLUR_PROB),
          'sigma': jax.random.uniform(keys[_BLUR_SIGMA], (), jnp.float32, BLUR_SIGMA[0],
                                      BLUR_SIGMA[1]),
          'flip': coin(_FLIP, FLIP_PROB)}


def apply_view(canvas: jax.Array, sizes: jax.Array, draws: dict[str, jax.Array],
               image_size: int) -> jax.Array:
  """The MoCo v2 ops in torchvision's order with the given ``view_draws``.

  Args:
    canvas: uint8 ``(Hc, Wc, C)``, the image in its top-left ``valid_height x valid_width``;
      C = 3 (RGB) or 1 (a grey image, for which saturation, hue and RandomGrayscale are
      identities: the result is the RGB path's on the grey image replicated to three
      channels, one channel of it).
    sizes: int32 ``(4,)`` ``[valid_height, valid_width, original_height, original_width]``.
    draws: ``view_draws(key, sizes)``.
    image_size: output side S.
  Returns:
    uint8 ``(S, S, C)``.
  """
  view = crop_and_resize(canvas, canvas_window(draws['window'], sizes), image_size)
  view = jnp.where(draws['jitter'], color_jitter(view, draws['order'], draws['factors']), view)
  view = jnp.where(draws['gray'], to_grayscale(view), view)
  view = jnp.where(draws['blur'], gaussian_blur(view, draws['sigma']), view)
  view = jnp.where(draws['flip'], view[:, ::-1], view)
  return view.astype(jnp.uint8)


def moco_v2_view(canvas: jax.Array, sizes: jax.Array, key: jax.Array,
                 image_size: int) -> jax.Array:
  """One MoCo v2 view of one canvas (vmap it over views): ``apply_view(view_draws(key))``.

  Args:
    canvas: uint8 ``(Hc, Wc, C)``, C = 3 or 1 (``apply_view``).
    sizes: int32 ``(4,)`` ``[valid_height, valid_width, original_height, original_width]``.
    key: PRNG key (typed, or raw uint32 ``(2,)`` key data).
    image_size: output side S.
  Returns:
    uint8 ``(S, S, C)``.
  """
  return apply_view(canvas, sizes, view_draws(key, sizes), image_size)


def augment_views(canvases: jax.Array, sizes: jax.Array, keys: jax.Array,
                  image_size: int) -> jax.Array:
  """Several views of each canvas: ``keys[i, j]`` draws view ``j`` of canvas ``i``.

  Args:
    canvases: uint8 ``(N, Hc, Wc, C)``, C = 3 or 1 (grey images, ``apply_view``).
    sizes: int32 ``(N, 4)`` (``moco_v2_view``).
    keys: uint32 ``(N, V, 2)`` raw key data.
    image_size: S.
  Returns:
    uint8 ``(N, V, S, S, C)``. The canvas is not copied per view: the inner vmap shares it.
  """
  per_canvas = jax.vmap(moco_v2_view, in_axes=(None, None, 0, None))
  return jax.vmap(per_canvas, in_axes=(0, 0, 0, None))(canvases, sizes, keys, image_size)

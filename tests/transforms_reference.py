"""Reference samplers of torchvision's transforms, for the distribution tests of the host
(``bingo_jax.data.augment``) and device (``bingo_jax.data.device_augment``) augmentations.

torchvision has no CPU build in this environment, so the sampling is transcribed here.
"""

import math


def random_resized_crop_params(rng, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's ``RandomResizedCrop.get_params`` written out with numpy's RNG: up to 10
  tries of a scale and log-uniform aspect ratio, then the centre crop of the clamped ratio.
  Returns (top, left, height, width)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w

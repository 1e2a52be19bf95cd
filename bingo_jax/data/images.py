"""Image conventions shared by every stage.

Input pipelines hand uint8 NHWC images to the device (4x less host-to-device traffic than
float32, and what torchvision's PIL-based augmentations produce too); the jitted step turns
them into normalised floats with ``normalize``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# torchvision / MoCo / SwAV normalisation (docs/method.md §1).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# Evaluation preprocessing: resize the shorter side to 256, centre crop 224 (scaled
# proportionally for other input sizes).
CENTER_CROP_FRACTION = 224 / 256


def normalize(images: jax.Array, dtype=jnp.float32) -> jax.Array:
  """uint8 ``(..., height, width, 3)`` in [0, 255] -> mean/std-normalised ``dtype`` images."""
  x = images.astype(jnp.float32) / 255.0
  return ((x - IMAGENET_MEAN) / IMAGENET_STD).astype(dtype)

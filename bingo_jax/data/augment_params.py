"""The MoCo v2 augmentation's parameters (docs/method.md §2), shared by both view paths.

`bingo_jax.data.augment` (tf.data, on the host) and `bingo_jax.data.device_augment` (jnp, in
the step) read them from here, so the two paths cannot drift apart; this module imports neither
TensorFlow nor JAX.
"""

import math

CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10              # torchvision RandomResizedCrop.get_params
JITTER_PROB = 0.8
JITTER_STRENGTH = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
GRAYSCALE_PROB = 0.2
BLUR_PROB = 0.5
BLUR_SIGMA = (0.1, 2.0)
# Kernel half-width for the largest sigma: 3 sigma holds 99.7% of a Gaussian, and PIL's
# three-box approximation of GaussianBlur(radius=2) spans +-6 pixels too.
BLUR_KERNEL_RADIUS = int(math.ceil(3 * BLUR_SIGMA[1]))
FLIP_PROB = 0.5

"""``ArraySource``: images held in memory as one uint8 numpy array (TensorFlow-free import)."""

from __future__ import annotations

import hashlib
from typing import Iterable, Optional, Sequence

import numpy as np

from bingo_jax.data.sources.base import ImageSource, default_num_classes, tensorflow, to_rgb


class ArraySource(ImageSource):
  """Images held in memory as one uint8 array (small data sets, tests).

  Args:
    images: uint8 ``(N, H, W, 3)``, ``(N, H, W, 1)`` or ``(N, H, W)`` (grayscale, kept with
      one channel in memory and replicated to RGB when read).
    labels: optional ``(N,)`` integer class ids.
    num_classes: number of classes (default ``max(labels) + 1``).
    identifiers: optional ordered identifiers for the fingerprint. Default: the array's
      content (shape and bytes), so that two different arrays never share a fingerprint.
    description: for messages.
  """

  encoded = False

  def __init__(self, images: np.ndarray, labels: Optional[np.ndarray] = None, *,
               num_classes: Optional[int] = None,
               identifiers: Optional[Sequence[str]] = None,
               description: str = 'in-memory arrays'):
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f'{description}: images must be (N, H, W), (N, H, W, 1) or (N, H, W, 3), '
                       f'got shape {images.shape}.')
    if images.dtype != np.uint8:
      raise ValueError(f'{description}: images must be uint8, got {images.dtype}.')
    self._images = images
    super().__init__(description, labels=labels, num_classes=num_classes,
                     identifiers=identifiers)
    if num_classes is None:
      self._num_classes = default_num_classes(self._labels)
    self.image_shape = images.shape[1:3] + (3,)

  def __len__(self) -> int:
    return int(self._images.shape[0])

  def identifiers(self) -> Iterable[str]:
    if self._identifiers is not None:
      return iter(self._identifiers)
    # Content hash: arrays have no names, and a bag file must not match other arrays.
    return iter([f'array:{self._images.shape}:'
                 + hashlib.sha256(np.ascontiguousarray(self._images).data).hexdigest()])

  def _update_content_digest(self, digest) -> None:
    # The whole array: it is in memory, and hashing it costs less than a sample's decoding.
    digest.update(f'{self._images.shape}\n'.encode())
    digest.update(np.ascontiguousarray(self._images).data)

  def read(self, index: int) -> np.ndarray:
    return to_rgb(self._images[self._check_index(index)])

  def tf_read_batch(self, indices):
    tf = tensorflow()
    images = tf.gather(self.tf_constant('images', lambda: self._images),
                       tf.cast(indices, tf.int64))
    if self._images.shape[-1] == 1:
      images = tf.tile(images, [1, 1, 1, 3])
    return images

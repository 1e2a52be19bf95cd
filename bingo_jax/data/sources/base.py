"""``ImageSource``: the interface every stage reads images through (see the package docstring).

This module does not import TensorFlow: the numpy side of a source (``read``, ``labels``,
``fingerprint``) works without it, and only the tf.data hooks (``tf_read_batch``,
``tf_read_labeled_batch``) need it, through ``tensorflow()``.
"""

from __future__ import annotations

import abc
import hashlib
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np


def tensorflow():
  """The ``tensorflow`` module, imported on the first tf.data call.

  The base class and the in-memory array source must import where TensorFlow does not (an
  accelerator host that feeds arrays straight to the devices), so they reach TensorFlow
  through this function; the submodules that cannot work without it (``files``,
  ``tfds_source``) import it at their top instead.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


def fingerprint_of(identifiers: Iterable[str]) -> str:
  """sha256 hex digest of an ordered list of image identifiers (one per line)."""
  digest = hashlib.sha256()
  for identifier in identifiers:
    digest.update(identifier.encode('utf-8'))
    digest.update(b'\n')
  return digest.hexdigest()


# Images whose bytes go into a content fingerprint: enough to catch another copy of the data
# (other pixels under the same names), few enough to read at every start at ImageNet scale.
CONTENT_SAMPLE_SIZE = 128


def content_sample(num_images: int, size: int = CONTENT_SAMPLE_SIZE) -> np.ndarray:
  """The images a content fingerprint reads: ``size`` indices evenly spread over
  ``[0, num_images)`` (``i * N // size``; every image when there are at most ``size``)."""
  return np.unique(np.arange(size, dtype=np.int64) * num_images // size)


def to_rgb(image: np.ndarray) -> np.ndarray:
  """``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` -> ``(H, W, 3)`` (grayscale replicated)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image


def default_num_classes(labels: Optional[np.ndarray]) -> Optional[int]:
  """``max(labels) + 1``, or ``None`` without labels."""
  return int(labels.max()) + 1 if labels is not None and labels.size else None


class ImageSource(abc.ABC):
  """A finite, ordered list of images with random access.

  Subclasses hold the images and call ``super().__init__`` once ``len(self)`` works; labels,
  class count and identifiers live here. A subclass that computes them lazily (TFDS records,
  a range of another source) overrides the property.

  Args:
    description: what the source is, for messages (``"tfds imagenet2012 split 'train'"``).
    labels: optional ``(N,)`` integer class ids (stored as int64).
    num_classes: number of classes, or ``None``.
    identifiers: optional ordered ``N`` identifiers the fingerprint is computed from.

  Attributes:
    description: see above.
    encoded: ``tf_read_batch`` yields encoded bytes (True) or decoded uint8 images (False).
    image_shape: ``(H, W, 3)`` of every image when ``encoded`` is False, else ``None``.
  """
  encoded: bool = True
  image_shape: Optional[tuple] = None

  def __init__(self, description: str, *, labels: Optional[np.ndarray] = None,
               num_classes: Optional[int] = None,
               identifiers: Optional[Sequence[str]] = None):
    self.description = description
    if labels is not None:
      labels = np.asarray(labels).astype(np.int64)
      if labels.shape != (len(self),):
        raise ValueError(f'{description}: labels shape {labels.shape} does not match '
                         f'{len(self)} images.')
    if identifiers is not None and len(identifiers) != len(self):
      raise ValueError(f'{description}: {len(identifiers)} identifiers for {len(self)} images.')
    self._labels = labels
    self._num_classes = num_classes
    self._identifiers = identifiers
    self._fingerprint = None
    self._content_fingerprint = None
    self._tf_constants = {}

  @abc.abstractmethod
  def __len__(self) -> int:
    ...

  def identifiers(self) -> Iterable[str]:
    """The ordered image identifiers the fingerprint is computed from."""
    if self._identifiers is None:
      raise NotImplementedError(f'{type(self).__name__} has no identifiers.')
    return iter(self._identifiers)

  @property
  def fingerprint(self) -> str:
    if self._fingerprint is None:
      self._fingerprint = fingerprint_of(self.identifiers())
    return self._fingerprint

  @property
  def content_fingerprint(self) -> str:
    """sha256 of what the images hold, computed once: two copies of a data set with the same
    names and other pixels differ in it (``fingerprint`` names only the image list).

    Cheap at ImageNet scale: the ``content_sizes`` of every image, where the source has them
    (file sizes), and the ``content_bytes`` of ``content_sample(len(self))``.
    """
    if self._content_fingerprint is None:
      digest = hashlib.sha256(f'{len(self)} images\n'.encode())
      self._update_content_digest(digest)
      self._content_fingerprint = digest.hexdigest()
    return self._content_fingerprint

  def _update_content_digest(self, digest) -> None:
    """Feeds the content of the images to ``digest`` (a hashlib object)."""
    sizes = self.content_sizes()
    if sizes is not None:
      digest.update(np.asarray(sizes, np.int64).tobytes())
    for index in content_sample(len(self)):
      digest.update(f'{index}\n'.encode())
      digest.update(self.content_bytes(int(index)))

  def content_sizes(self) -> Optional[np.ndarray]:
    """``(N,)`` byte counts of the stored images (files), or ``None`` where there are none."""
    return None

  def content_bytes(self, index: int) -> bytes:
    """What image ``index`` holds, as stored (file bytes) or, by default, decoded pixels;
    ``b'undecodable'`` for an image that cannot be read (the fingerprint must not fail on
    the bad images ``data.on_bad_image='skip'`` trains past)."""
    try:
      image = np.ascontiguousarray(self.read(index))
    except Exception:  # pylint: disable=broad-except
      return b'undecodable'
    return f'{image.shape}:{image.dtype}\n'.encode() + image.tobytes()

  @property
  def labels(self) -> Optional[np.ndarray]:
    """``(N,)`` int64 class ids, or ``None`` for unlabelled data."""
    return self._labels

  @property
  def num_classes(self) -> Optional[int]:
    return self._num_classes

  @abc.abstractmethod
  def read(self, index: int) -> np.ndarray:
    """Image ``index`` as uint8 ``(H, W, 3)``."""

  @abc.abstractmethod
  def tf_read_batch(self, indices):
    """tf.data hook: int64 ``(n,)`` tensor of indices -> ``(n,)`` tf.string encoded images
    (``encoded``) or uint8 ``(n, H, W, 3)`` images. Pure TF ops, usable inside ``Dataset.map``.
    """

  def tf_read_labeled_batch(self, indices):
    """tf.data hook: ``(tf_read_batch(indices), labels)``, labels int64 ``(n,)`` (-1 when the
    source is unlabelled). Sources that store labels with the images read both at once."""
    tf = tensorflow()
    images = self.tf_read_batch(indices)
    if self.labels is None:
      return images, tf.fill(tf.shape(indices), tf.constant(-1, tf.int64))
    labels = self.tf_constant('labels', lambda: self.labels, tf.int64)
    return images, tf.gather(labels, tf.cast(indices, tf.int64))

  def tf_constant(self, name: str, make_value: Callable[[], Any], dtype=None):
    """An eager CPU tensor of ``make_value()``, made on the first call and kept.

    Eager: every traced map function captures it by reference instead of embedding the data
    in its graph as a constant (one copy, whatever the number of traces).
    """
    if name not in self._tf_constants:
      tf = tensorflow()
      with tf.init_scope(), tf.device('/CPU:0'):
        self._tf_constants[name] = tf.constant(make_value(), dtype)
    return self._tf_constants[name]

  def _check_index(self, index: int) -> int:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'Image index {index} out of range for {self.description} '
                       f'({len(self)} images).')
    return index

  def __repr__(self) -> str:
    return f'<{type(self).__name__} {self.description}: {len(self)} images>'

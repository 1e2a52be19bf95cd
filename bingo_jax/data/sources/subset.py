"""A contiguous range of another source: splits written ``train[:20000]`` (TensorFlow-free)."""

from __future__ import annotations

import itertools
import re
from typing import Iterable, Optional

import numpy as np

from bingo_jax.data.sources.base import ImageSource, tensorflow


class SubsetSource(ImageSource):
  """A contiguous range ``[start, stop)`` of another source (a split written ``train[:20000]``).

  Identifiers, and so the fingerprint, are those of the images in the range: bags made for a
  subset are refused for the full split and the other way round.

  Args:
    base: the full source.
    start, stop: the range of its indices.
    description: for messages.
  """

  def __init__(self, base: ImageSource, start: int, stop: int, description: str):
    if not 0 <= start < stop <= len(base):
      raise ValueError(f'{description}: range [{start}:{stop}] is empty or outside the '
                       f'{len(base)} images of {base.description}.')
    self.base, self.start, self.stop = base, start, stop
    super().__init__(description, num_classes=base.num_classes)
    self.encoded = base.encoded
    self.image_shape = base.image_shape

  def __len__(self) -> int:
    return self.stop - self.start

  def identifiers(self) -> Iterable[str]:
    return itertools.islice(self.base.identifiers(), self.start, self.stop)

  @property
  def labels(self) -> Optional[np.ndarray]:
    labels = self.base.labels
    return None if labels is None else labels[self.start:self.stop]

  def read(self, index: int) -> np.ndarray:
    return self.base.read(self.start + self._check_index(index))

  def content_sizes(self) -> Optional[np.ndarray]:
    sizes = self.base.content_sizes()
    return None if sizes is None else sizes[self.start:self.stop]

  def content_bytes(self, index: int) -> bytes:
    return self.base.content_bytes(self.start + index)

  def _base_indices(self, indices):
    tf = tensorflow()
    return tf.cast(indices, tf.int64) + self.start

  def tf_read_batch(self, indices):
    return self.base.tf_read_batch(self._base_indices(indices))

  def tf_read_labeled_batch(self, indices):
    return self.base.tf_read_labeled_batch(self._base_indices(indices))


_SLICED_SPLIT = re.compile(r'^(?P<split>[^\[\]]+)\[(?P<start>-?\d*%?):(?P<stop>-?\d*%?)\]$')


def parse_split(split: str) -> tuple[str, Optional[tuple[str, str]]]:
  """``'train[:20000]'`` -> ``('train', ('', '20000'))``; ``'train'`` -> ``('train', None)``."""
  if '[' not in split:
    return split, None
  match = _SLICED_SPLIT.match(split.strip())
  if not match:
    raise ValueError(f'Split {split!r} is not of the form name[start:stop] (integers or '
                     'percentages, as TFDS: "train[:20000]", "train[10%:]").')
  return match['split'], (match['start'], match['stop'])


def _resolve_bound(bound: str, size: int, default: int) -> int:
  if not bound:
    return default
  value = int(bound[:-1]) * size // 100 if bound.endswith('%') else int(bound)
  return max(0, min(size, value + size if value < 0 else value))


def slice_source(base: ImageSource, bounds: tuple[str, str]) -> SubsetSource:
  """The range of ``base`` that ``parse_split``'s ``bounds`` (integers or percentages) name."""
  start = _resolve_bound(bounds[0], len(base), 0)
  stop = _resolve_bound(bounds[1], len(base), len(base))
  return SubsetSource(base, start, stop, f'{base.description} [{start}:{stop}]')

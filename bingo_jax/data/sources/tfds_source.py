"""TFDS splits: read into memory (small data sets) or with random access from array_record files.

Needs TensorFlow and TensorFlow Datasets, imported here; ``make_source`` loads this module on
first use. Nothing here downloads: a data set that is not prepared locally is an error naming
``data_dir``.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bingo_jax.data.sources.arrays import ArraySource
from bingo_jax.data.sources.base import ImageSource, to_rgb
from bingo_jax.data.sources.files import EncodedSource, decode_to_numpy


def _identifiers(name: str, split: str, count: int) -> Iterable[str]:
  """``tfds:<name>:<split>:<index>``: the canonical record order of the split."""
  return (f'tfds:{name}:{split}:{i}' for i in range(count))


def _num_classes(features, label_key: Optional[str]) -> Optional[int]:
  if label_key is None or not hasattr(features[label_key], 'num_classes'):
    return None
  return int(features[label_key].num_classes)


class TfdsArrayRecordSource(ImageSource):
  """A TFDS split read with random access from its array_record files (large data sets).

  Images stay encoded (``SkipDecoding``); a tf.data map decodes them, fused with the crop.
  Labels are read on first use of ``.labels`` (one pass over the records).

  Args:
    builder: the split's ``tfds`` builder.
    name, split: for identifiers and messages.
    image_key, label_key: the features holding the image and the label (or ``None``).
  """

  encoded = True

  def __init__(self, builder, name: str, split: str, image_key: str, label_key: Optional[str]):
    description = f"tfds {name} split '{split}' (array_record)"
    try:
      self._data_source = builder.as_data_source(
          split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:
      prepared = bool(builder.info.splits)
      raise ValueError(
          f'Cannot open TFDS {name!r} split {split!r} for random access in '
          f'{builder.data_dir}: {type(e).__name__}: {e}. '
          + ('' if prepared else 'The data set is not prepared there (nothing is downloaded '
             'here: set data.data_dir to where it is). ')
          + 'Random access needs the array_record format (tfds build '
          '--file_format=array_record); for a small data set set data.in_memory=True '
          'instead.') from e
    super().__init__(description, num_classes=_num_classes(builder.info.features, label_key))
    self._name, self._split = name, split
    self._image_key, self._label_key = image_key, label_key
    self._batched_reads = True

  def __len__(self) -> int:
    return len(self._data_source)

  def identifiers(self) -> Iterable[str]:
    return _identifiers(self._name, self._split, len(self))

  @property
  def labels(self) -> Optional[np.ndarray]:
    if self._label_key is None:
      return None
    if self._labels is None:
      logging.info('Reading the labels of %s (one pass over the records).', self.description)
      self._labels = np.fromiter(
          (int(self._data_source[i][self._label_key]) for i in range(len(self))),
          dtype=np.int64, count=len(self))
    return self._labels

  def _read_records(self, indices: np.ndarray) -> list:
    indices = [int(i) for i in indices]
    records = None
    if self._batched_reads:
      try:
        records = self._data_source.__getitems__(indices)
      except (AttributeError, TypeError):  # no batched reads (e.g. tfds.testing.mock_data)
        self._batched_reads = False
    if records is None:
      records = [self._data_source[i] for i in indices]
    return records

  def _encoded_image(self, record) -> bytes:
    image = record[self._image_key]
    if not isinstance(image, bytes):  # a decoded array (e.g. tfds.testing.mock_data)
      image = tf.io.encode_png(to_rgb(np.asarray(image, np.uint8))).numpy()
    return image

  def read(self, index: int) -> np.ndarray:
    return decode_to_numpy(
        self._encoded_image(self._read_records([self._check_index(index)])[0]))

  def tf_read_batch(self, indices):
    # One Python call per batch (array_record reads the records of a batch in parallel).
    encoded = tf.numpy_function(
        lambda idx: np.array([self._encoded_image(r) for r in self._read_records(idx)],
                             dtype=object), [indices], tf.string, stateful=False)
    encoded.set_shape(indices.shape)
    return encoded

  def tf_read_labeled_batch(self, indices):
    if self._label_key is None:
      return super().tf_read_labeled_batch(indices)

    def read(idx):
      records = self._read_records(idx)
      return (np.array([self._encoded_image(r) for r in records], dtype=object),
              np.array([int(r[self._label_key]) for r in records], np.int64))

    # Labels come with the images: no separate pass over the records (see ``labels``).
    encoded, labels = tf.numpy_function(read, [indices], (tf.string, tf.int64), stateful=False)
    encoded.set_shape(indices.shape)
    labels.set_shape(indices.shape)
    return encoded, labels


def _feature_keys(name: str, features, image_key: Optional[str],
                  label_key: Optional[str]) -> tuple[str, Optional[str]]:
  """The image and label feature names: given ones checked, else the first image / 'label'."""
  if image_key is None:
    image_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    if not image_keys:
      raise ValueError(f'TFDS {name!r} has no image feature (features: {list(features)}); set '
                       'data.image_key.')
    image_key = image_keys[0]
  if image_key not in features:
    raise ValueError(f'TFDS {name!r} has no feature data.image_key={image_key!r} '
                     f'(features: {list(features)}).')
  if label_key is None and 'label' in features:
    label_key = 'label'
  if label_key is not None and label_key not in features:
    raise ValueError(f'TFDS {name!r} has no feature data.label_key={label_key!r} '
                     f'(features: {list(features)}).')
  return image_key, label_key


def _in_memory_source(builder, name: str, split: str, image_key: str,
                      label_key: Optional[str]) -> ImageSource:
  """The whole split read into memory: decoded if the image shape is fixed, else encoded."""
  description = f"tfds {name} split '{split}' (in memory)"
  features = builder.info.features
  fixed_shape = all(d is not None for d in features[image_key].shape)
  keys = [image_key] + ([label_key] if label_key else [])
  try:
    dataset = builder.as_dataset(
        split=split, shuffle_files=False,
        # One file at a time: record order = the canonical index order of the split (the
        # same indices as the array_record source and as the fingerprint's identifiers).
        read_config=tfds.ReadConfig(interleave_cycle_length=1),
        decoders=None if fixed_shape else {image_key: tfds.decode.SkipDecoding()})
  except Exception as e:
    raise ValueError(f'Cannot read TFDS {name!r} split {split!r} from '
                     f'{builder.data_dir} (no network here: the data set must be prepared '
                     f'locally, see data.data_dir): {type(e).__name__}: {e}') from e
  dataset = dataset.map(lambda ex: {k: ex[k] for k in keys}).batch(1024)
  images, labels = [], []
  for batch in dataset.as_numpy_iterator():
    images.append(batch[image_key])
    if label_key:
      labels.append(batch[label_key])
  if not images:
    raise ValueError(f'{description}: the split is empty.')
  images = np.concatenate(images)
  labels = np.concatenate(labels).astype(np.int64) if label_key else None
  num_classes = _num_classes(features, label_key)
  identifiers = list(_identifiers(name, split, len(images)))
  if fixed_shape:
    return ArraySource(images, labels, num_classes=num_classes, identifiers=identifiers,
                       description=description)
  return EncodedSource(images.tolist(), labels, num_classes, identifiers, description)


def make_tfds_source(name: str, split: str, data_dir: Optional[str], in_memory: bool,
                image_key: Optional[str], label_key: Optional[str]) -> ImageSource:
  """A TFDS split (``data.source='tfds'``).

  Args:
    name: the TFDS data set (``data.name``).
    split: its split (no ``[start:stop]`` range: ``make_source`` handles those).
    data_dir: TFDS data directory (``data.data_dir``).
    in_memory: read the whole split into memory, else random access (array_record).
    image_key, label_key: feature names (default: the first Image feature, ``'label'``).
  Returns:
    An ``ArraySource`` / ``EncodedSource`` (in memory) or a ``TfdsArrayRecordSource``.
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:
    raise ValueError(f'Unknown or unreadable TFDS data set data.name={name!r} '
                     f'(data_dir={data_dir!r}): {type(e).__name__}: {e}') from e
  image_key, label_key = _feature_keys(name, builder.info.features, image_key, label_key)
  if not in_memory:
    return TfdsArrayRecordSource(builder, name, split, image_key, label_key)
  return _in_memory_source(builder, name, split, image_key, label_key)


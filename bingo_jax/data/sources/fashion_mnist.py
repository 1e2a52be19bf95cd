"""Fashion-MNIST: TFDS ``fashion_mnist`` when prepared locally, else the IDX ``.gz`` files.

The IDX path needs neither TensorFlow nor TFDS (an ``ArraySource``); TFDS, and ``tfds_source``
(TensorFlow), are loaded only to look for a prepared data set and to read it.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import os
import struct
from typing import Optional

import numpy as np

from bingo_jax.data.sources.arrays import ArraySource
from bingo_jax.data.sources.base import ImageSource

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
_FILE_PREFIX = {'train': 'train', 'test': 't10k'}


def read_idx(path: str) -> np.ndarray:
  """An IDX file (MNIST format), gzip-compressed or not."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f'{path} is not an unsigned-byte IDX file.')
  ndim = data[3]
  shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise ValueError(f'{path}: header says shape {shape} but holds {array.size} values.')
  return array.reshape(shape)


def _tfds_prepared(name: str, data_dir: Optional[str]) -> bool:
  """Whether a TFDS data set is prepared locally (checked without any network access).

  ``False`` on a host without TensorFlow or TFDS, found without importing either (TFDS's
  import fails noisily without TensorFlow): such a host reads the IDX files.
  """
  if any(importlib.util.find_spec(module) is None
         for module in ('tensorflow', 'tensorflow_datasets')):
    return False
  tfds = importlib.import_module('tensorflow_datasets')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    return bool(builder.info.splits) and os.path.isdir(builder.data_dir)
  except Exception:  # not registered, no metadata, unreadable: not available.
    return False


def fashion_mnist_source(split: str, data_dir: Optional[str] = None,
                         files_dir: Optional[str] = None, in_memory: bool = True) -> ImageSource:
  """Fashion-MNIST: from TFDS when it is prepared locally, else from the IDX ``.gz`` files.

  Args:
    split: ``'train'`` or ``'test'``.
    data_dir: TFDS data directory to look in.
    files_dir: directory of ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (default: the
      Debian package's ``/usr/share/datasets/fashion-mnist``).
    in_memory: for the TFDS path.
  Returns:
    A source of 28x28 grayscale images (read as RGB), 10 classes. The two paths order the
    images differently (TFDS shuffles at preparation), so their identifiers differ too.
  """
  if _tfds_prepared('fashion_mnist', data_dir):
    tfds_source = importlib.import_module('bingo_jax.data.sources.tfds_source')
    return tfds_source.make_tfds_source('fashion_mnist', split, data_dir, in_memory, 'image',
                                        'label')
  if split not in _FILE_PREFIX:
    raise ValueError(f'Fashion-MNIST split {split!r} unknown; use one of '
                     f'{sorted(_FILE_PREFIX)}.')
  files_dir = files_dir or FASHION_MNIST_DIR
  prefix = _FILE_PREFIX[split]
  image_file = os.path.join(files_dir, f'{prefix}-images-idx3-ubyte.gz')
  label_file = os.path.join(files_dir, f'{prefix}-labels-idx1-ubyte.gz')
  for path in (image_file, label_file):
    if not os.path.isfile(path):
      raise FileNotFoundError(f'Fashion-MNIST file {path} not found and TFDS fashion_mnist is '
                              'not prepared locally (set data.path to the directory of the '
                              '.gz files).')
  images, labels = read_idx(image_file), read_idx(label_file)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f'{image_file} has {images.shape[0]} images but {label_file} has '
                     f'{labels.shape[0]} labels.')
  base = os.path.basename(image_file)
  return ArraySource(images, labels.astype(np.int64), num_classes=10,
                     identifiers=[f'{base}:{i}' for i in range(images.shape[0])],
                     description=f"Fashion-MNIST files {files_dir} split '{split}'")

"""Image data sources with random access: TFDS, image folders, file lists, Fashion-MNIST, arrays.

Every stage reads images through one interface, ``ImageSource`` (``base``):

* ``len(source)``, ``source.labels`` (``(N,)`` int64 or ``None``), ``source.num_classes``;
* ``source.fingerprint``: sha256 of the ordered image identifiers (file paths relative to the
  data root, ``'tfds:<name>:<split>:<index>'``, ...). Bag files record it, so the training
  pipeline refuses bags made for another image list (``Bags.check_matches``);
* ``source.read(i)``: one image as uint8 ``(H, W, 3)`` numpy (grayscale replicated to RGB);
* ``source.tf_read_batch(indices)``: the tf.data hook. Returns either encoded image bytes
  (``source.encoded``: decode in the map, fused with the crop for JPEG) or decoded uint8
  images of one fixed shape. Random access is what lets the training pipeline fetch each
  anchor's positive (an arbitrary other image) without holding ImageNet in memory.

``make_source(config.data, split)`` builds the source a config names; ``ArraySource`` wraps
numpy arrays (tests, small demos).

Modules: ``base`` (the interface), ``arrays`` (``ArraySource``), ``subset`` (``train[:N]``
ranges), ``files`` (folders, file lists, encoded bytes), ``tfds_source`` (TFDS),
``fashion_mnist``. Importing this package does not import TensorFlow: ``base``, ``arrays`` and
``subset`` reach it only in their tf.data hooks, and the other modules, which need TensorFlow
or TFDS, are loaded on first use (by ``make_source`` or by reading one of their names here).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bingo_jax.data.sources.arrays import ArraySource
from bingo_jax.data.sources.base import ImageSource, fingerprint_of
from bingo_jax.data.sources.subset import SubsetSource, parse_split, slice_source

if TYPE_CHECKING:
  from bingo_jax.data.sources.fashion_mnist import FASHION_MNIST_DIR, fashion_mnist_source
  from bingo_jax.data.sources.files import (IMAGE_EXTENSIONS, EncodedSource, FileListSource,
                                            decode_image, filelist_source, folder_source)
  from bingo_jax.data.sources.tfds_source import TfdsArrayRecordSource

SOURCES = ('tfds', 'folder', 'filelist', 'fashion_mnist', 'arrays')

# Names of the modules loaded on first use -> their module.
_LAZY_NAMES = {
    'IMAGE_EXTENSIONS': 'files', 'EncodedSource': 'files', 'FileListSource': 'files',
    'decode_image': 'files', 'filelist_source': 'files', 'folder_source': 'files',
    'TfdsArrayRecordSource': 'tfds_source',
    'FASHION_MNIST_DIR': 'fashion_mnist', 'fashion_mnist_source': 'fashion_mnist',
}


__all__ = ['ArraySource', 'ImageSource', 'SOURCES', 'SubsetSource', 'fingerprint_of',
           'make_source', 'parse_split', 'slice_source', *_LAZY_NAMES]


def _module(name: str):
  return importlib.import_module(f'{__name__}.{name}')


def __getattr__(name: str) -> Any:
  if name in _LAZY_NAMES:
    return getattr(_module(_LAZY_NAMES[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list:
  return sorted(set(globals()) | set(_LAZY_NAMES))


def make_source(data_config, split: str) -> ImageSource:
  """The image source ``config.data`` describes, for one split.

  Args:
    data_config: ``config.data`` (keys: ``source``, ``name``, ``data_dir``, ``path``,
      ``root``, ``in_memory``, ``image_key``, ``label_key``; see configs/common.py).
    split: split name (``config.data.train_split`` / ``eval_split``). For ``folder`` and
      ``filelist`` sources ``data.path`` may contain ``'{split}'``; otherwise ``path/split`` is
      used when it exists, else ``path`` itself.
      A split may select a contiguous range as TFDS does: ``train[:20000]``, ``train[50%:]``
      (``SubsetSource``).
  Returns:
    An ``ImageSource``; its ``on_bad_image`` attribute carries ``data.on_bad_image`` to the
    pipelines that read it (bingo_jax/data/bad_images.py).
  """
  source = _make_source(data_config, split)
  policy = data_config.get('on_bad_image', None) or 'error'
  if policy not in ('error', 'skip'):
    raise ValueError(f"config.data.on_bad_image = {policy!r}; expected 'error' or 'skip'.")
  source.on_bad_image = policy
  return source


def _make_source(data_config, split: str) -> ImageSource:
  base_split, bounds = parse_split(split)
  if bounds is not None:
    return slice_source(make_source(data_config, base_split), bounds)
  get = lambda key, default=None: data_config.get(key, default)  # noqa: E731
  kind = get('source')
  if kind == 'tfds':
    return _module('tfds_source').make_tfds_source(
        get('name'), split, get('data_dir'), bool(get('in_memory', False)), get('image_key'),
        get('label_key'))
  if kind == 'folder':
    files = _module('files')
    return files.folder_source(files.split_path(get('path'), split))
  if kind == 'filelist':
    files = _module('files')
    return files.filelist_source(files.split_path(get('path'), split), get('root'))
  if kind == 'fashion_mnist':
    return _module('fashion_mnist').fashion_mnist_source(split, get('data_dir'), get('path'),
                                                         True)
  if kind == 'arrays':
    raise ValueError("data.source='arrays' has no files to read: build "
                     'data_sources.ArraySource(images, labels) in code.')
  raise ValueError(f'Unknown data.source={kind!r}; expected one of {SOURCES}.')

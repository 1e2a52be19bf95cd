"""Image data sources with random access: TFDS, image folders, file lists, Fashion-MNIST, arrays.

Every stage reads images through one interface, ``ImageSource``:

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
"""

from __future__ import annotations

import abc
import itertools
import gzip
import hashlib
import logging
import os
import re
import struct
from typing import Iterable, Optional, Sequence

import numpy as np

# File types tf.io.decode_image reads (torchvision's ImageFolder list minus ppm/pgm/tif, which
# TF cannot decode).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
_FASHION_MNIST_FILES = {'train': 'train', 'test': 't10k'}
SOURCES = ('tfds', 'folder', 'filelist', 'fashion_mnist', 'arrays')


def fingerprint_of(identifiers: Iterable[str]) -> str:
  """sha256 hex digest of an ordered list of image identifiers (one per line)."""
  digest = hashlib.sha256()
  for identifier in identifiers:
    digest.update(identifier.encode('utf-8'))
    digest.update(b'\n')
  return digest.hexdigest()


def decode_image(encoded):
  """tf: encoded image bytes (JPEG, PNG, BMP, GIF, WebP) -> uint8 ``(H, W, 3)`` tensor."""
  import tensorflow as tf
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _decode_numpy(encoded: bytes) -> np.ndarray:
  import tensorflow as tf
  return decode_image(tf.constant(encoded)).numpy()


def _to_rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image


class ImageSource(abc.ABC):
  """A finite, ordered list of images with random access (see module docstring).

  Attributes:
    description: what the source is, for messages (``"tfds imagenet2012 split 'train'"``).
    encoded: ``tf_read_batch`` yields encoded bytes (True) or decoded uint8 images (False).
    image_shape: ``(H, W, 3)`` of every image when ``encoded`` is False, else ``None``.
  """
  description: str = 'image source'
  encoded: bool = True
  image_shape: Optional[tuple] = None

  @abc.abstractmethod
  def __len__(self) -> int:
    ...

  @abc.abstractmethod
  def identifiers(self) -> Iterable[str]:
    """The ordered image identifiers the fingerprint is computed from."""

  @property
  def fingerprint(self) -> str:
    if getattr(self, '_fingerprint', None) is None:
      self._fingerprint = fingerprint_of(self.identifiers())
    return self._fingerprint

  @property
  def labels(self) -> Optional[np.ndarray]:
    """``(N,)`` int64 class ids, or ``None`` for unlabelled data."""
    return None

  @property
  def num_classes(self) -> Optional[int]:
    return None

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
    import tensorflow as tf
    images = self.tf_read_batch(indices)
    if self.labels is None:
      return images, tf.fill(tf.shape(indices), tf.constant(-1, tf.int64))
    if getattr(self, '_tf_labels', None) is None:
      with tf.init_scope(), tf.device('/CPU:0'):
        self._tf_labels = tf.constant(self.labels, tf.int64)
    return images, tf.gather(self._tf_labels, tf.cast(indices, tf.int64))

  def _check_index(self, index: int) -> int:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'Image index {index} out of range for {self.description} '
                       f'({len(self)} images).')
    return index

  def __repr__(self) -> str:
    return f'<{type(self).__name__} {self.description}: {len(self)} images>'


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
    if labels is not None:
      labels = np.asarray(labels).astype(np.int64)
      if labels.shape != (images.shape[0],):
        raise ValueError(f'{description}: labels shape {labels.shape} does not match '
                         f'{images.shape[0]} images.')
    if identifiers is not None and len(identifiers) != images.shape[0]:
      raise ValueError(f'{description}: {len(identifiers)} identifiers for '
                       f'{images.shape[0]} images.')
    self._images = images
    self._labels = labels
    self._num_classes = (num_classes if num_classes is not None else
                         (int(labels.max()) + 1 if labels is not None and labels.size else None))
    self._identifiers = identifiers
    self.description = description
    self.image_shape = images.shape[1:3] + (3,)
    self._tf_images = None

  def __len__(self) -> int:
    return int(self._images.shape[0])

  def identifiers(self) -> Iterable[str]:
    if self._identifiers is not None:
      return iter(self._identifiers)
    # Content hash: arrays have no names, and a bag file must not match other arrays.
    return iter([f'array:{self._images.shape}:'
                 + hashlib.sha256(np.ascontiguousarray(self._images).data).hexdigest()])

  @property
  def labels(self) -> Optional[np.ndarray]:
    return self._labels

  @property
  def num_classes(self) -> Optional[int]:
    return self._num_classes

  def read(self, index: int) -> np.ndarray:
    return _to_rgb(self._images[self._check_index(index)])

  def tf_read_batch(self, indices):
    import tensorflow as tf
    if self._tf_images is None:
      # Eager tensor, captured by reference by every traced map function (not embedded in
      # the graph as a constant).
      with tf.init_scope(), tf.device('/CPU:0'):
        self._tf_images = tf.constant(self._images)
    images = tf.gather(self._tf_images, tf.cast(indices, tf.int64))
    if self._images.shape[-1] == 1:
      images = tf.tile(images, [1, 1, 1, 3])
    return images


class EncodedSource(ImageSource):
  """Encoded images (bytes) held in memory, e.g. a small TFDS data set of variable-size JPEGs."""

  encoded = True

  def __init__(self, encoded: Sequence[bytes], labels: Optional[np.ndarray],
               num_classes: Optional[int], identifiers: Sequence[str], description: str):
    self._encoded = np.asarray(list(encoded), dtype=object)
    self._labels = None if labels is None else np.asarray(labels, np.int64)
    self._num_classes = num_classes
    self._identifiers = identifiers
    self.description = description
    self._tf_encoded = None

  def __len__(self) -> int:
    return int(self._encoded.shape[0])

  def identifiers(self) -> Iterable[str]:
    return iter(self._identifiers)

  @property
  def labels(self) -> Optional[np.ndarray]:
    return self._labels

  @property
  def num_classes(self) -> Optional[int]:
    return self._num_classes

  def read(self, index: int) -> np.ndarray:
    return _decode_numpy(self._encoded[self._check_index(index)])

  def tf_read_batch(self, indices):
    import tensorflow as tf
    if self._tf_encoded is None:
      with tf.init_scope(), tf.device('/CPU:0'):
        self._tf_encoded = tf.constant(self._encoded.tolist(), dtype=tf.string)
    return tf.gather(self._tf_encoded, tf.cast(indices, tf.int64))


class FileListSource(ImageSource):
  """Image files read on demand (ImageNet-scale folders and file lists).

  Args:
    root: directory that relative paths are relative to.
    relative_paths: ordered paths relative to ``root`` (the identifiers); absolute paths are
      allowed and kept as given.
    labels: optional ``(N,)`` class ids.
    num_classes: number of classes.
    description: for messages.
  """

  encoded = True

  def __init__(self, root: str, relative_paths: Sequence[str], labels: Optional[np.ndarray],
               num_classes: Optional[int], description: str):
    if not relative_paths:
      raise ValueError(f'{description}: no images found.')
    self.root = root
    self._relative_paths = list(relative_paths)
    self._paths = [os.path.join(root, p) for p in self._relative_paths]
    self._labels = None if labels is None else np.asarray(labels, np.int64)
    self._num_classes = num_classes
    self.description = description
    self._tf_paths = None

  def __len__(self) -> int:
    return len(self._paths)

  def identifiers(self) -> Iterable[str]:
    return iter(self._relative_paths)

  @property
  def paths(self) -> list:
    return list(self._paths)

  @property
  def labels(self) -> Optional[np.ndarray]:
    return self._labels

  @property
  def num_classes(self) -> Optional[int]:
    return self._num_classes

  def read(self, index: int) -> np.ndarray:
    path = self._paths[self._check_index(index)]
    with open(path, 'rb') as f:
      data = f.read()
    try:
      return _decode_numpy(data)
    except Exception as e:
      raise ValueError(f'Cannot decode image file {path} ({self.description}): {e}') from e

  def tf_read_batch(self, indices):
    import tensorflow as tf
    if self._tf_paths is None:
      with tf.init_scope(), tf.device('/CPU:0'):
        self._tf_paths = tf.constant(self._paths, dtype=tf.string)
    paths = tf.gather(self._tf_paths, tf.cast(indices, tf.int64))
    # parallel_iterations: the reads of one batch overlap (I/O bound on network storage).
    return tf.map_fn(tf.io.read_file, paths, fn_output_signature=tf.string,
                     parallel_iterations=16)


class TfdsArrayRecordSource(ImageSource):
  """A TFDS split read with random access from its array_record files (large data sets).

  Images stay encoded (``SkipDecoding``); a tf.data map decodes them, fused with the crop.
  Labels are read on first use of ``.labels`` (one pass over the records).
  """

  encoded = True

  def __init__(self, builder, name: str, split: str, image_key: str, label_key: Optional[str]):
    import tensorflow_datasets as tfds
    self.description = f"tfds {name} split '{split}' (array_record)"
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
    self._name, self._split = name, split
    self._image_key, self._label_key = image_key, label_key
    features = builder.info.features
    self._num_classes = (int(features[label_key].num_classes)
                         if label_key is not None and hasattr(features[label_key], 'num_classes')
                         else None)
    self._labels = None
    self._batched_reads = True

  def __len__(self) -> int:
    return len(self._data_source)

  def identifiers(self) -> Iterable[str]:
    return (f'tfds:{self._name}:{self._split}:{i}' for i in range(len(self)))

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

  @property
  def num_classes(self) -> Optional[int]:
    return self._num_classes

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
      import tensorflow as tf
      image = tf.io.encode_png(_to_rgb(np.asarray(image, np.uint8))).numpy()
    return image

  def read(self, index: int) -> np.ndarray:
    return _decode_numpy(self._encoded_image(self._read_records([self._check_index(index)])[0]))

  def tf_read_batch(self, indices):
    import tensorflow as tf
    # One Python call per batch (array_record reads the records of a batch in parallel).
    encoded = tf.numpy_function(
        lambda idx: np.array([self._encoded_image(r) for r in self._read_records(idx)],
                             dtype=object), [indices], tf.string, stateful=False)
    encoded.set_shape(indices.shape)
    return encoded

  def tf_read_labeled_batch(self, indices):
    import tensorflow as tf
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


def _tfds_source(name: str, split: str, data_dir: Optional[str], in_memory: bool,
                 image_key: Optional[str], label_key: Optional[str]) -> ImageSource:
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:
    raise ValueError(f'Unknown or unreadable TFDS data set data.name={name!r} '
                     f'(data_dir={data_dir!r}): {type(e).__name__}: {e}') from e
  features = builder.info.features
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
  if not in_memory:
    return TfdsArrayRecordSource(builder, name, split, image_key, label_key)

  description = f"tfds {name} split '{split}' (in memory)"
  image_shape = features[image_key].shape
  fixed_shape = all(d is not None for d in image_shape)
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
  labels = np.concatenate(labels).astype(np.int64) if label_key else None
  num_classes = (int(features[label_key].num_classes)
                 if label_key and hasattr(features[label_key], 'num_classes') else None)
  identifiers = [f'tfds:{name}:{split}:{i}' for i in range(sum(len(b) for b in images))]
  if fixed_shape:
    return ArraySource(np.concatenate(images), labels, num_classes=num_classes,
                       identifiers=identifiers, description=description)
  return EncodedSource(np.concatenate(images).tolist(), labels, num_classes, identifiers,
                       description)


def _split_path(path: Optional[str], split: str, key: str = 'data.path') -> str:
  """``path`` with ``{split}`` filled in, or ``path/split`` if that exists, else ``path``."""
  if not path:
    raise ValueError(f'{key} must be set for this data source (a folder root or file list; '
                     "it may contain '{split}').")
  if '{split}' in path:
    return path.format(split=split)
  candidate = os.path.join(path, split)
  if os.path.exists(candidate):
    return candidate
  logging.warning("%s=%s has no '{split}' and no %r entry: using it for split %r.",
                  key, path, split, split)
  return path


def folder_source(root: str) -> FileListSource:
  """ImageNet-style ``root/<class>/**/<image>``: labels from the sorted class directories.

  Files are listed as torchvision's ``ImageFolder`` lists them (classes sorted, then
  ``sorted(os.walk(class_dir))`` with file names sorted, following links), so the image
  indices agree with the released PyTorch code's data set on the same folder.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Image folder {root} does not exist (data.path).')
  classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
  if not classes:
    raise ValueError(f'Image folder {root} has no class sub-directories.')
  relative_paths, labels = [], []
  for label, class_name in enumerate(classes):
    class_dir = os.path.join(root, class_name)
    for directory, _, files in sorted(os.walk(class_dir, followlinks=True)):
      for file_name in sorted(files):
        if file_name.lower().endswith(IMAGE_EXTENSIONS):
          relative_paths.append(os.path.relpath(os.path.join(directory, file_name), root))
          labels.append(label)
  if not relative_paths:
    raise ValueError(f'Image folder {root} has no image files ({", ".join(IMAGE_EXTENSIONS)}).')
  return FileListSource(root, relative_paths, np.asarray(labels, np.int64), len(classes),
                        f'image folder {root}')


def filelist_source(list_path: str, root: Optional[str] = None) -> FileListSource:
  """A text file of ``path [label]`` lines (blank lines and ``#`` comments skipped).

  Relative paths are relative to ``root`` (default: the list file's directory). Either every
  line has an integer label or none has.
  """
  if not os.path.isfile(list_path):
    raise FileNotFoundError(f'File list {list_path} does not exist (data.path).')
  root = root or os.path.dirname(os.path.abspath(list_path))
  paths, labels = [], []
  with open(list_path) as f:
    for line_number, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith('#'):
        continue
      fields = line.rsplit(maxsplit=1)
      label = None
      if len(fields) == 2:
        try:
          label = int(fields[1])
        except ValueError:
          fields = [line]  # a path containing a space, no label
      if label is not None and label < 0:
        raise ValueError(f'{list_path}:{line_number}: negative label {label}.')
      paths.append(fields[0])
      labels.append(label)
  has_label = [label is not None for label in labels]
  if any(has_label) and not all(has_label):
    first = has_label.index(False) if has_label[0] else has_label.index(True)
    raise ValueError(f'{list_path}: some lines have a label and some do not (first '
                     f'differing entry: {paths[first]!r}); label every line or none.')
  labels = np.asarray(labels, np.int64) if paths and all(has_label) else None
  return FileListSource(root, paths, labels,
                        int(labels.max()) + 1 if labels is not None else None,
                        f'file list {list_path}')


def _read_idx(path: str) -> np.ndarray:
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
  """Whether a TFDS data set is prepared locally (checked without any network access)."""
  import tensorflow_datasets as tfds
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
    return _tfds_source('fashion_mnist', split, data_dir, in_memory, 'image', 'label')
  if split not in _FASHION_MNIST_FILES:
    raise ValueError(f'Fashion-MNIST split {split!r} unknown; use one of '
                     f'{sorted(_FASHION_MNIST_FILES)}.')
  files_dir = files_dir or FASHION_MNIST_DIR
  prefix = _FASHION_MNIST_FILES[split]
  image_file = os.path.join(files_dir, f'{prefix}-images-idx3-ubyte.gz')
  label_file = os.path.join(files_dir, f'{prefix}-labels-idx1-ubyte.gz')
  for path in (image_file, label_file):
    if not os.path.isfile(path):
      raise FileNotFoundError(f'Fashion-MNIST file {path} not found and TFDS fashion_mnist is '
                              'not prepared locally (set data.path to the directory of the '
                              '.gz files).')
  images, labels = _read_idx(image_file), _read_idx(label_file)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f'{image_file} has {images.shape[0]} images but {label_file} has '
                     f'{labels.shape[0]} labels.')
  base = os.path.basename(image_file)
  return ArraySource(images, labels.astype(np.int64), num_classes=10,
                     identifiers=[f'{base}:{i}' for i in range(images.shape[0])],
                     description=f"Fashion-MNIST files {files_dir} split '{split}'")


class SubsetSource(ImageSource):
  """A contiguous range ``[start, stop)`` of another source (a split written ``train[:20000]``).

  Identifiers, and so the fingerprint, are those of the images in the range: bags made for a
  subset are refused for the full split and the other way round.
  """

  def __init__(self, base: ImageSource, start: int, stop: int, description: str):
    if not 0 <= start < stop <= len(base):
      raise ValueError(f'{description}: range [{start}:{stop}] is empty or outside the '
                       f'{len(base)} images of {base.description}.')
    self.base, self.start, self.stop = base, start, stop
    self.description = description
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

  @property
  def num_classes(self) -> Optional[int]:
    return self.base.num_classes

  def read(self, index: int) -> np.ndarray:
    return self.base.read(self.start + self._check_index(index))

  def tf_read_batch(self, indices):
    import tensorflow as tf
    return self.base.tf_read_batch(tf.cast(indices, tf.int64) + self.start)

  def tf_read_labeled_batch(self, indices):
    import tensorflow as tf
    return self.base.tf_read_labeled_batch(tf.cast(indices, tf.int64) + self.start)


_SLICED_SPLIT = re.compile(r'^(?P<split>[^\[\]]+)\[(?P<start>-?\d*%?):(?P<stop>-?\d*%?)\]$')


def _parse_split(split: str) -> tuple[str, Optional[tuple[str, str]]]:
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
    An ``ImageSource``.
  """
  base_split, bounds = _parse_split(split)
  if bounds is not None:
    base = make_source(data_config, base_split)
    start = _resolve_bound(bounds[0], len(base), 0)
    stop = _resolve_bound(bounds[1], len(base), len(base))
    return SubsetSource(base, start, stop, f'{base.description} [{start}:{stop}]')
  get = lambda key, default=None: data_config.get(key, default)  # noqa: E731
  kind = get('source')
  if kind == 'tfds':
    return _tfds_source(get('name'), split, get('data_dir'), bool(get('in_memory', False)),
                        get('image_key'), get('label_key'))
  if kind == 'folder':
    return folder_source(_split_path(get('path'), split))
  if kind == 'filelist':
    return filelist_source(_split_path(get('path'), split), get('root'))
  if kind == 'fashion_mnist':
    return fashion_mnist_source(split, get('data_dir'), get('path'), True)
  if kind == 'arrays':
    raise ValueError("data.source='arrays' has no files to read: build "
                     'data_sources.ArraySource(images, labels) in code.')
  raise ValueError(f'Unknown data.source={kind!r}; expected one of {SOURCES}.')

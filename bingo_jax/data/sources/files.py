"""Encoded images: image folders and file lists read on demand, encoded bytes held in memory.

These sources hand tf.data encoded bytes (decoded in the map, fused with the crop for JPEG),
so the module needs TensorFlow and imports it here; ``make_source`` loads it on first use.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from bingo_jax.data.sources.base import ImageSource, default_num_classes

# File types tf.io.decode_image reads (torchvision's ImageFolder list minus ppm/pgm/tif, which
# TF cannot decode).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')


def decode_image(encoded):
  """tf: encoded image bytes (JPEG, PNG, BMP, GIF, WebP) -> uint8 ``(H, W, 3)`` tensor."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def decode_to_numpy(encoded: bytes) -> np.ndarray:
  """Encoded image bytes -> uint8 ``(H, W, 3)`` numpy (``decode_image``, run eagerly)."""
  return decode_image(tf.constant(encoded)).numpy()


class EncodedSource(ImageSource):
  """Encoded images (bytes) held in memory, e.g. a small TFDS data set of variable-size JPEGs.

  Args:
    encoded: ``N`` encoded images.
    labels, num_classes, identifiers, description: as ``ImageSource``.
  """

  encoded = True

  def __init__(self, encoded: Sequence[bytes], labels: Optional[np.ndarray],
               num_classes: Optional[int], identifiers: Sequence[str], description: str):
    self._encoded = np.asarray(list(encoded), dtype=object)
    super().__init__(description, labels=labels, num_classes=num_classes,
                     identifiers=identifiers)

  def __len__(self) -> int:
    return int(self._encoded.shape[0])

  def content_sizes(self) -> np.ndarray:
    return np.array([len(e) for e in self._encoded], np.int64)

  def content_bytes(self, index: int) -> bytes:
    return bytes(self._encoded[index])

  def read(self, index: int) -> np.ndarray:
    return decode_to_numpy(self._encoded[self._check_index(index)])

  def tf_read_batch(self, indices):
    encoded = self.tf_constant('encoded', self._encoded.tolist, tf.string)
    return tf.gather(encoded, tf.cast(indices, tf.int64))


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
    relative_paths = list(relative_paths)
    self._paths = [os.path.join(root, p) for p in relative_paths]
    super().__init__(description, labels=labels, num_classes=num_classes,
                     identifiers=relative_paths)

  def __len__(self) -> int:
    return len(self._paths)

  def content_sizes(self) -> Optional[np.ndarray]:
    """The size of every file: one ``stat`` each, seconds for ImageNet on a local disk;
    ``None`` for URLs, where a ``stat`` is a request."""
    if '://' in self._paths[0]:
      return None
    return np.array([os.path.getsize(path) for path in self._paths], np.int64)

  def content_bytes(self, index: int) -> bytes:
    with tf.io.gfile.GFile(self._paths[index], 'rb') as f:
      return f.read()

  def read(self, index: int) -> np.ndarray:
    path = self._paths[self._check_index(index)]
    with open(path, 'rb') as f:
      data = f.read()
    try:
      return decode_to_numpy(data)
    except Exception as e:
      raise ValueError(f'Cannot decode image file {path} ({self.description}): {e}') from e

  def tf_read_batch(self, indices):
    paths = tf.gather(self.tf_constant('paths', lambda: self._paths, tf.string),
                      tf.cast(indices, tf.int64))
    # parallel_iterations: the reads of one batch overlap (I/O bound on network storage).
    return tf.map_fn(tf.io.read_file, paths, fn_output_signature=tf.string,
                     parallel_iterations=16)


def split_path(path: Optional[str], split: str, key: str = 'data.path') -> str:
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


def _read_file_list(list_path: str) -> tuple[list, list]:
  """The ``(paths, labels)`` of a file list's ``path [label]`` lines (label ``None`` if absent)."""
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
  return paths, labels


def filelist_source(list_path: str, root: Optional[str] = None) -> FileListSource:
  """A text file of ``path [label]`` lines (blank lines and ``#`` comments skipped).

  Relative paths are relative to ``root`` (default: the list file's directory). Either every
  line has an integer label or none has.
  """
  if not os.path.isfile(list_path):
    raise FileNotFoundError(f'File list {list_path} does not exist (data.path).')
  root = root or os.path.dirname(os.path.abspath(list_path))
  paths, labels = _read_file_list(list_path)
  has_label = [label is not None for label in labels]
  if any(has_label) and not all(has_label):
    first = has_label.index(False) if has_label[0] else has_label.index(True)
    raise ValueError(f'{list_path}: some lines have a label and some do not (first '
                     f'differing entry: {paths[first]!r}); label every line or none.')
  labels = np.asarray(labels, np.int64) if paths and all(has_label) else None
  return FileListSource(root, paths, labels, default_num_classes(labels),
                        f'file list {list_path}')

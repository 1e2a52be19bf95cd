"""Bag files: for every image, the set of images the teacher considers similar to it.

One format holds both kinds of bags the offline stage produces (docs/method.md §1):

* fixed-size bags (``knn``, ``approx``, ``jax``, ``random-teacher``): ``neighbors (N, k) int32``,
  row ``i`` being the k nearest images of anchor ``i`` (never ``i`` itself);
* variable-size bags (``kmeans``, ``labels``): the images are partitioned into groups and the
  bag of an anchor is its group minus itself. Members are never listed per anchor (ImageNet
  label bags would be 1.28M x ~1300 entries); instead::

      group_of           (N,)    int32  group id of every image
      group_offsets      (G+1,)  int64  group g's members are group_members[offsets[g]:offsets[g+1]]
      group_members      (N,)    int32  image ids sorted by group (ascending within a group)
      position_in_group  (N,)    int64  where image i sits inside its group's slice

A bag file is a ``.npz`` written under a temporary name and renamed into place (atomic); its
metadata (method, k or C, teacher, feature dim, number of images, fingerprint of the image
list and of the images' content, creation time) is a JSON string stored inside it, so the
training input pipeline can refuse a bag file made for other data (``Bags.check_matches``).
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
from typing import Any, Optional

import numpy as np
from absl import logging

from bingo_jax.store import fileio

FORMAT_VERSION = 1
_WARNED_WITHOUT_CONTENT = set()  # bag files already warned about, one line per file
_METADATA_KEY = 'metadata_json'
_FIXED_KEYS = ('neighbors',)
_GROUP_KEYS = ('group_of', 'group_offsets', 'group_members', 'position_in_group')
KINDS = ('fixed', 'groups')


@dataclasses.dataclass(eq=False)
class Bags:
  """Bags of similar images for every anchor of a data set.

  Build them with ``Bags.from_neighbors`` or ``Bags.from_groups``; read them with
  ``load_bags``.

  Attributes:
    kind: ``'fixed'`` (``neighbors`` set) or ``'groups'`` (the four group arrays set).
    metadata: JSON-serialisable record; always has ``method``, ``num_images``,
      ``fingerprint``, ``created`` and ``format_version``.
    neighbors: ``(N, k)`` int32, fixed-size bags only.
    group_of: ``(N,)`` int32, group bags only.
    group_offsets: ``(G + 1,)`` int64, group bags only.
    group_members: ``(N,)`` int32, group bags only.
    position_in_group: ``(N,)`` int64, group bags only.
    path: the file the bags were loaded from (``None`` for bags built in memory).
  """
  kind: str
  metadata: dict
  neighbors: Optional[np.ndarray] = None
  group_of: Optional[np.ndarray] = None
  group_offsets: Optional[np.ndarray] = None
  group_members: Optional[np.ndarray] = None
  position_in_group: Optional[np.ndarray] = None
  path: Optional[str] = None

  # ---- construction ----

  @classmethod
  def from_neighbors(cls, neighbors: np.ndarray, *, method: str, fingerprint: str,
                     **metadata: Any) -> 'Bags':
    """Fixed-size bags from a neighbour table.

    Args:
      neighbors: ``(N, k)`` integer array of image ids in ``[0, N)``; row ``i`` must not
        contain ``i``.
      method: how the bags were made (``'knn'``, ``'jax'``, ...).
      fingerprint: fingerprint of the image list the ids refer to (``source.fingerprint``).
      **metadata: further JSON-serialisable record (``teacher``, ``feature_dim``, ...).
    Returns:
      ``Bags`` of kind ``'fixed'``; ``metadata['k']`` is set from the table.
    """
    neighbors = np.ascontiguousarray(neighbors, dtype=np.int32)
    record = _make_metadata(method, neighbors.shape[0], fingerprint, k=int(neighbors.shape[1]),
                            **metadata)
    bags = cls(kind='fixed', metadata=record, neighbors=neighbors)
    bags._validate()
    return bags

  @classmethod
  def from_groups(cls, group_of: np.ndarray, *, method: str, fingerprint: str,
                  **metadata: Any) -> 'Bags':
    """Variable-size bags from a partition of the images (cluster or class of every image).

    Args:
      group_of: ``(N,)`` non-negative integer group id of every image. Ids need not be
        contiguous; empty ids simply give empty groups.
      method: how the groups were made (``'kmeans'``, ``'labels'``).
      fingerprint: fingerprint of the image list (``source.fingerprint``).
      **metadata: further JSON-serialisable record (``num_clusters``, ``teacher``, ...).
    Returns:
      ``Bags`` of kind ``'groups'``; ``metadata['num_groups']`` is the number of group ids.
    """
    group_of = np.asarray(group_of)
    if group_of.ndim != 1:
      raise ValueError(f'group_of must be 1-D (one group per image), got shape {group_of.shape}.')
    if group_of.size and group_of.min() < 0:
      raise ValueError(f'group_of has negative group ids (min {group_of.min()}).')
    group_of = group_of.astype(np.int32)
    num_groups = int(group_of.max()) + 1 if group_of.size else 0
    # A stable sort keeps members of a group in ascending image order.
    group_members = np.argsort(group_of, kind='stable').astype(np.int32)
    counts = np.bincount(group_of, minlength=num_groups)
    group_offsets = np.zeros(num_groups + 1, np.int64)
    np.cumsum(counts, out=group_offsets[1:])
    position_in_group = np.empty(group_of.shape[0], np.int64)
    position_in_group[group_members] = (np.arange(group_of.shape[0], dtype=np.int64)
                                        - group_offsets[group_of[group_members]])
    record = _make_metadata(method, group_of.shape[0], fingerprint, num_groups=num_groups,
                            **metadata)
    bags = cls(kind='groups', metadata=record, group_of=group_of, group_offsets=group_offsets,
               group_members=group_members, position_in_group=position_in_group)
    bags._validate()
    return bags

  # ---- queries ----

  @property
  def num_images(self) -> int:
    if self.kind == 'fixed':
      return int(self.neighbors.shape[0])
    return int(self.group_of.shape[0])

  @property
  def method(self) -> str:
    return self.metadata.get('method', '?')

  @property
  def fingerprint(self) -> str:
    return self.metadata.get('fingerprint', '')

  @property
  def content_fingerprint(self) -> Optional[str]:
    """``source.content_fingerprint`` of the images bagged (``None`` in older bag files)."""
    return self.metadata.get('content_fingerprint')

  def _name(self) -> str:
    return self.path if self.path is not None else f'<in-memory {self.method} bags>'

  def bag_size(self, anchor_index: int) -> int:
    """Number of members of the anchor's bag (the anchor itself not counted)."""
    if self.kind == 'fixed':
      return int(self.neighbors.shape[1])
    group = self.group_of[anchor_index]
    return int(self.group_offsets[group + 1] - self.group_offsets[group]) - 1

  def members(self, anchor_index: int) -> np.ndarray:
    """The bag of ``anchor_index``: ``(bag_size,)`` int image ids, never the anchor itself."""
    if not 0 <= anchor_index < self.num_images:
      raise IndexError(f'anchor {anchor_index} out of range for {self.num_images} images '
                       f'({self._name()}).')
    if self.kind == 'fixed':
      return self.neighbors[anchor_index].copy()
    group = self.group_of[anchor_index]
    start, stop = self.group_offsets[group], self.group_offsets[group + 1]
    members = self.group_members[start:stop]
    return np.delete(members, self.position_in_group[anchor_index])

  def check_matches(self, num_images: int, fingerprint: str, what: str,
                    content_fingerprint: Optional[str] = None) -> None:
    """Refuses bags made for other data.

    Args:
      num_images: number of images of the data about to be used with these bags.
      fingerprint: that data's fingerprint (``source.fingerprint``).
      what: a description of that data for the message, e.g. ``"training split 'train' of
        tfds imagenet2012"``.
      content_fingerprint: that data's ``source.content_fingerprint`` (what the images hold),
        or ``None`` not to compare it. Bag files made before bag files recorded it are
        accepted with a warning: their images are matched by name only.
    Raises:
      ValueError: naming the bag file and both values when the count or a fingerprint
        differs.
    """
    problems = []
    if int(num_images) != self.num_images:
      problems.append(f'it has bags for {self.num_images} images but {what} has {num_images}')
    if str(fingerprint) != self.fingerprint:
      problems.append(f'its image-list fingerprint is {self.fingerprint!r} but {what} has '
                      f'{fingerprint!r}')
    recorded = self.metadata.get('content_fingerprint')
    if content_fingerprint is not None and not problems:
      if recorded is None:
        if self._name() not in _WARNED_WITHOUT_CONTENT:
          _WARNED_WITHOUT_CONTENT.add(self._name())
          logging.warning('Bag file %s records no content fingerprint (made before bag files '
                          'did): its images are matched to %s by name only. Recompute the '
                          'bags (python -m bingo_jax.bagging) to check the pixels too.',
                          self._name(), what)
      elif str(content_fingerprint) != recorded:
        problems.append(f'the images differ: same names, but its content fingerprint is '
                        f'{recorded!r} and {what} has {content_fingerprint!r}')
    if problems:
      raise ValueError(
          f'Bag file {self._name()} does not belong to {what}: ' + '; '.join(problems)
          + f'. It was made by method {self.method!r} on {self.metadata.get("created", "?")}; '
          'recompute the bags for this data (python -m bingo_jax.bagging).')

  # ---- positive sampling ----

  def sample_positive(self, anchor_index: int, rng: np.random.Generator) -> int:
    """Numpy twin of ``tf_sample_positive``: a uniform draw from the anchor's bag.

    A singleton group (an image alone in its cluster or class) has an empty bag; the anchor
    itself is returned then, i.e. the positive is another view of the same image.
    """
    if self.kind == 'fixed':
      return int(self.neighbors[anchor_index, rng.integers(self.neighbors.shape[1])])
    group = self.group_of[anchor_index]
    start, stop = self.group_offsets[group], self.group_offsets[group + 1]
    size = int(stop - start)
    if size <= 1:
      return int(anchor_index)
    draw = int(rng.integers(size - 1))
    draw += draw >= self.position_in_group[anchor_index]  # skip the anchor's own slot
    return int(self.group_members[start + draw])

  def tf_sample_positive(self, anchor_index, seed):
    """Draws a positive for ``anchor_index`` uniformly from its bag, statelessly (tf.data map).

    docs/method.md §2: the positive is drawn afresh each time the anchor is seen, so callers
    pass a seed that changes per epoch and per example (e.g. from ``tf.data`` enumerate).

    For group bags a draw ``r`` in ``[0, size - 1)`` skips the anchor's own position, so every
    other member has probability ``1 / (size - 1)``; a singleton group returns the anchor.

    Args:
      anchor_index: scalar int64 ``tf.Tensor``.
      seed: ``(2,)`` int64 ``tf.Tensor`` for ``tf.random.stateless_uniform``.
    Returns:
      scalar int64 ``tf.Tensor``: the positive's image id.
    """
    import tensorflow as tf  # only the input pipeline needs TF; keep load_bags light.
    tables = self._tf_tables()
    anchor_index = tf.cast(anchor_index, tf.int64)
    if self.kind == 'fixed':
      neighbors = tables['neighbors']
      draw = tf.random.stateless_uniform([], seed=seed, minval=0,
                                         maxval=tf.cast(tf.shape(neighbors)[1], tf.int64),
                                         dtype=tf.int64)
      return tf.cast(neighbors[anchor_index, draw], tf.int64)
    group = tf.cast(tf.gather(tables['group_of'], anchor_index), tf.int64)
    start = tf.gather(tables['group_offsets'], group)
    size = tf.gather(tables['group_offsets'], group + 1) - start
    # maxval must exceed minval even for singletons; the draw is discarded for them.
    draw = tf.random.stateless_uniform([], seed=seed, minval=0,
                                       maxval=tf.maximum(size - 1, 1), dtype=tf.int64)
    own_position = tf.gather(tables['position_in_group'], anchor_index)
    draw += tf.cast(draw >= own_position, tf.int64)
    other = tf.cast(tf.gather(tables['group_members'],
                              start + tf.minimum(draw, tf.maximum(size - 1, 0))), tf.int64)
    return tf.where(size > 1, other, anchor_index)

  def _tf_tables(self) -> dict:
    # Created once and captured by every traced map function, rather than re-embedding the
    # arrays as graph constants in each trace.
    if getattr(self, '_tf_cache', None) is None:
      import tensorflow as tf
      keys = _FIXED_KEYS if self.kind == 'fixed' else _GROUP_KEYS
      # init_scope: eager tensors even when first called while tracing a tf.data map.
      with tf.init_scope(), tf.device('/CPU:0'):
        self._tf_cache = {key: tf.constant(getattr(self, key)) for key in keys}
    return self._tf_cache

  # ---- integrity ----

  def _validate(self) -> None:
    name = self._name()
    if self.kind not in KINDS:
      raise ValueError(f'{name}: unknown bag kind {self.kind!r}; expected one of {KINDS}.')
    if self.kind == 'fixed':
      neighbors = self.neighbors
      if neighbors is None or neighbors.ndim != 2:
        raise ValueError(f'{name}: neighbors must be a (N, k) array, got '
                         f'{None if neighbors is None else neighbors.shape}.')
      n = neighbors.shape[0]
      if neighbors.size and (neighbors.min() < 0 or neighbors.max() >= n):
        raise ValueError(f'{name}: neighbor ids must lie in [0, {n}), found '
                         f'[{neighbors.min()}, {neighbors.max()}].')
      own = np.nonzero((neighbors == np.arange(n)[:, None]).any(axis=1))[0]
      if own.size:
        raise ValueError(f'{name}: {own.size} anchors list themselves as neighbours '
                         f'(first: {own[0]}).')
    else:
      for key in _GROUP_KEYS:
        if getattr(self, key) is None or getattr(self, key).ndim != 1:
          raise ValueError(f'{name}: {key} must be a 1-D array.')
      n = self.group_of.shape[0]
      offsets = self.group_offsets
      if (self.group_members.shape[0] != n or self.position_in_group.shape[0] != n
          or offsets.shape[0] < 1 or offsets[0] != 0 or offsets[-1] != n
          or np.any(np.diff(offsets) < 0)):
        raise ValueError(f'{name}: inconsistent group arrays (group_of {self.group_of.shape}, '
                         f'group_members {self.group_members.shape}, position_in_group '
                         f'{self.position_in_group.shape}, group_offsets from {offsets[:1]} to '
                         f'{offsets[-1:]}; expected offsets 0..{n}, non-decreasing).')
      if n:
        groups = self.group_of.astype(np.int64)
        if groups.min() < 0 or groups.max() >= offsets.shape[0] - 1:
          raise ValueError(f'{name}: group ids must lie in [0, {offsets.shape[0] - 1}).')
        slots = offsets[groups] + self.position_in_group
        if (np.any(self.position_in_group < 0) or np.any(slots >= offsets[groups + 1])
            or np.any(self.group_members[slots] != np.arange(n))):
          raise ValueError(f'{name}: group_members / position_in_group do not agree with '
                           'group_of.')
    if int(self.metadata.get('num_images', -1)) != n:
      raise ValueError(f'{name}: metadata says {self.metadata.get("num_images")} images but '
                       f'the arrays hold {n}.')


def _make_metadata(method: str, num_images: int, fingerprint: str, **extra: Any) -> dict:
  record = {key: value for key, value in extra.items() if value is not None}
  record.update(method=str(method), num_images=int(num_images), fingerprint=str(fingerprint),
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec='seconds'),
                format_version=FORMAT_VERSION)
  json.dumps(record)  # fail here, not half-way through a save, on unserialisable values.
  return record


def save_bags(path: str, bags: Bags) -> str:
  """Writes ``bags`` to ``path`` atomically (``fileio.atomic_write``).

  Args:
    path: destination file (conventionally ``*.npz``; the name is used as given), local or
      a URL.
    bags: the bags to store.
  Returns:
    The absolute path written.
  """
  keys = _FIXED_KEYS if bags.kind == 'fixed' else _GROUP_KEYS
  arrays = {key: getattr(bags, key) for key in keys}
  record = dict(bags.metadata, kind=bags.kind)
  arrays[_METADATA_KEY] = np.array(json.dumps(record, sort_keys=True))
  return fileio.atomic_write(path, lambda f: np.savez(f, **arrays))


def load_bags(path: str) -> Bags:
  """Reads a bag file written by ``save_bags``.

  Args:
    path: the bag file, local or a URL.
  Returns:
    ``Bags`` with ``.path`` set.
  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a bag file, is corrupt or misses arrays (the message names it).
  """
  path = fileio.absolute(path)
  if not fileio.isfile(path):
    raise FileNotFoundError(f'Bag file {path} does not exist; compute bags with '
                            'python -m bingo_jax.bagging first.')
  try:
    # Read whole, then parsed from memory: np.load needs a seekable file, which a remote
    # object's stream need not be.
    with fileio.open_file(path, 'rb') as f:
      data = io.BytesIO(f.read())
    with np.load(data, allow_pickle=False) as contents:
      stored = {key: contents[key] for key in contents.files}
  except Exception as e:  # zipfile / format errors come in many types.
    raise ValueError(f'{path} is not a readable bag file (.npz): {type(e).__name__}: {e}') from e
  if _METADATA_KEY not in stored:
    raise ValueError(f'{path} is not a bag file: it has no {_METADATA_KEY!r} entry (found '
                     f'{sorted(stored)}).')
  try:
    record = json.loads(str(stored.pop(_METADATA_KEY)))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: the bag metadata is not valid JSON: {e}') from e
  if record.get('format_version') != FORMAT_VERSION:
    raise ValueError(f'{path}: unsupported bag file format_version '
                     f'{record.get("format_version")!r} (this code reads {FORMAT_VERSION}).')
  kind = record.pop('kind', None)
  if kind not in KINDS:
    raise ValueError(f'{path}: unknown bag kind {kind!r}; expected one of {KINDS}.')
  keys = _FIXED_KEYS if kind == 'fixed' else _GROUP_KEYS
  missing = [key for key in keys if key not in stored]
  if missing:
    raise ValueError(f'{path}: {kind} bag file misses arrays {missing}.')
  dtypes = {'neighbors': np.int32, 'group_of': np.int32, 'group_offsets': np.int64,
            'group_members': np.int32, 'position_in_group': np.int64}
  arrays = {}
  for key in keys:
    if not np.issubdtype(stored[key].dtype, np.integer):
      raise ValueError(f'{path}: {key} has dtype {stored[key].dtype}, expected integers.')
    arrays[key] = stored[key].astype(dtypes[key], copy=False)
  bags = Bags(kind=kind, metadata=record, path=path, **arrays)
  bags._validate()
  return bags

"""Images that cannot be decoded: found, named, and (``config.data.on_bad_image='skip'``)
replaced by a deterministic other image (docs/reliability.md).

tf.data decodes inside its graph, where an undecodable file raises a bare
``InvalidArgumentError`` that names neither the file nor the batch, from whichever batch hits
it. The input pipelines therefore catch that error at the batch level and ask
``find_bad_images`` which of the batch's images fail to decode (each one decoded again in
Python, through the source's own ``read``), so that the error names the data source, the index
and the file.

With ``'skip'`` the pipeline rebuilds itself from the failing batch with the bad images
remapped (``Replacements``): each bad image is read as the next image of the source after it
that decodes. The replacement depends only on which images are bad, never on when they were
found, so a resumed run reads the same images as an uninterrupted one.

Every decode path (the training and evaluation pipelines, the on-device augmentation and
canvas paths, ``python -m bingo_jax.data_check``) goes through ``find_bad_images`` and
``BadImageError``.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from absl import logging

POLICIES = ('error', 'skip')


class BadImageError(ValueError):
  """Images of a data source that cannot be decoded (the message names them)."""

  def __init__(self, message: str, bad: Sequence[tuple[int, str, str]] = ()):
    super().__init__(message)
    self.bad = list(bad)


def identifier(source: Any, index: int) -> str:
  """The file (or record) name of image ``index``, or ``'#index'``."""
  identifiers = getattr(source, '_identifiers', None)  # ImageSource keeps them as a list
  if not hasattr(identifiers, '__getitem__'):
    identifiers = getattr(source, 'identifiers', None)
    if callable(identifiers):
      try:
        identifiers = identifiers()
      except NotImplementedError:
        identifiers = None
  try:
    if hasattr(identifiers, '__getitem__'):
      return str(identifiers[index])
    for position, name in enumerate(identifiers or ()):
      if position == index:
        return str(name)
  except (IndexError, TypeError):
    pass
  return f'#{index}'


def decode_problem(source: Any, index: int) -> Optional[str]:
  """None if image ``index`` of ``source`` decodes, else the decoder's one-line complaint."""
  try:
    image = np.asarray(source.read(int(index)))
  except Exception as e:  # pylint: disable=broad-except
    message = str(e).strip().splitlines()
    return f'{type(e).__name__}: {message[0] if message else "(no message)"}'
  if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
    return f'decoded to shape {image.shape}, not (H, W, 3)'
  return None


def find_bad_images(source: Any, indices: Iterable[int], workers: int = 0
                    ) -> list[tuple[int, str, str]]:
  """Which of ``indices`` fail to decode.

  Args:
    source: an ``ImageSource`` (``read(i)`` decodes image ``i`` as the pipelines do).
    indices: image indices (duplicates and negative padding indices are ignored).
    workers: decode threads (0: one per CPU core, at most 16).
  Returns:
    ``[(index, identifier, problem)]`` sorted by index.
  """
  unique = sorted({int(i) for i in indices if int(i) >= 0})
  workers = workers or min(16, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    problems = list(pool.map(lambda i: decode_problem(source, i), unique))
  return [(i, identifier(source, i), p) for i, p in zip(unique, problems) if p is not None]


def describe(source: Any, bad: Sequence[tuple[int, str, str]], where: str = '') -> str:
  """One line per bad image: ``<source description>: image <index> (<file>): <problem>``."""
  name = getattr(source, 'description', type(source).__name__)
  lines = [f'{name}: image {i} ({ident}) cannot be decoded{where}: {problem}'
           for i, ident, problem in bad]
  return '\n'.join(lines)


def error_for_batch(source: Any, indices: Iterable[int], cause: BaseException,
                    where: str = '') -> BadImageError:
  """The error to raise for a batch whose decoding failed with ``cause``.

  Names the bad images of the batch; if none fails on its own (a decoder difference between
  the fused crop and the plain decode), names the batch's images and the original cause.
  """
  indices = [int(i) for i in indices]
  bad = find_bad_images(source, indices)
  hint = ('\nFix or remove the file(s) (then redo the bags: the image list changes), or set '
          "--config.data.on_bad_image=skip to read another image in their place. "
          'python -m bingo_jax.data_check --config C lists every bad image at once.')
  if bad:
    return BadImageError(describe(source, bad, where) + hint, bad)
  name = getattr(source, 'description', type(source).__name__)
  shown = ', '.join(f'{i} ({identifier(source, i)})' for i in sorted(set(indices))[:8]
                    if i >= 0)
  cause_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
  return BadImageError(f'{name}: decoding a batch{where} failed ({type(cause).__name__}: '
                       f'{cause_line}); its images: {shown} ...' + hint)


class Replacements:
  """The ``'skip'`` policy's index map: each bad image -> the next image after it that is good.

  ``table()`` is an ``int64 (N,)`` array the pipelines gather every index through (the
  identity until an image is found bad).
  """

  def __init__(self, num_images: int, bad: Iterable[int] = ()):
    self.num_images = int(num_images)
    self.bad: dict[int, tuple[str, str]] = {}
    for i in bad:
      self.bad[int(i)] = ('', '')

  def add(self, found: Sequence[tuple[int, str, str]]) -> None:
    for index, ident, problem in found:
      self.bad[int(index)] = (ident, problem)
    if len(self.bad) >= self.num_images:
      raise BadImageError(f'All {self.num_images} images of the source fail to decode.')

  def replacement(self, index: int) -> int:
    index = int(index)
    while index in self.bad:
      index = (index + 1) % self.num_images
    return index

  def table(self) -> np.ndarray:
    table = np.arange(self.num_images, dtype=np.int64)
    for index in self.bad:
      table[index] = self.replacement(index)
    return table

  def records(self) -> list[dict]:
    """JSON records for logs and summaries, sorted by index."""
    return [{'index': i, 'file': ident, 'problem': problem, 'replaced_by': self.replacement(i)}
            for i, (ident, problem) in sorted(self.bad.items())]


def is_decode_error(error: BaseException) -> bool:
  """A tf.data error that an undecodable image raises (InvalidArgument / DataLoss / ...)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return isinstance(error, (tf.errors.InvalidArgumentError, tf.errors.DataLossError,
                            tf.errors.UnknownError, tf.errors.NotFoundError))


def replacements_of(source: Any) -> Replacements:
  """The source's ``Replacements`` (created on first use; shared by all its pipelines)."""
  replacements = getattr(source, '_bad_image_replacements', None)
  if replacements is None:
    replacements = Replacements(len(source))
    try:
      source._bad_image_replacements = replacements  # pylint: disable=protected-access
    except AttributeError:
      pass
  return replacements


def policy_of(source: Any, default: str = 'error') -> str:
  """``config.data.on_bad_image`` as ``make_source`` recorded it on the source."""
  policy = getattr(source, 'on_bad_image', None) or default
  if policy not in POLICIES:
    raise ValueError(f'config.data.on_bad_image = {policy!r}; expected one of {POLICIES}.')
  return policy


def guarded_batches(build: Callable[[int, Optional[np.ndarray]], Iterator[dict]],
                    batch_indices: Callable[[int], Sequence[int]], source: Any, policy: str,
                    where: Callable[[int], str] = lambda k: ''
                    ) -> Iterator[dict]:
  """Batches of a tf.data pipeline, with decoding errors named (and, with 'skip', healed).

  Args:
    build: ``build(k, table)`` -> the pipeline's iterator from output batch ``k`` on, reading
      every image index ``i`` as ``table[i]`` (None: as itself).
    batch_indices: ``batch_indices(k)`` -> the image indices output batch ``k`` reads (those
      of batch ``k + 1`` may be included: a parallel pipeline may fail a little ahead).
    source: the images (for re-decoding and names).
    policy: 'error' (raise ``BadImageError`` naming the images) or 'skip' (replace them, log,
      rebuild from batch ``k``; ``replacements_of(source)`` records them).
    where: batch ``k`` -> text for messages (e.g. ' in training step 12').
  Yields:
    The pipeline's batches.
  """
  if policy not in POLICIES:
    raise ValueError(f'config.data.on_bad_image = {policy!r}; expected one of {POLICIES}.')
  replacements = replacements_of(source)
  k = 0
  iterator = build(0, replacements.table() if replacements.bad else None)
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except Exception as e:  # pylint: disable=broad-except
      if not is_decode_error(e):
        raise
      candidates = [replacements.replacement(i) for i in batch_indices(k) if int(i) >= 0]
      found = [b for b in find_bad_images(source, candidates) if b[0] not in replacements.bad]
      if policy == 'error' or not found:
        raise error_for_batch(source, candidates, e, where(k)) from None
      replacements.add(found)
      for index, ident, problem in found:
        logging.warning('%s: image %d (%s) cannot be decoded%s (%s); reading image %d in its '
                        "place (config.data.on_bad_image='skip').",
                        getattr(source, 'description', 'source'), index, ident, where(k),
                        problem, replacements.replacement(index))
      iterator = build(k, replacements.table())
      continue
    k += 1
    yield batch

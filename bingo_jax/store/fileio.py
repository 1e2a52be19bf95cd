"""Paths and atomic writes, local or remote: every result, bag file, record and export goes here.

**Paths.** A path is a local path or a URL (``gs://bucket/run``, ``s3://...``, any scheme that
``etils.epath`` knows). Local paths go through ``os``; URLs through ``etils.epath`` (which
uses TensorFlow's gfile or fsspec). Libraries with their own remote-filesystem layer
(TensorFlow's summary writer, tensorstore under orbax) are handed ``native_path(path)``.

**Atomic writes.** Locally a file is written under a temporary name in its destination
directory, flushed to disk and renamed over the destination (``os.replace``), so a reader (or a
rerun after a crash) sees either the old file or the whole new one, never half of it. Object
stores have no atomic rename, but an object only becomes visible once its upload completes:
a URL is written as a temporary object next to the destination, then moved onto it
(copy + delete), so the destination is again either the old object or the whole new one. A
directory (a model file) cannot be published atomically on an object store: its files are
written first and a record naming it complete last (``bingo_model.json``, the commit marker),
and readers require the record.

A multi-host run needs a workdir that every host sees (a shared filesystem or a bucket):
process 0 writes the JSON records, orbax coordinates the checkpoint.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
import uuid
from typing import IO, Any, BinaryIO, Callable, Union

from etils import epath

PathLike = Union[str, os.PathLike]

# The umask can only be read by setting it. Doing that per write would briefly leave the
# process at umask 0, and files created meanwhile by other threads (orbax's asynchronous
# checkpoint writes, tf.data) world-writable; it is read once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def is_url(path: PathLike) -> bool:
  """True for ``scheme://...`` paths (remote or otherwise not the local filesystem)."""
  return '://' in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
  """``path`` as an ``etils.epath.Path``."""
  return epath.Path(path)


def absolute(path: PathLike) -> str:
  """A local path made absolute; a URL unchanged."""
  return str(path) if is_url(path) else os.path.abspath(path)


def join(path: PathLike, *parts: str) -> str:
  """``os.path.join`` for local paths, ``/``-joined for URLs."""
  if is_url(path):
    return posixpath.join(str(path), *parts)
  return os.path.join(path, *parts)


def dirname(path: PathLike) -> str:
  if is_url(path):
    return str(as_path(path).parent)
  return os.path.dirname(os.fspath(path))


def basename(path: PathLike) -> str:
  return as_path(path).name if is_url(path) else os.path.basename(os.fspath(path))


def native_path(path: PathLike) -> str:
  """The string to give libraries that open URLs themselves (TensorFlow, tensorstore).

  A local path or a ``gs://`` URL unchanged; a path type that stands in for a remote
  filesystem (the tests' fake one) may map itself to what those libraries can open.
  """
  return as_path(path).as_posix() if is_url(path) else os.fspath(path)


def exists(path: PathLike) -> bool:
  return as_path(path).exists() if is_url(path) else os.path.exists(path)


def isfile(path: PathLike) -> bool:
  if is_url(path):
    path = as_path(path)
    return path.exists() and not path.is_dir()
  return os.path.isfile(path)


def isdir(path: PathLike) -> bool:
  return as_path(path).is_dir() if is_url(path) else os.path.isdir(path)


def makedirs(path: PathLike) -> None:
  """Creates ``path`` and its parents if missing."""
  if is_url(path):
    as_path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: PathLike) -> list[str]:
  """Names (not paths) of the entries of a directory."""
  if is_url(path):
    return sorted(child.name for child in as_path(path).iterdir())
  return sorted(os.listdir(path))


def remove(path: PathLike) -> None:
  if is_url(path):
    as_path(path).unlink()
  else:
    os.remove(path)


def rmtree(path: PathLike) -> None:
  if is_url(path):
    as_path(path).rmtree(missing_ok=True)
  else:
    shutil.rmtree(path, ignore_errors=True)


def open_file(path: PathLike, mode: str = 'rb') -> IO:
  """``open`` for local paths and URLs (``'r'``, ``'rb'``, ``'w'``, ``'wb'``)."""
  return as_path(path).open(mode) if is_url(path) else open(path, mode)


def read_json(path: PathLike) -> Any:
  with open_file(path, 'r') as f:
    return json.load(f)


class WriteError(OSError):
  """A file could not be written (a full disk, a file size limit, no permission): the message
  names the file. Nothing was left at the destination, not even the temporary file, and what
  was there before is unchanged. The commands print it as one line and exit 1."""

  def __str__(self) -> str:
    return str(self.strerror)


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> str:
  """Writes a file atomically (see the module docstring for URLs).

  Args:
    path: destination; its directory is created if needed.
    write: called with the temporary file opened for binary writing.
  Returns:
    The absolute path (or the URL) written.
  Raises:
    WriteError: naming ``path``, for any ``OSError`` of the write (``numpy.save`` on a full
      disk says only ``4096 requested and 1984 written``).
  """
  try:
    return _atomic_write(path, write)
  except WriteError:
    raise
  except OSError as e:
    reason = e.strerror or str(e)
    if e.errno is None and 'requested and' in str(e):
      reason = f'{e}: the disk is full or a file size limit was reached'
    raise WriteError(e.errno, f'Cannot write {absolute(path)}: {reason}. Nothing was left '
                     'there; make space and rerun the command') from e


def _atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> str:
  if is_url(path):
    return _atomic_write_url(str(path), write)
  path = os.path.abspath(path)
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  handle, staging = tempfile.mkstemp(prefix=os.path.basename(path) + '.tmp-', dir=directory)
  try:
    with os.fdopen(handle, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    # mkstemp creates the file 0600; results are meant to be read by others too.
    os.chmod(staging, 0o666 & ~_UMASK)
    os.replace(staging, path)
  except BaseException:
    if os.path.exists(staging):
      os.remove(staging)
    raise
  return path


def _atomic_write_url(url: str, write: Callable[[BinaryIO], None]) -> str:
  destination = as_path(url)
  destination.parent.mkdir(parents=True, exist_ok=True)
  staging = destination.parent / f'{destination.name}.tmp-{uuid.uuid4().hex}'
  try:
    with staging.open('wb') as f:
      write(f)
    staging.replace(destination)
  except BaseException:
    if staging.exists():
      staging.unlink()
    raise
  return url


def write_json_atomically(path: PathLike, record: Any, **dump_kwargs) -> str:
  """``json.dump`` of ``record`` (indented, sorted keys) written atomically."""
  dump_kwargs = {'indent': 2, 'sort_keys': True, **dump_kwargs}
  return atomic_write(path, lambda f: f.write(json.dumps(record, **dump_kwargs).encode()))


def write_text_atomically(path: PathLike, text: str) -> str:
  return atomic_write(path, lambda f: f.write(text.encode()))

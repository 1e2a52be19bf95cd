"""Atomic file writes: every result, bag file, checkpoint record and export goes through here.

A file is written under a temporary name in its destination directory, flushed to disk and
renamed over the destination, so a reader (or a rerun after a crash) sees either the old file
or the whole new one, never half of it.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, BinaryIO, Callable

# The umask can only be read by setting it. Doing that per write would briefly leave the
# process at umask 0, and files created meanwhile by other threads (orbax's asynchronous
# checkpoint writes, tf.data) world-writable; it is read once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> str:
  """Writes a file atomically.

  Args:
    path: destination; its directory is created if needed.
    write: called with the temporary file opened for binary writing.
  Returns:
    The absolute path written.
  """
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


def write_json_atomically(path: str, record: Any, **dump_kwargs) -> str:
  """``json.dump`` of ``record`` (indented, sorted keys) written atomically."""
  dump_kwargs = {'indent': 2, 'sort_keys': True, **dump_kwargs}
  return atomic_write(path, lambda f: f.write(json.dumps(record, **dump_kwargs).encode()))


def write_text_atomically(path: str, text: str) -> str:
  return atomic_write(path, lambda f: f.write(text.encode()))

"""A fake non-local filesystem for tests: ``fake://bucket/key`` URLs served by etils.epath.

``install(root)`` registers the ``fake://`` scheme with ``etils.epath``; its backend stores
``fake://a/b`` at ``root/a/b``. Code that opens such a URL with ``open``, ``os.path`` or
``np.load(str)`` fails (there is no directory named ``fake:``), so a run that works with
every path given as ``fake://`` goes through epath everywhere.

Libraries with their own filesystem layer (tensorstore under orbax, TensorFlow's summary
writer) open ``gs://`` natively; for ``fake://`` they are handed ``path.as_posix()`` (see
``bingo_jax.store.fileio.native_path``), which is the backing local path: the stand-in for their
native GCS support, on the same stored bytes.
"""

from __future__ import annotations

import os
import pathlib
from typing import Iterator

from etils.epath import backend as backend_lib
from etils.epath import gpath, register

SCHEME = 'fake://'
_ROOT: list[str] = []


def _local(path) -> str:
  path = os.fspath(path)
  if not path.startswith(SCHEME):  # already translated (the os backend calls itself)
    return path
  if not _ROOT:
    raise RuntimeError('fake_remote_fs.install(root) was not called')
  return os.path.join(_ROOT[-1], path[len(SCHEME):])


def _url(local: str) -> str:
  return SCHEME + os.path.relpath(local, _ROOT[-1])


class _FakeBackend(backend_lib._OsPathBackend):  # pylint: disable=protected-access
  """The os backend on translated paths; results that are paths are translated back."""

  def open(self, path, mode):
    return super().open(_local(path), mode)

  def exists(self, path):
    return super().exists(_local(path))

  def isdir(self, path):
    return super().isdir(_local(path))

  def listdir(self, path):
    return super().listdir(_local(path))

  def glob(self, path):
    return [_url(p) for p in super().glob(_local(path))]

  def walk(self, top, *, top_down=True, on_error=None) -> Iterator:
    for root, dirs, files in super().walk(_local(top), top_down=top_down, on_error=on_error):
      yield _url(os.fspath(root)), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    return super().makedirs(_local(path), exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    return super().mkdir(_local(path), exist_ok=exist_ok, mode=mode)

  def rmtree(self, path):
    return super().rmtree(_local(path))

  def remove(self, path):
    return super().remove(_local(path))

  def rename(self, path, dst):
    return super().rename(_local(path), _local(dst))

  def replace(self, path, dst):
    return super().replace(_local(path), _local(dst))

  def copy(self, path, dst, overwrite):
    return super().copy(_local(path), _local(dst), overwrite)

  def stat(self, path):
    return super().stat(_local(path))


_BACKEND = _FakeBackend()


class FakeRemotePath(gpath.PosixGPath):
  """``fake://bucket/key``, stored as ``/fake/bucket/key`` parts (as epath does for gs://)."""

  def __new__(cls, *parts):
    full = '/'.join(os.fspath(p) for p in parts)
    if full.startswith(SCHEME):
      full = '/fake/' + full[len(SCHEME):]
    return pathlib.PurePosixPath.__new__(cls, full)

  @property
  def _uri_scheme(self):
    return 'fake' if len(self.parts) >= 2 and self.parts[:2] == ('/', 'fake') else None

  @property
  def _path_str(self) -> str:
    if self._uri_scheme:
      return SCHEME + '/'.join(self.parts[2:])
    return super()._path_str

  @property
  def _backend(self):
    return _BACKEND if self._uri_scheme else backend_lib.os_backend

  def as_posix(self) -> str:
    return _local(self._path_str) if self._uri_scheme else super().as_posix()


def install(root: str) -> None:
  """Serves ``fake://`` from ``root`` (the latest call wins)."""
  os.makedirs(root, exist_ok=True)
  _ROOT.append(root)
  register.register_path_cls(SCHEME)(FakeRemotePath)

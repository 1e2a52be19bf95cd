"""Quiet by default: a command prints its own progress and results, not its libraries' chatter.

Unless the command line asks for ``--verbosity`` (or ``-v``):

* TensorFlow's import prints, from C++, a oneDNN banner and absl's "All log messages before
  absl::InitializeLog()" warning straight to the process's stderr (``TF_CPP_MIN_LOG_LEVEL``
  no longer silences them). ``quiet_tensorflow_import`` makes that import run with the stderr
  file descriptor caught; every other line it prints is passed on.
* Python log records below WARNING from installed libraries (faiss probing its builds with a
  ``ModuleNotFoundError`` per build, orbax's internals such as ``Closing
  _NonBlockingMetadataStore``), and orbax's warnings (a read-only directory opened
  read-only), are dropped by ``quiet_library_logs``, a filter on absl's handler. The other
  libraries' warnings, every library's errors and every record of bingo_jax still show.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import sysconfig
import tempfile
from typing import Sequence

# What TensorFlow's import prints that says nothing to a user.
_NATIVE_NOISE = re.compile(r'absl::InitializeLog\(\)|\] oneDNN custom operations are on|'
                           r'cpu_feature_guard\.cc|^To enable the following instructions|'
                           r'rebuild TensorFlow with the appropriate compiler flags')
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIBRARY_DIRS = tuple({sysconfig.get_paths()[key] for key in ('purelib', 'platlib')})
# Libraries whose warnings are about their own workings: orbax warns, for one, that a
# checkpoint directory it was asked to open read-only is read-only. bingo_jax checks the
# checkpoints itself (store/checkpoint_integrity.py) and says what is wrong with them.
_QUIET_WARNINGS = re.compile(r'[/\\]orbax[/\\]')


def verbose(argv: Sequence[str]) -> bool:
  """Whether the command line asks for absl's ``--verbosity`` (``-v``)."""
  return any(arg.startswith(('--verbosity', '-verbosity', '--v=', '-v=')) or arg == '-v'
             for arg in argv[1:])


@contextlib.contextmanager
def native_stderr_filtered(noise: re.Pattern = _NATIVE_NOISE):
  """Catches what is written to file descriptor 2 inside the block (C++ code included) and
  writes it back afterwards, without the lines that ``noise`` matches."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as caught:
    os.dup2(caught.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      caught.seek(0)
      kept = [line for line in caught.read().decode('utf-8', 'replace').splitlines(True)
              if not noise.search(line)]
      if kept:
        sys.stderr.write(''.join(kept))
        sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
  """The loader of a module whose execution runs inside ``native_stderr_filtered``."""

  def __init__(self, loader: importlib.abc.Loader):
    self._loader = loader

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module) -> None:
    with native_stderr_filtered():
      self._loader.exec_module(module)


class _QuietTensorflowFinder(importlib.abc.MetaPathFinder):
  """Finds ``tensorflow`` as the other finders do, with a loader that catches its banner."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname != 'tensorflow':
      return None
    sys.meta_path.remove(self)  # once, and not for the lookup below
    spec = importlib.util.find_spec(fullname)
    if spec is not None and spec.loader is not None:
      spec.loader = _QuietLoader(spec.loader)
    return spec


def quiet_tensorflow_import(argv: Sequence[str] = ()) -> None:
  """Makes the process's first ``import tensorflow`` quiet (a no-op after it, or with
  ``--verbosity`` in ``argv``)."""
  if verbose(argv) or 'tensorflow' in sys.modules:
    return
  if not any(isinstance(finder, _QuietTensorflowFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorflowFinder())


class _OwnInfoFilter(logging.Filter):
  """Drops records below WARNING that come from an installed library other than bingo_jax,
  and orbax's warnings too."""

  def filter(self, record: logging.LogRecord) -> bool:
    path = os.path.abspath(record.pathname or '')
    if path.startswith(_PACKAGE_DIR) or not path.startswith(_LIBRARY_DIRS):
      return True
    if _QUIET_WARNINGS.search(path):
      return record.levelno >= logging.ERROR
    return record.levelno >= logging.WARNING


def quiet_library_logs(argv: Sequence[str]) -> None:
  """Adds ``_OwnInfoFilter`` to absl's handler (once), unless ``argv`` asks for
  ``--verbosity``."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  handler = absl_logging.get_absl_handler()
  if not verbose(argv) and not any(isinstance(f, _OwnInfoFilter) for f in handler.filters):
    handler.addFilter(_OwnInfoFilter())

"""Test set-up: 8 virtual CPU devices, so that sharded code paths run on this CPU."""

import os
import tempfile

from bingo_jax.testing import cpu_xla_flags

# Must happen before jax is imported by any test module.
os.environ.setdefault('XLA_FLAGS', cpu_xla_flags(8))
# XLA compilation dominates the suite's time on a CPU (tiny models, big graphs). A persistent
# cache lets tests, pytest-xdist workers and the CLI subprocesses the tests start reuse each
# other's compiled programs.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'bingo_jax_test_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import tensorflow as tf  # noqa: E402

# tf.data must not grab the accelerator or all host threads from JAX.
tf.config.set_visible_devices([], 'GPU')

# ---------------------------------------------------------------------------------------------
# Deprecations triggered by the project's code are errors (a newer jax, flax, optax or orbax
# removes what it deprecates). pyproject.toml's filterwarnings turns a DeprecationWarning
# attributed to a module of bingo_jax, bench or tools into an error: those a library issues
# with a stacklevel that points at its caller (jax's deprecated attributes). Many libraries
# attribute the warning to their own code instead (optax.global_norm warns from optax), so
# the hook below also raises when the first frame outside the warning's library, walking out
# from the call that issued it, is the project's.

import sys  # noqa: E402
import warnings  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_DIRECTORIES = tuple(os.path.join(_REPO, name) + os.sep
                            for name in ('bingo_jax', 'bench', 'tools'))


def _library(filename: str) -> str:
  """The installed package a file belongs to (``.../site-packages/optax``), else its folder;
  frozen standard-library modules (importlib) count as one."""
  if filename.startswith('<'):
    return '<frozen>'
  for folder in ('site-packages', 'dist-packages'):
    head, separator, tail = filename.partition(f'{os.sep}{folder}{os.sep}')
    if separator:
      return head + separator + tail.split(os.sep)[0]
  return os.path.dirname(filename)


def project_caller(frame) -> str | None:
  """``file:line`` of the project's frame that called the library issuing a warning from
  ``frame``, or None when the library was called by another library or a test."""
  while frame is not None and frame.f_code.co_filename == warnings.__file__:
    frame = frame.f_back
  if frame is None or frame.f_code.co_filename.startswith(PROJECT_DIRECTORIES):
    return None  # the project's own warnings: pyproject.toml's filter
  issuer = _library(frame.f_code.co_filename)
  while frame is not None and _library(frame.f_code.co_filename) in (issuer, '<frozen>'):
    frame = frame.f_back
  if frame is not None and frame.f_code.co_filename.startswith(PROJECT_DIRECTORIES):
    return f'{os.path.relpath(frame.f_code.co_filename, _REPO)}:{frame.f_lineno}'
  return None


_show_warning = warnings._showwarnmsg  # pylint: disable=protected-access


def _raise_project_deprecations(message: warnings.WarningMessage) -> None:
  # The interpreter calls warnings._showwarnmsg for every warning a filter lets through,
  # from the frame that issued it (pytest's per-test capture replaces what it calls, not it).
  if issubclass(message.category, DeprecationWarning):
    caller = project_caller(sys._getframe(1))  # pylint: disable=protected-access
    if caller is not None:
      raise message.category(f'{message.message} (called from {caller})')
  _show_warning(message)


warnings._showwarnmsg = _raise_project_deprecations  # pylint: disable=protected-access

"""Runs a command-line tool in this process as ``app.run`` would: parse the flags, then
``main(argv)`` (a fresh interpreter per call would spend most of a test importing jax and
torch again). The PyTorch tools are package modules (``bingo-convert`` is
``bingo_jax.convert``, ``bingo-export`` ``bingo_jax.export``); the others are ``tools/``
scripts."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The former tools/ scripts, now package modules.
PACKAGE_MODULES = {'convert_torch_teacher.py': 'bingo_jax.convert',
                   'export_torch.py': 'bingo_jax.export'}


@functools.cache
def _load(script: str) -> ModuleType:
  # Loaded once per process: its module-level flags are defined once.
  if script in PACKAGE_MODULES:
    return importlib.import_module(PACKAGE_MODULES[script])
  spec = importlib.util.spec_from_file_location(f'tool_{script[:-3]}',
                                                os.path.join(REPO, 'tools', script))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_tool(script: str, *args: str) -> int:
  """``python -m tools.<script> ARGS`` (or its package module) in-process; returns ``main``'s exit status."""
  module = _load(script)
  flags.FLAGS.unparse_flags()  # no value left over from an earlier call
  return module.main(flags.FLAGS([script, *args]))

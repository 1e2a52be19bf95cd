"""Runs a ``tools/`` script in this process as ``app.run`` would: parse the flags, then
``main(argv)`` (a fresh interpreter per call would spend most of a test importing jax and
torch again)."""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _load(script: str) -> ModuleType:
  # Loaded once per process: its module-level flags are defined once.
  spec = importlib.util.spec_from_file_location(f'tool_{script[:-3]}',
                                                os.path.join(REPO, 'tools', script))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_tool(script: str, *args: str) -> int:
  """``python tools/<script> ARGS`` in-process; returns ``main``'s exit status."""
  module = _load(script)
  flags.FLAGS.unparse_flags()  # no value left over from an earlier call
  return module.main(flags.FLAGS([script, *args]))

"""Modules imported at their first use, so that importing a module of the package stays light.

The on-device data path (bingo_jax/run/device_data.py) trains without TensorFlow, yet
``bingo_jax.train`` imports the input pipeline for ``steps_per_epoch``: TensorFlow (and
``augment``, which needs it) load only when a tf.data pipeline is built.
"""

from __future__ import annotations

import importlib


class ImportedOnUse:
  """A module imported at its first attribute access: ``tf = ImportedOnUse('tensorflow')``.

  Decorators and default values are evaluated at import time: a module that holds such a handle
  uses it only inside functions.
  """

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attribute: str):
    return getattr(importlib.import_module(self._name), attribute)

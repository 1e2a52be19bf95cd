"""bingo_jax: BINGO self-supervised distillation (ICLR 2022) in JAX/Flax.

The built-in configs are the files of the top-level ``configs/`` folder, imported as
``bingo_jax.configs``: an install puts the folder there (``pyproject.toml`` maps it), and in a
checkout run without installing (``python -m bingo_jax.train`` from the repository root, or
``PYTHONPATH=<checkout>``) the finder below loads it from beside this package.

TensorFlow's import, wherever it happens, is made quiet here (``console/quiet.py``), before
any module can import it.
"""

import importlib.abc
import importlib.util
import os
import sys

from bingo_jax.console import quiet as _quiet

__version__ = '0.1.0'

_CONFIGS = f'{__name__}.configs'
_CHECKOUT_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 'configs')


class _CheckoutConfigsFinder(importlib.abc.MetaPathFinder):
  """Finds ``bingo_jax.configs`` in the checkout's ``configs/`` folder.

  Installed only where this package has no ``configs/`` of its own, and ahead of the other
  finders: the configs then come from the checkout this package was imported from, even where
  an editable install of another checkout would map the name elsewhere.
  """

  def find_spec(self, fullname, path=None, target=None):
    if fullname != _CONFIGS:
      return None
    return importlib.util.spec_from_file_location(
        fullname, os.path.join(_CHECKOUT_CONFIGS, '__init__.py'),
        submodule_search_locations=[_CHECKOUT_CONFIGS])


if (not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs'))
    and os.path.isfile(os.path.join(_CHECKOUT_CONFIGS, '__init__.py'))
    and not any(isinstance(finder, _CheckoutConfigsFinder) for finder in sys.meta_path)):
  sys.meta_path.insert(0, _CheckoutConfigsFinder())

_quiet.quiet_tensorflow_import(sys.argv)

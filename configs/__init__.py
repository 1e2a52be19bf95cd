"""The built-in experiment configs, and the ``--config`` flag that takes a name or a file.

``--config r18_r50w2`` is the built-in ``r18_r50w2.py``; after a colon come
its variants (``r18_r50w2:bf16,paper_loss``, ``variants.py``). Anything else is a path to a
config file of your own (``--config my_config.py:arg``), which may start from these::

  from bingo_jax.configs import common, variants

  def get_config(arg=None):
    config = common.base_config()
    ...
    return variants.apply_variants(config, arg)

Every key can be overridden on the command line: ``--config.train.batch_size=512``. The
files are the top-level ``configs/`` folder of the repository (installed as this package):
``--config configs/r18_r50w2.py`` from the repository root reads that file, and from any
other directory, where the path does not exist, it names the built-in ``r18_r50w2``.

May import: nothing else of bingo_jax (ml_collections only).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as _config_flags_lib

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
# Modules here that are building blocks, not configs.
HELPERS = ('common', 'variants', 'small_data')


def names() -> list[str]:
  """The built-in config names (files of this package that define ``get_config``)."""
  found = []
  for entry in sorted(os.listdir(CONFIG_DIR)):
    name, extension = os.path.splitext(entry)
    if extension == '.py' and not name.startswith('_') and name not in HELPERS:
      found.append(name)
  return found


def _builtin(name: str) -> Optional[str]:
  if name in names():
    return os.path.join(CONFIG_DIR, f'{name}.py')
  # configs/NAME.py: in a checkout, the very file the name loads (this folder); elsewhere,
  # where the path does not exist (an installed package, another directory), the built-in.
  head, tail = os.path.split(name)
  stem, extension = os.path.splitext(tail)
  if (extension == '.py' and os.path.basename(os.path.normpath(head)) == 'configs'
      and stem in names()):
    builtin = os.path.join(CONFIG_DIR, tail)
    if not os.path.exists(name) or os.path.samefile(name, builtin):
      return builtin
  return None


def resolve(spec: str) -> str:
  """``NAME[:ARG]`` or ``PATH[:ARG]`` -> ``FILE[:ARG]`` (a built-in name becomes its file).

  Raises:
    ValueError: ``spec`` is neither a built-in name nor an existing file (the message lists
      the built-in names).
  """
  name, colon, arg = spec.partition(':')
  path = _builtin(name)
  if path is None:
    if not os.path.isfile(name):
      raise ValueError(f'--config {spec!r}: {name!r} is neither a built-in config '
                       f'({", ".join(names())}) nor a config file.')
    path = name
  return path + colon + arg


def get_config(spec: str) -> ml_collections.ConfigDict:
  """The config ``spec`` names (``'r18_r50w2:bf16'``, ``'my_config.py'``), in Python."""
  name, _, arg = spec.partition(':')
  if name in names():
    module = importlib.import_module(f'{__name__}.{name}')
  else:
    path = resolve(spec).partition(':')[0]
    module_spec = importlib.util.spec_from_file_location('bingo_jax_user_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


class _NameOrFileParser(_config_flags_lib.ConfigFileFlagParser):
  """ml_collections' config-file parser, with built-in names resolved first."""

  def parse(self, path):
    return super().parse(resolve(path))


def define_config_flag(name: str = 'config', default: Optional[str] = None,
                       help_string: str = 'Built-in config name (e.g. r18_r50w2, '
                       'r18_r50w2:bf16) or config file path.',
                       lock_config: bool = True,
                       flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: Optional[list[str]] = None) -> flags.FlagHolder:
  """``config_flags.DEFINE_config_file`` that also takes built-in names; overrides
  ``--NAME.section.key=value`` work as there (they are found in ``sys_argv``, default
  ``sys.argv``, when the flag is defined)."""
  holder = config_flags.DEFINE_config_file(name, None, help_string, flag_values=flag_values,
                                           lock_config=lock_config, sys_argv=sys_argv)
  flag_values[name].parser = _NameOrFileParser(name, lock_config=lock_config)
  if default is not None:
    flag_values.set_default(name, default)  # parsed by the parser above
  return holder

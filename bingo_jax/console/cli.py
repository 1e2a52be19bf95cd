"""The command-line convention of every entry point, and the flags several of them share.

Every entry point (``python -m bingo_jax.train`` / ``bagging`` / ``evaluate`` / ``demo``, the
``tools/`` and ``bench/`` scripts) uses absl: its flags are module-level holders,
``_NAME = flags.DEFINE_...(...)``, read as ``_NAME.value`` in ``main(argv)``, and it ends
with ``app.run(main)``; positional arguments (the tools' input and output paths) reach
``main`` in ``argv`` and are taken with ``positional_arguments``.

absl flags live in one process-wide registry, and the entry points are imported together
(the demo imports the three stages; the tests import them and run the tools in-process), so a
flag that two of them take is defined once, here, and bound at module level in each:
``_WORKDIR = cli.shared(cli.WORKDIR)`` (which also lists it in that entry point's ``--help``).
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app, flags

from bingo_jax import configs
from bingo_jax.console import quiet
from bingo_jax.torch_io import checkpoints as torch_checkpoints

# ---- the stages (train, bagging, evaluate), the demo and the ablation driver ----
CONFIG = configs.define_config_flag(
    'config', None, 'Experiment config: a built-in name (r18_r50w2, r18_r50w2:bf16, cifar10, '
    '...; configs/) or a config file path, [:variants]; override keys with '
    '--config.a.b=value.')
WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory (a rerun resumes from what it holds).')
STEP = flags.DEFINE_integer(
    'step', None, 'Training step to load from a training workdir (default: the latest '
    'checkpoint).')
TEACHER = flags.DEFINE_string(
    'teacher', None, 'The teacher: a model file (bingo-convert) or, for the '
    'demo, a PyTorch checkpoint.')

# ---- the PyTorch checkpoint tools ----
FORMAT = flags.DEFINE_enum(
    'format', None, torch_checkpoints.FORMATS, 'PyTorch checkpoint layout (the tools say '
    'their default).')
ARCH = flags.DEFINE_string('arch', None, 'Architecture, e.g. resnet18 or resnet50w2.')
HEAD = flags.DEFINE_enum('head', None, ('moco', 'swav', 'linear', 'none'),
                         "Projection head; 'none': no head.")
OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing output.')


# What this module calls from here on is the caller's: ``shared`` declares key flags of the
# entry point that calls it, not of this module.
flags.disclaim_key_flags()


def shared(holder: flags.FlagHolder) -> flags.FlagHolder:
  """``holder``, declared a key flag of the calling entry point (shown by its ``--help``)."""
  flags.declare_key_flag(holder)
  return holder


def positional_arguments(argv: Sequence[str], names: Sequence[str]) -> list[str]:
  """The positional arguments ``names`` of ``main(argv)`` (``argv[0]`` is the program).

  Raises:
    app.UsageError: naming the expected and the given arguments.
  """
  given = list(argv[1:])
  if len(given) != len(names):
    raise app.UsageError(f'expected the arguments {" ".join(n.upper() for n in names)}, '
                         f'got {given}.')
  return given


def no_positional_arguments(argv: Sequence[str]) -> None:
  """Raises ``app.UsageError`` unless ``main(argv)`` got flags only."""
  positional_arguments(argv, ())


HELP_FLAGS = ('--help', '-help', '-h', '-?', '--helpshort', '--helpfull', '--helpxml')


def run(main, required: Sequence[str] = ()) -> None:
  """``app.run(main)`` for a console command: ``required`` flags marked as such, the
  libraries' log chatter silenced unless ``--verbosity`` asks for it (``quiet``), and a help
  request (``--help``, which absl ends with status 1) exiting with status 0."""
  if required:
    flags.mark_flags_as_required(list(required))
  quiet.quiet_library_logs(sys.argv)
  try:
    app.run(main)
  except SystemExit as e:
    arguments = sys.argv[1:sys.argv.index('--')] if '--' in sys.argv else sys.argv[1:]
    if e.code == 1 and any(a in HELP_FLAGS for a in arguments):
      raise SystemExit(0) from None
    raise

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

``run`` is ``app.run`` with the user-error convention of every console command: a mistake
(flag, config key or value, path, file) ends in one line, ``error: ...``, and exit 1; a bug
in its traceback (docs/reliability.md).
"""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Any, Callable, NoReturn, Sequence

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
# The exit status of a user's mistake (and of every other error).
EXIT_ERROR = 1


def run(main, required: Sequence[str] = ()) -> None:
  """``app.run(main)`` for a console command, with the user-error convention.

  A mistake of the user's (a flag, config key or value, path or file that is wrong; see
  ``is_user_error``) ends the command with one line on stderr, ``error: <message>``, and
  status 1; anything else is a bug and ends in its traceback, as does every error with
  ``--verbosity=1`` or more. The libraries' log chatter is silenced unless ``--verbosity``
  asks for it (``quiet``). ``required`` flags are marked as such, and a help request
  (``--help``, which absl ends with status 1) exits with status 0.
  """
  if required:
    flags.mark_flags_as_required(list(required))
  quiet.quiet_library_logs(sys.argv)
  try:
    app.run(_reporting_user_errors(main), flags_parser=_parse_flags)
  except SystemExit as e:
    arguments = sys.argv[1:sys.argv.index('--')] if '--' in sys.argv else sys.argv[1:]
    if e.code == 1 and any(a in HELP_FLAGS for a in arguments):
      raise SystemExit(0) from None
    raise


def is_user_error(error: BaseException) -> bool:
  """Whether ``error`` is a refusal of the user's input rather than a bug.

  User errors: an ``OSError`` (a path that is missing, taken or unwritable: its message names
  it), an exception type of bingo_jax's own (each is a refusal whose message names the key,
  file or value), and a ``ValueError`` raised by bingo_jax's own code (its checks of inputs).
  A ``ValueError`` raised inside a library, and every other exception, is a bug.
  """
  if isinstance(error, OSError):
    return True
  if type(error).__module__.split('.')[0] == 'bingo_jax':
    return True
  return isinstance(error, ValueError) and _raised_in_bingo_jax(error)


def _raised_in_bingo_jax(error: BaseException) -> bool:
  """Whether the innermost frame of ``error``'s traceback is bingo_jax's code."""
  top = sys.modules[__name__.partition('.')[0]]  # bingo_jax, wherever this module sits in it
  package = os.path.dirname(os.path.abspath(top.__file__)) + os.sep
  frame = error.__traceback__
  if frame is None:
    return False
  while frame.tb_next is not None:
    frame = frame.tb_next
  return os.path.abspath(frame.tb_frame.f_code.co_filename).startswith(package)


def one_line(message: str) -> str:
  """``message`` on one line (its lines joined)."""
  return ' '.join(line.strip() for line in str(message).splitlines() if line.strip())


def fail(message: str) -> NoReturn:
  """Ends the command: ``error: <message>`` on stderr (one line), exit status 1."""
  sys.stdout.flush()
  print(f'error: {one_line(message)}', file=sys.stderr, flush=True)
  raise SystemExit(EXIT_ERROR)


def _verbose() -> bool:
  """``--verbosity=1`` or more (absl's flag): show tracebacks."""
  return flags.FLAGS.is_parsed() and flags.FLAGS['verbosity'].value >= 1


def _reporting_user_errors(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """``main``, with a user error turned into ``fail``'s one line (see ``run``)."""

  @functools.wraps(main)
  def reporting(argv: list[str]) -> Any:
    try:
      return main(argv)
    except app.UsageError as e:
      if _verbose():
        raise
      fail(f'{e} (--help lists the flags)')
    except Exception as e:  # pylint: disable=broad-except
      if _verbose() or not is_user_error(e):
        raise
      fail(str(e))
  return reporting


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, a mistake in the flags reported in one line (``fail``).

  absl reports a bad flag value in two lines; an override of a config key that does not
  exist (``--config.train.batchsize=3``) escapes ml_collections as an ``AttributeError`` or
  ``KeyError`` with its traceback.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
  except (AttributeError, KeyError) as e:
    fail(_unknown_config_key(argv, e))


def _unknown_config_key(argv: Sequence[str], error: BaseException) -> str:
  """The message for an override of a config key that does not exist."""
  cause = error
  while cause.args and isinstance(cause.args[0], BaseException):
    cause = cause.args[0]
  text = str(cause.args[0]) if cause.args else str(cause)
  key = re.match(r"\W*'?([^'\n]+)'", text)
  name = key.group(1) if key else text
  overrides = [a.split('=')[0] for a in argv[1:] if a.startswith('--')
               and re.search(rf'\.{re.escape(name)}(\.|=|$)', a.split('=')[0])]
  hint = re.search(r'Did you mean "([^"]+)"', text)
  return (f'{overrides[0] if overrides else name}: no such config key'
          + (f' (did you mean {hint.group(1)!r}?)' if hint else '')
          + '; configs/common.py lists every key.')

"""Whether a checkpoint step can be trusted, and what becomes of one that cannot.

``checkpointing.TrainCheckpointer`` calls these checks (docs/reliability.md):

* before a save: the state must be finite (``NonFiniteStateError`` otherwise), and a CRC-32
  of every array goes into the progress record (``checksums``);
* before a restore: the step's orbax metadata must match the restore target (``check_fits``);
* after a restore: the arrays must be finite and match their checksums (``verify``);
* a step that fails is a ``CheckpointError``; the fallback moves it to
  ``WORKDIR/damaged_checkpoints/<step>-<time>`` (``move_aside``), where it stays for inspection;
* a failed asynchronous save is logged by orbax's background threads rather than raised:
  ``OrbaxErrorCapture`` keeps its cause so that the checkpointer can raise it;
* a failed restore leaves reads in flight that print a traceback each when they end:
  ``quiet_abandoned_reads`` drops them.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import shutil
import sys
import time
import zlib
from typing import Any, Optional

import jax
import numpy as np

from bingo_jax.store import finite

DAMAGED_DIR = 'damaged_checkpoints'
CHECKSUMS_KEY = 'checksums'  # progress record key: {array path: CRC-32 hex} of the saved state


class CheckpointError(RuntimeError):
  """A checkpoint step that cannot be used: damaged files, non-finite values, a failed save."""


class NonFiniteStateError(CheckpointError):
  """A state holding NaN or Inf values (never written as a checkpoint)."""


def root_cause(error: BaseException) -> str:
  """The innermost cause of ``error`` as one line ``Type: message``.

  Orbax wraps a TensorStore error (the useful part: which file, what was wrong) in several
  layers of asyncio and future exceptions; the innermost one says what happened.
  """
  seen, inner = set(), error
  while id(inner) not in seen:
    seen.add(id(inner))
    nxt = inner.__cause__ or inner.__context__
    if nxt is None:
      break
    inner = nxt
  lines = str(inner).strip().splitlines()
  message = lines[0] if lines else '(no message)'
  # TensorStore names the OS error by number only ("[os_error_code='27']"): add its name.
  code = re.search(r"os_error_code='?(\d+)", message)
  if code:
    message += f' ({os.strerror(int(code.group(1)))})'
  return f'{type(inner).__name__}: {message}'


class OrbaxErrorCapture(std_logging.Filter):
  """Keeps the first exception orbax's background threads log, and shortens their output.

  Orbax logs a failed asynchronous save with a full traceback per thread and carries on; the
  exception itself may never reach the caller. This filter (on absl's logger) remembers it so
  that ``TrainCheckpointer.check_saves`` can name the cause, and drops the repeated tracebacks
  (the message stays).
  """

  def __init__(self):
    super().__init__()
    self.first_error: Optional[str] = None

  def filter(self, record: std_logging.LogRecord) -> bool:
    if 'orbax' in record.pathname and record.levelno >= std_logging.ERROR:
      if record.exc_info and record.exc_info[1] is not None:
        if self.first_error is None:
          self.first_error = root_cause(record.exc_info[1])
        record.exc_info, record.exc_text = None, None
    return True


def checksums(tree: Any) -> dict[str, str]:
  """CRC-32 of every host-addressable leaf's bytes (a damaged data file changes it).

  Args:
    tree: a pytree of arrays (the storable state).
  Returns:
    ``{leaf path: 8 hex digits}``.
  """
  sums = {}
  for name, leaf in finite.named_leaves(tree):
    array = finite.host_array(leaf)
    if array is not None:
      sums[name] = f'{zlib.crc32(np.ascontiguousarray(array).tobytes()) & 0xffffffff:08x}'
  return sums


def check_savable(storable: Any, step: int, directory: str, latest: Optional[int]) -> None:
  """Refuses a state with NaN or Inf values, before anything of it is written.

  Args:
    storable: the state as a pytree of plain arrays.
    step, directory: the step about to be saved and the checkpoint directory (for the message).
    latest: the newest step on disk, which is kept.
  Raises:
    NonFiniteStateError: naming the non-finite arrays.
  """
  bad = finite.non_finite_paths(storable)
  if bad:
    raise NonFiniteStateError(
        f'Refusing to save step {step} to {directory}: '
        f'{finite.describe(bad, len(jax.tree.leaves(storable)))}. The last checkpoint '
        f'(step {latest}) is kept.')


def check_fits(metadata: Any, abstract: Any, where: str) -> None:
  """Compares a step's stored array shapes and dtypes with the restore target's.

  Args:
    metadata: orbax's metadata tree of the stored state (leaves with ``shape``, ``dtype``).
    abstract: the target as a tree of ``jax.ShapeDtypeStruct``.
    where: the step's directory, for the message.
  Raises:
    ValueError: the step is intact but holds another structure (the config changed).
  """
  # Orbax's metadata entries are not pytree leaves: name them as leaves.
  stored = {name: (tuple(m.shape), np.dtype(m.dtype)) for name, m in finite.named_leaves(
      jax.tree.map(lambda m: m, metadata, is_leaf=lambda m: hasattr(m, 'shape')))}
  wanted = {name: (tuple(a.shape), np.dtype(a.dtype))
            for name, a in finite.named_leaves(abstract)}
  if stored == wanted:
    return
  missing, extra = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
  wrong = sorted(k for k in set(wanted) & set(stored) if wanted[k] != stored[k])
  raise ValueError(
      f'{where} holds another train state: '
      + '; '.join(part for part in (
          f'missing {", ".join(missing[:5])}' if missing else '',
          f'unexpected {", ".join(extra[:5])}' if extra else '',
          ', '.join(f'{k} stored {stored[k]} wanted {wanted[k]}' for k in wrong[:5])) if part))


def verify(storable: Any, progress: dict) -> None:
  """Finiteness and checksums of a restored state.

  Args:
    storable: the restored state as a pytree of plain arrays.
    progress: its progress record (``CHECKSUMS_KEY`` is absent in checkpoints written before
      checksums were kept: then only finiteness is checked).
  Raises:
    CheckpointError: the state is damaged.
  """
  bad = finite.non_finite_paths(storable)
  if bad:
    raise CheckpointError(finite.describe(bad, len(jax.tree.leaves(storable))))
  expected = progress.get(CHECKSUMS_KEY)
  if expected:
    actual = checksums(storable)
    wrong = sorted(k for k in expected if k in actual and actual[k] != expected[k])
    if wrong:
      raise CheckpointError(f'{len(wrong)} arrays differ from what was saved (checksum): '
                            + ', '.join(wrong[:5]))


def move_aside(workdir: str, step_directory: str, step: int) -> str:
  """Moves a damaged step to ``WORKDIR/damaged_checkpoints/<step>-<time>`` (a local workdir).

  Returns:
    The new path of the step.
  """
  aside = os.path.join(workdir, DAMAGED_DIR, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
  os.makedirs(os.path.dirname(aside), exist_ok=True)
  shutil.move(step_directory, aside)
  return aside


def quiet_abandoned_reads() -> None:
  """Drops the tracebacks of a failed restore's leftover reads from now on.

  Orbax closes its event loop when a restore fails; tensorstore reads still in flight then
  complete into the closed loop and print, through ``sys.excepthook``, one
  ``RuntimeError: Event loop is closed`` traceback each (hundreds for one step removed while
  read). Other exceptions go to the previous hook.
  """
  previous = sys.excepthook
  if getattr(previous, 'drops_closed_loop_errors', False):
    return

  def excepthook(kind, value, traceback):
    if not (kind is RuntimeError and str(value) == 'Event loop is closed'):
      previous(kind, value, traceback)
  excepthook.drops_closed_loop_errors = True
  sys.excepthook = excepthook

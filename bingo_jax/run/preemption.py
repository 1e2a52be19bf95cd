"""SIGTERM and SIGINT as a flag the training loop polls, so that it saves and exits between steps.

A preempted run exits with ``train.EXIT_PREEMPTED`` after saving; rerunning the same command
continues from that checkpoint (docs/reliability.md).
"""

from __future__ import annotations

import signal
from typing import Optional

import jax
from absl import logging

from bingo_jax.store import checkpointing


class PreemptionWatcher:
  """Turns SIGTERM and SIGINT into a flag the loop polls, so it can save and exit between steps.

  A second SIGINT (Ctrl-C pressed again) interrupts at once, without saving. With several
  processes every host must stop at the same step: JAX's preemption service (started by
  ``jax.distributed.initialize``) agrees on that step, read through orbax's
  ``reached_preemption``; with one process a Python signal handler suffices.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self._checkpointer: Optional[checkpointing.TrainCheckpointer] = None
    self.signalled: Optional[int] = None
    self._previous_handlers: dict = {}
    if jax.process_count() == 1:
      for signum in self.SIGNALS:
        self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

  def attach(self, checkpointer: checkpointing.TrainCheckpointer) -> None:
    self._checkpointer = checkpointer

  def _on_signal(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self.signalled == signal.SIGINT:
      raise KeyboardInterrupt  # Ctrl-C twice: stop now
    logging.warning('Received %s: saving a checkpoint after this step, then exiting%s.',
                    signal.Signals(signum).name,
                    ' (Ctrl-C again to stop without saving)' if signum == signal.SIGINT else '')
    self.signalled = signum

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1 or self._checkpointer is None:
      return self.signalled is not None
    return self._checkpointer.reached_preemption(step)

  def close(self) -> None:
    for signum, handler in self._previous_handlers.items():
      signal.signal(signum, handler)
    self._previous_handlers = {}

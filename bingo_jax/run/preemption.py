"""SIGTERM and SIGINT as a flag the training loop polls, so that it saves and exits between steps,
and a multi-host peer that dies as the same requeue status.

A preempted run exits with ``EXIT_PREEMPTED`` after saving; rerunning the same command
continues from that checkpoint (docs/reliability.md).

A peer process that dies (killed, its host lost) makes the survivors' next collective fail
(``Gloo all-reduce failed``, NCCL or ICI errors). By default JAX's coordination service then
aborts every survivor once the peer's heartbeats time out (status 134, after 100 s). Runs
started with ``initialize_distributed`` instead: the service is recoverable (a dead task is
not fatal to the others), every process bumps a counter in the service's key-value store each
second, and a step that fails in a multi-host run looks at the counters: when a peer's
stopped, the survivor says which and exits ``EXIT_PREEMPTED`` at once, saving nothing (the
step in flight is lost; the last complete checkpoint is where the rerun resumes). Process 0
hosts the service: when it dies, the survivors' client library aborts, and the abort is turned
into the same exit when a step has failed meanwhile (``_AbortTrap``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Optional

import jax
from absl import logging

from bingo_jax.store import checkpointing

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: a scheduler requeues the job
BEAT_SECONDS = 1.0
_BEAT_KEY = 'bingo_jax/beat/{}'


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

  def exit_if_peer_lost(self, error: BaseException, step: int, last_saved: int) -> None:
    """After a failed step of a multi-host run: when a peer process has died, says which and
    exits ``EXIT_PREEMPTED`` at once, saving nothing (the collectives of a save would wait
    for the dead peer). Returns when every peer is alive (a fault of another kind)."""
    if _BEATS is None or not isinstance(error, Exception):
      return
    _BEATS.step_failed.set()  # for the abort trap, while the peers are looked at
    lost = _BEATS.lost_peers()
    if not lost:
      _BEATS.step_failed.clear()
      return
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ''
    _exit_preempted(
        f'{_describe(lost)} stopped during step {step + 1} ({type(error).__name__}: '
        f'{first_line[:300]}). Nothing was saved after step {last_saved}: rerun the same '
        f'command on every host to resume from the last complete checkpoint. Exit '
        f'{EXIT_PREEMPTED} (requeue).')

  def close(self) -> None:
    for signum, handler in self._previous_handlers.items():
      signal.signal(signum, handler)
    self._previous_handlers = {}


# ---------------------------------------------------------------------------------------------
# Multi-host: a peer that dies.


def initialize_distributed(**initialize_kwargs) -> None:
  """``jax.distributed.initialize(**initialize_kwargs)``, with a dead peer made a requeue
  (module docstring): recoverable coordination service, liveness counters, abort trap."""
  global _BEATS
  jax.config.update('jax_enable_recoverability', True)
  jax.distributed.initialize(**initialize_kwargs)
  if jax.process_count() > 1:
    _BEATS = _Beats()
    _AbortTrap.install(_BEATS)


class _Beats:
  """Each process bumps its counter in the coordination service every ``BEAT_SECONDS``."""

  def __init__(self):
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    self._client = distributed.global_state.client
    self.process_index, self.process_count = jax.process_index(), jax.process_count()
    self.step_failed = threading.Event()
    self._beat()
    threading.Thread(target=self._run, name='bingo_jax-beats', daemon=True).start()

  def _beat(self) -> None:
    self._client.key_value_increment(_BEAT_KEY.format(self.process_index), 1)

  def _run(self) -> None:
    while True:
      time.sleep(BEAT_SECONDS)
      try:
        self._beat()
      except Exception:  # pylint: disable=broad-except
        return  # the service is gone (process 0 died): lost_peers says so

  def _counts(self) -> dict:
    counts = {}
    for index in range(self.process_count):
      try:
        counts[index] = self._client.key_value_try_get(_BEAT_KEY.format(index))
      except Exception as e:  # pylint: disable=broad-except
        if 'NOT_FOUND' not in str(e):
          raise  # the service does not answer
        counts[index] = None  # never beat: it died before its first
    return counts

  def lost_peers(self, beats: int = 3) -> list[int]:
    """The peers whose counter did not move in ``beats`` beats; ``[0]`` when the service
    (on process 0) does not answer."""
    try:
      before = self._counts()
      time.sleep(beats * BEAT_SECONDS)
      after = self._counts()
    except Exception:  # pylint: disable=broad-except
      return [0] if self.process_index != 0 else []
    return [index for index in range(self.process_count)
            if index != self.process_index and after[index] == before[index]]


_BEATS: Optional[_Beats] = None


def _describe(lost: list[int]) -> str:
  count = jax.process_count()
  names = ', '.join(f'{index}{" (the coordinator)" if index == 0 else ""}' for index in lost)
  return f'Peer process{"es" if len(lost) > 1 else ""} {names} of {count}'


def _exit_preempted(message: str) -> None:
  """Logs ``message`` and ends the process with ``EXIT_PREEMPTED`` now: no atexit handler,
  no checkpointer close, both of which would wait for the dead peer."""
  logging.error('%s', message)
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  os._exit(EXIT_PREEMPTED)  # pylint: disable=protected-access


class _AbortTrap:
  """SIGABRT of the process, caught before it kills it.

  When process 0 dies, the survivors' coordination client aborts (``Terminating process
  because the JAX distributed service detected fatal errors``) from its own thread, with no
  hook Python can set in this jaxlib. The handler runs in that thread: if the main thread
  reports a failed step within ``WAIT_SECONDS`` (the collective with the dead process fails
  at the same moment), the abort is the dead peer's and the process exits
  ``EXIT_PREEMPTED``; otherwise it is an abort of another cause, and it goes on (status 134).
  """

  WAIT_SECONDS = 10.0
  _handler = None  # the ctypes function pointer, kept alive

  @classmethod
  def install(cls, beats: _Beats) -> None:
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)

    def on_abort(signum: int) -> None:
      if beats.step_failed.wait(cls.WAIT_SECONDS):
        _exit_preempted(f'{_describe([0])} stopped (the coordination service is gone). '
                        'Nothing was saved after the last complete checkpoint: rerun the same '
                        f'command on every host to resume from it. Exit {EXIT_PREEMPTED} '
                        '(requeue).')
      libc.signal(signum, None)  # SIG_DFL: the abort goes on
      os.abort()

    try:
      libc = ctypes.CDLL(None)
      libc.signal.restype = ctypes.c_void_p
      libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
      cls._handler = handler_type(on_abort)
      libc.signal(signal.SIGABRT, ctypes.cast(cls._handler, ctypes.c_void_p))
    except (OSError, AttributeError) as e:  # no C library to call: the abort stays fatal
      logging.warning('No SIGABRT trap (%s): the loss of process 0 ends this process with '
                      'status 134.', e)

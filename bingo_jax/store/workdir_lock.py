"""One training run per workdir: a lock file holding the owner's pid and host.

Two runs on one workdir would resume from each other's checkpoints and overwrite them. The
trainer takes ``WORKDIR/train.lock`` before it reads anything; a second run is refused with a
message naming the first one (command, pid, host, start time). A lock left by a process that
died without cleaning up (``kill -9``, a crash, a reboot) is *stale* and taken over, with one
line in the log: on the same host a lock is stale when its pid no longer runs, or runs a
process started at another time (a reused pid), or the host has rebooted since. A lock of
another host cannot be checked from here; the message says which file to delete if that run
is known to be gone.

The lock file is written under a temporary name and hard-linked into place, which fails if the
lock exists: two runs starting in the same instant cannot both get it (on NFS too, where
``O_EXCL`` was historically unreliable). Only process 0 of a multi-host run takes it.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from typing import Optional

from absl import logging

LOCK_FILE = 'train.lock'


class WorkdirLockedError(RuntimeError):
  """The workdir is in use by another run."""


def _boot_id() -> Optional[str]:
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      return f.read().strip()
  except OSError:
    return None


def _process_start(pid: int) -> Optional[str]:
  """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _pid_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """``with WorkdirLock(workdir): ...`` holds ``WORKDIR/train.lock`` for the block."""

  def __init__(self, workdir: str):
    # An object store (gs://...) has no hard links or pids to check: URL workdirs are not
    # locked (the log says so).
    self._remote = '://' in str(workdir)
    self.path = str(workdir).rstrip('/') + '/' + LOCK_FILE if self._remote else os.path.join(
        os.path.abspath(workdir), LOCK_FILE)
    self._held = False

  def _record(self) -> dict:
    pid = os.getpid()
    return {'pid': pid, 'host': socket.gethostname(), 'boot_id': _boot_id(),
            'process_start': _process_start(pid),
            'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'command': ' '.join([os.path.basename(sys.executable)] + sys.argv)}

  def _read(self) -> Optional[dict]:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable: treated as held by an unknown owner

  def stale_reason(self, holder: dict) -> Optional[str]:
    """Why the lock of ``holder`` is stale, or None if its owner may still run."""
    if holder.get('host') != socket.gethostname() or 'pid' not in holder:
      return None
    if holder.get('boot_id') and _boot_id() and holder['boot_id'] != _boot_id():
      return 'the host has rebooted since'
    pid = int(holder['pid'])
    if not _pid_running(pid):
      return f'process {pid} no longer runs'
    start = _process_start(pid)
    if holder.get('process_start') and start and start != holder['process_start']:
      return f'pid {pid} now belongs to another process'
    return None

  def acquire(self) -> None:
    """Takes the lock.

    Raises:
      WorkdirLockedError: another live (or unverifiable) run holds it.
    """
    if self._remote:
      logging.warning('%s is a URL: the workdir is not locked against a second run.',
                      os.path.dirname(self.path))
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    staging = f'{self.path}.{os.getpid()}.tmp'
    with open(staging, 'w') as f:
      json.dump(self._record(), f, indent=2)
    try:
      for _ in range(5):
        try:
          os.link(staging, self.path)
          self._held = True
          return
        except FileExistsError:
          pass
        holder = self._read()
        if holder is None:
          continue  # released meanwhile
        reason = self.stale_reason(holder)
        if reason is None:
          raise WorkdirLockedError(self._held_message(holder))
        # Renaming is atomic: of two runs taking over the same stale lock, one wins.
        taken = f'{self.path}.stale.{os.getpid()}'
        try:
          os.rename(self.path, taken)
        except FileNotFoundError:
          continue
        os.remove(taken)
        logging.warning('Took over the stale lock %s of pid %s on %s (%s).', self.path,
                        holder.get('pid'), holder.get('host'), reason)
      raise WorkdirLockedError(f'Could not take {self.path}: it keeps changing hands.')
    finally:
      os.remove(staging)

  def _held_message(self, holder: dict) -> str:
    if not holder:
      return (f'{self.path} exists but cannot be read: another run may be using this workdir. '
              'If none is, delete the file and rerun.')
    return (f'{os.path.dirname(self.path)} is in use by another run: {holder.get("command")!r}, '
            f'pid {holder.get("pid")} on {holder.get("host")}, started {holder.get("started")} '
            f'(lock file {self.path}). Two runs on one workdir would overwrite each other\'s '
            'checkpoints: wait for it to finish, stop it, or use another --workdir. If that run '
            f'is known to be gone (another host cannot be checked from here), delete {self.path}.')

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    holder = self._read()
    if holder and holder.get('pid') == os.getpid() and holder.get('host') == socket.gethostname():
      os.remove(self.path)

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

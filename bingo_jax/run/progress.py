"""Progress of a training run: throughput, ETA, core-hours, and where the metrics go.

``Chronometer`` measures the training loop only: compilation (the first step of a run, which
includes it) and checkpoint writes are excluded, so images/s is the steady-state rate and the
ETA does not jump after each save. Elapsed time and core-hours accumulate over the resumes of
a run: ``Chronometer.record()`` goes into each checkpoint's progress record, and the resumed
run's chronometer starts from it (``previous=``), as big_vision's chronometer does. ``MetricWriter`` sends scalars to the console (absl
logging) and to TensorBoard event files in the workdir, from process 0 only.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import time
from typing import Iterator, Mapping, Optional, Sequence

import jax
from absl import logging


def quiet_library_logs(packages: Sequence[str] = ('orbax',)) -> None:
  """Hides INFO records of chatty libraries (orbax logs a dozen lines per checkpoint).

  Warnings and errors still pass. Works on the Python root logger, which absl logging and
  orbax both write to.
  """
  markers = tuple(f'{os.sep}{package}{os.sep}' for package in packages)

  def keep(record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        marker in record.pathname for marker in markers)
  # On the 'absl' logger itself (orbax logs through absl), so the filter also holds for
  # handlers that libraries install later (e.g. a logging.basicConfig on first use); and on
  # the root handlers for libraries that log under their own logger names.
  std_logging.getLogger('absl').addFilter(keep)
  for handler in std_logging.getLogger().handlers:
    handler.addFilter(keep)


def format_duration(seconds: float) -> str:
  """``3725`` -> ``'1h02m'``, ``59`` -> ``'59s'``, ``90000`` -> ``'1d01h'``."""
  seconds = max(0, int(round(seconds)))
  days, rest = divmod(seconds, 86400)
  hours, rest = divmod(rest, 3600)
  minutes, secs = divmod(rest, 60)
  if days:
    return f'{days}d{hours:02d}h'
  if hours:
    return f'{hours}h{minutes:02d}m'
  if minutes:
    return f'{minutes}m{secs:02d}s'
  return f'{secs}s'


# Keys of ``Chronometer.record()`` (stored in the checkpoint's progress record).
RECORD_KEYS = ('elapsed_seconds', 'training_seconds', 'core_hours')


class Chronometer:
  """Images/s, ETA and accelerator core-hours of a run that may have been resumed.

  Usage::

    chrono = Chronometer(first_step=start, total_steps=n, global_batch_size=b)
    for step in range(start + 1, n + 1):
      ... train step ...
      chrono.tick(step)
      with chrono.paused():
        ... save a checkpoint ...
  """

  def __init__(self, first_step: int, total_steps: int, global_batch_size: int,
               num_devices: Optional[int] = None, clock=time.perf_counter,
               previous: Optional[Mapping[str, float]] = None):
    """
    Args:
      first_step: the step the run starts from (0, or the restored checkpoint's step).
      total_steps: the step at which the run ends.
      global_batch_size: images per step over all hosts.
      num_devices: accelerator cores used (for core-hours); default ``jax.device_count()``.
      clock: a monotonic clock in seconds (tests pass a fake one).
      previous: the ``record()`` stored with the checkpoint this run resumes from (earlier
        runs' elapsed seconds, training seconds and core-hours, which this one adds to);
        missing keys (checkpoints older than this record) count as 0.
    """
    self.first_step = first_step
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self.num_devices = num_devices or jax.device_count()
    self._clock = clock
    self._start = clock()
    self._paused_seconds = 0.0
    # Throughput is measured from the end of the first step (which includes compilation).
    self._measure_from_step: Optional[int] = None
    self._measure_from_time = 0.0
    self._measure_paused = 0.0
    self.step = first_step
    previous = previous or {}
    self._previous = {key: float(previous.get(key) or 0.0) for key in RECORD_KEYS}

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Time spent inside (checkpoint writes, evaluation) does not count as training time."""
    began = self._clock()
    try:
      yield
    finally:
      self._paused_seconds += self._clock() - began

  def tick(self, step: int) -> None:
    """Marks the end of ``step`` (call after the step's results are available)."""
    self.step = step
    if self._measure_from_step is None:
      self._measure_from_step = step
      self._measure_from_time = self._clock()
      self._measure_paused = self._paused_seconds

  @property
  def wall_seconds(self) -> float:
    """Seconds since the chronometer started, pauses included."""
    return self._clock() - self._start

  @property
  def training_seconds(self) -> float:
    """Seconds of training since the start, pauses excluded (compilation included)."""
    return self.wall_seconds - self._paused_seconds

  def steps_per_second(self) -> Optional[float]:
    """Steady-state rate (from the end of the first step); None before two ticks."""
    if self._measure_from_step is None or self.step <= self._measure_from_step:
      return None
    seconds = (self._clock() - self._measure_from_time
               - (self._paused_seconds - self._measure_paused))
    return (self.step - self._measure_from_step) / max(seconds, 1e-9)

  def images_per_second(self) -> Optional[float]:
    rate = self.steps_per_second()
    return None if rate is None else rate * self.global_batch_size

  def eta_seconds(self) -> Optional[float]:
    rate = self.steps_per_second()
    return None if rate is None else (self.total_steps - self.step) / rate

  def core_hours_this_run(self) -> float:
    """Device-hours of this process's run so far (pauses included: devices are held)."""
    return self.wall_seconds * self.num_devices / 3600

  def core_hours(self) -> float:
    """Device-hours of the whole run: earlier (resumed-from) runs plus this one."""
    return self._previous['core_hours'] + self.core_hours_this_run()

  @property
  def elapsed_seconds(self) -> float:
    """Wall seconds of the whole run: earlier runs plus this one (pauses included)."""
    return self._previous['elapsed_seconds'] + self.wall_seconds

  def record(self) -> dict[str, float]:
    """The totals to store with a checkpoint; a resumed run passes them as ``previous``."""
    return {'elapsed_seconds': self.elapsed_seconds,
            'training_seconds': self._previous['training_seconds'] + self.training_seconds,
            'core_hours': self.core_hours()}

  def measurements(self) -> dict[str, float]:
    """Scalars for the logs: images/s, ETA, core-hours, elapsed time, progress fraction."""
    result = {'progress/fraction': self.step / max(self.total_steps, 1),
              'progress/core_hours': self.core_hours(),
              'progress/elapsed_seconds': self.elapsed_seconds,
              'progress/wall_seconds': self.wall_seconds}
    images_per_second = self.images_per_second()
    if images_per_second is not None:
      result['progress/images_per_second'] = images_per_second
      result['progress/images_per_second_per_device'] = images_per_second / self.num_devices
      result['progress/eta_seconds'] = self.eta_seconds()
    return result

  def summary_line(self) -> str:
    parts = [f'step {self.step}/{self.total_steps}']
    images_per_second = self.images_per_second()
    if images_per_second is not None:
      parts.append(f'{images_per_second:.1f} img/s')
      parts.append(f'ETA {format_duration(self.eta_seconds())}')
    parts.append(f'{self.core_hours():.2f} core-h')
    return ', '.join(parts)


class MetricWriter:
  """Scalars to absl logging and TensorBoard (``WORKDIR/tensorboard``), process 0 only."""

  def __init__(self, logdir: Optional[str]):
    """
    Args:
      logdir: directory for TensorBoard event files; ``None`` writes only to the console.
    """
    self._writer = None
    if logdir is not None and jax.process_index() == 0:
      # Imported here: TensorBoard (through TensorFlow) is only needed when a run logs.
      try:
        from flax.metrics import tensorboard
        from bingo_jax.store import fileio
        # TensorFlow opens gs:// itself (fileio.native_path).
        self._writer = tensorboard.SummaryWriter(fileio.native_path(logdir))
      except ImportError as e:  # a TensorFlow-free run (data held on the devices)
        logging.warning('No TensorBoard events (%s); metrics go to the console only.', e)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if jax.process_index() != 0:
      return
    if self._writer is not None:
      for name, value in scalars.items():
        self._writer.scalar(name, float(value), step)
      self._writer.flush()

  def log(self, step: int, scalars: Mapping[str, float], chrono: Optional[Chronometer],
          console_keys: Optional[Sequence[str]] = None) -> None:
    """One console line and one TensorBoard point per scalar (and per chrono measurement).

    Args:
      step: the training step the scalars belong to.
      scalars: metric name -> value.
      chrono: adds images/s, ETA and core-hours when given.
      console_keys: the scalars shown on the console (default all); TensorBoard gets all.
    """
    if chrono is not None:
      scalars = {**scalars, **chrono.measurements()}
    self.write_scalars(step, scalars)
    if jax.process_index() == 0:
      names = console_keys if console_keys is not None else sorted(
          name for name in scalars if not name.startswith('progress/'))
      shown = ', '.join(f'{name} {_format_value(scalars[name])}' for name in names
                        if name in scalars)
      prefix = chrono.summary_line() if chrono is not None else f'step {step}'
      logging.info('[%s] %s', prefix, shown)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def _format_value(value: float) -> str:
  value = float(value)
  if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
    return f'{value:.3e}'
  return f'{value:.4f}'

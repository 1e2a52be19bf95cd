"""The training loop: steps, logs, checkpoints, preemption, and the NaN policy.

``run_loop`` takes the steps from the start step to the last. Around each step it checks that
the previous asynchronous save succeeded, logs every ``train.log_every_steps``, saves every
``train.checkpoint_every_steps`` (and at the end, on a preemption or before an undecodable
image stops the run) and runs the kNN monitor when it is due. Metrics stay on the device until
a log or a save needs them; ``MetricsCheck`` then applies ``config.train.nan_policy``
(docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from bingo_jax.data import bad_images
from bingo_jax.run import preemption as preemption_lib
from bingo_jax.run import progress
from bingo_jax.store import checkpointing

# Metrics shown on the console; TensorBoard gets every metric of the step.
CONSOLE_METRICS = ('loss', 'top1', 'top5', 'learning_rate')


class NonFiniteLossError(RuntimeError):
  """The loss (or another training metric) became NaN or Inf (config.train.nan_policy='stop')."""


@dataclasses.dataclass
class LoopOutcome:
  """Where the loop got to; kept up to date as it runs, so it is right after an error too.

  Attributes:
    step: the last step done.
    preempted: a SIGTERM or SIGINT stopped the loop (after saving).
    last_metrics: the mean metrics of the steps of the last log.
    monitor: the last kNN monitor metrics.
    skipped_steps: the steps whose update was skipped (``config.train.nan_policy = 'skip'``).
  """
  step: int
  preempted: bool = False
  last_metrics: dict = dataclasses.field(default_factory=dict)
  monitor: dict = dataclasses.field(default_factory=dict)
  skipped_steps: list = dataclasses.field(default_factory=list)


class MetricsCheck:
  """The steps' metrics on their way to the log, checked for NaN and Inf.

  Metrics stay on the device until a log or a save needs them (no per-step host sync); they
  are checked then, before anything is logged or saved. With ``nan_policy = 'stop'`` a
  non-finite metric raises ``NonFiniteLossError``; with ``'skip'`` the step itself kept the
  previous state (``train_step``), and here its metrics are left out and its step recorded.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               checkpointer: checkpointing.TrainCheckpointer, skipped_steps: list[int]):
    self._base_lr = config.train.base_lr
    self._skip = config.train.get('nan_policy', 'stop') == 'skip'
    self._checkpointer = checkpointer
    self._skipped_steps = skipped_steps
    self._unchecked: list[tuple[int, Any]] = []  # (step, device metrics)
    self._checked: list[dict] = []               # host metrics since the last log, all finite

  def add(self, step: int, metrics: Any) -> None:
    self._unchecked.append((step, metrics))

  def check(self) -> None:
    """Copies the unchecked metrics to the host and applies the NaN policy.

    Raises:
      NonFiniteLossError: a non-finite metric under ``nan_policy = 'stop'``.
    """
    if not self._unchecked:
      return
    host = jax.device_get([m for _, m in self._unchecked])
    if self._skip:
      for (at_step, _), metrics in zip(self._unchecked, host):
        if metrics.get('skipped', 0) > 0:
          self._skipped_steps.append(at_step)
          logging.warning('Step %d: non-finite loss (%s), gradient norm (%s) or updated '
                          "state; the update was skipped (config.train.nan_policy = 'skip').",
                          at_step, float(metrics['loss']), float(metrics['grad_norm']))
      self._checked.extend(m for m in host if not m.get('skipped', 0) > 0)
      self._unchecked = []
      return
    for (at_step, _), metrics in zip(self._unchecked, host):
      bad = {k: float(np.asarray(v).ravel()[0]) for k, v in sorted(
          metrics.items(), key=lambda item: (item[0] != 'loss', item[0]))
             if not np.all(np.isfinite(v))}
      if bad:
        raise self._non_finite(at_step, bad)
    self._checked.extend(host)
    self._unchecked = []

  def take_mean(self) -> Optional[dict[str, float]]:
    """The mean of the checked metrics since the last call, or None when there are none."""
    if not self._checked:
      return None
    mean = _mean_metrics(self._checked)
    self._checked.clear()
    return mean

  def _non_finite(self, step: int, bad: dict[str, float]) -> NonFiniteLossError:
    latest = self._checkpointer.latest_step()
    return NonFiniteLossError(
        f'Step {step}: non-finite ' + ', '.join(f'{k} = {v}' for k, v in bad.items()) +
        " (config.train.nan_policy = 'stop'). The run stops without saving it; " +
        (f'the last checkpoint, step {latest}, holds finite values' if latest else
         'no checkpoint was saved before it') +
        f'. Lower config.train.base_lr (now {self._base_lr}) or check the inputs, '
        'and rerun with --config.train.allow_config_change=true.')


# size: the loop reads top to bottom, a step and what follows it (log, save, preemption,
# monitor), then how it ends after an error; split, its state would be passed around.
def run_loop(config: ml_collections.ConfigDict, workdir: str, state: Any, run_step: Callable,
             checkpointer: checkpointing.TrainCheckpointer, chrono: progress.Chronometer,
             progress_record: Callable[[int], dict],
             preemption: preemption_lib.PreemptionWatcher, outcome: LoopOutcome, *,
             total_steps: int, simulate_preemption_at_step: Optional[int],
             monitor_step: Optional[Callable] = None) -> None:
  """Steps from ``outcome.step`` to ``total_steps``: logs, checkpoints, preemption, faults.

  Args:
    state: the train state at ``outcome.step``.
    run_step: ``state -> (state, metrics)`` on the next batch.
    outcome: updated in place, also when an error stops the loop.
    monitor_step: ``(step, state) -> metrics or None`` after each step (the kNN monitor,
      when due); its metrics are logged.
    simulate_preemption_at_step: testing aid: SIGTERM this process after that step.
  Raises:
    NonFiniteLossError: a non-finite metric (``config.train.nan_policy = 'stop'``); that
      step's state is not saved.
    checkpointing.CheckpointError: a save failed.
    bad_images.BadImageError: an undecodable image; the steps done are saved first.
  The checkpointer is closed (after an error, a save in flight is still waited for), except
  when a multi-host peer died: then the process exits 75 (``exit_if_peer_lost``).
  """
  writer = progress.MetricWriter(workdir)
  preemption.attach(checkpointer)
  metrics_check = MetricsCheck(config, checkpointer, outcome.skipped_steps)

  def save(step: int) -> int:
    with chrono.paused():
      metrics_check.check()  # the state after a non-finite step is never saved
      checkpointer.save(step, state, progress_record(step))
    return step

  start_step = step = last_saved = outcome.step
  closed = False
  try:
    if preemption.should_stop(step):
      outcome.preempted = True  # signalled while starting: nothing new to save
      logging.warning('Preempted before the first step; rerun the same command to continue.')
    while step < total_steps and not outcome.preempted:
      checkpointer.check_saves()  # an earlier save's failure stops the run here
      try:
        state, metrics = run_step(state)
      except bad_images.BadImageError:
        # config.data.on_bad_image='error': keep the steps done so far, then stop.
        if step != last_saved:
          last_saved = save(step)
        raise
      step += 1
      outcome.step = step
      metrics_check.add(step, metrics)
      if step == start_step + 1:
        # The first step includes compilation: end it here so throughput excludes it.
        jax.block_until_ready(metrics)
        logging.info('First step (with compilation) done after %.1f s.', chrono.wall_seconds)
      chrono.tick(step)

      if step % config.train.log_every_steps == 0 or step == total_steps:
        _log(step, metrics_check, outcome, writer, chrono)
      if simulate_preemption_at_step is not None and step == simulate_preemption_at_step:
        os.kill(os.getpid(), signal.SIGTERM)
      outcome.preempted = preemption.should_stop(step)
      if outcome.preempted or step % config.train.checkpoint_every_steps == 0:
        last_saved = save(step)
      if outcome.preempted:
        logging.warning('Preempted: saved step %d; rerun the same command to continue.', step)
        break
      measured = monitor_step(step, state) if monitor_step is not None else None
      if measured:
        outcome.monitor = measured
        writer.log(step, measured, None)
    if step != last_saved:
      save(step)
    metrics_check.check()
    outcome.last_metrics = metrics_check.take_mean() or outcome.last_metrics
    checkpointer.close()  # waits for the last save; raises if it failed
    closed = True
  except Exception as e:  # multi-host: a dead peer exits 75 here, before close() waits for it
    preemption.exit_if_peer_lost(e, step, last_saved)
    raise
  finally:
    if not closed:
      checkpointer.close(failed=True)  # after an error: waits for a save in flight, if sound
    writer.close()


def _log(step: int, metrics_check: MetricsCheck, outcome: LoopOutcome,
         writer: progress.MetricWriter, chrono: progress.Chronometer) -> None:
  """Logs the mean metrics of the steps since the last log (console and TensorBoard)."""
  metrics_check.check()
  mean = metrics_check.take_mean()
  if mean is not None:
    outcome.last_metrics = mean
    writer.log(step, mean, chrono, console_keys=CONSOLE_METRICS)


def _mean_metrics(metrics: list[dict]) -> dict[str, float]:
  """Averages the per-step metrics since the last log (one device-to-host copy)."""
  host = jax.device_get(metrics)
  return {name: float(np.mean([m[name] for m in host])) for name in host[0]}

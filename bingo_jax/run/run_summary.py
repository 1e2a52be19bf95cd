"""The run's record: ``WORKDIR/train_summary.json``, with the history of every run on the workdir.

Each run of ``python -m bingo_jax.train`` on a workdir appends a record to ``runs``: when it
started, on which host, from which step to which, its status (``done``, ``preempted``,
``failed``, ``nothing to do``), its error, its throughput and core-hours, its final metrics,
the config changes a resume accepted, the steps a non-finite update skipped and the images
replaced by others (docs/reliability.md). The top level repeats the record of the last run
that trained.
"""

from __future__ import annotations

import os
import socket
import time

import jax
from absl import logging

from bingo_jax.run import progress
from bingo_jax.run import train_loop
from bingo_jax.store import fileio

SUMMARY_RECORD = 'train_summary.json'


def start_record(start_step: int, config_changes: list[str]) -> dict:
  """The record of a run that starts at ``start_step``; ``failed`` until it ends otherwise.

  Args:
    start_step: the step the run resumes at (0 for a fresh run).
    config_changes: the changes a resume accepted (``workdir_records.write_workdir_records``).
  """
  run_record = {'started': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
                'host': socket.gethostname(), 'pid': os.getpid(), 'start_step': start_step,
                'status': 'failed'}
  if config_changes:
    run_record['config_changes'] = config_changes
  return run_record


def finish_record(run_record: dict, outcome: train_loop.LoopOutcome,
                  chrono: progress.Chronometer, *, total_steps: int, global_batch_size: int,
                  num_devices: int, bad_images_skipped: list[dict],
                  failed: bool) -> None:
  """Completes ``run_record`` in place with where the loop ended and what it measured.

  Args:
    run_record: from ``start_record``.
    outcome: the loop's outcome.
    chrono: the run's chronometer.
    total_steps, global_batch_size, num_devices: the run's plan.
    bad_images_skipped: the undecodable training images replaced by others
      (``bad_images.replacements_of(source).records()``); logged here.
    failed: the run stops on an error (its ``status`` stays ``failed``).
  """
  step = outcome.step
  run_record.update({
      'step': step, 'total_steps': total_steps, 'preempted': outcome.preempted,
      'wall_seconds': chrono.wall_seconds, 'images_per_second': chrono.images_per_second(),
      'core_hours': chrono.core_hours(), 'core_hours_this_run': chrono.core_hours_this_run(),
      'elapsed_seconds': chrono.elapsed_seconds, 'global_batch_size': global_batch_size,
      'num_devices': num_devices, 'final_metrics': outcome.last_metrics,
      'monitor': outcome.monitor})
  if outcome.skipped_steps:
    run_record['non_finite_steps_skipped'] = outcome.skipped_steps
  if bad_images_skipped:
    run_record['bad_images_skipped'] = bad_images_skipped
    logging.warning('%d undecodable training image(s) were replaced by others: %s',
                    len(bad_images_skipped),
                    ', '.join(f'{r["index"]} ({r["file"]})' for r in bad_images_skipped))
  if not failed:
    run_record['status'] = ('preempted' if outcome.preempted else
                            'done' if step > run_record['start_step'] else 'nothing to do')


def write_summary(workdir: str, run_record: dict, trained: bool) -> dict:
  """Logs the run and writes ``train_summary.json``: this run's record, plus ``runs``.

  ``runs`` holds the records of every run on the workdir, this one last. A rerun of a
  finished run trains nothing: the top-level record (final metrics, wall time) stays that of
  the run that trained, and the rerun is only appended to ``runs``.

  Returns:
    The summary written (process 0) or that would be written (other processes).
  """
  path = fileio.join(workdir, SUMMARY_RECORD)
  previous: dict = {}
  if fileio.isfile(path):
    try:
      previous = fileio.read_json(path)
    except (OSError, ValueError) as e:
      logging.warning('%s is unreadable (%s); starting a new one.', path, e)
  runs = list(previous.get('runs', []))
  if previous and not runs:  # a summary written before runs were recorded
    runs = [{k: v for k, v in previous.items() if k != 'runs'}]
  runs.append(run_record)
  if trained or not previous:
    summary = {k: v for k, v in run_record.items() if k not in ('host', 'pid')}
    last_metrics = summary['final_metrics']
    logging.info('Training %s at step %d/%d: %.1f s, %s img/s, final %s.',
                 {'preempted': 'stopped (preempted)', 'failed': 'failed'}.get(
                     summary['status'], 'done'), summary['step'], summary['total_steps'],
                 summary['wall_seconds'],
                 'n/a' if summary['images_per_second'] is None
                 else f'{summary["images_per_second"]:.1f}',
                 ', '.join(f'{k} {last_metrics[k]:.4f}' for k in train_loop.CONSOLE_METRICS
                           if k in last_metrics))
  else:
    logging.info('Nothing to train: the workdir is at step %d of %d already.',
                 run_record['step'], run_record['total_steps'])
    summary = {k: v for k, v in previous.items() if k != 'runs'}
  summary['runs'] = runs
  if jax.process_index() == 0:
    fileio.write_json_atomically(path, summary)
  return summary

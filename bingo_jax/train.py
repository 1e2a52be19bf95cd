r"""BINGO distillation: ``python -m bingo_jax.train --config configs/X.py --workdir DIR``.

``train_and_evaluate`` reads top to bottom: config checks -> mesh -> teacher -> data and bags
-> student and its state (fresh or restored) -> jitted step -> loop (logs, checkpoints,
preemption) -> summary. Rerunning the same command continues from the latest checkpoint in
``WORKDIR/checkpoints``; a SIGTERM makes the loop save and exit cleanly. With
``config.train.method = 'moco'`` the same loop pre-trains MoCo v2 (no teacher or bag file;
the key encoder lives in the train state; docs/training.md).

Examples::

  python -m bingo_jax.train --config configs/r18_r50w2.py --workdir runs/r18_r50w2
  python -m bingo_jax.train --config configs/r18_r50w2.py:bf16 --workdir runs/r18_bf16 \
      --config.train.batch_size=512
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from bingo_jax import bag_file
from bingo_jax import checkpointing
from bingo_jax import config_checks
from bingo_jax import data_sources
from bingo_jax import device_data
from bingo_jax import fileio
from bingo_jax import input_pipeline
from bingo_jax import knn_monitor
from bingo_jax import model_io
from bingo_jax import parallel
from bingo_jax import progress
from bingo_jax import steps
from bingo_jax import train_step as train_step_lib
from bingo_jax import views
from bingo_jax.models import create_model

# Metrics shown on the console; TensorBoard gets every metric of the step.
CONSOLE_METRICS = ('loss', 'top1', 'top5', 'learning_rate')
SUMMARY_RECORD = 'train_summary.json'


# ---------------------------------------------------------------------------------------------
# Inputs: each error names the key, file or value.


def resolve_compute_dtype(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``train.compute_dtype = 'auto'`` made concrete for this backend."""
  resolved = parallel.resolve_compute_dtype(config.train.compute_dtype)
  if resolved == config.train.compute_dtype:
    return config
  config = config.copy_and_resolve_references()
  config.train.compute_dtype = resolved
  logging.info("config.train.compute_dtype = 'auto': %s on %s.", resolved, jax.default_backend())
  return config


def load_teacher(config: ml_collections.ConfigDict) -> model_io.LoadedModel:
  """The teacher model file of ``config.teacher.path``, built for the configured BN mode.

  Raises:
    FileNotFoundError / ValueError: naming ``config.teacher.path`` and the file.
  """
  path = config.teacher.path
  if not path:
    raise ValueError('config.teacher.path is not set: give the converted teacher model file '
                     '(tools/convert_torch_teacher.py), e.g. --config.teacher.path=teachers/x.')
  if not fileio.exists(path):
    raise FileNotFoundError(f'config.teacher.path = {path!r}: {fileio.absolute(path)} does not '
                            'exist. Convert the PyTorch teacher with tools/convert_torch_teacher.py.')
  try:
    record = model_io.read_record(path)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f'config.teacher.path = {path!r} is not a usable teacher: {e}') from e
  model_config = record['model']
  if model_config.get('head') in (None, 'none', 'linear'):
    raise ValueError(f'config.teacher.path = {path!r}: the model file has head '
                     f'{model_config.get("head")!r}; BINGO needs the teacher\'s projection head '
                     '(moco or swav) to embed keys.')
  output_dim = model_config.get('head_output_dim', 128)
  if output_dim != config.student.head_output_dim:
    raise ValueError(f'config.teacher.path = {path!r} embeds into {output_dim} dimensions but '
                     f'config.student.head_output_dim = {config.student.head_output_dim}.')
  overrides = {'dtype': config.train.compute_dtype}
  if config.teacher.bn_mode == 'shuffle':
    overrides['bn_group_size'] = config.teacher.bn_group_size
  return model_io.load_model(path, **overrides)


def load_training_bags(config: ml_collections.ConfigDict, source: Any,
                       num_images: int) -> bag_file.Bags:
  """The bag file of ``config.bags.path``, checked against the training images.

  Raises:
    FileNotFoundError / ValueError: naming ``config.bags.path`` and the file.
  """
  path = config.bags.path
  if not path:
    raise ValueError('config.bags.path is not set: compute bags with python -m bingo_jax.bagging '
                     'and give the file, e.g. --config.bags.path=bags/x.npz.')
  try:
    bags = bag_file.load_bags(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'config.bags.path = {path!r}: {e}') from e
  what = (f'the training split {config.data.train_split!r} of data source '
          f'{config.data.source!r} ({config.data.name or config.data.path})')
  bags.check_matches(num_images, source.fingerprint, what)
  return bags


def student_model_config(config: ml_collections.ConfigDict) -> dict:
  """``create_model`` keyword arguments of the student (stored as ``student_model.json``)."""
  student = config.student
  return {'arch': student.arch, 'head': student.head,
          'head_hidden_dim': student.head_hidden_dim,
          'head_output_dim': student.head_output_dim, 'base_width': student.base_width,
          'stem': student.stem, 'bn_group_size': student.bn_group_size}


# ---------------------------------------------------------------------------------------------
# Preemption


class PreemptionWatcher:
  """Turns SIGTERM into a flag the loop polls, so it can save and exit between steps.

  With several processes every host must stop at the same step: JAX's preemption service
  (started by ``jax.distributed.initialize``) agrees on that step, read through orbax's
  ``reached_preemption``; with one process a Python signal handler suffices.
  """

  def __init__(self, checkpointer: checkpointing.TrainCheckpointer):
    self._checkpointer = checkpointer
    self._signalled = False
    self._previous_handler = None
    if jax.process_count() == 1:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    del frame
    logging.warning('Received signal %d: saving a checkpoint after this step, then exiting.',
                    signum)
    self._signalled = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._signalled
    return self._checkpointer.reached_preemption(step)

  def close(self) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None


# ---------------------------------------------------------------------------------------------
# The run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       simulate_preemption_at_step: Optional[int] = None) -> dict:
  """Distils the configured teacher into the student, resuming from ``workdir`` if possible.

  Args:
    config: the experiment config (``configs/*.py``).
    workdir: where checkpoints, ``config.json``, ``student_model.json``, TensorBoard events
      and ``train_summary.json`` go.
    simulate_preemption_at_step: testing aid: send this process SIGTERM after that step.
  Returns:
    The summary record (also written to ``WORKDIR/train_summary.json``): ``step``,
    ``total_steps``, ``preempted``, ``wall_seconds`` and ``core_hours_this_run`` (this run),
    ``elapsed_seconds`` and ``core_hours`` (all runs of the workdir, carried across resumes),
    ``images_per_second``, final metrics, and the last kNN monitor metrics (``monitor``).
  """
  # ---- config and mesh ----
  mesh = parallel.make_mesh()
  config_checks.check_config(config, mesh.devices.size)
  config = resolve_compute_dtype(config)
  batch_views = steps.batch_views(config)
  global_batch_size = config.train.batch_size
  local_batch_size = parallel.local_batch_size(global_batch_size, mesh)
  logging.info('Mesh: %d devices over %d processes; global batch %d, %d per process.',
               mesh.devices.size, jax.process_count(), global_batch_size, local_batch_size)

  # ---- teacher (a model file; never trained, never checkpointed), data and bags ----
  teacher = _load_teacher_unless_moco(config)
  source, bags = _training_data(config, batch_views)
  steps_per_epoch = input_pipeline.steps_per_epoch(len(source), global_batch_size)
  total_steps = config.train.epochs * steps_per_epoch
  if config.train.max_steps is not None:
    total_steps = min(total_steps, config.train.max_steps)
  logging.info('%d training images, %d steps per epoch, training to step %d.', len(source),
               steps_per_epoch, total_steps)

  # ---- student, optimizer, negative queue: fresh or restored ----
  fileio.makedirs(workdir)
  student_config = student_model_config(config)
  checkpointing.write_workdir_records(workdir, student_config, config.to_json_best_effort())
  student = create_model(**student_config, dtype=config.train.compute_dtype)
  state = train_step_lib.create_train_state(config, student, jax.random.key(config.train.seed),
                                            mesh, steps_per_epoch)
  checkpointer = checkpointing.TrainCheckpointer(workdir, keep=config.train.keep_checkpoints)
  start_step = checkpointer.latest_step() or 0
  stored_progress: Optional[dict] = None
  if start_step:
    state, stored_progress = _resume(checkpointer, start_step, state, {
        'global_batch_size': global_batch_size, 'seed': config.train.seed,
        'steps_per_epoch': steps_per_epoch})

  # ---- the step: the builder of config.train.method ----
  key_model, teacher_variables = _key_side(config, student_config, teacher, mesh)
  train_step = steps.step_builder(config)(config, student, key_model, mesh, steps_per_epoch)

  # ---- the data feed: views from the host, canvases from the host, or data on the devices --
  if device_data.augment_on(config) == 'device' and device_data.use_on_device_source(config,
                                                                                   source):
    logging.info('Training images held on the devices; views drawn in the step.')
    data = device_data.place_on_devices(source, bags, mesh)
    device_step = device_data.on_device_step(train_step, config, mesh, batch_views,
                                             steps_per_epoch)

    def run_step(state: train_step_lib.TrainState) -> tuple[train_step_lib.TrainState, dict]:
      return device_step(state, teacher_variables, data)
  else:
    host_views = device_data.augment_on(config) == 'host'
    batches = input_pipeline.create_train_iterator(
        config, source, bags, start_step=start_step, local_batch_size=local_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        views=batch_views, output='views' if host_views else 'canvases')
    # The pipeline's anchor_index / positive_index stay on the host: the step reads views,
    # or the canvases, sizes and view keys it draws them from.
    keys = batch_views if host_views else device_data.canvas_keys(batch_views)
    if not host_views:
      train_step = device_data.canvas_step(train_step, config, mesh, batch_views)

    def run_step(state: train_step_lib.TrainState) -> tuple[train_step_lib.TrainState, dict]:
      local_batch = next(batches)
      batch = parallel.global_batch({key: local_batch[key] for key in keys}, mesh)
      return train_step(state, teacher_variables, batch)

  # ---- the loop ----
  # Elapsed time and core-hours continue from the checkpoint's record (progress.py).
  chrono = progress.Chronometer(start_step, total_steps, global_batch_size, mesh.devices.size,
                                previous=stored_progress)
  monitor = knn_monitor.KnnMonitor.from_config(config, mesh)
  monitor_every = config.train.get('monitor_every_epochs', 0) or 0

  def monitor_step(step: int, state: train_step_lib.TrainState) -> Optional[dict]:
    if monitor is None or not knn_monitor.is_due(step, steps_per_epoch, monitor_every):
      return None
    # Not training time: excluded from images/s and the ETA (core-hours include it).
    with chrono.paused():
      return monitor.evaluate(student, {'params': state.params,
                                        'batch_stats': state.batch_stats})

  def progress_record(step: int) -> dict:
    # The step alone fixes the data position; the rest makes a wrong resume loud.
    return {'step': step, 'global_batch_size': global_batch_size, 'seed': config.train.seed,
            'steps_per_epoch': steps_per_epoch, 'images_seen': step * global_batch_size,
            'epoch': step // steps_per_epoch, **chrono.record()}

  step, preempted, last_metrics, monitor_metrics = _train_loop(
      config, workdir, state, run_step, checkpointer, chrono, progress_record,
      start_step=start_step, total_steps=total_steps,
      simulate_preemption_at_step=simulate_preemption_at_step, monitor_step=monitor_step)
  return _write_summary(workdir, {
      'step': step, 'total_steps': total_steps, 'start_step': start_step,
      'preempted': preempted, 'wall_seconds': chrono.wall_seconds,
      'images_per_second': chrono.images_per_second(), 'core_hours': chrono.core_hours(),
      'core_hours_this_run': chrono.core_hours_this_run(),
      'elapsed_seconds': chrono.elapsed_seconds,
      'global_batch_size': global_batch_size, 'num_devices': int(mesh.devices.size),
      'final_metrics': last_metrics, 'monitor': monitor_metrics})


def _load_teacher_unless_moco(config: ml_collections.ConfigDict
                              ) -> Optional[model_io.LoadedModel]:
  """The teacher model file, or None for MoCo pre-training, whose keys come from the
  momentum encoder kept in the train state."""
  if config_checks.method(config) == 'moco':
    logging.info('MoCo v2 pre-training: key encoder = momentum %g copy of the student.',
                 config.train.moco_momentum)
    return None
  teacher = load_teacher(config)
  logging.info('Teacher %s from %s (BatchNorm %s).', teacher.model_config.get('arch'),
               config.teacher.path, config.teacher.bn_mode)
  return teacher


def _training_data(config: ml_collections.ConfigDict,
                   batch_views: tuple[str, ...]) -> tuple[Any, Optional[bag_file.Bags]]:
  """The training source, and its bags when the step reads a view of the bag positive."""
  source = data_sources.make_source(config.data, config.data.train_split)
  # MoCo and the 'anchor_only' loss use only the anchor's own views, so no bag file is read.
  if views.needs_bags(batch_views):
    return source, load_training_bags(config, source, len(source))
  if config.bags.get('path'):
    logging.info('config.bags.path = %s is unused: this run has no bag positives '
                 "(config.train.method = %r, config.train.loss = %r).", config.bags.path,
                 config_checks.method(config), config.train.loss)
  return source, None


def _resume(checkpointer: checkpointing.TrainCheckpointer, step: int,
            state: train_step_lib.TrainState,
            current: dict) -> tuple[train_step_lib.TrainState, dict]:
  """``(state, progress record)`` of checkpoint ``step``, refused when it or the data order
  would not fit."""
  try:
    state, stored_progress = checkpointer.restore(step, state)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{checkpointer.directory}/{step} does not fit this config '
                     f'(student, queue size or optimizer changed?): {e}. Use a new --workdir.'
                     ) from e
  _check_resumable(stored_progress, current, checkpointer.directory, step)
  logging.info('Resumed from %s/%d.', checkpointer.directory, step)
  return state, stored_progress


def _key_side(config: ml_collections.ConfigDict, student_config: dict,
              teacher: Optional[model_io.LoadedModel],
              mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """``(key_model, variables)`` for the step: the teacher and its variables (BINGO), or the
  key encoder and ``{}`` (MoCo: its variables live in the train state)."""
  if teacher is not None:
    return teacher.model, parallel.replicate(teacher.variables, mesh)
  # The key encoder: the student's architecture with the shuffle's BatchNorm groups.
  key_model = create_model(**dict(student_config, bn_group_size=config.teacher.bn_group_size),
                           dtype=config.train.compute_dtype)
  return key_model, parallel.replicate({}, mesh)


def _train_loop(config: ml_collections.ConfigDict, workdir: str,
                state: train_step_lib.TrainState, run_step: Callable,
                checkpointer: checkpointing.TrainCheckpointer, chrono: progress.Chronometer,
                progress_record: Callable[[int], dict], *, start_step: int, total_steps: int,
                simulate_preemption_at_step: Optional[int],
                monitor_step: Optional[Callable] = None) -> tuple[int, bool, dict, dict]:
  """Steps from ``start_step`` to ``total_steps``: logs, checkpoints, preemption.

  Args:
    run_step: ``state -> (state, metrics)`` on the next batch.
    monitor_step: ``(step, state) -> metrics or None`` after each step (the kNN monitor,
      when due); its metrics are logged.
  Returns:
    ``(step, preempted, last_metrics, last monitor metrics)``; the checkpointer is closed.
  """
  writer = progress.MetricWriter(workdir)
  preemption = PreemptionWatcher(checkpointer)

  def save(step: int) -> None:
    with chrono.paused():
      checkpointer.save(step, state, progress_record(step))

  step, last_saved, preempted = start_step, start_step, False
  pending_metrics: list[dict] = []
  last_metrics: dict[str, float] = {}
  monitor_metrics: dict[str, float] = {}
  try:
    while step < total_steps:
      state, metrics = run_step(state)
      step += 1
      pending_metrics.append(metrics)
      if step == start_step + 1:
        # The first step includes compilation: end it here so throughput excludes it.
        jax.block_until_ready(metrics)
        logging.info('First step (with compilation) done after %.1f s.', chrono.wall_seconds)
      chrono.tick(step)

      if step % config.train.log_every_steps == 0 or step == total_steps:
        last_metrics = _mean_metrics(pending_metrics)
        pending_metrics = []
        writer.log(step, last_metrics, chrono, console_keys=CONSOLE_METRICS)

      if simulate_preemption_at_step is not None and step == simulate_preemption_at_step:
        os.kill(os.getpid(), signal.SIGTERM)
      preempted = preemption.should_stop(step)
      if preempted or step % config.train.checkpoint_every_steps == 0:
        save(step)
        last_saved = step
      if preempted:
        logging.warning('Preempted: saved step %d; rerun the same command to continue.', step)
        break
      measured = monitor_step(step, state) if monitor_step is not None else None
      if measured:
        monitor_metrics = measured
        writer.log(step, monitor_metrics, None)
    if step != last_saved:
      save(step)
    if pending_metrics:
      last_metrics = _mean_metrics(pending_metrics)
  finally:
    preemption.close()
    checkpointer.close()
    writer.close()
  return step, preempted, last_metrics, monitor_metrics



def _write_summary(workdir: str, summary: dict) -> dict:
  """Logs the run's summary record and writes it to ``WORKDIR/train_summary.json``."""
  last_metrics = summary['final_metrics']
  logging.info('Training %s at step %d/%d: %.1f s, %s img/s, final %s.',
               'stopped (preempted)' if summary['preempted'] else 'done', summary['step'],
               summary['total_steps'], summary['wall_seconds'],
               'n/a' if summary['images_per_second'] is None
               else f'{summary["images_per_second"]:.1f}',
               ', '.join(f'{k} {last_metrics[k]:.4f}' for k in CONSOLE_METRICS
                         if k in last_metrics))
  if jax.process_index() == 0:
    fileio.write_json_atomically(fileio.join(workdir, SUMMARY_RECORD), summary)
  return summary


def _mean_metrics(metrics: list[dict]) -> dict[str, float]:
  """Averages the per-step metrics since the last log (one device-to-host copy)."""
  host = jax.device_get(metrics)
  return {name: float(np.mean([m[name] for m in host])) for name in host[0]}


def _check_resumable(stored: dict, current: dict, directory: str, step: int) -> None:
  """Refuses to resume when the data order would differ from the interrupted run's.

  Args:
    stored: the checkpoint's progress record.
    current: this run's ``global_batch_size``, ``seed`` and ``steps_per_epoch`` (the latter
      changes with the number of training images).
    directory, step: the checkpoint, for the message.
  """
  for key, value in current.items():
    if key in stored and stored[key] != value:
      raise ValueError(f'{directory}/{step} was trained with {key} = {stored[key]} but this run '
                       f'has {value}; resuming would not reproduce the data order. Use a new '
                       '--workdir or the original setting.')


# ---------------------------------------------------------------------------------------------
# Command line

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs; a rerun '
                               'resumes from its latest checkpoint.')
_JAX_DISTRIBUTED = flags.DEFINE_bool('jax_distributed', False,
                                     'Call jax.distributed.initialize() (multi-host runs).')
_SIMULATE_PREEMPTION = flags.DEFINE_integer(
    'simulate_preemption_at_step', None, 'Testing aid: SIGTERM this process after this step.')


def main(argv: list[str]) -> None:
  del argv
  progress.quiet_library_logs()
  if _JAX_DISTRIBUTED.value:
    jax.distributed.initialize()
  # tf.data runs on the host only; it must not take accelerator memory from JAX. (Training
  # from data held on the devices needs no TensorFlow at all.)
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
  except ImportError:
    pass
  train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                     simulate_preemption_at_step=_SIMULATE_PREEMPTION.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)

r"""BINGO distillation: ``python -m bingo_jax.train --config NAME --workdir DIR``.

``train_and_evaluate`` reads top to bottom: config checks -> mesh -> teacher -> data and bags
-> student and its state (fresh or restored) -> jitted step -> loop (logs, checkpoints,
preemption) -> summary. Rerunning the same command continues from the latest checkpoint in
``WORKDIR/checkpoints`` that restores intact; a SIGTERM or SIGINT makes the loop save and exit
with status 75 (``EXIT_PREEMPTED``: rerun to continue). One run at a time holds the workdir
(``WORKDIR/train.lock``); faults and what each gets are in docs/reliability.md. With
``config.train.method = 'moco'`` the same loop pre-trains MoCo v2 (no teacher file; no bag
file unless ``config.train.moco_loss`` is a bag objective; the key encoder lives in the train
state; docs/training.md).

The loop itself is ``train_loop.run_loop`` (logs, saves, the NaN policy), the signal handling
``preemption``, and the run's record ``run_summary``; this module sets the run up and reads in
the order the run happens.

Examples::

  python -m bingo_jax.train --config r18_r50w2 --workdir runs/r18_r50w2
  python -m bingo_jax.train --config r18_r50w2:bf16 --workdir runs/r18_bf16 \
      --config.train.batch_size=512
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import jax
import ml_collections
from absl import flags, logging

from bingo_jax import input_pipeline
from bingo_jax.bags import bag_file
from bingo_jax.bags import student_bags
from bingo_jax.console import cli
from bingo_jax.data import bad_images
from bingo_jax.data import parallel
from bingo_jax.data import sources as data_sources
from bingo_jax.data import views
from bingo_jax.method import config_checks
from bingo_jax.method import steps
from bingo_jax.method import train_step as train_step_lib
from bingo_jax.models import create_model
from bingo_jax.run import data_feed
from bingo_jax.run import knn_monitor
from bingo_jax.run import preemption as preemption_lib
from bingo_jax.run import progress
from bingo_jax.run import run_summary
from bingo_jax.run import train_loop
from bingo_jax.run import warm_start
from bingo_jax.store import checkpointing
from bingo_jax.store import fileio
from bingo_jax.store import model_io
from bingo_jax.store import workdir_lock
from bingo_jax.store import workdir_records

# WORKDIR/train_summary.json: the run's record and the history of the workdir's runs.
SUMMARY_RECORD = run_summary.SUMMARY_RECORD
# Exit status of a run stopped by SIGTERM/SIGINT after saving (sysexits.h EX_TEMPFAIL: "try
# again later"), so a scheduler can requeue it; errors exit 1, a finished run 0.
EXIT_PREEMPTED = preemption_lib.EXIT_PREEMPTED


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
                     '(bingo-convert), e.g. --config.teacher.path=teachers/x.')
  if not fileio.exists(path):
    raise FileNotFoundError(f'config.teacher.path = {path!r}: {fileio.absolute(path)} does not '
                            'exist. Convert the PyTorch teacher with bingo-convert.')
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
  if config.teacher.bn_mode in config_checks.SHUFFLE_MODES:
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
  bags.check_matches(num_images, source.fingerprint, what,
                     content_fingerprint=source.content_fingerprint)
  return bags


def student_model_config(config: ml_collections.ConfigDict) -> dict:
  """``create_model`` keyword arguments of the student (stored as ``student_model.json``)."""
  student = config.student
  return {'arch': student.arch, 'head': student.head,
          'head_hidden_dim': student.head_hidden_dim,
          'head_output_dim': student.head_output_dim, 'base_width': student.base_width,
          'stem': student.stem, 'bn_group_size': student.bn_group_size}


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
    ``images_per_second``, final metrics, the last kNN monitor metrics (``monitor``),
    ``status``, and ``runs`` (the records of every run on this workdir, this one last).
  Raises:
    workdir_lock.WorkdirLockedError: another run holds the workdir.
    checkpointing.CheckpointError: a checkpoint save failed (the run stops at once).
    train_loop.NonFiniteLossError: a non-finite loss or metric (config.train.nan_policy =
      'stop').
    bad_images.BadImageError: an undecodable image (config.data.on_bad_image = 'error'),
      after saving the steps done.
  """
  # SIGTERM/SIGINT from here on only set a flag; the lock is taken once the inputs are checked.
  lock = workdir_lock.WorkdirLock(workdir)
  preemption = preemption_lib.PreemptionWatcher()
  try:
    return _train_and_evaluate(config, workdir, lock, preemption, simulate_preemption_at_step)
  finally:
    preemption.close()
    lock.release()


# size: the run set up in the order it happens, each section a few calls, read top to bottom.
def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        lock: workdir_lock.WorkdirLock,
                        preemption: preemption_lib.PreemptionWatcher,
                        simulate_preemption_at_step: Optional[int]) -> dict:
  """``train_and_evaluate`` with the lock (not yet taken) and the signal handlers installed."""
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
  steps_per_epoch, total_steps = _steps_of_the_run(config, len(source))

  # ---- the workdir: one run at a time; the config recorded by the run that saved ----
  fileio.makedirs(workdir)
  if jax.process_index() == 0:
    lock.acquire()
  checkpointer = checkpointing.TrainCheckpointer(workdir, keep=config.train.keep_checkpoints)
  student_config = student_model_config(config)
  config_changes = workdir_records.check_workdir_records(
      workdir, student_config, config.to_json_best_effort(),
      resuming=bool(checkpointer.all_steps()),
      allow_config_change=config.train.get('allow_config_change', False))

  # ---- student, optimizer, negative queue: fresh or restored ----
  student = create_model(**student_config, dtype=config.train.compute_dtype)
  state = train_step_lib.create_train_state(config, student, jax.random.key(config.train.seed),
                                            mesh, steps_per_epoch)
  start_step, state, stored_progress = _resume(checkpointer, state, {
      'global_batch_size': global_batch_size, 'seed': config.train.seed,
      'steps_per_epoch': steps_per_epoch})
  state = warm_start.for_fresh_run(config, state, start_step, student_config, mesh)

  # ---- the step (the builder of config.train.method) and its data feed ----
  key_model, teacher_variables = _key_side(config, student_config, teacher, mesh)
  train_step = steps.step_builder(config)(config, student, key_model, mesh, steps_per_epoch)
  run_step = data_feed.make_data_feed(
      config, train_step, teacher_variables, source, bags, mesh, batch_views,
      start_step=start_step, local_batch_size=local_batch_size, steps_per_epoch=steps_per_epoch,
      bag_source=student_bags.bag_source(config, workdir, student, source, mesh, steps_per_epoch))
  # Every check has passed (the checkpoint fits this config): only now are the records
  # rewritten, so that a refused run leaves them as they were.
  workdir_records.write_workdir_records(workdir, student_config, config.to_json_best_effort(),
                                        checked_changes=config_changes)

  # ---- the loop (elapsed time and core-hours continue from the checkpoint's, progress.py) ----
  chrono = progress.Chronometer(start_step, total_steps, global_batch_size, mesh.devices.size,
                                previous=stored_progress)
  monitor_step = _monitor_step(config, mesh, student, chrono, steps_per_epoch)

  def progress_record(step: int) -> dict:
    # The step alone fixes the data position; the rest makes a wrong resume loud.
    return {'step': step, 'global_batch_size': global_batch_size, 'seed': config.train.seed,
            'steps_per_epoch': steps_per_epoch, 'images_seen': step * global_batch_size,
            'epoch': step // steps_per_epoch, **chrono.record()}

  run_record = run_summary.start_record(start_step, config_changes)
  outcome = train_loop.LoopOutcome(step=start_step)
  failed = True
  try:
    train_loop.run_loop(config, workdir, state, run_step, checkpointer, chrono, progress_record,
                        preemption, outcome, total_steps=total_steps,
                        simulate_preemption_at_step=simulate_preemption_at_step,
                        monitor_step=monitor_step)
    failed = False
  except BaseException as e:
    run_record['error'] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    raise
  finally:
    # ---- summary: this run's record, appended to those of the earlier runs ----
    run_summary.finish_record(
        run_record, outcome, chrono, total_steps=total_steps,
        global_batch_size=global_batch_size, num_devices=int(mesh.devices.size),
        bad_images_skipped=bad_images.replacements_of(source).records(), failed=failed)
    summary = run_summary.write_summary(workdir, run_record,
                                        trained=outcome.step > start_step or failed)
  return summary


def _steps_of_the_run(config: ml_collections.ConfigDict, num_images: int) -> tuple[int, int]:
  """``(steps_per_epoch, total_steps)``: the epochs' steps, or ``train.max_steps`` if fewer."""
  steps_per_epoch = input_pipeline.steps_per_epoch(num_images, config.train.batch_size)
  total_steps = config.train.epochs * steps_per_epoch
  if config.train.max_steps is not None:
    total_steps = min(total_steps, config.train.max_steps)
  logging.info('%d training images, %d steps per epoch, training to step %d.', num_images,
               steps_per_epoch, total_steps)
  return steps_per_epoch, total_steps


def _monitor_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, student: Any,
                  chrono: progress.Chronometer, steps_per_epoch: int) -> Callable:
  """``(step, state) -> kNN monitor metrics, or None when the monitor is off or not due``."""
  monitor = knn_monitor.KnnMonitor.from_config(config, mesh)
  monitor_every = config.train.get('monitor_every_epochs', 0) or 0

  def monitor_step(step: int, state: train_step_lib.TrainState) -> Optional[dict]:
    if monitor is None or not knn_monitor.is_due(step, steps_per_epoch, monitor_every):
      return None
    # Not training time: excluded from images/s and the ETA (core-hours include it).
    with chrono.paused():
      return monitor.evaluate(student, {'params': state.params,
                                        'batch_stats': state.batch_stats})
  return monitor_step


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
  # Plain MoCo and the 'anchor_only' loss use only the anchor's own views: no bag file is read.
  if views.needs_bags(batch_views) and student_bags.uses_student_bags(config):
    logging.info('Bags from the student, refreshed every %d epochs (config.bags.source).',
                 config.bags.refresh_every_epochs)
    return source, None
  if views.needs_bags(batch_views):
    return source, load_training_bags(config, source, len(source))
  if config.bags.get('path'):
    logging.info('config.bags.path = %s is unused: this run has no bag positives '
                 '(config.train.method = %r, %s = %r).', config.bags.path,
                 config_checks.method(config), config_checks.loss_key(config),
                 config_checks.loss_name(config))
  return source, None


def _resume(checkpointer: checkpointing.TrainCheckpointer, state: train_step_lib.TrainState,
            current: dict) -> tuple[int, train_step_lib.TrainState, Optional[dict]]:
  """``(step, state, progress record)`` of the newest checkpoint that restores intact, or
  ``(0, state, None)``.

  Damaged steps are moved aside with one line each (``restore_latest``); an intact step that
  does not fit, or whose data order would differ, is refused.
  """
  try:
    resumed = checkpointer.restore_latest(state)
  except ValueError as e:
    raise ValueError(f'{checkpointer.directory} does not fit this config (student, queue size '
                     f'or optimizer changed?): {e}. Use a new --workdir.') from e
  if resumed is None:
    return 0, state, None
  step, state, stored_progress = resumed
  _check_resumable(stored_progress, current, checkpointer.directory, step)
  logging.info('Resumed from %s/%d.', checkpointer.directory, step)
  return step, state, stored_progress


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

_CONFIG = cli.shared(cli.CONFIG)
_WORKDIR = cli.shared(cli.WORKDIR)  # checkpoints, logs; a rerun resumes from the latest
_JAX_DISTRIBUTED = flags.DEFINE_bool(
    'jax_distributed', False, 'Call jax.distributed.initialize() (multi-host runs; the cluster '
    'is detected, or given by --process_id, --num_processes and JAX_COORDINATOR_ADDRESS).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --jax_distributed: this '
                                   "process's index, where the cluster is not detected.")
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --jax_distributed: the '
                                      'number of processes, where the cluster is not detected.')
_SIMULATE_PREEMPTION = flags.DEFINE_integer(
    'simulate_preemption_at_step', None, 'Testing aid: SIGTERM this process after this step.')


def main(argv: list[str]) -> None:
  cli.no_positional_arguments(argv)
  # A config value out of range is refused before any device, library or file is touched.
  config_checks.check_training_config(_CONFIG.value)
  progress.quiet_library_logs()
  if _JAX_DISTRIBUTED.value:
    # A dead peer ends the survivors with EXIT_PREEMPTED, not an abort (preemption.py).
    preemption_lib.initialize_distributed(process_id=_PROCESS_ID.value,
                                          num_processes=_NUM_PROCESSES.value)
  # tf.data runs on the host only; it must not take accelerator memory from JAX. (Training
  # from data held on the devices needs no TensorFlow at all.)
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
  except ImportError:
    pass
  # A fault with a known cause (a damaged checkpoint, a refused resume, a diverged loss, a
  # taken workdir, a bad image or teacher, a bad config value) ends in one line: cli.run.
  summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                               simulate_preemption_at_step=_SIMULATE_PREEMPTION.value)
  # A real preemption exits EXIT_PREEMPTED so that a scheduler requeues the job; the testing
  # aid's stop was asked for, and exits 0.
  if summary['preempted'] and _SIMULATE_PREEMPTION.value is None:
    sys.exit(EXIT_PREEMPTED)


def cli_main() -> None:
  """The ``bingo-train`` console command (and ``python -m bingo_jax.train``)."""
  cli.run(main, ('config', 'workdir'))


if __name__ == '__main__':
  cli_main()

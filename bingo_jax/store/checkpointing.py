"""Training checkpoints: what a run needs to resume, and the student for evaluation/export.

A training workdir holds::

    WORKDIR/
      config.json          the full config of the (latest) run
      student_model.json   create_model keyword arguments of the student
      checkpoints/<step>/  orbax checkpoints: 'state' (the whole TrainState: student params,
                           batch statistics, optimizer state, negative queue and pointer, step,
                           RNG) and 'progress' (JSON: step, batch size, images seen)

The input pipeline's example order is a function of (seed, epoch), so the step alone fixes the
data position: a resumed run asks the pipeline for the batches from ``step`` on. The teacher is
not checkpointed: it never changes and is reloaded from its model file.

Orbax writes each step under a temporary name and renames it when complete, so an interrupted
save never shadows the previous checkpoint. Every process calls ``save``/``restore`` (orbax
coordinates the hosts); only process 0 writes the JSON records.

Integrity (docs/reliability.md, the checks in ``checkpoint_integrity``): ``save`` refuses a
state with NaN or Inf values and stores a CRC-32 of every array in the progress record; a
restore checks the orbax metadata against the target, reads the arrays, and verifies
finiteness and the checksums. ``restore_latest`` falls back to the newest step that passes,
moving damaged steps to ``WORKDIR/damaged_checkpoints``. A failed asynchronous save is raised
by ``check_saves`` (called once per step) instead of being only logged by orbax's background
thread. The workdir's JSON records (``student_model.json``, ``config.json``) are written and
read by ``workdir_records``.
"""

from __future__ import annotations

import logging as std_logging
import os
import time
from typing import Any, Optional

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from bingo_jax.models import create_model
from bingo_jax.store import checkpoint_integrity as integrity
from bingo_jax.store import fileio
from bingo_jax.store import model_io
from bingo_jax.store import workdir_records

CHECKPOINTS_DIR = 'checkpoints'
# How long a step that failed to read is watched for vanishing before it counts as damaged: a
# training's rotation removes a step once a newer one is complete, files first, directory last.
ROTATION_GRACE_SECONDS = 3.0
_STATE = 'state'
_PROGRESS = 'progress'
# The errors of this module's API (raised by the integrity checks).
CheckpointError = integrity.CheckpointError
NonFiniteStateError = integrity.NonFiniteStateError


def _is_prng_key(x: Any) -> bool:
  dtype = getattr(x, 'dtype', None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _to_storable(tree: Any) -> Any:
  """A state (flax struct / optax namedtuples / typed keys) as a tree of plain arrays."""
  tree = flax.serialization.to_state_dict(tree)

  def convert(x):
    if _is_prng_key(x):
      if isinstance(x, jax.ShapeDtypeStruct):
        return jax.eval_shape(jax.random.key_data, x)
      return jax.random.key_data(x)
    return x
  return jax.tree.map(convert, tree)


def _from_storable(target: Any, stored: Any) -> Any:
  """Inverse of ``_to_storable``, using ``target`` (a state or its abstract shapes) for structure."""
  target_dict = flax.serialization.to_state_dict(target)
  restored = jax.tree.map(
      lambda t, s: jax.random.wrap_key_data(s, impl=jax.random.key_impl(t))
      if _is_prng_key(t) else s, target_dict, stored)
  return flax.serialization.from_state_dict(target, restored)


def _host_copy(x: Any) -> Any:
  """A replicated array as one numpy copy; other arrays unchanged.

  Orbax writes numpy leaves from the primary process only. Handing it the replicated device
  arrays instead makes it compile a shard-slicing program per device and shape at the first
  save (tens of seconds on a many-device host); the state is identical everywhere anyway.
  """
  if isinstance(x, jax.Array) and x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return x


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings, where the leaves have them) for a restore target."""
  def leaf(x):
    sharding = getattr(x, 'sharding', None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(leaf, tree)


class TrainCheckpointer:
  """Saves and restores a ``TrainState`` in ``WORKDIR/checkpoints`` with orbax.

  Saves are asynchronous (the arrays are copied to the host before ``save`` returns, so the
  next step may donate them); ``check_saves`` raises the failure of an earlier save, and
  ``close`` waits for the last write.
  """

  def __init__(self, workdir: str, keep: int, read_only: bool = False):
    """
    Args:
      workdir: the training workdir.
      keep: number of most recent checkpoints kept (older ones are deleted).
      read_only: open for restoring only (evaluation, export); damaged steps are skipped,
        never moved.
    """
    self.workdir = fileio.absolute(workdir)
    self.directory = fileio.join(self.workdir, CHECKPOINTS_DIR)
    self._read_only = read_only
    self._pending: Optional[int] = None   # the step of the save not yet known to be complete
    self._save_broken = False              # a save failed: orbax may hang if waited on
    self._capture = integrity.OrbaxErrorCapture()
    std_logging.getLogger('absl').addFilter(self._capture)
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                             enable_async_checkpointing=False)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._manager = ocp.CheckpointManager(
        fileio.as_path(self.directory), options=options,
        item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                       _PROGRESS: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  # ---- saving ----

  def save(self, step: int, state: Any, progress: dict) -> None:
    """Saves ``state`` (any pytree of the train state) and a JSON ``progress`` record.

    Raises:
      NonFiniteStateError: the state holds NaN or Inf; nothing is written, so the last good
        checkpoints stay (a bad state never rotates them out).
      CheckpointError: the previous save failed.
    """
    self.check_saves(wait=True)
    storable = jax.tree.map(_host_copy, _to_storable(state))
    integrity.check_savable(storable, step, self.directory, self.latest_step())
    record = dict(progress, **{integrity.CHECKSUMS_KEY: integrity.checksums(storable)})
    self._pending = step
    try:  # orbax writes some files (the arrays' metadata) before it returns
      self._manager.save(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardSave(storable),
          _PROGRESS: ocp.args.JsonSave(record)}), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._save_failed(integrity.root_cause(e))

  def check_saves(self, wait: bool = False) -> None:
    """Raises if an earlier asynchronous save failed (cheap: call it every step).

    Args:
      wait: wait for a save in progress first (otherwise only a finished one is checked).
    Raises:
      CheckpointError: naming the step and orbax's cause.
    """
    if self._pending is None:
      return
    if wait:
      try:
        self._manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        self._save_failed(integrity.root_cause(e))
    elif self._manager.is_saving_in_progress():
      return
    try:
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._save_failed(integrity.root_cause(e))
    if not fileio.isdir(fileio.join(self.directory, str(self._pending))):
      self._save_failed(self._capture.first_error or 'orbax did not finalise the step '
                        '(see its log above)')
    self._pending = None

  def _save_failed(self, cause: str) -> None:
    step, self._pending = self._pending, None
    self._save_broken = True
    latest = [s for s in self._existing_steps() if s != step]
    raise CheckpointError(
        f'Saving step {step} to {self.directory} failed: {cause}. The run stops here; the '
        f'last complete checkpoint is ' + (f'step {max(latest)}' if latest else 'none') +
        ' (full disk or read-only directory? Free space and rerun the same command).')

  def _existing_steps(self) -> list[int]:
    if not fileio.isdir(self.directory):
      return []
    return sorted(int(n) for n in fileio.listdir(self.directory) if n.isdigit())

  # ---- restoring ----

  def _check_fits(self, step: int, abstract: Any) -> None:
    """Compares the step's orbax metadata with the restore target.

    Raises:
      CheckpointError: the metadata is unreadable (damaged step).
      ValueError: the step is intact but holds another structure (the config changed).
    """
    try:
      metadata = self._manager.item_metadata(step)[_STATE]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'metadata unreadable: {integrity.root_cause(e)}') from None
    if metadata is None:
      raise CheckpointError('no state metadata')
    integrity.check_fits(metadata, abstract, f'{self.directory}/{step}')

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    """Restores and verifies step ``step`` onto the structure, shapes and shardings of ``target``.

    Args:
      step: a step in ``all_steps()``.
      target: a state of the same structure (e.g. the freshly initialised one) or its
        abstract shapes; its shardings decide where the restored arrays live.
    Returns:
      ``(state, progress)``.
    Raises:
      CheckpointError: the step is damaged (unreadable, truncated, non-finite, checksum).
      ValueError: the step holds another structure (student, queue or optimizer changed).
    """
    abstract = _abstract(_to_storable(_abstract(target)))
    self._check_fits(step, abstract)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(abstract),
          _PROGRESS: ocp.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(integrity.root_cause(e)) from None
    progress = dict(restored[_PROGRESS])
    integrity.verify(restored[_STATE], progress)
    progress.pop(integrity.CHECKSUMS_KEY, None)
    return _from_storable(target, restored[_STATE]), progress

  def restore_latest(self, target: Any) -> Optional[tuple[int, Any, dict]]:
    """The newest step that restores and verifies, falling back over damaged ones.

    A damaged step is reported in one line and, unless read-only, moved to
    ``WORKDIR/damaged_checkpoints/`` (kept for inspection; it no longer counts as a step).

    Returns:
      ``(step, state, progress)``, or None when the workdir holds no usable checkpoint.
    Raises:
      ValueError: an intact step that does not fit ``target`` (see ``restore``).
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, progress = self.restore(step, target)
      except CheckpointError as e:
        self.report_damaged(step, str(e))
        continue
      return step, state, progress
    return None

  def rotated_away(self, step: int, grace: float = ROTATION_GRACE_SECONDS) -> bool:
    """Whether ``step``, which failed to read, was removed by a running training's rotation
    (a newer step exists and the step's directory goes within ``grace`` seconds)."""
    directory = fileio.join(self.directory, str(step))
    if not any(s > step for s in self._existing_steps()):
      return False  # the rotation removes a step only once a newer one is complete
    deadline = time.monotonic() + grace
    while fileio.isdir(directory):
      if time.monotonic() >= deadline:
        return False
      time.sleep(0.05)
    self._manager.reload()
    return True

  def report_damaged(self, step: int, cause: str) -> None:
    """Logs a damaged step in one line and, unless read-only, moves it aside.

    Only process 0 of a run on a local workdir moves it (into
    ``WORKDIR/damaged_checkpoints/``); a read-only checkpointer (evaluation, export) and a
    workdir on an object store leave it where it is.
    """
    older = [s for s in self.all_steps() if s < step]
    fallback = f'falling back to step {max(older)}' if older else 'no older step to fall back to'
    if self._read_only or jax.process_index() != 0 or fileio.is_url(self.workdir):
      logging.warning('Checkpoint %s/%d is damaged (%s); %s.', self.directory, step, cause,
                      fallback)
      return
    aside = integrity.move_aside(self.workdir, os.path.join(self.directory, str(step)), step)
    self._manager.reload()
    logging.warning('Checkpoint %s/%d is damaged (%s); moved to %s; %s.', self.directory, step,
                    cause, aside, fallback)

  def restore_arrays(self, step: int) -> dict:
    """Restores and verifies the stored state as a nested dict of arrays on one local device.

    Needs no train state to restore onto (evaluation and export do not build an optimizer).

    Raises:
      CheckpointError: the step is damaged.
    """
    try:
      metadata = self._manager.item_metadata(step)[_STATE]
      device = jax.local_devices()[0]
      abstract = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                         sharding=jax.sharding.SingleDeviceSharding(device)),
          metadata, is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'))
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(abstract), _PROGRESS: ocp.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(integrity.root_cause(e)) from None
    integrity.verify(restored[_STATE], dict(restored[_PROGRESS]))
    return restored[_STATE]

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: True at the step all hosts agreed to save at after a preemption notice."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()
    self.check_saves(wait=True)

  def close(self, failed: bool = False) -> None:
    """Waits for the last save and closes; raises if it failed.

    Args:
      failed: the run is already stopping on an error: skip waiting on orbax (whose threads
        may block on a broken save) and raise nothing more.
    """
    if failed:
      # A save in flight when the run stops on another error (a NaN, a bad image) is still
      # waited for: it holds the last good step.
      if self._pending is not None and not self._save_broken:
        try:
          self._manager.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-except
          logging.error('The last checkpoint save (step %d) failed too: %s', self._pending,
                        integrity.root_cause(e))
      std_logging.getLogger('absl').removeFilter(self._capture)
      return
    std_logging.getLogger('absl').removeFilter(self._capture)
    self.check_saves(wait=True)
    self._manager.close()


def load_student(workdir: str, step: Optional[int] = None,
                 **model_overrides) -> model_io.LoadedModel:
  """The student network of a training workdir, at its latest (or a given) checkpoint.

  Args:
    workdir: a ``python -m bingo_jax.train`` workdir.
    step: checkpoint step; default the latest.
    **model_overrides: ``create_model`` arguments to change (e.g. ``dtype``); they must not
      change parameter shapes.
  Returns:
    A ``model_io.LoadedModel`` whose ``metadata`` holds ``workdir`` and ``step``.
  """
  workdir = fileio.absolute(workdir)
  model_config = workdir_records.read_student_record(workdir)
  checkpointer = TrainCheckpointer(workdir, keep=1, read_only=True)
  try:
    step, stored = _restore_for_reading(checkpointer, step)
  finally:
    checkpointer.close()
  variables = {'params': stored['params'], 'batch_stats': stored.get('batch_stats', {})}
  variables = jax.tree.map(jnp.asarray, variables)
  model = create_model(**{**model_config, **model_overrides})
  model_io.check_variable_shapes(model, variables, f'{workdir} step {step}')
  return model_io.LoadedModel(model=model, variables=variables, model_config=model_config,
                              metadata={'workdir': workdir, 'step': int(step),
                                        'source_format': 'bingo_jax training checkpoint'})


def _restore_for_reading(checkpointer: TrainCheckpointer,
                         step: Optional[int]) -> tuple[int, dict]:
  """``(step, stored arrays)`` of ``step``, or of the newest step that restores intact.

  A step that a running training's rotation removes while it is read is not damaged: the
  newest complete step is read instead, with one line. A damaged step is reported, skipped.

  Raises:
    FileNotFoundError / ValueError: no checkpoint; ``step`` absent or rotated away.
    CheckpointError: ``step`` is damaged, or no step restores intact.
  """
  steps = checkpointer.all_steps()
  if not steps:
    raise FileNotFoundError(f'{checkpointer.directory} holds no checkpoint.')
  if step is not None and step not in steps:
    raise ValueError(f'{checkpointer.directory} has no checkpoint of step {step}; '
                     f'available: {sorted(steps)}.')
  damaged = set()
  for _ in range(100):  # each pass reads one step; a rotation makes one more pass
    newest = [s for s in sorted(checkpointer.all_steps(), reverse=True) if s not in damaged]
    if step is None and not newest:
      break
    reading = step if step is not None else newest[0]
    try:
      return reading, checkpointer.restore_arrays(reading)
    except CheckpointError as e:
      integrity.quiet_abandoned_reads()
      rotated = checkpointer.rotated_away(reading)
      if step is not None:
        raise (ValueError(f'{checkpointer.directory}/{step} was removed while being read (a '
                          'running training keeps only its newest checkpoints); available '
                          f'now: {sorted(checkpointer.all_steps())}.') if rotated else
               CheckpointError(f'{checkpointer.directory}/{step} is damaged: {e}')) from None
      if rotated:
        logging.warning('Checkpoint %s/%d was removed by the running training while being '
                        'read (it keeps only its newest checkpoints); reading the newest '
                        'complete step instead.', checkpointer.directory, reading)
        continue
      checkpointer.report_damaged(reading, str(e))
      damaged.add(reading)
  raise CheckpointError(f'{checkpointer.directory}: no checkpoint restores intact '
                        f'(steps {sorted(steps)}; see the warnings above).')


def load_any(path: str, step: Optional[int] = None,
             **model_overrides) -> model_io.LoadedModel:
  """Loads a network from a model file or from a training workdir (latest or given step).

  Args:
    path: a model file (has ``bingo_model.json``) or a ``python -m bingo_jax.train`` workdir.
    step: training step to load from a workdir (default: the latest checkpoint).
    **model_overrides: see ``model_io.load_model``.
  Returns:
    A ``model_io.LoadedModel``.
  Raises:
    FileNotFoundError: ``path`` is neither.
  """
  if fileio.isfile(fileio.join(path, model_io.MODEL_RECORD)):
    if step is not None:
      raise ValueError(f'{path} is a model file, not a training workdir: it has no step {step}.')
    return model_io.load_model(path, **model_overrides)
  if fileio.isdir(fileio.join(path, CHECKPOINTS_DIR)):
    return load_student(path, step=step, **model_overrides)
  raise FileNotFoundError(
      f'{path} is neither a bingo_jax model file ({model_io.MODEL_RECORD} missing) nor a '
      'training workdir (checkpoints/ missing).')

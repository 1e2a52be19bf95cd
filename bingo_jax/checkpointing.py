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
"""

from __future__ import annotations

import json
from typing import Any, Optional

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bingo_jax import fileio
from bingo_jax import model_io
from bingo_jax.models import create_model

CHECKPOINTS_DIR = 'checkpoints'
STUDENT_RECORD = 'student_model.json'
CONFIG_RECORD = 'config.json'
_STATE = 'state'
_PROGRESS = 'progress'


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


def write_workdir_records(workdir: str, student_model_config: dict, config_json: str) -> None:
  """Writes ``student_model.json`` and ``config.json`` (process 0 only; others return).

  Args:
    workdir: the training workdir.
    student_model_config: ``create_model`` keyword arguments of the student (JSON values).
    config_json: the run's config as JSON text (``config.to_json_best_effort()``).
  Raises:
    ValueError: the workdir already holds checkpoints of a different student.
  """
  record_path = fileio.join(workdir, STUDENT_RECORD)
  if fileio.isfile(record_path):
    previous = fileio.read_json(record_path)
    if previous != student_model_config:
      raise ValueError(
          f'{record_path} describes a different student ({previous}) than this config '
          f'({student_model_config}); its checkpoints cannot be resumed. Use a new --workdir.')
  if jax.process_index() != 0:
    return
  fileio.write_json_atomically(record_path, student_model_config)
  fileio.write_json_atomically(fileio.join(workdir, CONFIG_RECORD), json.loads(config_json))


class TrainCheckpointer:
  """Saves and restores a ``TrainState`` in ``WORKDIR/checkpoints`` with orbax.

  Saves are asynchronous (the arrays are copied to the host before ``save`` returns, so the
  next step may donate them); ``close`` waits for the last write.
  """

  def __init__(self, workdir: str, keep: int, read_only: bool = False):
    """
    Args:
      workdir: the training workdir.
      keep: number of most recent checkpoints kept (older ones are deleted).
      read_only: open for restoring only (evaluation, export).
    """
    self.directory = fileio.join(fileio.absolute(workdir), CHECKPOINTS_DIR)
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

  def save(self, step: int, state: Any, progress: dict) -> None:
    """Saves ``state`` (any pytree of the train state) and a JSON ``progress`` record."""
    self._manager.save(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(jax.tree.map(_host_copy, _to_storable(state))),
        _PROGRESS: ocp.args.JsonSave(progress)}), force=True)

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    """Restores step ``step`` onto the structure, shapes and shardings of ``target``.

    Args:
      step: a step in ``all_steps()``.
      target: a state of the same structure (e.g. the freshly initialised one) or its
        abstract shapes; its shardings decide where the restored arrays live.
    Returns:
      ``(state, progress)``.
    """
    abstract = _abstract(_to_storable(_abstract(target)))
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(abstract),
        _PROGRESS: ocp.args.JsonRestore()}))
    return _from_storable(target, restored[_STATE]), dict(restored[_PROGRESS])

  def restore_arrays(self, step: int) -> dict:
    """Restores the stored state as a nested dict of arrays on one local device.

    Needs no train state to restore onto (evaluation and export do not build an optimizer).
    """
    metadata = self._manager.item_metadata(step)[_STATE]
    device = jax.local_devices()[0]
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(device)),
        metadata, is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'))
    return self._manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(abstract)}))[_STATE]

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: True at the step all hosts agreed to save at after a preemption notice."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def read_student_record(workdir: str) -> dict:
  """The student's ``create_model`` keyword arguments stored in a training workdir."""
  path = fileio.join(workdir, STUDENT_RECORD)
  if not fileio.isfile(path):
    raise FileNotFoundError(f'{path} is missing: {workdir} is not a bingo_jax training workdir '
                            f'(python -m bingo_jax.train writes it).')
  return fileio.read_json(path)


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
  model_config = read_student_record(workdir)
  checkpointer = TrainCheckpointer(workdir, keep=1, read_only=True)
  steps = checkpointer.all_steps()
  if not steps:
    raise FileNotFoundError(f'{checkpointer.directory} holds no checkpoint.')
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise ValueError(f'{checkpointer.directory} has no checkpoint of step {step}; '
                     f'available: {sorted(steps)}.')
  stored = checkpointer.restore_arrays(step)
  checkpointer.close()
  variables = {'params': stored['params'], 'batch_stats': stored.get('batch_stats', {})}
  variables = jax.tree.map(jnp.asarray, variables)
  model = create_model(**{**model_config, **model_overrides})
  model_io.check_variable_shapes(model, variables, f'{workdir} step {step}')
  return model_io.LoadedModel(model=model, variables=variables, model_config=model_config,
                              metadata={'workdir': workdir, 'step': int(step),
                                        'source_format': 'bingo_jax training checkpoint'})


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

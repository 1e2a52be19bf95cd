"""Starting a training run from a model file's weights (``config.student.init_from``).

A fresh run (no checkpoint in its workdir yet) normally starts from a random student. With
``config.student.init_from = PATH`` (a bingo_jax model file: a converted checkpoint or an
exported student) it starts from that file's parameters and BatchNorm statistics instead;
under ``config.train.method = 'moco'`` the key encoder starts as the same copy, as MoCo's
builder copies the query encoder. Everything else is fresh: the step counter, the SGD
momentum (zeros, as for a random start), the negative queue and the schedule. This is how a
finished MoCo run is continued from its exported model (a warm restart of the cosine
schedule; the queue refills within ``queue_size / batch_size`` steps).

A resumed run ignores ``init_from``: its checkpoint holds the weights, so a run started from
a file resumes exactly like any other.
"""

from __future__ import annotations

from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from bingo_jax.data import parallel
from bingo_jax.method import train_step
from bingo_jax.store import model_io

# The create_model arguments that fix the parameter tree; bn_group_size and dtype do not.
_SHAPE_KEYS = ('arch', 'head', 'head_hidden_dim', 'head_output_dim', 'base_width', 'stem')


def init_from(config: ml_collections.ConfigDict) -> Optional[str]:
  """``config.student.init_from`` (None or a model file path)."""
  return config.student.get('init_from', None) or None


def check_architecture(path: str, stored: dict, student_config: dict) -> None:
  """Raises unless the model file at ``path`` has the student's architecture.

  Args:
    path: the model file, for the message.
    stored: its ``create_model`` arguments (``bingo_model.json``).
    student_config: the student's (``train.student_model_config``).
  Raises:
    ValueError: naming ``path`` and each differing key, ``config.student.KEY``.
  """
  differing = [f'config.student.{key} = {student_config.get(key)!r}, {path} has '
               f'{stored.get(key)!r}' for key in _SHAPE_KEYS
               if stored.get(key) != student_config.get(key)]
  if differing:
    raise ValueError(f'config.student.init_from = {path}: the model file is not the student '
                     'architecture:\n  ' + '\n  '.join(differing))


def warm_start(state: train_step.TrainState, path: str, student_config: dict,
               mesh: jax.sharding.Mesh) -> train_step.TrainState:
  """``state`` (fresh, step 0) with the student's variables taken from the model file.

  Args:
    state: ``train_step.create_train_state``'s state.
    path: a model file of the student's architecture (finite; ``model_io.load_model``).
    student_config: the student's ``create_model`` arguments.
    mesh: the device mesh (the variables are replicated on it).
  Returns:
    The state with ``params`` and ``batch_stats`` (and MoCo's ``key_params`` /
    ``key_batch_stats``) from the file, float32; the rest unchanged.
  Raises:
    ValueError: another architecture, or variables that do not fit the student's tree.
  """
  loaded = model_io.load_model(path)
  check_architecture(path, loaded.model_config, student_config)
  variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), loaded.variables)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  expected = jax.tree.structure((state.params, state.batch_stats))
  if jax.tree.structure((params, batch_stats)) != expected:
    raise ValueError(f'config.student.init_from = {path}: its variables do not match the '
                     "student's parameter tree.")
  updates = {'params': params, 'batch_stats': batch_stats}
  if state.key_params is not None:
    # Copies: the step donates the state, and one buffer may not be donated twice.
    updates.update(key_params=jax.tree.map(jnp.copy, params),
                   key_batch_stats=jax.tree.map(jnp.copy, batch_stats))
  logging.info('Student initialised from %s.', path)
  return state.replace(**parallel.replicate(updates, mesh))


def for_fresh_run(config: ml_collections.ConfigDict, state: train_step.TrainState,
                  start_step: int, student_config: dict,
                  mesh: jax.sharding.Mesh) -> train_step.TrainState:
  """``warm_start`` from ``config.student.init_from`` when the run starts at step 0; else
  ``state`` as it is (a resumed run, or no ``init_from``)."""
  path = init_from(config)
  if start_step or not path:
    return state
  return warm_start(state, path, student_config, mesh)

"""Model files: a network's variables plus the record needed to rebuild it, loaded by path.

A model file is a directory::

    PATH/
      bingo_model.json   {"format_version": 1, "model": {create_model kwargs},
                          "metadata": {source file, source format, ...}}
      variables/         orbax checkpoint of {"params": ..., "batch_stats": ...}

Converted teachers (``bingo-convert``) and exported students are model
files. The directory is written under a temporary name and renamed into place, so a crash
never leaves a half-written model file behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bingo_jax.models import Model, create_model
from bingo_jax.store import fileio
from bingo_jax.store import finite

MODEL_RECORD = 'bingo_model.json'
VARIABLES_DIR = 'variables'
FORMAT_VERSION = 1


@dataclasses.dataclass
class LoadedModel:
  """A network with its variables.

  Attributes:
    model: the Flax module (``Model``); ``model.apply(variables, images)`` returns
      ``(features, head_output)``.
    variables: ``{'params': ..., 'batch_stats': ...}``.
    model_config: the ``create_model`` keyword arguments.
    metadata: free-form record (source file and format, training step...).
  """
  model: Model
  variables: dict
  model_config: dict
  metadata: dict

  def embed(self, images: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Eval-mode forward of a batch of NHWC float images (already normalised).

    Args:
      images: ``(batch, height, width, 3)`` float array.
    Returns:
      ``(features, head_output)`` as numpy arrays: pooled backbone features
      ``(batch, feature_dim)`` and the head output ``(batch, output_dim)`` or ``None``.
    """
    features, head_output = self._apply(self.variables, jnp.asarray(images, jnp.float32))
    return np.asarray(features), None if head_output is None else np.asarray(head_output)

  @property
  def _apply(self) -> Callable:
    if not hasattr(self, '_jitted'):
      self._jitted = jax.jit(lambda v, x: self.model.apply(v, x, train=False))
    return self._jitted


def _to_numpy_tree(tree):
  return jax.tree.map(lambda x: np.asarray(x), tree)


class NonFiniteModelError(ValueError):
  """A model's variables hold NaN or Inf (the message names the file and the arrays)."""


def check_finite(variables: Any, what: str) -> None:
  """Refuses variables holding NaN or Inf, naming them.

  Args:
    variables: a tree of arrays.
    what: the file or source, for the message.
  Raises:
    NonFiniteModelError: naming the non-finite arrays (a diverged or damaged model embeds
      every image alike: bags and kNN results of chance level, with no other sign).
  """
  bad = finite.non_finite_paths(variables)
  if bad:
    raise NonFiniteModelError(
        f'{what}: {finite.describe(bad, len(jax.tree.leaves(variables)))}. '
        'Pass allow_non_finite=True (--allow_non_finite) to accept them anyway.')


def save_model(path: str, model_config: dict, variables: dict,
               metadata: Optional[dict] = None, overwrite: bool = False,
               allow_non_finite: bool = False) -> str:
  """Writes a model file atomically. Returns the absolute path (or the URL).

  Locally the directory is written under a temporary name and renamed into place. A URL
  (``gs://...``) has no atomic directory rename: the variables are written first and the
  record ``bingo_model.json`` last, as the commit marker that ``read_record`` requires.

  Args:
    path: destination directory (must not exist unless ``overwrite``), local or a URL.
    model_config: ``create_model`` keyword arguments (JSON-serialisable).
    variables: ``{'params': ..., 'batch_stats': ...}`` matching ``create_model(**model_config)``.
    metadata: extra JSON-serialisable record.
    overwrite: replace an existing model file; anything else at ``path`` (a directory of
      other files, a checkpoint, a regular file) is never replaced.
    allow_non_finite: write variables holding NaN or Inf (refused by default).
  Raises:
    FileExistsError: ``path`` exists and is not a model file, or exists without ``overwrite``.
    ValueError: non-finite variables.
  """
  path = fileio.absolute(path)
  if fileio.exists(path) and not overwrite:
    raise FileExistsError(f'{path} already exists; pass overwrite=True (--overwrite) to replace it.')
  if fileio.exists(path) and not fileio.isfile(fileio.join(path, MODEL_RECORD)):
    raise FileExistsError(
        f'{path} exists and is not a bingo_jax model file ({MODEL_RECORD} missing); '
        '--overwrite only replaces a model file. Give a new destination path.')
  if not allow_non_finite:
    check_finite(variables, f'Refusing to write {path}')
  record = {'format_version': FORMAT_VERSION, 'model': model_config, 'metadata': metadata or {}}
  json.dumps(record)  # fail before writing anything on unserialisable values
  if fileio.is_url(path):
    return _save_model_at_url(path, record, variables)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=os.path.basename(path) + '.tmp-', dir=parent)
  replaced = None
  try:
    variables = {k: _to_numpy_tree(v) for k, v in variables.items()}
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(staging, VARIABLES_DIR), variables)
    with open(os.path.join(staging, MODEL_RECORD), 'w') as f:
      json.dump(record, f, indent=2, sort_keys=True)
    # A directory cannot be renamed over a non-empty one: the old model file is moved aside
    # (not deleted) until the new one is in place, and moved back if that fails.
    if os.path.exists(path):
      replaced = tempfile.mkdtemp(prefix=os.path.basename(path) + '.old-', dir=parent)
      os.replace(path, os.path.join(replaced, 'model'))
    os.replace(staging, path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    if replaced is not None and not os.path.exists(path):
      os.replace(os.path.join(replaced, 'model'), path)
    raise
  finally:
    if replaced is not None:
      shutil.rmtree(replaced, ignore_errors=True)
  return path


def _save_model_at_url(url: str, record: dict, variables: dict) -> str:
  """``save_model`` on an object store: files first, the record (commit marker) last."""
  if fileio.exists(url):
    # The record goes first: from here until the new one is written, readers see no model
    # file rather than a mix of old and new variables.
    if fileio.isfile(fileio.join(url, MODEL_RECORD)):
      fileio.remove(fileio.join(url, MODEL_RECORD))
    fileio.rmtree(url)
  variables = {k: _to_numpy_tree(v) for k, v in variables.items()}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(fileio.as_path(fileio.join(url, VARIABLES_DIR)), variables)
  fileio.write_json_atomically(fileio.join(url, MODEL_RECORD), record)
  return url


def read_record(path: str) -> dict:
  """The ``bingo_model.json`` record of a model file, with a clear error if it is not one."""
  record_path = fileio.join(path, MODEL_RECORD)
  if not fileio.isfile(record_path):
    raise FileNotFoundError(
        f'{path} is not a bingo_jax model file: {MODEL_RECORD} is missing. Convert PyTorch '
        f'checkpoints with bingo-convert first.')
  with fileio.open_file(record_path, 'r') as f:
    try:
      record = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{record_path} is not valid JSON: {e}') from e
  if record.get('format_version') != FORMAT_VERSION or 'model' not in record:
    raise ValueError(f'{record_path}: unsupported model record (format_version='
                     f'{record.get("format_version")!r}, expected {FORMAT_VERSION}).')
  return record


def load_model(path: str, allow_non_finite: bool = False, **model_overrides) -> LoadedModel:
  """Loads a model file written by ``save_model`` (converted teacher or exported student).

  Args:
    path: the model file directory.
    allow_non_finite: accept variables holding NaN or Inf (refused by default).
    **model_overrides: ``create_model`` arguments to change, e.g. ``dtype=jnp.bfloat16`` or
      ``bn_group_size=32``; they must not change parameter shapes.
  Returns:
    A ``LoadedModel``.
  Raises:
    ValueError: the variables do not fit the model, or hold NaN or Inf.
  """
  path = fileio.absolute(path)
  record = read_record(path)
  model_config = dict(record['model'])
  model = create_model(**{**model_config, **model_overrides})
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(fileio.as_path(fileio.join(path, VARIABLES_DIR)))
  if not allow_non_finite:
    check_finite(restored, path)
  variables = {k: jax.tree.map(jnp.asarray, v) for k, v in restored.items()}
  check_variable_shapes(model, variables, path)
  return LoadedModel(model=model, variables=variables, model_config=model_config,
                     metadata=record.get('metadata', {}))


def check_variable_shapes(model: Model, variables: dict, path: str) -> None:
  """Raises unless ``variables`` has exactly the parameter tree and shapes of ``model``.

  Args:
    model: the network the variables are meant for.
    variables: ``{'params', 'batch_stats'}`` as stored.
    path: where they came from, for the message.
  Raises:
    ValueError: naming ``path``, the missing and unexpected entries and wrong shapes.
  """
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, 64, 64, 3)), train=False))
  flat_expected = {jax.tree_util.keystr(k): v.shape
                   for k, v in jax.tree_util.tree_flatten_with_path(dict(expected))[0]}
  flat_actual = {jax.tree_util.keystr(k): v.shape
                 for k, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
  missing = sorted(set(flat_expected) - set(flat_actual))
  unexpected = sorted(set(flat_actual) - set(flat_expected))
  wrong = sorted(k for k in set(flat_expected) & set(flat_actual)
                 if tuple(flat_expected[k]) != tuple(flat_actual[k]))
  if missing or unexpected or wrong:
    lines = [f'{path}: the stored variables do not fit the model {model_config_str(model)}.']
    if missing:
      lines.append(f'  missing: {", ".join(missing[:10])}' + (' ...' if len(missing) > 10 else ''))
    if unexpected:
      lines.append(f'  unexpected: {", ".join(unexpected[:10])}')
    for k in wrong[:10]:
      lines.append(f'  {k}: stored {tuple(flat_actual[k])}, model expects {tuple(flat_expected[k])}')
    raise ValueError('\n'.join(lines))


def model_config_str(model: Model) -> str:
  head = type(model.head).__name__ if model.head is not None else 'no head'
  return f'{type(model.backbone).__name__} + {head}'

"""The records of a training workdir beside its checkpoints: ``student_model.json`` and
``config.json``.

``student_model.json`` holds the student's ``create_model`` keyword arguments, so that
evaluation and export rebuild the network without the config (``read_student_record``).
``config.json`` holds the config of the latest run; a resume compares this run's config with
it and refuses a change (``ConfigChangedError``) unless ``config.train.allow_config_change``,
except for ``RESUME_SAFE_KEYS`` (docs/reliability.md).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import jax
from absl import logging

from bingo_jax.configs import common as config_common
from bingo_jax.store import fileio

STUDENT_RECORD = 'student_model.json'
CONFIG_RECORD = 'config.json'
# Keys of config.json that a resume may change without config.train.allow_config_change: they
# change how often the run logs, saves and where it stops, never what it computes.
RESUME_SAFE_KEYS = ('train.allow_config_change', 'train.log_every_steps',
                    'train.checkpoint_every_steps', 'train.keep_checkpoints', 'train.max_steps')


class ConfigChangedError(ValueError):
  """A resume with another config than the recorded one (without allow_config_change)."""


def _flatten(record: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(record, dict):
    flat = {}
    for key, value in record.items():
      flat.update(_flatten(value, f'{prefix}{key}.'))
    return flat
  return {prefix[:-1]: record}


def config_changes(previous: dict, current: dict,
                   defaults: Optional[dict] = None) -> list[str]:
  """The keys whose values differ between two config records, as ``config.k: old -> new``.

  Args:
    previous, current: configs as JSON dicts (``config.json`` and this run's config).
    defaults: the config schema's defaults as a JSON dict (``configs.common.base_config``).
      A key the recorded config lacks and this run holds at its default is not a change: it
      was added to the schema after the run was recorded, and a new key's default keeps the
      computation it had before.
  Returns:
    One line per changed, added or removed key, except ``RESUME_SAFE_KEYS``.
  """
  old, new = _flatten(previous), _flatten(current)
  schema = _flatten(defaults or {})
  missing = object()
  lines = []
  for key in sorted(set(old) | set(new)):
    if key in RESUME_SAFE_KEYS:
      continue
    before, after = old.get(key, missing), new.get(key, missing)
    if before is missing and key in schema and after == schema[key]:
      continue
    if before != after:
      lines.append(f'config.{key}: {"(absent)" if before is missing else repr(before)} -> '
                   f'{"(absent)" if after is missing else repr(after)}')
  return lines


def check_workdir_records(workdir: str, student_model_config: dict, config_json: str,
                          resuming: bool = False, allow_config_change: bool = False,
                          defaults: Optional[dict] = None) -> list[str]:
  """Compares this run with the workdir's records; writes nothing.

  Args:
    workdir: the training workdir.
    student_model_config: ``create_model`` keyword arguments of the student (JSON values).
    config_json: the run's config as JSON text (``config.to_json_best_effort()``).
    resuming: the workdir holds checkpoints this run continues from; its ``config.json`` is
      then compared with this run's config.
    allow_config_change: accept (and log) a resume with a different config.
    defaults: the schema's defaults (``config_changes``); None: ``base_config()``'s.
  Returns:
    The config changes of a resume (``config_changes`` lines; empty for a fresh run).
  Raises:
    ValueError: the workdir already holds checkpoints of a different student.
    ConfigChangedError: when resuming, the recorded config differs and
      ``allow_config_change`` is False.
  """
  record_path = fileio.join(workdir, STUDENT_RECORD)
  if fileio.isfile(record_path):
    previous = fileio.read_json(record_path)
    if previous != student_model_config:
      raise ValueError(
          f'{record_path} describes a different student ({previous}) than this config '
          f'({student_model_config}); its checkpoints cannot be resumed. Use a new --workdir.')
  config_path = fileio.join(workdir, CONFIG_RECORD)
  changes = []
  if resuming and fileio.isfile(config_path):
    if defaults is None:
      defaults = json.loads(config_common.base_config().to_json_best_effort())
    changes = config_changes(fileio.read_json(config_path), json.loads(config_json), defaults)
    if changes and not allow_config_change:
      raise ConfigChangedError(
          f'{workdir} holds checkpoints of a run with another config ({config_path}); this '
          f'run changes {len(changes)} key(s): ' + '; '.join(changes) +
          '. Rerun with the recorded config, use a new --workdir, or pass '
          '--config.train.allow_config_change=true to resume with the change (it is logged '
          'and kept in train_summary.json).')
  return changes


def write_workdir_records(workdir: str, student_model_config: dict, config_json: str,
                          resuming: bool = False, allow_config_change: bool = False,
                          defaults: Optional[dict] = None,
                          checked_changes: Optional[list[str]] = None) -> list[str]:
  """Writes ``student_model.json`` and ``config.json`` (process 0 only) after
  ``check_workdir_records`` (same arguments and errors), logging each accepted change.

  The trainer checks first and writes only once every other check of the run has passed too
  (the checkpoint restores onto this config), so that a refused run leaves the records as
  they were; it passes the changes its check returned as ``checked_changes``.

  Returns:
    The config changes of a resume (empty for a fresh run).
  """
  changes = checked_changes
  if changes is None:
    changes = check_workdir_records(workdir, student_model_config, config_json, resuming,
                                    allow_config_change, defaults)
  for line in changes:
    logging.warning('Resuming with a changed config (allow_config_change): %s', line)
  if jax.process_index() != 0:
    return changes
  fileio.write_json_atomically(fileio.join(workdir, STUDENT_RECORD), student_model_config)
  fileio.write_json_atomically(fileio.join(workdir, CONFIG_RECORD), json.loads(config_json))
  return changes


def read_student_record(workdir: str) -> dict:
  """The student's ``create_model`` keyword arguments stored in a training workdir."""
  path = fileio.join(workdir, STUDENT_RECORD)
  if not fileio.isfile(path):
    raise FileNotFoundError(f'{path} is missing: {workdir} is not a bingo_jax training workdir '
                            f'(python -m bingo_jax.train writes it).')
  return fileio.read_json(path)

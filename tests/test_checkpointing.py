"""Training checkpoints: exact round trips onto the mesh, retention, atomicity, load_student.

References are host copies of the values taken before saving (numpy), never the restore
path's own output.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bingo_jax.data import parallel
from bingo_jax.method.train_step import TrainState
from bingo_jax.models import create_model, init_variables
from bingo_jax.store import checkpointing, model_io, workdir_records

STUDENT = dict(arch='resnet18', head='moco', base_width=8, stem='cifar', head_hidden_dim=32,
               head_output_dim=16, bn_group_size=4)


@pytest.fixture(scope='module')
def student_variables():
  return init_variables(create_model(**STUDENT), jax.random.key(0), 32)


def _state(variables, step: int, mesh) -> TrainState:
  """A train state with every kind of leaf: params, statistics, optax momentum, queue, key."""
  params = jax.tree.map(lambda x: x + 0.01 * step, variables['params'])
  optimizer = optax.chain(optax.add_decayed_weights(1e-4), optax.trace(0.9))
  _, opt_state = optimizer.update(jax.tree.map(jnp.ones_like, params),
                                  optimizer.init(params), params)
  rng = np.random.default_rng(step)
  state = TrainState(
      step=jnp.int32(step), params=params,
      # Step-dependent statistics, so a restore that kept the target's would be caught.
      batch_stats=jax.tree.map(lambda x: x + 0.5 * step, variables['batch_stats']),
      opt_state=opt_state,
      negative_queue=jnp.asarray(rng.standard_normal((64, 16)), jnp.float32),
      queue_pointer=jnp.int32(16 * step % 64),
      rng=jax.random.key_data(jax.random.key(step)))
  return parallel.replicate(state, mesh)


def _host_leaves(tree):
  return [np.array(x) for x in jax.tree.leaves(tree)]


def test_round_trip_is_exact_and_keeps_mesh_shardings(tmp_path, student_variables):
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  saved = _state(student_variables, 3, mesh)
  expected = _host_leaves(saved)
  checkpointer = checkpointing.TrainCheckpointer(str(tmp_path), keep=3)
  checkpointer.save(3, saved, {'step': 3, 'global_batch_size': 16})
  checkpointer.wait()
  target = _state(student_variables, 0, mesh)  # different values, same structure
  restored, progress = checkpointer.restore(3, target)
  checkpointer.close()
  assert progress == {'step': 3, 'global_batch_size': 16}
  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  for got, want in zip(_host_leaves(restored), expected):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
  assert restored.negative_queue.sharding.is_equivalent_to(parallel.replicated(mesh), 2)
  assert isinstance(restored.opt_state, tuple)  # optax structure, not a dict


def test_keeps_the_last_n_and_ignores_an_interrupted_save(tmp_path, student_variables):
  mesh = parallel.make_mesh(jax.devices()[:1])
  checkpointer = checkpointing.TrainCheckpointer(str(tmp_path), keep=2)
  for step in (1, 2, 3, 4):
    checkpointer.save(step, _state(student_variables, step, mesh), {'step': step})
  checkpointer.close()
  directory = tmp_path / checkpointing.CHECKPOINTS_DIR
  assert sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) == [3, 4]
  # A crash during a save leaves only a temporary directory: it must not count as a step.
  (directory / '9.orbax-checkpoint-tmp-1234').mkdir()
  (directory / '9.orbax-checkpoint-tmp-1234' / 'junk').write_text('half written')
  reopened = checkpointing.TrainCheckpointer(str(tmp_path), keep=2)
  assert reopened.latest_step() == 4
  restored, _ = reopened.restore(4, _state(student_variables, 0, mesh))
  reopened.close()
  assert int(restored.step) == 4


def test_load_student_returns_the_saved_network(tmp_path, student_variables):
  mesh = parallel.make_mesh()
  workdir = str(tmp_path)
  workdir_records.write_workdir_records(workdir, STUDENT, json.dumps({'train': {'seed': 0}}))
  checkpointer = checkpointing.TrainCheckpointer(workdir, keep=3)
  states = {step: _state(student_variables, step, mesh) for step in (2, 5)}
  for step, state in states.items():
    checkpointer.save(step, state, {'step': step})
  checkpointer.close()

  for step, loaded in ((5, checkpointing.load_student(workdir)),
                       (2, checkpointing.load_any(workdir, step=2))):
    assert loaded.metadata['step'] == step
    assert loaded.model_config == STUDENT
    for got, want in zip(_host_leaves(loaded.variables['params']),
                         _host_leaves(states[step].params)):
      np.testing.assert_array_equal(got, want)
    for got, want in zip(_host_leaves(loaded.variables['batch_stats']),
                         _host_leaves(states[step].batch_stats)):
      np.testing.assert_array_equal(got, want)
  # The rebuilt network runs: pooled features (8 x 8 channels) and the head's embedding.
  features, embeddings = loaded.embed(np.zeros((2, 32, 32, 3), np.float32))
  assert features.shape == (2, 64) and embeddings.shape == (2, 16)
  with pytest.raises(ValueError, match=r'no checkpoint of step 7; available: \[2, 5\]'):
    checkpointing.load_student(workdir, step=7)


def test_workdir_records_name_the_problem(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='student_model.json'):
    checkpointing.load_student(workdir)
  workdir_records.write_workdir_records(workdir, STUDENT, '{}')
  assert json.load(open(os.path.join(workdir, 'student_model.json'))) == STUDENT
  with pytest.raises(ValueError, match='different student'):
    workdir_records.write_workdir_records(workdir, dict(STUDENT, arch='resnet34'), '{}')
  assert not [name for name in os.listdir(workdir) if '.tmp-' in name]


# ---------------------------------------------------------------------------------------------
# Evaluation and export beside a running training whose rotation removes the step being read
# (config.train.keep_checkpoints=1, checkpoint_every_steps=1).


def _files_first_then_directory(step_dir: str, delay: float) -> None:
  """Removes a step as orbax's rotation does: the files at once, the directory later."""
  import shutil  # pylint: disable=import-outside-toplevel
  import threading  # pylint: disable=import-outside-toplevel
  for root, _, names in os.walk(step_dir):
    for name in names:
      os.remove(os.path.join(root, name))
  threading.Timer(delay, shutil.rmtree, (step_dir,)).start()


def _save_when_read(monkeypatch, read_step: int, save) -> list:
  """Makes the reader call ``save()`` (the training's next save) when it starts reading
  ``read_step``, once; returns the list of the steps it reads, in order."""
  read = checkpointing.TrainCheckpointer.restore_arrays
  reads = []

  def restore_arrays(self, step):
    if step == read_step and step not in reads:
      save()
    reads.append(step)
    return read(self, step)
  monkeypatch.setattr(checkpointing.TrainCheckpointer, 'restore_arrays', restore_arrays)
  return reads


@pytest.mark.parametrize('removal', ['orbax rotation', 'files, then the directory 0.5 s later'])
def test_a_step_rotated_away_while_read_is_not_damaged(tmp_path, student_variables, monkeypatch,
                                                       caplog, removal):
  """The reader lists step 6 and starts reading it; meanwhile the training saves step 7 and
  its rotation removes step 6. Evaluation and export read step 7, with one line; step 6 is
  never reported damaged (before: 'Checkpoint W/checkpoints/6 is damaged', then 'no
  checkpoint restores intact (steps [6])', exit 1)."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  workdir = str(tmp_path / 'run')
  workdir_records.write_workdir_records(workdir, STUDENT, '{}')
  # The second kind keeps two steps and removes step 6 itself, as orbax's deleter does.
  keep = 1 if removal == 'orbax rotation' else 2
  training = checkpointing.TrainCheckpointer(workdir, keep=keep)
  training.save(6, _state(student_variables, 6, mesh), {'step': 6})
  training.wait()
  step_7 = _state(student_variables, 7, mesh)

  def save_7():
    training.save(7, step_7, {'step': 7})
    training.wait()
    if removal != 'orbax rotation':
      _files_first_then_directory(os.path.join(workdir, 'checkpoints', '6'), 0.5)
  reads = _save_when_read(monkeypatch, 6, save_7)
  with caplog.at_level('WARNING'):
    loaded = checkpointing.load_any(workdir)  # what bingo-eval and bingo-export call
  training.close()
  assert reads == [6, 7] and loaded.metadata['step'] == 7
  for got, want in zip(_host_leaves(loaded.variables['params']), _host_leaves(step_7.params)):
    np.testing.assert_array_equal(got, want)
  messages = [r.getMessage() for r in caplog.records]
  assert not [m for m in messages if 'damaged' in m]
  rotated = [m for m in messages if 'removed by the running training' in m]
  assert len(rotated) == 1 and f'{workdir}/checkpoints/6 ' in rotated[0]
  assert 'damaged_checkpoints' not in os.listdir(workdir)


def test_export_beside_a_rotating_training_writes_the_newest_step(tmp_path, student_variables,
                                                                  monkeypatch):
  """The bingo-export command while the training (keep 1) replaces step 7 with step 8."""
  import tool_runner  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  mesh = parallel.make_mesh(jax.devices()[:1])
  workdir = str(tmp_path / 'run')
  workdir_records.write_workdir_records(workdir, STUDENT, '{}')
  training = checkpointing.TrainCheckpointer(workdir, keep=1)
  training.save(7, _state(student_variables, 7, mesh), {'step': 7})
  training.wait()
  step_8 = _state(student_variables, 8, mesh)
  reads = _save_when_read(monkeypatch, 7, lambda: (training.save(8, step_8, {'step': 8}),
                                                   training.wait()))
  status = tool_runner.run_tool('export_torch.py', workdir, str(tmp_path / 'student.pth'),
                                '--format', 'torchvision')
  training.close()
  assert status == 0 and reads == [7, 8]
  exported = torch.load(tmp_path / 'student.pth')
  # conv1 of the student at step 8: flax (h, w, in, out) -> torch (out, in, h, w).
  want = np.transpose(np.asarray(step_8.params['backbone']['conv1']['kernel']), (3, 2, 0, 1))
  np.testing.assert_array_equal(exported['conv1.weight'].numpy(), want)


def test_the_leftover_reads_of_an_abandoned_restore_print_nothing(monkeypatch):
  """The hundreds of 'Event loop is closed' tracebacks of issue 27 (tensorstore reads ending
  after orbax closed its loop) are dropped; any other exception still reaches the hook."""
  import sys  # pylint: disable=import-outside-toplevel
  from bingo_jax.store import checkpoint_integrity  # pylint: disable=import-outside-toplevel
  seen = []
  monkeypatch.setattr(sys, 'excepthook', lambda kind, value, tb: seen.append(str(value)))
  checkpoint_integrity.quiet_abandoned_reads()
  checkpoint_integrity.quiet_abandoned_reads()  # once is enough: no second wrapper
  sys.excepthook(RuntimeError, RuntimeError('Event loop is closed'), None)
  sys.excepthook(RuntimeError, RuntimeError('another failure'), None)
  sys.excepthook(ValueError, ValueError('Event loop is closed'), None)
  assert seen == ['another failure', 'Event loop is closed']

"""``config.student.init_from``: a fresh run starts from a model file's weights.

References: the arrays written into the model file (the state must hold exactly them, and
MoCo's key encoder the same copy); through the command line, a run at learning rate 0 whose
checkpointed parameters must still be the file's.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bingo_jax import train
from bingo_jax.configs import tiny_test
from bingo_jax.data import parallel
from bingo_jax.method import train_step
from bingo_jax.models import create_model
from bingo_jax.run import warm_start
from bingo_jax.store import checkpointing, model_io
from bingo_jax.testing import tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_file(path, student_config, seed):
  """A model file of ``student_config`` with weights unlike any fresh init, and the arrays."""
  model = create_model(**student_config)
  variables = jax.device_get(model.init(jax.random.key(seed), np.zeros((1, 32, 32, 3)),
                                        train=False))
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda x: np.asarray(x + rng.normal(0, 0.1, x.shape), np.float32),
                           variables)
  model_io.save_model(str(path), student_config, variables)
  return variables


@pytest.mark.parametrize('method', ['bingo', 'moco'])
def test_warm_start_puts_the_file_weights_in_a_fresh_state(tmp_path, method):
  config = tiny_test.get_config()
  config.train.method = method
  student_config = train.student_model_config(config)
  stored = _model_file(tmp_path / 'model', student_config, seed=5)
  mesh = parallel.make_mesh(jax.devices()[:1])
  fresh = train_step.create_train_state(config, create_model(**student_config),
                                        jax.random.key(0), mesh)
  state = jax.device_get(warm_start.warm_start(fresh, str(tmp_path / 'model'),
                                               student_config, mesh))
  encoders = [(state.params, state.batch_stats)]
  if method == 'moco':
    encoders.append((state.key_params, state.key_batch_stats))
  else:
    assert state.key_params is None
  for params, batch_stats in encoders:
    for ours, expected in zip(jax.tree.leaves((params, batch_stats)),
                              jax.tree.leaves((stored['params'], stored['batch_stats']))):
      np.testing.assert_array_equal(ours, expected)
  # The rest is the fresh state's.
  fresh = jax.device_get(fresh)
  assert int(state.step) == 0
  np.testing.assert_array_equal(state.negative_queue, fresh.negative_queue)
  for ours, expected in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(fresh.opt_state)):
    np.testing.assert_array_equal(ours, expected)


def test_warm_start_refuses_another_architecture_naming_the_key(tmp_path):
  config = tiny_test.get_config()
  student_config = train.student_model_config(config)
  other = dict(student_config, base_width=2 * student_config['base_width'])
  _model_file(tmp_path / 'wide', other, seed=1)
  mesh = parallel.make_mesh(jax.devices()[:1])
  fresh = train_step.create_train_state(config, create_model(**student_config),
                                        jax.random.key(0), mesh)
  with pytest.raises(ValueError, match=r'config.student.base_width = \d+, .*wide has \d+'):
    warm_start.warm_start(fresh, str(tmp_path / 'wide'), student_config, mesh)


def test_cli_run_from_a_model_file_at_learning_rate_zero_keeps_its_weights(tmp_path):
  images = tiny_run.write_images(str(tmp_path), np.random.default_rng(0), 32)
  config = tiny_test.get_config()
  stored = _model_file(tmp_path / 'model', train.student_model_config(config), seed=3)
  workdir = str(tmp_path / 'run')
  command = [sys.executable, '-m', 'bingo_jax.train', '--config', 'tiny_test',
             '--workdir', workdir, f'--config.data.path={images}',
             '--config.train.method=moco', '--config.train.max_steps=1',
             '--config.train.base_lr=0.0', f'--config.student.init_from={tmp_path / "model"}']
  environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
                     PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  result = subprocess.run(command, cwd=REPO, env=environment, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'Student initialised from' in result.stderr
  checkpointer = checkpointing.TrainCheckpointer(workdir, keep=1, read_only=True)
  arrays = checkpointer.restore_arrays(1)
  checkpointer.close()
  for ours, expected in zip(jax.tree.leaves(arrays['params']), jax.tree.leaves(stored['params'])):
    np.testing.assert_array_equal(ours, expected)
  # The key encoder: m k + (1 - m) q with k = q, equal up to rounding.
  for ours, expected in zip(jax.tree.leaves(arrays['key_params']),
                            jax.tree.leaves(stored['params'])):
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-7)

"""The installed package: ``pip install .`` into a fresh virtual environment, then every
console command's ``--help`` and a tiny training through ``bingo-train``, all run from a
directory outside the repository.

The fresh environment reaches the already-installed dependencies through a ``.pth`` file
(offline and fast: ``pip install --no-deps --no-build-isolation``); the package itself comes
only from the install, which the test checks (``bingo_jax.__file__``).
"""

import os
import shutil
import site
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from bingo_jax.store import fileio
from bingo_jax.testing import cpu_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ('bingo-convert', 'bingo-bag', 'bingo-train', 'bingo-eval', 'bingo-export',
            'bingo-demo')


def _clean_environment() -> dict:
  environment = {key: value for key, value in os.environ.items() if key != 'PYTHONPATH'}
  environment['TF_CPP_MIN_LOG_LEVEL'] = '2'
  return environment


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  root = tmp_path_factory.mktemp('packaging')
  # A copy of what the package is built from, so the build writes nothing into the repository.
  source = root / 'source'
  ignore = shutil.ignore_patterns('__pycache__', '*.pyc')
  shutil.copytree(os.path.join(REPO, 'bingo_jax'), source / 'bingo_jax', ignore=ignore)
  shutil.copytree(os.path.join(REPO, 'configs'), source / 'configs', ignore=ignore)
  for name in os.listdir(REPO):
    if name == 'pyproject.toml' or name == 'README.md' or name.startswith('requirements'):
      shutil.copy(os.path.join(REPO, name), source / name)
  venv = root / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  purelib = subprocess.run(
      [python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
      check=True, capture_output=True, text=True).stdout.strip()
  # The dependencies (and pip, setuptools) of the environment running the tests.
  paths = site.getsitepackages() + [sysconfig.get_paths()['purelib']]
  with open(os.path.join(purelib, '_test_dependencies.pth'), 'w') as f:
    f.write('\n'.join(dict.fromkeys(paths)) + '\n')
  result = subprocess.run([python, '-m', 'pip', 'install', '-q', '--no-deps',
                           '--no-build-isolation', '--no-index', str(source)], cwd=root,
                          env=_clean_environment(), capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return {'root': root, 'venv': venv, 'python': python}


def test_the_package_comes_from_the_install(installed):
  result = subprocess.run([installed['python'], '-c', 'import bingo_jax, bingo_jax.configs; '
                           'print(bingo_jax.__file__); print(len(bingo_jax.configs.names()))'],
                          cwd=installed['root'], env=_clean_environment(), capture_output=True,
                          text=True, check=True)
  location, count = result.stdout.split()
  assert location.startswith(str(installed['venv'])) and int(count) >= 10
  demo_teacher = os.path.join(os.path.dirname(location), 'demo_data',
                              'teacher_moco_r18w16_fmnist.pth.tar')
  assert os.path.isfile(demo_teacher)


def test_every_console_command_answers_help_outside_the_repository(installed):
  processes = {command: subprocess.Popen([str(installed['venv'] / 'bin' / command), '--help'],
                                         cwd=installed['root'], env=_clean_environment(),
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True) for command in COMMANDS}
  for command, process in processes.items():
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, f'{command} --help:\n{output[-3000:]}'
    assert 'usage' in output.lower() or '--' in output, output[-1000:]


def test_tiny_training_through_bingo_train_from_a_temporary_directory(installed, tmp_path):
  from PIL import Image
  from bingo_jax.bags import bag_file
  from bingo_jax.configs import tiny_test
  from bingo_jax.data import sources as data_sources
  from bingo_jax.models import create_model, init_variables
  from bingo_jax.store import model_io
  import jax
  rng = np.random.default_rng(0)
  lines = []
  for i in range(32):
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / f'{i}.png')
    lines.append(f'{i}.png {i % 4}')
  (tmp_path / 'images.txt').write_text('\n'.join(lines) + '\n')
  config = tiny_test.get_config()
  config.data.path = str(tmp_path / 'images.txt')
  source = data_sources.make_source(config.data, 'train')
  neighbours = np.stack([rng.choice(np.delete(np.arange(32), i), 3, replace=False)
                         for i in range(32)])
  bag_file.save_bags(str(tmp_path / 'bags.npz'), bag_file.Bags.from_neighbors(
      neighbours, method='knn', fingerprint=source.fingerprint))
  teacher = dict(arch='resnet18', head='moco', base_width=8, stem='cifar', head_hidden_dim=32,
                 head_output_dim=16)
  model_io.save_model(str(tmp_path / 'teacher'), teacher,
                      init_variables(create_model(**teacher), jax.random.key(7), 32))
  run_dir = tmp_path / 'elsewhere'
  run_dir.mkdir()
  environment = dict(_clean_environment(), XLA_FLAGS=cpu_xla_flags(2),
                     CUDA_VISIBLE_DEVICES='')
  for key in ('JAX_COMPILATION_CACHE_DIR', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'):
    if key in os.environ:  # the suite's compilation cache, shared with the other tests
      environment[key] = os.environ[key]
  result = subprocess.run(
      [str(installed['venv'] / 'bin' / 'bingo-train'), '--config', 'tiny_test',
       '--workdir', 'run', f'--config.teacher.path={tmp_path / "teacher"}',
       f'--config.data.path={tmp_path / "images.txt"}',
       f'--config.bags.path={tmp_path / "bags.npz"}',
       '--config.train.max_steps=2'], cwd=run_dir, env=environment, capture_output=True,
      text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  summary = fileio.read_json(str(run_dir / 'run' / 'train_summary.json'))
  assert (summary['step'], summary['preempted']) == (2, False)
  assert np.isfinite(summary['final_metrics']['loss'])

"""Quiet by default (issue 26): the console output of the flow's commands, on the tests' tiny
run, holds no line from TensorFlow, faiss or orbax; ``--verbosity`` brings them back.

bagging (TensorFlow's data pipeline, faiss's kNN search), training (orbax checkpoints) and
export (orbax restore) run as a user runs them, in subprocesses, without the tests'
``TF_CPP_MIN_LOG_LEVEL``. A line is a library's when absl's log prefix names a file that is not
one of bingo_jax's, or when it carries a mark of the libraries' chatter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from bingo_jax.testing import tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# absl's prefix: I1207 21:25:16.275500 139655326198656 progress.py:234] message
_ABSL_PREFIX = re.compile(r'^[IWEF]\d{4} [\d:.]+\s+\d+ ([^:\s]+):\d+\]')
_LIBRARY_MARKS = re.compile(r'tensorflow|oneDNN|absl::InitializeLog|cpu_feature_guard|swigfaiss|'
                            r'ModuleNotFoundError|orbax|_NonBlockingMetadataStore', re.IGNORECASE)


def _own_files() -> set[str]:
  names = set()
  for folder in ('bingo_jax', 'configs'):
    for _, _, files in os.walk(os.path.join(REPO, folder)):
      names.update(name for name in files if name.endswith('.py'))
  return names


def library_lines(output: str, own_files: set[str]) -> list[str]:
  """The lines of ``output`` that come from a library rather than from bingo_jax."""
  found = []
  for line in output.splitlines():
    prefix = _ABSL_PREFIX.match(line)
    if (prefix and prefix.group(1) not in own_files) or (not prefix and _LIBRARY_MARKS.search(line)):
      found.append(line)
  return found


def test_library_lines_on_known_output():
  output = '\n'.join([
      'I1207 21:25:16.275500 1396 progress.py:234] [step 12/12] loss 4.2221',
      'I1207 21:25:16.275500 1396 checkpoint_manager.py:1500] Saving checkpoint',
      'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR',
      'I0000 00:00:1796678523.140016    7251 port.cc:153] oneDNN custom operations are on.',
      'ModuleNotFoundError("No module named \'faiss.swigfaiss_avx512\'")',
      'bags: exact kNN (faiss), k=3', 'wrote bags.npz'])
  assert library_lines(output, {'progress.py'}) == [
      'I1207 21:25:16.275500 1396 checkpoint_manager.py:1500] Saving checkpoint',
      'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR',
      'I0000 00:00:1796678523.140016    7251 port.cc:153] oneDNN custom operations are on.',
      'ModuleNotFoundError("No module named \'faiss.swigfaiss_avx512\'")']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('quiet')
  inputs = tiny_run.make_inputs(root / 'inputs')
  environment = tiny_run.environment(inputs)
  environment.pop('TF_CPP_MIN_LOG_LEVEL', None)

  def run(*arguments: str) -> str:
    result = subprocess.run([sys.executable, '-m', *arguments], cwd=root, env=environment,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr

  bagging = ['bingo_jax.bagging', '--config', 'tiny_test', f'--config.data.path={inputs["images"]}',
             f'--config.teacher.path={inputs["teacher"]}', '--config.bags.batch_size=8',
             '--config.bags.shard_size=16']
  outputs = {
      'bagging': run(*bagging, '--workdir', str(root / 'bags'),
                     f'--config.bags.path={root / "bags.npz"}'),
      'bagging --verbosity=0': run(*bagging, '--workdir', str(root / 'bags_verbose'),
                                   f'--config.bags.path={root / "bags_verbose.npz"}',
                                   '--verbosity=0'),
      'train': run(*tiny_run.train_command(inputs, str(root / 'run'),
                                           '--config.train.max_steps=2')[2:]),
  }
  outputs['export'] = run('bingo_jax.export', str(root / 'run'), str(root / 'student.pth'),
                          '--format', 'torchvision')
  return outputs


@pytest.mark.parametrize('command', ['bagging', 'train', 'export'])
def test_no_library_line_at_the_default_verbosity(runs, command):
  lines = library_lines(runs[command], _own_files())
  assert not lines, f'{command} printed library lines:\n' + '\n'.join(lines)
  assert runs[command].strip(), f'{command} printed nothing at all'


def test_verbosity_brings_the_libraries_back(runs):
  """The control: the same bagging with ``--verbosity=0`` shows TensorFlow's and faiss's lines,
  so the check above would see them."""
  lines = library_lines(runs['bagging --verbosity=0'], _own_files())
  assert any('oneDNN' in line or 'InitializeLog' in line for line in lines), lines
  assert any('faiss' in line.lower() for line in lines), lines

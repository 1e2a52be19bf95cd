"""Faults outside the training loop (docs/reliability.md, 'Bagging, evaluation, export and
multi-host faults'), each reproduced through the command line: bags for other images, a full
disk in bagging, evaluation and export.

The set-up is the tests' tiny one (bingo_jax/testing/tiny_run.py): 48 random PNG images,
random-neighbour bags, a random ResNet-18 (width 8) teacher.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from bingo_jax import bag_file
from bingo_jax.testing import tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  return tiny_run.make_inputs(tmp_path_factory.mktemp('stage_fault_inputs'))


def _run(inputs: dict, command: list, *, prefix: tuple = (), timeout: float = 900
         ) -> tuple[int, str]:
  result = subprocess.run([*prefix, *command], cwd=REPO, env=tiny_run.environment(inputs),
                          text=True, capture_output=True, timeout=timeout)
  return result.returncode, result.stderr


def _bag_command(inputs: dict, workdir: str, *extra: str) -> list:
  return [sys.executable, '-m', 'bingo_jax.bagging', '--config', 'tiny_test',
          '--workdir', workdir, f'--config.teacher.path={inputs["teacher"]}',
          f'--config.data.path={inputs["images"]}', '--config.bags.batch_size=8',
          '--config.bags.shard_size=16', *extra]


def _last_line(stderr: str) -> str:
  return stderr.strip().splitlines()[-1]


def test_bags_of_other_pixels_under_the_same_names_are_refused(inputs, tmp_path):
  """Folder B holds the file names of folder A with other pixels: A's bags are refused for B,
  naming the bag file and both content fingerprints; B's own bags are accepted."""
  bags_a = str(tmp_path / 'a_bags.npz')
  rc, stderr = _run(inputs, _bag_command(inputs, str(tmp_path / 'bag_a'),
                                         '--config.bags.method=labels',
                                         f'--config.bags.path={bags_a}'))
  assert rc == 0, stderr[-3000:]
  other = tiny_run.write_images(str(tmp_path / 'b'), np.random.default_rng(1))
  with open(other) as f, open(inputs['images']) as g:
    assert f.read() == g.read()  # the same names, in the same order
  b_inputs = dict(inputs, images=other, bags=bags_a)

  rc, stderr = _run(inputs, tiny_run.train_command(b_inputs, str(tmp_path / 'run'),
                                                   '--config.train.max_steps=1'))
  assert rc == 1, stderr[-3000:]
  line = _last_line(stderr)
  recorded = bag_file.load_bags(bags_a).content_fingerprint
  assert bags_a in line and 'content fingerprint' in line and recorded in line, line
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')

  # Control: the same bags declared for B's content are accepted for B.
  from bingo_jax import data_sources  # pylint: disable=import-outside-toplevel
  from bingo_jax.configs import tiny_test  # pylint: disable=import-outside-toplevel
  config = tiny_test.get_config()
  config.data.path = other
  source_b = data_sources.make_source(config.data, 'train')
  assert source_b.content_fingerprint != recorded
  bags = bag_file.load_bags(bags_a)
  bags.metadata['content_fingerprint'] = source_b.content_fingerprint
  bags.check_matches(len(source_b), source_b.fingerprint, 'B',
                     content_fingerprint=source_b.content_fingerprint)

"""Faults outside the training loop (docs/reliability.md, 'Bagging, evaluation, export and
multi-host faults'), each reproduced through the command line: bags for other images, a full
disk in bagging, evaluation and export.

The set-up is the tests' tiny one (bingo_jax/testing/tiny_run.py): 48 random PNG images,
random-neighbour bags, a random ResNet-18 (width 8) teacher.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from bingo_jax.bags import bag_file
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
  assert line.startswith('error: ') and 'Traceback' not in stderr, stderr[-3000:]
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')

  # Control: the same bags declared for B's content are accepted for B.
  from bingo_jax.configs import tiny_test  # pylint: disable=import-outside-toplevel
  from bingo_jax.data import sources as data_sources  # pylint: disable=import-outside-toplevel
  config = tiny_test.get_config()
  config.data.path = other
  source_b = data_sources.make_source(config.data, 'train')
  assert source_b.content_fingerprint != recorded
  bags = bag_file.load_bags(bags_a)
  bags.metadata['content_fingerprint'] = source_b.content_fingerprint
  bags.check_matches(len(source_b), source_b.fingerprint, 'B',
                     content_fingerprint=source_b.content_fingerprint)


def test_exact_bags_do_not_depend_on_the_query_batch(inputs, tmp_path):
  """bingo-bag with query batches of 16384 and of 1, on a list where image 0 appears 12 times
  (exact ties among more copies than a bag holds): the same bag file contents, equal to the
  float64 brute force over the stored features with ties broken by the lower index."""
  from bingo_jax.bags import features as features_lib  # pylint: disable=import-outside-toplevel
  from bingo_jax.bags import knn_backends  # pylint: disable=import-outside-toplevel
  with open(inputs['images']) as f:  # 'images/000.png 0', ...: made absolute for the new list
    lines = [os.path.join(inputs['root'], line) for line in f.read().splitlines()]
  images = str(tmp_path / 'images.txt')
  with open(images, 'w') as f:
    f.write('\n'.join(lines + [lines[0]] * 11) + '\n')
  data = dict(inputs, images=images)
  workdir = str(tmp_path / 'bags')  # the second run reuses the first one's features
  neighbours = {}
  for batch in (16384, 1):
    path = str(tmp_path / f'bags-{batch}.npz')
    rc, stderr = _run(inputs, _bag_command(data, workdir, '--config.bags.method=knn',
                                           f'--config.bags.query_batch_size={batch}',
                                           f'--config.bags.path={path}'))
    assert rc == 0, stderr[-3000:]
    neighbours[batch] = bag_file.load_bags(path).neighbors
  np.testing.assert_array_equal(neighbours[1], neighbours[16384])
  rows = knn_backends.FeatureRows(features_lib.open_feature_shards(f'{workdir}/features'))
  x = rows.block(0, rows.num_rows).astype(np.float64)
  # Exactly rounded sums: identical rows score identically, whatever the summation order.
  similarity = np.array([[math.fsum(a * b) for b in x] for a in x])
  np.fill_diagonal(similarity, -np.inf)
  expected = np.argsort(-similarity, axis=1, kind='stable')[:, :3]
  np.testing.assert_array_equal(neighbours[1], expected)


# ``python -m MODULE ARGS`` with a file size limit: a write past LIMIT bytes fails with EFBIG
# ('File too large'), as on a full disk. SIGXFSZ ignored (Python's default too), so the write
# fails instead of the process being killed.
_UNDER_SIZE_LIMIT = (
    'import resource, runpy, signal, sys\n'
    'limit = int(sys.argv.pop(1))\n'
    'signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n'
    'resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit('
    'resource.RLIMIT_FSIZE)[1]))\n'
    'sys.argv.pop(1)  # -m\n'
    'module = sys.argv[1]\n'
    'del sys.argv[1]\n'
    'runpy.run_module(module, run_name="__main__", alter_sys=True)\n')


def _files(directory) -> list:
  return sorted(os.path.relpath(os.path.join(root, name), directory)
                for root, _, names in os.walk(directory) for name in names)


@pytest.mark.parametrize('case', ['feature shard', 'bag file', 'report picture',
                                  'evaluation features', 'export'])
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing_partial(
    inputs, tmp_path, case):
  """bingo-bag, bingo-eval and bingo-export when a file cannot be written (a file size limit
  stands in for the full disk): exit 1, one line naming the file, no traceback, neither the
  file nor its temporary left."""
  out = tmp_path / 'out'
  labels = ('--config.bags.method=labels', f'--config.bags.path={out}/bags.npz')
  command, limit, failing = {
      'feature shard': (_bag_command(inputs, str(out), '--config.bags.shard_size=48',
                                     f'--config.bags.path={out}/bags.npz'),
                        4096, 'features/'),
      'bag file': (_bag_command(inputs, str(out), *labels), 2000, 'bags.npz'),
      'report picture': (_bag_command(inputs, str(out), *labels), 100_000, 'bag_report.png'),
      'evaluation features': (
          [sys.executable, '-m', 'bingo_jax.evaluate', '--config', 'tiny_test',
           '--checkpoint', inputs['teacher'], '--protocol', 'knn', '--workdir', str(out),
           f'--config.data.path={inputs["images"]}', '--config.eval.batch_size=16',
           # k within the 48-image bank (a larger k is refused before the feature pass).
           '--config.eval.knn_k=5', '--config.eval.knn_weighted_k=5'],
          4096, 'features/'),
      'export': ([sys.executable, '-m', 'bingo_jax.export', inputs['teacher'],
                  str(out / 'teacher.pth.tar')], 10_000, 'teacher.pth.tar'),
  }[case]
  os.makedirs(out)
  rc, stderr = _run(inputs, command[1:],
                    prefix=(sys.executable, '-c', _UNDER_SIZE_LIMIT, str(limit)))
  assert rc == 1, stderr[-3000:]
  line = _last_line(stderr)
  # EFBIG, or numpy's short write without an errno ('3072 requested and 1984 written').
  assert 'Cannot write' in line and ('File too large' in line or 'disk is full' in line), (
      stderr[-3000:])
  assert f'{out}/{failing}' in line, line
  assert 'Traceback' not in stderr, stderr[-3000:]
  left = _files(out)
  assert not [name for name in left if '.tmp-' in name], left
  written = line.split('Cannot write ')[1].split(':')[0]
  assert not os.path.exists(written), written

"""Remote paths: everything that bingo_jax writes and reads works with URLs (etils.epath).

Every path here is a ``fake://`` URL (tests/fake_remote_fs.py): a fake non-local filesystem
whose URLs fail if opened with ``open`` or ``os.path``. Results are compared with the same
operations on local paths.
"""

import os

import numpy as np
import pytest

import fake_remote_fs
from bingo_jax import bag_file, fileio


@pytest.fixture()
def remote(tmp_path):
  fake_remote_fs.install(str(tmp_path / 'bucket_store'))
  return 'fake://bucket'


def test_url_paths_are_not_local_files(remote):
  url = fileio.join(remote, 'run', 'record.json')
  assert url == 'fake://bucket/run/record.json' and fileio.is_url(url)
  fileio.write_json_atomically(url, {'a': [1, 2]})
  assert not os.path.exists(url)  # nothing under ./fake:
  assert fileio.read_json(url) == {'a': [1, 2]}
  assert fileio.isfile(url) and fileio.isdir(fileio.dirname(url))
  assert fileio.listdir(fileio.join(remote, 'run')) == ['record.json']  # no staging left
  fileio.write_text_atomically(url, 'replaced')
  with fileio.open_file(url, 'r') as f:
    assert f.read() == 'replaced'
  assert fileio.native_path(url).endswith(os.path.join('bucket_store', 'bucket', 'run',
                                                       'record.json'))


def test_failed_remote_write_leaves_the_old_object(remote):
  url = fileio.join(remote, 'x.bin')
  fileio.atomic_write(url, lambda f: f.write(b'old'))

  def fail(f):
    f.write(b'half')
    raise RuntimeError('interrupted')
  with pytest.raises(RuntimeError, match='interrupted'):
    fileio.atomic_write(url, fail)
  with fileio.open_file(url, 'rb') as f:
    assert f.read() == b'old'
  assert fileio.listdir(remote) == ['x.bin']


def test_bag_file_round_trip_through_a_url_equals_local(remote, tmp_path):
  rng = np.random.default_rng(0)
  neighbours = np.stack([rng.choice(np.delete(np.arange(20), i), 3, replace=False)
                         for i in range(20)])
  bags = bag_file.Bags.from_neighbors(neighbours, method='knn', fingerprint='f' * 64)
  url = fileio.join(remote, 'bags', 'knn.npz')
  assert bag_file.save_bags(url, bags) == url
  local = bag_file.save_bags(str(tmp_path / 'knn.npz'), bags)
  from_url, from_local = bag_file.load_bags(url), bag_file.load_bags(local)
  np.testing.assert_array_equal(from_url.neighbors, neighbours)
  np.testing.assert_array_equal(from_url.neighbors, from_local.neighbors)
  assert from_url.metadata == from_local.metadata and from_url.path == url
  with pytest.raises(FileNotFoundError, match='fake://bucket/none.npz'):
    bag_file.load_bags(fileio.join(remote, 'none.npz'))

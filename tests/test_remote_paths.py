"""Remote paths: everything that bingo_jax writes and reads works with URLs (etils.epath).

Every path here is a ``fake://`` URL (tests/fake_remote_fs.py): a fake non-local filesystem
whose URLs fail if opened with ``open`` or ``os.path``. Results are compared with the same
operations on local paths.
"""

import io
import os

import jax
import numpy as np
import pytest
import torch

import fake_remote_fs
from bingo_jax import evaluate, train
from bingo_jax.bags import bag_file
from bingo_jax.configs import tiny_test
from bingo_jax.data import sources as data_sources
from bingo_jax.store import checkpointing, fileio
from bingo_jax.testing import tiny_run
from bingo_jax.torch_io import checkpoints as torch_checkpoints


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


# ---------------------------------------------------------------------------------------------
# The acceptance round trip.

NUM_IMAGES = 32


def _images(root) -> str:
  return tiny_run.write_images(str(root), np.random.default_rng(0), NUM_IMAGES)


def _inputs(base: str, images: str) -> dict:
  """The teacher model file and the bag file under ``base`` (a URL or a local directory)."""
  config = tiny_test.get_config()
  config.data.path = images
  bags = fileio.join(base, 'bags.npz')
  tiny_run.write_bags(bags, images, np.random.default_rng(1))
  teacher = fileio.join(base, 'teacher')
  tiny_run.write_teacher(teacher)
  config.teacher.path, config.bags.path = teacher, bags
  config.eval.update(knn_k=3, knn_weighted_k=8, batch_size=16)
  config.data.eval_split = 'train'
  return config


def _round_trip(base: str, images: str) -> dict:
  """Train 2 steps, resume to 4, evaluate (kNN), export (MoCo layout): every path in base."""
  config = _inputs(base, images)
  workdir = fileio.join(base, 'run')
  config.train.max_steps = 2
  first = train.train_and_evaluate(config, workdir)
  config.train.max_steps = 4
  resumed = train.train_and_evaluate(config, workdir)
  results = evaluate.evaluate(config, workdir, 'knn', fileio.join(base, 'eval'))
  exported = fileio.join(base, 'student.pth.tar')
  torch_checkpoints.export_torch_checkpoint(checkpointing.load_any(workdir), exported, 'moco')
  with fileio.open_file(exported, 'rb') as f:
    state = torch.load(io.BytesIO(f.read()), weights_only=True)['state_dict']
  student = checkpointing.load_student(workdir)
  return {'first': first, 'resumed': resumed, 'knn': results['metrics'], 'torch': state,
          'variables': student.variables, 'workdir': workdir}


def test_train_resume_evaluate_export_with_urls_equals_local(remote, tmp_path):
  images = _images(tmp_path)
  remote_run = _round_trip(remote, images)
  local_run = _round_trip(str(tmp_path / 'local'), images)
  assert not os.path.exists('fake:')  # nothing went to a local directory named after the URL
  for run in (remote_run, local_run):
    assert (run['first']['step'], run['resumed']['start_step'], run['resumed']['step']) == (2, 2, 4)
    # Core-hours and elapsed time carry across the resume.
    assert run['resumed']['core_hours'] > run['first']['core_hours']
    # The first run's share is what its last checkpoint stored (saved just before its end).
    this_run = run['resumed']['core_hours_this_run']
    assert this_run < run['resumed']['core_hours'] <= run['first']['core_hours'] + this_run
    assert run['resumed']['elapsed_seconds'] > run['resumed']['wall_seconds']
  assert remote_run['knn'] == local_run['knn']
  flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v)  # noqa: E731
                       for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  remote_vars, local_vars = flat(remote_run['variables']), flat(local_run['variables'])
  assert sorted(remote_vars) == sorted(local_vars)
  for key, value in local_vars.items():
    np.testing.assert_array_equal(remote_vars[key], value, err_msg=key)
  assert sorted(remote_run['torch']) == sorted(local_run['torch'])
  for key, value in local_run['torch'].items():
    np.testing.assert_array_equal(remote_run['torch'][key].numpy(), value.numpy(), err_msg=key)
  stored = fileio.listdir(fileio.join(remote, 'run'))
  assert {'checkpoints', 'config.json', 'student_model.json', 'train_summary.json'} <= set(stored)


def test_bagging_with_url_workdir_and_feature_shards_equals_local(remote, tmp_path):
  from bingo_jax import bagging
  from bingo_jax.bags import features
  from bingo_jax.configs import common
  config = common.base_config()
  config.data.image_size = 16
  config.bags.update(method='random-teacher', k=3, batch_size=8, shard_size=16)
  config.bags.random_teacher.update({'arch': 'resnet18', 'base_width': 8, 'stem': 'cifar'})
  images = np.random.default_rng(5).integers(0, 256, (24, 20, 20, 3), dtype=np.uint8)
  source = data_sources.ArraySource(images, np.arange(24) % 3)
  workdir = fileio.join(remote, 'bagging')
  remote_bags, remote_path = bagging.compute_bags(config, workdir, source=source, progress=False)
  local_bags, _ = bagging.compute_bags(config, str(tmp_path / 'bagging'), source=source,
                                       progress=False)
  assert remote_path == fileio.join(workdir, 'bags.npz')
  np.testing.assert_array_equal(bag_file.load_bags(remote_path).neighbors, local_bags.neighbors)
  np.testing.assert_array_equal(remote_bags.neighbors, local_bags.neighbors)
  shards = features.open_feature_shards(fileio.join(workdir, 'features-random'))
  assert shards.num_shards == 2
  np.testing.assert_array_equal(
      shards.load(), features.open_feature_shards(str(tmp_path / 'bagging' / 'features-random')
                                                  ).load())
  assert {'bag_report.json', 'bag_report.png', 'bags.npz'} <= set(fileio.listdir(workdir))
  assert not os.path.exists('fake:')

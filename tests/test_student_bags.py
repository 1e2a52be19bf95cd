"""Student relation (``config.bags.source = 'student'``): bags recomputed from the student.

A tiny relation-only run (32 images, 2 steps per epoch, a refresh every epoch) writes the bags
of epochs 0 and 1. They must equal a numpy brute-force kNN on the student's own features,
computed here from the same parameters (the initial state, and the checkpoint of step 2) with
a direct eval-mode ``apply`` and float64 cosine similarities. A run stopped at the refresh
step and again between refreshes, then resumed, must end bit for bit where the uninterrupted
run ends.
"""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from bingo_jax import input_pipeline, train
from bingo_jax.bags import bag_file
from bingo_jax.bags import student_bags
from bingo_jax.configs import fmnist_ablation, tiny_test
from bingo_jax.data import images as images_lib, parallel
from bingo_jax.data import sources as data_sources
from bingo_jax.method import config_checks
from bingo_jax.method import train_step as train_step_lib
from bingo_jax.models import create_model
from bingo_jax.store import checkpointing

NUM_IMAGES = 32


def _config(tmp_path, augment_on: str = 'device'):
  images = tmp_path / 'images'
  if not images.exists():
    rng = np.random.default_rng(0)
    os.makedirs(images)
    lines = []
    for i in range(NUM_IMAGES):
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
          images / f'{i:03d}.png')
      lines.append(f'images/{i:03d}.png {i % 4}')
    (tmp_path / 'images.txt').write_text('\n'.join(lines) + '\n')
  config = tiny_test.get_config()
  config.data.path = str(tmp_path / 'images.txt')
  config.data.augment_on = augment_on
  config.train.update(method='moco', moco_loss='bingo', monitor_every_epochs=0)
  config.bags.update(source='student', refresh_every_epochs=1, method='knn', k=3,
                     batch_size=16)
  return config


def _final_arrays(workdir: str, step: int) -> dict:
  checkpointer = checkpointing.TrainCheckpointer(workdir, keep=2, read_only=True)
  arrays = checkpointer.restore_arrays(step)
  checkpointer.close()
  leaves, _ = jax.tree_util.tree_flatten_with_path(arrays)
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp('student_bags')
  config = _config(tmp_path)
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(config, workdir)
  assert summary['step'] == 4  # 2 epochs of 2 steps: refreshes before steps 0 and 2
  return tmp_path, config, workdir


def _brute_force_bags(config, variables, k: int) -> np.ndarray:
  """k nearest other images by cosine of the student's eval-mode pooled features."""
  student = create_model(**train.student_model_config(config))
  source = data_sources.make_source(config.data, 'train')
  features = np.zeros((NUM_IMAGES, 64))
  for batch in input_pipeline.make_eval_dataset(source, 32, 16, process_index=0,
                                                process_count=1):
    pooled, _ = student.apply(variables, images_lib.normalize(batch['image']), train=False)
    features[batch['index'][batch['mask']]] = np.asarray(pooled, np.float64)[batch['mask']]
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  similarity = features @ features.T
  np.fill_diagonal(similarity, -np.inf)  # never the anchor itself
  return np.argsort(-similarity, axis=1, kind='stable')[:, :k]


def _check_bags_of_run(config, workdir: str) -> None:
  """The run's bags of epochs 0 and 1 against the brute force on its states at steps 0, 2."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  student = create_model(**train.student_model_config(config))
  initial = jax.device_get(train_step_lib.create_train_state(
      config, student, jax.random.key(config.train.seed), mesh, 2))
  checkpointer = checkpointing.TrainCheckpointer(workdir, keep=2, read_only=True)
  step_2 = checkpointer.restore_arrays(2)
  checkpointer.close()
  tables = []
  for epoch, variables in ((0, {'params': initial.params, 'batch_stats': initial.batch_stats}),
                           (1, {'params': step_2['params'],
                                'batch_stats': step_2['batch_stats']})):
    bags = bag_file.load_bags(student_bags.bag_path(workdir, epoch))
    expected = _brute_force_bags(config, variables, config.bags.k)
    np.testing.assert_array_equal(bags.neighbors, expected, err_msg=f'epoch {epoch}')
    assert (bags.metadata['method'], bags.metadata['epoch'], bags.metadata['step']) == (
        student_bags.METHOD, epoch, 2 * epoch)
    tables.append(bags.neighbors)
  # The student moved between the refreshes, and so did its neighbours.
  assert not np.array_equal(*tables)


def test_refreshed_bags_are_the_brute_force_knn_of_the_students_features(uninterrupted):
  """Views drawn on the devices from the data held there: the bag tables are swapped."""
  _, config, workdir = uninterrupted
  _check_bags_of_run(config, workdir)


def test_host_views_restart_their_iterator_with_the_refreshed_bags(tmp_path):
  config = _config(tmp_path, augment_on='host')
  config.train.max_steps = 3  # one step past the refresh of epoch 1
  workdir = str(tmp_path / 'host')
  assert train.train_and_evaluate(config, workdir)['step'] == 3
  _check_bags_of_run(config, workdir)


def test_resume_at_and_after_a_refresh_is_bit_identical(uninterrupted):
  tmp_path, config, workdir = uninterrupted
  resumed = str(tmp_path / 'resumed')
  # Stopped at step 2 (a refresh step: recomputed from the restored student), then at step 3
  # (between refreshes: the table of epoch 1 read back), then to the end.
  for max_steps in (2, 3, None):
    config.train.max_steps = max_steps
    train.train_and_evaluate(config, resumed)
  expected, ours = _final_arrays(workdir, 4), _final_arrays(resumed, 4)
  assert set(ours) == set(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  # The refreshed table is the one sampled from: kept bags of epoch 0 (a refresh every 2
  # epochs) give other parameters at step 3, after one step on the other positives.
  config.train.max_steps, config.bags.refresh_every_epochs = 3, 2
  train.train_and_evaluate(config, str(tmp_path / 'not_refreshed'))
  kept, refreshed = _final_arrays(str(tmp_path / 'not_refreshed'), 3), _final_arrays(resumed, 3)
  assert not all(np.array_equal(kept[name], refreshed[name]) for name in kept
                 if name.startswith("['params']"))
  config.train.max_steps, config.bags.refresh_every_epochs = None, 1


def test_resume_between_refreshes_without_the_table_is_refused(tmp_path):
  config = _config(tmp_path)
  source = data_sources.make_source(config.data, 'train')
  refresher = student_bags.StudentBags(config, str(tmp_path), None, source, None,
                                       steps_per_epoch=2)
  assert [refresher.refreshes_at(step) for step in range(5)] == [True, False, True, False, True]
  with pytest.raises(FileNotFoundError, match='epoch_00001.npz is missing'):
    refresher.bags_at(3, None)


def test_student_bag_settings_are_checked_by_name():
  config = fmnist_ablation.get_config('student_relation')
  assert (config.train.method, config.bags.source, config.bags.refresh_every_epochs) == (
      'moco', 'student', 1)
  assert fmnist_ablation.get_config('student_relation_teacher').train.method == 'bingo'
  config_checks.check_config(config, 1)
  for key, value, message in (
      ('refresh_every_epochs', 0, 'needs config.bags.refresh_every_epochs >= 1'),
      ('method', 'kmeans', "config.bags.method .*'kmeans'"),
      ('source', 'teacher', "config.bags.source = 'teacher'")):
    bad = fmnist_ablation.get_config('student_relation')
    bad.bags[key] = value
    with pytest.raises(ValueError, match=message):
      config_checks.check_config(bad, 1)
  bad = fmnist_ablation.get_config('moco')
  bad.bags.source, bad.bags.refresh_every_epochs = 'student', 1
  with pytest.raises(ValueError, match="moco_loss = 'anchor_only' reads no bag positives"):
    config_checks.check_config(bad, 1)
  bad = fmnist_ablation.get_config('knn')
  bad.bags.refresh_every_epochs = 2
  with pytest.raises(ValueError, match="set config.bags.source = 'student'"):
    config_checks.check_config(bad, 1)

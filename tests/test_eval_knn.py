"""kNN evaluation against a numpy brute force, on one device and on 8 devices."""

import jax
import numpy as np
import pytest

from bingo_jax.data import parallel
from bingo_jax.eval import knn


def brute_force_knn(train, train_labels, queries, num_classes, k, weighted_k, temperature):
  """Reference: float64 similarities, stable sort (ties: lower training index first)."""
  similarities = queries.astype(np.float64) @ train.astype(np.float64).T
  order = np.argsort(-similarities, axis=1, kind='stable')
  majority, weighted = [], []
  for q in range(len(queries)):
    labels = train_labels[order[q, :k]]
    counts = np.bincount(labels, minlength=num_classes)
    tied = np.flatnonzero(counts == counts.max())
    # the tied class that appears first in the neighbour list
    majority.append(next(label for label in labels if label in tied))
    scores = np.zeros(num_classes)
    for index in order[q, :weighted_k]:
      scores[train_labels[index]] += np.exp(similarities[q, index] / temperature)
    weighted.append(np.argsort(-scores, kind='stable')[:5])
  return np.array(majority), np.array(weighted), order


def _unit_rows(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope='module')
def tiny_data():
  rng = np.random.default_rng(0)
  num_classes, dim = 7, 12
  centres = rng.normal(size=(num_classes, dim))
  train_labels = rng.integers(0, num_classes, 403)
  eval_labels = rng.integers(0, num_classes, 91)
  train = _unit_rows(centres[train_labels] + 1.2 * rng.normal(size=(403, dim)))
  queries = _unit_rows(centres[eval_labels] + 1.2 * rng.normal(size=(91, dim)))
  return train.astype(np.float32), train_labels, queries.astype(np.float32), eval_labels


def test_knn_matches_numpy_brute_force(tiny_data):
  train, train_labels, queries, _ = tiny_data
  one_device = parallel.make_mesh(jax.devices()[:1])
  result = knn.knn_classify(train, train_labels, queries, num_classes=7, k=10,
                            weighted_k=200, temperature=0.07, mesh=one_device,
                            query_block_size=32, progress=False)
  majority, weighted, order = brute_force_knn(train, train_labels, queries, 7, 10, 200, 0.07)
  np.testing.assert_array_equal(result.neighbours[:, :10], order[:, :10])
  np.testing.assert_array_equal(result.majority, majority)
  np.testing.assert_array_equal(result.weighted_top5, weighted)


def test_knn_eight_devices_equal_one_device(tiny_data):
  train, train_labels, queries, _ = tiny_data
  assert jax.device_count() == 8
  kwargs = dict(num_classes=7, k=10, weighted_k=200, temperature=0.07, query_block_size=32,
                progress=False)
  one = knn.knn_classify(train, train_labels, queries,
                         mesh=parallel.make_mesh(jax.devices()[:1]), **kwargs)
  # 403 rows do not divide over 8 devices: the padded rows must never be picked.
  eight = knn.knn_classify(train, train_labels, queries, mesh=parallel.make_mesh(), **kwargs)
  np.testing.assert_array_equal(eight.neighbours, one.neighbours)
  np.testing.assert_array_equal(eight.majority, one.majority)
  np.testing.assert_array_equal(eight.weighted_top5, one.weighted_top5)


def test_ties_break_by_training_index_and_nearest_class():
  # Integer features: dot products are exact, so similarity ties are real ties.
  train = np.array([[1, 0], [1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [1, 0], [0, 1]],
                   np.float32)
  train_labels = np.array([2, 1, 1, 2, 0, 0, 3, 3])
  queries = np.array([[1, 0], [0, 1], [2, 1]], np.float32)
  majority, weighted, order = brute_force_knn(train, train_labels, queries, 4, 4, 8, 1.0)
  # query 0: neighbours 0, 1, 2, 3 (labels 2, 1, 1, 2): classes 1 and 2 tie with two votes;
  # class 2 owns the nearest neighbour (index 0).
  assert majority[0] == 2
  result = knn.knn_classify(train, train_labels, queries, num_classes=4, k=4, weighted_k=8,
                            temperature=1.0, normalize=False, mesh=parallel.make_mesh(),
                            query_block_size=2, progress=False)
  np.testing.assert_array_equal(result.neighbours, order)
  np.testing.assert_array_equal(result.majority, majority)
  np.testing.assert_array_equal(result.weighted_top5, weighted[:, :4])


def test_knn_evaluate_reports_accuracies(tiny_data):
  train, train_labels, queries, eval_labels = tiny_data
  metrics = knn.knn_evaluate(train, train_labels, queries, eval_labels, num_classes=7,
                             k=10, weighted_k=200, mesh=parallel.make_mesh(),
                             query_block_size=64, progress=False)
  majority, weighted, _ = brute_force_knn(train, train_labels, queries, 7, 10, 200, 0.07)
  assert metrics['knn10_top1'] == pytest.approx(np.mean(majority == eval_labels) * 100)
  assert metrics['weighted_knn200_top1'] == pytest.approx(
      np.mean(weighted[:, 0] == eval_labels) * 100)
  assert metrics['weighted_knn200_top5'] == pytest.approx(
      np.mean((weighted == eval_labels[:, None]).any(1)) * 100)


def test_too_few_training_examples_is_a_clear_error():
  with pytest.raises(ValueError, match='only 5 examples'):
    knn.knn_classify(np.ones((5, 3)), np.zeros(5, int), np.ones((2, 3)), num_classes=2,
                     k=10, weighted_k=20, progress=False)


def test_cli_driver_writes_json_and_table_for_pixel_knn(tmp_path, capsys):
  """End to end through ``evaluate.evaluate``: an image folder, the ``pixels`` baseline."""
  from PIL import Image

  from bingo_jax import evaluate
  from bingo_jax.configs import common
  rng = np.random.default_rng(0)
  for split, count in (('train', 12), ('val', 6)):
    for label, (low, high) in enumerate(((0, 60), (190, 256))):
      (tmp_path / 'data' / split / f'class{label}').mkdir(parents=True)
      for i in range(count):
        pixels = rng.integers(low, high, (10, 10, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / 'data' / split / f'class{label}' / f'{i}.png')
  config = common.base_config()
  config.data.source = 'folder'
  config.data.path = str(tmp_path / 'data' / '{split}')
  config.data.train_split, config.data.eval_split = 'train', 'val'
  config.data.image_size = 8
  config.eval.batch_size = 8
  config.eval.knn_k, config.eval.knn_weighted_k = 3, 10
  results = evaluate.evaluate(config, 'pixels', 'knn', str(tmp_path / 'out'),
                              mesh=parallel.make_mesh())
  assert results['metrics']['knn3_top1'] == 100.0
  assert results['data']['num_train'] == 24 and results['data']['num_eval'] == 12
  import json
  with open(tmp_path / 'out' / 'eval_knn.json') as f:
    assert json.load(f)['metrics']['weighted_knn10_top1'] == 100.0
  assert 'knn3_top1' in capsys.readouterr().out


def test_feature_cache_is_reused_and_stale_files_are_recomputed(tmp_path, monkeypatch):
  """Second call reads WORKDIR/features instead of running the network; a cache file with
  the wrong number of rows is ignored."""
  from bingo_jax import evaluate
  from bingo_jax.bags import features as features_lib
  from bingo_jax.configs import common
  from bingo_jax.data import sources as data_sources
  config = common.base_config()
  config.data.image_size = 8
  config.eval.batch_size = 8
  config.student.update(arch='resnet18', base_width=4, stem='cifar', bn_group_size=None)
  network = evaluate.load_network('random', config)
  images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
  source = data_sources.ArraySource(images, np.arange(10) % 2)
  mesh = parallel.make_mesh(jax.devices()[:1])
  kwargs = dict(split='train', config=config, workdir=str(tmp_path), mesh=mesh)
  computed = evaluate.cached_features(network, source, **kwargs)
  # Reference: the network applied directly to the same centre-cropped batch.
  direct = features_lib.extract_features(network, source, image_size=8, global_batch_size=8,
                                         mesh=mesh, normalize_features=False, progress=False)
  np.testing.assert_allclose(computed, direct, rtol=1e-6, atol=1e-6)
  (cache_file,) = (tmp_path / 'features').iterdir()

  def must_not_run(*args, **kwargs):
    raise AssertionError('the feature pass ran although a valid cache exists')
  monkeypatch.setattr(features_lib, 'extract_features', must_not_run)
  np.testing.assert_array_equal(evaluate.cached_features(network, source, **kwargs), computed)

  np.save(cache_file, computed[:3])  # stale: 3 rows for 10 images
  monkeypatch.undo()
  recomputed = evaluate.cached_features(network, source, **kwargs)
  np.testing.assert_allclose(recomputed, direct, rtol=1e-6, atol=1e-6)
  assert np.load(cache_file).shape[0] == 10

"""Bag methods against their definitions: numpy brute-force kNN, k-means, labels, purity."""

import json
import os

import numpy as np
import pytest

from bingo_jax import bagging
from bingo_jax.bags import bag_file
from bingo_jax.bags import bag_report
from bingo_jax.bags import features as features_lib
from bingo_jax.bags import knn_backends
from bingo_jax.data import parallel
from bingo_jax.data import sources as data_sources


def _random_features(n, d, seed=0):
  x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force_knn(x, k):
  """numpy float64 reference: top-k inner products over every other row."""
  similarity = x.astype(np.float64) @ x.astype(np.float64).T
  np.fill_diagonal(similarity, -np.inf)
  return np.argsort(-similarity, axis=1, kind='stable')[:, :k]


def test_faiss_knn_equals_numpy_brute_force():
  x = _random_features(500, 24)
  expected = _brute_force_knn(x, 5)
  neighbors, scores = knn_backends.exact_knn_faiss(x, 5, progress=False)
  np.testing.assert_array_equal(neighbors, expected)
  np.testing.assert_allclose(scores, np.take_along_axis(x @ x.T, expected, 1), atol=1e-5)
  # Database in several blocks and queries in several batches: same answer.
  blocked, _ = knn_backends.exact_knn_faiss(x, 5, database_block_bytes=24 * 4 * 70,
                                       query_batch_size=64, progress=False)
  np.testing.assert_array_equal(blocked, expected)


def test_faiss_knn_reads_float16_shards(tmp_path):
  x = _random_features(300, 16, seed=1)
  directory = tmp_path / 'features'
  directory.mkdir()
  for shard, start in enumerate(range(0, 300, 128)):
    np.save(features_lib.shard_path(str(directory), shard), x[start:start + 128].astype(np.float16))
  shards = features_lib.FeatureShards(str(directory), 300, 16, 128, {})
  x16 = x.astype(np.float16).astype(np.float32)
  neighbors, _ = knn_backends.exact_knn_faiss(shards, 5, database_block_bytes=16 * 4 * 100,
                                         progress=False)
  np.testing.assert_array_equal(neighbors, _brute_force_knn(x16, 5))


def test_jax_knn_equals_faiss_and_brute_force():
  x = _random_features(403, 24, seed=2)  # not divisible by 8 devices: padded rows
  expected = _brute_force_knn(x, 5)
  faiss_neighbors, _ = knn_backends.exact_knn_faiss(x, 5, progress=False)
  jax_neighbors, jax_scores = knn_backends.exact_knn_jax(
      x, 5, mesh=parallel.make_mesh(), query_batch_size=128, database_chunk_rows=16,
      progress=False)
  np.testing.assert_array_equal(jax_neighbors, faiss_neighbors)
  np.testing.assert_array_equal(jax_neighbors, expected)
  np.testing.assert_allclose(jax_scores, np.take_along_axis(x @ x.T, expected, 1), atol=1e-5)


def test_unsorted_query_indices_get_their_own_neighbours():
  """Queries in any order (here first..last spanning exactly len - 1, which once passed for a
  consecutive block) get the neighbours of the rows they name."""
  x = _random_features(200, 16, seed=4)
  expected = _brute_force_knn(x, 5)
  queries = np.array([0, 2, 1, 3, 7, 5, 6, 4, 8])
  faiss_neighbors, _ = knn_backends.exact_knn_faiss(x, 5, query_indices=queries, progress=False)
  np.testing.assert_array_equal(faiss_neighbors, expected[queries])
  jax_neighbors, _ = knn_backends.exact_knn_jax(x, 5, query_indices=queries, query_batch_size=16,
                                           database_chunk_rows=16, progress=False)
  np.testing.assert_array_equal(jax_neighbors, expected[queries])


@pytest.mark.parametrize('backend', ['faiss', 'jax', 'approx'])
def test_anchor_never_in_own_bag_with_duplicates(backend):
  x = _random_features(120, 8, seed=3)
  x[10:20] = x[10]   # ten identical images: more ties than k + 1
  x[30] = x[31]      # a pair
  if backend == 'faiss':
    neighbors, _ = knn_backends.exact_knn_faiss(x, 5, progress=False)
  elif backend == 'jax':
    neighbors, _ = knn_backends.exact_knn_jax(x, 5, query_batch_size=64, database_chunk_rows=8,
                                         progress=False)
  else:
    neighbors, recall = knn_backends.approx_knn_faiss(x, 5, index_factory='IVF4,Flat',
                                                 search_parameters='nprobe=4', progress=False,
                                                 recall_sample=50)
    assert recall == 1.0  # every list probed: exact
  assert not (neighbors == np.arange(120)[:, None]).any()
  for anchor in range(10, 20):  # the bag is 5 of the 9 other copies
    assert set(neighbors[anchor]) <= set(range(10, 20)) - {anchor}
    assert len(set(neighbors[anchor])) == 5
  assert neighbors[30, 0] == 31 and neighbors[31, 0] == 30
  bag_file.Bags.from_neighbors(neighbors, method='knn', fingerprint='f')  # validates too


def test_kmeans_bags_are_nearest_centroid_clusters():
  rng = np.random.default_rng(4)
  centres = rng.standard_normal((4, 6)) * 10
  labels = np.repeat(np.arange(4), 50)
  x = (centres[labels] + rng.standard_normal((200, 6))).astype(np.float32)
  groups = knn_backends.kmeans_groups(x, 4, iterations=10, verbose=False)
  # Well-separated blobs: the clustering equals the blob partition (up to renaming).
  for blob in range(4):
    assert len(set(groups[labels == blob])) == 1
  assert len(set(groups)) == 4
  # Definition: each image is assigned to the nearest centroid of its cluster means.
  means = np.stack([x[groups == c].mean(axis=0) for c in range(4)])
  nearest = np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(nearest, groups)
  bags = bag_file.Bags.from_groups(groups, method='kmeans', fingerprint='f', num_clusters=4)
  np.testing.assert_array_equal(bags.members(7), np.setdiff1d(np.nonzero(groups == groups[7])[0],
                                                                [7]))


def test_label_bags_and_purity_follow_definitions():
  labels = np.array([0, 1, 0, 2, 1, 0, 0, 2])
  bags = bag_file.Bags.from_groups(labels, method='labels', fingerprint='f')
  for anchor in range(8):
    np.testing.assert_array_equal(
        bags.members(anchor), [j for j in range(8) if labels[j] == labels[anchor] and j != anchor])
  assert bag_report.purity_summary(bags, labels)['purity'] == 1.0
  # kNN purity: anchor 0's bag {1, 2} has one same-label member -> 0.5, etc.
  neighbors = np.array([[1, 2], [4, 0], [0, 5], [7, 1], [0, 3], [6, 2], [5, 3], [3, 6]])
  knn = bag_file.Bags.from_neighbors(neighbors, method='knn', fingerprint='f')
  expected = np.array([0.5, 0.5, 1.0, 0.5, 0.0, 1.0, 0.5, 0.5])
  np.testing.assert_allclose(bag_report.anchor_purity(knn, labels), expected)
  summary = bag_report.purity_summary(knn, labels)
  assert summary['purity'] == pytest.approx(expected.mean())
  assert summary['purity_per_class']['1'] == pytest.approx(0.25)
  assert summary['chance_purity'] == pytest.approx((4 / 8) ** 2 + 2 * (2 / 8) ** 2)
  # Group purity without listing members: groups {0, 1, 2}, {3, 4, 5, 6, 7} by hand.
  groups = bag_file.Bags.from_groups(np.array([0, 0, 0, 1, 1, 1, 1, 1]), method='kmeans',
                                     fingerprint='f')
  np.testing.assert_allclose(bag_report.anchor_purity(groups, labels),
                             [1 / 2, 0, 1 / 2, 1 / 4, 0, 1 / 4, 1 / 4, 1 / 4])


@pytest.mark.parametrize('method', ['random-teacher', 'labels'])
def test_compute_bags_writes_bag_file_and_report(tmp_path, method):
  from bingo_jax.configs import common
  config = common.base_config()
  config.data.image_size = 16
  config.bags.method = method
  config.bags.k = 3
  config.bags.batch_size = 8
  config.bags.shard_size = 16
  config.bags.random_teacher.update({'arch': 'resnet18', 'base_width': 8, 'stem': 'cifar'})
  images = np.random.default_rng(5).integers(0, 256, (24, 20, 20, 3), dtype=np.uint8)
  source = data_sources.ArraySource(images, np.arange(24) % 3)
  bags, path = bagging.compute_bags(config, str(tmp_path), source=source, progress=False)
  loaded = bag_file.load_bags(path)
  loaded.check_matches(len(source), source.fingerprint, 'the test images')
  with pytest.raises(ValueError, match='does not belong to other images'):
    loaded.check_matches(len(source), 'another-fingerprint', 'other images')
  assert loaded.metadata['method'] == method
  if method == 'labels':
    assert loaded.kind == 'groups' and set(loaded.members(4)) == {1, 7, 10, 13, 16, 19, 22}
  else:
    assert loaded.kind == 'fixed' and loaded.neighbors.shape == (24, 3)
    assert loaded.metadata['teacher']['random_init']['arch'] == 'resnet18'
    assert (tmp_path / 'features-random' / 'shard-00001.npy').exists()
  report = json.loads((tmp_path / 'bag_report.json').read_text())
  assert report['purity'] == pytest.approx(
      bag_report.anchor_purity(loaded, source.labels).mean())
  assert (tmp_path / 'bag_report.png').stat().st_size > 1000
  if method == 'random-teacher':
    # A rerun finds the finished features and the matching bag file: nothing is recomputed.
    mtime = os.stat(path).st_mtime_ns
    again, _ = bagging.compute_bags(config, str(tmp_path), source=source, progress=False)
    assert os.stat(path).st_mtime_ns == mtime
    np.testing.assert_array_equal(again.neighbors, loaded.neighbors)
    # k-means on the same (finished, so not recomputed) random-network features.
    config.bags.method, config.bags.num_clusters = 'kmeans', 3
    config.bags.path = str(tmp_path / 'kmeans.npz')
    kmeans, _ = bagging.compute_bags(config, str(tmp_path), source=source, progress=False)
    assert kmeans.kind == 'groups' and kmeans.metadata['num_clusters'] == 3
    assert sorted(np.unique(kmeans.group_of)) == [0, 1, 2]


def test_purity_of_bags_that_are_all_empty_is_reported_as_none():
  """Every image alone in its group (k-means with C = N): no bag has members to judge."""
  singletons = bag_file.Bags.from_groups(np.arange(4), method='kmeans', fingerprint='f')
  summary = bag_report.purity_summary(singletons, np.array([0, 1, 0, 1]))
  assert summary['purity'] is None and summary['anchors_with_empty_bag'] == 4
  assert '): - (chance 0.5000)' in bag_report.format_purity(summary)


def _lattice_features(n, d, seed):
  """Rows of {-1, 0, 1} / 4: every inner product is exact in float32, so distinct rows tie
  exactly and often (the engineered ties), plus two exact duplicates groups."""
  x = np.random.default_rng(seed).integers(-1, 2, size=(n, d)).astype(np.float32) / 4
  x[20:40] = x[20]   # 20 copies: more ties than the first search's candidates
  x[50] = x[51]
  return x


@pytest.mark.parametrize('backend', ['faiss', 'jax'])
@pytest.mark.parametrize('make_features', [_lattice_features, _random_features])
def test_exact_knn_is_float64_brute_force_whatever_the_batches(backend, make_features):
  """Exact bags equal float64 brute force with ties broken by the lower index, for a query
  batch of 1, 7 and all: neither the batch shape nor the database blocks change a bag."""
  x = make_features(300, 12, seed=5)
  expected = _brute_force_knn(x, 6)
  for batch in (1, 7, 16384):
    if backend == 'faiss':
      neighbors, scores = knn_backends.exact_knn_faiss(
          x, 6, query_batch_size=batch, database_block_bytes=12 * 4 * (97 if batch == 7 else 300),
          progress=False)
    else:
      neighbors, scores = knn_backends.exact_knn_jax(
          x, 6, query_batch_size=batch, database_chunk_rows=16 if batch == 7 else 300,
          progress=False)
    np.testing.assert_array_equal(neighbors, expected, err_msg=f'query batch {batch}')
    reference = np.take_along_axis(x.astype(np.float64) @ x.astype(np.float64).T, expected, 1)
    np.testing.assert_allclose(scores, reference, rtol=0, atol=1e-6)

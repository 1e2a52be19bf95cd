"""Analysis protocol: bag distance and intra-class distance against numpy loops; t-SNE plot."""

import numpy as np
import pytest

from bingo_jax.bags.bag_file import Bags
from bingo_jax.eval import analysis


@pytest.fixture(scope='module')
def features():
  return np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)


def _numpy_bag_distance(features, bags):
  per_anchor = []
  for anchor in range(bags.num_images):
    members = bags.members(anchor)
    if len(members):
      per_anchor.append(np.mean([np.sum((features[anchor].astype(np.float64) - features[m]) ** 2)
                                 for m in members]))
  return np.mean(per_anchor)


def test_bag_distance_fixed_bags_equals_numpy(features):
  rng = np.random.default_rng(1)
  neighbors = np.stack([rng.choice(np.delete(np.arange(40), i), 5, replace=False)
                        for i in range(40)])
  bags = Bags.from_neighbors(neighbors, method='knn', fingerprint='test')
  result = analysis.bag_distance(features, bags, chunk_size=7)
  assert result['bag_distance'] == pytest.approx(_numpy_bag_distance(features, bags), rel=1e-9)
  assert result['num_anchors'] == 40


def test_bag_distance_group_bags_equals_numpy(features):
  group_of = np.random.default_rng(2).permutation(np.arange(40) % 8)
  group_of[group_of == 7] = 6
  group_of[7] = 20  # a singleton group: its anchor has an empty bag and is left out
  bags = Bags.from_groups(group_of, method='kmeans', fingerprint='test')
  result = analysis.bag_distance(features, bags)
  assert result['bag_distance'] == pytest.approx(_numpy_bag_distance(features, bags), rel=1e-9)
  assert result['num_anchors'] == 39


def test_bag_distance_rejects_features_of_other_data(features):
  bags = Bags.from_neighbors((np.arange(10)[:, None] + [[1, 2]]) % 10, method='knn',
                             fingerprint='x')
  with pytest.raises(ValueError, match='10 images but 40 feature rows'):
    analysis.bag_distance(features, bags)


def test_intra_class_distance_equals_pairwise_loop(features):
  labels = np.random.default_rng(3).integers(0, 4, 40)
  labels[0] = 9  # a class with one image has no pair
  pair_distances, per_class = [], {}
  for i in range(40):
    for j in range(i + 1, 40):
      if labels[i] == labels[j]:
        d = np.sum((features[i].astype(np.float64) - features[j]) ** 2)
        pair_distances.append(d)
        per_class.setdefault(labels[i], []).append(d)
  result = analysis.intra_class_distance(features, labels)
  assert result['intra_class_distance'] == pytest.approx(np.mean(pair_distances), rel=1e-9)
  assert result['intra_class_distance_class_mean'] == pytest.approx(
      np.mean([np.mean(v) for v in per_class.values()]), rel=1e-9)
  assert result['num_pairs'] == len(pair_distances)


def _trustworthiness(points: np.ndarray, embedding: np.ndarray, k: int) -> float:
  """Venna & Kaski's trustworthiness, brute force: penalises map neighbours that are far in
  the input space, by their input-space rank beyond ``k``."""
  n = len(points)
  def ranks(x):
    squared = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(squared, np.inf)
    order = np.argsort(squared, axis=1, kind='stable')
    rank = np.empty_like(order)
    rank[np.arange(n)[:, None], order] = np.arange(1, n + 1)[None]
    return rank
  input_rank, map_rank = ranks(points.astype(np.float64)), ranks(embedding.astype(np.float64))
  penalty = np.where(map_rank <= k, np.maximum(input_rank - k, 0), 0).sum()
  return 1 - 2 / (n * k * (2 * n - 3 * k - 1)) * penalty


def test_tsne_map_is_trustworthy_and_beats_a_random_projection():
  rng = np.random.default_rng(7)
  labels = np.repeat(np.arange(5), 40)
  centres = rng.normal(scale=3.0, size=(5, 32))
  points = centres[labels] + rng.normal(size=(200, 32))
  embedding = analysis.tsne(points, perplexity=20, seed=1)
  assert embedding.shape == (200, 2) and embedding.dtype == np.float32
  projection = points @ rng.normal(size=(32, 2))
  trust, trust_projection = (_trustworthiness(points, e, 5) for e in (embedding, projection))
  # Measured on this data: t-SNE 0.975, a random linear map 0.814.
  assert trust > 0.93 and trust > trust_projection + 0.1, (trust, trust_projection)
  again = analysis.tsne(points, perplexity=20, seed=1)
  np.testing.assert_array_equal(again, embedding)  # same seed, same map
  with pytest.raises(ValueError, match='perplexity 200'):
    analysis.tsne(points, perplexity=200)


def test_tsne_keeps_separated_clusters_apart_and_png_has_ten_legend_entries(tmp_path):
  rng = np.random.default_rng(5)
  labels = np.repeat(np.arange(10), 20)
  centres = rng.normal(scale=6.0, size=(10, 16))
  points = centres[labels] + rng.normal(size=(200, 16))
  embedding = analysis.tsne(points, perplexity=15, num_iterations=400, seed=0)
  assert embedding.shape == (200, 2) and np.isfinite(embedding).all()
  # Nearest neighbour in the map has the same label: the clusters survived the embedding.
  squared = ((embedding[:, None] - embedding[None]) ** 2).sum(-1)
  np.fill_diagonal(squared, np.inf)
  assert np.mean(labels[squared.argmin(1)] == labels) > 0.95

  names = [f'class {c}' for c in range(10)]
  figure = analysis.plot_embedding(embedding, labels, names, title='test')
  path = analysis.save_figure(figure, str(tmp_path / 'tsne.png'))
  legend_texts = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
  assert legend_texts == names
  colours = {tuple(np.round(c.get_facecolor()[0][:3], 3)) for c in figure.axes[0].collections}
  assert len(colours) == 10
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_select_classes_draws_ten_classes_and_caps_per_class():
  labels = np.repeat(np.arange(15), 30)
  picked = analysis.select_classes(labels, num_classes=10, per_class=12, seed=3)
  assert len(np.unique(labels[picked])) == 10
  assert np.all(np.bincount(labels[picked])[np.unique(labels[picked])] == 12)
  np.testing.assert_array_equal(picked, analysis.select_classes(labels, 10, 12, seed=3))

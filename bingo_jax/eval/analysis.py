"""The paper's analyses of a student (appendix A.3): bag distance, intra-class distance, t-SNE.

* ``bag_distance``: paper Eq. 11, ``E_a E_{p in bag(a)} ||f(x_a) - f(x_p)||^2`` (Table 13).
* ``intra_class_distance``: the mean of ``||f(x_i) - f(x_j)||^2`` over all pairs ``i != j`` of
  the same class (Table 14).
* ``tsne`` (scikit-learn's) + ``plot_embedding``: the 2-D map of Fig. 4 (10 classes, one
  colour each).

Which ``f``: the protocol passes the student's pooled backbone features, L2-normalised by
default. The paper's numbers (0.32 ... 0.88) are in the range of squared distances between
unit vectors (``2 - 2 cos``), and normalised features are what the student's loss and the kNN
protocol compare; ``--config.eval.analysis_normalize=False`` uses raw features.

The distances are closed-form sums in float64 on the host (``O(N k D)``, seconds for
ImageNet); the expensive part, the feature pass, is sharded (``bingo_jax.bags.features``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import threadpoolctl
from sklearn.manifold import TSNE

from bingo_jax.bags.bag_file import Bags
from bingo_jax.store import fileio


# ---------------------------------------------------------------------------------------------
# Distances.
# ---------------------------------------------------------------------------------------------

def bag_distance(features: np.ndarray, bags: Union[Bags, np.ndarray],
                 chunk_size: int = 8192) -> dict:
  """Paper Eq. 11: mean over anchors of the mean squared distance to the anchor's bag members.

  Args:
    features: ``(N, D)`` features of the images the bags index (the bagged split, in order).
    bags: a ``Bags`` (fixed-size or group bags) or an ``(N, k)`` int neighbour table.
    chunk_size: anchors per vectorised chunk (fixed-size bags).
  Returns:
    ``{'bag_distance': float, 'num_anchors': int}``; anchors with an empty bag (an image
    alone in its cluster) are left out of the outer mean, there being nothing to average.
  """
  features = np.asarray(features, np.float64)
  if isinstance(bags, np.ndarray):
    neighbors, kind = np.asarray(bags), 'fixed'
    num_images = neighbors.shape[0]
  else:
    neighbors, kind, num_images = bags.neighbors, bags.kind, bags.num_images
  if num_images != len(features):
    raise ValueError(f'the bags are for {num_images} images but {len(features)} feature rows '
                     'were given (features of the bagged split, in its order, are needed).')
  if kind == 'fixed':
    total = 0.0
    for start in range(0, len(features), chunk_size):
      anchors = features[start:start + chunk_size]                 # (c, D)
      members = features[neighbors[start:start + chunk_size]]      # (c, k, D)
      squared = ((anchors[:, None, :] - members) ** 2).sum(-1)     # (c, k)
      total += squared.mean(axis=1).sum()
    return {'bag_distance': float(total / len(features)), 'num_anchors': int(len(features))}

  # Group bags: the bag of a is its group g minus a. With s_g = sum of the group's features
  # and q_g = sum of their squared norms, sum_{p in g, p != a} ||f_a - f_p||^2
  #   = n_g ||f_a||^2 + q_g - 2 f_a . s_g   (the p = a term is zero),
  # averaged over the n_g - 1 members.
  group_of = bags.group_of
  num_groups = int(group_of.max()) + 1
  sizes = np.bincount(group_of, minlength=num_groups)
  sums = np.zeros((num_groups, features.shape[1]))
  np.add.at(sums, group_of, features)
  squared_norms = (features ** 2).sum(-1)
  group_squared = np.bincount(group_of, weights=squared_norms, minlength=num_groups)
  size_of_anchor = sizes[group_of]
  has_bag = size_of_anchor > 1
  totals = (size_of_anchor * squared_norms + group_squared[group_of]
            - 2 * (features * sums[group_of]).sum(-1))
  per_anchor = totals[has_bag] / (size_of_anchor[has_bag] - 1)
  if not per_anchor.size:
    raise ValueError('every bag is empty (each image alone in its group): no bag distance.')
  return {'bag_distance': float(per_anchor.mean()), 'num_anchors': int(has_bag.sum())}


def intra_class_distance(features: np.ndarray, labels: np.ndarray) -> dict:
  """Mean squared distance over all pairs of distinct images of the same class (Table 14).

  Args:
    features: ``(N, D)`` features.
    labels: ``(N,)`` int class of every row.
  Returns:
    ``{'intra_class_distance': mean over all same-class pairs (every pair counts once, so
    large classes weigh more), 'intra_class_distance_class_mean': mean over classes of each
    class's pair mean, 'num_pairs': number of unordered pairs}``. Classes with one image
    have no pair and are left out.
  """
  features = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  if labels.shape != (len(features),):
    raise ValueError(f'labels has shape {labels.shape}, expected ({len(features)},).')
  classes, labels = np.unique(labels, return_inverse=True)
  sizes = np.bincount(labels, minlength=len(classes)).astype(np.float64)
  sums = np.zeros((len(classes), features.shape[1]))
  np.add.at(sums, labels, features)
  squared = np.bincount(labels, weights=(features ** 2).sum(-1), minlength=len(classes))
  # sum over ordered pairs (i, j) of a class of ||f_i - f_j||^2 = 2 n q - 2 ||s||^2.
  ordered_totals = 2 * sizes * squared - 2 * (sums ** 2).sum(-1)
  ordered_pairs = sizes * (sizes - 1)
  has_pairs = ordered_pairs > 0
  if not has_pairs.any():
    raise ValueError('no class has two images: no intra-class distance.')
  class_means = ordered_totals[has_pairs] / ordered_pairs[has_pairs]
  return {'intra_class_distance': float(ordered_totals.sum() / ordered_pairs.sum()),
          'intra_class_distance_class_mean': float(class_means.mean()),
          'num_pairs': int(ordered_pairs.sum() // 2)}


# ---------------------------------------------------------------------------------------------
# t-SNE (scikit-learn), for the few thousand points of Fig. 4.
# ---------------------------------------------------------------------------------------------

def tsne(features: np.ndarray, *, perplexity: float = 30.0, num_iterations: int = 1000,
         learning_rate: Optional[float] = None, early_exaggeration: float = 12.0,
         seed: int = 0, num_threads: Optional[int] = 1) -> np.ndarray:
  """2-D t-SNE embedding: ``sklearn.manifold.TSNE`` (Barnes-Hut, PCA initialisation).

  A maintained implementation instead of an own one: its maps are as trustworthy as an exact
  t-SNE's, in less time (bench/tsne.py, docs/benchmarks.md).

  Args:
    features: ``(n, D)`` points.
    perplexity: effective number of neighbours; must be below ``n``.
    num_iterations: gradient steps (at least 250, the early exaggeration phase).
    learning_rate: step size (default: scikit-learn's ``'auto'``,
      ``max(n / early_exaggeration / 4, 50)``).
    early_exaggeration: factor on the affinities during the first 250 steps.
    seed: ``random_state``.
    num_threads: OpenMP threads of the gradient (``None``: scikit-learn's default, all
      cores). One by default: each of the 1000 steps on a few thousand points is too short
      to share, and on a busy host spinning threads made it 5x slower (bench/tsne.py).
  Returns:
    ``(n, 2)`` float32 embedding.
  """
  features = np.asarray(features, np.float32)
  n = len(features)
  if not 1 <= perplexity < n:
    raise ValueError(f't-SNE perplexity {perplexity} must be in [1, {n}) for {n} points.')
  model = TSNE(n_components=2, perplexity=perplexity, early_exaggeration=early_exaggeration,
               learning_rate='auto' if learning_rate is None else learning_rate,
               max_iter=num_iterations, init='pca', method='barnes_hut', random_state=seed)
  with threadpoolctl.threadpool_limits(limits=num_threads, user_api='openmp'):
    embedding = model.fit_transform(features)
  return np.asarray(embedding, np.float32)


def select_classes(labels: np.ndarray, num_classes: int, per_class: int,
                   seed: int = 0) -> np.ndarray:
  """Indices of up to ``per_class`` images of each of ``num_classes`` randomly chosen classes.

  Args:
    labels: ``(N,)`` int labels.
    num_classes: classes to draw (all of them if there are fewer).
    per_class: images per class (all of a class's images if it has fewer).
    seed: the draw.
  Returns:
    Sorted ``(M,)`` int64 indices.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  present = np.unique(labels)
  chosen = np.sort(rng.choice(present, size=min(num_classes, len(present)), replace=False))
  picked = []
  for label in chosen:
    members = np.flatnonzero(labels == label)
    picked.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
  return np.sort(np.concatenate(picked))


def plot_embedding(embedding: np.ndarray, labels: np.ndarray,
                   class_names: Optional[Sequence[str]] = None, title: str = ''):
  """Scatter plot of a 2-D embedding, one colour and one legend entry per class.

  Args:
    embedding: ``(n, 2)`` points.
    labels: ``(n,)`` int labels.
    class_names: name of every class id (default: the ids).
    title: figure title.
  Returns:
    The ``matplotlib.figure.Figure`` (no pyplot state is touched).
  """
  import matplotlib  # plotting is only needed by the analysis protocol
  from matplotlib.figure import Figure

  classes = np.unique(labels)
  colours = matplotlib.colormaps['tab10' if len(classes) <= 10 else 'tab20']
  figure = Figure(figsize=(7.5, 6), dpi=120)
  axes = figure.add_subplot()
  for position, label in enumerate(classes):
    chosen = labels == label
    name = class_names[label] if class_names is not None else str(label)
    axes.scatter(embedding[chosen, 0], embedding[chosen, 1], s=6, alpha=0.8,
                 color=colours(position % colours.N), label=name)
  axes.legend(loc='center left', bbox_to_anchor=(1.0, 0.5), markerscale=3, frameon=False)
  axes.set_xticks([])
  axes.set_yticks([])
  if title:
    axes.set_title(title)
  figure.tight_layout()
  return figure


def save_figure(figure, path: str) -> str:
  """Writes a figure as PNG atomically (temporary file, then rename)."""
  return fileio.atomic_write(path, lambda f: figure.savefig(f, format='png'))

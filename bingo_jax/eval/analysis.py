"""The paper's analyses of a student (appendix A.3): bag distance, intra-class distance, t-SNE.

* ``bag_distance``: paper Eq. 11, ``E_a E_{p in bag(a)} ||f(x_a) - f(x_p)||^2`` (Table 13).
* ``intra_class_distance``: the mean of ``||f(x_i) - f(x_j)||^2`` over all pairs ``i != j`` of
  the same class (Table 14).
* ``tsne`` + ``plot_embedding``: the 2-D map of Fig. 4 (10 classes, one colour each).

Which ``f``: the protocol passes the student's pooled backbone features, L2-normalised by
default. The paper's numbers (0.32 ... 0.88) are in the range of squared distances between
unit vectors (``2 - 2 cos``), and normalised features are what the student's loss and the kNN
protocol compare; ``--config.eval.analysis_normalize=False`` uses raw features.

The distances are closed-form sums in float64 on the host (``O(N k D)``, seconds for
ImageNet); the expensive part, the feature pass, is sharded (``bingo_jax.features``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from bingo_jax import fileio
from bingo_jax.bag_file import Bags


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
# t-SNE (exact, van der Maaten & Hinton 2008), for the few thousand points of Fig. 4.
# ---------------------------------------------------------------------------------------------

def conditional_probabilities(squared_distances: np.ndarray, perplexity: float,
                              tolerance: float = 1e-5, max_steps: int = 100) -> np.ndarray:
  """Rows ``p_{j|i}`` of Gaussian kernels whose entropy is ``log(perplexity)``.

  Every row's precision ``beta_i = 1 / (2 sigma_i^2)`` is found by bisection (all rows at once).

  Args:
    squared_distances: ``(n, n)`` squared distances.
    perplexity: the effective number of neighbours; must be below ``n``.
    tolerance: on the entropy, in nats.
    max_steps: bisection steps.
  Returns:
    ``(n, n)`` float64 row-stochastic matrix with a zero diagonal.
  """
  n = squared_distances.shape[0]
  if not 1 <= perplexity < n:
    raise ValueError(f't-SNE perplexity {perplexity} must be in [1, {n}) for {n} points.')
  distances = np.asarray(squared_distances, np.float64).copy()
  np.fill_diagonal(distances, np.inf)
  # Shifting each row by its smallest distance leaves p_{j|i} unchanged and avoids underflow.
  distances -= distances.min(axis=1, keepdims=True)
  target = np.log(perplexity)
  low, high = np.full(n, -np.inf), np.full(n, np.inf)
  beta = np.ones(n)
  for _ in range(max_steps):
    kernel = np.exp(-distances * beta[:, None])
    total = kernel.sum(axis=1)
    probabilities = kernel / total[:, None]
    entropy = np.log(total) + beta * (probabilities * np.nan_to_num(distances, posinf=0)).sum(1)
    too_flat = entropy > target  # too many neighbours: sharpen (larger beta)
    if np.all(np.abs(entropy - target) < tolerance):
      break
    low = np.where(too_flat, beta, low)
    high = np.where(too_flat, high, beta)
    beta = np.where(np.isinf(high), beta * 2, np.where(np.isinf(low), beta / 2,
                                                       (low + high) / 2))
  return probabilities


def tsne(features: np.ndarray, *, perplexity: float = 30.0, num_iterations: int = 1000,
         learning_rate: Optional[float] = None, early_exaggeration: float = 12.0,
         exaggeration_iterations: int = 250, seed: int = 0) -> np.ndarray:
  """Exact t-SNE embedding in 2-D.

  Gradient descent with momentum (0.5, then 0.8 after the exaggeration phase) and per-
  coordinate adaptive gains, as in the original paper's reference implementation; the step
  size defaults to ``max(n / early_exaggeration / 4, 50)``.

  Args:
    features: ``(n, D)`` points (n up to a few thousand: the cost is ``O(n^2)`` per step).
    perplexity: effective number of neighbours.
    num_iterations: gradient steps.
    learning_rate: step size (default above).
    early_exaggeration: factor on P during the first ``exaggeration_iterations`` steps.
    exaggeration_iterations: see above.
    seed: initialisation.
  Returns:
    ``(n, 2)`` float32 embedding.
  """
  features = np.asarray(features, np.float64)
  n = len(features)
  squared_norms = (features ** 2).sum(1)
  squared_distances = np.maximum(
      squared_norms[:, None] + squared_norms[None, :] - 2 * features @ features.T, 0)
  conditional = conditional_probabilities(squared_distances, perplexity)
  joint = (conditional + conditional.T) / (2 * n)
  joint = np.maximum(joint, 1e-12)
  np.fill_diagonal(joint, 0)
  if learning_rate is None:
    learning_rate = max(n / early_exaggeration / 4, 50.0)
  initial = np.random.default_rng(seed).normal(scale=1e-4, size=(n, 2))

  def gradient(embedding, p):
    difference = embedding[:, None, :] - embedding[None, :, :]             # (n, n, 2)
    kernel = 1.0 / (1.0 + (difference ** 2).sum(-1))                       # Student-t
    kernel = kernel * (1.0 - jnp.eye(n, dtype=kernel.dtype))
    q = jnp.maximum(kernel / kernel.sum(), 1e-12)
    return 4.0 * jnp.einsum('ij,ijd->id', (p - q) * kernel, difference)

  @jax.jit
  def optimise(embedding, p):
    def step(iteration, state):
      embedding, velocity, gains = state
      exaggerated = iteration < exaggeration_iterations
      grad = gradient(embedding, jnp.where(exaggerated, early_exaggeration * p, p))
      momentum = jnp.where(exaggerated, 0.5, 0.8)
      # Gains grow where the gradient keeps pushing against the current direction of travel.
      same_sign = jnp.sign(grad) == jnp.sign(velocity)
      gains = jnp.maximum(jnp.where(same_sign, gains * 0.8, gains + 0.2), 0.01)
      velocity = momentum * velocity - learning_rate * gains * grad
      embedding = embedding + velocity
      return embedding - embedding.mean(0), velocity, gains
    zeros = jnp.zeros_like(embedding)
    embedding, _, _ = jax.lax.fori_loop(0, num_iterations, step,
                                        (embedding, zeros, jnp.ones_like(embedding)))
    return embedding

  embedding = optimise(jnp.asarray(initial, jnp.float32), jnp.asarray(joint, jnp.float32))
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

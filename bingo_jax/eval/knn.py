"""k-nearest-neighbour classification of pooled features (paper Table 1, DINO-style weighted kNN).

Two votes are computed from one neighbour search:

* ``majority``: the ``k`` (10) most similar training images vote, one vote each. A tie
  between classes goes to the tied class whose first neighbour is the most similar one
  (i.e. the class of the nearest neighbour among the tied classes).
* ``weighted``: the ``weighted_k`` (200) most similar training images vote with weight
  ``exp(similarity / temperature)`` (T = 0.07, as InstDisc / DINO), summed per class; the
  class with the largest sum wins (exact ties: the lower class index).

Neighbour order is similarity descending, equal similarities ordered by the lower training
index, so the result is a deterministic function of the features.

The search runs blockwise on the accelerators: the training features (the "bank") are split
by rows over the mesh, every device finds the top candidates in its own rows for a block of
queries, and the candidates of all devices are merged. Memory per device is
``query_block_size x (num_train / num_devices)`` similarities.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from tqdm.auto import tqdm

from bingo_jax.data import parallel


@dataclasses.dataclass
class KnnPredictions:
  """Predictions for every query.

  Attributes:
    majority: ``(num_queries,)`` int32, class of the ``k``-NN majority vote.
    weighted_top5: ``(num_queries, min(5, num_classes))`` int32, classes ranked by the
      temperature-weighted ``weighted_k``-NN vote (column 0 is the prediction).
    neighbours: ``(num_queries, max(k, weighted_k))`` int32 training indices, nearest first.
  """
  majority: np.ndarray
  weighted_top5: np.ndarray
  neighbours: np.ndarray


def l2_normalize(features: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """Rows scaled to unit L2 norm (cosine similarity becomes a dot product). ``(n, d)`` float32."""
  features = np.asarray(features, np.float32)
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  return features / np.maximum(norms, eps)


def majority_vote(neighbour_labels: jax.Array, num_classes: int) -> jax.Array:
  """One vote per neighbour; ties go to the tied class whose first neighbour is nearest.

  Args:
    neighbour_labels: ``(batch, k)`` int labels of the neighbours, nearest first.
    num_classes: number of classes.
  Returns:
    ``(batch,)`` int32 predicted classes.
  """
  k = neighbour_labels.shape[1]
  one_hot = jax.nn.one_hot(neighbour_labels, num_classes, dtype=jnp.int32)  # (b, k, c)
  counts = one_hot.sum(axis=1)
  ranks = jnp.arange(k, dtype=jnp.int32)[None, :, None]
  first_rank = jnp.where(one_hot > 0, ranks, k).min(axis=1)  # k where the class is absent
  # counts dominate (a count step is worth k + 1 > any rank difference); among equal counts
  # the smaller first rank wins.
  score = counts * (k + 1) - first_rank
  return jnp.argmax(score, axis=1).astype(jnp.int32)


def weighted_vote(neighbour_similarities: jax.Array, neighbour_labels: jax.Array,
                  num_classes: int, temperature: float, top: int = 5) -> jax.Array:
  """Temperature-weighted vote: class score = sum of ``exp(similarity / T)`` of its neighbours.

  Args:
    neighbour_similarities: ``(batch, k)`` float similarities, nearest first.
    neighbour_labels: ``(batch, k)`` int labels.
    num_classes: number of classes.
    temperature: T.
    top: how many ranked classes to return.
  Returns:
    ``(batch, min(top, num_classes))`` int32 classes, best first.
  """
  # Subtracting the per-query maximum rescales all weights of a query by the same factor:
  # the ranking is that of exp(sim / T), without overflow for unnormalised features.
  logits = (neighbour_similarities - neighbour_similarities[:, :1]) / temperature
  weights = jnp.exp(logits)
  one_hot = jax.nn.one_hot(neighbour_labels, num_classes, dtype=weights.dtype)
  class_scores = jnp.einsum('bk,bkc->bc', weights, one_hot)
  # lax.top_k orders equal values by the lower index: exact ties go to the lower class.
  _, classes = jax.lax.top_k(class_scores, min(top, num_classes))
  return classes.astype(jnp.int32)


def _search_fn(mesh: Mesh, num_train: int, rows_per_device: int, num_neighbours: int):
  """Jitted ``(queries, bank, bank_labels) -> (similarities, labels, indices)`` of the
  ``num_neighbours`` nearest training rows, replicated on every device."""
  local_k = min(num_neighbours, rows_per_device)

  def local_then_merge(queries, bank_rows, bank_label_rows):
    # queries (b, d) replicated; bank_rows (rows_per_device, d): this device's rows.
    first_row = jax.lax.axis_index(parallel.DATA_AXIS) * rows_per_device
    row_indices = first_row + jnp.arange(rows_per_device, dtype=jnp.int32)
    similarities = jnp.dot(queries, bank_rows.T, precision=jax.lax.Precision.HIGHEST)
    similarities = jnp.where(row_indices[None, :] < num_train, similarities, -jnp.inf)
    values, positions = jax.lax.top_k(similarities, local_k)
    indices = row_indices[positions]
    labels = bank_label_rows[positions]
    # Candidates of device 0 come first, then device 1...: at equal similarity, top_k's
    # "lower position first" is "lower training index first", as on one device.
    gather = functools.partial(jax.lax.all_gather, axis_name=parallel.DATA_AXIS, axis=1,
                               tiled=True)
    values, indices, labels = gather(values), gather(indices), gather(labels)
    values, positions = jax.lax.top_k(values, num_neighbours)
    take = lambda x: jnp.take_along_axis(x, positions, axis=1)
    return values, take(labels), take(indices)

  # After the all_gather every device holds the same merged candidates, so the outputs are
  # replicated; the varying-axis check cannot see that through all_gather, hence off.
  sharded = jax.shard_map(
      local_then_merge, mesh=mesh,
      in_specs=(P(), P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)),
      out_specs=(P(), P(), P()), check_vma=False)
  return jax.jit(sharded, out_shardings=parallel.replicated(mesh))


def _classify_fn(mesh: Mesh, search, k: int, weighted_k: int, num_classes: int,
                 temperature: float):
  def classify(queries, bank, bank_labels):
    similarities, labels, indices = search(queries, bank, bank_labels)
    majority = majority_vote(labels[:, :k], num_classes)
    weighted = weighted_vote(similarities[:, :weighted_k], labels[:, :weighted_k],
                             num_classes, temperature)
    return majority, weighted, indices
  return jax.jit(classify, out_shardings=parallel.replicated(mesh))


def _fetch(x: jax.Array) -> np.ndarray:
  # Replicated outputs: every process reads its own copy (works on multi-host meshes, where
  # the global array spans devices this process cannot address).
  return np.asarray(x.addressable_data(0))


def _checked_inputs(train_features: np.ndarray, train_labels: np.ndarray,
                    query_features: np.ndarray, num_classes: int, k: int, weighted_k: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``knn_classify``'s arguments as float32 / int32 arrays, or a ValueError naming the bad one."""
  train_features = np.asarray(train_features, np.float32)
  query_features = np.asarray(query_features, np.float32)
  train_labels = np.asarray(train_labels, np.int32)
  if train_features.ndim != 2 or query_features.ndim != 2:
    raise ValueError(f'features must be 2-D; got train {train_features.shape}, '
                     f'queries {query_features.shape}.')
  if train_features.shape[1] != query_features.shape[1]:
    raise ValueError(f'train features have dimension {train_features.shape[1]}, queries '
                     f'{query_features.shape[1]}.')
  if train_labels.shape != (len(train_features),):
    raise ValueError(f'train_labels has shape {train_labels.shape}, expected '
                     f'({len(train_features)},).')
  if train_labels.size and (train_labels.min() < 0 or train_labels.max() >= num_classes):
    raise ValueError(f'train_labels must lie in [0, {num_classes}); found '
                     f'[{train_labels.min()}, {train_labels.max()}].')
  if k < 1 or weighted_k < 1:
    raise ValueError(f'k ({k}) and weighted_k ({weighted_k}) must be positive.')
  if max(k, weighted_k) > len(train_features):
    raise ValueError(f'k={k}, weighted_k={weighted_k}: the training set has only '
                     f'{len(train_features)} examples.')
  return train_features, train_labels, query_features


def _sharded_bank(train_features: np.ndarray, train_labels: np.ndarray, rows_per_device: int,
                  mesh: Mesh) -> tuple[jax.Array, jax.Array]:
  """The bank zero-padded to ``rows_per_device`` rows per device and split by rows over
  ``mesh``: features ``(padded, dim)`` float32 and labels ``(padded,)`` int32."""
  padded_rows = rows_per_device * mesh.devices.size
  bank_padded = np.zeros((padded_rows, train_features.shape[1]), np.float32)
  bank_padded[:len(train_features)] = train_features
  labels_padded = np.zeros((padded_rows,), np.int32)
  labels_padded[:len(train_labels)] = train_labels
  row_sharding = parallel.data_sharding(mesh)
  bank = jax.make_array_from_callback(bank_padded.shape, row_sharding,
                                      lambda index: bank_padded[index])
  bank_labels = jax.make_array_from_callback(labels_padded.shape, row_sharding,
                                             lambda index: labels_padded[index])
  return bank, bank_labels


def knn_classify(train_features: np.ndarray, train_labels: np.ndarray,
                 query_features: np.ndarray, *, num_classes: int, k: int = 10,
                 weighted_k: int = 200, temperature: float = 0.07,
                 normalize: bool = True, mesh: Optional[Mesh] = None,
                 query_block_size: int = 256, progress: bool = True) -> KnnPredictions:
  """Classifies queries by their nearest training features (cosine similarity).

  Every process must pass the same arrays (as ``features.extract_features`` returns them).

  Args:
    train_features: ``(num_train, dim)`` float features of the labelled bank.
    train_labels: ``(num_train,)`` int labels in ``[0, num_classes)``.
    query_features: ``(num_queries, dim)`` float features to classify.
    num_classes: number of classes.
    k: neighbours of the majority vote.
    weighted_k: neighbours of the weighted vote.
    temperature: T of the weighted vote.
    normalize: L2-normalise rows first (cosine similarity); ``False`` uses raw dot products.
    mesh: device mesh (default: all devices).
    query_block_size: queries per block (memory: ``block x num_train / devices`` floats).
    progress: show a progress bar.
  Returns:
    ``KnnPredictions``.
  """
  train_features, train_labels, query_features = _checked_inputs(
      train_features, train_labels, query_features, num_classes, k, weighted_k)
  num_neighbours = max(k, weighted_k)
  if normalize:
    train_features = l2_normalize(train_features)
    query_features = l2_normalize(query_features)

  mesh = mesh or parallel.make_mesh()
  rows_per_device = math.ceil(len(train_features) / mesh.devices.size)
  bank, bank_labels = _sharded_bank(train_features, train_labels, rows_per_device, mesh)
  dim = train_features.shape[1]

  search = _search_fn(mesh, len(train_features), rows_per_device, num_neighbours)
  classify = _classify_fn(mesh, search, k, weighted_k, num_classes, temperature)
  num_queries = len(query_features)
  majority, weighted, neighbours = [], [], []
  starts = range(0, num_queries, query_block_size)
  for start in tqdm(starts, desc='kNN', unit='block', disable=not progress or len(starts) < 2):
    block = query_features[start:start + query_block_size]
    valid = len(block)
    if valid < query_block_size:  # one compiled shape for every block
      block = np.concatenate([block, np.zeros((query_block_size - valid, dim), np.float32)])
    queries = jax.device_put(block, parallel.replicated(mesh))
    block_majority, block_weighted, block_neighbours = classify(queries, bank, bank_labels)
    majority.append(_fetch(block_majority)[:valid])
    weighted.append(_fetch(block_weighted)[:valid])
    neighbours.append(_fetch(block_neighbours)[:valid])
  top = min(5, num_classes)
  return KnnPredictions(
      majority=np.concatenate(majority) if majority else np.zeros((0,), np.int32),
      weighted_top5=np.concatenate(weighted) if weighted else np.zeros((0, top), np.int32),
      neighbours=(np.concatenate(neighbours) if neighbours
                  else np.zeros((0, num_neighbours), np.int32)))


def knn_evaluate(train_features: np.ndarray, train_labels: np.ndarray,
                 eval_features: np.ndarray, eval_labels: np.ndarray, *, num_classes: int,
                 k: int = 10, weighted_k: int = 200, temperature: float = 0.07,
                 mesh: Optional[Mesh] = None, query_block_size: int = 256,
                 progress: bool = True) -> dict:
  """kNN accuracies (percent) of ``eval_features`` against the labelled ``train_features``.

  Args:
    train_features, train_labels, eval_features: see ``knn_classify``.
    eval_labels: ``(num_eval,)`` int true labels.
    num_classes, k, weighted_k, temperature, mesh, query_block_size, progress: see
      ``knn_classify``.
  Returns:
    ``{'knn{k}_top1': ..., 'weighted_knn{weighted_k}_top1': ...,
    'weighted_knn{weighted_k}_top5': ..., 'num_train': ..., 'num_eval': ...}``.
  """
  predictions = knn_classify(train_features, train_labels, eval_features,
                             num_classes=num_classes, k=k, weighted_k=weighted_k,
                             temperature=temperature, mesh=mesh,
                             query_block_size=query_block_size, progress=progress)
  eval_labels = np.asarray(eval_labels)
  top1_majority = float(np.mean(predictions.majority == eval_labels) * 100)
  top1_weighted = float(np.mean(predictions.weighted_top5[:, 0] == eval_labels) * 100)
  top5_weighted = float(np.mean((predictions.weighted_top5 == eval_labels[:, None]).any(1)) * 100)
  return {f'knn{k}_top1': top1_majority,
          f'weighted_knn{weighted_k}_top1': top1_weighted,
          f'weighted_knn{weighted_k}_top5': top5_weighted,
          'knn_temperature': temperature,
          'num_train': int(len(train_features)), 'num_eval': int(len(eval_labels))}

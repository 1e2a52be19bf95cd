"""Nearest-neighbour and clustering backends for bagging (docs/method.md, bagging).

Every kNN backend returns, for each query row of an ``(N, D)`` feature matrix (in memory or as
``features.FeatureShards``), its ``k`` most similar other rows by inner product (cosine on
L2-normalised features), best first, never the query itself:

* ``exact_knn_faiss``: faiss ``IndexFlatIP`` over database blocks, on the CPU;
* ``approx_knn_faiss``: any faiss ``index_factory`` index (IVF, HNSW, PCA), with its recall@k
  against exact search on a sample (``knn_recall``);
* ``JaxKnnIndex`` / ``exact_knn_jax``: exact blockwise similarity + top-k on the accelerators,
  database rows sharded over the mesh;
* ``kmeans_groups``: faiss k-means, a cluster id per row (group bags).

The anchor's own index is excluded wherever it lands among ties (duplicated images tie with
it), not by dropping column 0.

The exact backends return the same neighbours whatever their batch sizes, block sizes or
device count: a float32 matrix product rounds differently for other batch shapes (faiss's
BLAS and SIMD paths, XLA's tiling), which reorders near-ties. So they search for more
candidates than ``k``, score those again in float64 (each score one product of two rows,
independent of any batch) and rank them by that score, the lower index first among equal
scores (``_exact_top_k``). A query whose float32 candidate list may have missed one of its
float64 top-k (the float32 rounding bound exceeds the gap between its k-th float64 score and
the last candidate's) is searched again with four times the candidates, up to every row. The
result is the float64 brute-force top-k with ties broken by index.
"""

# size: the four backends share the row access and the float64 ranking of this module; split
# apart, each would import the others' private helpers.

from __future__ import annotations

import math
import os
import time
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from bingo_jax.bags import features as features_lib
from bingo_jax.data import parallel

FeatureInput = Union[np.ndarray, features_lib.FeatureShards]


def _tqdm(total: int, desc: str, enabled: bool, unit: str = 'query'):
  return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, smoothing=0.1)


def faiss_module():
  """The ``faiss`` module, set to one OpenMP thread per core.

  Imported on first use: the JAX backend, and the bagging stage with ``method='jax'`` or
  ``'labels'``, run without faiss.
  """
  import faiss  # pylint: disable=g-import-not-at-top
  faiss.omp_set_num_threads(os.cpu_count() or 1)
  return faiss


def ivf_nlist(num_rows: int) -> int:
  """IVF list count for ``num_rows`` vectors: ``4 sqrt(N)`` rounded to a power of two."""
  return 2 ** max(1, round(math.log2(4 * math.sqrt(num_rows))))


# ---------------------------------------------------------------------------------------------
# Features in memory or on disk, read in row blocks.
# ---------------------------------------------------------------------------------------------

class FeatureRows:
  """Row-block access to an ``(N, D)`` feature matrix held in memory or as float16 shards."""

  def __init__(self, features: FeatureInput):
    self._shards = features if isinstance(features, features_lib.FeatureShards) else None
    if self._shards is not None:
      self.num_rows, self.dim = self._shards.num_images, self._shards.feature_dim
      self._mapped = [shard for _, shard in self._shards.iter_shards()]
    else:
      features = np.asarray(features)
      if features.ndim != 2:
        raise ValueError(f'features must be (N, D), got shape {features.shape}.')
      self._array = features
      self.num_rows, self.dim = features.shape

  def block(self, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` as contiguous float32 ``(stop - start, D)``."""
    if self._shards is None:
      return np.ascontiguousarray(self._array[start:stop], np.float32)
    out = np.empty((stop - start, self.dim), np.float32)
    size = self._shards.shard_size
    for shard in range(start // size, (stop - 1) // size + 1):
      first = shard * size
      lo, hi = max(start, first), min(stop, first + self._mapped[shard].shape[0])
      out[lo - start:hi - start] = self._mapped[shard][lo - first:hi - first]
    return out

  def query_rows(self, indices: np.ndarray) -> np.ndarray:
    """``rows(indices)``, read as one block when the indices are consecutive ascending."""
    indices = np.asarray(indices)
    first = int(indices[0])
    if np.array_equal(indices, np.arange(first, first + len(indices))):
      return self.block(first, first + len(indices))
    return self.rows(indices)

  def rows(self, indices: np.ndarray) -> np.ndarray:
    """Arbitrary rows as float32 ``(len(indices), D)``."""
    indices = np.asarray(indices, np.int64)
    if self._shards is None:
      return np.ascontiguousarray(self._array[indices], np.float32)
    size = self._shards.shard_size
    out = np.empty((len(indices), self.dim), np.float32)
    shard_of = indices // size
    for shard in np.unique(shard_of):
      chosen = shard_of == shard
      out[chosen] = self._mapped[shard][indices[chosen] - shard * size]
    return out

  def max_norm(self, block_rows: int = 65536) -> float:
    """The largest L2 norm of a row (float64), read block by block."""
    largest = 0.0
    for start in range(0, self.num_rows, block_rows):
      block = self.block(start, min(start + block_rows, self.num_rows)).astype(np.float64)
      largest = max(largest, float(np.sqrt(np.max(np.sum(block * block, axis=1)))))
    return largest


def _merge_top(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Best ``k`` of candidate columns; among equal scores the earlier column wins."""
  order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


# ---------------------------------------------------------------------------------------------
# kNN backends. Each returns neighbours (Q, k) int32 and scores (Q, k) float32, best first,
# never the query's own index.
# ---------------------------------------------------------------------------------------------

def exact_knn_faiss(features: FeatureInput, k: int, *, query_indices: Optional[np.ndarray] = None,
                    query_batch_size: int = 16384, database_block_bytes: int = 4 << 30,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Exact inner-product kNN with faiss ``IndexFlatIP``, excluding each query's own index.

  The database is searched in row blocks of at most ``database_block_bytes`` (float32), each
  query keeping its best candidates across blocks, so the features never need to be held in
  float32 at once. The query's own index is removed wherever it appears (duplicated images tie
  with the anchor, so it need not be first). The candidates are ranked in float64 with index
  tie-break (``_exact_top_k``): the result does not depend on ``query_batch_size`` or
  ``database_block_bytes``.

  Args:
    features: ``(N, D)`` array or ``FeatureShards`` (L2-normalised for cosine ranking).
    k: neighbours per query.
    query_indices: rows to search for (default: every row), ``(Q,)``.
    query_batch_size: queries per faiss call.
    database_block_bytes: float32 bytes of database rows indexed at a time.
    progress: tqdm bar.
  Returns:
    ``(neighbors (Q, k) int32, scores (Q, k) float32)``.
  """
  rows = FeatureRows(features)
  if rows.num_rows <= k:
    raise ValueError(f'kNN with k={k} needs more than {k} images, got {rows.num_rows}.')
  queries = np.arange(rows.num_rows) if query_indices is None else np.asarray(query_indices)

  def search(query_ids, num_candidates, show_progress):
    return _faiss_candidates(rows, query_ids, num_candidates, query_batch_size,
                             database_block_bytes, show_progress)

  return _exact_top_k(rows, queries, k, search, float32_rounding=_FLOAT32_ROUNDING,
                      progress=progress)


def _faiss_candidates(rows: FeatureRows, queries: np.ndarray, k: int, query_batch_size: int,
                      database_block_bytes: int, progress: bool
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Float32 top-``k`` of every query among the other rows: ``(ids (Q, k) int64, scores)``."""
  faiss = faiss_module()
  block_rows = max(k + 1, database_block_bytes // (4 * rows.dim))
  num_blocks = math.ceil(rows.num_rows / block_rows)
  best_scores = np.full((len(queries), k), -np.inf, np.float32)
  best_ids = np.full((len(queries), k), -1, np.int64)
  bar = _tqdm(num_blocks * len(queries), 'knn (faiss exact)', progress)
  for block in range(num_blocks):
    start = block * block_rows
    database = rows.block(start, min(start + block_rows, rows.num_rows))
    index = faiss.IndexFlatIP(rows.dim)
    index.add(database)
    for first in range(0, len(queries), query_batch_size):
      query_ids = queries[first:first + query_batch_size]
      query_vectors = rows.query_rows(query_ids)
      scores, ids = index.search(query_vectors, min(k + 1, database.shape[0]))
      ids = np.where(ids >= 0, ids + start, -1)
      scores = np.where((ids == query_ids[:, None]) | (ids < 0), -np.inf, scores)
      merged = _merge_top(np.concatenate([best_scores[first:first + len(query_ids)], scores], 1),
                          np.concatenate([best_ids[first:first + len(query_ids)], ids], 1), k)
      best_scores[first:first + len(query_ids)], best_ids[first:first + len(query_ids)] = merged
      bar.update(len(query_ids))
  bar.close()
  best_ids[np.isinf(best_scores)] = -1
  return best_ids, best_scores


# Relative rounding of a float32 inner product of D terms is at most about D * 2^-24 (each
# product and partial sum rounds once); one float32 epsilon (2^-23) per term leaves a factor 2.
_FLOAT32_ROUNDING = float(np.finfo(np.float32).eps)


def _exact_top_k(rows: FeatureRows, queries: np.ndarray, k: int, search, *,
                 float32_rounding: float, progress: bool) -> tuple[np.ndarray, np.ndarray]:
  """The float64 top-``k`` of each query (lower index first among equal scores), from the
  float32 candidates of ``search(query_ids, num_candidates, progress) -> (ids, scores)``.

  A query is settled when no row outside its candidates can reach its k-th float64 score:
  every such row scored at most the last candidate's float32 score, and float32 scores are
  within ``float32_rounding * (D + 2) * |query| * max |row|`` of float64 ones. The others are
  searched again with four times the candidates, at most every other row (then settled).

  Returns:
    ``(neighbors (Q, k) int32, scores (Q, k) float32)``: the float64 scores, rounded.
  """
  num_others = rows.num_rows - 1
  num_candidates = min(num_others, k + max(k, 16))
  scale = float32_rounding * (rows.dim + 2) * rows.max_norm()
  neighbors = np.empty((len(queries), k), np.int32)
  scores = np.empty((len(queries), k), np.float32)
  pending = np.arange(len(queries))
  first_search = True
  while pending.size:
    candidate_ids, candidate_scores = search(queries[pending], num_candidates,
                                             progress and first_search)
    first_search = False
    top_ids, top_scores, settled = _rank_in_float64(
        rows, queries[pending], candidate_ids, candidate_scores, k, scale,
        every_row=num_candidates >= num_others)
    neighbors[pending[settled]] = top_ids[settled]
    scores[pending[settled]] = top_scores[settled]
    pending = pending[~settled]
    if pending.size:
      num_candidates = min(num_others, 4 * num_candidates)
      logging.info('exact kNN: %d queries have near-ties beyond the candidates; searching '
                   'them again with %d candidates.', pending.size, num_candidates)
  return neighbors, scores


def _rank_in_float64(rows: FeatureRows, query_ids: np.ndarray, candidate_ids: np.ndarray,
                     candidate_scores: np.ndarray, k: int, scale: float, *, every_row: bool,
                     chunk_elements: int = 1 << 22
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Candidates ranked by float64 score, then index: ``(ids (Q, k), scores (Q, k), settled
  (Q,) bool)`` (see ``_exact_top_k``)."""
  num_queries, num_candidates = candidate_ids.shape
  top_ids = np.empty((num_queries, k), np.int32)
  top_scores = np.empty((num_queries, k), np.float64)
  settled = np.empty(num_queries, bool)
  chunk = max(1, chunk_elements // max(1, num_candidates * rows.dim))
  for first in range(0, num_queries, chunk):
    part = slice(first, min(first + chunk, num_queries))
    ids = np.asarray(candidate_ids[part], np.int64)
    valid = ids >= 0
    queries = rows.rows(query_ids[part]).astype(np.float64)
    members = rows.rows(np.where(valid, ids, 0).ravel()).astype(np.float64).reshape(
        ids.shape + (rows.dim,))
    # One row product per (query, candidate): the same float64 sum whatever the batch.
    exact = np.sum(queries[:, None, :] * members, axis=-1)
    exact = np.where(valid, exact, -np.inf)
    # Descending score, then ascending index (invalid slots, -inf, last).
    order = np.lexsort((np.where(valid, ids, np.iinfo(np.int64).max), -exact), axis=-1)[:, :k]
    top_ids[part] = np.take_along_axis(ids, order, 1)
    top_scores[part] = np.take_along_axis(exact, order, 1)
    # The k-th float64 score must beat anything a row outside the candidates could reach.
    last_candidate = np.where(valid.all(axis=1), np.asarray(candidate_scores[part],
                                                            np.float64).min(axis=1), -np.inf)
    bound = scale * np.linalg.norm(queries, axis=1)
    settled[part] = every_row | ~valid.all(axis=1) | (last_candidate + bound < top_scores[part][:, -1])
  return top_ids, top_scores.astype(np.float32), settled


def approx_knn_faiss(features: FeatureInput, k: int, *, index_factory: str = 'IVF{nlist},Flat',
                     search_parameters: str = 'nprobe=32', train_size: int = 262144,
                     recall_sample: int = 1000, query_batch_size: int = 16384, seed: int = 0,
                     progress: bool = True) -> tuple[np.ndarray, Optional[float]]:
  """Approximate inner-product kNN with any faiss ``index_factory`` index.

  Args:
    features: ``(N, D)`` array or ``FeatureShards``.
    k: neighbours per query.
    index_factory: faiss factory string, e.g. ``'IVF{nlist},Flat'``, ``'PCA256,IVF{nlist},Flat'``,
      ``'HNSW32'``; ``{nlist}`` becomes ``4 * sqrt(N)`` (rounded to a power of two).
    search_parameters: ``faiss.ParameterSpace`` string, e.g. ``'nprobe=32'`` or ``'efSearch=128'``.
    train_size: rows sampled to train the index (IVF centroids, PCA).
    recall_sample: anchors whose exact neighbours are computed to report recall@k (0: skip).
    query_batch_size: rows added / searched per faiss call.
    seed: sampling seed.
    progress: tqdm bar.
  Returns:
    ``(neighbors (N, k) int32, recall@k on the sample or None)``. The index's best
    ``k + max(k, 16)`` candidates are ranked as ``exact_knn_faiss`` ranks (float64, ties by
    index). An anchor for which the index returns fewer than ``k`` other images gets its
    exact-search neighbours instead.
  """
  faiss = faiss_module()
  rows = FeatureRows(features)
  n = rows.num_rows
  factory = index_factory.format(nlist=ivf_nlist(n))
  index = faiss.index_factory(rows.dim, factory, faiss.METRIC_INNER_PRODUCT)
  rng = np.random.default_rng(seed)
  train_rows = np.sort(rng.choice(n, size=min(n, train_size), replace=False))
  start_time = time.perf_counter()
  index.train(rows.rows(train_rows))
  for first in range(0, n, query_batch_size):
    index.add(rows.block(first, min(first + query_batch_size, n)))
  if search_parameters:
    faiss.ParameterSpace().set_index_parameters(index, search_parameters)
  neighbors = np.empty((n, k), np.int32)
  incomplete = []
  num_candidates = min(n - 1, k + max(k, 16))
  bar = _tqdm(n, f'knn (faiss {factory})', progress)
  for first in range(0, n, query_batch_size):
    query_ids = np.arange(first, min(first + query_batch_size, n))
    scores, ids = index.search(rows.block(first, query_ids[-1] + 1), num_candidates + 1)
    invalid = (ids == query_ids[:, None]) | (ids < 0)
    scores = np.where(invalid, -np.inf, scores)
    scores, ids = _merge_top(scores, np.where(invalid, -1, ids), num_candidates)
    # Ranked as the exact backends rank (float64, ties by index), among what the index found.
    ids, scores, _ = _rank_in_float64(rows, query_ids, ids, scores, k, 0.0, every_row=True)
    neighbors[first:first + len(query_ids)] = ids
    incomplete.extend(query_ids[np.isinf(scores).any(axis=1)])
    bar.update(len(query_ids))
  bar.close()
  if incomplete:
    incomplete = np.asarray(incomplete)
    neighbors[incomplete] = exact_knn_faiss(features, k, query_indices=incomplete,
                                            progress=False)[0]
  logging.info('approx kNN (%s, %s): %.1f s%s', factory, search_parameters,
               time.perf_counter() - start_time,
               f', {len(incomplete)} anchors completed by exact search' if len(incomplete) else '')
  recall = None
  if recall_sample:
    sample = np.sort(rng.choice(n, size=min(n, recall_sample), replace=False))
    exact = exact_knn_faiss(features, k, query_indices=sample, progress=False)[0]
    recall = knn_recall(neighbors[sample], exact)
    logging.info('approx kNN recall@%d against exact search on %d anchors: %.4f', k,
                 len(sample), recall)
  return neighbors, recall


def knn_recall(found: np.ndarray, exact: np.ndarray) -> float:
  """Fraction of the exact ``(Q, k)`` neighbours that ``found (Q, k)`` contains."""
  hits = sum(len(np.intersect1d(a, b)) for a, b in zip(found, exact))
  return hits / exact.size


class JaxKnnIndex:
  """Exact inner-product kNN on the accelerators: database rows sharded over the mesh.

  Every device holds ``N / devices`` database rows and scans them in chunks of
  ``database_chunk_rows`` against a replicated block of queries, keeping a running top-k
  (the ``(queries, chunk)`` similarity block is the only large temporary). The per-device
  top-k lists are then gathered and merged. The query's own index is masked out before any
  top-k, so duplicates of the anchor cannot push it out of or into its bag. Building the
  index places the database on the devices; ``search`` can then be called repeatedly.

  Args:
    features: ``(N, D)`` array or ``FeatureShards``.
    k: neighbours per query.
    mesh: device mesh (default: all devices).
    query_batch_size: queries per step (padded to a fixed size: one compilation).
    database_chunk_rows: database rows per similarity block on each device.
    dtype: storage / matmul dtype of the features on device (float32 by default; bfloat16
      halves memory at the price of near-ties being ordered differently).
  """

  def __init__(self, features: FeatureInput, k: int, *, mesh: Optional[Mesh] = None,
               query_batch_size: int = 1024, database_chunk_rows: int = 16384,
               dtype: Any = jnp.float32):
    self.mesh = parallel.make_mesh() if mesh is None else mesh
    self.rows = FeatureRows(features)
    self.k, self.query_batch_size, self.dtype = k, query_batch_size, dtype
    n, dim = self.rows.num_rows, self.rows.dim
    if n <= k:
      raise ValueError(f'kNN with k={k} needs more than {k} images, got {n}.')
    num_devices = self.mesh.devices.size
    chunk = max(k, min(database_chunk_rows, math.ceil(n / num_devices)))
    chunks_per_device = math.ceil(n / (num_devices * chunk))
    rows_per_device = chunks_per_device * chunk
    padded_rows = rows_per_device * num_devices

    def host_rows(index) -> np.ndarray:
      start = index[0].start or 0
      stop = min(index[0].stop or padded_rows, n)
      out = np.zeros((rows_per_device, dim), np.float32)
      if stop > start:
        out[:stop - start] = self.rows.block(start, stop)
      return out.astype(dtype)

    # Each process builds only its own devices' rows (multi-host: no full copy per host).
    self.database = jax.make_array_from_callback(
        (padded_rows, dim), NamedSharding(self.mesh, P(parallel.DATA_AXIS)), host_rows)
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None

    def local_top_k(queries, query_ids, database_rows):
      # queries (B, D) and query_ids (B,) replicated; database_rows (rows_per_device, D).
      device = jax.lax.axis_index(parallel.DATA_AXIS)
      chunks = database_rows.reshape(chunks_per_device, chunk, dim)
      first_ids = device * rows_per_device + jnp.arange(chunks_per_device) * chunk

      def scan_chunk(best, inputs):
        chunk_rows, first_id = inputs
        ids = first_id + jnp.arange(chunk)
        scores = jnp.matmul(queries, chunk_rows.T, precision=precision,
                            preferred_element_type=jnp.float32)
        invalid = (ids[None, :] >= n) | (ids[None, :] == query_ids[:, None])
        scores = jnp.where(invalid, -jnp.inf, scores)
        chunk_scores, chunk_positions = jax.lax.top_k(scores, k)
        # Earlier chunks (lower ids) first: top_k keeps the earlier of equal scores.
        all_scores = jnp.concatenate([best[0], chunk_scores], axis=1)
        all_ids = jnp.concatenate([best[1], ids[chunk_positions]], axis=1)
        top_scores, positions = jax.lax.top_k(all_scores, k)
        return (top_scores, jnp.take_along_axis(all_ids, positions, axis=1)), None

      start = (jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32),
               jnp.full((queries.shape[0], k), -1, jnp.int32))
      # The running top-k differs per device (it depends on the device's rows).
      start = jax.lax.pcast(start, (parallel.DATA_AXIS,), to='varying')
      (best_scores, best_ids), _ = jax.lax.scan(scan_chunk, start, (chunks, first_ids))
      return best_scores[None], best_ids[None]

    sharded_top_k = jax.shard_map(
        local_top_k, mesh=self.mesh, in_specs=(P(), P(), P(parallel.DATA_AXIS)),
        out_specs=(P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)))

    @jax.jit
    def search_block(queries, query_ids, database):
      scores, ids = sharded_top_k(queries, query_ids, database)  # (devices, B, k)
      scores = jnp.transpose(scores, (1, 0, 2)).reshape(queries.shape[0], -1)
      ids = jnp.transpose(ids, (1, 0, 2)).reshape(queries.shape[0], -1)
      top_scores, positions = jax.lax.top_k(scores, k)  # devices in id order: ties -> lower id
      return top_scores, jnp.take_along_axis(ids, positions, axis=1)

    self._search_block = search_block

  def search(self, query_indices: Optional[np.ndarray] = None,
             progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """kNN of the given rows (default: every row).

    Args:
      query_indices: ``(Q,)`` rows to search for.
      progress: tqdm bar (process 0).
    Returns:
      ``(neighbors (Q, k) int32, scores (Q, k) float32)``, best first.
    """
    rows, k, batch = self.rows, self.k, self.query_batch_size
    queries = np.arange(rows.num_rows) if query_indices is None else np.asarray(query_indices)
    neighbors = np.empty((len(queries), k), np.int32)
    scores_out = np.empty((len(queries), k), np.float32)
    bar = _tqdm(len(queries), 'knn (jax exact)', progress and jax.process_index() == 0)
    for first in range(0, len(queries), batch):
      stop = min(first + batch, len(queries))
      block_ids = queries[first:stop]
      query_block = np.zeros((batch, rows.dim), np.float32)
      query_block[:stop - first] = rows.query_rows(block_ids)
      query_ids = np.full(batch, -1, np.int32)
      query_ids[:stop - first] = block_ids
      scores, ids = self._search_block(
          parallel.replicate(query_block.astype(self.dtype), self.mesh),
          parallel.replicate(query_ids, self.mesh), self.database)
      neighbors[first:stop] = np.asarray(ids)[:stop - first]
      scores_out[first:stop] = np.asarray(scores)[:stop - first]
      bar.update(stop - first)
    bar.close()
    return neighbors, scores_out


def exact_knn_jax(features: FeatureInput, k: int, *, mesh: Optional[Mesh] = None,
                  query_indices: Optional[np.ndarray] = None, query_batch_size: int = 1024,
                  database_chunk_rows: int = 16384, dtype: Any = jnp.float32,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Exact kNN on the accelerators: ``JaxKnnIndex`` candidates ranked in float64 with index
  tie-break (``_exact_top_k``), so the result does not depend on ``query_batch_size``,
  ``database_chunk_rows`` or the device count.

  Returns:
    ``(neighbors (Q, k) int32, scores (Q, k) float32)`` for ``query_indices`` (default all N).
  """
  rows = FeatureRows(features)
  if rows.num_rows <= k:
    raise ValueError(f'kNN with k={k} needs more than {k} images, got {rows.num_rows}.')
  queries = np.arange(rows.num_rows) if query_indices is None else np.asarray(query_indices)
  indexes = {}

  def search(query_ids, num_candidates, show_progress):
    if num_candidates not in indexes:  # a wider search (near-ties) places the rows again
      indexes.clear()
      indexes[num_candidates] = JaxKnnIndex(
          features, num_candidates, mesh=mesh, query_batch_size=query_batch_size,
          database_chunk_rows=database_chunk_rows, dtype=dtype)
    ids, scores = indexes[num_candidates].search(query_ids, progress=show_progress)
    return np.where(np.isinf(scores), -1, ids), scores

  # Features stored in a narrower type are rounded once each before the float32 product.
  input_rounding = 0.0 if jnp.dtype(dtype) == jnp.float32 else float(jnp.finfo(dtype).eps)
  return _exact_top_k(rows, queries, k, search,
                      float32_rounding=_FLOAT32_ROUNDING + 2 * input_rounding / (rows.dim + 2),
                      progress=progress)


# ---------------------------------------------------------------------------------------------
# Group bags.
# ---------------------------------------------------------------------------------------------

def kmeans_groups(features: FeatureInput, num_clusters: int, *, iterations: int = 20,
                  seed: int = 0, max_points_per_centroid: int = 256,
                  batch_size: int = 65536, verbose: bool = True) -> np.ndarray:
  """faiss k-means cluster of every image.

  Centroids are trained on at most ``max_points_per_centroid * num_clusters`` sampled rows
  (faiss's own default subsampling); every image is then assigned to its nearest centroid.

  Args:
    features: ``(N, D)`` array or ``FeatureShards``.
    num_clusters: C.
    iterations: Lloyd iterations.
    seed: faiss seed.
    max_points_per_centroid: training subsample per centroid.
    batch_size: rows assigned per faiss call.
    verbose: faiss progress output.
  Returns:
    ``(N,)`` int32 cluster ids in ``[0, C)``.
  """
  faiss = faiss_module()
  rows = FeatureRows(features)
  if not 1 <= num_clusters <= rows.num_rows:
    raise ValueError(f'kmeans: num_clusters={num_clusters} must lie in [1, {rows.num_rows}].')
  sample_size = min(rows.num_rows, max_points_per_centroid * num_clusters)
  rng = np.random.default_rng(seed)
  sample = np.sort(rng.choice(rows.num_rows, size=sample_size, replace=False))
  kmeans = faiss.Kmeans(rows.dim, num_clusters, niter=iterations, seed=seed, verbose=verbose,
                        max_points_per_centroid=max_points_per_centroid)
  kmeans.train(rows.rows(sample))
  groups = np.empty(rows.num_rows, np.int32)
  for first in range(0, rows.num_rows, batch_size):
    stop = min(first + batch_size, rows.num_rows)
    _, assignment = kmeans.index.search(rows.block(first, stop), 1)
    groups[first:stop] = assignment[:, 0]
  return groups

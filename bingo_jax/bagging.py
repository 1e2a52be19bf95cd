"""Offline bagging: teacher features -> bags of similar images (docs/method.md §1).

``python -m bingo_jax.bagging --config configs/x.py --workdir DIR`` reads ``config.data`` (the
training split is bagged), ``config.teacher.path`` and ``config.bags``, and writes::

    DIR/features/          teacher features, float16 shards (resumable; bingo_jax.features)
    DIR/bags.npz           the bag file (or config.bags.path)        (bingo_jax.bag_file)
    DIR/bag_report.json    purity overall / per class, bag statistics  (bingo_jax.bag_report)
    DIR/bag_report.png     random anchors beside their bags

Methods (``config.bags.method``):

* ``knn``: exact inner-product search with faiss (cosine on L2-normalised features: the
  released code's flat L2 index ranks identically), k = 5, the anchor's own index excluded
  wherever it lands among ties (not "drop column 0", docs/method.md §1);
* ``approx``: a faiss index built with ``index_factory`` (IVF / HNSW, optional PCA), its
  recall@k against exact search printed on a sample of anchors;
* ``jax``: exact blockwise similarity + top-k on the accelerators, database rows sharded over
  the mesh, for hosts where faiss on the CPU would take hours;
* ``kmeans``: faiss k-means with C clusters, a bag being the anchor's cluster;
* ``labels``: ground-truth classes (the paper's upper bound);
* ``random-teacher``: ``knn`` on features of a randomly initialised network of the teacher's
  architecture (the paper's lower bound).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bingo_jax import bag_file
from bingo_jax import features as features_lib
from bingo_jax import parallel

METHODS = ('knn', 'approx', 'jax', 'kmeans', 'labels', 'random-teacher')
FeatureInput = Union[np.ndarray, features_lib.FeatureShards]


def _tqdm(total: int, desc: str, enabled: bool, unit: str = 'query'):
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, smoothing=0.1)


def _set_faiss_threads() -> None:
  import faiss
  faiss.omp_set_num_threads(os.cpu_count() or 1)


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
    if self._shards is None:
      return np.ascontiguousarray(self._array[indices], np.float32)
    size = self._shards.shard_size
    return np.stack([self._mapped[i // size][i % size] for i in indices]).astype(np.float32)


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
  float32 at once. Per block ``k + 1`` results are asked for, and the query's own index is
  removed wherever it appears (duplicated images tie with the anchor, so it need not be
  first); the ``k`` best remaining are the exact top-k over every other image.

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
  import faiss
  _set_faiss_threads()
  rows = FeatureRows(features)
  if rows.num_rows <= k:
    raise ValueError(f'kNN with k={k} needs more than {k} images, got {rows.num_rows}.')
  queries = np.arange(rows.num_rows) if query_indices is None else np.asarray(query_indices)
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
  return best_ids.astype(np.int32), best_scores


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
    ``(neighbors (N, k) int32, recall@k on the sample or None)``. An anchor for which the
    index returns fewer than ``k`` other images gets its best exact-search neighbours instead.
  """
  import faiss
  _set_faiss_threads()
  rows = FeatureRows(features)
  n = rows.num_rows
  nlist = 2 ** max(1, round(math.log2(4 * math.sqrt(n))))
  factory = index_factory.format(nlist=nlist)
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
  bar = _tqdm(n, f'knn (faiss {factory})', progress)
  for first in range(0, n, query_batch_size):
    query_ids = np.arange(first, min(first + query_batch_size, n))
    scores, ids = index.search(rows.block(first, query_ids[-1] + 1), k + 1)
    scores = np.where((ids == query_ids[:, None]) | (ids < 0), -np.inf, scores)
    scores, ids = _merge_top(scores, ids, k)
    neighbors[first:first + len(query_ids)] = ids
    incomplete.extend(query_ids[np.isinf(scores).any(axis=1)])
    bar.update(len(query_ids))
  bar.close()
  if incomplete:
    incomplete = np.asarray(incomplete)
    neighbors[incomplete] = exact_knn_faiss(features, k, query_indices=incomplete,
                                            progress=False)[0]
  print(f'approx kNN ({factory}, {search_parameters}): {time.perf_counter() - start_time:.1f} s'
        f'{f", {len(incomplete)} anchors completed by exact search" if len(incomplete) else ""}')
  recall = None
  if recall_sample:
    sample = np.sort(rng.choice(n, size=min(n, recall_sample), replace=False))
    exact = exact_knn_faiss(features, k, query_indices=sample, progress=False)[0]
    recall = knn_recall(neighbors[sample], exact)
    print(f'approx kNN recall@{k} against exact search on {len(sample)} anchors: {recall:.4f}')
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
      scores, ids = self._search_block(parallel.replicate(query_block.astype(self.dtype), self.mesh),
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
  """``JaxKnnIndex(features, k, ...).search(query_indices)``: see ``JaxKnnIndex``.

  Returns:
    ``(neighbors (Q, k) int32, scores (Q, k) float32)`` for ``query_indices`` (default all N).
  """
  index = JaxKnnIndex(features, k, mesh=mesh, query_batch_size=query_batch_size,
                      database_chunk_rows=database_chunk_rows, dtype=dtype)
  return index.search(query_indices, progress=progress)


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
  import faiss
  _set_faiss_threads()
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


# ---------------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _jitted_init(model: Any, image_size: int):
  # Cached per (model, size): a rerun in the same process (other method, same random
  # network) does not compile the initialisation again.
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(lambda rng: model.init(rng, images, train=False))


def random_teacher(teacher_config: dict, *, image_size: int, seed: int) -> Any:
  """A randomly initialised network of the given architecture (the paper's lower bound).

  Args:
    teacher_config: ``create_model`` keyword arguments (``None`` values dropped).
    image_size: input side used to initialise.
    seed: initialisation seed.
  Returns:
    A ``model_io.LoadedModel`` with ``metadata['random_init_seed']``.
  """
  from bingo_jax import model_io
  from bingo_jax.models import create_model
  model_config = {key: value for key, value in teacher_config.items() if value is not None}
  model = create_model(**model_config)
  variables = dict(_jitted_init(model, image_size)(jax.random.key(seed)))
  return model_io.LoadedModel(model=model, variables=variables, model_config=model_config,
                              metadata={'random_init_seed': seed})


def _teacher(config, image_size: int):
  """(loaded model, teacher metadata for the bag file) for the feature-based methods."""
  from bingo_jax import model_io
  bags_config = config.bags
  teacher_path = config.teacher.get('path')
  arch_config = dict(bags_config.get('random_teacher', {}) or {})
  # A random network also stands in for a missing teacher when bags.random_teacher.arch is set
  # (small demos on data without a converted teacher, e.g. Fashion-MNIST).
  if bags_config.method == 'random-teacher' or (not teacher_path and arch_config.get('arch')):
    if teacher_path:
      record = model_io.read_record(teacher_path)
      arch_config = {**record['model'], **{k: v for k, v in arch_config.items() if v is not None}}
    if not arch_config.get('arch'):
      raise ValueError('bags.method=random-teacher needs teacher.path (its architecture is '
                       'used) or bags.random_teacher.arch.')
    arch_config['head'] = None
    loaded = random_teacher(arch_config, image_size=image_size, seed=int(bags_config.seed))
    return loaded, {'path': None, 'random_init': arch_config, 'seed': int(bags_config.seed)}
  if not teacher_path:
    raise ValueError(f'bags.method={bags_config.method} needs teacher.path (a converted model '
                     'file, tools/convert_torch_teacher.py).')
  loaded = model_io.load_model(teacher_path)
  return loaded, {'path': os.path.abspath(teacher_path),
                  'description': features_lib.describe_model(loaded)}


def compute_bags(config, workdir: str, *, source=None, mesh: Optional[Mesh] = None,
                 progress: bool = True) -> tuple[bag_file.Bags, str]:
  """Runs the whole stage for ``config``: features, bags, bag file, report.

  Args:
    config: the experiment config (``data``, ``teacher``, ``bags`` sections).
    workdir: output directory.
    source: the image source (default: ``data_sources.make_source(config.data,
      config.data.train_split)``).
    mesh: device mesh for the feature pass and the ``jax`` method (default: all devices).
    progress: tqdm bars.
  Returns:
    ``(bags, path of the bag file)``.
  """
  from bingo_jax import bag_report
  bags_config = config.bags
  method = bags_config.method
  if method not in METHODS:
    raise ValueError(f'config.bags.method={method!r}; expected one of {METHODS}.')
  if source is None:
    from bingo_jax import data_sources
    source = data_sources.make_source(config.data, config.data.train_split)
  os.makedirs(workdir, exist_ok=True)
  bag_path = bags_config.get('path') or os.path.join(workdir, 'bags.npz')
  is_writer = jax.process_index() == 0
  common = dict(fingerprint=source.fingerprint, data=_describe_data(config))
  k = int(bags_config.k)
  image_size = int(bags_config.get('image_size') or config.data.image_size)

  if method == 'labels':
    if source.labels is None:
      raise ValueError(f'bags.method=labels but the source {source!r} has no labels.')
    bags = bag_file.Bags.from_groups(source.labels, method='labels', **common)
  else:
    teacher, teacher_record = _teacher(config, image_size)
    features_dir = bags_config.get('features_dir') or os.path.join(
        workdir, 'features-random' if teacher_record['path'] is None else 'features')
    started = time.perf_counter()
    features = features_lib.extract_features(
        teacher, source, image_size=image_size, global_batch_size=int(bags_config.batch_size),
        mesh=mesh, output_dir=features_dir, shard_size=int(bags_config.shard_size),
        progress=progress)
    print(f'features: {features.num_images} x {features.feature_dim} in {features_dir} '
          f'({time.perf_counter() - started:.1f} s)')
    common.update(teacher=teacher_record, feature_dim=features.feature_dim,
                  image_size=image_size)
    started = time.perf_counter()
    settings = {'kmeans': {'num_clusters': int(bags_config.num_clusters)},
                'approx': {'k': k, 'index': bags_config.approx_index,
                           'search_parameters': bags_config.approx_search_parameters}
                }.get(method, {'k': k})
    # Decided on process 0 for all: a process that alone skipped the jax search would leave
    # the others waiting in its collectives.
    bags = _existing_bags(bag_path, dict(common, method=method, num_images=len(source),
                                         **settings)) if is_writer else None
    if bool(multihost_utils.broadcast_one_to_all(np.array(bags is not None))):
      print(f'bag file {bag_path} already holds these bags (same method, settings, teacher and '
            'images): kept. Delete it to recompute.')
    elif method == 'jax':
      neighbors, _ = exact_knn_jax(features, k, mesh=mesh,
                                   query_batch_size=int(bags_config.query_batch_size),
                                   progress=progress)
      bags = bag_file.Bags.from_neighbors(neighbors, method=method, **common)
    elif not is_writer:
      bags = None  # faiss methods run on process 0 only.
    elif method in ('knn', 'random-teacher'):
      neighbors, _ = exact_knn_faiss(features, k, progress=progress,
                                     query_batch_size=int(bags_config.query_batch_size))
      bags = bag_file.Bags.from_neighbors(neighbors, method=method, **common)
    elif method == 'approx':
      neighbors, recall = approx_knn_faiss(
          features, k, index_factory=bags_config.approx_index,
          search_parameters=bags_config.approx_search_parameters,
          recall_sample=int(bags_config.approx_recall_sample), seed=int(bags_config.seed),
          progress=progress)
      bags = bag_file.Bags.from_neighbors(
          neighbors, method=method, index=bags_config.approx_index,
          search_parameters=bags_config.approx_search_parameters, recall_at_k=recall, **common)
    else:  # kmeans
      groups = kmeans_groups(features, int(bags_config.num_clusters),
                             iterations=int(bags_config.kmeans_iterations),
                             seed=int(bags_config.seed))
      bags = bag_file.Bags.from_groups(groups, method=method,
                                       num_clusters=int(bags_config.num_clusters), **common)
    print(f'bags ({method}): {time.perf_counter() - started:.1f} s')

  if is_writer:
    if bags.path is None:
      bag_path = bag_file.save_bags(bag_path, bags)
    print(f'bag file: {bag_path}')
    bag_report.write_report(bags, source, workdir, num_anchors=int(bags_config.report_anchors),
                            members_shown=int(bags_config.report_members),
                            seed=int(bags_config.seed),
                            class_names=bags_config.get('class_names'))
  multihost_utils.sync_global_devices('bingo_jax.bagging: bag file written')
  return bags if bags is not None else bag_file.load_bags(bag_path), bag_path


def _existing_bags(path: str, expected: dict) -> Optional[bag_file.Bags]:
  """The bag file at ``path`` if its metadata has every ``expected`` value, else None."""
  if not os.path.isfile(path):
    return None
  try:
    bags = bag_file.load_bags(path)
  except ValueError:
    return None  # unreadable: recompute and replace it
  same = all(json.dumps(bags.metadata.get(key), sort_keys=True) ==
             json.dumps(value, sort_keys=True) for key, value in expected.items())
  return bags if same else None


def _describe_data(config) -> dict:
  data = config.data
  return {key: data.get(key) for key in ('source', 'name', 'path', 'train_split')
          if data.get(key) is not None}


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------

def main(argv) -> None:
  from absl import flags
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  _, path = compute_bags(config, workdir)
  print(f'done: {path}')


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Output directory (features, bag file, report).')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)

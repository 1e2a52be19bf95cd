r"""The exact kNN of the jax bagging backend on random features, and its projection to ImageNet.

  python -m bench.exact_knn                        # 262,144 x 4,096, k = 5, float32
  python -m bench.exact_knn --dtypes float32,bfloat16 --budget_s 120
  python -m bench.exact_knn --smoke                # 4,096 x 64 on the CPU

``knn_backends.JaxKnnIndex`` (what ``python -m bingo_jax.bagging`` runs with ``method='jax'``)
searches every row against all others on random L2-normalised features. Exact search costs
``2 N^2 d`` FLOPs, so the time of N images projects to ImageNet's 1.28M by ``(1.28M / N)^2``
(the same d, the database spread over the same devices). When ``--budget_s`` runs out before
every row is searched, the time is that of the anchors searched, scaled linearly to all N
(exact search time is linear in the number of anchors), and the table says so.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bingo_jax.bags import knn_backends
from bingo_jax.data import parallel

IMAGENET_IMAGES = 1_281_167


def random_features(num_rows: int, dim: int, seed: int = 0) -> np.ndarray:
  """``(num_rows, dim)`` float32 rows drawn uniformly on the unit sphere."""
  features = np.random.default_rng(seed).standard_normal((num_rows, dim), dtype=np.float32)
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  return features


def time_search(features: np.ndarray, k: int, dtype, budget_s: float, query_batch_size: int,
                database_chunk_rows: int) -> dict:
  """Builds the index, then searches blocks of anchors until all are done or the budget ends.

  Returns:
    ``{'setup': s (database placement and the first block's compilation), 'anchors': timed
    anchors, 'seconds': their search time}``.
  """
  num_rows = features.shape[0]
  began = time.perf_counter()
  index = knn_backends.JaxKnnIndex(features, k, mesh=parallel.make_mesh(),
                                   query_batch_size=query_batch_size,
                                   database_chunk_rows=database_chunk_rows, dtype=dtype)
  index.search(np.arange(query_batch_size), progress=False)  # compiles
  setup = time.perf_counter() - began
  # Blocks of 16 query batches: each search call ends with its results on the host.
  block = 16 * query_batch_size
  began = time.perf_counter()
  searched = 0
  while searched < num_rows and time.perf_counter() - began < budget_s:
    stop = min(searched + block, num_rows)
    index.search(np.arange(searched, stop), progress=False)
    searched = stop
  return {'setup': setup, 'anchors': searched, 'seconds': time.perf_counter() - began}


_SMOKE = flags.DEFINE_bool('smoke', False, '4,096 x 64 features, CPU-sized.')
_NUM_FEATURES = flags.DEFINE_integer('num_features', None, 'N (default 262,144; smoke 4,096).')
_DIM = flags.DEFINE_integer('dim', None, 'd (default 4,096; smoke 64).')
_K = flags.DEFINE_integer('k', 5, 'Neighbours per anchor.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32'], 'Storage and matmul dtypes, one row each '
                            '(float32 runs at Precision.HIGHEST).')
_BUDGET_S = flags.DEFINE_float('budget_s', 60.0, 'Search time per row before the remaining '
                               'anchors are left out (the time is then scaled).')


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  smoke = _SMOKE.value
  num_rows = _NUM_FEATURES.value or (4096 if smoke else 262_144)
  dim = _DIM.value or (64 if smoke else 4096)
  k = _K.value
  query_batch_size, chunk_rows = (256, 1024) if smoke else (1024, 16384)
  for name in _DTYPES.value:
    if name not in ('float32', 'bfloat16'):
      raise app.UsageError(f'--dtypes entry {name!r}: expected float32 or bfloat16.')
  devices = jax.devices()
  began = time.perf_counter()
  features = random_features(num_rows, dim)
  print(f'# Exact kNN (bingo_jax.bags.knn_backends.JaxKnnIndex), k = {k}, {num_rows:,} random '
             f'L2-normalised {dim}-d features ({time.perf_counter() - began:.0f} s to draw), '
             f'{len(devices)} x {devices[0].device_kind}; 1.28M = ImageNet\'s {IMAGENET_IMAGES:,}')
  print('| dtype | N | d | anchors timed | placement + compile (s) | search, all N anchors (s) '
        '| TFLOP/s | projected to 1.28M images (min) |')
  print('|---|---|---|---|---|---|---|---|', flush=True)
  for name in _DTYPES.value:
    row = time_search(features, k, jnp.dtype(name), _BUDGET_S.value, query_batch_size,
                      chunk_rows)
    all_anchors = row['seconds'] * num_rows / row['anchors']
    flops = 2.0 * num_rows * num_rows * dim
    projected = all_anchors * (IMAGENET_IMAGES / num_rows) ** 2
    timed = (f'{row["anchors"]:,}' if row['anchors'] == num_rows else
             f'{row["anchors"]:,} (scaled)')
    print(f'| {name} | {num_rows:,} | {dim} | {timed} | {row["setup"]:.1f} | '
          f'{all_anchors:.1f} | {flops / all_anchors / 1e12:.3g} | {projected / 60:.1f} |',
          flush=True)
  print(f'# done in {time.perf_counter() - began:.0f} s, load average {os.getloadavg()[0]:.2f}')
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))

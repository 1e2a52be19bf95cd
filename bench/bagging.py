"""Benchmark of the bagging stage: teacher features/s and kNN search time / memory per backend.

  /work/venv/bin/python -m bench.bagging            # the whole table (~14 min on the shared 2-core CPU)
  /work/venv/bin/python -m bench.bagging --quick    # N = 10k only

Every case runs in its own subprocess so that its peak resident memory is its own. Search
cases use random L2-normalised float32 features. Exact search costs N x N x d, so for large N
only ``--queries`` anchors are searched against the full database and the time is scaled
linearly to all N anchors (exact search time is linear in the number of queries); the table
says which rows are scaled. Peak memory is the process's peak RSS minus its RSS after the
imports, so it includes the N x d float32 feature matrix itself.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags



def _rss_mb() -> float:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_features_case(arch: str, base_width: int, image_size: int, batch: int,
                      batches: int) -> dict:
  """Teacher forward throughput (eval mode, centre-cropped uint8 batches, jitted)."""
  import jax
  import numpy as np
  from bingo_jax.bags import features as features_lib
  from bingo_jax.data import parallel
  from bingo_jax.models import create_model, init_variables
  from bingo_jax.store import model_io
  config = dict(arch=arch, base_width=base_width)
  model = create_model(**config)
  loaded = model_io.LoadedModel(model, init_variables(model, jax.random.key(0), image_size),
                                config, {})
  mesh = parallel.make_mesh()
  forward = features_lib.make_forward(model, mesh, normalize_features=True)
  variables = parallel.replicate(loaded.variables, mesh)
  rng = np.random.default_rng(0)
  batch_data = {'image': rng.integers(0, 256, (batch, image_size, image_size, 3), np.uint8),
                'index': np.arange(batch, dtype=np.int32), 'mask': np.ones(batch, bool)}
  start = time.perf_counter()
  jax.block_until_ready(forward(variables, parallel.global_batch(batch_data, mesh)))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(batches):
    jax.block_until_ready(forward(variables, parallel.global_batch(batch_data, mesh)))
  seconds = time.perf_counter() - start
  return {'images_per_s': batch * batches / seconds, 'compile_s': compile_s,
          'feature_dim': model.feature_dim}


def run_search_case(backend: str, n: int, d: int, queries: int, k: int = 5) -> dict:
  import numpy as np
  from bingo_jax.bags import knn_backends
  baseline = _rss_mb()
  rng = np.random.default_rng(0)
  features = np.empty((n, d), np.float32)
  for start in range(0, n, 8192):  # in blocks: no float64 temporary of the whole matrix
    block = rng.standard_normal((min(8192, n - start), d), dtype=np.float32)
    features[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
  queries = min(queries, n)
  query_indices = np.arange(queries)
  result = {}
  start = time.perf_counter()
  if backend == 'faiss':
    knn_backends.exact_knn_faiss(features, k, query_indices=query_indices, progress=False)
  elif backend == 'jax':
    # Database placement and compilation once, reported apart; then the timed search.
    index = knn_backends.JaxKnnIndex(features, k, query_batch_size=min(1024, queries))
    index.search(query_indices[:1], progress=False)
    result['setup_s'] = time.perf_counter() - start
    start = time.perf_counter()
    index.search(query_indices, progress=False)
  elif backend == 'approx':
    result.update(_approx_case(features, k, queries))
  else:
    raise ValueError(backend)
  seconds = time.perf_counter() - start
  result.update(seconds=seconds, seconds_all_queries=seconds * n / queries,
                scaled=queries < n, queries=queries,
                peak_mb=_peak_rss_mb() - baseline, features_mb=n * d * 4 / 2**20)
  return result


def _approx_case(features, k: int, queries: int) -> dict:
  """IVF-Flat (nlist = 4 sqrt(N), nprobe 32): train + add on all N, search ``queries``."""
  import numpy as np
  from bingo_jax.bags import knn_backends
  faiss = knn_backends.faiss_module()
  n, d = features.shape
  nlist = knn_backends.ivf_nlist(n)
  start = time.perf_counter()
  index = faiss.index_factory(d, f'IVF{nlist},Flat', faiss.METRIC_INNER_PRODUCT)
  rng = np.random.default_rng(0)
  index.train(features[np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))])
  index.add(features)
  build_s = time.perf_counter() - start
  faiss.ParameterSpace().set_index_parameters(index, 'nprobe=32')
  start = time.perf_counter()
  _, found = index.search(features[:queries], k + 1)
  search_s = time.perf_counter() - start
  sample = min(queries, 200)
  exact, _ = knn_backends.exact_knn_faiss(features, k, query_indices=np.arange(sample), progress=False)
  found = np.array([[j for j in row if j != i][:k] for i, row in enumerate(found[:sample])])
  return {'build_s': build_s, 'search_s': search_s, 'nlist': nlist,
          'recall': knn_backends.knn_recall(found, exact),
          'approx_total_all_queries': build_s + search_s * n / queries}


def run_real_features_case(directory: str, k: int = 5) -> dict:
  """Exact vs approximate search on real features (recall depends on their structure)."""
  import numpy as np
  from bingo_jax.bags import features as features_lib
  from bingo_jax.bags import knn_backends
  shards = features_lib.open_feature_shards(directory)
  features = shards.load()
  start = time.perf_counter()
  exact, _ = knn_backends.exact_knn_faiss(features, k, progress=False)
  exact_s = time.perf_counter() - start
  start = time.perf_counter()
  found, _ = knn_backends.approx_knn_faiss(features, k, recall_sample=0, progress=False)
  approx_s = time.perf_counter() - start
  n = features.shape[0]
  return {'n': n, 'd': features.shape[1], 'exact_s': exact_s, 'approx_s': approx_s,
          'nlist': knn_backends.ivf_nlist(n),
          'recall': knn_backends.knn_recall(found, exact)}


def _child(args: list[str]) -> dict:
  output = subprocess.run(
      [sys.executable, os.path.abspath(__file__), '--child=' + ','.join(args)],
      capture_output=True, text=True)
  if output.returncode:
    raise RuntimeError(f'case {args} failed:\n{output.stderr[-3000:]}')
  return json.loads(output.stdout.strip().splitlines()[-1])


_QUICK = flags.DEFINE_bool('quick', False, 'N = 10k only, small model only.')
_BACKENDS = flags.DEFINE_list('backends', ['faiss', 'approx', 'jax'], 'kNN backends to time.')
_SIZES = flags.DEFINE_list('sizes', ['10000', '100000'], 'N values.')
_DIMS = flags.DEFINE_list('dims', ['2048', '4096'], 'd values.')
_SKIP_FEATURES = flags.DEFINE_bool('skip_features', False, 'No teacher throughput rows.')
_FEATURES_DIR = flags.DEFINE_string(
    'features_dir', None, 'Also compare exact and approx search on real features: a shard '
    'directory written by the feature pass (e.g. WORKDIR/features).')
_CHILD = flags.DEFINE_list('child', None, 'Internal: one measurement in a fresh process.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CHILD.value:
    kind, *rest = _CHILD.value
    if kind == 'features':
      arch, width, size, batch, batches = rest
      result = run_features_case(arch, int(width), int(size), int(batch), int(batches))
    elif kind == 'real':
      result = run_real_features_case(rest[0])
    else:
      backend, n, d, queries = rest
      result = run_search_case(backend, int(n), int(d), int(queries))
    print(json.dumps(result))
    return

  import platform
  cores = os.cpu_count()
  print(f'machine: {platform.processor() or platform.machine()}, {cores} CPU cores '
        f'(shared), {os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30:.0f} GiB')
  print('\n## Teacher features/s (eval forward, jit, 1 CPU device, random weights)\n')
  print('| network | input | batch | images/s | compile s |')
  print('|---|---|---|---|---|')
  feature_cases = [('resnet50', 16, 112, 32, 3, 'ResNet-50 width 16 (small)')]
  if not _QUICK.value:
    feature_cases.append(('resnet50', 64, 224, 16, 2, 'ResNet-50 (full size)'))
  if _SKIP_FEATURES.value:
    feature_cases = []
  for arch, width, size, batch, batches, name in feature_cases:
    r = _child(['features', arch, str(width), str(size), str(batch), str(batches)])
    print(f'| {name}, {r["feature_dim"]}-d | {size} px | {batch} | {r["images_per_s"]:.1f} | '
          f'{r["compile_s"]:.1f} |', flush=True)

  print('\n## kNN search, k = 5, random normalised float32 features\n')
  print('| backend | N | d | anchors timed | time, all N anchors (s) | peak RSS (MiB) | '
        'features (MiB) | notes |')
  print('|---|---|---|---|---|---|---|---|')
  sizes = [10_000] if _QUICK.value else [int(v) for v in _SIZES.value]
  for n in sizes:
    for d in [int(v) for v in _DIMS.value]:
      for backend in _BACKENDS.value:
        # Anchors actually searched (the rest is scaled): keeps the run near 10 minutes.
        queries = min(n, 10_000 if n <= 10_000 else 1000)
        if backend == 'jax':
          queries = min(n, 4096 if n <= 10_000 else 1024)
        if backend == 'approx':
          queries = min(n, 10_000 if n <= 10_000 else 5000)
        r = _child(['search', backend, str(n), str(d), str(queries)])
        notes = 'scaled from the timed anchors' if r['scaled'] else ''
        if backend == 'jax':
          notes = (f'+ {r["setup_s"]:.1f} s database placement and compilation'
                   + ('; search scaled' if r['scaled'] else ''))
        if backend == 'approx':
          notes = (f'IVF{r["nlist"]},Flat nprobe 32: build {r["build_s"]:.1f} s, recall@5 '
                   f'{r["recall"]:.3f}' + ('; search scaled' if r['scaled'] else ''))
          total = r['approx_total_all_queries']
        else:
          total = r['seconds_all_queries']
        print(f'| {backend} | {n} | {d} | {r["queries"]} | {total:.1f} | {r["peak_mb"]:.0f} | '
              f'{r["features_mb"]:.0f} | {notes} |', flush=True)

  if _FEATURES_DIR.value:
    r = _child(['real', _FEATURES_DIR.value])
    print(f'\n## Real features ({_FEATURES_DIR.value}: {r["n"]} x {r["d"]})\n')
    print('| backend | time (s) | recall@5 vs exact |')
    print('|---|---|---|')
    print(f'| faiss exact | {r["exact_s"]:.1f} | 1 |')
    print(f'| faiss IVF{r["nlist"]},Flat nprobe 32 | {r["approx_s"]:.1f} | {r["recall"]:.3f} |')


if __name__ == '__main__':
  app.run(main)

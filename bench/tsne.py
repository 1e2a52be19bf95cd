"""Benchmark of the t-SNE map of the analysis protocol (paper Fig. 4): time and map quality.

  python -m bench.tsne                       # scikit-learn (Barnes-Hut), n = 1000
  python -m bench.tsne --exact               # also scikit-learn's exact t-SNE
  python -m bench.tsne --sizes 1000,2000     # more sizes
  python -m bench.tsne --jax_from 8233693    # also the exact JAX t-SNE this repository had
                                             # before it used scikit-learn (loaded from git)

Points: ``n`` features of dimension 64 drawn around 10 well-separated class centres (the
protocol's default is 10 classes x 100 images = 1000 points). Quality: trustworthiness (5
neighbours, ``sklearn.manifold.trustworthiness``) and how often a point's nearest neighbour in
the map has its class. Times include JAX compilation (once per size, as in the protocol).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import tempfile
import time

import numpy as np
from absl import app, flags


def clustered_points(n: int, dim: int = 64, classes: int = 10, seed: int = 0):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % classes
  centres = rng.normal(scale=4.0, size=(classes, dim))
  return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def nearest_neighbour_agreement(embedding: np.ndarray, labels: np.ndarray) -> float:
  squared = ((embedding[:, None] - embedding[None]) ** 2).sum(-1)
  np.fill_diagonal(squared, np.inf)
  return float(np.mean(labels[squared.argmin(1)] == labels))


def old_jax_tsne(revision: str):
  """``tsne`` of ``bingo_jax/eval/analysis.py`` at a git revision (the former JAX version)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  source = subprocess.run(['git', 'show', f'{revision}:bingo_jax/eval/analysis.py'], cwd=root,
                          check=True, capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), 'old_analysis.py')
  with open(path, 'w') as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location('old_analysis', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.tsne


_SIZES = flags.DEFINE_list('sizes', ['1000'], 'Numbers of points, comma-separated.')
_JAX_FROM = flags.DEFINE_string('jax_from', None,
                                'Git revision whose analysis.tsne (JAX, exact) is timed too.')
_EXACT = flags.DEFINE_bool('exact', False, 'Also sklearn method=exact.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from sklearn.manifold import trustworthiness
  from bingo_jax.eval import analysis

  implementations = [
      ('sklearn barnes_hut, 1 OpenMP thread (analysis.tsne)', analysis.tsne),
      ('sklearn barnes_hut, all cores', functools.partial(analysis.tsne, num_threads=None))]
  if _EXACT.value:
    from sklearn.manifold import TSNE
    implementations.append((
        'sklearn exact', lambda x, perplexity, seed: TSNE(
            perplexity=perplexity, method='exact', init='pca', learning_rate='auto',
            random_state=seed).fit_transform(x)))
  if _JAX_FROM.value:
    implementations.append((f'JAX exact (git {_JAX_FROM.value})', old_jax_tsne(_JAX_FROM.value)))

  print(f'load average at start: {os.getloadavg()}  cpus: {os.cpu_count()}')
  print('| n | implementation | seconds | trustworthiness@5 | 1-NN class agreement | load |')
  print('|---|---|---|---|---|---|')
  for n in map(int, _SIZES.value):
    points, labels = clustered_points(n)
    for name, tsne in implementations:
      start = time.perf_counter()
      embedding = np.asarray(tsne(points, perplexity=30.0, seed=0))
      seconds = time.perf_counter() - start
      trust = trustworthiness(points, embedding, n_neighbors=5)
      print(f'| {n} | {name} | {seconds:.1f} | {trust:.4f} '
            f'| {nearest_neighbour_agreement(embedding, labels):.3f} '
            f'| {os.getloadavg()[0]:.1f} |', flush=True)


if __name__ == '__main__':
  app.run(main)

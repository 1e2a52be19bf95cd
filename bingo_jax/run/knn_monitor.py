"""A kNN monitor during training: how well the student's features classify, every few epochs.

Every ``config.train.monitor_every_epochs`` epochs the training loop hands the student's
current variables to ``KnnMonitor.evaluate``. It computes the centre-crop pooled features of
two fixed, labelled image subsets, the *bank* (``monitor_bank_size`` images of the labelled
training split, ``eval.train_split`` or ``data.train_split``) and the *queries*
(``monitor_eval_size`` images of ``data.eval_split``), and classifies the queries with the
weighted kNN vote of ``bingo_jax/eval/knn.py`` (``eval.knn_weighted_k`` neighbours, weights
``exp(similarity / eval.knn_temperature)``) and its ``eval.knn_k`` majority vote. Labels are
only read for this measurement; training never sees them.

The subsets are drawn once, uniformly without replacement with ``config.train.seed``, and
sorted, so every evaluation of a run (and of its resumed continuation) uses the same images;
a uniform draw rather than the first images, because folder sources list images class by
class. The monitor is off (``from_config`` returns None) when ``monitor_every_epochs`` is 0 or
either split has no labels.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from bingo_jax.bags import features as features_lib
from bingo_jax.data import sources as data_sources
from bingo_jax.eval import knn
from bingo_jax.store import model_io

PREFIX = 'monitor/'


class IndexedSubset:
  """The images ``indices`` of ``base`` (in that order), as a duck-typed image source.

  Provides what the feature pass reads (``input_pipeline.make_eval_dataset`` through
  ``features.SubsetSource``): length, labels, identifiers and the tf.data read hooks.
  """

  def __init__(self, base: Any, indices: np.ndarray, description: str):
    self.base = base
    self.indices = np.asarray(indices, np.int64)
    self.description = description
    self.encoded = base.encoded
    self.image_shape = base.image_shape
    self.num_classes = base.num_classes
    base_labels = base.labels
    self.labels = None if base_labels is None else np.asarray(base_labels)[self.indices]

  def __len__(self) -> int:
    return len(self.indices)

  def identifiers(self) -> Iterable[str]:
    identifiers = list(self.base.identifiers())
    if len(identifiers) != len(self.base):  # sources without per-image names (arrays)
      return (f'#{i}' for i in self.indices)
    return (identifiers[i] for i in self.indices)

  @property
  def fingerprint(self) -> str:
    # The base's fingerprint and the drawn indices name the subset (bases may have no
    # per-image identifiers).
    return data_sources.fingerprint_of(
        [self.base.fingerprint] + [str(i) for i in self.indices.tolist()])

  def read(self, index: int) -> np.ndarray:
    return self.base.read(int(self.indices[index]))

  def _base_indices(self, indices):
    import tensorflow as tf
    # A new constant per call: each tf.data map traces its own graph.
    return tf.gather(tf.constant(self.indices), tf.cast(indices, tf.int64))

  def tf_read_batch(self, indices):
    return self.base.tf_read_batch(self._base_indices(indices))

  def tf_read_labeled_batch(self, indices):
    return self.base.tf_read_labeled_batch(self._base_indices(indices))


def is_due(step: int, steps_per_epoch: int, every_epochs: int) -> bool:
  """True after the last step of every ``every_epochs``-th epoch (never when it is 0)."""
  return every_epochs > 0 and step > 0 and step % (every_epochs * steps_per_epoch) == 0


def draw_subset(num_images: int, size: int, seed: int) -> np.ndarray:
  """``min(size, num_images)`` distinct indices of ``[0, num_images)``, sorted (int64)."""
  rng = np.random.default_rng(seed)
  size = min(int(size), num_images)
  return np.sort(rng.choice(num_images, size, replace=False)).astype(np.int64)


class KnnMonitor:
  """Weighted kNN top-1 of the student's features on fixed labelled subsets (module docstring).
  """

  def __init__(self, bank: Any, queries: Any, *, image_size: int, batch_size: int, k: int,
               weighted_k: int, temperature: float, mesh: jax.sharding.Mesh):
    """
    Args:
      bank: labelled image source of the kNN bank (e.g. an ``IndexedSubset``).
      queries: labelled image source of the classified images.
      image_size: centre-crop side.
      batch_size: global batch of the feature pass (rounded up to the mesh size).
      k: neighbours of the majority vote (at most the bank size).
      weighted_k: neighbours of the weighted vote (at most the bank size).
      temperature: T of the weighted vote.
      mesh: the training mesh.
    """
    for source in (bank, queries):
      if source.labels is None:
        raise ValueError(f'The kNN monitor needs labels; {source.description} has none.')
    self.bank, self.queries = bank, queries
    self.image_size = image_size
    num_devices = mesh.devices.size
    self.batch_size = -(-batch_size // num_devices) * num_devices
    self.k = min(k, len(bank))
    self.weighted_k = min(weighted_k, len(bank))
    self.temperature = temperature
    self.mesh = mesh
    self.num_classes = int(max(bank.num_classes or 0, queries.num_classes or 0,
                               int(np.max(bank.labels)) + 1, int(np.max(queries.labels)) + 1))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  mesh: jax.sharding.Mesh) -> Optional['KnnMonitor']:
    """The monitor ``config`` asks for, or None when it is off (see the module docstring)."""
    train = config.train
    every = train.get('monitor_every_epochs', 0) or 0
    if every <= 0:
      return None
    bank_split = config.eval.get('train_split') or config.data.train_split
    eval_split = config.data.eval_split
    bank_source = data_sources.make_source(config.data, bank_split)
    if bank_source.labels is None:
      logging.info('kNN monitor off: split %r (%s) has no labels.', bank_split,
                   bank_source.description)
      return None
    eval_source = data_sources.make_source(config.data, eval_split)
    if eval_source.labels is None:
      logging.info('kNN monitor off: split %r (%s) has no labels.', eval_split,
                   eval_source.description)
      return None
    seed = train.seed
    bank = IndexedSubset(bank_source, draw_subset(len(bank_source), train.monitor_bank_size,
                                                  seed),
                         f'{bank_source.description} (monitor bank)')
    queries = IndexedSubset(eval_source, draw_subset(len(eval_source),
                                                     train.monitor_eval_size, seed + 1),
                            f'{eval_source.description} (monitor queries)')
    logging.info('kNN monitor every %d epochs: %d bank images of %r, %d queries of %r.', every,
                 len(bank), bank_split, len(queries), eval_split)
    return cls(bank, queries, image_size=config.data.image_size,
               batch_size=config.eval.batch_size, k=config.eval.knn_k,
               weighted_k=config.eval.knn_weighted_k,
               temperature=config.eval.knn_temperature, mesh=mesh)

  def features(self, model: Any, variables: dict) -> tuple[np.ndarray, np.ndarray]:
    """Unnormalised pooled features ``(bank (n_bank, D), queries (n_queries, D))``."""
    loaded = model_io.LoadedModel(model=model, variables=variables, model_config={},
                                  metadata={'source': 'training state (kNN monitor)'})
    extract = lambda source: features_lib.extract_features(  # noqa: E731
        loaded, source, image_size=self.image_size, global_batch_size=self.batch_size,
        mesh=self.mesh, normalize_features=False, progress=False)
    return extract(self.bank), extract(self.queries)

  def evaluate(self, model: Any, variables: dict) -> dict[str, float]:
    """kNN accuracies of the student with ``variables``.

    Args:
      model: the student network (``create_model``); only its pooled features are used.
      variables: ``{'params': ..., 'batch_stats': ...}`` (BatchNorm in eval mode).
    Returns:
      ``{'monitor/weighted_knn{K}_top1', 'monitor/knn{k}_top1', 'monitor/seconds'}``,
      accuracies in percent.
    """
    started = time.perf_counter()
    bank_features, query_features = self.features(model, variables)
    result = knn.knn_evaluate(bank_features, self.bank.labels, query_features,
                              self.queries.labels, num_classes=self.num_classes, k=self.k,
                              weighted_k=self.weighted_k, temperature=self.temperature,
                              mesh=self.mesh, progress=False)
    metrics = {f'{PREFIX}weighted_knn{self.weighted_k}_top1':
                   result[f'weighted_knn{self.weighted_k}_top1'],
               f'{PREFIX}knn{self.k}_top1': result[f'knn{self.k}_top1']}
    metrics[f'{PREFIX}seconds'] = time.perf_counter() - started
    return metrics

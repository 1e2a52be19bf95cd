"""Student relation (paper Table 8 rows 2 and 5): bags recomputed from the student's own
features during training (``config.bags.source = 'student'``; docs/method.md §1).

At the start of epochs 0, N, 2N, ... (``N = config.bags.refresh_every_epochs``) the student
embeds the whole training set exactly as the teacher does for offline bagging
(``features.extract_features``: centre crops, eval-mode BatchNorm, the backbone's pooled
features scaled to unit length), and its ``config.bags.k`` nearest neighbours
(``knn_backends``: ``bags.method = 'knn'`` faiss exact search, or ``'jax'`` on the
accelerators) replace the bag table the data feed samples positives from. The first bags, at
step 0, come from the initial student: random-network bags of the student's architecture.

Resume is exact: each refresh's table is written to ``WORKDIR/student_bags/epoch_EEEEE.npz``
(atomically, before any step that uses it runs), so a run resumed between two refreshes reads
the table of the last one, and a run resumed at a refresh step recomputes it from the
restored state, which is the state the uninterrupted run computed it from.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from bingo_jax.bags import bag_file
from bingo_jax.bags import features as features_lib
from bingo_jax.bags import knn_backends
from bingo_jax.store import fileio
from bingo_jax.store import model_io

SOURCE_FILE, SOURCE_STUDENT = 'file', 'student'
BAGS_DIRECTORY = 'student_bags'
METHOD = 'student-knn'


def uses_student_bags(config: ml_collections.ConfigDict) -> bool:
  """``config.bags.source == 'student'`` (default ``'file'``: a bag file, or no bags)."""
  return config.bags.get('source', SOURCE_FILE) == SOURCE_STUDENT


def bag_path(workdir: str, epoch: int) -> str:
  """``WORKDIR/student_bags/epoch_EEEEE.npz``: the table refreshed at ``epoch``."""
  return fileio.join(workdir, BAGS_DIRECTORY, f'epoch_{epoch:05d}.npz')


def compute_student_bags(config: ml_collections.ConfigDict, student_model: nn.Module,
                         variables: Any, source: Any, mesh: jax.sharding.Mesh,
                         **metadata: Any) -> bag_file.Bags:
  """kNN bags of ``source`` in the feature space of the student ``variables``.

  Args:
    config: ``bags.k``, ``bags.method`` ('knn' or 'jax'), ``bags.batch_size``,
      ``bags.image_size`` (else ``data.image_size``), ``bags.query_batch_size``.
    student_model: the student network.
    variables: ``{'params', 'batch_stats'}`` of the student.
    source: the training images.
    mesh: the device mesh.
    **metadata: further record of the bag file (the refresh's epoch and step).
  Returns:
    Fixed-size ``Bags`` ``(N, k)``, method ``'student-knn'``, on every process.
  """
  bags_config = config.bags
  k = int(bags_config.k)
  image_size = int(bags_config.get('image_size') or config.data.image_size)
  started = time.perf_counter()
  features = features_lib.extract_features(
      model_io.LoadedModel(model=student_model, variables=variables, model_config={},
                           metadata={}),
      source, image_size=image_size, global_batch_size=int(bags_config.batch_size), mesh=mesh,
      progress=False)
  # Every process holds every feature row and searches them all (the same neighbours), so
  # no process waits on another's result.
  if bags_config.method == 'jax':
    neighbors, _ = knn_backends.exact_knn_jax(
        features, k, mesh=mesh, query_batch_size=int(bags_config.query_batch_size),
        progress=False)
  else:
    neighbors, _ = knn_backends.exact_knn_faiss(
        features, k, query_batch_size=int(bags_config.query_batch_size), progress=False)
  logging.info('Student bags: %d x %d features, %d neighbours (%s) in %.1f s.',
               features.shape[0], features.shape[1], k, bags_config.method,
               time.perf_counter() - started)
  return bag_file.Bags.from_neighbors(neighbors, method=METHOD, fingerprint=source.fingerprint,
                                      content_fingerprint=source.content_fingerprint,
                                      search=bags_config.method, image_size=image_size,
                                      feature_dim=int(features.shape[1]), **metadata)


def bag_source(config: ml_collections.ConfigDict, workdir: str, student_model: nn.Module,
               source: Any, mesh: jax.sharding.Mesh,
               steps_per_epoch: int) -> Optional['StudentBags']:
  """The data feed's ``BagSource`` when ``config.bags.source = 'student'``, else None."""
  if not uses_student_bags(config):
    return None
  return StudentBags(config, workdir, student_model, source, mesh, steps_per_epoch)


class StudentBags:
  """The data feed's ``BagSource`` for ``config.bags.source = 'student'``.

  Attributes:
    every: ``config.bags.refresh_every_epochs`` (N >= 1).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, student_model: nn.Module,
               source: Any, mesh: jax.sharding.Mesh, steps_per_epoch: int):
    self._config, self._workdir, self._model = config, workdir, student_model
    self._source, self._mesh, self._steps_per_epoch = source, mesh, steps_per_epoch
    self.every = int(config.bags.refresh_every_epochs)

  def refreshes_at(self, step: int) -> bool:
    """Whether ``step`` starts an epoch ``0, N, 2N, ...``."""
    epoch, offset = divmod(step, self._steps_per_epoch)
    return offset == 0 and epoch % self.every == 0

  def bags_at(self, step: int, state: Any) -> bag_file.Bags:
    """The bags from ``step`` on: refreshed from ``state`` (the student before ``step``) at
    a refresh step, else the table of the last refresh, read from the workdir.

    Raises:
      FileNotFoundError: resuming between refreshes without that refresh's table.
    """
    epoch = (step // self._steps_per_epoch) // self.every * self.every
    path = bag_path(self._workdir, epoch)
    if not self.refreshes_at(step):
      if not fileio.isfile(path):
        raise FileNotFoundError(
            f'{path} is missing: the run resumes at step {step}, after the student bags of '
            f'epoch {epoch} were computed, and needs them (config.bags.source = '
            "'student'). Resume from an earlier checkpoint or use a new --workdir.")
      bags = bag_file.load_bags(path)
      bags.check_matches(len(self._source), self._source.fingerprint, path,
                         content_fingerprint=self._source.content_fingerprint)
      return bags
    bags = compute_student_bags(
        self._config, self._model, {'params': state.params, 'batch_stats': state.batch_stats},
        self._source, self._mesh, epoch=epoch, step=step)
    labels = getattr(self._source, 'labels', None)
    if labels is not None:  # logged only: how class-pure the student's neighbours are
      labels = np.asarray(labels)
      logging.info('Student bags of epoch %d: purity %.3f.', epoch,
                   float(np.mean(labels[bags.neighbors] == labels[:, None])))
    if jax.process_index() == 0:
      bag_file.save_bags(path, bags)
    return bags

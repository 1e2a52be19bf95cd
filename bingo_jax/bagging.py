"""Offline bagging: teacher features -> bags of similar images (docs/method.md §1).

``python -m bingo_jax.bagging --config x --workdir DIR`` reads ``config.data`` (the
training split is bagged), ``config.teacher.path`` and ``config.bags``, and writes::

    DIR/features/          teacher features, float16 shards (resumable; bingo_jax.bags.features)
    DIR/bags.npz           the bag file (or config.bags.path)        (bingo_jax.bags.bag_file)
    DIR/bag_report.json    purity overall / per class, bag statistics  (bingo_jax.bags.bag_report)
    DIR/bag_report.png     random anchors beside their bags

Methods (``config.bags.method``; the search backends are in ``bingo_jax.bags.knn_backends``):

* ``knn``: exact inner-product search with faiss (cosine on L2-normalised features: the
  released code's flat L2 index ranks identically), k = 5, the anchor's own index excluded
  wherever it lands among ties (not "drop column 0", docs/method.md §1);
* ``approx``: a faiss index built with ``index_factory`` (IVF / HNSW, optional PCA), its
  recall@k against exact search logged on a sample of anchors;
* ``jax``: exact blockwise similarity + top-k on the accelerators, database rows sharded over
  the mesh, for hosts where faiss on the CPU would take hours;
* ``kmeans``: faiss k-means with C clusters, a bag being the anchor's cluster;
* ``labels``: ground-truth classes (the paper's upper bound);
* ``random-teacher``: ``knn`` on features of a randomly initialised network of the teacher's
  architecture (the paper's lower bound);
* ``self``: every image alone in its group, so every bag is empty and the positive is the
  anchor itself (a second, independently augmented view of it). Not a bagging method but a
  control: with it, a loss's bag term keeps its extra student view and its weight but loses
  the other image (tools/fmnist_ablation.py, row ``paper_eq8_self``). No teacher is read.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import jax
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from bingo_jax.bags import bag_file
from bingo_jax.bags import bag_report
from bingo_jax.bags import features as features_lib
from bingo_jax.bags import knn_backends
from bingo_jax.console import cli
from bingo_jax.data import sources as data_sources
from bingo_jax.method import config_checks
from bingo_jax.models import create_model, init_variables
from bingo_jax.store import fileio
from bingo_jax.store import model_io

METHODS = ('knn', 'approx', 'jax', 'kmeans', 'labels', 'random-teacher', 'self')


# ---------------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------------

def random_teacher(teacher_config: dict, *, image_size: int, seed: int) -> Any:
  """A randomly initialised network of the given architecture (the paper's lower bound).

  Args:
    teacher_config: ``create_model`` keyword arguments (``None`` values dropped).
    image_size: input side used to initialise.
    seed: initialisation seed.
  Returns:
    A ``model_io.LoadedModel`` with ``metadata['random_init_seed']``.
  """
  model_config = {key: value for key, value in teacher_config.items() if value is not None}
  model = create_model(**model_config)
  variables = init_variables(model, jax.random.key(seed), image_size=image_size)
  return model_io.LoadedModel(model=model, variables=variables, model_config=model_config,
                              metadata={'random_init_seed': seed})


def _teacher(config, image_size: int):
  """(loaded model, teacher metadata for the bag file) for the feature-based methods."""
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
                     'file, bingo-convert).')
  loaded = model_io.load_model(teacher_path)
  return loaded, {'path': fileio.absolute(teacher_path),
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
  config_checks.check_values(config)
  bags_config = config.bags
  method = bags_config.method
  if method not in METHODS:
    raise ValueError(f'config.bags.method={method!r}; expected one of {METHODS}.')
  if source is None:
    source = data_sources.make_source(config.data, config.data.train_split)
  fileio.makedirs(workdir)
  bag_path = bags_config.get('path') or fileio.join(workdir, 'bags.npz')
  common = dict(fingerprint=source.fingerprint,
                content_fingerprint=source.content_fingerprint, data=_describe_data(config))
  if method == 'labels':
    if source.labels is None:
      raise ValueError(f'bags.method=labels but the source {source!r} has no labels.')
    bags = bag_file.Bags.from_groups(source.labels, method='labels', **common)
  elif method == 'self':
    bags = bag_file.Bags.from_groups(np.arange(len(source)), method='self', **common)
  else:
    bags = _feature_bags(config, workdir, source, bag_path, common, mesh=mesh,
                         progress=progress)

  if jax.process_index() == 0:
    if bags.path is None:
      bag_path = bag_file.save_bags(bag_path, bags)
    logging.info('bag file: %s', bag_path)
    bag_report.write_report(bags, source, workdir, num_anchors=int(bags_config.report_anchors),
                            members_shown=int(bags_config.report_members),
                            seed=int(bags_config.seed),
                            class_names=bags_config.get('class_names'))
  multihost_utils.sync_global_devices('bingo_jax.bagging: bag file written')
  return bags if bags is not None else bag_file.load_bags(bag_path), bag_path


def _feature_bags(config, workdir: str, source, bag_path: str, common: dict, *,
                  mesh: Optional[Mesh], progress: bool) -> Optional[bag_file.Bags]:
  """Teacher features, then the bags of a feature-based method (``None`` on processes > 0
  for the faiss methods, which run on process 0 only). ``common`` gains the teacher record."""
  bags_config = config.bags
  method, k = bags_config.method, int(bags_config.k)
  image_size = int(bags_config.get('image_size') or config.data.image_size)
  teacher, teacher_record = _teacher(config, image_size)
  features_dir = bags_config.get('features_dir') or fileio.join(
      workdir, 'features-random' if teacher_record['path'] is None else 'features')
  started = time.perf_counter()
  features = features_lib.extract_features(
      teacher, source, image_size=image_size, global_batch_size=int(bags_config.batch_size),
      mesh=mesh, output_dir=features_dir, shard_size=int(bags_config.shard_size),
      progress=progress)
  logging.info('features: %d x %d in %s (%.1f s)', features.num_images, features.feature_dim,
               features_dir, time.perf_counter() - started)
  common.update(teacher=teacher_record, feature_dim=features.feature_dim,
                image_size=image_size)
  settings = search_settings(bags_config)
  # Decided on process 0 for all: a process that alone skipped the jax search would leave
  # the others waiting in its collectives.
  is_writer = jax.process_index() == 0
  bags = _existing_bags(bag_path, dict(common, method=method, num_images=len(source),
                                       **settings)) if is_writer else None
  if bool(multihost_utils.broadcast_one_to_all(np.array(bags is not None))):
    logging.info('bag file %s already holds these bags (same method, settings, teacher and '
                 'images): kept. Delete it to recompute.', bag_path)
    return bags
  if method != 'jax' and not is_writer:
    return None  # faiss methods run on process 0 only.
  started = time.perf_counter()
  bags = _search(features, bags_config, dict(common, **settings), mesh=mesh, progress=progress)
  logging.info('bags (%s): %.1f s', method, time.perf_counter() - started)
  return bags


# The ranking of the exact methods (knn_backends._exact_top_k). Recorded in their bag files,
# so a file from before it (float32 ranking, whose ties depended on the query batch) is
# recomputed rather than kept.
EXACT_RANKING = 'float64, ties by index'


def search_settings(bags_config) -> dict:
  """Every setting that changes the bags of a feature-based method (recorded in the bag file;
  a file that differs in one is recomputed). ``query_batch_size`` and the block sizes are not
  among them: the exact methods do not depend on them."""
  method = bags_config.method
  if method == 'kmeans':
    return {'num_clusters': int(bags_config.num_clusters),
            'kmeans_iterations': int(bags_config.kmeans_iterations),
            'seed': int(bags_config.seed)}
  if method == 'approx':
    return {'k': int(bags_config.k), 'index': bags_config.approx_index,
            'search_parameters': bags_config.approx_search_parameters,
            'seed': int(bags_config.seed)}
  return {'k': int(bags_config.k), 'ranking': EXACT_RANKING}


def _search(features: features_lib.FeatureShards, bags_config, common: dict, *,
            mesh: Optional[Mesh], progress: bool) -> bag_file.Bags:
  """The bags ``bags_config.method`` finds among the teacher features (``knn_backends``)."""
  method, k = bags_config.method, int(bags_config.k)
  query_batch_size = int(bags_config.query_batch_size)
  common = {key: value for key, value in common.items() if key != 'k'}  # the table's width
  if method == 'jax':
    neighbors, _ = knn_backends.exact_knn_jax(features, k, mesh=mesh,
                                              query_batch_size=query_batch_size,
                                              progress=progress)
    return bag_file.Bags.from_neighbors(neighbors, method=method, **common)
  if method in ('knn', 'random-teacher'):
    neighbors, _ = knn_backends.exact_knn_faiss(features, k, progress=progress,
                                                query_batch_size=query_batch_size)
    return bag_file.Bags.from_neighbors(neighbors, method=method, **common)
  if method == 'approx':
    neighbors, recall = knn_backends.approx_knn_faiss(
        features, k, index_factory=bags_config.approx_index,
        search_parameters=bags_config.approx_search_parameters,
        recall_sample=int(bags_config.approx_recall_sample), seed=int(bags_config.seed),
        progress=progress)
    return bag_file.Bags.from_neighbors(neighbors, method=method, recall_at_k=recall, **common)
  # kmeans (compute_bags checked the method)
  groups = knn_backends.kmeans_groups(features, int(bags_config.num_clusters),
                                      iterations=int(bags_config.kmeans_iterations),
                                      seed=int(bags_config.seed))
  return bag_file.Bags.from_groups(groups, method=method, **common)


def _existing_bags(path: str, expected: dict) -> Optional[bag_file.Bags]:
  """The bag file at ``path`` if its metadata has every ``expected`` value, else None."""
  if not fileio.isfile(path):
    return None
  try:
    bags = bag_file.load_bags(path)
  except ValueError:
    return None  # unreadable: recompute and replace it
  same = all(json.dumps(bags.metadata.get(key), sort_keys=True) ==
             json.dumps(value, sort_keys=True) for key, value in expected.items())
  return bags if same else None


def _describe_data(config) -> dict:
  """The data's record in the bag file: ``name`` is a TFDS name, read only when
  ``source = 'tfds'`` (the config's default 'imagenet2012' would mislabel other sources)."""
  data = config.data
  keys = ('source', 'name', 'path', 'train_split') if data.source == 'tfds' else (
      'source', 'path', 'train_split')
  return {key: data.get(key) for key in keys if data.get(key) is not None}


# ---------------------------------------------------------------------------------------------
# Command line

_CONFIG = cli.shared(cli.CONFIG)
_WORKDIR = cli.shared(cli.WORKDIR)  # features, bag file, report


def main(argv: list[str]) -> None:
  cli.no_positional_arguments(argv)
  # The undecodable images, the teacher's NaN/Inf arrays, a bad config value: one line
  # naming them (cli.run), not a traceback.
  _, path = compute_bags(_CONFIG.value, _WORKDIR.value)
  logging.info('done: %s', path)


def cli_main() -> None:
  """The ``bingo-bag`` console command (and ``python -m bingo_jax.bagging``)."""
  cli.run(main, ('config', 'workdir'))


if __name__ == '__main__':
  cli_main()

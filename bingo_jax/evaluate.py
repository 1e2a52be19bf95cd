r"""Evaluation of a network: ``python -m bingo_jax.evaluate``.

::

  python -m bingo_jax.evaluate --config NAME --checkpoint PATH \
      --protocol knn|linear|linear_fast|finetune|analysis --workdir DIR [--step N]

``PATH`` is a model file (converted teacher, exported student), a training workdir (latest
checkpoint, or ``--step N``), or one of two baselines: ``random`` (the config's student
architecture, randomly initialised with ``config.eval.seed``) and ``pixels`` (the centre-
cropped, normalised pixels themselves as features). Data: ``config.data`` (any TFDS image
data set, image folder, file list or Fashion-MNIST), training split ``data.train_split``
(``eval.train_split`` when set), evaluation split ``data.eval_split``, so transfer to another
data set is a config change.

Protocols (``bingo_jax/eval/``): ``knn`` (10-NN majority and 200-NN weighted votes),
``linear`` (the released linear protocol), ``linear_fast`` (fast linear probe on cached
features), ``finetune`` (semi-supervised, 1% / 10% labels), ``analysis`` (bag distance,
intra-class distance, t-SNE PNG). Centre-crop features are cached in ``DIR/features`` keyed by
the model's variables and the image list, so several protocols share one feature pass.
Results are printed as a table and written atomically to ``DIR/eval_<protocol>.json``;
training-based protocols log to TensorBoard in ``DIR/tensorboard``.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import flags, logging

from bingo_jax import input_pipeline
from bingo_jax.bags import features as features_lib
from bingo_jax.console import cli
from bingo_jax.data import bad_images
from bingo_jax.data import images as images_lib
from bingo_jax.data import parallel
from bingo_jax.data import sources as data_sources
from bingo_jax.eval import analysis, finetune, knn, linear, subsets
from bingo_jax.method import config_checks
from bingo_jax.models import create_model, init_variables
from bingo_jax.run import progress
from bingo_jax.store import checkpointing
from bingo_jax.store import fileio
from bingo_jax.store import model_io

PROTOCOLS = ('knn', 'linear', 'linear_fast', 'finetune', 'analysis')
BASELINES = ('random', 'pixels')


# ---------------------------------------------------------------------------------------------
# The network and its features.
# ---------------------------------------------------------------------------------------------

def load_network(checkpoint: str, config: ml_collections.ConfigDict,
                 step: Optional[int] = None) -> Optional[model_io.LoadedModel]:
  """The network to evaluate; ``None`` for the ``pixels`` baseline.

  Args:
    checkpoint: model file, training workdir, ``'random'`` or ``'pixels'``.
    config: experiment config (``student`` section for ``random``).
    step: training step (workdirs only).
  """
  if checkpoint == 'pixels':
    return None
  if checkpoint == 'random':
    model_config = {'arch': config.student.arch, 'head': None,
                    'base_width': config.student.base_width, 'stem': config.student.stem,
                    'bn_group_size': config.student.bn_group_size}
    model = create_model(**model_config)
    variables = init_variables(model, jax.random.key(config.eval.seed),
                               image_size=config.data.image_size)
    return model_io.LoadedModel(model=model, variables=variables, model_config=model_config,
                                metadata={'source': f'random initialisation, seed '
                                                    f'{config.eval.seed}'})
  if not fileio.exists(checkpoint):
    raise FileNotFoundError(f'--checkpoint {checkpoint} does not exist (expected a model file, '
                            f'a training workdir, or one of {BASELINES}).')
  return checkpointing.load_any(checkpoint, step=step)


def describe_network(network: Optional[model_io.LoadedModel]) -> dict:
  if network is None:
    return {'baseline': 'pixels (centre crop, mean/std normalised, flattened)'}
  return features_lib.describe_model(network)


def pixel_features(source: Any, image_size: int, batch_size: int = 512) -> np.ndarray:
  """Centre-cropped, mean/std-normalised pixels as ``(N, image_size**2 * 3)`` float32 features
  (every process computes all of them: this is a cheap baseline)."""
  from tqdm.auto import tqdm
  rows = np.zeros((len(source), image_size * image_size * 3), np.float32)
  batches = input_pipeline.make_eval_dataset(source, image_size, batch_size, process_index=0,
                                             process_count=1)
  for batch in tqdm(batches, desc='pixels', unit='batch', total=-(-len(source) // batch_size),
                    disable=jax.process_index() != 0):
    mask = batch['mask']
    flat = np.asarray(images_lib.normalize(batch['image'])).reshape(len(mask), -1)
    rows[batch['index'][mask]] = flat[mask]
  return rows


def cached_features(network: Optional[model_io.LoadedModel], source: Any, *, split: str,
                    config: ml_collections.ConfigDict, workdir: str,
                    mesh: jax.sharding.Mesh) -> np.ndarray:
  """Unnormalised centre-crop pooled features ``(N, D)`` of ``source``, from the cache in
  ``WORKDIR/features`` when a file for the same model variables, image list and crop size
  exists, else computed (sharded over the mesh) and cached (process 0 writes, atomically)."""
  image_size = config.data.image_size
  if network is None:
    return pixel_features(source, image_size)
  key = '-'.join([split, features_lib.describe_model(network)['variables_checksum'],
                  source.fingerprint[:16], source.content_fingerprint[:16], str(image_size)])
  path = fileio.join(workdir, 'features', f'{key}.npy')
  cached = None
  if config.eval.cache_features and fileio.isfile(path):
    with fileio.open_file(path, 'rb') as f:
      cached = np.load(io.BytesIO(f.read()))
    if cached.shape[0] != len(source):
      logging.warning('%s has %d rows for %d images: recomputing.', path, cached.shape[0],
                      len(source))
      cached = None
  if jax.process_count() > 1:
    # The feature pass below is collective: every process must take the same branch, so the
    # cache is used only where all of them have it (hosts need not share a filesystem).
    from jax.experimental import multihost_utils
    if not multihost_utils.process_allgather(np.asarray(cached is not None)).all():
      cached = None
  if cached is not None:
    logging.info('features of %s: cached in %s', source.description, path)
    return cached
  logging.info('features of %s (%d images)', source.description, len(source))
  result = features_lib.extract_features(network, source, image_size=image_size,
                                         global_batch_size=config.eval.batch_size, mesh=mesh,
                                         normalize_features=False)
  if config.eval.cache_features and jax.process_index() == 0:
    fileio.atomic_write(path, lambda f: np.save(f, result))
  return result


def _labelled(source: Any, what: str) -> np.ndarray:
  if source.labels is None:
    raise ValueError(f'{what} ({source.description}) has no labels; evaluation needs them.')
  return np.asarray(source.labels)


def eval_train_split(config: ml_collections.ConfigDict) -> str:
  """The labelled split of the kNN bank and of the probes' training set.

  ``config.eval.train_split`` when set (STL-10: the labelled ``'train'`` split, while bagging
  and distillation use the unlabelled one), else ``config.data.train_split``.
  """
  return config.eval.get('train_split') or config.data.train_split


def _num_classes(*sources: Any) -> int:
  return max(int(s.num_classes or (int(np.max(s.labels)) + 1)) for s in sources)


# ---------------------------------------------------------------------------------------------
# Protocols. Each returns the metrics dict that goes into the JSON.
# ---------------------------------------------------------------------------------------------

def run_knn(network, train_source, eval_source, config, workdir, mesh) -> dict:
  # Checked before the feature pass: a k beyond the bank is known from the split's size.
  largest = max(config.eval.knn_k, config.eval.knn_weighted_k)
  if largest > len(train_source):
    raise ValueError(f'config.eval.knn_k = {config.eval.knn_k} and config.eval.knn_weighted_k '
                     f'= {config.eval.knn_weighted_k}: the kNN bank ({train_source.description}'
                     f') holds only {len(train_source)} images.')
  train = cached_features(network, train_source, split='train', config=config,
                          workdir=workdir, mesh=mesh)
  test = cached_features(network, eval_source, split='eval', config=config, workdir=workdir,
                         mesh=mesh)
  return knn.knn_evaluate(train, _labelled(train_source, 'training split'), test,
                          _labelled(eval_source, 'evaluation split'),
                          num_classes=_num_classes(train_source, eval_source),
                          k=config.eval.knn_k, weighted_k=config.eval.knn_weighted_k,
                          temperature=config.eval.knn_temperature, mesh=mesh,
                          progress=jax.process_index() == 0)


def run_linear_fast(network, train_source, eval_source, config, workdir, mesh, writer) -> dict:
  train = cached_features(network, train_source, split='train', config=config,
                          workdir=workdir, mesh=mesh)
  test = cached_features(network, eval_source, split='eval', config=config, workdir=workdir,
                         mesh=mesh)
  metrics, _ = linear.train_linear_on_features(
      train, _labelled(train_source, 'training split'), test,
      _labelled(eval_source, 'evaluation split'),
      num_classes=_num_classes(train_source, eval_source),
      epochs=config.eval.linear_fast_epochs, batch_size=config.eval.batch_size,
      base_lr=config.eval.linear_fast_lr, min_lr=0.0, mesh=mesh, seed=config.eval.seed,
      writer=writer, progress=jax.process_index() == 0)
  return metrics


def run_linear(network, train_source, eval_source, config, workdir, mesh, writer) -> dict:
  if network is None:
    raise ValueError("--protocol linear needs a network; use linear_fast for 'pixels'.")
  test = cached_features(network, eval_source, split='eval', config=config, workdir=workdir,
                         mesh=mesh)
  metrics, _ = linear.train_linear_probe(
      network, train_source, test, _labelled(eval_source, 'evaluation split'),
      num_classes=_num_classes(train_source, eval_source), image_size=config.data.image_size,
      epochs=config.eval.linear_epochs, batch_size=config.eval.batch_size,
      base_lr=config.eval.linear_lr, min_lr=config.eval.linear_min_lr, mesh=mesh,
      seed=config.eval.seed, writer=writer, progress=jax.process_index() == 0)
  return metrics


def _identifiers(source: Any) -> list[str]:
  identifiers = list(source.identifiers())
  if len(identifiers) != len(source):  # sources without per-image names (in-memory arrays)
    identifiers = [f'#{i}' for i in range(len(source))]
  return identifiers


def run_finetune(network, train_source, eval_source, config, workdir, mesh, writer) -> dict:
  if network is None:
    raise ValueError("--protocol finetune needs a network, not 'pixels'.")
  export = config.eval.get('finetune_export')
  if export and fileio.exists(export):  # refused before the training, not after it
    raise FileExistsError(f'config.eval.finetune_export = {export!r} already exists; give a '
                          'new path or remove it.')
  train_labels = _labelled(train_source, 'training split')
  indices, split_path = subsets.finetune_subset(
      _identifiers(train_source), train_labels, workdir=workdir,
      fraction=config.eval.finetune_fraction, seed=config.eval.seed,
      split_file=config.eval.finetune_split_file, write=jax.process_index() == 0)
  metrics, finetuned = finetune.finetune(
      network, train_source, indices, eval_source,
      num_classes=_num_classes(train_source, eval_source), image_size=config.data.image_size,
      epochs=config.eval.finetune_epochs, batch_size=config.eval.batch_size,
      base_lr=config.eval.finetune_lr,
      classifier_lr_multiplier=config.eval.finetune_classifier_lr_multiplier,
      weight_decay=config.eval.finetune_weight_decay, mesh=mesh, seed=config.eval.seed,
      writer=writer, progress=jax.process_index() == 0)
  metrics['subset_file'] = split_path
  metrics['labelled_fraction'] = len(indices) / len(train_source)
  if export:
    metrics['exported_model'] = export_finetuned(finetuned, config, metrics,
                                                 train_source.description)
  return metrics


def export_finetuned(finetuned: model_io.LoadedModel, config: ml_collections.ConfigDict,
                     metrics: dict, train_description: str) -> Optional[str]:
  """Writes the fine-tuned network to ``config.eval.finetune_export`` as a model file.

  The file holds the backbone and the new ``linear`` classifier; ``bingo_jax.bagging`` reads it
  as ``config.teacher.path`` (its pooled backbone features), which makes bags from a network
  trained on the labels (paper Table 7). Process 0 writes; an existing path is refused.

  Returns:
    The model file's absolute path (None on the other processes).
  """
  if jax.process_index() != 0:
    return None
  metadata = dict(finetuned.metadata, supervised={
      'protocol': 'finetune', 'train': train_description,
      'labelled_fraction': metrics['labelled_fraction'], 'epochs': metrics['epochs'],
      'eval_top1': float(metrics['top1']), 'eval_top5': float(metrics['top5'])})
  path = model_io.save_model(config.eval.finetune_export, finetuned.model_config,
                             finetuned.variables, metadata=metadata)
  logging.info('fine-tuned network written to %s', path)
  return path


def run_analysis(network, train_source, eval_source, config, workdir, mesh) -> dict:
  from bingo_jax.bags import bag_file
  normalize = config.eval.analysis_normalize
  transform = knn.l2_normalize if normalize else (lambda x: np.asarray(x, np.float32))
  eval_labels = _labelled(eval_source, 'evaluation split')
  test = transform(cached_features(network, eval_source, split='eval', config=config,
                                   workdir=workdir, mesh=mesh))
  metrics = {'normalized_features': bool(normalize)}
  metrics.update(analysis.intra_class_distance(test, eval_labels))
  bags_path = config.bags.get('path')
  if bags_path and fileio.exists(bags_path):
    bags = bag_file.load_bags(bags_path)
    bags.check_matches(len(train_source), train_source.fingerprint,
                       f'training split {train_source.description}',
                       content_fingerprint=train_source.content_fingerprint)
    train = transform(cached_features(network, train_source, split='train', config=config,
                                      workdir=workdir, mesh=mesh))
    metrics.update(analysis.bag_distance(train, bags))
    metrics['bags'] = bags_path
  else:
    logging.warning('config.bags.path=%r is not a bag file: bag distance (Eq. 11) skipped.',
                    bags_path)
  chosen = analysis.select_classes(eval_labels, config.eval.tsne_classes,
                                   config.eval.tsne_per_class, seed=config.eval.seed)
  logging.info('t-SNE of %d images of %d classes', len(chosen), len(np.unique(eval_labels[chosen])))
  embedding = analysis.tsne(test[chosen], perplexity=min(config.eval.tsne_perplexity,
                                                         (len(chosen) - 1) / 3),
                            seed=config.eval.seed)
  names = config.eval.get('class_names') or getattr(eval_source, 'class_names', None)
  figure = analysis.plot_embedding(embedding, eval_labels[chosen], names,
                                   title=f't-SNE of {eval_source.description}')
  if jax.process_index() == 0:
    metrics['tsne_png'] = analysis.save_figure(figure, fileio.join(workdir, 'tsne.png'))
  return metrics


# ---------------------------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------------------------

def format_table(results: dict) -> str:
  """The metrics of a result record as an aligned two-column table."""
  label = results['metrics'].get('protocol', results['protocol_label'])
  rows = [('protocol', label), ('checkpoint', str(results['checkpoint']))]
  for name, value in results['metrics'].items():
    if name == 'protocol':  # already the first row
      continue
    if isinstance(value, float):
      value = f'{value:.2f}' if abs(value) >= 10 else f'{value:.4g}'
    rows.append((name, str(value)))
  rows.append(('wall time', progress.format_duration(results['wall_seconds'])))
  width = max(len(name) for name, _ in rows)
  line = '-' * (width + 3 + max(len(v) for _, v in rows))
  return '\n'.join([line] + [f'{name:<{width}} | {value}' for name, value in rows] + [line])


PROTOCOL_LABELS = {
    'knn': 'kNN on centre-crop features (10-NN majority, 200-NN weighted)',
    'linear': 'linear probe (released protocol)',
    'linear_fast': linear.FAST_PROBE_LABEL,
    'finetune': 'semi-supervised fine-tuning',
    'analysis': 'analysis (bag distance, intra-class distance, t-SNE)',
}


def _skipped_images(train_source, eval_source) -> dict:
  """The undecodable images this evaluation read as others (``data.on_bad_image='skip'``),
  per split: ``{'train': {'count', 'images': [index, file, problem, replaced_by]}, 'eval':
  ...}``. Features read from the cache decode nothing, and record nothing."""
  result = {}
  for split, source in (('train', train_source), ('eval', eval_source)):
    records = bad_images.replacements_of(source).records()
    result[split] = {'count': len(records), 'images': records}
  return result


def evaluate(config: ml_collections.ConfigDict, checkpoint: str, protocol: str, workdir: str,
             step: Optional[int] = None, mesh: Optional[jax.sharding.Mesh] = None) -> dict:
  """Runs one protocol and writes ``WORKDIR/eval_<protocol>.json``.

  Args:
    config: experiment config (``data`` and ``eval`` sections; ``student`` for ``random``;
      ``bags.path`` for the bag distance).
    checkpoint: model file, training workdir, ``'random'`` or ``'pixels'``.
    protocol: one of ``PROTOCOLS``.
    workdir: output directory (results, feature cache, TensorBoard, subsets, t-SNE PNG).
    step: training step to load from a workdir.
    mesh: device mesh (default all devices of all processes).
  Returns:
    The result record: ``protocol``, ``protocol_label``, ``checkpoint``, ``step``, ``model``,
    ``data`` (with ``bad_images_skipped``), ``metrics``, ``wall_seconds``.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f'--protocol {protocol!r}; expected one of {PROTOCOLS}.')
  config_checks.check_values(config)
  started = time.time()
  mesh = mesh or parallel.make_mesh()
  fileio.makedirs(workdir)
  network = load_network(checkpoint, config, step)
  train_source = data_sources.make_source(config.data, eval_train_split(config))
  eval_source = data_sources.make_source(config.data, config.data.eval_split)
  # TensorBoard for the protocols that train; kNN and analysis have no curves to show.
  writer = (progress.MetricWriter(fileio.join(workdir, 'tensorboard', protocol))
            if protocol in ('linear', 'linear_fast', 'finetune') else None)
  try:
    if protocol == 'knn':
      metrics = run_knn(network, train_source, eval_source, config, workdir, mesh)
    elif protocol == 'linear_fast':
      metrics = run_linear_fast(network, train_source, eval_source, config, workdir, mesh,
                                writer)
    elif protocol == 'linear':
      metrics = run_linear(network, train_source, eval_source, config, workdir, mesh, writer)
    elif protocol == 'finetune':
      metrics = run_finetune(network, train_source, eval_source, config, workdir, mesh, writer)
    else:
      metrics = run_analysis(network, train_source, eval_source, config, workdir, mesh)
  finally:
    if writer is not None:
      writer.close()
  results = {'protocol': protocol, 'protocol_label': PROTOCOL_LABELS[protocol],
             'checkpoint': checkpoint, 'step': step, 'model': describe_network(network),
             'data': {'train': train_source.description, 'eval': eval_source.description,
                      'num_train': len(train_source), 'num_eval': len(eval_source),
                      'image_size': config.data.image_size,
                      'bad_images_skipped': _skipped_images(train_source, eval_source)},
             'devices': jax.device_count(), 'processes': jax.process_count(),
             'metrics': metrics, 'wall_seconds': time.time() - started}
  if jax.process_index() == 0:
    fileio.write_json_atomically(fileio.join(workdir, f'eval_{protocol}.json'), results,
                                 sort_keys=False, default=str)
    print(format_table(results), flush=True)
  return results


# ---------------------------------------------------------------------------------------------
# Command line

_CONFIG = cli.shared(cli.CONFIG)
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'Model file, training workdir, "random" or "pixels".')
_PROTOCOL = flags.DEFINE_enum('protocol', None, PROTOCOLS, 'Evaluation protocol.')
_WORKDIR = cli.shared(cli.WORKDIR)  # results, feature cache, logs
_STEP = cli.shared(cli.STEP)


def main(argv: list[str]) -> None:
  cli.no_positional_arguments(argv)
  # A damaged checkpoint, a bad image, a model file holding NaN/Inf, an export path taken, a
  # bad config value: the cause in one line (cli.run), not orbax's asyncio traceback.
  evaluate(_CONFIG.value, _CHECKPOINT.value, _PROTOCOL.value, _WORKDIR.value, _STEP.value)


def cli_main() -> None:
  """The ``bingo-eval`` console command (and ``python -m bingo_jax.evaluate``)."""
  cli.run(main, ('config', 'checkpoint', 'protocol', 'workdir'))


if __name__ == '__main__':
  cli_main()

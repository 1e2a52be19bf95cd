"""The feature pass: pooled backbone features of every image of a data source.

Used by bagging (teacher features -> bags, docs/method.md §1) and by evaluation (kNN on
student features). Images get the evaluation preprocessing of the released code: resize the
shorter side to ``image_size / CENTER_CROP_FRACTION`` (256 for 224), centre crop
``image_size``, mean/std normalisation; no augmentation. The model runs in eval mode (stored
BatchNorm statistics), as the released ``compute_feat`` does.

Parallelism follows ``bingo_jax.data.parallel``: one ``jax.jit`` forward over the mesh, the batch
sharded along ``'data'``, every process reading only its slice of the images. The features
(and the image indices that travel with them) come back replicated to every process, so each
process can place every row by its index whatever the per-process split was.

ImageNet's 1.28M x 4096 features do not fit comfortably in host memory, so the pass can stream
them to a directory in float16 shards of ``shard_size`` images; a rerun of an interrupted pass
skips the shards already written.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from bingo_jax.data import images as images_lib
from bingo_jax.data import parallel
from bingo_jax.data.sources import ImageSource
from bingo_jax.store import fileio

FEATURES_RECORD = 'features.json'
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# The sharded forward.
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def make_forward(model: Any, mesh: Mesh, normalize_features: bool):
  """Jitted ``(variables, batch) -> (features, index, mask)``, outputs replicated.

  Cached per (model, mesh, normalisation): flax modules and meshes compare by value, so
  repeated passes (evaluation every few epochs, resumed shards) reuse one compilation.

  ``features``: ``(global_batch, feature_dim)`` float32, L2-normalised if asked (as
  ``torch.nn.functional.normalize``: divided by ``max(norm, 1e-12)``).
  """

  def forward(variables, batch):
    features, _ = model.apply(variables, images_lib.normalize(batch['image']), train=False)
    features = features.astype(jnp.float32)
    if normalize_features:
      norms = jnp.linalg.norm(features, axis=-1, keepdims=True)
      features = features / jnp.maximum(norms, 1e-12)
    return features, batch['index'], batch['mask']

  replicated = parallel.replicated(mesh)
  return jax.jit(forward, in_shardings=(replicated, parallel.data_sharding(mesh)),
                 out_shardings=replicated)


def describe_model(loaded_model: Any) -> dict:
  """A record that tells two models apart: config, metadata and a checksum of the variables."""
  digest = hashlib.sha256()
  flat, _ = jax.tree_util.tree_flatten_with_path(loaded_model.variables)
  for path, leaf in flat:
    leaf = np.asarray(leaf, np.float64)
    digest.update(f'{jax.tree_util.keystr(path)}{leaf.shape}{leaf.sum():.6e}'
                  f'{np.abs(leaf).sum():.6e}'.encode())
  return {'model_config': _jsonable(loaded_model.model_config),
          'metadata': _jsonable(loaded_model.metadata),
          'variables_checksum': digest.hexdigest()[:16]}


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------------------------
# Shards on disk.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FeatureShards:
  """Features stored as float16 shards ``shard-NNNNN.npy`` of ``shard_size`` rows each.

  Attributes:
    directory: where the shards and ``features.json`` live.
    num_images: total rows N.
    feature_dim: D.
    shard_size: rows per shard (the last shard may be shorter).
    record: the ``features.json`` content (model, data fingerprint, preprocessing).
  """
  directory: str
  num_images: int
  feature_dim: int
  shard_size: int
  record: dict

  @property
  def num_shards(self) -> int:
    return math.ceil(self.num_images / self.shard_size)

  def shard_path(self, shard: int) -> str:
    return shard_path(self.directory, shard)

  def shard_range(self, shard: int) -> tuple[int, int]:
    start = shard * self.shard_size
    return start, min(start + self.shard_size, self.num_images)

  def iter_shards(self) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(first_row, features (rows, D) float16)`` shard by shard (memory-mapped when
    local; a URL's shard is read whole)."""
    for shard in range(self.num_shards):
      path = self.shard_path(shard)
      if fileio.is_url(path):
        with fileio.open_file(path, 'rb') as f:
          yield self.shard_range(shard)[0], np.load(io.BytesIO(f.read()))
      else:
        yield self.shard_range(shard)[0], np.load(path, mmap_mode='r')

  def load(self, dtype=np.float32) -> np.ndarray:
    """All features ``(N, D)`` in one array of ``dtype``."""
    features = np.empty((self.num_images, self.feature_dim), dtype)
    for start, shard in self.iter_shards():
      features[start:start + shard.shape[0]] = shard
    return features


def shard_path(directory: str, shard: int) -> str:
  return fileio.join(directory, f'shard-{shard:05d}.npy')


def open_feature_shards(directory: str) -> FeatureShards:
  """Opens a finished shard directory written by ``extract_features(..., output_dir=...)``."""
  record_path = fileio.join(directory, FEATURES_RECORD)
  if not fileio.isfile(record_path):
    raise FileNotFoundError(f'{directory} holds no feature shards ({FEATURES_RECORD} missing).')
  with fileio.open_file(record_path, 'r') as f:
    try:
      record = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{record_path} is not valid JSON: {e}') from e
  absent = [key for key in ('num_images', 'feature_dim', 'shard_size') if key not in record]
  if absent:
    raise ValueError(f'{record_path} is not a feature-pass record: it lacks {absent}.')
  shards = FeatureShards(directory=directory, num_images=record['num_images'],
                         feature_dim=record['feature_dim'], shard_size=record['shard_size'],
                         record=record)
  missing = [s for s in range(shards.num_shards) if not fileio.isfile(shards.shard_path(s))]
  if missing or record.get('feature_dim') is None:
    raise ValueError(f'{directory}: the feature pass is unfinished (missing shards {missing[:5]}'
                     f'{" ..." if len(missing) > 5 else ""}); rerun it to resume.')
  return shards


def _prepare_directory(directory: str, record: dict) -> dict:
  """Creates ``directory`` or checks that its earlier, partial pass is the same pass."""
  fileio.makedirs(directory)
  record_path = fileio.join(directory, FEATURES_RECORD)
  if not fileio.isfile(record_path):
    fileio.write_json_atomically(record_path, record)
    return record
  stored = fileio.read_json(record_path)
  keys = ('num_images', 'fingerprint', 'content_fingerprint', 'shard_size', 'image_size',
          'normalized', 'model')
  differing = [k for k in keys if stored.get(k) != record.get(k)]
  if differing:
    details = '; '.join(f'{k}: stored {stored.get(k)!r}, now {record.get(k)!r}'
                        for k in differing)
    raise ValueError(f'{directory} holds features of a different pass ({details}). Use another '
                     'directory or delete it.')
  return stored


def _finished_shards(output_dir: str, record: dict,
                     num_shards: int) -> tuple[dict, np.ndarray]:
  """``(record, done (num_shards,) bool)`` of ``output_dir``, decided on process 0 for all.

  Every process must stop, or run the same shards, or the collectives would hang.
  """
  refusal, done = None, np.zeros(num_shards, bool)
  if jax.process_index() == 0:
    try:
      record = _prepare_directory(output_dir, record)
    except ValueError as e:
      refusal = e
    else:
      done = np.array([fileio.isfile(shard_path(output_dir, s)) for s in range(num_shards)])
  refused = bool(multihost_utils.broadcast_one_to_all(np.array(refusal is not None)))
  if refused:
    raise refusal or ValueError(f'{output_dir}: process 0 refused the directory (see its log).')
  return record, np.asarray(multihost_utils.broadcast_one_to_all(done)).astype(bool)


# ---------------------------------------------------------------------------------------------
# The pass.
# ---------------------------------------------------------------------------------------------

def _range_features(forward, variables, batches: Iterator[dict], mesh: Mesh, start: int,
                    stop: int, bar) -> np.ndarray:
  """Features ``(stop - start, D)`` float32 of images ``[start, stop)``, from this process's
  eval batches of the range (every process gets every row: the outputs are replicated)."""
  range_features, filled = None, np.zeros(stop - start, bool)
  for local in batches:
    local = {key: local[key] for key in ('image', 'index', 'mask')}
    features, index, mask = forward(variables, parallel.global_batch(local, mesh))
    features, index, mask = np.asarray(features), np.asarray(index), np.asarray(mask)
    if range_features is None:
      range_features = np.zeros((stop - start, features.shape[1]), np.float32)
    rows = index[mask] - start
    range_features[rows] = features[mask]
    filled[rows] = True
    if bar is not None:
      bar.update(int(mask.sum()))
  if not filled.all():
    raise RuntimeError(f'feature pass: images {start + np.nonzero(~filled)[0][:5]} of '
                       f'[{start}, {stop}) were never produced (input pipeline bug).')
  return range_features


def extract_features(loaded_model: Any, source: ImageSource, *, image_size: int,
                     global_batch_size: int, mesh: Optional[Mesh] = None,
                     normalize_features: bool = True, output_dir: Optional[str] = None,
                     shard_size: int = 65536, progress: bool = True):
  """Pooled features of every image of ``source``, in the source's order.

  Args:
    loaded_model: a ``bingo_jax.store.model_io.LoadedModel`` (teacher, student or random network).
    source: a ``bingo_jax.data.sources.ImageSource``.
    image_size: centre-crop side (the shorter side is first resized to
      ``image_size / CENTER_CROP_FRACTION``).
    global_batch_size: images per forward over all devices; must divide over the mesh.
    mesh: device mesh (default: all devices, ``parallel.make_mesh()``).
    normalize_features: L2-normalise every feature vector (bagging does; docs/method.md §1).
    output_dir: if given, stream float16 shards there and resume from finished shards.
    shard_size: images per shard; also the unit of work between progress checkpoints.
    progress: show a tqdm bar on process 0.
  Returns:
    Without ``output_dir``: ``(N, feature_dim)`` float32 numpy array (on every process).
    With ``output_dir``: ``FeatureShards`` describing the finished directory.
  """
  from bingo_jax import input_pipeline  # tf.data, needed by the pass only
  mesh = parallel.make_mesh() if mesh is None else mesh
  num_images = len(source)
  if num_images == 0:
    raise ValueError(f'{type(source).__name__} has no images.')
  local_batch = parallel.local_batch_size(global_batch_size, mesh)
  process_index, process_count = jax.process_index(), jax.process_count()
  is_writer = process_index == 0
  shard_size = int(shard_size) if output_dir else num_images
  num_shards = math.ceil(num_images / shard_size)

  record = {'format_version': FORMAT_VERSION, 'num_images': num_images,
            'fingerprint': str(getattr(source, 'fingerprint', '')),
            'content_fingerprint': (str(source.content_fingerprint) if output_dir
                                    and hasattr(source, 'content_fingerprint') else None),
            'shard_size': shard_size,
            'image_size': int(image_size), 'normalized': bool(normalize_features),
            'model': describe_model(loaded_model), 'feature_dim': None, 'dtype': 'float16'}
  done = np.zeros(num_shards, bool)
  if output_dir:
    record, done = _finished_shards(output_dir, record, num_shards)

  forward = make_forward(loaded_model.model, mesh, normalize_features)
  variables = parallel.replicate(loaded_model.variables, mesh)
  features_all = None
  todo = [s for s in range(num_shards) if not done[s]]
  images_todo = sum(min((s + 1) * shard_size, num_images) - s * shard_size for s in todo)
  bar = None
  if progress and is_writer and todo:
    from tqdm import tqdm
    bar = tqdm(total=images_todo, unit='img', desc='features', smoothing=0.1)
    if done.any():
      bar.write(f'features: resuming, {int(done.sum())}/{num_shards} shards already in '
                f'{output_dir}')

  try:
    for shard in todo:
      start, stop = shard * shard_size, min((shard + 1) * shard_size, num_images)
      batches = input_pipeline.make_eval_dataset(
          source, image_size, local_batch, start=start, stop=stop, process_index=process_index,
          process_count=process_count)
      shard_features = _range_features(forward, variables, batches, mesh, start, stop, bar)
      if output_dir is None:
        features_all = shard_features
        continue
      if is_writer:
        if record.get('feature_dim') is None:
          record['feature_dim'] = int(shard_features.shape[1])
          fileio.write_json_atomically(fileio.join(output_dir, FEATURES_RECORD), record)
        fileio.atomic_write(shard_path(output_dir, shard),
                            lambda f: np.save(f, shard_features.astype(np.float16)))
  finally:
    if bar is not None:
      bar.close()  # before an error is reported, not after it
  if output_dir is None:
    return features_all
  multihost_utils.sync_global_devices('bingo_jax.bags.features: shards written')
  return open_feature_shards(output_dir)

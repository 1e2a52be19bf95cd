"""The feature pass: centre crop, order, device independence, resume from finished shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from bingo_jax.bags import features as features_lib
from bingo_jax.data import images as images_lib
from bingo_jax.data import parallel
from bingo_jax.data import sources as data_sources
from bingo_jax.models import create_model, init_variables
from bingo_jax.store import model_io


class RecordingSource(data_sources.ArraySource):
  """In-memory images that record which indices the pipeline read and can fail past one."""

  def __init__(self, images, fail_from=None):
    super().__init__(images)
    self.fail_from = fail_from
    self.read_indices = []

  def tf_read_batch(self, indices):
    def record(batch):
      if self.fail_from is not None and batch.max() >= self.fail_from:
        raise RuntimeError(f'simulated crash at image {batch.max()}')
      self.read_indices.extend(batch.tolist())
      return batch
    checked = tf.numpy_function(record, [indices], indices.dtype, stateful=True)
    return super().tf_read_batch(tf.ensure_shape(checked, indices.shape))


@pytest.fixture(scope='module')
def small_model():
  config = dict(arch='resnet18', base_width=8, stem='cifar')
  model = create_model(**config)
  variables = init_variables(model, jax.random.key(0), image_size=28)
  return model_io.LoadedModel(model=model, variables=variables, model_config=config,
                              metadata={'test': True})


@pytest.fixture(scope='module')
def images():
  # 40 x 32 images with image_size 28: resize target 32 = the shorter side (no resampling),
  # so the torchvision centre crop is rows 6:34, columns 2:30.
  return np.random.default_rng(0).integers(0, 256, (20, 40, 32, 3), dtype=np.uint8)


def _reference_features(small_model, images):
  crops = images[:, 6:34, 2:30]
  features, _ = small_model.model.apply(small_model.variables,
                                        images_lib.normalize(jnp.asarray(crops)), train=False)
  features = np.asarray(features, np.float64)
  return features / np.linalg.norm(features, axis=1, keepdims=True)


def test_eight_devices_equal_one_device_and_reference(small_model, images):
  assert jax.device_count() == 8
  reference = _reference_features(small_model, images)
  kwargs = dict(image_size=28, global_batch_size=8, progress=False)  # 20 images: padded batch
  one = features_lib.extract_features(small_model, RecordingSource(images),
                                      mesh=parallel.make_mesh(jax.devices()[:1]), **kwargs)
  eight = features_lib.extract_features(small_model, RecordingSource(images),
                                        mesh=parallel.make_mesh(), **kwargs)
  assert one.shape == (20, small_model.model.feature_dim) and one.dtype == np.float32
  np.testing.assert_allclose(one, reference, atol=2e-5)
  np.testing.assert_allclose(eight, one, atol=2e-5)


def test_interrupted_pass_resumes_without_recomputing_finished_shards(small_model, images,
                                                                      tmp_path):
  directory = str(tmp_path / 'features')
  kwargs = dict(image_size=28, global_batch_size=8, output_dir=directory, shard_size=8,
                progress=False)  # shards [0, 8), [8, 16), [16, 20)
  with pytest.raises(Exception, match='simulated crash'):
    features_lib.extract_features(small_model, RecordingSource(images, fail_from=12), **kwargs)
  assert (tmp_path / 'features' / 'shard-00000.npy').exists()
  assert not (tmp_path / 'features' / 'shard-00001.npy').exists()
  mtime = (tmp_path / 'features' / 'shard-00000.npy').stat().st_mtime_ns

  source = RecordingSource(images)
  shards = features_lib.extract_features(small_model, source, **kwargs)
  assert min(source.read_indices) == 8 and sorted(set(source.read_indices)) == list(range(8, 20))
  assert (tmp_path / 'features' / 'shard-00000.npy').stat().st_mtime_ns == mtime
  assert shards.num_shards == 3
  np.testing.assert_allclose(shards.load(), _reference_features(small_model, images), atol=1e-3)


def test_directory_of_another_pass_is_refused(small_model, images, tmp_path):
  directory = str(tmp_path / 'features')
  kwargs = dict(image_size=28, global_batch_size=8, output_dir=directory, shard_size=16,
                progress=False)
  features_lib.extract_features(small_model, RecordingSource(images[:16]), **kwargs)
  with pytest.raises(ValueError, match='num_images: stored 16, now 20'):
    features_lib.extract_features(small_model, RecordingSource(images), **kwargs)


def test_damaged_record_is_named_in_the_error(tmp_path):
  directory = tmp_path / 'features'
  directory.mkdir()
  (directory / features_lib.FEATURES_RECORD).write_text('{"num_images": 3}')
  with pytest.raises(ValueError, match=r"features\.json is not a feature-pass record: it lacks "
                                       r"\['feature_dim', 'shard_size'\]"):
    features_lib.open_feature_shards(str(directory))
  (directory / features_lib.FEATURES_RECORD).write_text('{"num_im')
  with pytest.raises(ValueError, match=r'features\.json is not valid JSON'):
    features_lib.open_feature_shards(str(directory))

"""Linear probes: separable features reach 100%; the frozen backbone does not move."""

import jax
import numpy as np
import pytest

from bingo_jax.bags.features import extract_features
from bingo_jax.data import parallel
from bingo_jax.data.sources import ArraySource
from bingo_jax.eval import linear
from bingo_jax.models import create_model, init_variables
from bingo_jax.store import model_io


def _separable(num, num_classes, dim, rng):
  """Class c sits at +4 on coordinate c (and noise of std 0.3 elsewhere): separable by the
  hyperplanes x_c - x_c' = 0 with a wide margin."""
  labels = rng.integers(0, num_classes, num)
  features = 0.3 * rng.normal(size=(num, dim)) + 4.0 * np.eye(dim)[labels]
  return features.astype(np.float32), labels


@pytest.mark.parametrize('standardize', [True, False])
def test_fast_probe_on_separable_features_reaches_100_percent(standardize):
  rng = np.random.default_rng(0)
  train, train_labels = _separable(512, 6, 20, rng)
  test, test_labels = _separable(200, 6, 20, rng)
  metrics, classifier = linear.train_linear_on_features(
      train, train_labels, test, test_labels, num_classes=6, epochs=5, batch_size=64,
      base_lr=30.0, standardize=standardize, mesh=parallel.make_mesh(), progress=False)
  assert metrics['top1'] == 100.0
  assert metrics['protocol'] == 'fast linear probe on cached features'
  # Independent check: the returned classifier, applied with numpy to the transformed
  # features (standardised, each dimension with variance 1 / D), classifies every test point.
  if standardize:
    test = (test - train.mean(0)) / (train.std(0) * np.sqrt(train.shape[1]))
  logits = test @ classifier['kernel'] + classifier['bias']
  assert np.all(logits.argmax(1) == test_labels)


def test_fast_probe_learning_rate_follows_epoch_cosine():
  assert linear.cosine_epoch_lr(30.0, 0, 100, 0.01) == pytest.approx(30.0)
  assert linear.cosine_epoch_lr(30.0, 50, 100, 0.01) == pytest.approx(0.01 + (30 - 0.01) / 2)
  assert linear.cosine_epoch_lr(30.0, 99, 100, 0.0) == pytest.approx(
      30 * 0.5 * (1 + np.cos(np.pi * 0.99)))


@pytest.fixture(scope='module')
def tiny_model():
  model_config = dict(arch='resnet18', head='moco', head_hidden_dim=16, head_output_dim=8,
                      base_width=8, stem='cifar')
  model = create_model(**model_config)
  variables = init_variables(model, jax.random.key(0), image_size=16)
  # Non-trivial running statistics: a probe that ran BatchNorm in training mode and kept the
  # result would change them.
  variables['batch_stats'] = jax.tree.map(lambda v: v + 0.05, variables['batch_stats'])
  return model_io.LoadedModel(model=model, variables=variables, model_config=model_config,
                              metadata={})


def _dark_and_bright(num, rng):
  labels = np.arange(num) % 2
  images = np.where(labels[:, None, None, None] == 1,
                    rng.integers(180, 256, (num, 16, 16, 3)),
                    rng.integers(0, 70, (num, 16, 16, 3))).astype(np.uint8)
  return ArraySource(images, labels)


def test_released_protocol_keeps_backbone_bit_identical_and_learns(tiny_model):
  rng = np.random.default_rng(1)
  train_source, eval_source = _dark_and_bright(64, rng), _dark_and_bright(32, rng)
  before = jax.tree.map(lambda x: np.array(x, copy=True), tiny_model.variables)
  mesh = parallel.make_mesh()
  eval_features = extract_features(tiny_model, eval_source, image_size=16,
                                   global_batch_size=32, mesh=mesh, normalize_features=False,
                                   progress=False)
  metrics, classifier = linear.train_linear_probe(
      tiny_model, train_source, eval_features, eval_source.labels, num_classes=2,
      image_size=16, epochs=2, batch_size=32, base_lr=30.0, mesh=mesh, progress=False)
  after = jax.tree.map(np.asarray, tiny_model.variables)
  flat_before = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_after = jax.tree_util.tree_flatten_with_path(after)[0]
  assert [path for path, _ in flat_before] == [path for path, _ in flat_after]
  for (path, a), (_, b) in zip(flat_before, flat_after):
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), jax.tree_util.keystr(path)
  # The probe did train: the classifier left its N(0, 0.01) start, and after 4 steps at
  # lr 30 it is already well above chance (50%) on dark vs bright images.
  assert np.abs(classifier['kernel']).max() > 0.1
  assert metrics['top1'] > 70.0

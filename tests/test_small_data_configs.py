"""CIFAR-10, CIFAR-100 and STL-10 configs: what they set, one training step, one kNN evaluation.

The real data sets cannot be downloaded here, so TFDS serves random images of the right
shapes and label ranges (``tfds.testing.mock_data``); the networks are shrunk to width 8. The
kNN evaluation's accuracy is checked against a numpy brute-force kNN on the features the
evaluation cached.
"""

import glob
import importlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bingo_jax import evaluate, train
from bingo_jax.bags import bag_file
from bingo_jax.data import sources as data_sources
from bingo_jax.models import create_model, init_variables
from bingo_jax.store import model_io

NUM_EXAMPLES = 32
# name -> (TFDS name, image size, student stem, classes, distilled split, kNN bank split)
EXPECTED = {'cifar10': ('cifar10', 32, 'cifar', 10, 'train', 'train'),
            'cifar100': ('cifar100', 32, 'cifar', 100, 'train', 'train'),
            'stl10': ('stl10', 96, 'imagenet', 10, 'unlabelled', 'train')}


def _config(name: str):
  return importlib.import_module(f'bingo_jax.configs.{name}').get_config()


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_config_names_the_data_and_networks(name):
  tfds_name, size, stem, _, train_split, bank_split = EXPECTED[name]
  config = _config(name)
  assert (config.data.source, config.data.name, config.data.image_size) == ('tfds', tfds_name,
                                                                            size)
  assert (config.data.train_split, config.data.eval_split) == (train_split, 'test')
  assert evaluate.eval_train_split(config) == bank_split
  assert (config.student.arch, config.student.stem) == ('resnet18', stem)
  # Paper Table 6: a ResNet-50 teacher; the queue must not exceed the training images.
  assert config.teacher.path.endswith('_r50')
  assert config.train.queue_size < 50000 and config.train.queue_size % config.train.batch_size == 0
  assert _config(name) == _config(name)  # no shared mutable state between calls


def _shrink(config, workdir: str, teacher: str, bags: str):
  config.student.update(base_width=8, head_hidden_dim=32, head_output_dim=16, bn_group_size=4)
  config.teacher.update(path=teacher, bn_group_size=4)
  config.bags.path = bags
  config.train.update(batch_size=16, queue_size=64, max_steps=1, log_every_steps=1,
                      checkpoint_every_steps=1)
  config.eval.update(batch_size=16, knn_k=3, knn_weighted_k=8)
  return config


def _brute_force_knn_top1(bank, bank_labels, queries, query_labels, k):
  """Cosine k-NN majority vote, ties to the class of the nearest tied neighbour (numpy)."""
  normalise = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
  similarity = normalise(queries.astype(np.float64)) @ normalise(bank.astype(np.float64)).T
  correct = 0
  for row, label in zip(similarity, query_labels):
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
    votes = {}
    for rank, j in enumerate(order):
      count, first = votes.get(bank_labels[j], (0, rank))
      votes[bank_labels[j]] = (count + 1, first)
    predicted = max(votes, key=lambda c: (votes[c][0], -votes[c][1]))
    correct += predicted == label
  return 100.0 * correct / len(query_labels)


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_one_training_step_and_one_knn_evaluation_on_mock_data(name, tmp_path):
  _, size, stem, num_classes, train_split, bank_split = EXPECTED[name]
  teacher_config = dict(arch='resnet18', head='moco', base_width=8, stem=stem,
                        head_hidden_dim=32, head_output_dim=16)
  teacher_path, bags_path = str(tmp_path / 'teacher'), str(tmp_path / 'bags.npz')
  model_io.save_model(teacher_path, teacher_config,
                      init_variables(create_model(**teacher_config), jax.random.key(1), size))
  config = _shrink(_config(name), str(tmp_path / 'run'), teacher_path, bags_path)
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    source = data_sources.make_source(config.data, train_split)
    rng = np.random.default_rng(0)
    neighbours = np.stack([rng.choice(np.delete(np.arange(len(source)), i), 3, replace=False)
                           for i in range(len(source))])
    bag_file.save_bags(bags_path, bag_file.Bags.from_neighbors(
        neighbours, method='knn', fingerprint=source.fingerprint))

    summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert summary['step'] == 1 and np.isfinite(summary['final_metrics']['loss'])

    results = evaluate.evaluate(config, str(tmp_path / 'run'), 'knn', str(tmp_path / 'eval'))
    bank_source = data_sources.make_source(config.data, bank_split)
    eval_source = data_sources.make_source(config.data, 'test')
  metrics = results['metrics']
  assert (metrics['num_train'], metrics['num_eval']) == (NUM_EXAMPLES, NUM_EXAMPLES)
  assert results['data']['image_size'] == size
  assert bank_source.num_classes == num_classes
  (bank_file,) = glob.glob(str(tmp_path / 'eval' / 'features' / 'train-*.npy'))
  (eval_file,) = glob.glob(str(tmp_path / 'eval' / 'features' / 'eval-*.npy'))
  expected = _brute_force_knn_top1(np.load(bank_file), bank_source.labels, np.load(eval_file),
                                   eval_source.labels, k=3)
  assert metrics['knn3_top1'] == pytest.approx(expected, abs=1e-9)

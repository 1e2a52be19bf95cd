"""The kNN monitor: its accuracy equals a numpy brute-force weighted kNN on the same features,
its subsets are the documented draw, and it is off without labels."""


import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from bingo_jax.bags import features
from bingo_jax.configs import common
from bingo_jax.data import parallel, sources as data_sources
from bingo_jax.models import create_model, init_variables
from bingo_jax.run import knn_monitor
from bingo_jax.store import model_io

STUDENT = dict(arch='resnet18', head='moco', base_width=8, stem='cifar', head_hidden_dim=16,
               head_output_dim=8)


def _weighted_knn_top1(bank, bank_labels, queries, query_labels, k, temperature, num_classes):
  """Cosine similarity; the k most similar (ties: lower index) vote exp(sim / T) per class;
  the largest sum wins (ties: lower class). Numpy, float64."""
  normalise = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
  similarity = normalise(queries.astype(np.float64)) @ normalise(bank.astype(np.float64)).T
  correct = 0
  for row, label in zip(similarity, query_labels):
    nearest = np.lexsort((np.arange(len(row)), -row))[:k]
    scores = np.zeros(num_classes)
    np.add.at(scores, bank_labels[nearest], np.exp((row[nearest] - row[nearest].max())
                                                    / temperature))
    correct += int(np.argmax(scores)) == label
  return 100.0 * correct / len(query_labels)


def _majority_top1(bank, bank_labels, queries, query_labels, k):
  normalise = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
  similarity = normalise(queries.astype(np.float64)) @ normalise(bank.astype(np.float64)).T
  correct = 0
  for row, label in zip(similarity, query_labels):
    nearest = np.lexsort((np.arange(len(row)), -row))[:k]
    classes = bank_labels[nearest]
    counts = {c: (np.sum(classes == c), -np.argmax(classes == c)) for c in set(classes)}
    correct += max(counts, key=counts.get) == label
  return 100.0 * correct / len(query_labels)


def test_draw_subset_is_sorted_distinct_and_reproducible():
  drawn = knn_monitor.draw_subset(1000, 50, seed=3)
  assert len(drawn) == 50 and len(set(drawn.tolist())) == 50
  assert (np.diff(drawn) > 0).all() and drawn.min() >= 0 and drawn.max() < 1000
  np.testing.assert_array_equal(drawn, knn_monitor.draw_subset(1000, 50, seed=3))
  np.testing.assert_array_equal(knn_monitor.draw_subset(7, 50, seed=0), np.arange(7))
  assert [knn_monitor.is_due(s, 5, 2) for s in (0, 5, 10, 15, 20)] == [False, False, True,
                                                                        False, True]
  assert not knn_monitor.is_due(10, 5, 0)


def test_monitor_accuracy_equals_numpy_brute_force_on_the_same_features():
  rng = np.random.default_rng(0)
  # Class-dependent colours so that the features carry some class signal.
  labels = rng.integers(0, 4, 96)
  images = (rng.integers(0, 60, (96, 32, 32, 3)) + 50 * labels[:, None, None, None]).astype(
      np.uint8)
  base = data_sources.ArraySource(images, labels, num_classes=4)
  bank = knn_monitor.IndexedSubset(base, knn_monitor.draw_subset(96, 40, 0), 'bank')
  queries = knn_monitor.IndexedSubset(base, knn_monitor.draw_subset(96, 24, 1), 'queries')
  mesh = parallel.make_mesh()
  monitor = knn_monitor.KnnMonitor(bank, queries, image_size=32, batch_size=12, k=5,
                                   weighted_k=10, temperature=0.07, mesh=mesh)
  assert monitor.batch_size == 16  # rounded up to the 8 devices
  model = create_model(**STUDENT)
  variables = init_variables(model, jax.random.key(0), 32)
  metrics = monitor.evaluate(model, variables)
  bank_features, query_features = monitor.features(model, variables)

  # The subsets' rows are the base source's rows at the drawn indices.
  everything = features.extract_features(
      model_io.LoadedModel(model, variables, {}, {}), base, image_size=32, global_batch_size=16,
      mesh=mesh, normalize_features=False, progress=False)
  np.testing.assert_allclose(bank_features, everything[bank.indices], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(query_features, everything[queries.indices], rtol=1e-5, atol=1e-6)

  expected = _weighted_knn_top1(bank_features, labels[bank.indices], query_features,
                                labels[queries.indices], 10, 0.07, 4)
  assert metrics['monitor/weighted_knn10_top1'] == pytest.approx(expected, abs=1e-9)
  expected = _majority_top1(bank_features, labels[bank.indices], query_features,
                            labels[queries.indices], 5)
  assert metrics['monitor/knn5_top1'] == pytest.approx(expected, abs=1e-9)
  assert metrics['monitor/seconds'] > 0


def _file_list(root, labelled: bool) -> str:
  rng = np.random.default_rng(1)
  lines = []
  for i in range(12):
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f'{i}.png')
    lines.append(f'{i}.png' + (f' {i % 3}' if labelled else ''))
  path = root / ('labelled.txt' if labelled else 'unlabelled.txt')
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


def _config(path: str) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.data.update(source='filelist', path=path, image_size=8, eval_split='train')
  config.train.update(monitor_bank_size=10, monitor_eval_size=5)
  return config


def test_monitor_is_off_without_labels_or_when_disabled(tmp_path):
  mesh = parallel.make_mesh()
  assert knn_monitor.KnnMonitor.from_config(_config(_file_list(tmp_path, False)), mesh) is None
  labelled = _config(_file_list(tmp_path, True))
  monitor = knn_monitor.KnnMonitor.from_config(labelled, mesh)
  assert (len(monitor.bank), len(monitor.queries)) == (10, 5)
  np.testing.assert_array_equal(monitor.bank.labels, monitor.bank.indices % 3)
  assert (monitor.k, monitor.weighted_k) == (10, 10)  # clamped to the bank size
  labelled.train.monitor_every_epochs = 0
  assert knn_monitor.KnnMonitor.from_config(labelled, mesh) is None
  with pytest.raises(ValueError, match='unlabelled'):
    knn_monitor.KnnMonitor(monitor.bank, knn_monitor.IndexedSubset(
        data_sources.make_source(_config(str(tmp_path / 'unlabelled.txt')).data, 'train'),
        np.arange(3), 'unlabelled queries'), image_size=8, batch_size=8, k=1, weighted_k=1,
        temperature=0.07, mesh=mesh)


# ---------------------------------------------------------------------------------------------
# In the training loop.

NUM_IMAGES = 48
TEACHER = dict(arch='resnet18', head='moco', base_width=8, stem='cifar', head_hidden_dim=32,
               head_output_dim=16)


def test_training_logs_the_monitor_and_it_matches_brute_force_on_the_final_student(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  import tensorflow as tf
  from bingo_jax import train
  from bingo_jax.bags import bag_file
  from bingo_jax.configs import tiny_test
  from bingo_jax.store import checkpointing
  rng = np.random.default_rng(0)
  lines = []
  for i in range(NUM_IMAGES):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f'{i}.png')
    lines.append(f'{i}.png {i % 4}')
  (tmp_path / 'images.txt').write_text('\n'.join(lines) + '\n')
  config = tiny_test.get_config()
  config.data.update(path=str(tmp_path / 'images.txt'), eval_split='train')
  source = data_sources.make_source(config.data, 'train')
  neighbours = np.stack([rng.choice(np.delete(np.arange(NUM_IMAGES), i), 3, replace=False)
                         for i in range(NUM_IMAGES)])
  config.bags.path = str(tmp_path / 'bags.npz')
  bag_file.save_bags(config.bags.path, bag_file.Bags.from_neighbors(
      neighbours, method='knn', fingerprint=source.fingerprint))
  config.teacher.path = str(tmp_path / 'teacher')
  model_io.save_model(config.teacher.path, TEACHER,
                      init_variables(create_model(**TEACHER), jax.random.key(7), 32))
  # One epoch of 3 steps, the monitor after it on 40 bank images and 20 queries.
  config.train.update(epochs=1, monitor_every_epochs=1, monitor_bank_size=40,
                      monitor_eval_size=20, checkpoint_every_steps=3)
  config.eval.update(knn_k=5, knn_weighted_k=10, batch_size=16)
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(config, workdir)
  assert summary['step'] == 3
  monitored = summary['monitor']['monitor/weighted_knn10_top1']

  student = checkpointing.load_student(workdir)
  bank_indices = knn_monitor.draw_subset(NUM_IMAGES, 40, config.train.seed)
  query_indices = knn_monitor.draw_subset(NUM_IMAGES, 20, config.train.seed + 1)
  everything = features.extract_features(student, source, image_size=32, global_batch_size=16,
                                         normalize_features=False, progress=False)
  labels = np.arange(NUM_IMAGES) % 4
  expected = _weighted_knn_top1(everything[bank_indices], labels[bank_indices],
                                everything[query_indices], labels[query_indices], 10, 0.07, 4)
  assert monitored == pytest.approx(expected, abs=1e-9)

  events = event_accumulator.EventAccumulator(workdir, size_guidance={'tensors': 0})
  events.Reload()
  logged = [(event.step, float(tf.make_ndarray(event.tensor_proto)))
            for event in events.Tensors('monitor/weighted_knn10_top1')]
  assert logged == [(3, pytest.approx(expected, abs=1e-4))]

"""Bag size (paper Fig. 3) and supervised-network bags (paper Table 7): config.bags.k from the
bagging to the training positives, the ablation tool's bag files, and a network fine-tuned on
the labels, exported and read back as the bagging teacher; all against numpy brute-force kNN
on the bagging network's own features."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

import tool_runner
from bingo_jax import bagging, evaluate, input_pipeline
from bingo_jax.bags import bag_file
from bingo_jax.configs import common, fmnist_ablation
from bingo_jax.data import images as images_lib
from bingo_jax.data import sources as data_sources
from bingo_jax.data import views as views_lib
from bingo_jax.models import create_model, init_variables
from bingo_jax.store import model_io

# 18 px images cropped to 16: the centre crop's resize (to round(16 / 0.875) = 18) is then the
# identity and the crop is the slice [1:17] of each side, which the reference writes out.
STORED, CROP = 18, 16
TINY = dict(arch='resnet18', base_width=8, stem='cifar', head='moco', head_hidden_dim=32,
            head_output_dim=16)


def _images(num_classes: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Images of a few classes, each a noisy version of its class's own pattern."""
  rng = np.random.default_rng(seed)
  patterns = rng.integers(0, 256, (num_classes, STORED, STORED, 3))
  labels = np.repeat(np.arange(num_classes), per_class)
  noise = rng.normal(0, 40, (len(labels), STORED, STORED, 3))
  return np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8), labels


def _save_tiny_model(path: str, seed: int) -> str:
  model = create_model(**TINY)
  variables = init_variables(model, jax.random.key(seed), image_size=CROP)
  return model_io.save_model(path, TINY, variables, metadata={'test': 'tiny teacher'})


def _brute_force_bags(model_path: str, images: np.ndarray, k: int) -> np.ndarray:
  """numpy reference: the model's pooled features of the centre crops, L2-normalised and
  stored as float16 (as the feature shards), then the k largest inner products over every
  other image (float64)."""
  loaded = model_io.load_model(model_path)
  crops = images[:, 1:1 + CROP, 1:1 + CROP]
  features, _ = loaded.embed(np.asarray(images_lib.normalize(crops)))
  features = features.astype(np.float64)
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  x = features.astype(np.float16).astype(np.float64)
  similarity = x @ x.T
  np.fill_diagonal(similarity, -np.inf)
  order = np.argsort(-similarity, axis=1, kind='stable')
  # The test is only meaningful where the k-th and (k+1)-th neighbours are told apart.
  rows = np.arange(len(x))
  gap = similarity[rows, order[:, k - 1]] - similarity[rows, order[:, k]]
  assert gap.min() > 1e-6, gap.min()
  return order[:, :k]


def _bagging_config(k: int):
  config = common.base_config()
  config.data.image_size = CROP
  config.bags.update(method='knn', k=k, batch_size=8, shard_size=16)
  return config


@pytest.mark.parametrize('k', [1, 4])
def test_bags_k_reaches_the_bag_file_and_the_training_positives(tmp_path, k):
  """bags.k neighbours are written (exactly numpy's), and the training pipeline draws every
  positive from them, each of the k over the epochs."""
  images, labels = _images(3, 8, seed=k)
  source = data_sources.ArraySource(images, labels)
  config = _bagging_config(k)
  config.teacher.path = _save_tiny_model(str(tmp_path / 'teacher'), seed=0)
  bags, path = bagging.compute_bags(config, str(tmp_path / 'bagging'), source=source,
                                    progress=False)
  loaded = bag_file.load_bags(path)
  expected = _brute_force_bags(config.teacher.path, images, k)
  assert loaded.metadata['k'] == k and loaded.neighbors.shape == (24, k)
  np.testing.assert_array_equal(loaded.neighbors, expected)

  config.train.seed, config.train.batch_size = 0, 8
  epochs, steps_per_epoch = 40, 3
  iterator = input_pipeline.create_train_iterator(
      config, source, loaded, start_step=0, local_batch_size=8, process_index=0,
      process_count=1, views=(views_lib.QUERY, views_lib.POS_Q))
  drawn = {anchor: set() for anchor in range(24)}
  for _ in range(epochs * steps_per_epoch):
    batch = next(iterator)
    for anchor, positive in zip(batch['anchor_index'], batch['positive_index']):
      assert positive in expected[anchor], (anchor, positive)
      drawn[int(anchor)].add(int(positive))
  # 40 draws per anchor: each of the k members is missed with probability (1 - 1/k)^40.
  assert all(drawn[anchor] == set(expected[anchor]) for anchor in range(24))


@pytest.fixture()
def ablation_tool():
  return tool_runner._load('fmnist_ablation.py')


def test_k_sweep_rows_bag_with_their_own_k_into_their_own_files(tmp_path, ablation_tool,
                                                                 monkeypatch):
  """Each k row bags with its k into bags_<row>.npz; the teacher's kNN bags share the k = 5
  pass's features; the supervised row bags the supervised network's features."""
  assert {fmnist_ablation.get_config(row).bags.k for row in ('knn_k1', 'knn', 'knn_k10',
                                                             'knn_k20')} == {1, 5, 10, 20}
  # Every row is listed: in the default table or among the rows --rows names.
  assert sorted(ablation_tool.ROW_ORDER + ablation_tool.EXTRA_ROWS) == sorted(fmnist_ablation.ROWS)
  calls = {}

  def fake_compute_bags(config, report_dir):
    calls[os.path.basename(report_dir)] = (config.bags.method, config.bags.k, config.bags.path,
                                           config.bags.features_dir, config.teacher.path)
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, 'bag_report.json'), 'w') as f:
      f.write('{"purity": 0.5}')
    open(config.bags.path, 'w').close()

  monkeypatch.setattr(bagging, 'compute_bags', fake_compute_bags)
  workdir = str(tmp_path)
  paths = {}
  for bag in ('knn', 'knn_k1', 'knn_k10', 'knn_k20', 'supervised'):
    paths[bag], purity = ablation_tool.make_bags(
        bag, '/t/teacher', workdir, [], '/t/supervised' if bag == 'supervised' else None)
    assert purity == 0.5
  shared = os.path.join(workdir, 'bagging_knn', 'features')
  assert calls == {
      'bagging_knn': ('knn', 5, paths['knn'], None, '/t/teacher'),
      'bagging_knn_k1': ('knn', 1, paths['knn_k1'], shared, '/t/teacher'),
      'bagging_knn_k10': ('knn', 10, paths['knn_k10'], shared, '/t/teacher'),
      'bagging_knn_k20': ('knn', 20, paths['knn_k20'], shared, '/t/teacher'),
      'bagging_supervised': ('knn', 5, paths['supervised'], None, '/t/supervised')}
  assert len(set(paths.values())) == 5
  assert paths['knn_k10'] == os.path.join(workdir, 'bags_knn_k10.npz')
  # A finished bag file is not made again.
  calls.clear()
  ablation_tool.make_bags('knn_k1', '/t/teacher', workdir, [])
  assert not calls
  # A table-wide k would reuse the per-row file names: refused, naming the k rows.
  with pytest.raises(SystemExit, match='knn_k1, knn, knn_k10, knn_k20'):
    ablation_tool.check_overrides(['train.epochs=3', 'bags.k=10'])
  ablation_tool.check_overrides(['train.epochs=3'])


def _write_folder(root, images: np.ndarray, labels: np.ndarray) -> None:
  for index, (image, label) in enumerate(zip(images, labels)):
    directory = root / f'class{label}'
    directory.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(directory / f'{index:03d}.png')


def test_supervised_network_is_exported_by_finetune_and_bags_as_the_teacher(tmp_path):
  """The finetune protocol on every training label (fraction 1) exports a model file; bagging
  reads it as the teacher, and its bags are numpy's brute-force kNN on its features."""
  train_images, train_labels = _images(3, 8, seed=10)
  test_images, test_labels = _images(3, 4, seed=11)
  _write_folder(tmp_path / 'data' / 'train', train_images, train_labels)
  _write_folder(tmp_path / 'data' / 'test', test_images, test_labels)
  config = _bagging_config(3)
  config.data.update(source='folder', path=str(tmp_path / 'data'), train_split='train',
                     eval_split='test')
  fmnist_ablation.supervised_teacher_config(config)
  assert config.eval.finetune_fraction == 1.0
  config.eval.update(batch_size=8, finetune_epochs=1,
                     finetune_export=str(tmp_path / 'supervised'))
  start = _save_tiny_model(str(tmp_path / 'teacher'), seed=0)
  record = evaluate.evaluate(config, start, 'finetune', str(tmp_path / 'finetune'))
  exported = record['metrics']['exported_model']
  assert exported == str(tmp_path / 'supervised')
  assert record['metrics']['num_labelled'] == 24  # every training image
  assert record['metrics']['labelled_fraction'] == 1.0
  supervised = model_io.load_model(exported)
  assert supervised.model_config['head'] == 'linear'
  assert supervised.model_config['num_classes'] == 3
  assert supervised.metadata['supervised']['labelled_fraction'] == 1.0
  # The exported backbone is the trained one, not the starting teacher's.
  before = model_io.load_model(start).variables['params']['backbone']
  assert any(not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(before), jax.tree.leaves(supervised.variables['params']['backbone'])))
  with pytest.raises(FileExistsError, match='finetune_export'):
    evaluate.evaluate(config, start, 'finetune', str(tmp_path / 'finetune_again'))

  config.teacher.path = exported
  source = data_sources.make_source(config.data, 'train')
  _, path = bagging.compute_bags(config, str(tmp_path / 'bagging'), progress=False)
  bags = bag_file.load_bags(path)
  assert bags.metadata['teacher']['path'] == exported
  # The folder source lists the images class by class, in file-name order: as written.
  np.testing.assert_array_equal(np.asarray(source.labels), train_labels)
  np.testing.assert_array_equal(bags.neighbors, _brute_force_bags(exported, train_images, 3))


def test_the_tool_fine_tunes_the_supervised_network_once(tmp_path, ablation_tool, monkeypatch):
  """The supervised row's network: the finetune protocol from the teacher on every label,
  exported into the workdir; a rerun finds it and trains nothing."""
  calls = []

  def fake_evaluate(config, checkpoint, protocol, workdir):
    calls.append((checkpoint, protocol, workdir, config.eval.finetune_fraction,
                  config.eval.finetune_export, config.data.train_split))
    os.makedirs(config.eval.finetune_export)

  monkeypatch.setattr(evaluate, 'evaluate', fake_evaluate)
  path = ablation_tool.make_supervised_teacher('/t/teacher', str(tmp_path), [])
  assert path == str(tmp_path / 'supervised_teacher' / 'model')
  assert calls == [('/t/teacher', 'finetune', str(tmp_path / 'supervised_teacher'), 1.0, path,
                    'train[:12800]')]
  assert ablation_tool.make_supervised_teacher('/t/teacher', str(tmp_path), []) == path
  assert len(calls) == 1


def test_fraction_one_takes_every_labelled_image_whatever_the_class_counts(tmp_path):
  from bingo_jax.eval import subsets
  labels = np.array([0] * 7 + [1] * 2 + [2] * 4)  # no class-balanced subset of all 13 exists
  with pytest.raises(ValueError, match='fewer than its share'):
    subsets.class_balanced_subset(labels, 1.0)
  identifiers = [f'img{i}.png' for i in range(len(labels))]
  indices, path = subsets.finetune_subset(identifiers, labels, workdir=str(tmp_path),
                                          fraction=1.0)
  np.testing.assert_array_equal(indices, np.arange(13))
  assert open(path).read().split() == identifiers


def test_self_bags_make_the_anchor_its_own_positive_on_host_and_device(tmp_path, ablation_tool):
  """The control of row (f): bag method 'self' puts every image alone in its group, so both
  input paths draw the anchor's own image as the positive (its own, independent views), and
  the row trains the paper's loss without CutMix; its purity is reported as '-'."""
  from bingo_jax.data import parallel
  from bingo_jax.run import device_data
  images, labels = _images(3, 8, seed=5)
  source = data_sources.ArraySource(images, labels)
  config = _bagging_config(5)
  config.bags.method = 'self'
  config.data.update(source='fashion_mnist', path='/data/fmnist')  # recorded, not read
  bags, path = bagging.compute_bags(config, str(tmp_path / 'bagging'), source=source,
                                    progress=False)
  loaded = bag_file.load_bags(path)
  assert loaded.method == 'self' and loaded.kind == 'groups'
  assert all(loaded.bag_size(i) == 0 for i in range(24))
  assert ablation_tool.read_purity(str(tmp_path / 'bagging' / 'bag_report.json')) is None

  config.train.seed, config.train.batch_size = 0, 8
  iterator = input_pipeline.create_train_iterator(
      config, source, loaded, start_step=0, local_batch_size=8, process_index=0,
      process_count=1, views=(views_lib.QUERY, views_lib.POS_Q))
  seen = set()
  for _ in range(6):
    batch = next(iterator)
    np.testing.assert_array_equal(batch['positive_index'], batch['anchor_index'])
    seen.update(batch['anchor_index'].tolist())
    # Two independent augmentations of one image, not one view twice.
    assert all(not np.array_equal(q, p) for q, p in zip(batch[views_lib.QUERY],
                                                        batch[views_lib.POS_Q]))
  assert seen == set(range(24))

  mesh = parallel.make_mesh(jax.devices()[:1])
  data = device_data.place_on_devices(source, loaded, mesh)
  for step in range(6):
    batch = jax.tree.map(np.asarray, device_data.device_batch(
        data, step, seed=1, steps_per_epoch=3, global_batch_size=8,
        views=('query', 'key', 'pos_q', 'pos_k')))
    np.testing.assert_array_equal(batch['positive_index'], batch['anchor_index'])
    np.testing.assert_array_equal(batch['positive_canvas'], images[batch['anchor_index']])

  row = fmnist_ablation.get_config('paper_eq8_self')
  reference = fmnist_ablation.get_config('paper_eq8')
  assert (row.bags.method, row.train.loss, row.train.cutmix) == ('self', 'paper_eq8', 'none')
  assert row.to_dict() == {**reference.to_dict(),
                           'bags': {**reference.bags.to_dict(), 'method': 'self'}}
  table = {'paper_eq8_self': {m: {'mean': 1.0, 'std': 0.0, 'min': 1.0, 'max': 1.0}
                              for m in ('knn_top1', 'linear_fast_top1')}
           | {'wall_minutes': 1.0, 'seeds': [0]}}
  line = ablation_tool.format_markdown(table, {}, {'self': None}, 'cpu').splitlines()[4]
  assert line.startswith(f'| {fmnist_ablation.ROWS["paper_eq8_self"]} | - |'), line
  # The bag file names the data it was made from, without the TFDS name of another source.
  assert loaded.metadata['data'] == {'source': 'fashion_mnist', 'path': '/data/fmnist',
                                     'train_split': 'train'}

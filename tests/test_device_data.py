"""Device-mode data (config.data.augment_on = 'device'): the host canvas batches against PIL
decodes (full and DCT-scaled with ``Image.draft``), the on-device batches against numpy checks
of the data order (a permutation per epoch, positives from the bags, uniform draws), and a
CLI training from the data held on the devices, resumed after a preemption, in processes
where ``import tensorflow`` fails."""

import gzip
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
import scipy.stats
from PIL import Image

from bingo_jax import input_pipeline
from bingo_jax.bags import bag_file
from bingo_jax.configs import tiny_test
from bingo_jax.data import parallel
from bingo_jax.data import sources as data_sources
from bingo_jax.models import create_model, init_variables
from bingo_jax.run import device_data
from bingo_jax.store import checkpointing
from bingo_jax.store import model_io
from bingo_jax.testing import subprocess_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- host canvases


@pytest.fixture(scope='module')
def jpeg_folder(tmp_path_factory):
  """Six images: JPEGs that fit a 64 px canvas, JPEGs that need DCT scaling by 2 and 4, a
  PNG larger than the canvas (resized on the host)."""
  root = tmp_path_factory.mktemp('canvas_images')
  rng = np.random.default_rng(0)
  sizes = [(40, 30, 'jpg'), (64, 48, 'jpg'), (100, 70, 'jpg'), (200, 120, 'jpg'),
           (30, 50, 'jpg'), (80, 60, 'png')]
  lines = []
  for i, (width, height, ext) in enumerate(sizes):
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
    image = np.stack([rows * 3, cols * 2, (rows + cols) * 2], -1) % 256
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    name = f'{i}.{ext}'
    Image.fromarray(image).save(root / name, quality=95) if ext == 'jpg' else (
        Image.fromarray(image).save(root / name))
    lines.append(name)
  (root / 'list.txt').write_text('\n'.join(lines) + '\n')
  return root, sizes


def _config(list_path, canvas_size=64):
  config = tiny_test.get_config()
  config.data.path = str(list_path)
  config.data.canvas_size = canvas_size
  config.data.in_memory = False
  return config


def test_canvases_hold_each_image_decoded_once_dct_scaled_when_large(jpeg_folder):
  root, sizes = jpeg_folder
  config = _config(root / 'list.txt')
  source = data_sources.make_source(config.data, 'train')
  batches = input_pipeline.create_train_iterator(
      config, source, None, start_step=0, local_batch_size=6, process_index=0,
      process_count=1, views=('query', 'key'), output='canvases')
  batch = next(batches)
  assert batch['anchor_canvas'].shape == (6, 64, 64, 3) and batch['anchor_canvas'].dtype == np.uint8
  assert batch['view_keys'].shape == (6, 2, 2) and batch['view_keys'].dtype == np.uint32
  assert 'positive_canvas' not in batch
  assert len({tuple(k) for k in batch['view_keys'].reshape(-1, 2)}) == 12
  for row, index in enumerate(batch['anchor_index']):
    width, height, ext = sizes[index]
    canvas, size = batch['anchor_canvas'][row], batch['anchor_size'][row]
    assert tuple(size[2:]) == (height, width)
    with Image.open(root / f'{index}.{ext}') as image:
      if ext == 'jpg':
        # The smallest DCT scale 1/r that fits the canvas: PIL's draft() asks libjpeg for it.
        ratio = next(r for r in (1, 2, 4, 8) if -(-width // r) <= 64 and -(-height // r) <= 64)
        if ratio > 1:
          image.draft('RGB', (-(-width // ratio), -(-height // ratio)))
        reference = np.asarray(image.convert('RGB'))
        assert reference.shape[:2] == (-(-height // ratio), -(-width // ratio))
      else:
        scale = 64 / max(width, height)
        reference = np.asarray(image.convert('RGB').resize(
            (int(width * scale), int(height * scale)), Image.BILINEAR, reducing_gap=None))
    valid_height, valid_width = size[:2]
    assert (valid_height, valid_width) == reference.shape[:2], index
    diff = np.abs(canvas[:valid_height, :valid_width].astype(int) - reference)
    assert diff.mean() < 1.0 and np.mean(diff <= 2) > 0.98, (index, diff.mean())
    assert not canvas[valid_height:].any() and not canvas[:, valid_width:].any()


def test_canvas_batches_follow_the_host_pipelines_order_and_positives(jpeg_folder):
  root, _ = jpeg_folder
  config = _config(root / 'list.txt')
  source = data_sources.make_source(config.data, 'train')
  neighbours = np.array([[(i + 1) % 6, (i + 2) % 6] for i in range(6)])
  bags = bag_file.Bags.from_neighbors(neighbours, method='knn', fingerprint=source.fingerprint)
  make = lambda output: input_pipeline.create_train_iterator(  # noqa: E731
      config, source, bags, start_step=1, local_batch_size=3, process_index=0,
      process_count=1, output=output)
  views, canvases = next(make('views')), next(make('canvases'))
  for key in ('anchor_index', 'positive_index'):
    np.testing.assert_array_equal(views[key], canvases[key])
  assert canvases['positive_canvas'].shape == (3, 64, 64, 3)
  assert canvases['view_keys'].shape == (3, 4, 2)


# ---------------------------------------------------------------- the data set on the devices


def _device_batches(images, bags, steps, batch_size=8, views=('query', 'key', 'pos_q', 'pos_k')):
  mesh = parallel.make_mesh(jax.devices()[:1])
  source = data_sources.ArraySource(images)
  data = device_data.place_on_devices(source, bags, mesh)
  steps_per_epoch = len(images) // batch_size
  fn = jax.jit(lambda d, s: device_data.device_batch(
      d, s, seed=3, steps_per_epoch=steps_per_epoch, global_batch_size=batch_size, views=views))
  return [jax.tree.map(np.asarray, fn(data, step)) for step in range(steps)]


def test_on_device_order_is_a_permutation_per_epoch_with_bag_positives():
  num_images, batch_size = 36, 8  # 4 steps per epoch, 4 images dropped each epoch
  images = np.random.default_rng(0).integers(0, 256, (num_images, 5, 6, 1), dtype=np.uint8)
  neighbours = np.array([np.random.default_rng(i).choice(
      np.delete(np.arange(num_images), i), 3, replace=False) for i in range(num_images)])
  bags = bag_file.Bags.from_neighbors(neighbours, method='knn', fingerprint='x')
  batches = _device_batches(images, bags, steps=8, batch_size=batch_size)
  epochs = [np.concatenate([b['anchor_index'] for b in batches[e * 4:(e + 1) * 4]])
            for e in range(2)]
  for anchors in epochs:
    assert len(set(anchors.tolist())) == 32 and anchors.min() >= 0 and anchors.max() < 36
  assert not np.array_equal(epochs[0], epochs[1])
  for batch in batches:
    anchors, positives = batch['anchor_index'], batch['positive_index']
    assert all(p in neighbours[a] for a, p in zip(anchors, positives))
    # Canvases are the stored images (grey ones kept on one channel), with their own size.
    np.testing.assert_array_equal(batch['anchor_canvas'], images[anchors])
    np.testing.assert_array_equal(batch['positive_canvas'], images[positives])
    np.testing.assert_array_equal(batch['anchor_size'], np.tile([5, 6, 5, 6], (batch_size, 1)))
    assert len({tuple(k) for k in batch['view_keys'].reshape(-1, 2)}) == batch_size * 4
  # The positive is a uniform draw from the bag (chi-square over the bag slots).
  batches = _device_batches(images, bags, steps=60, batch_size=batch_size)
  slots = [list(neighbours[a]).index(p) for b in batches
           for a, p in zip(b['anchor_index'], b['positive_index'])]
  assert scipy.stats.chisquare(np.bincount(slots, minlength=3)).pvalue > 1e-3


def test_on_device_group_bags_skip_the_anchor():
  groups = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 0, 1, 2, 3, 3, 3])  # image 9: not alone
  bags = bag_file.Bags.from_groups(groups, method='labels', fingerprint='x')
  images = np.zeros((16, 4, 4, 3), np.uint8)
  for batch in _device_batches(images, bags, steps=20, batch_size=8):
    for anchor, positive in zip(batch['anchor_index'], batch['positive_index']):
      assert positive != anchor and groups[positive] == groups[anchor]


def test_small_fixed_shape_sources_are_held_on_the_devices(jpeg_folder):
  config = tiny_test.get_config()
  arrays = data_sources.ArraySource(np.zeros((20, 8, 8, 1), np.uint8))
  assert device_data.use_on_device_source(config, arrays)
  subset = data_sources.SubsetSource(arrays, 0, 10, 'first 10')
  np.testing.assert_array_equal(device_data.source_array(subset), np.zeros((10, 8, 8, 1)))
  config.data.on_device_max_mb = 0
  assert not device_data.use_on_device_source(config, arrays)
  config.data.augment_on = 'host'
  assert not device_data.use_on_device_source(config, arrays)
  files = data_sources.make_source(_config(jpeg_folder[0] / 'list.txt').data, 'train')
  config.data.augment_on, config.data.on_device = 'device', 'always'
  with pytest.raises(ValueError, match='not an in-memory array'):
    device_data.use_on_device_source(config, files)


# ---------------------------------------------------------------- CLI without TensorFlow


def _write_idx(path, array):
  header = struct.pack('>BBBB', 0, 0, 0x08, array.ndim) + struct.pack(f'>{array.ndim}I',
                                                                      *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope='module')
def fashion_files(tmp_path_factory):
  """Fashion-MNIST-format files of 48 random 28 px images, bags for them, a small teacher."""
  root = tmp_path_factory.mktemp('fmnist_files')
  rng = np.random.default_rng(1)
  _write_idx(root / 'train-images-idx3-ubyte.gz', rng.integers(0, 256, (48, 28, 28)))
  _write_idx(root / 'train-labels-idx1-ubyte.gz', rng.integers(0, 10, (48,)))
  empty_tfds = root / 'no_tfds'
  os.makedirs(empty_tfds)
  source = data_sources.fashion_mnist_source('train', str(empty_tfds), str(root))
  neighbours = np.stack([rng.choice(np.delete(np.arange(48), i), 3, replace=False)
                         for i in range(48)])
  bag_file.save_bags(str(root / 'bags.npz'), bag_file.Bags.from_neighbors(
      neighbours, method='knn', fingerprint=source.fingerprint))
  teacher = dict(arch='resnet18', head='moco', base_width=8, stem='cifar', head_hidden_dim=32,
                 head_output_dim=16)
  model_io.save_model(str(root / 'teacher'), teacher,
                      init_variables(create_model(**teacher), jax.random.key(7), 32))
  # Any `import tensorflow` (or tensorflow_datasets) in the training process fails.
  blocker = root / 'block_tf'
  os.makedirs(blocker)
  (blocker / 'sitecustomize.py').write_text(
      "import sys\nsys.modules['tensorflow'] = None\nsys.modules['tensorflow_datasets'] = None\n")
  return root


def _train_command(files, workdir, *extra):
  return [sys.executable, '-m', 'bingo_jax.train', '--config', 'tiny_test',
          '--workdir', str(workdir), '--config.data.source=fashion_mnist',
          f'--config.data.path={files}', f'--config.data.data_dir={files / "no_tfds"}',
          '--config.train.monitor_every_epochs=0', '--config.data.on_device=always',
          f'--config.teacher.path={files / "teacher"}',
          f'--config.bags.path={files / "bags.npz"}', '--config.train.max_steps=4', *extra]


def test_cli_trains_from_device_data_without_tensorflow_and_resumes(fashion_files, tmp_path):
  environment = subprocess_environment(str(fashion_files / 'jax_cache'),
                                       pythonpath=(str(fashion_files / 'block_tf'), REPO))
  probe = subprocess.run([sys.executable, '-c', 'import tensorflow'], env=environment,
                         capture_output=True, text=True)
  assert probe.returncode != 0 and 'import of tensorflow halted' in probe.stderr
  popen = lambda command: subprocess.Popen(command, cwd=REPO, env=environment, text=True,  # noqa: E731
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

  def wait(process, what):
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, f'{what} failed (rc {process.returncode}):\n{stderr[-4000:]}'
    return stderr

  straight_dir, resumed_dir = tmp_path / 'straight', tmp_path / 'resumed'
  straight = popen(_train_command(fashion_files, straight_dir))
  interrupted = popen(_train_command(fashion_files, resumed_dir,
                                     '--simulate_preemption_at_step=2'))
  log = wait(straight, 'straight run')
  assert 'held on the devices' in log
  wait(interrupted, 'interrupted run')
  wait(popen(_train_command(fashion_files, resumed_dir)), 'rerun')

  def stored(workdir):
    checkpointer = checkpointing.TrainCheckpointer(str(workdir), keep=1, read_only=True)
    arrays = checkpointer.restore_arrays(4)
    checkpointer.close()
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(arrays)[0]}
  straight_state, resumed_state = stored(straight_dir), stored(resumed_dir)
  assert sorted(straight_state) == sorted(resumed_state)
  for key, value in straight_state.items():
    np.testing.assert_array_equal(resumed_state[key], value, err_msg=key)
  assert int(straight_state["['step']"]) == 4

"""Input pipelines: the evaluation centre crop against torchvision's definition (PIL), process
shards, and the training batches (bag membership, determinism, resume, per-process shards)."""

import numpy as np
import pytest
from PIL import Image

from bingo_jax import input_pipeline
from bingo_jax.data import images, sources as data_sources, views as views_lib


def _pil_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision Resize(round(size / CENTER_CROP_FRACTION)) + CenterCrop(size), on PIL."""
  resize_to = int(round(size / images.CENTER_CROP_FRACTION))
  height, width = image.shape[:2]
  if width <= height:
    new_width, new_height = resize_to, int(resize_to * height / width)
  else:
    new_width, new_height = int(resize_to * width / height), resize_to
  resized = np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.BILINEAR))
  top = int(round((new_height - size) / 2.0))
  left = int(round((new_width - size) / 2.0))
  return resized[top:top + size, left:left + size]


def _smooth_image(rng, height, width):
  # Smooth content: the comparison is about geometry, not about high-frequency ringing.
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  phase = rng.uniform(0, 6, 3)
  channels = [127.5 + 120 * np.sin(3 * x + 2 * y + p) for p in phase]
  return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


@pytest.mark.parametrize('height,width,size,content', [
    (28, 28, 32, 'smooth'), (50, 37, 24, 'noise'), (40, 90, 32, 'smooth'),
    (300, 200, 32, 'noise')])
def test_eval_center_crop_matches_pil_reference(height, width, size, content):
  rng = np.random.default_rng(height)
  image = (_smooth_image(rng, height, width) if content == 'smooth' else
           rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
  source = data_sources.ArraySource(image[None])
  batch = next(input_pipeline.make_eval_dataset(source, size, 1, process_index=0,
                                                process_count=1))
  reference = _pil_center_crop(image, size)
  difference = np.abs(batch['image'][0].astype(int) - reference.astype(int))
  # PIL's fixed-point bilinear weights and uint8 intermediate vs TF's float resize: at most
  # one level (measured mean 0.1-0.2); a one-pixel shift of the crop gives a mean of 2-4.
  assert difference.max() <= 1 and difference.mean() < 0.3, (difference.max(), difference.mean())


def test_eval_range_reads_only_its_images_in_order():
  """``start``/``stop``: indices of the full source, labels from it, padding inside the range."""
  num_images, start, stop, batch_size = 20, 7, 16, 4
  pixels = np.arange(num_images, dtype=np.uint8)[:, None, None, None] * np.ones(
      (1, 8, 8, 3), np.uint8)
  labels = np.arange(num_images) % 3
  source = data_sources.ArraySource(pixels, labels)
  rows = {}
  for process in range(2):
    batches = list(input_pipeline.make_eval_dataset(source, 8, batch_size, start=start,
                                                    stop=stop, process_index=process,
                                                    process_count=2))
    # ceil(9 / 2) = 5 images per process -> 2 batches of 4 on both processes.
    assert len(batches) == 2
    for batch in batches:
      valid = batch['mask']
      # Constant images: the centre crop of image i is i everywhere, whatever the resize.
      assert (batch['image'][valid] == batch['index'][valid, None, None, None]).all()
      np.testing.assert_array_equal(batch['label'][valid], labels[batch['index'][valid]])
      assert (batch['index'][~valid] == -1).all()
      rows.update({int(i): process for i in batch['index'][valid]})
  assert sorted(rows) == list(range(start, stop))
  assert [rows[i] for i in range(start, stop)] == [0] * 5 + [1] * 4
  with pytest.raises(ValueError, match=r'\[5:5\]'):
    input_pipeline.make_eval_dataset(source, 8, 4, start=5, stop=5, process_index=0,
                                     process_count=1)


def test_eval_shards_cover_in_order_with_masked_padding():
  num_images, batch_size, processes = 23, 4, 3
  pixels = np.arange(num_images, dtype=np.uint8)[:, None, None, None] * np.ones(
      (1, 8, 8, 3), np.uint8)
  labels = np.arange(num_images) % 5
  source = data_sources.ArraySource(pixels, labels)
  seen = []
  for process in range(processes):
    batches = list(input_pipeline.make_eval_dataset(source, 8, batch_size,
                                                    process_index=process,
                                                    process_count=processes))
    # ceil(23 / 3) = 8 images per process -> 2 batches of 4, on every process.
    assert len(batches) == input_pipeline.eval_num_batches(num_images, batch_size, processes)
    assert len(batches) == 2
    for batch in batches:
      assert batch['image'].shape == (batch_size, 8, 8, 3) and batch['image'].dtype == np.uint8
      assert batch['index'].dtype == np.int32 and batch['label'].dtype == np.int32
      valid = batch['mask']
      np.testing.assert_array_equal(batch['image'][valid, 0, 0, 0], batch['index'][valid])
      np.testing.assert_array_equal(batch['label'][valid], labels[batch['index'][valid]])
      assert (batch['index'][~valid] == -1).all() and (batch['label'][~valid] == -1).all()
      seen.extend(batch['index'][valid].tolist())
  assert seen == list(range(num_images))  # contiguous slices, in order, each image once


# ---------------------------------------------------------------- training batches

from bingo_jax.bags import bag_file  # noqa: E402
from bingo_jax.configs.common import base_config  # noqa: E402

NUM_IMAGES, GLOBAL_BATCH, IMAGE_SIZE = 40, 8, 16
STEPS = NUM_IMAGES // GLOBAL_BATCH  # 5 steps per epoch


def _config(seed=0):
  config = base_config()
  config.data.image_size = IMAGE_SIZE
  config.train.seed = seed
  return config


@pytest.fixture(scope='module')
def train_source():
  rng = np.random.default_rng(5)
  images_ = rng.integers(0, 256, (NUM_IMAGES, 20, 24, 3), dtype=np.uint8)
  return data_sources.ArraySource(images_, np.arange(NUM_IMAGES) % 5)


@pytest.fixture(scope='module')
def group_bags(train_source):
  return bag_file.Bags.from_groups(train_source.labels, method='labels',
                                   fingerprint=train_source.fingerprint)


def _batches(source, bags, count, *, start_step=0, seed=0, process_index=0, process_count=1):
  iterator = input_pipeline.create_train_iterator(
      _config(seed), source, bags, start_step=start_step,
      local_batch_size=GLOBAL_BATCH // process_count, process_index=process_index,
      process_count=process_count)
  return [next(iterator) for _ in range(count)]


@pytest.fixture(scope='module')
def straight_run(train_source, group_bags):
  return _batches(train_source, group_bags, 2 * STEPS)


def test_steps_per_epoch_drops_the_remainder():
  assert input_pipeline.steps_per_epoch(1281167, 256) == 5004
  with pytest.raises(ValueError, match=r'7 training images do not fill one global batch of 8 '
                                       r'\(config.train.batch_size\)'):
    input_pipeline.steps_per_epoch(7, 8)


def test_train_batch_shapes_and_dtypes(straight_run):
  batch = straight_run[0]
  for key in views_lib.VIEW_KEYS:
    assert batch[key].shape == (GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), key
    assert batch[key].dtype == np.uint8
  for key in ('anchor_index', 'positive_index'):
    assert batch[key].shape == (GLOBAL_BATCH,) and batch[key].dtype == np.int32
  # Four independent draws: no two views of a pair are equal.
  assert not np.array_equal(batch['query'], batch['key'])
  assert not np.array_equal(batch['pos_q'], batch['pos_k'])


def test_positive_is_a_bag_member_drawn_afresh_each_epoch(straight_run, group_bags):
  positives = {}
  for batch in straight_run:
    for anchor, positive in zip(batch['anchor_index'], batch['positive_index']):
      assert positive in group_bags.members(int(anchor)), (anchor, positive)
      positives.setdefault(int(anchor), []).append(int(positive))
  # Every anchor seen once per epoch; bags of 7 -> the two draws differ for ~6/7 of them.
  assert all(len(p) == 2 for p in positives.values())
  assert sum(p[0] != p[1] for p in positives.values()) > NUM_IMAGES // 2


def test_fixed_bags_positive_in_bag(train_source):
  neighbors = np.stack([(np.arange(NUM_IMAGES) + d) % NUM_IMAGES for d in (1, 2, 3)], 1)
  bags = bag_file.Bags.from_neighbors(neighbors, method='knn',
                                      fingerprint=train_source.fingerprint)
  for batch in _batches(train_source, bags, 2):
    for anchor, positive in zip(batch['anchor_index'], batch['positive_index']):
      assert positive in neighbors[anchor]


def test_each_epoch_is_a_new_permutation(straight_run):
  epochs = [np.concatenate([b['anchor_index'] for b in straight_run[e * STEPS:(e + 1) * STEPS]])
            for e in range(2)]
  for anchors in epochs:
    np.testing.assert_array_equal(np.sort(anchors), np.arange(NUM_IMAGES))
  assert not np.array_equal(epochs[0], epochs[1])


def test_same_seed_same_batches_other_seed_other_order(train_source, group_bags,
                                                        straight_run):
  again = _batches(train_source, group_bags, 2)
  for a, b in zip(again, straight_run):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other = _batches(train_source, group_bags, 1, seed=1)[0]
  assert not np.array_equal(other['anchor_index'], straight_run[0]['anchor_index'])


@pytest.mark.parametrize('start_step', [3, 7])  # inside epoch 0, inside epoch 1
def test_resume_gives_the_straight_runs_batches(train_source, group_bags, straight_run,
                                                start_step):
  resumed = _batches(train_source, group_bags, 2, start_step=start_step)
  for offset, batch in enumerate(resumed):
    for key in batch:
      np.testing.assert_array_equal(batch[key], straight_run[start_step + offset][key], key)


def test_processes_split_the_global_batch(train_source, group_bags, straight_run):
  shards = [_batches(train_source, group_bags, STEPS, process_index=p, process_count=2)
            for p in range(2)]
  for step in range(STEPS):
    parts = [shards[p][step] for p in range(2)]
    assert not set(parts[0]['anchor_index']) & set(parts[1]['anchor_index'])
    # The global batch, views included, is the same however many processes feed it.
    for key in parts[0]:
      np.testing.assert_array_equal(np.concatenate([parts[0][key], parts[1][key]]),
                                    straight_run[step][key], key)


def test_bags_for_other_images_are_refused(train_source):
  bags = bag_file.Bags.from_groups(np.zeros(NUM_IMAGES, int), method='labels',
                                   fingerprint='0' * 64)
  with pytest.raises(ValueError, match='does not belong'):
    input_pipeline.create_train_iterator(_config(), train_source, bags, start_step=0,
                                         local_batch_size=8, process_index=0, process_count=1)


def test_encoded_folder_source(tmp_path):
  rng = np.random.default_rng(2)
  for index in range(8):
    path = tmp_path / f'class{index % 2}' / f'{index}.{"jpeg" if index % 3 else "png"}'
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (30 + index, 40, 3), dtype=np.uint8)).save(
        path, format='JPEG' if index % 3 else 'PNG')
  source = data_sources.folder_source(str(tmp_path))
  bags = bag_file.Bags.from_groups(source.labels, method='labels',
                                   fingerprint=source.fingerprint)
  iterator = input_pipeline.create_train_iterator(_config(), source, bags, start_step=0,
                                                  local_batch_size=4, process_index=0,
                                                  process_count=1)
  batch = next(iterator)
  assert batch['query'].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert (source.labels[batch['positive_index']] == source.labels[batch['anchor_index']]).all()


def test_tfds_random_access_source():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=8):
    source = data_sources.make_source({'source': 'tfds', 'name': 'cifar10'}, 'train')
    neighbors = np.stack([(np.arange(8) + 1) % 8, (np.arange(8) + 2) % 8], 1)
    bags = bag_file.Bags.from_neighbors(neighbors, method='knn', fingerprint=source.fingerprint)
    batch = next(input_pipeline.create_train_iterator(
        _config(), source, bags, start_step=0, local_batch_size=4, process_index=0,
        process_count=1))
    assert batch['pos_k'].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    eval_batch = next(input_pipeline.make_eval_dataset(source, IMAGE_SIZE, 8, process_index=0,
                                                       process_count=1))
    np.testing.assert_array_equal(eval_batch['label'], source.labels)


def test_four_views_are_independent_draws():
  # Flat colours: a view is grey exactly when RandomGrayscale fired (p = 0.2, see
  # test_augment). Independent draws give P(two views both grey) = 0.04; shared seeds 0.2.
  num_images, batch = 64, 64
  colours = np.random.default_rng(3).integers(40, 220, (num_images, 1, 1, 3), dtype=np.uint8)
  colours[..., 0] = 230  # never grey to begin with
  source = data_sources.ArraySource(np.broadcast_to(colours, (num_images, 10, 10, 3)).copy())
  bags = bag_file.Bags.from_groups(np.zeros(num_images, int), method='labels',
                                   fingerprint=source.fingerprint)
  config = _config()
  config.data.image_size = 8
  iterator = input_pipeline.create_train_iterator(config, source, bags, start_step=0,
                                                  local_batch_size=batch, process_index=0,
                                                  process_count=1)
  grey = {key: [] for key in views_lib.VIEW_KEYS}
  for _ in range(6):
    views = next(iterator)
    for key in grey:
      pixel = views[key][:, 0, 0].astype(int)
      grey[key].append((pixel[:, 0] == pixel[:, 1]) & (pixel[:, 1] == pixel[:, 2]))
  grey = {key: np.concatenate(value) for key, value in grey.items()}
  count = len(grey['query'])
  for key, value in grey.items():
    assert abs(value.mean() - 0.2) < 4 * np.sqrt(0.16 / count), (key, value.mean())
  for first, second in [('query', 'key'), ('pos_q', 'pos_k'), ('query', 'pos_q')]:
    both = (grey[first] & grey[second]).mean()
    assert abs(both - 0.04) < 4 * np.sqrt(0.04 * 0.96 / count), (first, second, both)


def test_query_and_key_show_the_anchor_pos_views_the_positive(monkeypatch):
  """With the augmentation replaced by a plain resize, each view is its source image."""
  import tensorflow as tf
  monkeypatch.setattr(input_pipeline.augment, 'moco_v2_view',
                      lambda image, seed, size, encoded: tf.cast(
                          tf.image.resize(image, [size, size]), tf.uint8))
  # Image i is flat with value i in every channel, so a view's pixel names its image.
  flat = np.broadcast_to(np.arange(NUM_IMAGES, dtype=np.uint8)[:, None, None, None],
                         (NUM_IMAGES, 10, 12, 3)).copy()
  source = data_sources.ArraySource(flat)
  neighbors = np.stack([(np.arange(NUM_IMAGES) + d) % NUM_IMAGES for d in (1, 2, 3)], 1)
  bags = bag_file.Bags.from_neighbors(neighbors, method='knn', fingerprint=source.fingerprint)
  for batch in _batches(source, bags, 2):
    for key, index in (('query', 'anchor_index'), ('key', 'anchor_index'),
                       ('pos_q', 'positive_index'), ('pos_k', 'positive_index')):
      np.testing.assert_array_equal(batch[key][:, 0, 0, 0], batch[index], key)
    assert (batch['anchor_index'] != batch['positive_index']).all()

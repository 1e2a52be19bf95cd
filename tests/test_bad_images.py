"""Images that cannot be decoded, and unusual ones that can (docs/reliability.md).

References: PIL's own conversions (``Image.convert('RGB')``) for 8-bit images, numpy's
``v >> 8`` for 16-bit ones, the pixel written for a 1x1 image, the files the test corrupted,
and for ``'skip'`` the pipeline's output for the replacement image, computed by hand as the
next good index.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from bingo_jax import input_pipeline
from bingo_jax.configs import tiny_test
from bingo_jax.data import bad_images, sources as data_sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _file_list(root, files: dict) -> str:
  """Writes ``{name: bytes}`` under root/images and a file list; returns the list's path."""
  os.makedirs(os.path.join(root, 'images'), exist_ok=True)
  lines = []
  for i, (name, data) in enumerate(files.items()):
    with open(os.path.join(root, 'images', name), 'wb') as f:
      f.write(data)
    lines.append(f'images/{name} {i % 2}')
  path = os.path.join(root, 'images.txt')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path


def _config(list_path: str, on_bad_image: str = 'error', image_size: int = 16):
  config = tiny_test.get_config()
  config.data.path = list_path
  config.data.in_memory = False
  config.data.image_size = image_size
  config.data.on_bad_image = on_bad_image
  return config


# ---------------------------------------------------------------------------------------------
# Grayscale, CMYK, RGBA, palette, 16-bit and 1x1 images decode to the right RGB


def test_unusual_images_decode_to_what_pil_and_numpy_give(tmp_path):
  rng = np.random.default_rng(0)
  gray = Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8), 'L')
  rgba = Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), 'RGBA')
  gray_alpha = Image.fromarray(rng.integers(0, 256, (9, 7, 2), dtype=np.uint8), 'LA')
  palette = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert('P')
  cmyk = Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), 'CMYK')
  gray16 = rng.integers(0, 65536, (9, 7), dtype=np.uint16)
  rgb16 = rng.integers(0, 65536, (9, 7, 3), dtype=np.uint16)
  files = {
      'gray.png': _encode(gray, 'PNG'), 'gray.jpg': _encode(gray, 'JPEG', quality=95),
      'rgba.png': _encode(rgba, 'PNG'), 'la.png': _encode(gray_alpha, 'PNG'),
      'palette.png': _encode(palette, 'PNG'), 'cmyk.jpg': _encode(cmyk, 'JPEG', quality=95),
      'gray16.png': _encode(Image.fromarray(gray16), 'PNG'),
      'rgb16.png': tf.io.encode_png(tf.constant(rgb16)).numpy(),
      'one_pixel.png': _encode(Image.fromarray(np.array([[[10, 200, 30]]], np.uint8)), 'PNG'),
  }
  source = data_sources.make_source(_config(_file_list(tmp_path, files)).data, 'train')
  names = list(files)
  for i, name in enumerate(names):
    got = source.read(i)
    assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[2] == 3, name
    if name == 'gray16.png':
      want = np.repeat((gray16 >> 8).astype(np.uint8)[..., None], 3, axis=2)
    elif name == 'rgb16.png':
      want = (rgb16 >> 8).astype(np.uint8)
    else:
      want = np.asarray(Image.open(io.BytesIO(files[name])).convert('RGB'))
    assert got.shape == want.shape, name
    difference = np.abs(got.astype(int) - want.astype(int))
    if name.endswith('.jpg'):  # two JPEG decoders (IDCT rounding) but the same colours
      assert difference.max() <= 8 and difference.mean() < 2, (name, difference.max())
    else:
      np.testing.assert_array_equal(got, want, err_msg=name)

  # Every pipeline takes them: the centre crop of the 1x1 image is its pixel everywhere.
  batches = list(input_pipeline.make_eval_dataset(source, 16, 3, process_index=0,
                                                  process_count=1))
  images = np.concatenate([b['image'] for b in batches])[:len(names)]
  assert images.shape == (len(names), 16, 16, 3)
  one = images[names.index('one_pixel.png')].reshape(-1, 3)
  assert np.abs(one.astype(int) - [10, 200, 30]).max() <= 1
  config = _config(_file_list(tmp_path, files))
  train_batch = next(input_pipeline.create_train_iterator(
      config, source, None, start_step=0, local_batch_size=8, process_index=0,
      process_count=1, views=('query', 'key')))
  assert train_batch['query'].shape == (8, 16, 16, 3)


# ---------------------------------------------------------------------------------------------
# Corrupted, empty and truncated files


def _with_bad_files(root, num_good: int = 12) -> tuple[str, dict]:
  rng = np.random.default_rng(1)
  files = {f'{i:02d}.jpg': _encode(Image.fromarray(
      rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)), 'JPEG', quality=90)
      for i in range(num_good)}
  truncated = files['03.jpg'][:200]
  bad = {'03.jpg': truncated, '04.jpg': b'', '09.jpg': b'this is not an image at all' * 10}
  files.update(bad)
  return _file_list(root, files), bad


def test_evaluation_pipeline_names_the_bad_file_or_skips_it(tmp_path):
  list_path, bad = _with_bad_files(tmp_path)
  source = data_sources.make_source(_config(list_path).data, 'train')
  with pytest.raises(bad_images.BadImageError) as error:
    list(input_pipeline.make_eval_dataset(source, 16, 4, process_index=0, process_count=1))
  message = str(error.value)
  assert source.description in message
  # The first failing batch (indices 0-3, read with 4-7) names its bad images, each by file.
  assert 'image 3 (images/03.jpg) cannot be decoded' in message
  assert 'image 4 (images/04.jpg) cannot be decoded' in message

  source = data_sources.make_source(_config(list_path, 'skip').data, 'train')
  batches = list(input_pipeline.make_eval_dataset(source, 16, 4, process_index=0,
                                                  process_count=1))
  images = np.concatenate([b['image'] for b in batches])
  index = np.concatenate([b['index'] for b in batches])
  np.testing.assert_array_equal(index, np.arange(12))
  # Each bad image reads as the next good one after it: 3 -> 5, 4 -> 5, 9 -> 10.
  for bad_index, replacement in ((3, 5), (4, 5), (9, 10)):
    np.testing.assert_array_equal(images[bad_index], images[replacement])
  records = bad_images.replacements_of(source).records()
  assert [(r['index'], r['file'], r['replaced_by']) for r in records] == [
      (3, 'images/03.jpg', 5), (4, 'images/04.jpg', 5), (9, 'images/09.jpg', 10)]


def test_training_pipeline_names_the_step_and_file(tmp_path):
  list_path, _ = _with_bad_files(tmp_path)
  config = _config(list_path)
  source = data_sources.make_source(config.data, 'train')
  iterator = input_pipeline.create_train_iterator(config, source, None, start_step=0,
                                                  local_batch_size=4, process_index=0,
                                                  process_count=1, views=('query', 'key'))
  with pytest.raises(bad_images.BadImageError,
                     match=r'image \d+ \(images/0[349]\.jpg\) cannot be decoded in training '
                           r'step \d+'):
    for _ in range(3):
      next(iterator)


def test_data_check_lists_every_bad_image(tmp_path):
  list_path, bad = _with_bad_files(tmp_path)
  result = subprocess.run(
      [sys.executable, '-m', 'bingo_jax.data_check', '--config', 'tiny_test',
       f'--config.data.path={list_path}', '--splits=train',
       f'--output={tmp_path / "report.json"}'],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
               PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', '')))
  assert result.returncode == 1, result.stderr[-3000:]
  assert '3 of 12 images cannot be decoded' in result.stdout
  listed = [line.split('(')[1].split(')')[0] for line in result.stdout.splitlines()
            if line.startswith('  image ')]
  assert listed == [f'images/{name}' for name in sorted(bad)]


def test_canvas_pipeline_names_the_bad_file_or_skips_it(tmp_path):
  """config.data.augment_on='device' with image files: the canvases (decoded on the host, the
  views drawn on the device) name a bad file as the host views do; with 'skip' a bad image's
  canvas holds its replacement, compared with PIL's decode of the replacement's file."""
  list_path, bad = _with_bad_files(tmp_path)

  def canvases(policy: str):
    config = _config(list_path, policy)
    config.data.augment_on, config.data.canvas_size = 'device', 32
    source = data_sources.make_source(config.data, 'train')
    return source, input_pipeline.create_train_iterator(
        config, source, None, start_step=0, local_batch_size=4, process_index=0,
        process_count=1, views=('query', 'key'), output='canvases')

  _, iterator = canvases('error')
  with pytest.raises(bad_images.BadImageError,
                     match=r'image \d+ \(images/0[349]\.jpg\) cannot be decoded in training '
                           r'step \d+') as error:
    for _ in range(3):
      next(iterator)
  assert 'file list' in str(error.value) and 'Traceback' not in str(error.value)

  source, iterator = canvases('skip')
  replaced_by = {3: 5, 4: 5, 9: 10}  # the next index whose file decodes
  seen = set()
  for _ in range(6):  # two epochs of 12 images: every index, bad ones included
    batch = next(iterator)
    for index, canvas, size in zip(batch['anchor_index'], batch['anchor_canvas'],
                                   batch['anchor_size']):
      name = f'{replaced_by.get(int(index), int(index)):02d}.jpg'
      want = np.asarray(Image.open(tmp_path / 'images' / name).convert('RGB'))
      assert tuple(size[:2]) == want.shape[:2] == (20, 24)
      got = canvas[:20, :24].astype(int)
      assert np.abs(got - want).max() <= 8 and np.abs(got - want).mean() < 2, (index, name)
      assert not canvas[20:].any() and not canvas[:, 24:].any()  # zeros outside the image
      seen.add(int(index))
  assert seen >= set(replaced_by)
  records = bad_images.replacements_of(source).records()
  assert [(r['index'], r['file'], r['replaced_by']) for r in records] == [
      (i, f'images/{i:02d}.jpg', r) for i, r in sorted(replaced_by.items())]


def test_bagging_and_evaluation_record_the_skipped_images(tmp_path):
  """With 'skip', bag_report.json and eval_knn.json list the images read as others: the files
  this test corrupted, each with the next good index."""
  from bingo_jax import bagging, evaluate  # pylint: disable=import-outside-toplevel
  list_path, bad = _with_bad_files(tmp_path)
  expected = [(3, 'images/03.jpg', 5), (4, 'images/04.jpg', 5), (9, 'images/09.jpg', 10)]
  assert sorted(f'images/{name}' for name in bad) == [file for _, file, _ in expected]
  summary = lambda record: (record['count'], [  # noqa: E731
      (r['index'], r['file'], r['replaced_by']) for r in record['images']])

  config = _config(list_path, 'skip')
  config.bags.update(method='random-teacher', k=3, batch_size=8, report_anchors=4)
  config.bags.random_teacher.update({'arch': 'resnet18', 'base_width': 8, 'stem': 'cifar'})
  bagging.compute_bags(config, str(tmp_path / 'bagging'), progress=False)
  with open(tmp_path / 'bagging' / 'bag_report.json') as f:
    assert summary(json.load(f)['bad_images_skipped']) == (3, expected)

  config = _config(list_path, 'skip')
  config.data.eval_split = 'train'
  config.eval.update(knn_k=3, knn_weighted_k=8, batch_size=8)
  evaluate.evaluate(config, 'random', 'knn', str(tmp_path / 'eval'))
  with open(tmp_path / 'eval' / 'eval_knn.json') as f:
    skipped = json.load(f)['data']['bad_images_skipped']
  assert {split: summary(record) for split, record in skipped.items()} == {
      'train': (3, expected), 'eval': (3, expected)}

"""Data sources: image order, labels, fingerprints and pixels against independent references
(PIL decoding, hashlib over the expected identifiers, the known Fashion-MNIST files)."""

import hashlib
import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from bingo_jax.data import sources as data_sources


def _sha(identifiers):
  return hashlib.sha256(''.join(f'{i}\n' for i in identifiers).encode()).hexdigest()


def _random_image(rng, height, width):
  return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def image_folder(tmp_path):
  """root/{cat,dog}/..., PNG and JPEG files of different sizes, one nested directory."""
  rng = np.random.default_rng(0)
  files = {'dog/b.png': (9, 7), 'dog/a.jpeg': (12, 10), 'cat/z.png': (5, 8),
           'cat/sub/y.PNG': (6, 6), 'cat/x.JPG': (10, 11), 'cat/notes.txt': None}
  pixels = {}
  for relative, size in files.items():
    path = tmp_path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if size is None:
      path.write_text('not an image')
      continue
    image = _random_image(rng, *size)
    Image.fromarray(image).save(path, format='PNG' if relative.lower().endswith('png')
                                else 'JPEG')
    pixels[relative] = np.asarray(Image.open(path).convert('RGB'))
  return tmp_path, pixels


def test_package_and_array_source_work_without_tensorflow(tmp_path):
  """A host where ``import tensorflow`` fails still reads arrays and the Fashion-MNIST files
  (references: numpy, hashlib over the identifiers)."""
  script = tmp_path / 'no_tf.py'
  script.write_text(textwrap.dedent('''
      import hashlib, os, sys
      import numpy as np
      sys.modules['tensorflow'] = None  # any import of tensorflow now raises ImportError
      from bingo_jax.data import sources as data_sources
      images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
      source = data_sources.ArraySource(images, [1, 0], identifiers=['a', 'b'])
      assert (source.read(1) == np.repeat(images[1][..., None], 3, axis=-1)).all()
      assert source.labels.tolist() == [1, 0] and source.num_classes == 2
      assert source.fingerprint == hashlib.sha256(b'a\\nb\\n').hexdigest()
      if os.path.isdir(data_sources.FASHION_MNIST_DIR):
        subset = data_sources.make_source({'source': 'fashion_mnist'}, 'test[1:3]')
        assert len(subset) == 2 and subset.read(1).shape == (28, 28, 3)
      print('ok')
      '''))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={**os.environ, 'PYTHONPATH': root}, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ['ok']


def test_array_source_reads_and_replicates_grayscale():
  images = np.arange(4 * 3 * 2, dtype=np.uint8).reshape(4, 3, 2)
  source = data_sources.ArraySource(images, np.array([1, 0, 2, 1]))
  assert len(source) == 4 and source.num_classes == 3 and source.image_shape == (3, 2, 3)
  np.testing.assert_array_equal(source.read(2), np.repeat(images[2][..., None], 3, axis=-1))
  batch = source.tf_read_batch(tf.constant([3, 0], tf.int64)).numpy()
  np.testing.assert_array_equal(batch[:, :, :, 1], images[[3, 0]])
  assert batch.shape == (2, 3, 2, 3)
  other = data_sources.ArraySource(images[::-1].copy())
  assert source.fingerprint != other.fingerprint
  with pytest.raises(IndexError, match='out of range'):
    source.read(4)
  with pytest.raises(ValueError, match='uint8'):
    data_sources.ArraySource(images.astype(np.float32))


def test_folder_order_labels_and_pixels_match_imagefolder(image_folder):
  root, pixels = image_folder
  source = data_sources.make_source({'source': 'folder', 'path': str(root)}, 'train')
  # torchvision ImageFolder order: classes sorted, then sorted(os.walk(class_dir)) (a
  # directory's own files before its sub-directories'), file names sorted, non-images skipped.
  expected = ['cat/x.JPG', 'cat/z.png', 'cat/sub/y.PNG', 'dog/a.jpeg', 'dog/b.png']
  assert list(source.identifiers()) == expected
  np.testing.assert_array_equal(source.labels, [0, 0, 0, 1, 1])
  assert source.num_classes == 2 and source.encoded
  assert source.fingerprint == _sha(expected)
  for index, relative in enumerate(expected):
    image = source.read(index)
    if relative.lower().endswith('png'):
      np.testing.assert_array_equal(image, pixels[relative])
    else:  # two JPEG decoders (libjpeg in TF and PIL) may differ by a level or two.
      assert np.abs(image.astype(int) - pixels[relative]).max() <= 3
  encoded = source.tf_read_batch(tf.constant([4, 0], tf.int64)).numpy()
  np.testing.assert_array_equal(data_sources.decode_image(encoded[0]).numpy(),
                                pixels['dog/b.png'])


def test_folder_split_placeholder_and_missing_path(image_folder, tmp_path_factory):
  root, _ = image_folder
  other = tmp_path_factory.mktemp('other')
  os.symlink(root, other / 'val')
  source = data_sources.make_source({'source': 'folder', 'path': str(other / '{split}')}, 'val')
  assert len(source) == 5
  source = data_sources.make_source({'source': 'folder', 'path': str(other)}, 'val')
  assert len(source) == 5  # path/split exists
  with pytest.raises(FileNotFoundError, match='does-not-exist'):
    data_sources.make_source({'source': 'folder', 'path': str(other / 'does-not-exist')}, 'x')
  with pytest.raises(ValueError, match='data.path'):
    data_sources.make_source({'source': 'folder', 'path': None}, 'train')
  with pytest.raises(ValueError, match="'nope'"):
    data_sources.make_source({'source': 'nope'}, 'train')


def test_filelist_labels_root_and_errors(image_folder, tmp_path):
  root, pixels = image_folder
  list_path = tmp_path / 'list.txt'
  list_path.write_text('# comment\ndog/b.png 3\n\ncat/z.png 0\n')
  source = data_sources.make_source({'source': 'filelist', 'path': str(list_path),
                                     'root': str(root)}, 'train')
  assert list(source.identifiers()) == ['dog/b.png', 'cat/z.png']
  np.testing.assert_array_equal(source.labels, [3, 0])
  np.testing.assert_array_equal(source.read(1), pixels['cat/z.png'])
  # Default root: the list's directory; no labels at all is fine.
  (root / 'list2.txt').write_text('cat/z.png\n')
  unlabelled = data_sources.filelist_source(str(root / 'list2.txt'))
  assert unlabelled.labels is None and unlabelled.read(0).shape == (5, 8, 3)
  list_path.write_text('dog/b.png 3\ncat/z.png\n')
  with pytest.raises(ValueError, match='some lines have a label'):
    data_sources.filelist_source(str(list_path), str(root))


def test_fashion_mnist_debian_files():
  if not os.path.isfile(os.path.join(data_sources.FASHION_MNIST_DIR,
                                     't10k-images-idx3-ubyte.gz')):
    pytest.skip('Fashion-MNIST files not installed')
  source = data_sources.make_source({'source': 'fashion_mnist'}, 'test')
  # Known facts of the published files: 10000 test images, 1000 per class, the first an
  # ankle boot (class 9).
  assert len(source) == 10000 and source.num_classes == 10
  np.testing.assert_array_equal(np.bincount(source.labels), np.full(10, 1000))
  assert source.labels[0] == 9
  image = source.read(0)
  assert image.shape == (28, 28, 3) and image.dtype == np.uint8
  assert (image[..., 0] == image[..., 2]).all() and image.max() > 200
  with pytest.raises(ValueError, match="'validation'"):
    data_sources.make_source({'source': 'fashion_mnist'}, 'validation')


@pytest.mark.parametrize('in_memory', [True, False])
def test_tfds_mock_in_memory_and_random_access(in_memory):
  with tfds.testing.mock_data(num_examples=6):
    source = data_sources.make_source(
        {'source': 'tfds', 'name': 'cifar10', 'in_memory': in_memory}, 'train')
    assert len(source) == 6 and source.num_classes == 10
    assert source.fingerprint == _sha([f'tfds:cifar10:train:{i}' for i in range(6)])
    assert source.labels.shape == (6,) and source.labels.dtype == np.int64
    image = source.read(5)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    batch = source.tf_read_batch(tf.constant([5, 1], tf.int64))
    first = (data_sources.decode_image(batch[0]) if source.encoded else batch[0]).numpy()
    np.testing.assert_array_equal(first, image)
    assert source.encoded == (not in_memory)


def test_tfds_grayscale_images_read_as_rgb():
  with tfds.testing.mock_data(num_examples=3):
    for in_memory in (True, False):
      source = data_sources.make_source(
          {'source': 'tfds', 'name': 'mnist', 'in_memory': in_memory}, 'test')
      image = source.read(2)
      assert image.shape == (28, 28, 3)
      assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_sliced_split_is_the_matching_range_of_the_full_split(image_folder):
  root, _ = image_folder
  config = ml_collections.ConfigDict({'source': 'folder', 'path': str(root)})
  full = data_sources.make_source(config, 'train')
  n = len(full)
  head = data_sources.make_source(config, 'train[:3]')
  tail = data_sources.make_source(config, 'train[50%:]')
  assert len(head) == 3 and len(tail) == n - n // 2
  np.testing.assert_array_equal(head.labels, full.labels[:3])
  np.testing.assert_array_equal(tail.read(0), full.read(n // 2))
  np.testing.assert_array_equal(tail.labels, full.labels[n // 2:])
  # Batched TF reads are offset too: compare decoded bytes with the full source's.
  encoded_tail = tail.tf_read_batch(tf.constant([0, 1], tf.int64))
  encoded_full = full.tf_read_batch(tf.constant([n // 2, n // 2 + 1], tf.int64))
  np.testing.assert_array_equal(encoded_tail.numpy(), encoded_full.numpy())
  assert list(head.identifiers()) == list(full.identifiers())[:3]
  assert head.fingerprint != full.fingerprint
  with pytest.raises(ValueError, match=r'train\[:x\]'):
    data_sources.make_source(config, 'train[:x]')
  with pytest.raises(ValueError, match='outside'):
    data_sources.make_source(config, f'train[{n}:]')

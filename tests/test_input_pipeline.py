"""Input pipelines: the evaluation centre crop against torchvision's definition (PIL), process
shards, and the training batches (bag membership, determinism, resume, per-process shards)."""

import numpy as np
import pytest
from PIL import Image

from bingo_jax import data_sources, images, input_pipeline


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

"""The tiny training run's inputs, shared by the tests and bench/faults.py.

The tiny run (``--config tiny_test``: 32 px images, ResNet-18 of width 8, batch 16) needs an
image list, a bag file and a teacher model file. They are made here, from fixed seeds:

- ``write_images``: random RGB PNGs (32 x 32) in ``ROOT/images`` and the list
  ``ROOT/images.txt`` (``images/000.png 0`` ..., labels ``i % 4``);
- ``write_bags``: random-neighbour bags (each image's 3 neighbours drawn among the others),
  fingerprinted with the image list's source;
- ``write_teacher``: a randomly initialised ResNet-18 (width 8, MoCo head) model file.

``environment`` is the environment of a training subprocess: two host devices (the batch
stays sharded) and a persistent compilation cache (the suite's, else ``ROOT/jax_cache``), so
that every run reuses the first run's executables (identical numerics, no recompilation).
Paths may be URLs (``fileio``), except the images, which the file-list source reads locally.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from PIL import Image

from bingo_jax.bags import bag_file
from bingo_jax.configs import tiny_test
from bingo_jax.data import sources as data_sources
from bingo_jax.models import create_model, init_variables
from bingo_jax.store import fileio, model_io
from bingo_jax.testing import subprocess_environment

NUM_IMAGES = 48
EPOCHS = 4  # of the runs of train_command: 12 steps of batch 16
TEACHER = dict(arch='resnet18', head='moco', base_width=8, stem='cifar', head_hidden_dim=32,
               head_output_dim=16)
# The directory holding the bingo_jax package (a checkout or site-packages): a subprocess
# with it on PYTHONPATH imports this very package.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_images(root: str, rng: np.random.Generator, num_images: int = NUM_IMAGES) -> str:
  """Writes ``num_images`` random 32 x 32 RGB PNGs and their file list under ``root``.

  Args:
    root: a local directory (created if missing).
    rng: draws the pixels, image after image.
    num_images: how many images.

  Returns:
    The path of the file list, ``root/images.txt``.
  """
  os.makedirs(os.path.join(root, 'images'), exist_ok=True)
  lines = []
  for i in range(num_images):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        os.path.join(root, 'images', f'{i:03d}.png'))
    lines.append(f'images/{i:03d}.png {i % 4}')
  with open(os.path.join(root, 'images.txt'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return os.path.join(root, 'images.txt')


def write_bags(path: str, images: str, rng: np.random.Generator) -> None:
  """Writes random-neighbour bags (k = 3) for the file list ``images`` to ``path``.

  Args:
    path: the bag file to write (a local path or a URL).
    images: the file list (``write_images``); its source's fingerprint goes into the bags.
    rng: draws each image's 3 neighbours among the other images, image after image.
  """
  config = tiny_test.get_config()
  config.data.path = images
  source = data_sources.make_source(config.data, 'train')
  num_images = len(source)
  neighbours = np.stack([rng.choice(np.delete(np.arange(num_images), i), 3, replace=False)
                         for i in range(num_images)])
  bag_file.save_bags(path, bag_file.Bags.from_neighbors(neighbours, method='knn',
                                                        fingerprint=source.fingerprint,
                                                        content_fingerprint=source.content_fingerprint))


def write_teacher(path: str) -> None:
  """Writes a randomly initialised ``TEACHER`` (seed 7, 32 px) model file to ``path``."""
  model_io.save_model(path, TEACHER, init_variables(create_model(**TEACHER),
                                                    jax.random.key(7), 32))


def make_inputs(root: str, num_images: int = NUM_IMAGES) -> dict:
  """The tiny run's three inputs under ``root``: images and bags from one generator (seed 0).

  Args:
    root: a local directory.
    num_images: how many images.

  Returns:
    ``{'images': list file, 'bags': bag file, 'teacher': model file, 'root': root}``.
  """
  root = str(root)
  rng = np.random.default_rng(0)
  inputs = {'images': write_images(root, rng, num_images),
            'bags': fileio.join(root, 'bags.npz'), 'teacher': fileio.join(root, 'teacher'),
            'root': root}
  write_bags(inputs['bags'], inputs['images'], rng)
  write_teacher(inputs['teacher'])
  return inputs


def train_command(inputs: dict, workdir: str, *extra: str) -> list[str]:
  """``python -m bingo_jax.train --config tiny_test`` on ``inputs`` for ``EPOCHS`` epochs
  (12 steps), then ``extra`` flags.

  Every caller trains with the same schedule (``train.max_steps`` may stop a run earlier; it
  does not enter the compiled step), so the runs of all test modules share one set of
  compiled programs through the compilation cache of ``environment``.
  """
  return [sys.executable, '-m', 'bingo_jax.train', '--config', 'tiny_test',
          '--workdir', workdir, f'--config.teacher.path={inputs["teacher"]}',
          f'--config.data.path={inputs["images"]}', f'--config.bags.path={inputs["bags"]}',
          f'--config.train.epochs={EPOCHS}', *extra]


def environment(inputs: dict) -> dict[str, str]:
  """The environment of a training subprocess (module docstring)."""
  return subprocess_environment(os.path.join(inputs['root'], 'jax_cache'),
                                pythonpath=(PACKAGE_PARENT,))

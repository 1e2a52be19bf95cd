"""Evaluation on Fashion-MNIST (60k training / 10k test images, 28 px grey, read as RGB).

Images are resized to 37 and centre-cropped to 32 (as 256 -> 224). The ``random`` baseline
is the student architecture below (ResNet-18, base width 16, CIFAR stem) randomly
initialised; ``pixels`` uses the normalised pixels. These give the floor a trained student
must beat::

  python -m bingo_jax.evaluate --config eval_fmnist --checkpoint random \
      --protocol knn --workdir /tmp/fm_eval
  python -m bingo_jax.evaluate --config eval_fmnist --checkpoint pixels \
      --protocol linear_fast --workdir /tmp/fm_eval

The argument shortens the training-based protocols for smoke runs: ``eval_fmnist:quick``
(2 epochs each).
"""

from typing import Optional

import ml_collections

from bingo_jax.configs import common

FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                         'Shirt', 'Sneaker', 'Bag', 'Ankle boot')


def use_fashion_mnist(config: ml_collections.ConfigDict,
                      train_split: str = 'train') -> ml_collections.ConfigDict:
  """Points ``config.data`` at Fashion-MNIST (60k train / 10k test, trained at 32 px)."""
  config.data.source = 'fashion_mnist'
  config.data.train_split = train_split
  config.data.eval_split = 'test'
  config.data.image_size = 32
  return config


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  config = common.base_config()
  use_fashion_mnist(config)

  config.student.arch = 'resnet18'
  config.student.base_width = 16
  config.student.stem = 'cifar'
  config.student.head = 'moco'

  config.eval.batch_size = 512
  config.eval.linear_fast_epochs = 30
  config.eval.linear_epochs = 10
  config.eval.finetune_fraction = 0.1
  config.eval.finetune_epochs = 10
  config.eval.tsne_per_class = 100
  config.eval.class_names = list(FASHION_MNIST_CLASSES)
  if arg == 'quick':
    config.eval.linear_fast_epochs = 2
    config.eval.linear_epochs = 1
    config.eval.finetune_epochs = 1
  elif arg:
    raise ValueError(f'eval_fmnist: unknown argument {arg!r} (expected "quick").')
  return config

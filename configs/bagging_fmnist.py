"""Bags on Fashion-MNIST (60k training images, 28 px), for the bag report on real images.

No converted teacher exists for 28 px grey images, so the feature-based default is the
paper's lower bound, a randomly initialised ResNet-18 (base width 16, CIFAR stem) at 32 px
(images resized to 37 and centre-cropped, as 256 -> 224). The argument picks the method::

  python -m bingo_jax.bagging --config bagging_fmnist:labels --workdir /tmp/fm_labels
  python -m bingo_jax.bagging --config bagging_fmnist:random-teacher --workdir ...
  python -m bingo_jax.bagging --config bagging_fmnist:kmeans --workdir ...
"""

from typing import Optional

import ml_collections

from bingo_jax.configs import common, eval_fmnist


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  config = common.base_config()
  eval_fmnist.use_fashion_mnist(config)

  config.bags.method = arg or 'random-teacher'
  config.bags.random_teacher.arch = 'resnet18'
  config.bags.random_teacher.base_width = 16
  config.bags.random_teacher.stem = 'cifar'
  config.bags.batch_size = 512
  config.bags.shard_size = 16384
  config.bags.num_clusters = 100        # ~600 images per cluster, as 20000 on ImageNet
  config.bags.query_batch_size = 4096
  config.bags.class_names = list(eval_fmnist.FASHION_MNIST_CLASSES)
  return config

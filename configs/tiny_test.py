"""A tiny BINGO run for tests and smoke checks: 32 px images, ResNet-18 of width 8, batch 16.

The teacher model file, the image list and the bag file are made by the test
(tests/test_train.py) and passed on the command line::

  python -m bingo_jax.train --config tiny_test --workdir /tmp/run \
      --config.teacher.path=/tmp/teacher --config.data.path=/tmp/images.txt \
      --config.bags.path=/tmp/bags.npz
"""

from typing import Optional

import ml_collections

from bingo_jax.configs import common, variants


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.data.source = 'filelist'
  config.data.image_size = 32
  config.data.in_memory = True

  config.teacher.bn_group_size = 4

  config.student.arch = 'resnet18'
  config.student.base_width = 8
  config.student.stem = 'cifar'
  config.student.head_hidden_dim = 32
  config.student.head_output_dim = 16
  config.student.bn_group_size = 4

  config.bags.k = 3

  config.train.batch_size = 16
  config.train.epochs = 2
  config.train.queue_size = 64
  config.train.own_key_warmup_epochs = 1   # the second epoch uses the (0.5, 0.5) weights
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 2
  config.train.keep_checkpoints = 2
  return variants.apply_variants(config, arg)

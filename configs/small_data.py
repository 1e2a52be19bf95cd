"""CIFAR-10, CIFAR-100 and STL-10: the data sets users try before ImageNet.

Paper Table 6 (ResNet-18 student, ResNet-50 teacher), top-1 (%) on CIFAR-10 / CIFAR-100:

| method | CIFAR-10 | CIFAR-100 |
|---|---|---|
| MoCo v2 (ResNet-18) | 77.9 | 48.1 |
| BINGO (ResNet-18 <- ResNet-50) | 86.8 | 66.5 |

The paper does not list hyper-parameters for these runs. ``small_data_config`` keeps the
released ImageNet ones (SGD lr 0.03 at batch 256, cosine per epoch, 200 epochs, BatchNorm
groups of 32, shuffled-BN teacher, k = 5 bags) and changes only what the data size forces:

- a 4096-key queue (65536 would be larger than the 50k training images, so the queue would
  hold several keys of the same image; MoCo's own CIFAR-10 demo uses 4096);
- 32 px images and the CIFAR stem (3x3 stride-1 convolution, no max-pool) for CIFAR: the
  ImageNet stem would shrink a 32 px image to 1x1 before the last stage;
- the data held in host memory (CIFAR: 150 MB decoded).

The teacher is a converted ResNet-50 model file (``bingo-convert``) whose stem matches the
images (CIFAR stem at 32 px); its projection head must embed into 128 dimensions like the
student's.
"""

from typing import Optional

import ml_collections

from bingo_jax.configs import common


def small_data_config(name: str, *, image_size: int, stem: str, train_split: str,
                      eval_bank_split: Optional[str], eval_split: str,
                      teacher: str) -> ml_collections.ConfigDict:
  """The shared part of the CIFAR / STL-10 configs.

  Args:
    name: TFDS name (``cifar10``, ``cifar100``, ``stl10``).
    image_size: training crop and evaluation centre crop, pixels.
    stem: student stem, ``'cifar'`` or ``'imagenet'``.
    train_split: the split that is bagged and distilled on (labels unused).
    eval_bank_split: the labelled split of the kNN bank / linear probe's training set when it
      differs from ``train_split`` (STL-10: the unlabelled split has no labels); None: same.
    eval_split: the evaluated split.
    teacher: default teacher model file path.
  Returns:
    The config (no variants applied).
  """
  config = common.base_config()
  config.data.source = 'tfds'
  config.data.name = name
  config.data.train_split = train_split
  config.data.eval_split = eval_split
  config.data.image_size = image_size
  config.data.in_memory = True

  config.teacher.path = teacher
  config.teacher.bn_group_size = 32

  config.student.arch = 'resnet18'
  config.student.stem = stem

  config.bags.path = f'bags/{name}_r50_knn5.npz'
  config.bags.batch_size = 512

  config.train.queue_size = 4096
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 1000

  config.eval.batch_size = 512
  config.eval.train_split = eval_bank_split
  config.eval.linear_epochs = 100
  return config

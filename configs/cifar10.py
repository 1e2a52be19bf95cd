"""ResNet-18 student <- ResNet-50 teacher on CIFAR-10.

50k training / 10k test images of 10 classes, 32 px, the CIFAR stem. Paper Table 6:
86.8 (BINGO) and 77.9 (MoCo v2) top-1 (%). The shared choices and their reasons are in
small_data.py::

  bingo-convert r50_cifar10.pth.tar teachers/cifar10_r50
  python -m bingo_jax.bagging --config cifar10 --workdir bags/cifar10
  python -m bingo_jax.train --config cifar10 --workdir runs/cifar10
  python -m bingo_jax.evaluate --config cifar10 --checkpoint runs/cifar10 \
      --protocol knn --workdir runs/cifar10/eval

The argument selects variants (variants.py), e.g. ``cifar10:bf16``.
"""

from typing import Optional

import ml_collections

from bingo_jax.configs import small_data, variants


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  config = small_data.small_data_config(
      'cifar10', image_size=32, stem='cifar', train_split='train', eval_bank_split=None,
      eval_split='test', teacher='teachers/cifar10_r50')
  return variants.apply_variants(config, arg)

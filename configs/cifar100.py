"""ResNet-18 student <- ResNet-50 teacher on CIFAR-100.

50k training / 10k test images of 100 classes, 32 px, the CIFAR stem. Paper Table 6:
66.5 (BINGO) and 48.1 (MoCo v2) top-1 (%). The shared choices and their reasons are in
small_data.py::

  bingo-convert r50_cifar100.pth.tar teachers/cifar100_r50
  python -m bingo_jax.bagging --config cifar100 --workdir bags/cifar100
  python -m bingo_jax.train --config cifar100 --workdir runs/cifar100
  python -m bingo_jax.evaluate --config cifar100 --checkpoint runs/cifar100 \
      --protocol knn --workdir runs/cifar100/eval

The argument selects variants (variants.py), e.g. ``cifar100:bf16``.
"""

from typing import Optional

import ml_collections

from bingo_jax.configs import small_data, variants


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  config = small_data.small_data_config(
      'cifar100', image_size=32, stem='cifar', train_split='train', eval_bank_split=None,
      eval_split='test', teacher='teachers/cifar100_r50')
  return variants.apply_variants(config, arg)

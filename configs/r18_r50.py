"""ResNet-18 student <- MoCo v2 ResNet-50 (800 epochs, 71.1%) teacher (paper: 64.0% linear).

Released hyper-parameters (docs/method.md §7): SGD momentum 0.9, batch 256, lr 0.03, cosine
over 200 epochs set once per epoch, queue 65536, BatchNorm groups of 32, shuffled-BN teacher.
Prepare the teacher with bingo-convert and the bags with
python -m bingo_jax.bagging (same config), then train:

  python -m bingo_jax.train --config r18_r50 --workdir WORKDIR

The argument selects variants (variants.py), e.g. ``r18_r50:bf16,paper_eq8``.
"""

from typing import Optional

import ml_collections

from bingo_jax.configs import common, variants


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.student.arch = 'resnet18'
  config.teacher.path = 'teachers/r50_mocov2'
  config.bags.path = 'bags/imagenet_r50_mocov2_knn5.npz'
  # bfloat16 compute on GPU/TPU, float32 on CPU (parameters, BatchNorm statistics, loss and
  # queue stay float32): parallel.resolve_compute_dtype.
  config.train.compute_dtype = 'auto'
  return variants.apply_variants(config, arg)

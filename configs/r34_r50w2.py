"""ResNet-34 student <- SwAV ResNet-50x2 teacher (paper: 68.9% linear, 64.9% 10-NN).

Released hyper-parameters (docs/method.md §7): SGD momentum 0.9, batch 256, lr 0.03, cosine
over 200 epochs set once per epoch, queue 65536, BatchNorm groups of 32, shuffled-BN teacher.
Prepare the teacher with bingo-convert and the bags with
python -m bingo_jax.bagging (same config), then train:

  python -m bingo_jax.train --config r34_r50w2 --workdir WORKDIR

The argument selects variants (variants.py), e.g. ``r34_r50w2:bf16,paper_eq8``.
"""

from typing import Optional

import ml_collections

from bingo_jax.configs import common, variants


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.student.arch = 'resnet34'
  config.teacher.path = 'teachers/r50w2_swav'
  config.bags.path = 'bags/imagenet_r50w2_swav_knn5.npz'
  # bfloat16 compute on GPU/TPU, float32 on CPU (parameters, BatchNorm statistics, loss and
  # queue stay float32): parallel.resolve_compute_dtype.
  config.train.compute_dtype = 'auto'
  return variants.apply_variants(config, arg)

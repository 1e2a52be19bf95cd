"""ResNet-18 student <- ResNet-50 teacher on STL-10 (not in the paper).

96 px images of 10 classes: 100k unlabelled images are bagged and distilled on; the 5k
labelled training images are the kNN bank and the linear probe's training set
(``eval.train_split``), the 8k test images are evaluated. The ImageNet stem (7x7 stride-2
convolution and max-pool): the CIFAR stem at 96 px would run the first stage on 96x96 maps
instead of 24x24, 16x its compute. The decoded unlabelled split takes 2.8 GB of host memory
(``data.in_memory``); with ``data.in_memory=False`` TFDS reads it with random access from the
array_record format (``tfds build stl10 --file_format=array_record``). The shared choices and
their reasons are in small_data.py::

  python -m bingo_jax.bagging --config stl10 --workdir bags/stl10
  python -m bingo_jax.train --config stl10 --workdir runs/stl10
  python -m bingo_jax.evaluate --config stl10 --checkpoint runs/stl10 \
      --protocol knn --workdir runs/stl10/eval
"""

from typing import Optional

import ml_collections

from bingo_jax.configs import small_data, variants


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  config = small_data.small_data_config(
      'stl10', image_size=96, stem='imagenet', train_split='unlabelled', eval_bank_split='train',
      eval_split='test', teacher='teachers/stl10_r50')
  return variants.apply_variants(config, arg)

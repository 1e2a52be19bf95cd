"""MoCo v2 pre-training on Fashion-MNIST: the demo's teacher, trained by ``bingo_jax.train``.

``config.train.method = 'moco'``: the student is MoCo's query encoder, its momentum copy the
key encoder (no teacher file, no bag file). ResNet-18 at base width 16 with the CIFAR stem and
the 2-layer MLP head (MoCo v2), 32 px inputs (the 28 px grey images read as RGB), the whole
60k training split, no labels. Hyper-parameters: released MoCo v2 (``main_moco.py --mlp
--moco-t 0.2 --aug-plus --cos``: SGD momentum 0.9, weight decay 1e-4, cosine schedule) at
batch 128 with a 4096-key queue, and two changes for a run of 9 epochs on 2 CPU cores instead
of 200 epochs on 8 GPUs:

- lr 0.06 x 128/256 = 0.03 at batch 128, twice the released lr scaled linearly;
- key-encoder momentum 0.99 instead of 0.999: with 469 steps per epoch, 0.999 would leave the
  key encoder near its random start for much of the run (the released CIFAR-10 demo of MoCo
  also uses 0.99 with a 4096-key queue).

The committed demo teacher (``bingo_jax/demo_data/``, see ``docs/results.md``) was made with::

  python -m bingo_jax.train --config moco_fmnist --workdir W/moco
  bingo-export W/moco teacher.pth.tar --format moco --step N

The result is loaded with ``checkpointing.load_student(W/moco)`` (the query encoder) and can be
saved as a teacher model file for BINGO.
"""

from typing import Optional

import ml_collections

from bingo_jax.configs import common, eval_fmnist, variants


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  config = common.base_config()
  eval_fmnist.use_fashion_mnist(config)

  config.student.arch = 'resnet18'
  config.student.base_width = 16
  config.student.stem = 'cifar'
  config.student.head = 'moco'
  config.student.head_hidden_dim = 128  # MoCo v2: the backbone's feature width
  config.student.head_output_dim = 128
  config.student.bn_group_size = 32     # query encoder: per-"GPU" BatchNorm, as released
  config.teacher.bn_group_size = 32     # key encoder: shuffled BatchNorm groups

  config.train.method = 'moco'
  config.train.moco_momentum = 0.99
  config.train.batch_size = 128
  config.train.base_lr = 0.06           # at batch 256 (scaled linearly with the batch)
  config.train.weight_decay = 1e-4
  config.train.temperature = 0.2        # MoCo v2
  config.train.queue_size = 4096
  config.train.epochs = 9
  config.train.cutmix = 'none'          # unused by moco; stated to avoid confusion
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 400
  config.train.keep_checkpoints = 2

  config.eval = eval_fmnist.get_config().eval
  return variants.apply_variants(config, arg)

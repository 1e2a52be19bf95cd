"""The ablation of paper Tables 7/8 on Fashion-MNIST: one row per argument.

Every row trains the demo's student (``fmnist_demo.py``: ResNet-18 at base width 8,
12,800 images, batch 128) with the same data, schedule and budget: 2 epochs and the
released loss with CutMix (not the demo's 7 epochs of the paper's loss), which only the
row's training signal changes:

  moco         (a) MoCo v2 alone, no teacher: a momentum key encoder of the student
                   (momentum 0.99, as ``moco_fmnist.py``), temperature 0.2.
  anchor_only  (b) the teacher's parameters only: CE(q, k) against the teacher's key of the
                   same image, no bags, no CutMix (SEED-like distillation).
  knn          (c) BINGO, bags = 5 nearest neighbours in the teacher's feature space.
  labels       (d) BINGO, bags = images of the same ground-truth class (upper bound).
  random       (e) BINGO, bags = 5 nearest neighbours in a randomly initialised network of
                   the teacher's architecture (lower bound).
  paper_eq8    (f) the paper's Eq. 8/9 loss (CE(q, k) + CE(p, k), no CutMix) with the kNN
                   bags of (c).

The control of (f): what its bag term adds beyond a second student view of each example:

  paper_eq8_self  (f) with the anchor itself as the positive (bag method ``self``): the same
                  loss, CE(q, k) + CE(p, k), the same three passes and the same weight, but p
                  is a second augmented view of the anchor's own image, not of a neighbour.

Paper Table 9's other distillation methods, through the same step (no bags, no CutMix; the
teacher embeds the student's own ``query`` image, objectives.TEACHER_QUERY):

  kd           KD: mean ||q - tq||^2 of the normalised student and teacher embeddings of the
               same augmented image.
  rkd          RKD, similarity-preserving form: the student's in-batch cosine-similarity
               matrix matched to the teacher's (mean squared difference off the diagonal).

Teacher relation only (paper Table 8 row 3): the MoCo v2 student of (a), its momentum key
encoder in the teacher's place, trained with BINGO's loss and CutMix on bags; the teacher
network makes the bags and is not used in training:

  relation_knn     (g) the kNN bags of (c).
  relation_labels  (h) the label bags of (d) (a supervised-contrastive upper bound).
  relation_random  (i) the random-network bags of (e).

Paper Fig. 3, the bag size: BINGO with teacher-kNN bags of k = 1, 10, 20 neighbours (``knn`` is
k = 5), each its own bag file (``BAGS``):

  knn_k1, knn_k10, knn_k20

Paper Table 7, bags from a network trained on the labels:

  supervised   BINGO with the teacher as in (c), but the 5-NN bags are found in the features
               of a supervised network: the teacher fine-tuned on the labels of all the
               training images (the ``finetune`` protocol of ``bingo_jax.evaluate`` with the
               settings of ``supervised_teacher_config``, exported with
               ``eval.finetune_export``); tools/fmnist_ablation.py trains it once.

Student relation (paper Table 8 rows 2 and 5): the bags are the student's own 5 nearest
neighbours, recomputed at the start of every epoch (``bags.source = 'student'``,
``bags.refresh_every_epochs = 1``; the first from the initial student); no bag file:

  student_relation          (j) the relation-only student of (g), no teacher network.
  student_relation_teacher  (k) BINGO of (c) (teacher parameters), student bags.

``knn`` is the demo's configuration. The bag files come from ``bingo_jax.bagging`` (methods
``knn``, ``labels``, ``random-teacher``; ``BAGS`` gives each file's method and k) and are
passed with ``--config.bags.path``; the rows without bags (``moco``, ``anchor_only``) need
none, and the ``moco`` and ``relation_*`` rows no teacher file. ``tools/fmnist_ablation.py``
runs the whole table (bags, 3 seeds per row, kNN and fast linear evaluation) and writes the
results; one row by hand::

  python -m bingo_jax.train --config fmnist_ablation:knn --workdir W/knn_s0 \\
      --config.teacher.path=W/teacher --config.bags.path=W/bags_knn.npz --config.train.seed=0

Further comma-separated names are ``variants.py`` variants (``knn,cutmix_sample``).
"""

from typing import Optional

import ml_collections

from bingo_jax.configs import common, fmnist_demo, variants

ROWS = {
    'moco': '(a) MoCo v2 alone, no teacher',
    'anchor_only': '(b) teacher parameters only (intra term, no bags, no CutMix)',
    'knn': '(c) BINGO, kNN bags from the teacher',
    'labels': '(d) BINGO, ground-truth label bags (upper bound)',
    'random': '(e) BINGO, kNN bags from a random network (lower bound)',
    'paper_eq8': "(f) paper's loss (intra + inter, no CutMix), kNN bags",
    'paper_eq8_self': "(f) control: paper's loss, the anchor itself as its positive (no bag)",
    'kd': 'Table 9 KD: L2 of normalised embeddings of the same view, no bags',
    'rkd': 'Table 9 RKD: in-batch cosine-similarity matrix matched, no bags',
    'relation_knn': '(g) teacher relation only: MoCo v2 + BINGO loss, kNN bags from the teacher',
    'relation_labels': '(h) relation only, ground-truth label bags (supervised upper bound)',
    'relation_random': '(i) relation only, kNN bags from a random network',
    'knn_k1': 'Fig. 3: BINGO, kNN bags from the teacher, k = 1',
    'knn_k10': 'Fig. 3: BINGO, kNN bags from the teacher, k = 10',
    'knn_k20': 'Fig. 3: BINGO, kNN bags from the teacher, k = 20',
    'supervised': 'Table 7: BINGO, kNN bags from a supervised network (teacher fine-tuned '
                  'on the labels)',
    'student_relation': '(j) student relation: MoCo v2 + BINGO loss, bags from the student',
    'student_relation_teacher': '(k) BINGO (teacher parameters), bags from the student',
}
# The bag file each row trains with, by name (None: no bags); tools/fmnist_ablation.py writes
# it as bags_<name>.npz, so rows with different bags never share a file.
ROW_BAGS = {'moco': None, 'anchor_only': None, 'knn': 'knn', 'labels': 'labels',
            'random': 'random-teacher', 'paper_eq8': 'knn', 'paper_eq8_self': 'self',
            'kd': None, 'rkd': None,
            'relation_knn': 'knn', 'relation_labels': 'labels',
            'relation_random': 'random-teacher',
            'knn_k1': 'knn_k1', 'knn_k10': 'knn_k10', 'knn_k20': 'knn_k20',
            'supervised': 'supervised', 'student_relation': None,
            'student_relation_teacher': None}
# The rows trained as MoCo v2 (config.train.method = 'moco': no teacher network in training).
MOCO_ROWS = ('moco', 'relation_knn', 'relation_labels', 'relation_random', 'student_relation')
# The rows whose bags the student recomputes every epoch (no bag file).
STUDENT_BAG_ROWS = ('student_relation', 'student_relation_teacher')
# Each bag file's bagging method and k (config.bags.method, config.bags.k; k is read by the
# neighbour methods only).
BAGS = {'knn': ('knn', 5), 'labels': ('labels', 5), 'random-teacher': ('random-teacher', 5),
        'knn_k1': ('knn', 1), 'knn_k10': ('knn', 10), 'knn_k20': ('knn', 20),
        'supervised': ('knn', 5), 'self': ('self', 5)}
# The bag files found in the supervised network's features instead of the teacher's.
SUPERVISED_BAGS = ('supervised',)


def supervised_teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The fine-tuning that makes the supervised network of the ``supervised`` row: the whole
  network (from the teacher) with a new classifier, on every labelled training image
  (fraction 1), 10 epochs, one SGD learning rate 0.1 at batch 256 for backbone and classifier
  (a plain supervised schedule rather than the semi-supervised protocol's 10x classifier),
  weight decay 5e-4, cosine per epoch."""
  config.eval.update(finetune_fraction=1.0, finetune_epochs=10, finetune_lr=0.1,
                     finetune_classifier_lr_multiplier=1.0, finetune_weight_decay=5e-4)
  return config


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  names = [part.strip() for part in (arg or '').split(',') if part.strip()]
  if not names or names[0] not in ROWS:
    raise ValueError(f'configs/fmnist_ablation.py needs a row name first, one of '
                     f'{", ".join(ROWS)}; got {arg!r}.')
  row, rest = names[0], names[1:]
  config = fmnist_demo.get_config()
  # The table's schedule and loss, not the demo's: 2 epochs of the released loss with CutMix;
  # the rows below change the loss, and `--set train.epochs=N` the schedule.
  released = common.base_config().train
  config.train.update(epochs=2, loss=released.loss, cutmix=released.cutmix)
  if ROW_BAGS[row]:
    config.bags.method, config.bags.k = BAGS[ROW_BAGS[row]]
  if row in MOCO_ROWS:
    config.train.method = 'moco'
    config.train.moco_momentum = 0.99
    # Relation only: the released loss (and CutMix) of (c), the key encoder as the teacher.
    config.train.moco_loss = 'anchor_only' if row == 'moco' else 'bingo'
  if row in STUDENT_BAG_ROWS:
    config.bags.source, config.bags.refresh_every_epochs = 'student', 1
  elif row in ('anchor_only', 'paper_eq8', 'paper_eq8_self', 'kd', 'rkd'):
    config.train.loss = 'paper_eq8' if row == 'paper_eq8_self' else row
    config.train.cutmix = 'none'
  elif row == 'supervised':
    supervised_teacher_config(config)  # read by the finetune protocol only
  return variants.apply_variants(config, ','.join(rest))

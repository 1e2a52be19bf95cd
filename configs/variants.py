"""Named variants selected by a config's argument: ``--config r18_r50w2:bf16,paper_eq8``.

Each experiment config calls ``apply_variants(config, arg)`` last, so a variant changes the
released set-up in one documented way; anything else is ``--config.a.b=value``.
"""

from typing import Callable, Optional

import ml_collections


def _bags(method: str) -> Callable[[ml_collections.ConfigDict], None]:
  def apply(config: ml_collections.ConfigDict) -> None:
    config.bags.method = method
    if config.bags.path and '_knn5' in config.bags.path:
      config.bags.path = config.bags.path.replace('_knn5', f'_{method}')
  return apply


VARIANTS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    # The paper's Eq. 8/9 loss: CE(q, k) + CE(p, k), no CutMix (docs/method.md §6).
    'paper_eq8': lambda c: (c.train.update({'loss': 'paper_eq8', 'cutmix': 'none'})),
    # Table 8 "w/o bag" ablation (SEED-like): CE(q, k) of the anchor alone, no bags or CutMix.
    'anchor_only': lambda c: c.train.update({'loss': 'anchor_only', 'cutmix': 'none'}),
    # Paper Table 9 baselines (objectives.BASELINES): KD (L2 of the normalised embeddings of
    # the same view) and RKD (in-batch similarity matrices matched); no bags, no CutMix.
    'kd': lambda c: c.train.update({'loss': 'kd', 'cutmix': 'none'}),
    'rkd': lambda c: c.train.update({'loss': 'rkd', 'cutmix': 'none'}),
    # One CutMix box per sample instead of the released one box per batch.
    'cutmix_sample': lambda c: c.train.update({'cutmix': 'sample'}),
    # bfloat16 compute, float32 parameters and optimizer state.
    'bf16': lambda c: c.train.update({'compute_dtype': 'bfloat16'}),
    # Teacher BatchNorm with its stored running statistics instead of shuffled batch statistics.
    'frozen_teacher': lambda c: c.teacher.update({'bn_mode': 'frozen'}),
    # Student BatchNorm statistics over the whole global batch instead of groups of 32.
    'global_bn': lambda c: c.student.update({'bn_group_size': None}),
    # Cosine learning rate updated every step instead of once per epoch (released).
    'cosine_step': lambda c: c.train.update({'lr_schedule': 'cosine_step'}),
    # Bags from k-means clusters / ground-truth labels (paper Table 6) instead of kNN.
    'kmeans': _bags('kmeans'),
    'labels': _bags('labels'),
}


def apply_variants(config: ml_collections.ConfigDict,
                   arg: Optional[str]) -> ml_collections.ConfigDict:
  """Applies the comma-separated variant names in ``arg`` (``None`` or ``''``: none).

  Raises:
    ValueError: an unknown variant name (the message lists the known ones).
  """
  for name in filter(None, (part.strip() for part in (arg or '').split(','))):
    if name not in VARIANTS:
      raise ValueError(f'Unknown config variant {name!r}; known variants: '
                       f'{", ".join(sorted(VARIANTS))}.')
    VARIANTS[name](config)
  return config

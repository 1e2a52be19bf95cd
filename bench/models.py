"""The networks of the step benchmarks (bench/accelerator.py, bench/scaling.py): no flags, so
that any bench script can import it."""

from __future__ import annotations

import flax.linen as nn
import ml_collections

from bingo_jax.models import create_model


def create_models(config: ml_collections.ConfigDict, tiny: bool, dtype: str
                  ) -> tuple[nn.Module, nn.Module]:
  """``(student, teacher)``: the config's R-18 and an R-50x2 with a MoCo head, or (``tiny``)
  width-8 ResNet-18s, the student's config updated to match. BatchNorm groups: the config's."""
  if tiny:
    config.student.update(base_width=8, stem='cifar', head_hidden_dim=32, head_output_dim=16)
    teacher = create_model('resnet18', 'moco', base_width=8, stem='cifar', head_hidden_dim=32,
                           head_output_dim=16, bn_group_size=config.teacher.bn_group_size,
                           dtype=dtype)
  else:
    teacher = create_model('resnet50w2', 'moco', head_output_dim=128,
                           bn_group_size=config.teacher.bn_group_size, dtype=dtype)
  student = create_model(config.student.arch, config.student.head,
                         head_hidden_dim=config.student.head_hidden_dim,
                         head_output_dim=config.student.head_output_dim,
                         base_width=config.student.base_width, stem=config.student.stem,
                         bn_group_size=config.student.bn_group_size, dtype=dtype)
  return student, teacher

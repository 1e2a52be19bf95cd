"""One registry for every network: ``create_model(arch, head=...)``.

A model is a backbone (pooled features) plus an optional head. Its whole description is a
small JSON-serialisable dict (``model_config``) that is stored next to every checkpoint, so
``create_model(**model_config)`` rebuilds the module that the stored variables belong to.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bingo_jax.models import efficientnet as efficientnet_lib
from bingo_jax.models import heads as heads_lib
from bingo_jax.models import resnet as resnet_lib

Dtype = Any

HEADS = ('moco', 'swav', 'linear')


class Model(nn.Module):
  """Backbone + head. ``__call__`` returns ``(features, head_output)``.

  ``features``: pooled backbone features ``(batch, feature_dim)``, float32.
  ``head_output``: ``(batch, output_dim)`` float32, or ``None`` when there is no head.
  Variables: ``params`` and ``batch_stats``, each ``{'backbone': ..., 'head': ...}``.
  """
  backbone: nn.Module
  head: Optional[nn.Module] = None

  def __call__(self, images: jax.Array, train: bool = False):
    features = self.backbone(images, train=train)
    if self.head is None:
      return features, None
    return features, self.head(features, train=train).astype(jnp.float32)

  @property
  def feature_dim(self) -> int:
    return self.backbone.feature_dim


_BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str):
  """Decorator adding a backbone factory ``fn(base_width, stem, bn_group_size, dtype)``."""
  def wrap(fn):
    _BACKBONES[name] = fn
    return fn
  return wrap


def _resnet_factory(name):
  stages, block, widen = resnet_lib.RESNET_STAGES[name]

  def make(base_width: Optional[int] = None, stem: str = 'imagenet',
           bn_group_size: Optional[int] = None, dtype: Optional[Dtype] = None) -> nn.Module:
    return resnet_lib.ResNet(stage_sizes=stages, block=block,
                             base_width=base_width or 64 * widen, stem=stem,
                             bn_group_size=bn_group_size, dtype=dtype, name='backbone')
  return make


for _name in resnet_lib.RESNET_STAGES:
  register_backbone(_name)(_resnet_factory(_name))
register_backbone('efficientnet_b0')(efficientnet_lib.efficientnet_b0)


def available_archs() -> list[str]:
  return sorted(_BACKBONES)


def create_model(arch: str, head: Optional[str] = None, *, head_hidden_dim: Optional[int] = None,
                 head_output_dim: int = 128, num_classes: int = 1000,
                 base_width: Optional[int] = None, stem: str = 'imagenet',
                 bn_group_size: Optional[int] = None, dtype: Optional[Dtype] = None,
                 **unused_metadata) -> Model:
  """Builds a network.

  Args:
    arch: one of ``available_archs()``: resnet18/34/50/101/152, resnet50w2/w4, efficientnet_b0.
    head: ``None`` (backbone only), ``'moco'`` (MLP feature->2048->128), ``'swav'``
      (feature->8192->BN->ReLU->128) or ``'linear'`` (classifier with ``num_classes``).
    head_hidden_dim: hidden width of the MLP heads (default 2048 for moco, 8192 for swav).
    head_output_dim: embedding dimension of the MLP heads.
    num_classes: outputs of the linear head.
    base_width: stem/first-stage width of ResNets (default: the architecture's own, 64 or
      64 x widen); small values give small test models. For EfficientNet-B0 the stem width
      (default 32): every width is scaled by ``base_width / 32``.
    stem: ResNet stem, ``'imagenet'`` or ``'cifar'`` (3x3 stride 1, no max-pool; small images).
    bn_group_size: training-mode BatchNorm statistics over groups of this many examples.
    dtype: computation dtype, e.g. ``jnp.bfloat16``; parameters are always float32.
    **unused_metadata: other keys of a stored ``model_config`` (ignored), so that
      ``create_model(**metadata['model'])`` works.
  """
  if arch not in _BACKBONES:
    raise ValueError(f'Unknown architecture {arch!r}; available: {", ".join(available_archs())}.')
  if isinstance(dtype, str):
    dtype = jnp.dtype(dtype)
  backbone = _BACKBONES[arch](base_width=base_width, stem=stem, bn_group_size=bn_group_size,
                              dtype=dtype)
  if head is None or head == 'none':
    head_module = None
  elif head == 'moco':
    head_module = heads_lib.MoCoHead(hidden_dim=head_hidden_dim or 2048,
                                     output_dim=head_output_dim, dtype=dtype, name='head')
  elif head == 'swav':
    head_module = heads_lib.SwAVHead(hidden_dim=head_hidden_dim or 8192,
                                     output_dim=head_output_dim, bn_group_size=bn_group_size,
                                     dtype=dtype, name='head')
  elif head == 'linear':
    head_module = heads_lib.LinearHead(num_classes=num_classes, dtype=dtype, name='head')
  else:
    raise ValueError(f'Unknown head {head!r}; expected None or one of {HEADS}.')
  return Model(backbone=backbone, head=head_module)


@functools.lru_cache(maxsize=8)
def _jitted_init(model: Model, image_size: int) -> Callable[[jax.Array], Any]:
  # Cached per (model, size): flax modules compare by value, so initialising the same
  # architecture again in one process (another seed, a rerun) does not compile again.
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(lambda rng: model.init(rng, images, train=False))


def init_variables(model: Model, rng: jax.Array, image_size: int = 224) -> dict:
  """Initial ``{'params', 'batch_stats'}`` for ``model`` (shapes do not depend on image size)."""
  return dict(_jitted_init(model, image_size)(rng))

"""Heads on top of the pooled backbone features (docs/method.md §4).

Module names mirror the PyTorch indices (``fc.0`` -> ``fc0``, ``projection_head.3`` ->
``dense3``) so that the checkpoint mapping is a table lookup.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bingo_jax.models.layers import BatchNorm

Dtype = Any


def _dense(features: int, dtype: Optional[Dtype], name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


class MoCoHead(nn.Module):
  """MoCo v2 MLP: Linear(feature_dim, hidden) - ReLU - Linear(hidden, output) (``fc.0``/``fc.2``)."""
  hidden_dim: int = 2048
  output_dim: int = 128
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = nn.relu(_dense(self.hidden_dim, self.dtype, 'fc0')(features))
    return _dense(self.output_dim, self.dtype, 'fc2')(x)


class SwAVHead(nn.Module):
  """SwAV projection: Linear - BatchNorm1d - ReLU - Linear (``projection_head.0/1/3``)."""
  hidden_dim: int = 8192
  output_dim: int = 128
  bn_group_size: Optional[int] = None
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    x = _dense(self.hidden_dim, self.dtype, 'dense0')(features)
    x = BatchNorm(use_running_average=not train, group_size=self.bn_group_size,
                  dtype=self.dtype, name='bn1')(x)
    return _dense(self.output_dim, self.dtype, 'dense3')(nn.relu(x))


class LinearHead(nn.Module):
  """A linear classifier ``fc`` (torchvision's supervised head, linear evaluation)."""
  num_classes: int = 1000
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    del train
    return _dense(self.num_classes, self.dtype, 'fc')(features)

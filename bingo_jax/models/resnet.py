"""ResNet backbones with the torchvision structure (and SwAV's widened ResNet-50s).

Module names follow the PyTorch state-dict names (``conv1``, ``bn1``, ``layer1_0``,
``downsample_conv``...) so that the checkpoint mapping in ``bingo_jax.torch_io.mapping`` stays
mechanical. Bottleneck blocks put the stride on the 3x3 convolution (torchvision's
"ResNet v1.5", which MoCo, SwAV and torchvision checkpoints all use).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bingo_jax.models.layers import BatchNorm, conv

Dtype = Any


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34). Output channels: ``planes``."""
  planes: int
  stride: int = 1
  bn_group_size: Optional[int] = None
  dtype: Optional[Dtype] = None
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda name: BatchNorm(use_running_average=not train, group_size=self.bn_group_size,
                                  dtype=self.dtype, name=name)
    y = conv(self.planes, 3, self.stride, dtype=self.dtype, name='conv1')(x)
    y = nn.relu(norm('bn1')(y))
    y = conv(self.planes, 3, dtype=self.dtype, name='conv2')(y)
    y = norm('bn2')(y)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = conv(self.planes, 1, self.stride, dtype=self.dtype, name='downsample_conv')(x)
      x = norm('downsample_bn')(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 - 3x3 (strided) - 1x1 block (ResNet-50 and deeper). Output: ``4 * planes``."""
  planes: int
  stride: int = 1
  bn_group_size: Optional[int] = None
  dtype: Optional[Dtype] = None
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda name: BatchNorm(use_running_average=not train, group_size=self.bn_group_size,
                                  dtype=self.dtype, name=name)
    out_channels = self.planes * self.expansion
    y = conv(self.planes, 1, dtype=self.dtype, name='conv1')(x)
    y = nn.relu(norm('bn1')(y))
    y = conv(self.planes, 3, self.stride, dtype=self.dtype, name='conv2')(y)
    y = nn.relu(norm('bn2')(y))
    y = conv(out_channels, 1, dtype=self.dtype, name='conv3')(y)
    y = norm('bn3')(y)
    if self.stride != 1 or x.shape[-1] != out_channels:
      x = conv(out_channels, 1, self.stride, dtype=self.dtype, name='downsample_conv')(x)
      x = norm('downsample_bn')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A ResNet backbone returning globally average-pooled features ``(batch, feature_dim)``.

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
    block: ``BasicBlock`` or ``Bottleneck``.
    base_width: channels of the stem and of the first stage (64 in torchvision; 128 for
      SwAV's ResNet-50x2, every later width scales with it). Small values make test models.
    stem: ``'imagenet'`` (7x7 stride-2 convolution + 3x3 max-pool, torchvision) or
      ``'cifar'`` (3x3 stride-1 convolution, no pooling) for images of 32 px or less.
    bn_group_size: training-mode BatchNorm statistics group (see ``layers.BatchNorm``).
    dtype: computation dtype (parameters stay float32); features are returned in float32.
  """
  stage_sizes: Sequence[int]
  block: Any
  base_width: int = 64
  stem: str = 'imagenet'
  bn_group_size: Optional[int] = None
  dtype: Optional[Dtype] = None

  @property
  def feature_dim(self) -> int:
    return self.base_width * 8 * self.block.expansion

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Args: images ``(batch, height, width, 3)``. Returns: features ``(batch, feature_dim)``."""
    x = images.astype(self.dtype) if self.dtype else images
    if self.stem == 'imagenet':
      x = conv(self.base_width, 7, 2, dtype=self.dtype, name='conv1')(x)
    elif self.stem == 'cifar':
      x = conv(self.base_width, 3, 1, dtype=self.dtype, name='conv1')(x)
    else:
      raise ValueError(f"Unknown ResNet stem {self.stem!r}; expected 'imagenet' or 'cifar'.")
    x = BatchNorm(use_running_average=not train, group_size=self.bn_group_size,
                  dtype=self.dtype, name='bn1')(x)
    x = nn.relu(x)
    if self.stem == 'imagenet':
      # torch MaxPool2d(3, 2, padding=1) pads with -inf.
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(self.stage_sizes):
      planes = self.base_width * 2**stage
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        x = self.block(planes, stride, bn_group_size=self.bn_group_size, dtype=self.dtype,
                       name=f'layer{stage + 1}_{index}')(x, train)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


RESNET_STAGES = {
    'resnet18': ((2, 2, 2, 2), BasicBlock, 1),
    'resnet34': ((3, 4, 6, 3), BasicBlock, 1),
    'resnet50': ((3, 4, 6, 3), Bottleneck, 1),
    'resnet101': ((3, 4, 23, 3), Bottleneck, 1),
    'resnet152': ((3, 8, 36, 3), Bottleneck, 1),
    # SwAV's widened ResNet-50s: every width multiplied (R-50x2 gives 4096-d features).
    'resnet50w2': ((3, 4, 6, 3), Bottleneck, 2),
    'resnet50w4': ((3, 4, 6, 3), Bottleneck, 4),
}

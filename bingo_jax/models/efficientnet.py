"""EfficientNet-B0 backbone, computing exactly what ``efficientnet_pytorch`` 0.7.1 computes.

The released BINGO code builds its EfficientNet-B0 student with ``efficientnet_pytorch``
(``EfficientNet.from_name('efficientnet-b0')``, its ``fc`` replaced by the MoCo MLP head;
docs/method.md §4). Three details of that package decide whether PyTorch weights reproduce
their features here:

* Padding. Every convolution is a ``Conv2dStaticSamePadding`` built for a *nominal* image of
  224 px: TensorFlow-style SAME padding (possibly one pixel more at the bottom/right) is
  computed once from the nominal resolution each layer sees, then applied as fixed zero
  padding to whatever input arrives. At 224 px that is SAME padding; at any other size it is
  not, so the pads are derived here from the nominal resolution, never from the input.
* Skip connections. A block adds its input only if ``stride == 1`` and its input and output
  widths match. The first block of each stage keeps its stride as a one-element *list*, for
  which ``[1] == 1`` is false, so the first block of a stage never has a skip connection
  (it makes no difference at full width, where those blocks change width anyway, but it does
  for narrow test models).
* Training-mode randomness. Drop-connect (stochastic depth) on the residual branch with rate
  ``0.2 * block_index / 16``, and dropout 0.2 on the pooled features, which the released
  ``forward`` applies just before its ``fc`` (here: before the head). Both need the
  ``'dropout'`` rng; eval mode is deterministic.

BatchNorm follows the package: epsilon 1e-3, PyTorch momentum 0.01 (TensorFlow's 0.99).
Module names mirror the PyTorch state-dict names (``conv_stem``, ``blocks_3``,
``depthwise_conv``...) so that ``bingo_jax.torch_io.mapping.efficientnet`` stays mechanical.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bingo_jax.models.layers import BatchNorm, conv

Dtype = Any

# efficientnet_pytorch's global parameters of efficientnet-b0.
NOMINAL_IMAGE_SIZE = 224
BATCH_NORM_MOMENTUM = 0.01  # torch convention, i.e. 1 - 0.99
BATCH_NORM_EPSILON = 1e-3
DROP_CONNECT_RATE = 0.2
DROPOUT_RATE = 0.2
SE_RATIO = 0.25
STEM_WIDTH = 32
HEAD_WIDTH = 1280
WIDTH_DIVISOR = 8

# (num_repeat, kernel_size, stride, expand_ratio, input_filters, output_filters) of each stage:
# the block strings 'r1_k3_s11_e1_i32_o16_se0.25', ... of efficientnet_pytorch.
B0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def round_filters(filters: int, width_coefficient: float) -> int:
  """A width scaled by ``width_coefficient``, rounded as efficientnet_pytorch rounds it."""
  scaled = filters * width_coefficient
  rounded = max(WIDTH_DIVISOR, int(scaled + WIDTH_DIVISOR / 2) // WIDTH_DIVISOR * WIDTH_DIVISOR)
  if rounded < 0.9 * scaled:  # never round down by more than 10%
    rounded += WIDTH_DIVISOR
  return int(rounded)


def static_same_padding(input_size: int, kernel_size: int, stride: int) -> tuple[int, int]:
  """Fixed ``(before, after)`` zero padding of ``Conv2dStaticSamePadding`` on one axis.

  Args:
    input_size: the *nominal* resolution the layer sees for a 224 px image.
    kernel_size: square kernel size.
    stride: convolution stride.

  Returns:
    ``(before, after)``; ``after`` is the larger one when the total is odd (TensorFlow SAME).
  """
  output_size = math.ceil(input_size / stride)
  total = max((output_size - 1) * stride + kernel_size - input_size, 0)
  return total // 2, total - total // 2


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Static description of one MBConv block (shared with the PyTorch weight mapping).

  Attributes:
    input_filters: channels entering the block.
    output_filters: channels leaving the block.
    expand_ratio: width of the expanded (depthwise) stage over ``input_filters``; 1 means no
      expansion convolution.
    kernel_size: depthwise kernel size (3 or 5).
    stride: depthwise stride (1 or 2).
    se_filters: squeeze-excitation bottleneck width, ``max(1, int(input_filters * 0.25))``.
    has_skip: whether the block adds its input (see the module docstring for the first-block
      rule of efficientnet_pytorch).
    drop_connect_rate: stochastic-depth rate of this block in training mode.
    nominal_input_size: resolution the block sees for a 224 px image (fixes its padding).
  """
  input_filters: int
  output_filters: int
  expand_ratio: int
  kernel_size: int
  stride: int
  se_filters: int
  has_skip: bool
  drop_connect_rate: float
  nominal_input_size: int

  @property
  def expanded_filters(self) -> int:
    return self.input_filters * self.expand_ratio


def width_coefficient_for(base_width: Optional[int]) -> float:
  """Width multiplier of a backbone whose stem has ``base_width`` channels (B0: 32)."""
  if base_width is None:
    return 1.0
  if base_width <= 0:
    raise ValueError(f'EfficientNet base_width must be positive, got {base_width!r}.')
  return base_width / STEM_WIDTH


def block_configs(width_coefficient: float = 1.0,
                  nominal_image_size: int = NOMINAL_IMAGE_SIZE,
                  drop_connect_rate: float = DROP_CONNECT_RATE) -> list[BlockConfig]:
  """The 16 MBConv blocks of EfficientNet-B0 (widths scaled by ``width_coefficient``).

  Block ``i`` of ``n`` gets the stochastic-depth rate ``drop_connect_rate * i / n``.
  """
  stage_specs = [(repeats, kernel, stride, expand, round_filters(inp, width_coefficient),
                  round_filters(out, width_coefficient))
                 for repeats, kernel, stride, expand, inp, out in B0_STAGES]
  num_blocks = sum(spec[0] for spec in stage_specs)
  size = math.ceil(nominal_image_size / 2)  # after the stride-2 stem
  configs = []
  for repeats, kernel, stride, expand, input_filters, output_filters in stage_specs:
    for repeat in range(repeats):
      block_input = input_filters if repeat == 0 else output_filters
      block_stride = stride if repeat == 0 else 1
      index = len(configs)
      configs.append(BlockConfig(
          input_filters=block_input,
          output_filters=output_filters,
          expand_ratio=expand,
          kernel_size=kernel,
          stride=block_stride,
          se_filters=max(1, int(block_input * SE_RATIO)),
          # The first block of a stage never skips (its stride is a list in the package).
          has_skip=repeat > 0 and block_input == output_filters,
          drop_connect_rate=drop_connect_rate * index / num_blocks,
          nominal_input_size=size))
      size = math.ceil(size / block_stride)
  return configs


class MBConvBlock(nn.Module):
  """Inverted residual block: expand 1x1, depthwise kxk, squeeze-excitation, project 1x1."""
  config: BlockConfig
  bn_group_size: Optional[int] = None
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool) -> jax.Array:
    """Args: inputs ``(batch, h, w, input_filters)``. Returns: ``(batch, h', w', output)``."""
    config = self.config
    norm = lambda name: BatchNorm(use_running_average=not train, momentum=BATCH_NORM_MOMENTUM,
                                  epsilon=BATCH_NORM_EPSILON, group_size=self.bn_group_size,
                                  dtype=self.dtype, name=name)
    x = inputs
    if config.expand_ratio != 1:
      x = conv(config.expanded_filters, 1, dtype=self.dtype, name='expand_conv')(x)
      x = nn.swish(norm('bn0')(x))
    padding = static_same_padding(config.nominal_input_size, config.kernel_size, config.stride)
    x = conv(config.expanded_filters, config.kernel_size, config.stride, padding=padding,
             groups=config.expanded_filters, dtype=self.dtype, name='depthwise_conv')(x)
    x = nn.swish(norm('bn1')(x))

    squeezed = jnp.mean(x, axis=(1, 2), keepdims=True)
    squeezed = conv(config.se_filters, 1, use_bias=True, dtype=self.dtype,
                    name='se_reduce')(squeezed)
    squeezed = conv(config.expanded_filters, 1, use_bias=True, dtype=self.dtype,
                    name='se_expand')(nn.swish(squeezed))
    x = nn.sigmoid(squeezed) * x

    x = conv(config.output_filters, 1, dtype=self.dtype, name='project_conv')(x)
    x = norm('bn2')(x)
    if not config.has_skip:
      return x
    if train and config.drop_connect_rate > 0:
      # Stochastic depth as the package does it: drop the residual branch per example and
      # rescale the kept ones by 1 / keep_prob.
      keep_prob = 1.0 - config.drop_connect_rate
      keep = jax.random.bernoulli(self.make_rng('dropout'), keep_prob, (x.shape[0], 1, 1, 1))
      x = jnp.where(keep, x / keep_prob, jnp.zeros_like(x))
    return x + inputs


class EfficientNet(nn.Module):
  """EfficientNet-B0 backbone returning globally average-pooled features ``(batch, feature_dim)``.

  Attributes:
    width_coefficient: multiplies every width (rounded to multiples of 8, as the package
      does); 1.0 is EfficientNet-B0 (1280-d features), 0.25 a small test model (320-d).
    nominal_image_size: image size the fixed convolution padding is computed for (224, as
      ``from_name('efficientnet-b0')``); inputs of any size are accepted.
    drop_connect_rate: stochastic-depth rate of the last block (scaled by block index).
    dropout_rate: dropout on the pooled features in training mode (the released ``forward``
      applies it before its ``fc``, i.e. before the head).
    bn_group_size: training-mode BatchNorm statistics group (see ``layers.BatchNorm``).
    dtype: computation dtype (parameters stay float32); features are returned in float32.
  """
  width_coefficient: float = 1.0
  nominal_image_size: int = NOMINAL_IMAGE_SIZE
  drop_connect_rate: float = DROP_CONNECT_RATE
  dropout_rate: float = DROPOUT_RATE
  bn_group_size: Optional[int] = None
  dtype: Optional[Dtype] = None

  @property
  def feature_dim(self) -> int:
    return round_filters(HEAD_WIDTH, self.width_coefficient)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Normalised images to pooled features.

    Args:
      images: ``(batch, height, width, 3)`` float, normalised; any height and width.
      train: training mode (batch statistics, drop-connect, dropout; needs the ``'dropout'``
        rng) or eval mode (running statistics, deterministic).

    Returns:
      Features ``(batch, feature_dim)``, float32.
    """
    stochastic = self.drop_connect_rate > 0 or self.dropout_rate > 0
    if train and stochastic and not self.has_rng('dropout'):
      raise ValueError("EfficientNet in training mode needs a 'dropout' rng for drop-connect "
                       "and dropout: apply(..., train=True, rngs={'dropout': key}).")
    norm = lambda name: BatchNorm(use_running_average=not train, momentum=BATCH_NORM_MOMENTUM,
                                  epsilon=BATCH_NORM_EPSILON, group_size=self.bn_group_size,
                                  dtype=self.dtype, name=name)
    x = images.astype(self.dtype) if self.dtype else images
    stem_padding = static_same_padding(self.nominal_image_size, 3, 2)
    x = conv(round_filters(STEM_WIDTH, self.width_coefficient), 3, 2, padding=stem_padding,
             dtype=self.dtype, name='conv_stem')(x)
    x = nn.swish(norm('bn0')(x))
    configs = block_configs(self.width_coefficient, self.nominal_image_size,
                            self.drop_connect_rate)
    for index, config in enumerate(configs):
      x = MBConvBlock(config, bn_group_size=self.bn_group_size, dtype=self.dtype,
                      name=f'blocks_{index}')(x, train)
    x = conv(self.feature_dim, 1, dtype=self.dtype, name='conv_head')(x)
    x = nn.swish(norm('bn1')(x))
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dropout(self.dropout_rate, deterministic=not train)(features)


def efficientnet_b0(base_width: Optional[int] = None, stem: str = 'imagenet',
                    bn_group_size: Optional[int] = None,
                    dtype: Optional[Dtype] = None) -> EfficientNet:
  """Registry factory of EfficientNet-B0.

  Args:
    base_width: stem width; ``None`` or 32 is B0, smaller values scale every width by
      ``base_width / 32`` (8 gives a 320-d test model).
    stem: must be ``'imagenet'`` (EfficientNet has a single stem).
    bn_group_size: training-mode BatchNorm statistics group size.
    dtype: computation dtype.

  Returns:
    The backbone module, named ``'backbone'``.
  """
  if stem != 'imagenet':
    raise ValueError(f"EfficientNet has only the 'imagenet' stem, got stem={stem!r}.")
  return EfficientNet(width_coefficient=width_coefficient_for(base_width),
                      bn_group_size=bn_group_size, dtype=dtype, name='backbone')

"""Layers shared by every network: PyTorch-compatible convolution padding and BatchNorm.

PyTorch checkpoints only reproduce their features if the Flax layers compute exactly what
the PyTorch layers compute. Two details matter:

* padding: ``nn.Conv2d(padding=p)`` pads ``p`` zeros on *both* sides. Flax's ``'SAME'`` pads
  stride-2 convolutions asymmetrically, which shifts every feature map by half a pixel.
* BatchNorm: PyTorch's momentum convention (``new = (1 - m) * old + m * batch``), its
  unbiased running variance, and epsilon 1e-5.

``BatchNorm`` here also implements the statistics grouping of the released BINGO code
(docs/method.md §5): in training mode the batch is split into consecutive groups of
``group_size`` examples and each group is normalised with its own statistics, as each GPU of
an 8 x 32 run does. The grouping is defined on the global batch, so the result does not
depend on how many devices the batch is sharded over. With ``positions`` the groups are
those of the batch reordered (the teacher's batch shuffle without moving images,
docs/training.md): each group's statistics are sums of its members' activations, so on a
sharded batch only ``(groups, channels)`` statistics cross devices.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def torch_padding(kernel_size: int, padding: Union[None, int, tuple[int, int]] = None
                  ) -> Sequence[tuple[int, int]]:
  """Spatial padding of a square PyTorch convolution, the same on both axes.

  ``padding``: ``None`` (``kernel_size // 2`` on every side), an int ``p`` (``nn.Conv2d``'s
  symmetric padding) or ``(before, after)`` (efficientnet_pytorch's fixed SAME padding).
  """
  if padding is None:
    padding = kernel_size // 2
  if isinstance(padding, int):
    padding = (padding, padding)
  return (tuple(padding), tuple(padding))


def conv(features: int, kernel_size: int, stride: int = 1, *,
         padding: Union[None, int, tuple[int, int]] = None,
         groups: int = 1, use_bias: bool = False, dtype: Optional[Dtype] = None,
         name: Optional[str] = None) -> nn.Conv:
  """A 2D convolution laid out like ``torch.nn.Conv2d`` (kernel HWIO, see ``torch_padding``)."""
  return nn.Conv(
      features,
      kernel_size=(kernel_size, kernel_size),
      strides=(stride, stride),
      padding=torch_padding(kernel_size, padding),
      feature_group_count=groups,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      # PyTorch's default for conv weights used by torchvision ResNets.
      kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
      name=name,
  )


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch semantics and optional fixed-size statistics groups.

  Works on any input whose last axis is the channel axis: ``(batch, channels)`` or
  ``(batch, height, width, channels)``.

  Attributes:
    use_running_average: if True, normalise with the stored running statistics (PyTorch's
      eval mode); if False, with batch statistics (training mode).
    momentum: PyTorch convention, weight of the new batch statistic (0.1 in torch).
    epsilon: added to the variance (1e-5 in torch).
    group_size: training-mode statistics are computed over consecutive groups of this many
      examples; ``None`` uses the whole batch. The batch size must be a multiple of it.
    dtype: dtype of the output; statistics are always computed in float32.
  """
  use_running_average: Optional[bool] = None
  momentum: float = 0.1
  epsilon: float = 1e-5
  group_size: Optional[int] = None
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None,
               positions: Optional[jax.Array] = None) -> jax.Array:
    """Normalises ``x``. In training mode, ``positions`` (``(batch,)`` int, a permutation of
    ``range(batch)``) places each example in a reordered batch whose consecutive groups are
    the statistics groups; the output stays in the order of ``x``."""
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    channels = x.shape[-1]
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (channels,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (channels,), jnp.float32)
    scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    out_dtype = self.dtype or x.dtype
    x32 = x.astype(jnp.float32)

    if use_running_average:
      multiplier = scale * jax.lax.rsqrt(running_var.value + self.epsilon)
      return (x32 * multiplier + (bias - running_mean.value * multiplier)).astype(out_dtype)

    batch = x.shape[0]
    group_size = self.group_size or batch
    if batch % group_size:
      raise ValueError(f'BatchNorm {self.name!r}: batch size {batch} is not a multiple of the '
                       f'statistics group size {group_size}.')
    count = group_size * functools.reduce(lambda a, b: a * b, x.shape[1:-1], 1)
    if positions is None:
      grouped = x32.reshape((batch // group_size, group_size) + x.shape[1:])
      reduce_axes = tuple(range(1, grouped.ndim - 1))
      mean = grouped.mean(axis=reduce_axes, keepdims=True)
      # Two-pass variance: as accurate as PyTorch's on activations with a large mean.
      var = jnp.square(grouped - mean).mean(axis=reduce_axes, keepdims=True)
      normalised = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    else:
      # The stored mean centres the sums (see _statistics_by_id); it is not trained.
      shift = jax.lax.stop_gradient(running_mean.value)
      mean, var, normalised = _statistics_by_id(x32, positions // group_size,
                                                batch // group_size, count, self.epsilon,
                                                shift)
    y = normalised * scale + bias

    if not self.is_initializing():
      # Each group updates the running statistics as one PyTorch replica would; the groups'
      # statistics are averaged (unbiased variance, as torch stores it).
      batch_mean = mean.reshape(-1, channels).mean(axis=0)
      batch_var = (var.reshape(-1, channels) * (count / max(count - 1, 1))).mean(axis=0)
      running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * batch_mean
      running_var.value = (1 - self.momentum) * running_var.value + self.momentum * batch_var
    return y.astype(out_dtype)


def _statistics_by_id(x: jax.Array, group_ids: jax.Array, num_groups: int, count: int,
                      epsilon: float, shift: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm over the groups ``group_ids`` names, without moving examples.

  Each example's activations, less ``shift``, and their squares are summed over its spatial
  positions, then added into its group by one one-hot contraction over the batch: on a batch
  sharded over devices XLA makes that one all-reduce of ``(num_groups, 2 * channels)`` per
  layer, whatever the image size. The variance is the mean square less the squared mean of
  the shifted values; with ``shift`` near the group means (the layer's running mean) this
  loses no precision to the values' offset, as a two-pass variance would not either.

  Args:
    x: ``(batch, ..., channels)`` float32.
    group_ids: ``(batch,)`` int, each in ``[0, num_groups)``.
    num_groups: number of groups.
    count: values per group and channel (group size times spatial positions).
    epsilon: added to the variance.
    shift: ``(channels,)`` subtracted before summing.
  Returns:
    ``(mean, var, normalised)``: ``(num_groups, channels)`` group means and biased
    variances, and ``x`` normalised with its group's statistics.
  """
  one_hot = jax.nn.one_hot(group_ids, num_groups, dtype=jnp.float32)  # (batch, groups)
  spatial_axes = tuple(range(1, x.ndim - 1))
  per_example = (slice(None),) + (None,) * len(spatial_axes)
  shifted = x - shift
  sums = jnp.concatenate([shifted.sum(axis=spatial_axes),
                          jnp.square(shifted).sum(axis=spatial_axes)], axis=-1)
  # HIGHEST: float32 sums on every backend (a GPU would otherwise round them to TF32).
  moments = jnp.einsum('bg,bc->gc', one_hot, sums,
                       precision=jax.lax.Precision.HIGHEST) / count
  shifted_mean, mean_square = jnp.split(moments, 2, axis=-1)
  mean = shift + shifted_mean
  var = jnp.maximum(mean_square - jnp.square(shifted_mean), 0.0)
  normalised = (x - mean[group_ids][per_example]) * jax.lax.rsqrt(
      var[group_ids] + epsilon)[per_example]
  return mean, var, normalised

"""EfficientNet-B0 backbone weights: efficientnet_pytorch state dicts <-> Flax variables.

The PyTorch names are those of ``efficientnet_pytorch.EfficientNet`` (``_conv_stem.weight``,
``_blocks.3._depthwise_conv.weight``, ``_bn1.running_var``...); the Flax tree is the one of
``bingo_jax.models.efficientnet.EfficientNet`` (``conv_stem/kernel``,
``blocks_3/depthwise_conv/kernel``, ``bn1/var``...). Only backbone tensors are handled here:
the classifier/head (``_fc.*``, or ``fc.*`` in the released BINGO copy of the package) belongs
to the head mapping.

Both directions check the complete list of tensors the architecture needs: a missing tensor,
an unexpected one or a wrong shape raises ``ValueError`` naming every offending key, so a
checkpoint is never loaded partially.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from bingo_jax.models import efficientnet as efficientnet_lib
from bingo_jax.torch_io.mapping.common import NUM_BATCHES_TRACKED, flatten, set_path

ARCH = 'efficientnet_b0'
# Prefixes of the classification layer, mapped by the head mapping, not here.
HEAD_PREFIXES = ('_fc.', 'fc.')


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One backbone tensor under its PyTorch and its Flax name.

  Attributes:
    torch_key: state-dict key, e.g. ``'_blocks.3._expand_conv.weight'``.
    collection: ``'params'`` or ``'batch_stats'``.
    flax_path: path under ``variables[collection]['backbone']``.
    torch_shape: shape in the state dict.
    is_conv_kernel: OIHW in PyTorch, HWIO in Flax (depthwise: ``(C, 1, k, k)`` <->
      ``(k, k, 1, C)``, the same transposition).
  """
  torch_key: str
  collection: str
  flax_path: tuple[str, ...]
  torch_shape: tuple[int, ...]
  is_conv_kernel: bool = False

  @property
  def flax_shape(self) -> tuple[int, ...]:
    if self.is_conv_kernel:
      out_channels, in_channels, height, width = self.torch_shape
      return (height, width, in_channels, out_channels)
    return self.torch_shape

  @property
  def flax_name(self) -> str:
    return '/'.join((self.collection, 'backbone') + self.flax_path)


def _conv_tensors(torch_name: str, flax_path: tuple[str, ...], out_channels: int,
                  in_channels_per_group: int, kernel_size: int,
                  use_bias: bool = False) -> list[_Tensor]:
  tensors = [_Tensor(f'{torch_name}.weight', 'params', flax_path + ('kernel',),
                     (out_channels, in_channels_per_group, kernel_size, kernel_size),
                     is_conv_kernel=True)]
  if use_bias:
    tensors.append(_Tensor(f'{torch_name}.bias', 'params', flax_path + ('bias',),
                           (out_channels,)))
  return tensors


def _batch_norm_tensors(torch_name: str, flax_path: tuple[str, ...],
                        channels: int) -> list[_Tensor]:
  return [
      _Tensor(f'{torch_name}.weight', 'params', flax_path + ('scale',), (channels,)),
      _Tensor(f'{torch_name}.bias', 'params', flax_path + ('bias',), (channels,)),
      _Tensor(f'{torch_name}.running_mean', 'batch_stats', flax_path + ('mean',), (channels,)),
      _Tensor(f'{torch_name}.running_var', 'batch_stats', flax_path + ('var',), (channels,)),
  ]


def _width_coefficient(model_config: Mapping[str, Any]) -> float:
  arch = model_config.get('arch', ARCH)
  if arch != ARCH:
    raise ValueError(f'EfficientNet weight mapping got model_config arch={arch!r}; '
                     f'expected {ARCH!r}.')
  return efficientnet_lib.width_coefficient_for(model_config.get('base_width'))


def _backbone_tensors(model_config: Mapping[str, Any]) -> list[_Tensor]:
  """Every backbone tensor of the architecture ``model_config`` describes, in torch order."""
  width_coefficient = _width_coefficient(model_config)
  stem_width = efficientnet_lib.round_filters(efficientnet_lib.STEM_WIDTH, width_coefficient)
  tensors = _conv_tensors('_conv_stem', ('conv_stem',), stem_width, 3, 3)
  tensors += _batch_norm_tensors('_bn0', ('bn0',), stem_width)
  configs = efficientnet_lib.block_configs(width_coefficient)
  for index, config in enumerate(configs):
    torch_block, flax_block = f'_blocks.{index}.', (f'blocks_{index}',)
    expanded = config.expanded_filters
    if config.expand_ratio != 1:
      tensors += _conv_tensors(torch_block + '_expand_conv', flax_block + ('expand_conv',),
                               expanded, config.input_filters, 1)
      tensors += _batch_norm_tensors(torch_block + '_bn0', flax_block + ('bn0',), expanded)
    tensors += _conv_tensors(torch_block + '_depthwise_conv', flax_block + ('depthwise_conv',),
                             expanded, 1, config.kernel_size)
    tensors += _batch_norm_tensors(torch_block + '_bn1', flax_block + ('bn1',), expanded)
    tensors += _conv_tensors(torch_block + '_se_reduce', flax_block + ('se_reduce',),
                             config.se_filters, expanded, 1, use_bias=True)
    tensors += _conv_tensors(torch_block + '_se_expand', flax_block + ('se_expand',),
                             expanded, config.se_filters, 1, use_bias=True)
    tensors += _conv_tensors(torch_block + '_project_conv', flax_block + ('project_conv',),
                             config.output_filters, expanded, 1)
    tensors += _batch_norm_tensors(torch_block + '_bn2', flax_block + ('bn2',),
                                   config.output_filters)
  head_width = efficientnet_lib.round_filters(efficientnet_lib.HEAD_WIDTH, width_coefficient)
  tensors += _conv_tensors('_conv_head', ('conv_head',), head_width, configs[-1].output_filters,
                           1)
  tensors += _batch_norm_tensors('_bn1', ('bn1',), head_width)
  return tensors


def _batch_norm_names(tensors: Iterable[_Tensor]) -> list[str]:
  """PyTorch names of the BatchNorm layers (those owning a ``running_mean``)."""
  return [t.torch_key[:-len('.running_mean')] for t in tensors
          if t.torch_key.endswith('.running_mean')]


def _raise_on_mismatch(what: str, missing: Sequence[str], unexpected: Sequence[str],
                       wrong_shapes: Sequence[str]) -> None:
  problems = []
  if missing:
    problems.append(f'missing keys: {", ".join(missing)}')
  if unexpected:
    problems.append(f'unexpected keys: {", ".join(unexpected)}')
  if wrong_shapes:
    problems.append(f'wrong shapes: {"; ".join(wrong_shapes)}')
  if problems:
    raise ValueError(f'{what} does not match EfficientNet-B0: ' + ' | '.join(problems))


def looks_like_efficientnet(state_dict: Mapping[str, Any]) -> bool:
  """Whether a state dict holds an efficientnet_pytorch backbone (keys may carry a prefix)."""
  return (any(key.endswith('_conv_stem.weight') for key in state_dict)
          and any('_blocks.0._depthwise_conv.weight' in key for key in state_dict))


def torch_to_flax(state_dict: Mapping[str, Any], model_config: Mapping[str, Any],
                  head_prefixes: Sequence[str] = HEAD_PREFIXES) -> dict:
  """Maps an efficientnet_pytorch state dict onto the Flax backbone.

  Args:
    state_dict: ``{torch_key: array}`` without any wrapper prefix (strip ``module.`` /
      ``encoder_q.`` first); values are numpy arrays (or CPU tensors). ``num_batches_tracked``
      entries and keys starting with ``head_prefixes`` are ignored; every other key must be
      a backbone tensor of the architecture.
    model_config: the model's config (``arch='efficientnet_b0'``, optional ``base_width``).
    head_prefixes: key prefixes of the classifier/head, left to the head mapping.

  Returns:
    ``{'params': {'backbone': tree}, 'batch_stats': {'backbone': tree}}`` of float32 arrays.

  Raises:
    ValueError: naming every missing key, unexpected key and wrongly shaped tensor.
  """
  tensors = _backbone_tensors(model_config)
  expected = {t.torch_key: t for t in tensors}
  batch_norms = set(_batch_norm_names(tensors))
  given = {}
  unexpected = []
  for key, value in state_dict.items():
    if key.startswith(tuple(head_prefixes)):
      continue
    if key in expected:
      given[key] = value
    elif (key.endswith('.' + NUM_BATCHES_TRACKED)
          and key[:-len(NUM_BATCHES_TRACKED) - 1] in batch_norms):
      continue
    else:
      unexpected.append(key)
  missing = [key for key in expected if key not in given]
  wrong_shapes = [f'{key} has {tuple(np.shape(value))}, expected {expected[key].torch_shape}'
                  for key, value in given.items()
                  if tuple(np.shape(value)) != expected[key].torch_shape]
  _raise_on_mismatch('PyTorch state dict', missing, sorted(unexpected), wrong_shapes)

  variables: dict = {'params': {'backbone': {}}, 'batch_stats': {'backbone': {}}}
  for key, tensor in expected.items():
    value = np.asarray(given[key], dtype=np.float32)
    if tensor.is_conv_kernel:
      value = np.ascontiguousarray(value.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    set_path(variables[tensor.collection]['backbone'], tensor.flax_path, value)
  return variables


def flax_to_torch(variables: Mapping[str, Any],
                  model_config: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Exact reverse of ``torch_to_flax``: the backbone as an efficientnet_pytorch state dict.

  Args:
    variables: ``{'params': {'backbone': ...}, 'batch_stats': {'backbone': ...}}``; other
      sub-trees (``'head'``) are ignored.
    model_config: the model's config (``arch='efficientnet_b0'``, optional ``base_width``).

  Returns:
    ``{torch_key: np.ndarray}``: float32 tensors plus an int64 zero ``num_batches_tracked``
    per BatchNorm, so that together with the head keys it loads with ``strict=True``.

  Raises:
    ValueError: naming every missing, unexpected or wrongly shaped Flax variable.
  """
  tensors = _backbone_tensors(model_config)
  expected = {t.flax_name: t for t in tensors}
  given = {}
  for collection in ('params', 'batch_stats'):
    backbone = variables.get(collection, {}).get('backbone', {})
    for path, value in flatten(backbone).items():
      given['/'.join((collection, 'backbone') + path)] = value
  missing = [name for name in expected if name not in given]
  unexpected = sorted(name for name in given if name not in expected)
  wrong_shapes = [f'{name} has {tuple(np.shape(value))}, expected {expected[name].flax_shape}'
                  for name, value in given.items()
                  if name in expected and tuple(np.shape(value)) != expected[name].flax_shape]
  _raise_on_mismatch('Flax variables', missing, unexpected, wrong_shapes)

  state_dict = {}
  for name, tensor in expected.items():
    value = np.asarray(given[name], dtype=np.float32)
    if tensor.is_conv_kernel:
      value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    state_dict[tensor.torch_key] = np.ascontiguousarray(value)
  for batch_norm in _batch_norm_names(tensors):
    state_dict[f'{batch_norm}.{NUM_BATCHES_TRACKED}'] = np.zeros((), np.int64)
  return state_dict

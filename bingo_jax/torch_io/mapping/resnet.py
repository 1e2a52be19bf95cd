"""ResNet backbones: torchvision state-dict names <-> ``bingo_jax.models.resnet`` modules.

torchvision, MoCo (``encoder_q``) and SwAV all name a ResNet the same way once their
prefixes are removed: ``conv1``, ``bn1``, ``layer{1..4}.{block}.{conv,bn}{1,2,3}`` and
``layer{s}.0.downsample.{0,1}``. SwAV's stem is ``ConstantPad2d(1)`` followed by a 7x7
convolution with ``padding=2``: the same as torchvision's ``padding=3`` (zeros either way), so
its weights map onto the same stem.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import numpy as np

from bingo_jax.models import resnet as resnet_lib
from bingo_jax.torch_io.mapping.common import ModuleMapping

_LAYER_KEY = re.compile(r'^layer([1-4])\.(\d+)\.')


def backbone_mappings(model_config: Mapping) -> list[ModuleMapping]:
  """Rows of every layer of the ResNet described by ``model_config`` (Flax paths relative
  to the backbone, torch keys without prefix).

  Args:
    model_config: ``create_model`` keyword arguments; ``arch`` must be a ResNet.
  """
  stage_sizes, block, _ = resnet_lib.RESNET_STAGES[model_config['arch']]
  bottleneck = block is resnet_lib.Bottleneck
  rows = [ModuleMapping(('conv1',), 'conv1', 'conv'), ModuleMapping(('bn1',), 'bn1', 'bn')]
  convs = (1, 2, 3) if bottleneck else (1, 2)
  for stage, num_blocks in enumerate(stage_sizes):
    for index in range(num_blocks):
      flax_block = f'layer{stage + 1}_{index}'
      torch_block = f'layer{stage + 1}.{index}'
      for c in convs:
        rows.append(ModuleMapping((flax_block, f'conv{c}'), f'{torch_block}.conv{c}', 'conv'))
        rows.append(ModuleMapping((flax_block, f'bn{c}'), f'{torch_block}.bn{c}', 'bn'))
      # The first block of every stage projects its shortcut: stride 2 from stage 2 on, and
      # in stage 1 because a bottleneck widens 64 -> 256 (a basic block keeps 64: none).
      if index == 0 and (stage > 0 or bottleneck):
        rows.append(ModuleMapping((flax_block, 'downsample_conv'),
                                  f'{torch_block}.downsample.0', 'conv'))
        rows.append(ModuleMapping((flax_block, 'downsample_bn'),
                                  f'{torch_block}.downsample.1', 'bn'))
  return rows


def looks_like_resnet(state_dict: Mapping[str, object]) -> bool:
  """True when unprefixed keys have the torchvision ResNet stem and first block."""
  return 'conv1.weight' in state_dict and any(k.startswith('layer1.0.') for k in state_dict)


def infer_backbone_config(state_dict: Mapping[str, np.ndarray], source: str) -> dict:
  """Architecture of a torchvision-named ResNet state dict, from its keys and shapes.

  Blocks per stage come from the ``layerN.i`` indices, bottleneck vs basic block from the
  presence of ``conv3``, the width from the stem's output channels (64 torchvision, 128 / 256
  for SwAV's R-50x2 / x4), the stem from the kernel size (7: ImageNet, 3: CIFAR-style).

  Args:
    state_dict: unprefixed backbone keys -> arrays (torch layout).
    source: the checkpoint file, for error messages.
  Returns:
    ``{'arch', 'stem'}`` plus ``base_width`` when it is not the architecture's own.
  Raises:
    ValueError: naming the keys, when the tensors are not a known ResNet.
  """
  if 'conv1.weight' not in state_dict:
    raise ValueError(f'{source}: no ResNet stem tensor conv1.weight among the keys '
                     f'({_some_keys(state_dict)}).')
  blocks = {}
  for key in state_dict:
    match = _LAYER_KEY.match(key)
    if match:
      stage, index = int(match.group(1)), int(match.group(2))
      blocks[stage] = max(blocks.get(stage, 0), index + 1)
  if sorted(blocks) != [1, 2, 3, 4]:
    raise ValueError(f'{source}: a ResNet needs blocks layer1..layer4; found stages '
                     f'{sorted(blocks)} (keys: {_some_keys(state_dict)}).')
  stage_sizes = tuple(blocks[s] for s in (1, 2, 3, 4))
  bottleneck = 'layer1.0.conv3.weight' in state_dict
  block = resnet_lib.Bottleneck if bottleneck else resnet_lib.BasicBlock
  stem_weight = state_dict['conv1.weight']
  if len(stem_weight.shape) != 4:
    raise ValueError(f'{source}: conv1.weight has shape {tuple(stem_weight.shape)}, expected '
                     f'a 4-d convolution kernel (out, 3, k, k).')
  base_width = int(stem_weight.shape[0])
  kernel = int(stem_weight.shape[-1])
  stems = {7: 'imagenet', 3: 'cifar'}
  if kernel not in stems:
    raise ValueError(f'{source}: conv1.weight has a {kernel}x{kernel} kernel; expected 7x7 '
                     f'(ImageNet stem) or 3x3 (CIFAR stem).')
  candidates = [(name, widen) for name, (stages, blk, widen) in resnet_lib.RESNET_STAGES.items()
                if stages == stage_sizes and blk is block]
  if not candidates:
    kind = 'bottleneck' if bottleneck else 'basic'
    raise ValueError(f'{source}: no known ResNet has {stage_sizes} {kind} blocks per stage '
                     f'(known: {", ".join(resnet_lib.RESNET_STAGES)}).')
  exact = [name for name, widen in candidates if 64 * widen == base_width]
  config = {'arch': exact[0] if exact else candidates[0][0], 'stem': stems[kernel]}
  if not exact:
    config['base_width'] = base_width
  return config


def default_base_width(arch: str) -> int:
  return 64 * resnet_lib.RESNET_STAGES[arch][2]


def _some_keys(state_dict: Mapping, limit: int = 8) -> str:
  keys = sorted(state_dict)
  return ', '.join(keys[:limit]) + (', ...' if len(keys) > limit else '')


def is_resnet(arch: Optional[str]) -> bool:
  return arch in resnet_lib.RESNET_STAGES

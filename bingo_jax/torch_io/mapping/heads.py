"""Heads: PyTorch names <-> ``bingo_jax.models.heads`` modules, and head detection.

PyTorch names of each head (prefix ``fc`` for ResNets; see ``head_prefix``):

* ``moco`` (MoCo v2 MLP): ``fc.0`` Linear, ``fc.2`` Linear (``fc.1`` is the ReLU);
* ``linear``: ``fc`` Linear (torchvision classifier; also MoCo v1's 128-d ``fc``);
* ``swav``: ``projection_head.0`` Linear, ``projection_head.1`` BatchNorm1d,
  ``projection_head.3`` Linear (SwAV releases). The released BINGO code stores the same head of
  its SwAV teacher as ``fc.0`` / ``fc.1`` / ``fc.3``; that naming is read too.

EfficientNet-B0 in ``efficientnet_pytorch`` names its classifier ``_fc``; the released BINGO
code renamed it ``fc``. Both are read; the ``efficientnet`` export layout writes ``_fc``
(linear) and ``_fc.0`` / ``_fc.2`` (MoCo MLP), the ``moco`` layout writes ``fc``.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from bingo_jax.torch_io.mapping.common import ModuleMapping

HEADS = ('moco', 'swav', 'linear')


def head_mappings(head: str, torch_prefix: str = 'fc',
                  swav_prefix: str = 'projection_head') -> list[ModuleMapping]:
  """Rows of a head (Flax paths relative to the head module).

  Args:
    head: 'moco', 'swav' or 'linear'.
    torch_prefix: the torch name of the MoCo / linear head (``fc`` or ``_fc``).
    swav_prefix: the torch name of the SwAV head (``projection_head``, or ``fc`` in BINGO
      training checkpoints).
  """
  if head == 'moco':
    return [ModuleMapping(('fc0',), f'{torch_prefix}.0', 'dense'),
            ModuleMapping(('fc2',), f'{torch_prefix}.2', 'dense')]
  if head == 'linear':
    return [ModuleMapping(('fc',), torch_prefix, 'dense')]
  if head == 'swav':
    return [ModuleMapping(('dense0',), f'{swav_prefix}.0', 'dense'),
            ModuleMapping(('bn1',), f'{swav_prefix}.1', 'bn'),
            ModuleMapping(('dense3',), f'{swav_prefix}.3', 'dense')]
  raise ValueError(f'Unknown head {head!r}; expected one of {HEADS}.')


def detect_head(state_dict: Mapping[str, np.ndarray], prefixes: tuple[str, ...],
                source: str) -> Optional[tuple[str, dict, list[ModuleMapping]]]:
  """Finds the head in an unprefixed state dict.

  Args:
    state_dict: unprefixed keys -> arrays (torch layout).
    prefixes: torch names the head may have (``('fc',)`` for ResNets).
    source: the checkpoint file, for error messages.
  Returns:
    ``None`` when there is no head, else ``(head, model_config_entries, mappings)`` where the
    entries are ``head_hidden_dim``/``head_output_dim`` or ``num_classes``.
  Raises:
    ValueError: a head whose tensors are incomplete or do not fit together.
  """
  def shape(key):
    return tuple(state_dict[key].shape)

  for fc in prefixes:
    if f'{fc}.0.weight' in state_dict and f'{fc}.1.running_mean' in state_dict:
      return _swav(state_dict, fc, source)
    if f'{fc}.0.weight' in state_dict:
      _require(state_dict, [f'{fc}.0.weight', f'{fc}.0.bias', f'{fc}.2.weight', f'{fc}.2.bias'],
               source, 'MoCo v2 MLP head')
      hidden, output = shape(f'{fc}.0.weight')[0], shape(f'{fc}.2.weight')[0]
      if shape(f'{fc}.2.weight')[1] != hidden:
        raise ValueError(f'{source}: {fc}.2.weight has shape {shape(f"{fc}.2.weight")}, but '
                         f'{fc}.0.weight has {hidden} outputs.')
      return ('moco', {'head_hidden_dim': hidden, 'head_output_dim': output},
              head_mappings('moco', fc))
    if f'{fc}.weight' in state_dict:
      _require(state_dict, [f'{fc}.weight', f'{fc}.bias'], source, 'linear head')
      return 'linear', {'num_classes': shape(f'{fc}.weight')[0]}, head_mappings('linear', fc)
  if any(k.startswith('projection_head.') for k in state_dict):
    if 'projection_head.weight' in state_dict:
      raise ValueError(
          f'{source}: projection_head.weight is a single linear SwAV projection (hidden_mlp=0), '
          f'which bingo_jax has no head for; pass --head none to convert the backbone only.')
    return _swav(state_dict, 'projection_head', source)
  return None


def _swav(state_dict, prefix, source):
  keys = [f'{prefix}.0.weight', f'{prefix}.0.bias', f'{prefix}.1.weight', f'{prefix}.1.bias',
          f'{prefix}.1.running_mean', f'{prefix}.1.running_var', f'{prefix}.3.weight',
          f'{prefix}.3.bias']
  _require(state_dict, keys, source, 'SwAV projection head')
  hidden = tuple(state_dict[f'{prefix}.0.weight'].shape)[0]
  output = tuple(state_dict[f'{prefix}.3.weight'].shape)[0]
  return ('swav', {'head_hidden_dim': hidden, 'head_output_dim': output},
          head_mappings('swav', swav_prefix=prefix))


def _require(state_dict, keys, source, what):
  missing = [k for k in keys if k not in state_dict]
  if missing:
    raise ValueError(f'{source}: the {what} is incomplete; missing tensors: '
                     f'{", ".join(missing)}.')

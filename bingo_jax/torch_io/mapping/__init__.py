"""PyTorch state dicts <-> bingo_jax Flax variables, for every network of the registry.

Names on the PyTorch side are those of the torch modules with every wrapper prefix removed
(``module.``, ``encoder_q.``): torchvision names for ResNets, ``efficientnet_pytorch`` names
for EfficientNet-B0, and per head the names listed in ``bingo_jax.torch_io.mapping.heads``.
Checkpoint files, their layouts and their wrappers are handled by
``bingo_jax.torch_io.checkpoints``.

Public API:

* ``infer_model_config(state_dict, source, arch=None, head=None)``: architecture and head
  from the tensor names and shapes -> ``(model_config, HeadSpec)``;
* ``torch_to_flax(state_dict, model_config, source=..., head_prefix=None)``: exact, strict
  conversion (every tensor used, every variable filled, every shape checked);
* ``flax_to_torch(variables, model_config, head_prefix=None, num_batches_tracked=None)``:
  the inverse, a flat ``{torch_key: np.ndarray}``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from bingo_jax.models import create_model
from bingo_jax.models import efficientnet as efficientnet_lib
from bingo_jax.torch_io.mapping import heads as heads_lib
from bingo_jax.torch_io.mapping import resnet as resnet_mapping
from bingo_jax.torch_io.mapping.common import (NUM_BATCHES_TRACKED, ModuleMapping, describe_keys,
                                               flatten, flax_to_torch_leaf, get_path, leaves,
                                               prefixed, set_path, torch_shape, torch_to_flax_leaf)

EFFICIENTNET_ARCHS = ('efficientnet_b0',)
# Keys of the model config that change parameter shapes (the rest are runtime options).
_SHAPE_KEYS = ('arch', 'head', 'head_hidden_dim', 'head_output_dim', 'num_classes',
               'base_width', 'stem')


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """The head found in a state dict.

  Attributes:
    head: 'moco', 'swav', 'linear' or None.
    torch_prefix: its torch name (``fc``, ``_fc``, ``projection_head``), or None.
    dropped_keys: head tensors present in the state dict but deliberately not converted
      (``head='none'`` was asked for).
  """
  head: Optional[str]
  torch_prefix: Optional[str]
  dropped_keys: tuple[str, ...] = ()


def _efficientnet_mapping():
  # Written by another module owner and imported on demand: ResNet conversion must not
  # depend on it.
  from bingo_jax.torch_io.mapping import efficientnet
  return efficientnet


def is_efficientnet(arch: str) -> bool:
  return arch in EFFICIENTNET_ARCHS


def default_head_prefix(arch: str, head: Optional[str]) -> Optional[str]:
  """Torch name of a head when none was detected: ``fc`` (ResNet), ``_fc`` (EfficientNet),
  ``projection_head`` (SwAV head)."""
  if head is None:
    return None
  if head == 'swav':
    return 'projection_head'
  return '_fc' if is_efficientnet(arch) else 'fc'


def infer_model_config(state_dict: Mapping[str, np.ndarray], source: str,
                       arch: Optional[str] = None,
                       head: Optional[str] = None) -> tuple[dict, HeadSpec]:
  """Architecture and head of an unprefixed state dict.

  Args:
    state_dict: torch-named tensors (numpy or torch), wrapper prefixes already removed.
    source: the checkpoint file, for error messages.
    arch: architecture to use instead of inferring it (``create_model`` name).
    head: None to detect; ``'none'`` to drop any head; 'moco' / 'swav' / 'linear' to insist
      on that head (an error if the tensors hold another or none).
  Returns:
    ``(model_config, head_spec)``; ``model_config`` holds the ``create_model`` arguments that
    fix the parameter shapes.
  Raises:
    ValueError: naming the file and keys, for an unknown layout or an inconsistent head.
  """
  if arch is not None:
    efficientnet = is_efficientnet(arch)
  elif resnet_mapping.looks_like_resnet(state_dict):
    efficientnet = False
  else:
    try:
      efficientnet = bool(_efficientnet_mapping().looks_like_efficientnet(state_dict))
    except ImportError:  # EfficientNet mapping not installed: report the ResNet view
      efficientnet = False
  if efficientnet:
    config = {'arch': arch or EFFICIENTNET_ARCHS[0]}
    # A narrow network (exported from a small bingo_jax model) says so by its stem width.
    stem = state_dict.get('_conv_stem.weight')
    if stem is not None and int(stem.shape[0]) != efficientnet_lib.STEM_WIDTH:
      config['base_width'] = int(stem.shape[0])
    head_prefixes = ('_fc', 'fc')
  else:
    inferred = resnet_mapping.infer_backbone_config(state_dict, source)
    if arch is not None:
      if not resnet_mapping.is_resnet(arch):
        raise ValueError(f'{source}: unknown --arch {arch!r}.')
      config = {'arch': arch, 'stem': inferred['stem']}
      # The width is a fact of the tensors, whichever architecture name was asked for.
      width = int(state_dict['conv1.weight'].shape[0])
      if width != resnet_mapping.default_base_width(arch):
        config['base_width'] = width
    else:
      config = inferred
    head_prefixes = ('fc',)

  detected = heads_lib.detect_head(state_dict, head_prefixes, source)
  if head == 'none':
    if detected is None:
      return config, HeadSpec(None, None)
    dropped = tuple(sorted(k for row in detected[2]
                           for k in _torch_keys_of(row) if k in state_dict))
    return config, HeadSpec(None, None, dropped)
  if detected is None:
    if head is not None:
      raise ValueError(f'{source}: --head {head} was asked for, but the checkpoint has no head '
                       f'tensors (e.g. {_example_head_key(config["arch"], head)}).')
    return config, HeadSpec(None, None)
  detected_head, entries, rows = detected
  if head is not None and head != detected_head:
    raise ValueError(f'{source}: --head {head} was asked for, but the head tensors '
                     f'({describe_keys(_torch_keys_of(rows[0]))}) are a {detected_head} head.')
  config.update({'head': detected_head, **entries})
  prefix = rows[0].torch_prefix.rsplit('.', 1)[0] if detected_head != 'linear' else \
      rows[0].torch_prefix
  return config, HeadSpec(detected_head, prefix)


def _example_head_key(arch, head):
  prefix = default_head_prefix(arch, head)
  return f'{prefix}.weight' if head == 'linear' else f'{prefix}.0.weight'


def _torch_keys_of(row: ModuleMapping) -> list[str]:
  keys = [leaf.torch_key for leaf in leaves([row])]
  if row.kind == 'bn':
    keys.append(f'{row.torch_prefix}.{NUM_BATCHES_TRACKED}')
  return keys


def mappings(model_config: Mapping, head_prefix: Optional[str] = None) -> list[ModuleMapping]:
  """Rows of a whole ResNet model (Flax paths from the collection root: ``backbone/...``,
  ``head/...``). EfficientNet backbones are mapped by their own module instead."""
  rows = []
  if not is_efficientnet(model_config['arch']):
    rows += prefixed(resnet_mapping.backbone_mappings(model_config), '', ('backbone',))
  rows += _head_rows(model_config, head_prefix)
  return rows


def _head_rows(model_config, head_prefix):
  head = model_config.get('head')
  if head in (None, 'none'):
    return []
  prefix = head_prefix or default_head_prefix(model_config['arch'], head)
  if head == 'swav':
    rows = heads_lib.head_mappings('swav', swav_prefix=prefix)
  else:
    rows = heads_lib.head_mappings(head, torch_prefix=prefix)
  return prefixed(rows, '', ('head',))


@functools.lru_cache(maxsize=16)
def _expected_shapes_cached(config_items: tuple) -> dict:
  model = create_model(**dict(config_items))
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32), train=False))
  return {(collection,) + path: tuple(leaf.shape)
          for collection, tree in dict(shapes).items()
          for path, leaf in flatten(tree).items()}


def expected_shapes(model_config: Mapping) -> dict[tuple[str, ...], tuple[int, ...]]:
  """``{(collection, 'backbone'|'head', ..., leaf): shape}`` of ``create_model(**config)``."""
  items = tuple(sorted((k, v) for k, v in model_config.items() if k in _SHAPE_KEYS))
  return _expected_shapes_cached(items)


def torch_to_flax(state_dict: Mapping[str, np.ndarray], model_config: Mapping, *,
                  source: str = 'state dict', head_prefix: Optional[str] = None) -> dict:
  """Converts an unprefixed torch state dict to the variables of ``create_model(**config)``.

  Strict: a missing tensor, a tensor of the wrong shape, or a tensor that belongs to no layer
  of the model raises one ``ValueError`` naming all such keys. ``num_batches_tracked`` buffers
  are accepted and not converted (``num_batches_tracked_of`` reads them).

  Args:
    state_dict: torch key -> array (torch layout). Keys to ignore (prototypes, a dropped head)
      must already be removed.
    model_config: ``create_model`` arguments.
    source: the checkpoint file, for error messages.
    head_prefix: torch name of the head if not the default (``fc`` / ``_fc`` /
      ``projection_head``).
  Returns:
    ``{'params': {'backbone', 'head'?}, 'batch_stats': {...}}`` of float32 numpy arrays.
  """
  expected = expected_shapes(model_config)
  state = {k: v for k, v in state_dict.items() if not k.endswith('.' + NUM_BATCHES_TRACKED)}
  variables: dict = {}
  used: set[str] = set()
  missing, wrong = [], []
  for leaf in leaves(mappings(model_config, head_prefix)):
    flax_key = (leaf.collection,) + leaf.flax_path
    if flax_key not in expected:
      raise AssertionError(f'mapping names {flax_key}, which the model does not have')
    want = torch_shape(expected[flax_key], leaf.flax_path[-1])
    if leaf.torch_key not in state:
      missing.append(leaf.torch_key)
      continue
    used.add(leaf.torch_key)
    array = _as_numpy(state[leaf.torch_key])
    if tuple(array.shape) != want:
      wrong.append(f'{leaf.torch_key}: checkpoint {tuple(array.shape)}, model expects {want}')
      continue
    set_path(variables, flax_key, torch_to_flax_leaf(array, leaf.flax_path[-1]))

  if is_efficientnet(model_config['arch']):
    head_keys = {leaf.torch_key for leaf in leaves(_head_rows(model_config, head_prefix))}
    backbone_state = {k: v for k, v in state.items() if k not in head_keys}
    try:
      # The head's tensors are already taken out: any other head-named tensor is unexpected.
      backbone = _efficientnet_mapping().torch_to_flax(backbone_state, dict(model_config),
                                                       head_prefixes=())
    except (KeyError, ValueError) as e:
      raise ValueError(f'{source}: {e}') from e
    used |= set(backbone_state)
    for collection, tree in backbone.items():
      variables.setdefault(collection, {})['backbone'] = tree.get('backbone', tree)

  unexpected = sorted(set(state) - used)
  if missing or wrong or unexpected:
    lines = [f'{source}: the tensors do not fit {_describe_config(model_config)}.']
    if missing:
      lines.append(f'  missing tensors: {describe_keys(missing)}')
    if wrong:
      lines.append('  shape mismatch: ' + '; '.join(wrong[:12]))
    if unexpected:
      lines.append(f'  tensors that belong to no layer: {describe_keys(unexpected)}')
    raise ValueError('\n'.join(lines))

  got = {(c,) + p for c, tree in variables.items() for p in flatten(tree)}
  if got != set(expected):
    raise AssertionError(f'conversion left variables unfilled: {sorted(set(expected) - got)[:5]}')
  return variables


def flax_to_torch(variables: Mapping, model_config: Mapping, *,
                  head_prefix: Optional[str] = None,
                  num_batches_tracked: Union[None, int, Mapping[str, int]] = None
                  ) -> 'collections.OrderedDict[str, np.ndarray]':
  """Flax variables -> unprefixed torch state dict (what ``module.state_dict()`` holds).

  Args:
    variables: ``{'params', 'batch_stats'}`` of ``create_model(**model_config)``.
    model_config: ``create_model`` arguments.
    head_prefix: torch name of the head (default: ``fc`` for ResNets, ``_fc`` for
      EfficientNet, ``projection_head`` for the SwAV head).
    num_batches_tracked: the BatchNorm counters to write back (a converted checkpoint keeps
      its own, see ``num_batches_tracked_of``): one int for all, or a dict; default 0.
  Returns:
    Ordered ``{torch_key: np.ndarray}``: float32 tensors in torch layout, int64 scalars for
    ``num_batches_tracked``.
  """
  out: 'collections.OrderedDict[str, np.ndarray]' = collections.OrderedDict()
  if is_efficientnet(model_config['arch']):
    backbone_vars = {c: {'backbone': tree['backbone']} for c, tree in variables.items()
                     if 'backbone' in tree}
    for key, value in _efficientnet_mapping().flax_to_torch(backbone_vars,
                                                             dict(model_config)).items():
      out[key] = np.asarray(value)
  for row in mappings(model_config, head_prefix):
    for leaf in leaves([row]):
      value = get_path(variables, (leaf.collection,) + leaf.flax_path)
      if value is None:
        raise ValueError(f'variables lack {leaf.collection}/{"/".join(leaf.flax_path)} '
                         f'(torch {leaf.torch_key}) of {_describe_config(model_config)}.')
      out[leaf.torch_key] = flax_to_torch_leaf(np.asarray(value, np.float32), leaf.flax_path[-1])
  # Every BatchNorm owns a num_batches_tracked buffer in PyTorch; strict loading wants it.
  if isinstance(num_batches_tracked, int):
    default_count, counts = num_batches_tracked, {}
  else:
    default_count, counts = 0, dict(num_batches_tracked or {})
  for row in _head_rows(model_config, head_prefix):
    if row.kind == 'bn' and '/'.join(row.flax_path) in counts:
      counts[f'{row.torch_prefix}.{NUM_BATCHES_TRACKED}'] = counts['/'.join(row.flax_path)]
  for key in list(out):
    if key.endswith('.running_var'):
      count_key = key[:-len('running_var')] + NUM_BATCHES_TRACKED
      out[count_key] = np.asarray(counts.get(count_key, default_count), np.int64)
  return _torch_order(out)


def _torch_order(state: Mapping[str, np.ndarray]):
  """Orders keys as ``module.state_dict()`` would: per layer weight, bias, running stats."""
  rank = {'weight': 0, 'bias': 1, 'running_mean': 2, 'running_var': 3, NUM_BATCHES_TRACKED: 4}
  layer_order: dict[str, int] = {}
  for key in state:
    layer_order.setdefault(key.rsplit('.', 1)[0], len(layer_order))

  def sort_key(key):
    layer, leaf = key.rsplit('.', 1)
    return layer_order[layer], rank.get(leaf, 5)
  return collections.OrderedDict((k, state[k]) for k in sorted(state, key=sort_key))


def num_batches_tracked_of(state_dict: Mapping[str, np.ndarray], model_config: Mapping,
                           head_prefix: Optional[str] = None) -> Union[int, dict[str, int]]:
  """The ``num_batches_tracked`` counters of a torch state dict, kept for the way back.

  Returns one int when every BatchNorm has the same count (the usual case), else a dict.

  Backbone counters are keyed by their torch name (the same in every layout); the head's by
  ``head/<flax module>``, because layouts name the head differently.
  """
  head_names = {f'{row.torch_prefix}.{NUM_BATCHES_TRACKED}': '/'.join(row.flax_path)
                for row in _head_rows(model_config, head_prefix) if row.kind == 'bn'}
  counts = {head_names.get(k, k): int(np.asarray(v)) for k, v in state_dict.items()
            if k.endswith('.' + NUM_BATCHES_TRACKED)}
  if counts and len(set(counts.values())) == 1:
    return next(iter(counts.values()))  # the usual case: one number for every layer
  return counts


def _as_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor
    value = value.detach()
    if value.dtype.is_floating_point and value.dtype != _torch_float32():
      value = value.float()
    return value.cpu().numpy()
  array = np.asarray(value)
  if np.issubdtype(array.dtype, np.floating) and array.dtype != np.float32:
    array = array.astype(np.float32)
  return array


def _torch_float32():
  import torch  # only reached when the caller already holds torch tensors
  return torch.float32


def _describe_config(model_config: Mapping) -> str:
  parts = [model_config['arch']]
  if model_config.get('base_width'):
    parts.append(f'base_width={model_config["base_width"]}')
  if model_config.get('stem', 'imagenet') != 'imagenet':
    parts.append(f'stem={model_config["stem"]}')
  head = model_config.get('head')
  parts.append(f'head={head}' if head else 'no head')
  return ' '.join(parts)

"""Leaf-level PyTorch <-> Flax conversions shared by the ResNet and head mappings.

A mapping is a list of ``ModuleMapping`` rows: one Flax module (a path in the variable tree)
and the PyTorch state-dict prefix of the same layer, with the layer kind. The kind decides
which leaves exist and how they are laid out:

* ``conv``: Flax ``kernel`` (H, W, in, out) <-> torch ``weight`` (out, in, H, W);
* ``dense``: Flax ``kernel`` (in, out) <-> torch ``weight`` (out, in), ``bias`` as is;
* ``bn``: Flax ``params/scale``, ``params/bias``, ``batch_stats/mean``, ``batch_stats/var``
  <-> torch ``weight``, ``bias``, ``running_mean``, ``running_var``. PyTorch's
  ``num_batches_tracked`` has no Flax counterpart (it only matters for ``momentum=None``);
  it is carried next to the variables (see ``bingo_jax.torch_io.checkpoints``).

Every conversion is a transpose or a copy, so torch -> Flax -> torch is bit-exact.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Optional

import numpy as np

NUM_BATCHES_TRACKED = 'num_batches_tracked'


@dataclasses.dataclass(frozen=True)
class ModuleMapping:
  """One layer: its Flax module path (inside a collection) and its torch key prefix."""
  flax_path: tuple[str, ...]
  torch_prefix: str
  kind: str  # 'conv' | 'conv_bias' | 'dense' | 'bn'


# (collection, flax leaf name, torch leaf name) of each layer kind.
_LEAVES = {
    'conv': (('params', 'kernel', 'weight'),),
    'conv_bias': (('params', 'kernel', 'weight'), ('params', 'bias', 'bias')),
    'dense': (('params', 'kernel', 'weight'), ('params', 'bias', 'bias')),
    'bn': (('params', 'scale', 'weight'), ('params', 'bias', 'bias'),
           ('batch_stats', 'mean', 'running_mean'), ('batch_stats', 'var', 'running_var')),
}


def _swap_first_and_last(array: np.ndarray, block: int = 64) -> np.ndarray:
  """``array (A, B, C) -> (C, B, A)``, copied in cache-sized tiles.

  A plain ``np.ascontiguousarray(array.transpose(2, 1, 0))`` of a large kernel misses the
  cache on nearly every element (4x slower on a 8192 x 8192 matrix); ResNet-50x4 holds 375M
  such numbers.
  """
  a, b, c = array.shape
  out = np.empty((c, b, a), np.float32)
  for i in range(0, a, block):
    for j in range(0, b, block):
      out[:, j:j + block, i:i + block] = array[i:i + block, j:j + block].transpose(2, 1, 0)
  return out


def torch_to_flax_leaf(array: np.ndarray, flax_leaf: str) -> np.ndarray:
  """A torch tensor (as numpy) in Flax layout: conv OIHW -> HWIO, linear (out, in) -> (in, out).

  Always returns a new float32 array (never a view of a memory-mapped checkpoint).
  """
  array = np.asarray(array)
  if flax_leaf == 'kernel' and array.ndim == 4:
    out_c, in_c, height, width = array.shape
    swapped = _swap_first_and_last(array.reshape(out_c, in_c, height * width))
    return swapped.reshape(height, width, in_c, out_c)
  if flax_leaf == 'kernel' and array.ndim == 2:
    return _swap_first_and_last(array[:, :, None])[0]
  return np.array(array, np.float32, copy=True)


def flax_to_torch_leaf(array: np.ndarray, flax_leaf: str) -> np.ndarray:
  """Inverse of ``torch_to_flax_leaf``: HWIO -> OIHW, (in, out) -> (out, in). A new array."""
  array = np.asarray(array)
  if flax_leaf == 'kernel' and array.ndim == 4:
    height, width, in_c, out_c = array.shape
    swapped = _swap_first_and_last(array.reshape(height * width, in_c, out_c))
    return swapped.reshape(out_c, in_c, height, width)
  if flax_leaf == 'kernel' and array.ndim == 2:
    return _swap_first_and_last(array[None])[:, :, 0]
  return np.array(array, np.float32, copy=True)


def torch_shape(flax_shape: tuple[int, ...], flax_leaf: str) -> tuple[int, ...]:
  """The torch shape of a Flax leaf of ``flax_shape``."""
  flax_shape = tuple(flax_shape)
  if flax_leaf == 'kernel' and len(flax_shape) == 4:
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  if flax_leaf == 'kernel' and len(flax_shape) == 2:
    return (flax_shape[1], flax_shape[0])
  return flax_shape


@dataclasses.dataclass(frozen=True)
class LeafMapping:
  """One tensor: where it lives on both sides."""
  collection: str
  flax_path: tuple[str, ...]  # module path + leaf name
  torch_key: str


def leaves(mappings: Iterable[ModuleMapping]) -> list[LeafMapping]:
  """Expands module rows into one row per tensor (``num_batches_tracked`` excluded)."""
  rows = []
  for mapping in mappings:
    for collection, flax_leaf, torch_leaf in _LEAVES[mapping.kind]:
      rows.append(LeafMapping(collection, mapping.flax_path + (flax_leaf,),
                              f'{mapping.torch_prefix}.{torch_leaf}'))
  return rows


def get_path(tree: Mapping, path: tuple[str, ...]):
  """``tree[path[0]][path[1]]...`` or None when a level is missing."""
  node = tree
  for name in path:
    if not isinstance(node, Mapping) or name not in node:
      return None
    node = node[name]
  return node


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  node = tree
  for name in path[:-1]:
    node = node.setdefault(name, {})
  node[path[-1]] = value


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
  """``{('a', 'b'): leaf}`` for a nested mapping."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def describe_keys(keys: Iterable[str], limit: int = 12) -> str:
  """A short, sorted, comma-separated list of keys for error messages."""
  keys = sorted(keys)
  text = ', '.join(keys[:limit])
  if len(keys) > limit:
    text += f', ... ({len(keys) - limit} more)'
  return text


def prefixed(mappings: Iterable[ModuleMapping], torch_prefix: str,
             flax_prefix: Optional[tuple[str, ...]] = None) -> list[ModuleMapping]:
  """Rows with a torch prefix (and optionally a Flax path prefix) prepended."""
  out = []
  for m in mappings:
    out.append(ModuleMapping(
        (flax_prefix or ()) + m.flax_path,
        f'{torch_prefix}{m.torch_prefix}', m.kind))
  return out

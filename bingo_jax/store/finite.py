"""Finiteness checks: which arrays of a tree hold NaN or Inf (docs/reliability.md).

Checkpoints, model files and converted PyTorch tensors are checked before they are written
and when they are read, so a diverged run or a damaged file never silently becomes a teacher
or a student.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
  """``(keystr path, leaf)`` for every leaf of ``tree``."""
  return [(jax.tree_util.keystr(path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def host_array(x: Any) -> Optional[np.ndarray]:
  """A leaf as one host numpy array, or None for an array sharded over several processes."""
  if isinstance(x, jax.Array):
    if x.is_fully_replicated or len(x.sharding.device_set) == 1:
      return np.asarray(x.addressable_data(0))
    if x.is_fully_addressable:
      return np.asarray(x)
    return None
  return np.asarray(x)


def is_finite(x: Any) -> bool:
  """False when a floating-point array holds a NaN or Inf (other dtypes are always finite)."""
  array = host_array(x)
  if array is None:
    return not jnp.issubdtype(x.dtype, jnp.inexact) or bool(jnp.isfinite(x).all())
  return not np.issubdtype(array.dtype, np.inexact) or bool(np.isfinite(array).all())


def non_finite_paths(tree: Any) -> list[str]:
  """Paths (``jax.tree_util.keystr``) of the leaves of ``tree`` holding NaN or Inf."""
  return [name for name, leaf in named_leaves(tree) if not is_finite(leaf)]


def describe(bad: list[str], total: int) -> str:
  """``'3 of 170 arrays hold NaN or Inf (a, b, c)'``, at most 5 names."""
  shown = ', '.join(bad[:5]) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
  return f'{len(bad)} of {total} arrays hold NaN or Inf ({shown})'

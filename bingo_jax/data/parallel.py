"""Device mesh and shardings: one data-parallel axis over every device of every host.

Everything that runs on batches (training step, teacher feature pass, evaluation) uses the
same recipe, as big_vision does: ``jax.jit`` over a ``Mesh``, the batch sharded along
``'data'``, everything else replicated. Each process feeds its own slice of the global batch.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh named ``'data'`` over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batch_size(global_batch_size: int, mesh: Optional[Mesh] = None) -> int:
  """This process's share of a global batch; checks that it divides over devices and hosts."""
  devices = mesh.devices.size if mesh is not None else jax.device_count()
  if global_batch_size % devices:
    raise ValueError(f'Global batch size {global_batch_size} is not divisible by the number '
                     f'of devices ({devices}).')
  return global_batch_size // jax.process_count()


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles global arrays sharded along 'data' from each process's numpy batch slice."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts host values on every device of the mesh (identical on all processes)."""
  return jax.device_put(tree, replicated(mesh))


COMPUTE_DTYPES = ('float32', 'bfloat16', 'auto')  # as config_checks.COMPUTE_DTYPES


def resolve_compute_dtype(name: str) -> str:
  """``config.train.compute_dtype``: ``'auto'`` is bfloat16 on GPU and TPU, float32 on CPU.

  CPUs have no fast bfloat16 convolutions (XLA:CPU emulates them, slower than float32).
  """
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'config.train.compute_dtype = {name!r}; expected one of {COMPUTE_DTYPES}.')
  if name != 'auto':
    return name
  return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'

"""One process of the two-process train-step test (launched by tests/test_multihost.py).

``python tests/multihost_train_worker.py --process_id I --num_processes N --port P --out F``
joins a ``jax.distributed`` CPU cluster, feeds this process's slice of a fixed global batch
through ``parallel.global_batch``, runs ``NUM_STEPS`` train steps and writes the resulting
student parameters, batch statistics and queue to ``F`` (npz). Imported without running
``main`` it provides the same set-up for the single-process reference.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

import numpy as np

from bingo_jax.testing import cpu_xla_flags

NUM_STEPS = 3
GLOBAL_BATCH = 16
IMAGE_SIZE = 8


def small_setup():
  """Config, tiny student and teacher (BatchNorm in groups of 4), the global batch."""
  import flax.linen as nn
  import jax.numpy as jnp

  from bingo_jax.models import heads, layers, registry
  from bingo_jax.configs.common import base_config

  class TinyBackbone(nn.Module):
    """Two conv-BN-ReLU layers and a mean pool: a ResNet's structure in miniature."""
    bn_group_size: Optional[int] = None

    @nn.compact
    def __call__(self, images, train=False):
      x = images
      for index, (channels, stride) in enumerate(((8, 1), (8, 2))):
        x = layers.conv(channels, 3, stride, name=f'conv{index}')(x)
        x = layers.BatchNorm(use_running_average=not train, group_size=self.bn_group_size,
                             name=f'bn{index}')(x)
        x = nn.relu(x)
      return jnp.mean(x, axis=(1, 2))

  def tiny_model(group_size: int) -> registry.Model:
    return registry.Model(backbone=TinyBackbone(group_size, name='backbone'),
                          head=heads.MoCoHead(hidden_dim=16, output_dim=8, name='head'))

  config = base_config()
  config.student.update(head_hidden_dim=16, head_output_dim=8, bn_group_size=4)
  config.teacher.bn_group_size = 4
  config.train.update(batch_size=GLOBAL_BATCH, queue_size=4 * GLOBAL_BATCH, epochs=3,
                      own_key_warmup_epochs=1, base_lr=0.5, weight_decay=1e-3)
  rng = np.random.RandomState(0)
  batch = {name: rng.randint(0, 256, (GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
           for name in ('query', 'key', 'pos_q', 'pos_k')}
  return config, tiny_model(4), tiny_model(4), batch


def perturbed_key_encoder(host_state, mesh):
  """``host_state`` (a MoCo train state on the host) with its key encoder's parameters and
  BatchNorm statistics scaled and shifted by seeded noise, replicated on ``mesh``: a key
  encoder that differs from the student, so that its passes and its momentum update are
  visible in a step's output."""
  import jax

  from bingo_jax.data import parallel

  noise = np.random.RandomState(1)

  def perturb(x):
    return (x * (1 + 0.3 * noise.normal(size=x.shape)) + 0.1).astype(np.float32)

  key_params = jax.tree.map(perturb, host_state.key_params)
  key_stats = jax.tree.map(lambda x: np.abs(perturb(x)), host_state.key_batch_stats)
  return parallel.replicate(host_state.replace(key_params=key_params, key_batch_stats=key_stats),
                            mesh)


def run(mesh, local_batch: dict) -> dict:
  """``NUM_STEPS`` steps from a fixed initial state; returns host numpy leaves by name."""
  import jax

  from bingo_jax.data import parallel
  from bingo_jax.method import steps
  from bingo_jax.method import train_step as train_step_lib
  from bingo_jax.models.registry import init_variables

  config, student, teacher, _ = small_setup()
  teacher_variables = parallel.replicate(
      init_variables(teacher, jax.random.key(1), IMAGE_SIZE), mesh)
  state = train_step_lib.create_train_state(config, student, jax.random.key(0), mesh)
  step = steps.make_train_step(config, student, teacher, mesh, steps_per_epoch=1)
  for _ in range(NUM_STEPS):
    state, _ = step(state, teacher_variables, parallel.global_batch(local_batch, mesh))
  leaves, _ = jax.tree_util.tree_flatten_with_path(
      {'params': state.params, 'batch_stats': state.batch_stats,
       'negative_queue': state.negative_queue, 'queue_pointer': state.queue_pointer})
  # Replicated arrays: every process holds the whole value on each of its devices.
  return {jax.tree_util.keystr(path, simple=True, separator='/'):
          np.asarray(leaf.addressable_data(0)) for path, leaf in leaves}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--process_id', type=int, required=True)
  parser.add_argument('--num_processes', type=int, required=True)
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--devices_per_process', type=int, default=2)
  parser.add_argument('--out', required=True)
  args = parser.parse_args()
  os.environ['XLA_FLAGS'] = cpu_xla_flags(args.devices_per_process)
  os.environ['JAX_PLATFORMS'] = 'cpu'

  import jax
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'localhost:{args.port}',
                             num_processes=args.num_processes, process_id=args.process_id,
                             initialization_timeout=120)
  from bingo_jax.data import parallel

  mesh = parallel.make_mesh()
  _, _, _, batch = small_setup()
  per_process = GLOBAL_BATCH // args.num_processes
  rows = slice(args.process_id * per_process, (args.process_id + 1) * per_process)
  results = run(mesh, {name: images[rows] for name, images in batch.items()})
  temporary = args.out + '.tmp.npz'
  np.savez(temporary, **results)
  os.replace(temporary, args.out)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()

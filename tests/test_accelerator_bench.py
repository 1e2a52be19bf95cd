"""bf16 compute: a bfloat16 step's loss against the float32 step's on the same batch and
parameters. (bench/accelerator.py --smoke, in a process where TensorFlow, faiss and torchvision
cannot be imported, runs in tests/test_device_check.py as part of the device check's smoke.)"""

import jax
import jax.numpy as jnp
import numpy as np

from bingo_jax.configs import tiny_test
from bingo_jax.data import parallel
from bingo_jax.method import steps
from bingo_jax.method import train_step as train_step_lib
from bingo_jax.models import create_model, init_variables


def _step_loss(dtype: str, state_params, batch, teacher_variables):
  config = tiny_test.get_config()
  config.train.compute_dtype = dtype
  mesh = parallel.make_mesh(jax.devices()[:1])
  kwargs = dict(head_hidden_dim=32, head_output_dim=16, base_width=8, stem='cifar',
                bn_group_size=4, dtype=dtype)
  student = create_model('resnet18', 'moco', **kwargs)
  teacher = create_model('resnet18', 'moco', **kwargs)
  state = train_step_lib.create_train_state(config, student, jax.random.key(0), mesh, 10)
  state = state.replace(params=state_params) if state_params is not None else state
  step = steps.make_train_step(config, student, teacher, mesh, 10)
  new_state, metrics = step(state, parallel.replicate(teacher_variables, mesh),
                            parallel.global_batch(batch, mesh))
  return new_state, float(metrics['loss'])


def test_bf16_step_loss_is_within_one_percent_of_the_fp32_step():
  rng = np.random.default_rng(0)
  batch = {view: rng.integers(0, 256, (16, 32, 32, 3), np.uint8)
           for view in ('query', 'key', 'pos_q', 'pos_k')}
  teacher = create_model('resnet18', 'moco', head_hidden_dim=32, head_output_dim=16,
                         base_width=8, stem='cifar')
  teacher_variables = jax.device_get(init_variables(teacher, jax.random.key(5), 32))
  fp32_state, fp32_loss = _step_loss('float32', None, batch, teacher_variables)
  bf16_state, bf16_loss = _step_loss('bfloat16', None, batch, teacher_variables)
  assert abs(bf16_loss - fp32_loss) <= 1e-2 * abs(fp32_loss), (bf16_loss, fp32_loss)
  # Parameters, BatchNorm statistics and the queue stay float32 under bfloat16 compute.
  for tree in (bf16_state.params, bf16_state.batch_stats, bf16_state.negative_queue):
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(tree))


def test_imagenet_configs_compute_in_bf16_on_accelerators_fp32_on_cpu():
  import importlib
  for name in ('r18_r50', 'r18_r50w2', 'r34_r50w2', 'r34_r152', 'effb0_r50w2'):
    assert importlib.import_module(f'bingo_jax.configs.{name}').get_config().train.compute_dtype == 'auto'
  assert tiny_test.get_config().train.compute_dtype == 'float32'
  expected = 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  assert parallel.resolve_compute_dtype('auto') == expected
  assert parallel.resolve_compute_dtype('bfloat16') == 'bfloat16'

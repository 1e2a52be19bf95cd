"""Writes a PyTorch checkpoint with random weights in a real release layout.

For demos and tests while no real checkpoint is at hand (nothing here can download one):

  python -m tools.make_random_torch_checkpoint --arch resnet18 --format moco --out r18_moco.pth
  python -m tools.make_random_torch_checkpoint --arch resnet50w2 --format swav --out swav.pth

The file looks like the real thing: ``moco`` is ``{'state_dict': {'module.encoder_q.*',
'module.encoder_k.*', 'module.queue', 'module.queue_ptr'}, 'epoch', 'arch', 'optimizer'}``;
``swav`` is a flat ``module.*`` dict with ``projection_head`` and ``prototypes``;
``torchvision`` / ``efficientnet`` are flat state dicts with the ``fc`` / ``_fc`` classifier.
Weights are He-normal, BatchNorm statistics and affine parameters random (not the identity).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from absl import app, flags

from bingo_jax.console import cli
from bingo_jax.models import resnet as resnet_lib
from bingo_jax.torch_io import checkpoints as torch_checkpoints, mapping as torch_mapping
from bingo_jax.torch_io.mapping.common import set_path

DEFAULT_HEAD = {'moco': 'moco', 'swav': 'swav', 'torchvision': 'linear', 'efficientnet': 'linear'}

_ARCH = cli.shared(cli.ARCH)  # required
_FORMAT = cli.shared(cli.FORMAT)  # required
_HEAD = cli.shared(cli.HEAD)  # default: the layout's usual head (DEFAULT_HEAD)
_OUT = flags.DEFINE_string('out', None, 'The .pth file to write (required).')
_BASE_WIDTH = flags.DEFINE_integer('base_width', None, 'ResNet base width (default: 64).')
_STEM = flags.DEFINE_enum('stem', 'imagenet', ('imagenet', 'cifar'), 'ResNet stem.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Classes of a linear head.')
_HEAD_HIDDEN_DIM = flags.DEFINE_integer('head_hidden_dim', None, 'Hidden width of an MLP head.')
_SEED = flags.DEFINE_integer('seed', 0, 'numpy seed of the weights.')
_OVERWRITE = cli.shared(cli.OVERWRITE)


def random_variables(model_config: dict, seed: int) -> dict:
  """Random ``{'params', 'batch_stats'}`` for ``create_model(**model_config)`` (numpy).

  Shapes come from the registry; values are drawn here with numpy (no compilation, so even
  ResNet-50x4 takes seconds): kernels He-normal over their fan-in, biases small, BatchNorm
  scale in [0.5, 1.2] (0.2-0.5 on the last norm of each residual branch, as trained ResNets
  have, which keeps deep random networks numerically tame), mean N(0, 0.1), variance in
  [0.5, 2].
  """
  rng = np.random.default_rng(seed)
  stages = resnet_lib.RESNET_STAGES.get(model_config['arch'])
  branch_end = 'bn3' if stages and stages[1] is resnet_lib.Bottleneck else 'bn2'
  variables: dict = {}
  for (collection, *path), shape in sorted(torch_mapping.expected_shapes(model_config).items()):
    leaf = path[-1]
    if leaf == 'kernel':
      fan_in = int(np.prod(shape[:-1]))
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif leaf == 'scale':
      ends_branch = len(path) >= 3 and path[-2] == branch_end and path[-3].startswith('layer')
      value = rng.uniform(*((0.2, 0.5) if ends_branch else (0.5, 1.2)), shape)
    elif leaf == 'var':
      value = rng.uniform(0.5, 2.0, shape)
    else:  # biases, running means
      value = rng.normal(0.0, 0.1, shape)
    set_path(variables, (collection, *path), value.astype(np.float32))
  return variables


def make_checkpoint(arch: str, source_format: str, head: Optional[str] = None,
                    base_width: Optional[int] = None, stem: str = 'imagenet',
                    num_classes: int = 1000, head_hidden_dim: Optional[int] = None,
                    head_output_dim: int = 128, seed: int = 0) -> tuple[dict, dict]:
  """Builds the checkpoint object (numpy arrays) and the model config it encodes.

  Args:
    arch: registry architecture (resnet18 ... resnet50w4, efficientnet_b0).
    source_format: 'moco', 'swav', 'torchvision' or 'efficientnet'.
    head: 'moco', 'swav', 'linear' or 'none' (default: the layout's usual head).
    base_width, stem: small ResNets for tests (``base_width=8, stem='cifar'``).
    num_classes, head_hidden_dim, head_output_dim: head sizes.
    seed: numpy seed.
  Returns:
    ``(checkpoint_object, model_config)``.
  """
  head = head or DEFAULT_HEAD[source_format]
  config = {'arch': arch}
  if not arch.startswith('efficientnet'):
    config['stem'] = stem
    if base_width:
      config['base_width'] = base_width
  if head != 'none':
    config['head'] = head
    if head == 'linear':
      config['num_classes'] = num_classes
    else:
      config['head_hidden_dim'] = head_hidden_dim or (2048 if head == 'moco' else 8192)
      config['head_output_dim'] = head_output_dim
  variables = random_variables(config, seed)
  rng = np.random.default_rng(seed + 1)
  obj = torch_checkpoints.torch_layout_state_dict(variables, config, source_format)
  if source_format == 'moco':
    state = obj['state_dict']
    for key in list(state):
      state[key.replace('encoder_q.', 'encoder_k.', 1)] = state[key].copy()
    queue = rng.normal(size=(head_output_dim, 4096)).astype(np.float32)
    state['module.queue'] = queue / np.linalg.norm(queue, axis=0, keepdims=True)
    state['module.queue_ptr'] = np.zeros((1,), np.int64)
    obj.update(epoch=200, optimizer={'state': {}, 'param_groups': []})
  elif source_format == 'swav' and head == 'swav':
    prototypes = rng.normal(size=(3000, head_output_dim)).astype(np.float32)
    obj['module.prototypes.weight'] = prototypes
  return obj, config


def main(argv: list[str]) -> int:
  cli.no_positional_arguments(argv)
  missing = [f'--{holder.name}' for holder in (_ARCH, _FORMAT, _OUT) if holder.value is None]
  if missing:
    raise app.UsageError(f'{", ".join(missing)} must be given.')
  obj, config = make_checkpoint(_ARCH.value, _FORMAT.value, _HEAD.value, _BASE_WIDTH.value,
                                _STEM.value, _NUM_CLASSES.value, _HEAD_HIDDEN_DIM.value,
                                seed=_SEED.value)
  path = torch_checkpoints.save_torch(obj, _OUT.value, overwrite=_OVERWRITE.value)
  print(f'wrote {path}: {_FORMAT.value} layout, {config}')
  return 0


if __name__ == '__main__':
  app.run(main)

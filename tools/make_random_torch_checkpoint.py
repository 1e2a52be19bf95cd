"""Writes a PyTorch checkpoint with random weights in a real release layout.

For demos and tests while no real checkpoint is at hand (nothing here can download one):

  python tools/make_random_torch_checkpoint.py --arch resnet18 --format moco --out r18_moco.pth
  python tools/make_random_torch_checkpoint.py --arch resnet50w2 --format swav --out swav.pth

The file looks like the real thing: ``moco`` is ``{'state_dict': {'module.encoder_q.*',
'module.encoder_k.*', 'module.queue', 'module.queue_ptr'}, 'epoch', 'arch', 'optimizer'}``;
``swav`` is a flat ``module.*`` dict with ``projection_head`` and ``prototypes``;
``torchvision`` / ``efficientnet`` are flat state dicts with the ``fc`` / ``_fc`` classifier.
Weights are He-normal, BatchNorm statistics and affine parameters random (not the identity).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bingo_jax import torch_checkpoints, torch_mapping  # noqa: E402
from bingo_jax.models import resnet as resnet_lib  # noqa: E402
from bingo_jax.torch_mapping.common import set_path  # noqa: E402

DEFAULT_HEAD = {'moco': 'moco', 'swav': 'swav', 'torchvision': 'linear', 'efficientnet': 'linear'}


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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--arch', required=True)
  parser.add_argument('--format', required=True, choices=sorted(DEFAULT_HEAD))
  parser.add_argument('--out', required=True, help='the .pth file to write')
  parser.add_argument('--head', choices=('moco', 'swav', 'linear', 'none'))
  parser.add_argument('--base-width', type=int)
  parser.add_argument('--stem', default='imagenet', choices=('imagenet', 'cifar'))
  parser.add_argument('--num-classes', type=int, default=1000)
  parser.add_argument('--head-hidden-dim', type=int)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--overwrite', action='store_true')
  args = parser.parse_args(argv)
  obj, config = make_checkpoint(args.arch, args.format, args.head, args.base_width, args.stem,
                                args.num_classes, args.head_hidden_dim, seed=args.seed)
  path = torch_checkpoints.save_torch(obj, args.out, overwrite=args.overwrite)
  print(f'wrote {path}: {args.format} layout, {config}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

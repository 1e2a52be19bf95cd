"""Exports a bingo_jax model (a model file or a training workdir) as a PyTorch checkpoint.

  # MoCo layout: MoCo's main_lincls.py and detection/convert-pretrain-to-detectron2.py read it
  python tools/export_torch.py workdirs/r18_bingo student_r18.pth.tar --format moco
  # torchvision layout, backbone only: resnet18(); model.fc = nn.Identity(); strict load
  python tools/export_torch.py workdirs/r18_bingo r18_backbone.pth --format torchvision --drop-head
  # efficientnet_pytorch naming (EfficientNet-B0 students)
  python tools/export_torch.py workdirs/effb0_bingo effb0.pth --format efficientnet

Layouts (docs/conversion.md has the full naming):
  torchvision   flat state dict; head: linear -> fc, MoCo MLP -> fc.0/fc.2,
                SwAV -> projection_head.0/1/3
  moco          {'state_dict': {'module.encoder_q.*'}, 'arch'}; every head under fc
                (fc | fc.0/fc.2 | fc.0/fc.1/fc.3)
  swav          flat, 'module.' prefix, SwAV head as projection_head.0/1/3
  efficientnet  efficientnet_pytorch names; head: linear -> _fc, MoCo MLP -> _fc.0/_fc.2
The file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bingo_jax import checkpointing, torch_checkpoints  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   epilog=__doc__.split('\n\n', 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('model', help='bingo_jax model file, or a training workdir')
  parser.add_argument('destination', help='PyTorch file to write (.pth / .pth.tar)')
  parser.add_argument('--format', default='moco', choices=torch_checkpoints.EXPORT_FORMATS,
                      help='layout of the PyTorch file (default: moco)')
  parser.add_argument('--drop-head', action='store_true', help='write the backbone only')
  parser.add_argument('--step', type=int, help='training workdir: the step to export '
                      '(default: the latest checkpoint)')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace an existing PyTorch checkpoint file (nothing else)')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    loaded = checkpointing.load_any(args.model, step=args.step)
    obj = torch_checkpoints.export_torch_checkpoint(loaded, args.destination, args.format,
                                                    drop_head=args.drop_head,
                                                    overwrite=args.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError, checkpointing.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  state = obj['state_dict'] if args.format == 'moco' else obj
  print(f'{args.model} ({loaded.model_config}) -> {os.path.abspath(args.destination)}: '
        f'{args.format} layout, {len(state)} tensors'
        + (', no head' if args.drop_head or not loaded.model_config.get('head') else ''))
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""Exports a bingo_jax model (a model file or a training workdir) as a PyTorch checkpoint.

  # MoCo layout: MoCo's main_lincls.py and detection/convert-pretrain-to-detectron2.py read it
  bingo-export workdirs/r18_bingo student_r18.pth.tar --format moco
  # torchvision layout, backbone only: resnet18(); model.fc = nn.Identity(); strict load
  bingo-export workdirs/r18_bingo r18_backbone.pth --format torchvision --drop_head
  # efficientnet_pytorch naming (EfficientNet-B0 students)
  bingo-export workdirs/effb0_bingo effb0.pth --format efficientnet

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

import sys

from absl import flags

from bingo_jax.console import cli
from bingo_jax.store import checkpointing, fileio
from bingo_jax.torch_io import checkpoints as torch_checkpoints


_FORMAT = cli.shared(cli.FORMAT)  # default: moco
_DROP_HEAD = flags.DEFINE_bool('drop_head', False, 'Write the backbone only.')
_STEP = cli.shared(cli.STEP)
_OVERWRITE = cli.shared(cli.OVERWRITE)  # a PyTorch checkpoint file only, nothing else


def main(argv: list[str]) -> int:
  model, destination = cli.positional_arguments(argv, ('model', 'destination'))
  layout = _FORMAT.value or 'moco'
  try:
    loaded = checkpointing.load_any(model, step=_STEP.value)
    obj = torch_checkpoints.export_torch_checkpoint(loaded, destination, layout,
                                                    drop_head=_DROP_HEAD.value,
                                                    overwrite=_OVERWRITE.value)
  except (FileNotFoundError, FileExistsError, ValueError, checkpointing.CheckpointError,
          fileio.WriteError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  state = obj['state_dict'] if layout == 'moco' else obj
  print(f'{model} ({loaded.model_config}) -> {fileio.absolute(destination)}: '
        f'{layout} layout, {len(state)} tensors'
        + (', no head' if _DROP_HEAD.value or not loaded.model_config.get('head') else ''))
  return 0


def cli_main() -> None:
  """The ``bingo-export`` console command (and ``python -m bingo_jax.export``)."""
  cli.run(main)


if __name__ == '__main__':
  cli_main()

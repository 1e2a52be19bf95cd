"""Converts a PyTorch checkpoint (MoCo v1/v2, SwAV, torchvision, efficientnet_pytorch) into a
bingo_jax model file that every stage loads by path (``bingo_jax.store.model_io.load_model``).

  bingo-convert moco_v2_800ep_pretrain.pth.tar teachers/r50_mocov2
  bingo-convert swav_RN50w2_400ep_pretrain.pth.tar teachers/r50w2_swav
  bingo-convert resnet152-b121ed2d.pth teachers/r152 --head none

The layout (--format), the architecture (--arch) and the head (--head) are detected from the
tensor names and shapes unless given. The conversion is exact (see docs/conversion.md); any
missing, surplus or mis-shaped tensor stops it with an error that names the file and keys.
"""

from __future__ import annotations

import resource
import sys
import time

import jax
from absl import flags

from bingo_jax.console import cli
from bingo_jax.store import fileio
from bingo_jax.torch_io import checkpoints as torch_checkpoints


_FORMAT = cli.shared(cli.FORMAT)  # default: detected from the tensor names
_ARCH = cli.shared(cli.ARCH)  # default: inferred from the tensor shapes
_HEAD = cli.shared(cli.HEAD)  # default: whatever the file has
_ENCODER = flags.DEFINE_string('encoder', 'encoder_q',
                               'MoCo layout: the encoder to convert.')
_OVERWRITE = cli.shared(cli.OVERWRITE)  # a bingo_jax model file only, nothing else
_ALLOW_NON_FINITE = flags.DEFINE_bool('allow_non_finite', False,
                                      'Convert tensors holding NaN or Inf (refused by '
                                      'default).')


def main(argv: list[str]) -> int:
  source, destination = cli.positional_arguments(argv, ('source', 'destination'))
  start = time.perf_counter()
  try:
    converted = torch_checkpoints.convert_to_model_file(
        source, destination, source_format=_FORMAT.value, arch=_ARCH.value,
        head=_HEAD.value, encoder=_ENCODER.value, overwrite=_OVERWRITE.value,
        allow_non_finite=_ALLOW_NON_FINITE.value)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  seconds = time.perf_counter() - start
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
  meta = converted.metadata
  num_params = sum(v.size for v in jax.tree.leaves(converted.variables.get('params', {})))
  print(f'{source} ({meta["source_format"]} layout) -> {fileio.absolute(destination)}')
  print(f'  model: {converted.model_config}')
  print(f'  {num_params / 1e6:.1f}M parameters; ignored: {meta["ignored_tensors"] or "nothing"}'
        + (f'; dropped head: {len(meta["dropped_head_tensors"])} tensors'
           if meta['dropped_head_tensors'] else ''))
  print(f'  {seconds:.1f} s, peak memory {peak_gib:.2f} GiB')
  return 0


def cli_main() -> None:
  """The ``bingo-convert`` console command (and ``python -m bingo_jax.convert``)."""
  cli.run(main)


if __name__ == '__main__':
  cli_main()

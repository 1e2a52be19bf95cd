"""Converts a PyTorch checkpoint (MoCo v1/v2, SwAV, torchvision, efficientnet_pytorch) into a
bingo_jax model file that every stage loads by path (``bingo_jax.model_io.load_model``).

  python tools/convert_torch_teacher.py moco_v2_800ep_pretrain.pth.tar teachers/r50_mocov2
  python tools/convert_torch_teacher.py swav_RN50w2_400ep_pretrain.pth.tar teachers/r50w2_swav
  python tools/convert_torch_teacher.py resnet152-b121ed2d.pth teachers/r152 --head none

The layout (--format), the architecture (--arch) and the head (--head) are detected from the
tensor names and shapes unless given. The conversion is exact (see docs/conversion.md); any
missing, surplus or mis-shaped tensor stops it with an error that names the file and keys.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bingo_jax import torch_checkpoints  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('source', help='PyTorch checkpoint file (.pth / .pth.tar)')
  parser.add_argument('destination', help='model file directory to write')
  parser.add_argument('--format', choices=torch_checkpoints.FORMATS,
                      help='checkpoint layout (default: detected)')
  parser.add_argument('--arch', help='architecture, e.g. resnet50w2 (default: inferred from '
                      'the tensor shapes)')
  parser.add_argument('--head', choices=('moco', 'swav', 'linear', 'none'),
                      help="head to keep; 'none' drops it (default: whatever the file has)")
  parser.add_argument('--encoder', default='encoder_q',
                      help='MoCo layout: the encoder to convert (default: encoder_q)')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace an existing bingo_jax model file (nothing else is ever '
                      'replaced)')
  parser.add_argument('--allow-non-finite', action='store_true',
                      help='convert tensors holding NaN or Inf (refused by default)')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  start = time.perf_counter()
  try:
    converted = torch_checkpoints.convert_to_model_file(
        args.source, args.destination, source_format=args.format, arch=args.arch,
        head=args.head, encoder=args.encoder, overwrite=args.overwrite,
        allow_non_finite=args.allow_non_finite)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  seconds = time.perf_counter() - start
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
  meta = converted.metadata
  num_params = sum(v.size for v in jax.tree.leaves(converted.variables.get('params', {})))
  print(f'{args.source} ({meta["source_format"]} layout) -> {os.path.abspath(args.destination)}')
  print(f'  model: {converted.model_config}')
  print(f'  {num_params / 1e6:.1f}M parameters; ignored: {meta["ignored_tensors"] or "nothing"}'
        + (f'; dropped head: {len(meta["dropped_head_tensors"])} tensors'
           if meta['dropped_head_tensors'] else ''))
  print(f'  {seconds:.1f} s, peak memory {peak_gib:.2f} GiB')
  return 0


if __name__ == '__main__':
  sys.exit(main())

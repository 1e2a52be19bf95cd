"""Converts a PyTorch teacher checkpoint into a bingo_jax model file: ``bingo-convert``'s code
under the name the design card gives it, with the same flags and arguments.

  python tools/convert_torch_teacher.py moco_v2_800ep_pretrain.pth.tar teachers/r50_mocov2
  python -m tools.convert_torch_teacher swav_RN50w2_400ep_pretrain.pth.tar teachers/r50w2_swav

See ``bingo_jax/convert.py`` (``--help``) and docs/conversion.md.
"""

from bingo_jax import convert

if __name__ == '__main__':
  convert.cli_main()

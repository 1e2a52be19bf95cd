r"""The PyTorch BINGO step of bench/torch_bingo_step.py, timed: one row per batch.

  python -m bench.torch_step --batches 64,128   # AMP bf16, channels-last, one GPU, 224 px
  python -m bench.torch_step --smoke            # tiny networks on the CPU, 32 px

R-18 <- R-50x2 in PyTorch eager on random views already on the device (no augmentation, no
data loading): the baseline the JAX rows of bench/accelerator.py are compared with.
"""

from __future__ import annotations

import sys
import time

import torch
from absl import app, flags

from bench import torch_bingo_step

_BATCHES = flags.DEFINE_list('batches', ['64', '128'], 'Batches, one row each.')
_STEPS = flags.DEFINE_integer('steps', None, 'Timed steps per row (default 5; smoke: 1).')
_BUDGET_S = flags.DEFINE_float('budget_s', None, 'Skip the remaining batches once this many '
                               'seconds have passed.')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny networks, 32 px, on the CPU.')


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not all(batch.isdigit() and int(batch) > 0 for batch in _BATCHES.value):
    raise app.UsageError(f'--batches {",".join(_BATCHES.value)}: expected positive integers.')
  smoke = _SMOKE.value
  device = 'cpu' if smoke else 'cuda'
  if device == 'cuda' and not torch.cuda.is_available():
    print(f'PyTorch {torch.__version__} sees no CUDA device: no PyTorch rows.', file=sys.stderr)
    return 1
  if smoke:
    torch.set_num_threads(1)  # intra-op threads on a shared CPU slow tiny steps down 20-fold
  image_size, steps = (32, _STEPS.value or 1) if smoke else (224, _STEPS.value or 5)
  name = torch.cuda.get_device_name() if device == 'cuda' else 'CPU'
  print(f'# PyTorch {torch.__version__} BINGO step R-18 <- R-50x2'
        f'{" (smoke: width 8)" if smoke else ""}, AMP bf16, channels-last, 1 x {name}, '
        f'{image_size} px views ready on the device (no augmentation)')
  print('| batch | step (ms) | anchors/s |')
  print('|---|---|---|', flush=True)
  began = time.perf_counter()
  failed = False
  for batch in (int(b) for b in _BATCHES.value):
    if _BUDGET_S.value is not None and time.perf_counter() - began > _BUDGET_S.value:
      print(f'# batch {batch} skipped (time budget)')
      continue
    try:
      seconds = torch_bingo_step.time_step(batch, image_size, steps, device=device, smoke=smoke)
    except Exception as e:  # e.g. out of memory at the largest batch: report, go on
      print(f'| {batch} | failed: {type(e).__name__}: {str(e)[:160]} | |', flush=True)
      failed = True
      continue
    print(f'| {batch} | {1e3 * seconds:.1f} | {batch / seconds:,.0f} |', flush=True)
  return 1 if failed else 0


if __name__ == '__main__':
  app.run(main)

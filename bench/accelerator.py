r"""One command for a GPU or TPU host: the BINGO step's throughput and MFU (under 8 minutes).

  python -m bench.accelerator            # R-18 <- R-50x2, 224 px, fp32 + bf16, batches 32/64/128
  python -m bench.accelerator --smoke    # a tiny CPU run of the same code (the test suite)
  python -m bench.accelerator --rows bfloat16:64,float32:64 --json_out STEP.json
                                         # chosen rows, also written to a file

Each row is the whole jitted step as training runs it in ``augment_on = 'device'`` mode: the
MoCo v2 views drawn from 512 px uint8 canvases (bingo_jax/run/device_data.py), then the BINGO
update (student forward/backward on query, pos_q and their CutMix, the teacher on key and
pos_k with shuffled BatchNorm, the loss against a 65536-key queue, SGD). Canvases are placed
on the devices once: the host pipeline is measured by bench/input_pipeline.py.

FLOPs come from XLA's cost analysis of the compiled step; MFU is achieved FLOP/s over the
measured rate of a large matrix product of the row's dtype on the same devices (and over the
vendor's dense peak when the device is known). With torch and CUDA importable it also times
the PyTorch step of bench/torch_bingo_step.py (AMP bf16, channels-last, one GPU) on ready
views, i.e. without its data loading.

Needs only jax (with its accelerator plugin), flax, optax, orbax-checkpoint, numpy, absl-py
and ml_collections: no TensorFlow, faiss or torchvision, no network. Run from the repository
root, ``python -m`` finds the checkout's bingo_jax without installing it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from bench import models as bench_models
from bingo_jax.configs import r18_r50w2
from bingo_jax.data import parallel
from bingo_jax.method import steps
from bingo_jax.method import train_step as train_step_lib
from bingo_jax.models import create_model, init_variables
from bingo_jax.run import device_data

VIEWS = ('query', 'key', 'pos_q', 'pos_k')
# Dense peaks (FLOP/s) by device kind substring: (bf16, fp32 through TF32 / the MXU).
NOMINAL_PEAKS = {'H100': (989e12, 494e12), 'H200': (989e12, 494e12), 'A100': (312e12, 156e12),
                 'TPU v4': (275e12, 275e12), 'TPU v5 lite': (197e12, 197e12),
                 'TPU v5p': (459e12, 459e12), 'TPU v6': (918e12, 918e12)}


def nominal_peak(device_kind: str, dtype: str):
  for name, (bf16, fp32) in NOMINAL_PEAKS.items():
    if name.lower() in device_kind.lower():
      return bf16 if dtype == 'bfloat16' else fp32
  return None


def matmul_peak(dtype, size: int, devices) -> float:
  """FLOP/s of one ``size^2`` matmul per device, summed over ``devices``."""
  mesh = parallel.make_mesh(devices)
  sharding = parallel.data_sharding(mesh)
  n = len(devices)
  a = jax.device_put(jnp.ones((n, size, size), dtype), sharding)
  b = jax.device_put(jnp.ones((n, size, size), dtype), sharding)
  matmul = jax.jit(lambda x, y: jnp.einsum('bij,bjk->bik', x, y))
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(5):
    began = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - began)
  return 2 * n * size ** 3 / min(times)


class StepBench(NamedTuple):
  """One row's step and what it runs on (``build``)."""
  config: ml_collections.ConfigDict
  student: nn.Module
  teacher: nn.Module
  step: Callable  # jitted (state, teacher_variables, canvas batch) -> (state, metrics)
  state: train_step_lib.TrainState
  teacher_variables: Any
  batch: dict  # the canvas batch, on the devices


def build(smoke: bool, dtype: str, global_batch: int, mesh, canvas_size: int,
          image_size: int) -> StepBench:
  """The jitted canvas step, its state, teacher variables and a device-resident canvas batch."""
  config = r18_r50w2.get_config()
  config.train.compute_dtype = dtype
  config.train.batch_size = global_batch
  config.data.image_size = image_size
  if smoke:
    config.train.queue_size = 4 * global_batch
    config.student.bn_group_size = config.teacher.bn_group_size = 2
  student, teacher = bench_models.create_models(config, smoke, dtype)
  teacher_variables = parallel.replicate(
      init_variables(teacher, jax.random.key(1), image_size), mesh)
  steps_per_epoch = 5000
  state = train_step_lib.create_train_state(config, student, jax.random.key(0), mesh,
                                            steps_per_epoch)
  step = device_data.canvas_step(
      steps.make_train_step(config, student, teacher, mesh, steps_per_epoch),
      config, mesh, VIEWS)
  rng = np.random.default_rng(0)
  valid = (min(375, canvas_size), min(500, canvas_size))
  host = {'anchor_canvas': rng.integers(0, 256, (global_batch, canvas_size, canvas_size, 3),
                                        np.uint8),
          'positive_canvas': rng.integers(0, 256, (global_batch, canvas_size, canvas_size, 3),
                                          np.uint8),
          'anchor_size': np.tile([*valid, *valid], (global_batch, 1)).astype(np.int32),
          'positive_size': np.tile([*valid, *valid], (global_batch, 1)).astype(np.int32),
          'view_keys': rng.integers(0, 2**31, (global_batch, 4, 2)).astype(np.uint32)}
  batch = jax.device_put(host, parallel.data_sharding(mesh))
  return StepBench(config, student, teacher, step, state, teacher_variables, batch)


def sizes(smoke: bool) -> tuple[int, int]:
  """``(canvas_size, image_size)``: 512 / 224 px, or 48 / 32 px for the smoke run."""
  return (48, 32) if smoke else (512, 224)


def bench_row(smoke, dtype, per_device, mesh, canvas_size, image_size, steps):
  global_batch = per_device * mesh.devices.size
  bench = build(smoke, dtype, global_batch, mesh, canvas_size, image_size)
  step, state, teacher_variables, batch = (bench.step, bench.state, bench.teacher_variables,
                                           bench.batch)
  began = time.perf_counter()
  compiled = step.lower(state, teacher_variables, batch).compile()
  compile_seconds = time.perf_counter() - began
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost['flops']) * mesh.devices.size  # cost of one SPMD partition
  state, metrics = compiled(state, teacher_variables, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    began = time.perf_counter()
    state, metrics = compiled(state, teacher_variables, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - began)
  loss = float(metrics['loss'])
  if not np.isfinite(loss):
    raise FloatingPointError(f'{dtype} batch {per_device}: loss {loss}')
  return {'seconds': float(np.median(times)), 'flops': flops, 'compile': compile_seconds,
          'global_batch': global_batch, 'loss': loss}


def bench_torch(per_device: int, image_size: int, steps: int) -> float:
  """Seconds per PyTorch AMP bf16 channels-last step on one GPU (bench/torch_bingo_step.py)."""
  from bench import torch_bingo_step
  return torch_bingo_step.time_step(per_device, image_size, steps, device='cuda')


def torch_cuda_available() -> bool:
  try:
    import torch
    return bool(torch.cuda.is_available())
  except ImportError:
    return False


def parse_rows(rows: list[str]) -> list[tuple[str, int]]:
  """``['bfloat16:64', ...]`` -> ``[('bfloat16', 64), ...]``; ValueError naming a bad entry."""
  parsed = []
  for row in rows:
    dtype, _, batch = row.partition(':')
    if dtype not in ('float32', 'bfloat16') or not batch.isdigit() or int(batch) < 1:
      raise ValueError(f'--rows entry {row!r}: expected DTYPE:BATCH, DTYPE float32 or '
                       'bfloat16, BATCH a positive integer.')
    parsed.append((dtype, int(batch)))
  return parsed


def write_json(path: str, value: Any) -> None:
  """Writes ``value`` as JSON to ``path`` atomically (a reader sees the old or the new file)."""
  partial = f'{path}.partial'
  with open(partial, 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(partial, path)


# --smoke and --steps are shared with bench/step_breakdown.py (cli.shared).
SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny networks, 32 px, CPU-sized.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes, one row each.')
_PER_DEVICE_BATCHES = flags.DEFINE_list('per_device_batches', None,
                                        'Batches per device (default 32,64,128; smoke: 2).')
_ROWS = flags.DEFINE_list('rows', None, 'DTYPE:BATCH rows, e.g. bfloat16:64,float32:64 '
                          '(instead of --dtypes x --per_device_batches).')
STEPS = flags.DEFINE_integer('steps', None, 'Timed steps per row (default 5; smoke: 1).')
_BUDGET_MINUTES = flags.DEFINE_float('budget_minutes', 7.0, 'Skip the remaining rows once '
                                     'this much time has passed.')
_NO_TORCH = flags.DEFINE_bool('no_torch', False, 'No PyTorch row.')
_JSON_OUT = flags.DEFINE_string('json_out', None, 'Also write the rows to this JSON file, '
                                'rewritten after each row (bench/step_breakdown.py reads it).')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  smoke = SMOKE.value
  canvas_size, image_size = sizes(smoke)
  if _ROWS.value:
    try:
      rows = parse_rows(_ROWS.value)
    except ValueError as e:
      raise app.UsageError(str(e))
  else:
    batches = [int(b) for b in (_PER_DEVICE_BATCHES.value or
                                (['2'] if smoke else ['32', '64', '128']))]
    rows = [(dtype, batch) for dtype in _DTYPES.value for batch in batches]
  steps = STEPS.value or (1 if smoke else 5)
  devices = jax.devices()
  mesh = parallel.make_mesh(devices)
  kind = devices[0].device_kind
  began = time.perf_counter()
  print(f'# BINGO step {"(smoke: tiny networks) " if smoke else ""}R-18 <- R-50x2, '
        f'{image_size} px views from {canvas_size} px canvases, device augmentation included')
  print(f'# {platform.node()}: {len(devices)} x {kind} ({jax.default_backend()}), JAX '
        f'{jax.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}')
  print('| dtype | batch per device | global batch | step (ms) | anchors/s | anchors/s per device '
        '| GFLOP/step | MFU (measured matmul peak) | MFU (nominal peak) | compile (s) |')
  print('|---|---|---|---|---|---|---|---|---|---|', flush=True)
  skipped, results, peaks = [], [], {}
  for dtype, per_device in rows:
    if time.perf_counter() - began > 60 * _BUDGET_MINUTES.value:
      skipped.append(f'{dtype}/{per_device}')
      continue
    if dtype not in peaks:
      peaks[dtype] = matmul_peak(jnp.dtype(dtype), 256 if smoke else 8192, devices)
    peak, nominal = peaks[dtype], nominal_peak(kind, dtype)
    try:
      row = bench_row(smoke, dtype, per_device, mesh, canvas_size, image_size, steps)
    except Exception as e:  # e.g. out of memory at the largest batch: report, go on
      print(f'| {dtype} | {per_device} | | failed: {type(e).__name__}: {str(e)[:120]} '
            '| | | | | | |', flush=True)
      continue
    achieved = row['flops'] / row['seconds']
    rate = row['global_batch'] / row['seconds']
    nominal_mfu = 'n/a' if nominal is None else f'{100 * achieved / (nominal * len(devices)):.1f}%'
    print(f'| {dtype} | {per_device} | {row["global_batch"]} | {1e3 * row["seconds"]:.1f} | '
          f'{rate:,.0f} | {rate / len(devices):,.0f} | {row["flops"] / 1e9:,.1f} | '
          f'{100 * achieved / peak:.1f}% | {nominal_mfu} | {row["compile"]:.0f} |', flush=True)
    results.append(dict(row, dtype=dtype, per_device_batch=per_device, anchors_per_s=rate,
                        matmul_peak=peak, device_kind=kind, devices=len(devices)))
    if _JSON_OUT.value:
      write_json(_JSON_OUT.value, results)
  if skipped:
    print(f'# skipped (time budget): {", ".join(skipped)}')
  batches = sorted({batch for _, batch in rows})
  if not smoke and not _NO_TORCH.value and torch_cuda_available():
    import torch
    for per_device in batches:
      if time.perf_counter() - began > 60 * (_BUDGET_MINUTES.value + 0.5):
        print(f'# PyTorch batch {per_device} skipped (time budget)')
        continue
      try:
        seconds = bench_torch(per_device, image_size, steps)
        print(f'# PyTorch {torch.__version__} AMP bf16 channels-last, 1 GPU, batch {per_device}: '
              f'{1e3 * seconds:.1f} ms/step, {per_device / seconds:,.0f} anchors/s '
              '(views ready on the GPU, no augmentation)', flush=True)
      except Exception as e:
        print(f'# PyTorch batch {per_device} failed: {type(e).__name__}: {str(e)[:200]}')
  elif not smoke and not _NO_TORCH.value:
    print('# PyTorch with CUDA not importable: no PyTorch row.')
  print(f'# done in {time.perf_counter() - began:.0f} s, load average {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  app.run(main)

r"""Throughput and model FLOP utilisation of the BINGO train step, optionally against PyTorch.

  python -m bench.train_step --config r18_r50 --batch_size 32 --image_size 112 \
      --torch

Prints one table row per implementation: step time, images/s, FLOPs per step and model FLOP
utilisation (MFU). The JAX FLOPs come from XLA's cost analysis of the compiled step; the peak
is the measured rate of a large matrix product on the same backend and dtype, so MFU says how
close the step gets to what this machine does on its best-case kernel. The PyTorch row uses
the same FLOP count (the same computation) over PyTorch's own measured matmul peak.

The student is the config's; the teacher is its model file when ``config.teacher.path``
exists, else a randomly initialised ``--teacher_arch`` with a MoCo head (the speed does not
depend on the weights). Images are random; the data pipeline is not part of the measurement.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bingo_jax import configs
from bingo_jax.data import parallel
from bingo_jax.data import views
from bingo_jax.method import config_checks
from bingo_jax.method import steps
from bingo_jax.method import train_step as train_step_lib
from bingo_jax.models import create_model, init_variables
from bingo_jax.store import model_io

_CONFIG = configs.define_config_flag('config', 'r18_r50', lock_config=False)
_BATCH = flags.DEFINE_integer('batch_size', None, 'Global batch (default: the config\'s).')
_SIZE = flags.DEFINE_integer('image_size', None, 'Image side (default: the config\'s).')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed steps after compilation.')
_DEVICES = flags.DEFINE_integer('devices', None, 'Devices of the mesh (default: all).')
_TEACHER_ARCH = flags.DEFINE_string('teacher_arch', 'resnet50',
                                    'Random teacher when the config\'s teacher file is absent.')
_TORCH = flags.DEFINE_bool('torch', False, 'Also time the PyTorch eager step (CPU).')
_MATMUL = flags.DEFINE_integer('matmul_size', None,
                               'Side of the peak-FLOP/s matmul (default 2048 CPU, 8192 GPU/TPU).')


def _median_seconds(fn: Callable[[], None], repeats: int) -> float:
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    fn()
    times.append(time.perf_counter() - began)
  return float(np.median(times))


def jax_peak_flops(dtype, size: int) -> float:
  """FLOP/s of an ``size x size`` matrix product on the default backend (one device)."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  seconds = _median_seconds(lambda: matmul(a, b).block_until_ready(), 5)
  return 2 * size ** 3 / seconds


def torch_peak_flops(size: int) -> float:
  import torch
  a, b = torch.randn(size, size), torch.randn(size, size)
  torch.mm(a, b)
  return 2 * size ** 3 / _median_seconds(lambda: torch.mm(a, b), 5)


def bench_jax(config, batch_size: int, image_size: int, mesh) -> dict:
  """Compiles the real train step and times it on random uint8 views."""
  compute_dtype = config.train.compute_dtype
  student = create_model(
      config.student.arch, config.student.head, head_hidden_dim=config.student.head_hidden_dim,
      head_output_dim=config.student.head_output_dim, base_width=config.student.base_width,
      stem=config.student.stem, bn_group_size=config.student.bn_group_size, dtype=compute_dtype)
  teacher_group = (config.teacher.bn_group_size
                   if config.teacher.bn_mode in config_checks.SHUFFLE_MODES else None)
  if config.teacher.path and os.path.exists(config.teacher.path):
    loaded = model_io.load_model(config.teacher.path, bn_group_size=teacher_group,
                                 dtype=compute_dtype)
    teacher, teacher_variables, teacher_name = loaded.model, loaded.variables, config.teacher.path
  else:
    teacher = create_model(_TEACHER_ARCH.value, 'moco', bn_group_size=teacher_group,
                           head_output_dim=config.student.head_output_dim, dtype=compute_dtype)
    teacher_variables = init_variables(teacher, jax.random.key(1))
    teacher_name = f'random {_TEACHER_ARCH.value}'
  steps_per_epoch = 5000
  state = train_step_lib.create_train_state(config, student, jax.random.key(0), mesh,
                                            steps_per_epoch)
  step = steps.make_train_step(config, student, teacher, mesh, steps_per_epoch)
  teacher_variables = parallel.replicate(teacher_variables, mesh)
  rng = np.random.default_rng(0)
  batch = parallel.global_batch(
      {name: rng.integers(0, 256, (batch_size, image_size, image_size, 3), np.uint8)
       for name in views.VIEW_KEYS}, mesh)

  began = time.perf_counter()
  compiled = step.lower(state, teacher_variables, batch).compile()
  compile_seconds = time.perf_counter() - began
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # XLA reports the FLOPs of one partition of the SPMD program: the whole step is that times
  # the number of devices.
  flops = float(cost['flops']) * mesh.devices.size

  def one_step():
    nonlocal state
    state, metrics = compiled(state, teacher_variables, batch)
    jax.block_until_ready(metrics)
  return {'implementation': f'JAX jit ({jax.default_backend()}, {mesh.devices.size} dev)',
          'run_step': one_step, 'flops': flops, 'compile_seconds': compile_seconds,
          'teacher': teacher_name, 'dtype': compute_dtype}


def bench_torch(config, batch_size: int, image_size: int, teacher_arch: str) -> dict:
  import torch
  from bench.torch_bingo_step import TorchBingoStep
  step = TorchBingoStep(config.student.arch, teacher_arch, batch_size,
                        config.train.queue_size, config.train.temperature)
  views = [torch.randn(batch_size, 3, image_size, image_size) for _ in range(4)]
  return {'implementation': f'PyTorch {torch.__version__} eager (cpu, '
                            f'{torch.get_num_threads()} threads)',
          'run_step': lambda: step(*views), 'dtype': 'float32'}


def time_interleaved(rows: list[dict], steps: int, warmup: int) -> None:
  """Median step time of each row, the rows' steps alternating.

  On a shared machine the load drifts; alternating the implementations step by step exposes
  them to the same conditions, so their ratio is meaningful even when absolute times are not.
  """
  for row in rows:
    for _ in range(warmup):
      row['run_step']()
  times = [[] for _ in rows]
  for _ in range(steps):
    for row, row_times in zip(rows, times):
      began = time.perf_counter()
      row['run_step']()
      row_times.append(time.perf_counter() - began)
  for row, row_times in zip(rows, times):
    row['seconds'] = float(np.median(row_times))
    row['all_seconds'] = row_times


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  config.train.compute_dtype = parallel.resolve_compute_dtype(config.train.compute_dtype)
  batch_size = _BATCH.value or config.train.batch_size
  image_size = _SIZE.value or config.data.image_size
  config.train.batch_size = batch_size
  devices = jax.devices()[:_DEVICES.value] if _DEVICES.value else jax.devices()
  mesh = parallel.make_mesh(devices)
  backend = jax.default_backend()
  matmul_size = _MATMUL.value or (2048 if backend == 'cpu' else 8192)
  dtype = jnp.dtype(config.train.compute_dtype)

  print(f'# BINGO train step: student {config.student.arch} <- teacher, batch {batch_size}, '
        f'{image_size} px, {config.train.compute_dtype}, queue {config.train.queue_size}')
  print(f'# machine: {platform.machine()} {platform.processor() or ""}, {os.cpu_count()} CPUs, '
        f'JAX {jax.__version__} on {backend} ({devices[0].device_kind})')
  # The peak is the best of a measurement before and one after the steps (shared machines).
  peak_before = jax_peak_flops(dtype, matmul_size)
  rows = [bench_jax(config, batch_size, image_size, mesh)]
  print(f'# teacher: {rows[0]["teacher"]}; XLA compile {rows[0]["compile_seconds"]:.1f} s')
  torch_comparable = config.student.base_width is None and config.student.stem == 'imagenet'
  if _TORCH.value and not torch_comparable:
    print('# --torch skipped: the PyTorch step builds standard-width ImageNet-stem ResNets only.')
  if _TORCH.value and torch_comparable:
    teacher_arch = (_TEACHER_ARCH.value if not (config.teacher.path and
                                                os.path.exists(config.teacher.path))
                    else model_io.read_record(config.teacher.path)['model']['arch'])
    torch_peak_before = torch_peak_flops(matmul_size)
    rows.append(bench_torch(config, batch_size, image_size, teacher_arch))
  time_interleaved(rows, _STEPS.value, _WARMUP.value)
  rows[0]['peak'] = max(peak_before, jax_peak_flops(dtype, matmul_size)) * len(devices)
  print(f'# JAX peak ({matmul_size}^2 matmul, {dtype.name}, {len(devices)} dev): '
        f'{rows[0]["peak"] / 1e9:.1f} GFLOP/s')
  if len(rows) == 2:
    rows[1]['flops'] = rows[0]['flops']
    rows[1]['peak'] = max(torch_peak_before, torch_peak_flops(matmul_size))
    print(f'# PyTorch peak ({matmul_size}^2 matmul, float32): {rows[1]["peak"] / 1e9:.1f} GFLOP/s')
  for row in rows:
    print(f'# {row["implementation"]} step times (s): '
          + ', '.join(f'{t:.2f}' for t in row['all_seconds']))

  print('| implementation | step (ms) | images/s | GFLOP/step | achieved GFLOP/s | MFU |')
  print('|---|---|---|---|---|---|')
  for row in rows:
    achieved = row['flops'] / row['seconds']
    print(f'| {row["implementation"]} | {row["seconds"] * 1e3:.0f} | '
          f'{batch_size / row["seconds"]:.1f} | {row["flops"] / 1e9:.1f} | {achieved / 1e9:.1f} | '
          f'{100 * achieved / row["peak"]:.1f}% |')
  if len(rows) == 2:
    print(f'# JAX / PyTorch images/s: {rows[1]["seconds"] / rows[0]["seconds"]:.2f}x')


if __name__ == '__main__':
  app.run(main)

r"""Cost of the kNN monitor (bingo_jax/run/knn_monitor.py) against the training it interrupts.

  python -m bench.knn_monitor [--config fmnist_demo] [--steps 5]

Times (a) the config's BINGO train step (median of ``--steps``, after compilation; the teacher
is a random ``--teacher_arch`` of ``--teacher_width``, random uint8 views: the input pipeline
is not included, so the real epoch is longer and the overhead below an upper bound) and
(b) one monitor evaluation at the config's monitor settings (``train.monitor_bank_size`` +
``monitor_eval_size`` random labelled images through the student, then the kNN vote), first
call (with compilation) and second call. The overhead is the second call's time over the
training time between two evaluations, ``monitor_every_epochs x steps_per_epoch`` steps of
``--train_images`` images (default: the config's training split size when known).
"""

from __future__ import annotations

import os
import platform
import time

import jax
import numpy as np
from absl import app, flags

from bingo_jax import configs
from bingo_jax.data import parallel, sources as data_sources
from bingo_jax.method import steps as steps_lib
from bingo_jax.method import train_step as train_step_lib
from bingo_jax.models import create_model, init_variables
from bingo_jax.run import knn_monitor

_CONFIG = configs.define_config_flag('config', 'fmnist_demo', lock_config=False)
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed train steps.')
_TRAIN_IMAGES = flags.DEFINE_integer('train_images', 12800, 'Training images per epoch.')
_TEACHER_ARCH = flags.DEFINE_string('teacher_arch', 'resnet18', 'Random teacher network.')
_TEACHER_WIDTH = flags.DEFINE_integer('teacher_width', 16, 'Its base width.')


def _median_step_seconds(config, mesh, steps: int) -> float:
  train = config.train
  student = create_model(
      config.student.arch, config.student.head, head_hidden_dim=config.student.head_hidden_dim,
      head_output_dim=config.student.head_output_dim, base_width=config.student.base_width,
      stem=config.student.stem, bn_group_size=config.student.bn_group_size,
      dtype=train.compute_dtype)
  teacher = create_model(_TEACHER_ARCH.value, 'moco', base_width=_TEACHER_WIDTH.value,
                         stem=config.student.stem, bn_group_size=config.teacher.bn_group_size,
                         head_output_dim=config.student.head_output_dim,
                         dtype=train.compute_dtype)
  size = config.data.image_size
  teacher_variables = parallel.replicate(init_variables(teacher, jax.random.key(1), size), mesh)
  state = train_step_lib.create_train_state(config, student, jax.random.key(0), mesh, 100)
  step = steps_lib.make_train_step(config, student, teacher, mesh, 100)
  rng = np.random.default_rng(0)
  batch = parallel.global_batch(
      {name: rng.integers(0, 256, (train.batch_size, size, size, 3), np.uint8)
       for name in steps_lib.batch_views(config)}, mesh)
  state, metrics = step(state, teacher_variables, batch)  # compilation
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    began = time.perf_counter()
    state, metrics = step(state, teacher_variables, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - began)
  return float(np.median(times)), student, state


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  mesh = parallel.make_mesh()
  load_before = os.getloadavg()
  step_seconds, student, state = _median_step_seconds(config, mesh, _STEPS.value)

  train = config.train
  size = config.data.image_size
  rng = np.random.default_rng(0)
  def labelled(n):
    return data_sources.ArraySource(rng.integers(0, 256, (n, size, size, 3), np.uint8),
                                    rng.integers(0, 10, n), num_classes=10)
  bank_base, query_base = labelled(train.monitor_bank_size), labelled(train.monitor_eval_size)
  monitor = knn_monitor.KnnMonitor(
      knn_monitor.IndexedSubset(bank_base, np.arange(len(bank_base)), 'bank'),
      knn_monitor.IndexedSubset(query_base, np.arange(len(query_base)), 'queries'),
      image_size=size, batch_size=config.eval.batch_size, k=config.eval.knn_k,
      weighted_k=config.eval.knn_weighted_k, temperature=config.eval.knn_temperature, mesh=mesh)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  first = monitor.evaluate(student, variables)['monitor/seconds']
  second = monitor.evaluate(student, variables)['monitor/seconds']
  load_after = os.getloadavg()

  steps_per_epoch = _TRAIN_IMAGES.value // train.batch_size
  between = train.monitor_every_epochs * steps_per_epoch * step_seconds
  print(f'# machine: {platform.machine()}, {os.cpu_count()} CPUs, JAX {jax.__version__} on '
        f'{jax.default_backend()} ({mesh.devices.size} dev); load average '
        f'{load_before[0]:.1f} before, {load_after[0]:.1f} after')
  print(f'# student {config.student.arch} width {config.student.base_width} '
        f'{config.student.stem} stem, {size} px, batch {train.batch_size}; teacher random '
        f'{_TEACHER_ARCH.value} width {_TEACHER_WIDTH.value}')
  print('| train step (s) | steps between evaluations | training between (s) '
        '| monitor bank + queries | monitor, 1st call (s) | monitor, 2nd call (s) | overhead |')
  print('|---|---|---|---|---|---|---|')
  print(f'| {step_seconds:.3f} | {train.monitor_every_epochs} x {steps_per_epoch} | '
        f'{between:.0f} | {train.monitor_bank_size} + {train.monitor_eval_size} | {first:.1f} | '
        f'{second:.1f} | {100 * second / (between + second):.2f}% |')


if __name__ == '__main__':
  app.run(main)

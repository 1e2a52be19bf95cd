"""The whole BINGO flow on Fashion-MNIST, one command: the README's main job.

    python -m bingo_jax.demo --workdir runs/demo

Stages, each through the same public entry point a user would call:
  1. teacher: a PyTorch MoCo-layout checkpoint (``--teacher``; by default a randomly
     initialised ResNet-18 written by ``tools/make_random_torch_checkpoint.py``, since no
     trained weights can be downloaded here) converted by ``tools/convert_torch_teacher.py``;
  2. bags: teacher features of the first 12,800 training images + exact kNN (``bingo_jax.bagging``);
  3. distillation of a ResNet-18 (width 16) student (``bingo_jax.train``);
  4. kNN evaluation of the teacher, the student before and after distillation and raw pixels,
     and the t-SNE / bag-distance analysis of the student (``bingo_jax.evaluate``);
  5. export of the student to the MoCo PyTorch layout (``tools/export_torch.py``).
It ends with a table. Every stage resumes: a rerun skips what is finished.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Optional

import argparse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(script: str, *args: str) -> None:
  """Runs a command-line tool of this repository as a user would."""
  command = [sys.executable, os.path.join(REPO, 'tools', script), *args]
  print('$ ' + ' '.join(os.path.relpath(a) if os.path.exists(a) else a for a in command[1:]),
        flush=True)
  subprocess.run(command, check=True)


class Stages:
  """Announces numbered stages with elapsed time and an ETA from the expected durations."""

  def __init__(self, expected_seconds: dict[str, float]):
    self.expected = expected_seconds
    self.started = time.time()
    self.done: list[str] = []

  def begin(self, name: str) -> None:
    elapsed = time.time() - self.started
    remaining = sum(v for k, v in self.expected.items() if k not in self.done)
    print(f'\n=== [{len(self.done) + 1}/{len(self.expected)}] {name}  '
          f'(elapsed {elapsed / 60:.1f} min, about {remaining / 60:.0f} min to go)', flush=True)

  def end(self, name: str) -> None:
    self.done.append(name)


def run(workdir: str, teacher_checkpoint: Optional[str], epochs: Optional[int],
        max_steps: Optional[int]) -> dict:
  from bingo_jax import bagging, evaluate, fileio, model_io, train
  from configs import fmnist_demo

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config = fmnist_demo.get_config()
  if epochs is not None:
    config.train.epochs = epochs
  config.train.max_steps = max_steps
  teacher_dir = os.path.join(workdir, 'teacher')
  train_dir = os.path.join(workdir, 'train')
  config.teacher.path = teacher_dir
  config.bags.path = os.path.join(workdir, 'bags.npz')
  config.bags.class_names = list(config.eval.class_names)
  stages = Stages({'teacher': 20, 'bags': 90, 'distil': 360, 'evaluate': 150, 'export': 15})

  # 1. Teacher: PyTorch checkpoint -> model file, through the public conversion tool.
  stages.begin('teacher: convert the PyTorch checkpoint')
  if teacher_checkpoint is None:
    teacher_checkpoint = os.path.join(workdir, 'teacher_random_r18.pth')
    if not os.path.exists(teacher_checkpoint):
      _tool('make_random_torch_checkpoint.py', '--arch', 'resnet18', '--format', 'moco',
            '--base-width', '16', '--stem', 'cifar', '--head-hidden-dim', '512', '--seed', '0',
            '--out', teacher_checkpoint)
  if not os.path.exists(os.path.join(teacher_dir, model_io.MODEL_RECORD)):
    _tool('convert_torch_teacher.py', teacher_checkpoint, teacher_dir)
  stages.end('teacher')

  # 2. Bags: teacher features + exact kNN, bag report (purity, grid).
  stages.begin('bags: teacher features and k nearest neighbours')
  if not os.path.exists(config.bags.path):
    bagging.compute_bags(config, os.path.join(workdir, 'bagging'))
  stages.end('bags')

  # 3. Distillation (resumes from train_dir if interrupted).
  stages.begin('distil: BINGO training of the student')
  summary = train.train_and_evaluate(config, train_dir)
  stages.end('distil')

  # 4. Evaluation: kNN of everything, analysis of the distilled student.
  stages.begin('evaluate: kNN (10-NN and weighted 200-NN), analysis of the student')
  rows = {}
  for label, checkpoint in (('raw pixels', 'pixels'), ('teacher', teacher_dir),
                            ('student before distillation (random init)', 'random'),
                            ('student after distillation', train_dir)):
    out = os.path.join(workdir, 'eval', label.split(' ')[0] + ('_after' if 'after' in label else
                                                                '_before' if 'before' in label
                                                                else ''))
    result_path = os.path.join(out, 'eval_knn.json')
    if os.path.exists(result_path):
      with open(result_path) as f:
        rows[label] = json.load(f)
    else:
      rows[label] = evaluate.evaluate(config, checkpoint, 'knn', out)
  analysis_dir = os.path.join(workdir, 'eval', 'student_after')
  if not os.path.exists(os.path.join(analysis_dir, 'eval_analysis.json')):
    evaluate.evaluate(config, train_dir, 'analysis', analysis_dir)
  stages.end('evaluate')

  # 5. Export the student to PyTorch (MoCo layout: main_lincls.py, detectron2 conversion).
  stages.begin('export: student -> PyTorch')
  exported = os.path.join(workdir, 'student_r18_moco.pth.tar')
  if not os.path.exists(exported):
    _tool('export_torch.py', train_dir, exported, '--format', 'moco')
  stages.end('export')

  table = {label: record['metrics'] for label, record in rows.items()}
  result = {'knn': table, 'train': summary, 'exported_student': exported,
            'teacher_checkpoint': teacher_checkpoint, 'wall_seconds': time.time() - stages.started}
  fileio.write_json_atomically(os.path.join(workdir, 'demo_summary.json'), result, default=str)
  print(format_table(table, result['wall_seconds']))
  print(f'\nWorkdir {workdir}: TensorBoard logs in train/ and eval/*/tensorboard, bag grid '
        f'and purity in bagging/, t-SNE in eval/student_after/, PyTorch student {exported}.')
  return result


def format_table(table: dict, wall_seconds: float) -> str:
  lines = ['', 'Fashion-MNIST test, kNN top-1 (%) on centre-crop pooled features',
           f'{"model":45s} {"10-NN":>8s} {"200-NN (T=0.07)":>16s}']
  for label, metrics in table.items():
    top1 = metrics.get('knn10_top1')
    weighted = metrics.get('weighted_knn200_top1')
    lines.append(f'{label:45s} {_percent(top1):>8s} {_percent(weighted):>16s}')
  lines.append(f'(wall time {wall_seconds / 60:.1f} min)')
  return '\n'.join(lines)


def _percent(value) -> str:
  return '-' if value is None else f'{float(value):.2f}'


def main(argv: Optional[list[str]] = None) -> None:
  # argparse, not absl flags: the stage modules define their own absl flags at import.
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', default='runs/demo', help='output directory (resumable)')
  parser.add_argument('--teacher', default=None,
                      help='PyTorch teacher checkpoint (MoCo / SwAV / torchvision layout); '
                      'default: a randomly initialised ResNet-18 (base width 16), MoCo layout')
  parser.add_argument('--epochs', type=int, default=None,
                      help='distillation epochs (default: configs/fmnist_demo.py)')
  parser.add_argument('--max_steps', type=int, default=None,
                      help='stop distillation after this many steps')
  args = parser.parse_args(argv)
  from absl import logging
  from bingo_jax import progress
  logging.set_verbosity(logging.INFO)  # the trainer reports progress through absl logging
  progress.quiet_library_logs()
  run(args.workdir, args.teacher, args.epochs, args.max_steps)


if __name__ == '__main__':
  main()

"""The whole BINGO flow on Fashion-MNIST, one command: the README's main job.

    python -m bingo_jax.demo --workdir runs/demo

Stages, each through the same public entry point a user would call:
  1. teacher: a PyTorch MoCo-layout checkpoint (``--teacher``; by default the committed
     ``bingo_jax/demo_data/teacher_moco_r18w16_fmnist.pth.tar``, a ResNet-18 of base width 16
     pre-trained with MoCo v2 on the Fashion-MNIST training images by
     ``configs/moco_fmnist.py``), converted by ``bingo-convert``;
  2. bags: teacher features of the first 12,800 training images + exact kNN (``bingo_jax.bagging``);
  3. distillation of a ResNet-18 (width 8) student (``bingo_jax.train``);
  4. kNN and fast linear evaluation of the raw pixels, the teacher, the student before
     (random initialisation) and after distillation, and the t-SNE / bag-distance analysis of
     the student (``bingo_jax.evaluate``);
  5. export of the student to the MoCo PyTorch layout (``bingo-export``).
It ends with a table. Every stage resumes: a rerun skips what is finished.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Optional

from absl import flags, logging

from bingo_jax.console import cli

# Installed with the package (package data).
DEFAULT_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo_data',
                               'teacher_moco_r18w16_fmnist.pth.tar')
ROWS = (('raw pixels', 'pixels', 'pixels'),
        ('teacher', 'teacher', None),
        ('student before distillation (random init)', 'random', 'student_before'),
        ('student after distillation', 'train', 'student_after'))


# The console commands the demo runs, and their modules (``python -m`` runs the same code
# without relying on the command being on the PATH).
_TOOLS = {'bingo-convert': 'bingo_jax.convert', 'bingo-export': 'bingo_jax.export'}


def _tool(command: str, *args: str) -> None:
  """Runs a console command of this package as a user would, in a new process."""
  print('$ ' + ' '.join([command] + [os.path.relpath(a) if os.path.exists(a) else a
                                     for a in args]), flush=True)
  subprocess.run([sys.executable, '-m', _TOOLS[command], *args], check=True)


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


def _demo_config(epochs: Optional[int], max_steps: Optional[int], train_split: Optional[str],
                 eval_split: Optional[str], quick_eval: bool):
  """``configs/fmnist_demo.py`` with ``run``'s overrides (see its Args)."""
  from bingo_jax.configs import eval_fmnist, fmnist_demo
  config = fmnist_demo.get_config()
  if epochs is not None:
    config.train.epochs = epochs
  config.train.max_steps = max_steps
  if train_split:
    config.data.train_split = train_split
  if eval_split:
    config.data.eval_split = eval_split
  if quick_eval:
    config.eval = eval_fmnist.get_config('quick').eval
  return config


def _evaluate_rows(config, workdir: str, checkpoints: dict) -> dict:
  """kNN and fast linear metrics of every row of ``ROWS``, keyed by the row's label.

  ``checkpoints`` maps a row's ``what`` to the ``evaluate.evaluate`` checkpoint argument; a
  protocol whose ``eval_<protocol>.json`` exists (a rerun) is read, not run again.
  """
  from bingo_jax import evaluate
  table = {}
  for label, what, name in ROWS:
    out = os.path.join(workdir, 'eval', name or what)
    metrics = {}
    for protocol in ('knn', 'linear_fast'):
      result_path = os.path.join(out, f'eval_{protocol}.json')
      if os.path.exists(result_path):
        with open(result_path) as f:
          record = json.load(f)
      else:
        record = evaluate.evaluate(config, checkpoints[what], protocol, out)
      if protocol == 'knn':
        metrics.update(record['metrics'])
      else:
        metrics['linear_fast_top1'] = record['metrics']['top1']
    table[label] = metrics
  return table


def run(workdir: str, teacher_checkpoint: Optional[str] = None, epochs: Optional[int] = None,
        max_steps: Optional[int] = None, train_split: Optional[str] = None,
        eval_split: Optional[str] = None, quick_eval: bool = False) -> dict:
  """Runs the stages; returns (and writes ``demo_summary.json``) the results.

  Args:
    workdir: output directory; a rerun resumes there.
    teacher_checkpoint: PyTorch teacher checkpoint (default ``DEFAULT_TEACHER``).
    epochs, max_steps: distillation length (default ``configs/fmnist_demo.py``).
    train_split, eval_split: Fashion-MNIST splits (TFDS slicing, e.g. ``'train[:1024]'``)
      for bagging/training/kNN bank and for evaluation; reduced runs use them.
    quick_eval: shorten the fast linear probe to 2 epochs (smoke runs).
  """
  from bingo_jax import bagging, evaluate, train
  from bingo_jax.store import fileio, model_io

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config = _demo_config(epochs, max_steps, train_split, eval_split, quick_eval)
  teacher_checkpoint = os.path.abspath(teacher_checkpoint or DEFAULT_TEACHER)
  if not os.path.isfile(teacher_checkpoint):
    raise FileNotFoundError(f'--teacher {teacher_checkpoint}: no such file (expected a PyTorch '
                            'MoCo / SwAV / torchvision checkpoint).')
  teacher_dir = os.path.join(workdir, 'teacher')
  train_dir = os.path.join(workdir, 'train')
  config.teacher.path = teacher_dir
  config.bags.path = os.path.join(workdir, 'bags.npz')
  config.bags.class_names = list(config.eval.class_names)
  stages = Stages({'teacher': 5, 'bags': 10, 'distil': 520, 'evaluate': 80, 'export': 5})

  # 1. Teacher: PyTorch checkpoint -> model file, through the public conversion tool.
  stages.begin('teacher: convert the PyTorch checkpoint')
  if not os.path.exists(os.path.join(teacher_dir, model_io.MODEL_RECORD)):
    _tool('bingo-convert', teacher_checkpoint, teacher_dir)
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

  # 4. Evaluation: kNN and fast linear of everything, analysis of the distilled student.
  stages.begin('evaluate: kNN (10-NN, weighted 200-NN) and fast linear probe')
  table = _evaluate_rows(config, workdir, {'pixels': 'pixels', 'teacher': teacher_dir,
                                           'random': 'random', 'train': train_dir})
  analysis_dir = os.path.join(workdir, 'eval', 'student_after')
  if not os.path.exists(os.path.join(analysis_dir, 'eval_analysis.json')):
    evaluate.evaluate(config, train_dir, 'analysis', analysis_dir)
  stages.end('evaluate')

  # 5. Export the student to PyTorch (MoCo layout: main_lincls.py, detectron2 conversion).
  stages.begin('export: student -> PyTorch')
  exported = os.path.join(workdir, 'student_r18w8_moco.pth.tar')
  if not os.path.exists(exported):
    _tool('bingo-export', train_dir, exported, '--format', 'moco')
  stages.end('export')

  result = {'table': table, 'train': summary, 'exported_student': exported,
            'teacher_checkpoint': teacher_checkpoint,
            'data': {'train': config.data.train_split, 'eval': config.data.eval_split},
            'wall_seconds': time.time() - stages.started}
  fileio.write_json_atomically(os.path.join(workdir, 'demo_summary.json'), result, default=str)
  print(format_table(table, result['wall_seconds']))
  print(f'\nWorkdir {workdir}: TensorBoard logs in train/ and eval/*/tensorboard, bag grid '
        f'and purity in bagging/, t-SNE in eval/student_after/, PyTorch student {exported}.')
  return result


def format_table(table: dict, wall_seconds: float) -> str:
  lines = ['', 'Fashion-MNIST test images, top-1 (%) on centre-crop pooled features',
           f'{"model":45s} {"10-NN":>7s} {"200-NN (T=0.07)":>16s} {"fast linear":>12s}']
  for label, metrics in table.items():
    lines.append(f'{label:45s} {_percent(metrics.get("knn10_top1")):>7s} '
                 f'{_percent(metrics.get("weighted_knn200_top1")):>16s} '
                 f'{_percent(metrics.get("linear_fast_top1")):>12s}')
  lines.extend(comparison(table))
  lines.append(f'(wall time {wall_seconds / 60:.1f} min)')
  return '\n'.join(lines)


_METRIC_NAMES = (('knn10_top1', '10-NN'), ('linear_fast_top1', 'fast linear'))


def comparison(table: dict) -> list[str]:
  """The distilled student against the raw pixels and the teacher, in words: one line per
  reference, with the gap in points of 10-NN and of fast linear (``table`` as
  ``format_table``'s, keyed by the labels of ``ROWS``)."""
  student = table.get(ROWS[3][0])
  if not student:
    return []
  lines = []
  for reference in (ROWS[0][0], ROWS[1][0]):
    gaps = []
    for key, name in _METRIC_NAMES:
      if student.get(key) is None or table.get(reference, {}).get(key) is None:
        continue
      gap = round(float(student[key]) - float(table[reference][key]), 2)
      gaps.append(f'{abs(gap):.2f} points {"above" if gap > 0 else "below"} on {name}'
                  if gap else f'level on {name}')
    if gaps:
      lines.append(f'Against the {reference}, the distilled student is {" and ".join(gaps)}.')
  return lines


def _percent(value) -> str:
  return '-' if value is None else f'{float(value):.2f}'


# ---------------------------------------------------------------------------------------------
# Command line

_WORKDIR = cli.shared(cli.WORKDIR)  # default runs/demo
_TEACHER = cli.shared(cli.TEACHER)  # a PyTorch checkpoint here; default DEFAULT_TEACHER
_EPOCHS = flags.DEFINE_integer('epochs', None,
                               'Distillation epochs (default: configs/fmnist_demo.py).')
_MAX_STEPS = flags.DEFINE_integer('max_steps', None,
                                  'Stop distillation after this many steps.')
_TRAIN_SPLIT = flags.DEFINE_string('train_split', None,
                                   "Training split, TFDS slicing (default 'train[:12800]').")
_EVAL_SPLIT = flags.DEFINE_string('eval_split', None, "Evaluation split (default 'test').")
_QUICK_EVAL = flags.DEFINE_bool('quick_eval', False, '2-epoch fast linear probe (smoke runs).')


def main(argv: list[str]) -> None:
  cli.no_positional_arguments(argv)
  from bingo_jax.run import progress
  logging.set_verbosity(logging.INFO)  # the trainer reports progress through absl logging
  progress.quiet_library_logs()
  run(_WORKDIR.value or 'runs/demo', _TEACHER.value, _EPOCHS.value, _MAX_STEPS.value,
      _TRAIN_SPLIT.value, _EVAL_SPLIT.value, _QUICK_EVAL.value)


def cli_main() -> None:
  """The ``bingo-demo`` console command (and ``python -m bingo_jax.demo``)."""
  cli.run(main)


if __name__ == '__main__':
  cli_main()

"""The ablation tool's ``--collect``: runs made by several invocations (one seed at a time,
other rows in other sessions) tabled together, the statistics against numpy, and nothing
trained or evaluated."""

import json
import os

import numpy as np
import pytest

import tool_runner
from bingo_jax import evaluate, train
from bingo_jax.configs import fmnist_ablation

# (row, seed) -> (10-NN, fast linear, training seconds, images/s)
RUNS = {('anchor_only', 0): (80.11, 81.02, 420.0, 290.0),
        ('anchor_only', 2): (80.73, 80.55, 450.0, 271.5),
        ('anchor_only', 1): (79.64, 81.90, 433.0, 280.0),
        ('knn', 0): (81.26, 82.00, 1100.0, 120.0),
        ('knn', 1): (80.02, 81.37, 1160.0, 118.0),
        ('knn_k10', 0): (79.00, 79.50, 1000.0, 119.0),
        ('labels', 1): (78.50, 79.25, 1200.0, 110.0)}


def _write_run(workdir, row, seed, knn, linear, seconds, speed, folder=None):
  path = os.path.join(workdir, 'runs', folder or f'{row}_s{seed}', 'result.json')
  os.makedirs(os.path.dirname(path))
  with open(path, 'w') as f:
    json.dump({'row': row, 'seed': seed, 'metrics': {'knn_top1': knn, 'linear_fast_top1': linear},
               'train_seconds': seconds, 'eval_seconds': 30.0, 'images_per_second': speed}, f)


def _write_extras(workdir):
  os.makedirs(os.path.join(workdir, 'bagging_knn'))
  with open(os.path.join(workdir, 'bagging_knn', 'bag_report.json'), 'w') as f:
    json.dump({'purity': 0.8046}, f)
  for folder, knn, linear in (('teacher', 83.83, 86.15), ('pixels', 81.18, 82.97)):
    os.makedirs(os.path.join(workdir, 'reference', folder))
    for protocol, key, value in (('knn', 'knn10_top1', knn), ('linear_fast', 'top1', linear)):
      with open(os.path.join(workdir, 'reference', folder, f'eval_{protocol}.json'), 'w') as f:
        json.dump({'metrics': {key: value}}, f)


@pytest.fixture()
def nothing_runs(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('--collect trained or evaluated')
  monkeypatch.setattr(train, 'train_and_evaluate', refuse)
  monkeypatch.setattr(evaluate, 'evaluate', refuse)


def test_collect_tables_every_finished_seed_of_the_named_rows(tmp_path, nothing_runs, capsys):
  workdir = str(tmp_path)
  for (row, seed), values in RUNS.items():
    _write_run(workdir, row, seed, *values)
  os.makedirs(tmp_path / 'runs' / 'knn_s2' / 'train')  # unfinished: no result.json
  _write_extras(workdir)
  assert tool_runner.run_tool('fmnist_ablation.py', f'--workdir={workdir}', '--collect',
                              '--rows=knn,anchor_only,moco,labels') is None
  with open(tmp_path / 'ablation.json') as f:
    table = json.load(f)
  # knn_k10 is not named, moco has no run (the markdown below keeps the named order).
  assert sorted(table['rows']) == ['anchor_only', 'knn', 'labels']
  for row, stats in table['rows'].items():
    seeds = sorted(seed for r, seed in RUNS if r == row)
    assert stats['seeds'] == seeds
    for index, metric in enumerate(('knn_top1', 'linear_fast_top1')):
      values = np.array([RUNS[row, seed][index] for seed in seeds])
      np.testing.assert_allclose(stats[metric]['values'], values)
      np.testing.assert_allclose(stats[metric]['mean'], values.mean(), rtol=1e-12)
      if len(seeds) > 1:
        np.testing.assert_allclose(stats[metric]['std'], values.std(ddof=1), rtol=1e-12)
      else:  # no spread from one seed
        assert stats[metric]['std'] is None
      assert (stats[metric]['min'], stats[metric]['max']) == (values.min(), values.max())
    minutes = np.mean([(RUNS[row, seed][2] + 30.0) / 60 for seed in seeds])
    np.testing.assert_allclose(stats['wall_minutes'], minutes, rtol=1e-12)
  assert table['bag_purity'] == {'knn': 0.8046}
  assert table['references'] == {
      'teacher (converted model file)': {'knn_top1': 83.83, 'linear_fast_top1': 86.15},
      'raw pixels (floor)': {'knn_top1': 81.18, 'linear_fast_top1': 82.97}}
  markdown = (tmp_path / 'ablation.md').read_text()
  assert markdown in capsys.readouterr().out + '\n'
  assert markdown.index('| (c) BINGO') < markdown.index('| (b) teacher parameters only')
  assert ('| (c) BINGO, kNN bags from the teacher | 0.805 | 0, 1 | 80.64 ± 0.88 (80.02-81.26) | '
          '81.69 ± 0.45 (81.37-82.00) | 19.3 |') in markdown
  # A row of one seed shows its value and its seed, no spread; a reference row has no seeds.
  assert f'| {fmnist_ablation.ROWS["labels"]} | - | 1 | 78.50 | 79.25 | 20.5 |' in markdown
  assert '| raw pixels (floor) | - | - | 81.18 | 82.97 | - |' in markdown
  # One line per run, in the named row order and by seed.
  run_lines = [line for line in markdown.splitlines() if line.startswith('| knn_s')
               or line.startswith('| anchor_only_s')]
  assert run_lines == ['| knn_s0 | 81.26 | 82.00 | 18.3 | 120 | 0.5 |',
                       '| knn_s1 | 80.02 | 81.37 | 19.3 | 118 | 0.5 |',
                       '| anchor_only_s0 | 80.11 | 81.02 | 7.0 | 290 | 0.5 |',
                       '| anchor_only_s1 | 79.64 | 81.90 | 7.2 | 280 | 0.5 |',
                       '| anchor_only_s2 | 80.73 | 80.55 | 7.5 | 272 | 0.5 |']


def test_collect_refuses_an_empty_workdir_and_a_misfiled_run(tmp_path, nothing_runs):
  workdir = str(tmp_path)
  with pytest.raises(SystemExit, match='no finished run of knn'):
    tool_runner.run_tool('fmnist_ablation.py', f'--workdir={workdir}', '--collect', '--rows=knn')
  _write_run(workdir, 'knn', 1, 80.0, 81.0, 60.0, 100.0, folder='knn_s0')
  with pytest.raises(ValueError, match=r'knn_s0/result.json: records row .knn. seed 1'):
    tool_runner.run_tool('fmnist_ablation.py', f'--workdir={workdir}', '--collect', '--rows=knn')


def test_training_still_needs_the_teacher(tmp_path, nothing_runs):
  with pytest.raises(SystemExit, match='--teacher: required'):
    tool_runner.run_tool('fmnist_ablation.py', f'--workdir={tmp_path}', '--rows=knn')

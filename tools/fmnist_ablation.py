"""Runs the Fashion-MNIST ablation (paper Tables 7/8) and writes its table.

  python -m tools.fmnist_ablation --teacher runs/demo/teacher --workdir runs/ablation

For each row of ``configs/fmnist_ablation.py`` and each seed: distil
(``bingo_jax.train``), then evaluate the student with 10-NN and the fast linear probe
(``bingo_jax.evaluate``). The default rows are moco, anchor_only, knn, labels, random,
paper_eq8 (``ROW_ORDER``); ``--rows`` names others, ``EXTRA_ROWS``: the Table 9 baselines
(``--rows kd,rkd``), the relation-only rows (``relation_knn,relation_labels,relation_random``),
the Fig. 3 k sweep (``--rows knn_k1,knn,knn_k10,knn_k20``), the Table 7 supervised-network
bags (``--rows supervised``) and the student relation (``student_relation``,
``student_relation_teacher``: bags from the student, no bag file). The bag files are made once, by ``bingo_jax.bagging`` with the
teacher (knn, for each k), the labels, a randomly initialised network of the teacher's
architecture, and the supervised network (``--supervised_teacher``, or the teacher fine-tuned
on the labels by the tool, once). Every run records its wall times. The seed changes the
student's initialisation, the data order, the augmentations and CutMix. The bags and the
evaluation (probe initialisation, batch order) stay fixed.

Outputs in the workdir:
  bags_<name>.npz          each bag file (``fmnist_ablation.BAGS``: knn, labels, random-teacher,
                           knn_k1, knn_k10, knn_k20, supervised), method and k set by name;
  bagging_<name>/          bag report (purity, grid) of each bag file;
  supervised_teacher/      the supervised network (model/) and its fine-tuning record
                           (eval_finetune.json), for the supervised row;
  runs/<row>_s<seed>/      the run's training workdir (train/), evaluation (eval/) and
                           result.json; a finished run is skipped on a rerun;
  reference/               kNN and fast linear of the teacher, the random student and the pixels
                           (not with --skip_references);
  ablation.json, ablation.md   mean, sample standard deviation and range over the seeds.
The rows run in one process one after another (an interrupted table resumes at the first
unfinished run). The XLA compilation cache is kept in the workdir, so the runs after the
first reuse the compiled programs.

Runs spread over several invocations (``--seeds 0``, later ``--seeds 1,2``, or rows run in
other sessions) are tabled together by ``--collect``: it trains and evaluates nothing, and
writes ablation.json / ablation.md from every finished run of the named rows in the workdir,
whatever its seed, with one line per run (accuracies, training minutes, images/s). The bag
purities and the reference rows are read where an earlier invocation wrote them.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from typing import Optional

from absl import app, flags

from bingo_jax.console import cli

ROW_ORDER = ('moco', 'anchor_only', 'knn', 'labels', 'random', 'paper_eq8')
# Rows run only when --rows names them (the default table keeps its six rows and its length):
# the Table 9 baselines, teacher relation only, the Fig. 3 bag sizes (knn is k = 5), the
# Table 7 supervised-network bags, the student relation and the control of (f).
EXTRA_ROWS = ('kd', 'rkd', 'relation_knn', 'relation_labels', 'relation_random', 'knn_k1',
              'knn_k10', 'knn_k20', 'supervised', 'student_relation', 'student_relation_teacher',
              'paper_eq8_self')
METRICS = (('knn10_top1', 'knn', '10-NN top-1'), ('top1', 'linear_fast', 'fast linear top-1'))

_TEACHER = cli.shared(cli.TEACHER)  # required: the converted teacher model file
_WORKDIR = cli.shared(cli.WORKDIR)  # required; resumable
_ROWS = flags.DEFINE_list('rows', list(ROW_ORDER), 'Rows of configs/fmnist_ablation.py.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds.')
_SET = flags.DEFINE_multi_string('set', [], 'Config override for every row, KEY=VALUE, e.g. '
                                 'train.epochs=3 (repeatable).')
_SUPERVISED_TEACHER = flags.DEFINE_string(
    'supervised_teacher', None, 'Model file of the supervised network that bags the '
    '"supervised" row; default: the teacher fine-tuned on the labels, made once in '
    'WORKDIR/supervised_teacher/.')
_SKIP_REFERENCES = flags.DEFINE_bool('skip_references', False,
                                     'Do not evaluate the teacher and the random student.')
_COLLECT = flags.DEFINE_bool(
    'collect', False, 'Train and evaluate nothing: table every finished run of --rows in the '
    'workdir, whatever its seed (--seeds and --teacher are not read).')
REFERENCES = (('teacher', 'teacher (converted model file)'),
              ('random', 'student architecture, random init (floor)'),
              ('pixels', 'raw pixels (floor)'),
              ('supervised', 'supervised network (bags of the supervised row)'))


def _override(config, assignment: str) -> None:
  """Applies ``a.b.c=value`` to ``config`` (the value parsed as JSON when it parses)."""
  key, sep, text = assignment.partition('=')
  if not sep:
    raise ValueError(f'--set {assignment!r}: expected KEY=VALUE.')
  *parents, leaf = key.split('.')
  node = config
  for part in parents:
    if part not in node:
      raise ValueError(f'--set {assignment!r}: config has no section {part!r}.')
    node = node[part]
  if leaf not in node:
    raise ValueError(f'--set {assignment!r}: config has no key {key!r}.')
  try:
    value = json.loads(text)
  except json.JSONDecodeError:
    value = text
  node[leaf] = value


def row_config(row: str, seed: int, teacher: str, bag_paths: dict, overrides: list):
  """The config of one run: ``configs/fmnist_ablation.py:<row>`` with seed, teacher, bags."""
  from bingo_jax.configs import fmnist_ablation
  config = fmnist_ablation.get_config(row)
  for assignment in overrides:
    _override(config, assignment)
  config.train.seed = seed
  # MoCo rows train without the teacher network (the relation rows need it only for bags).
  config.teacher.path = None if row in fmnist_ablation.MOCO_ROWS else teacher
  bag = fmnist_ablation.ROW_BAGS[row]
  config.bags.path = bag_paths.get(bag) if bag else None
  config.bags.class_names = list(config.eval.class_names)
  return config


def make_bags(bag: str, teacher: str, workdir: str, overrides: list,
              bag_teacher: Optional[str] = None) -> tuple[str, float]:
  """Bag file ``bag`` of ``fmnist_ablation.BAGS`` (made once), ``WORKDIR/bags_<bag>.npz``, its
  report in ``WORKDIR/bagging_<bag>/``; returns (path, purity).

  The method and k are the bag's (``BAGS``); ``bag_teacher`` is the model file whose features
  are bagged instead of the teacher's (the supervised network). The kNN bags of the teacher
  share one feature pass, that of ``knn`` (``bagging_knn/features``): only k differs.
  """
  from bingo_jax import bagging
  from bingo_jax.configs import fmnist_ablation
  row = next(r for r, name in fmnist_ablation.ROW_BAGS.items() if name == bag)
  path = os.path.join(workdir, f'bags_{bag}.npz')
  config = row_config(row, 0, teacher, {}, overrides)
  config.teacher.path = teacher  # the bagging network, whatever the row trains with
  config.bags.path = path
  config.bags.method, config.bags.k = fmnist_ablation.BAGS[bag]
  if bag_teacher:
    config.teacher.path = bag_teacher
  elif config.bags.method == 'knn' and bag != 'knn':
    config.bags.features_dir = os.path.join(workdir, 'bagging_knn', 'features')
  report_dir = os.path.join(workdir, f'bagging_{bag}')
  report_path = os.path.join(report_dir, 'bag_report.json')
  if not (os.path.exists(path) and os.path.exists(report_path)):
    bagging.compute_bags(config, report_dir)
  return path, read_purity(report_path)


def read_purity(report_path: str) -> Optional[float]:
  """A bag report's purity; None where every bag is empty (the ``self`` control)."""
  with open(report_path) as f:
    purity = json.load(f)['purity']
  return None if purity is None else float(purity)


def make_supervised_teacher(teacher: str, workdir: str, overrides: list) -> str:
  """The supervised network of the ``supervised`` row (made once): the teacher fine-tuned on
  every labelled training image (the row's eval settings,
  ``fmnist_ablation.supervised_teacher_config``), written by the ``finetune`` protocol to
  ``WORKDIR/supervised_teacher/model``; returns that path."""
  from bingo_jax import evaluate
  out = os.path.join(workdir, 'supervised_teacher')
  path = os.path.join(out, 'model')
  if not os.path.exists(path):  # written atomically: present means finished
    config = row_config('supervised', 0, teacher, {}, overrides)
    config.eval.finetune_export = path
    evaluate.evaluate(config, teacher, 'finetune', out)
  return path


def check_overrides(overrides: list) -> None:
  """Refuses ``--set`` of the bag method or k: every bag file is named by its row's bags
  (``bags_<name>.npz``), so a table-wide k would make another file under the same name.
  The k sweep is the rows ``knn_k1``, ``knn`` (k = 5), ``knn_k10``, ``knn_k20``."""
  for assignment in overrides:
    key = assignment.partition('=')[0].strip()
    if key in ('bags.k', 'bags.method', 'bags.path'):
      raise SystemExit(f'--set {assignment!r}: the bags are set per row (fmnist_ablation.BAGS);'
                       ' for other k use the rows knn_k1, knn, knn_k10, knn_k20.')


def evaluate_both(config, checkpoint: str, out: str) -> dict:
  """10-NN and fast-linear top-1 of ``checkpoint`` (cached results are reused)."""
  from bingo_jax import evaluate
  metrics = {}
  for key, protocol, _ in METRICS:
    path = os.path.join(out, f'eval_{protocol}.json')
    if os.path.exists(path):
      metrics[f'{protocol}_top1'] = read_top1(path, key)
    else:
      record = evaluate.evaluate(config, checkpoint, protocol, out)
      metrics[f'{protocol}_top1'] = float(record['metrics'][key])
  return metrics


def read_top1(eval_path: str, key: str) -> float:
  """The metric ``key`` of an evaluation record that ``bingo_jax.evaluate`` wrote."""
  with open(eval_path) as f:
    return float(json.load(f)['metrics'][key])


def run_one(row: str, seed: int, teacher: str, bag_paths: dict, workdir: str,
            overrides: list) -> dict:
  """Trains and evaluates one (row, seed); returns (and writes) its result record."""
  from bingo_jax import train
  from bingo_jax.store import fileio
  run_dir = os.path.join(workdir, 'runs', f'{row}_s{seed}')
  result_path = os.path.join(run_dir, 'result.json')
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  config = row_config(row, seed, teacher, bag_paths, overrides)
  started = time.time()
  summary = train.train_and_evaluate(config, os.path.join(run_dir, 'train'))
  trained = time.time()
  metrics = evaluate_both(config, os.path.join(run_dir, 'train'), os.path.join(run_dir, 'eval'))
  result = {'row': row, 'seed': seed, 'metrics': metrics,
            'train_seconds': trained - started, 'eval_seconds': time.time() - trained,
            'images_per_second': summary.get('images_per_second'),
            'steps': summary.get('step'), 'final_train_metrics': summary.get('final_metrics'),
            'bags': config.bags.path, 'config': json.loads(config.to_json_best_effort())}
  fileio.write_json_atomically(result_path, result, default=str)
  return result


def summarise(results: list[dict]) -> dict:
  """Mean, sample standard deviation, min and max of each metric over a row's seeds."""
  out = {}
  for metric in ('knn_top1', 'linear_fast_top1'):
    values = [r['metrics'][metric] for r in results]
    out[metric] = {'mean': statistics.fmean(values),
                   'std': statistics.stdev(values) if len(values) > 1 else None,
                   'min': min(values), 'max': max(values), 'values': values}
  out['seeds'] = [r['seed'] for r in results]
  out['wall_minutes'] = statistics.fmean(
      (r['train_seconds'] + r['eval_seconds']) / 60 for r in results)
  return out


def format_markdown(table: dict, references: dict, purities: dict, hardware: str) -> str:
  """The summary table: per row its bag purity, seeds, 10-NN and fast linear (mean ± sample
  standard deviation (min-max) over its seeds; the value alone for a row of one seed) and
  minutes per run; then the reference rows."""
  from bingo_jax.configs import fmnist_ablation
  lines = [f'Hardware: {hardware}.', '',
           '| row | bag purity | seeds | 10-NN top-1 (%) | fast linear top-1 (%) | '
           'minutes per run |',
           '|---|---|---|---|---|---|']
  for row, stats in table.items():
    bag = fmnist_ablation.ROW_BAGS[row]
    purity = f'{purities[bag]:.3f}' if purities.get(bag) is not None else '-'
    seeds = ', '.join(str(seed) for seed in stats['seeds'])
    cells = [f'{stats[m]["mean"]:.2f}' if len(stats['seeds']) == 1 else
             f'{stats[m]["mean"]:.2f} ± {stats[m]["std"]:.2f} '
             f'({stats[m]["min"]:.2f}-{stats[m]["max"]:.2f})'
             for m in ('knn_top1', 'linear_fast_top1')]
    lines.append(f'| {fmnist_ablation.ROWS[row]} | {purity} | {seeds} | {cells[0]} | {cells[1]} | '
                 f'{stats["wall_minutes"]:.1f} |')
  for name, metrics in references.items():
    lines.append(f'| {name} | - | - | {metrics["knn_top1"]:.2f} | '
                 f'{metrics["linear_fast_top1"]:.2f} | - |')
  lines += ['', 'Mean ± sample standard deviation (min-max) over the seeds of each row; a row of '
            'one seed shows its value.']
  return '\n'.join(lines)


def format_runs(results: dict[str, list[dict]]) -> str:
  """One markdown line per run: accuracies, training and evaluation minutes, images/s."""
  lines = ['| run | 10-NN | fast linear | training (min) | img/s | evaluation (min) |',
           '|---|---|---|---|---|---|']
  for row, runs in results.items():
    for r in runs:
      speed = r.get('images_per_second')
      lines.append(f'| {row}_s{r["seed"]} | {r["metrics"]["knn_top1"]:.2f} | '
                   f'{r["metrics"]["linear_fast_top1"]:.2f} | {r["train_seconds"] / 60:.1f} | '
                   f'{"-" if speed is None else f"{speed:.0f}"} | {r["eval_seconds"] / 60:.1f} |')
  return '\n'.join(lines)


def collect(workdir: str, rows: list[str]) -> dict[str, list[dict]]:
  """The finished runs (``runs/<row>_s<seed>/result.json``) of ``rows`` in ``workdir``, by
  row in the order of ``rows``, each row's by seed; rows without a finished run are left out."""
  found = {}
  runs_dir = os.path.join(workdir, 'runs')
  for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
    match = re.fullmatch(r'(.+)_s(\d+)', name)
    path = os.path.join(runs_dir, name, 'result.json')
    if match and match.group(1) in rows and os.path.exists(path):
      with open(path) as f:
        record = json.load(f)
      if record.get('row') != match.group(1) or record.get('seed') != int(match.group(2)):
        raise ValueError(f'{path}: records row {record.get("row")!r} seed {record.get("seed")!r}, '
                         f'not those of its folder {name!r}.')
      found.setdefault(match.group(1), []).append(record)
  return {row: sorted(found[row], key=lambda r: r['seed']) for row in rows if row in found}


def collected_extras(workdir: str) -> tuple[dict, dict]:
  """The bag purities (``bagging_<bag>/bag_report.json``) and reference rows
  (``reference/<name>/eval_*.json``) that earlier invocations wrote to ``workdir``."""
  from bingo_jax.configs import fmnist_ablation
  purities = {}
  for bag in fmnist_ablation.BAGS:
    path = os.path.join(workdir, f'bagging_{bag}', 'bag_report.json')
    if os.path.exists(path):
      purities[bag] = read_purity(path)
  references = {}
  for folder, name in REFERENCES:
    paths = [os.path.join(workdir, 'reference', folder, f'eval_{protocol}.json')
             for _, protocol, _ in METRICS]
    if all(os.path.exists(path) for path in paths):
      references[name] = {f'{protocol}_top1': read_top1(path, key)
                          for (key, protocol, _), path in zip(METRICS, paths)}
  return purities, references


def write_table(workdir: str, results: dict[str, list[dict]], references: dict, purities: dict,
                overrides: list) -> None:
  """Writes ablation.json and ablation.md (the summary table, then one line per run) and
  prints the markdown."""
  from bingo_jax.store import fileio
  table = {row: summarise(runs) for row, runs in results.items()}
  hardware = f'{platform.machine()}, {os.cpu_count()} CPU cores, JAX on ' + (
      __import__('jax').devices()[0].device_kind)
  markdown = (format_markdown(table, references, purities, hardware) + '\n\n'
              + format_runs(results))
  fileio.write_json_atomically(os.path.join(workdir, 'ablation.json'),
                               {'rows': table, 'references': references,
                                'bag_purity': purities, 'overrides': overrides,
                                'hardware': hardware}, default=str)
  fileio.write_text_atomically(os.path.join(workdir, 'ablation.md'), markdown + '\n')
  print('\n' + markdown)


def main(argv: list[str]) -> None:
  cli.no_positional_arguments(argv)
  from bingo_jax.configs import fmnist_ablation
  rows = [row.strip() for row in _ROWS.value if row.strip()]
  unknown = [row for row in rows if row not in fmnist_ablation.ROWS]
  if unknown:
    raise SystemExit(f'--rows: unknown {unknown}; known: {", ".join(fmnist_ablation.ROWS)}.')
  workdir = os.path.abspath(_WORKDIR.value)
  if _COLLECT.value:
    results = collect(workdir, rows)
    if not results:
      raise SystemExit(f'--collect: no finished run of {", ".join(rows)} in {workdir}/runs.')
    purities, references = collected_extras(workdir)
    write_table(workdir, results, references, purities, _SET.value)
    return
  if not _TEACHER.value:
    raise SystemExit('--teacher: required (the converted teacher model file), except with '
                     '--collect.')
  os.makedirs(workdir, exist_ok=True)
  # Each run builds the same programs again; the persistent cache compiles them once (set
  # through jax.config: jax, imported with the flags, has read its environment already).
  import jax
  jax.config.update('jax_compilation_cache_dir', os.environ.get(
      'JAX_COMPILATION_CACHE_DIR', os.path.join(workdir, 'xla_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', float(os.environ.get(
      'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')))
  from absl import logging

  from bingo_jax.run import progress
  logging.set_verbosity(logging.INFO)
  progress.quiet_library_logs()

  seeds = [int(seed) for seed in _SEEDS.value]
  teacher = os.path.abspath(_TEACHER.value)

  check_overrides(_SET.value)
  # The teacher's k = 5 bags first: the other kNN bags read its feature pass.
  bags = sorted({fmnist_ablation.ROW_BAGS[row] for row in rows} - {None},
                key=lambda name: (name != 'knn', name))
  supervised = None
  if set(bags) & set(fmnist_ablation.SUPERVISED_BAGS):
    supervised = (os.path.abspath(_SUPERVISED_TEACHER.value) if _SUPERVISED_TEACHER.value else
                  make_supervised_teacher(teacher, workdir, _SET.value))
  bag_paths, purities = {}, {}
  for bag in bags:
    bag_paths[bag], purities[bag] = make_bags(
        bag, teacher, workdir, _SET.value,
        supervised if bag in fmnist_ablation.SUPERVISED_BAGS else None)

  results = {}
  for row in rows:
    results[row] = []
    for seed in seeds:
      print(f'\n=== ablation: {fmnist_ablation.ROWS[row]}, seed {seed}', flush=True)
      results[row].append(run_one(row, seed, teacher, bag_paths, workdir, _SET.value))
  references = {}
  if not _SKIP_REFERENCES.value:
    reference_config = row_config('knn', 0, teacher, bag_paths, _SET.value)
    models = {'teacher': teacher, 'random': 'random', 'pixels': 'pixels',
              'supervised': supervised}
    references = {name: evaluate_both(reference_config, models[folder],
                                      os.path.join(workdir, 'reference', folder))
                  for folder, name in REFERENCES if models[folder]}
  write_table(workdir, results, references, purities, _SET.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])  # --teacher too, except with --collect
  app.run(main)

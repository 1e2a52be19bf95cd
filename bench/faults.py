r"""Fault injection: kill a tiny training run at random moments, resume it, compare bit for bit.

  python -m bench.faults [--trials 20] [--seed 0] [--parallel 1] [--workdir /tmp/bingo_faults]

Each trial starts ``python -m bingo_jax.train`` (the tiny test set-up: 48 random 32 px images,
ResNet-18 of width 8, 12 steps, checkpoints every 2 steps, 2 kept) in a fresh workdir, sends it
SIGKILL, SIGTERM or SIGINT after a random delay (uniform over the duration of an undisturbed
run, start-up and compilation included, so the moment falls anywhere: imports, restore,
compilation, a step, a checkpoint save; a run that ends before its signal is started again
with half the delay), then reruns the same command until it exits 0. The
final checkpoint must equal the undisturbed run's, every array bit for bit. The table gives,
per trial, the signal, the delay, the last step the killed run logged ('start-up' before
its first), the killed run's exit status (75: saved and stopped, a
negative number: killed by that signal), the last checkpoint it left, the reruns needed and
the verdict. docs/reliability.md quotes the result.

``--parallel N`` runs N trials at once (and times N undisturbed runs at once, so that the
delays still cover a whole run under that load). Too slow for the test suite: a trial costs
one to two runs, minutes each on a loaded 2-core machine.
"""

from __future__ import annotations

import concurrent.futures
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NUM_IMAGES = 48
TEACHER = dict(arch='resnet18', head='moco', base_width=8, stem='cifar', head_hidden_dim=32,
               head_output_dim=16)
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)


def make_inputs(root: str) -> dict:
  """Images, bags and a random teacher, as tests/test_train.py makes them."""
  import jax  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from bingo_jax import bag_file, data_sources, model_io  # pylint: disable=import-outside-toplevel
  from bingo_jax.models import create_model, init_variables  # pylint: disable=import-outside-toplevel
  from bingo_jax.configs import tiny_test  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, 'images'), exist_ok=True)
  lines = []
  for i in range(NUM_IMAGES):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        os.path.join(root, 'images', f'{i:03d}.png'))
    lines.append(f'images/{i:03d}.png {i % 4}')
  with open(os.path.join(root, 'images.txt'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  paths = {'images': os.path.join(root, 'images.txt'), 'bags': os.path.join(root, 'bags.npz'),
           'teacher': os.path.join(root, 'teacher'), 'root': root}
  config = tiny_test.get_config()
  config.data.path = paths['images']
  source = data_sources.make_source(config.data, 'train')
  neighbours = np.stack([rng.choice(np.delete(np.arange(NUM_IMAGES), i), 3, replace=False)
                         for i in range(NUM_IMAGES)])
  bag_file.save_bags(paths['bags'], bag_file.Bags.from_neighbors(
      neighbours, method='knn', fingerprint=source.fingerprint))
  if not os.path.exists(paths['teacher']):
    model_io.save_model(paths['teacher'], TEACHER,
                        init_variables(create_model(**TEACHER), jax.random.key(7), 32))
  return paths


def command(paths: dict, workdir: str) -> list:
  return [sys.executable, '-m', 'bingo_jax.train', '--config', 'tiny_test',
          '--workdir', workdir, f'--config.teacher.path={paths["teacher"]}',
          f'--config.data.path={paths["images"]}', f'--config.bags.path={paths["bags"]}',
          '--config.train.epochs=4']


def environment(paths: dict) -> dict:
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
              JAX_COMPILATION_CACHE_DIR=os.path.join(paths['root'], 'jax_cache'),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1', TF_CPP_MIN_LOG_LEVEL='2',
              PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))


def run(paths: dict, workdir: str, kill_after: float = None, signum: int = None
        ) -> tuple[int, str]:
  process = subprocess.Popen(command(paths, workdir), cwd=REPO, env=environment(paths),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  if kill_after is not None:
    try:  # reads the log meanwhile: a full pipe must not stall the run
      _, stderr = process.communicate(timeout=kill_after)
      return process.returncode, stderr
    except subprocess.TimeoutExpired:
      process.send_signal(signum)
  _, stderr = process.communicate(timeout=1800)
  return process.returncode, stderr


def final_state(workdir: str) -> tuple[int, dict]:
  import jax  # pylint: disable=import-outside-toplevel
  from bingo_jax import checkpointing  # pylint: disable=import-outside-toplevel
  checkpointer = checkpointing.TrainCheckpointer(workdir, keep=1, read_only=True)
  step = checkpointer.latest_step()
  stored = checkpointer.restore_arrays(step)
  checkpointer.close()
  return step, {jax.tree_util.keystr(p): np.asarray(x)
                for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}


def last_logged_step(stderr: str) -> str:
  """Where the killed run was: 'start-up' before its first step's log line, else 'step N'."""
  steps = re.findall(r'\[step (\d+)/\d+', stderr)
  return f'step {steps[-1]}' if steps else 'start-up'


def saved_steps(workdir: str) -> list:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def trial_result(paths: dict, workdir: str, signum: int, delay: float, reference_step: int,
                 reference: dict, state_lock: threading.Lock) -> tuple[bool, str]:
  """One trial: kill at ``delay`` with ``signum`` (halved while the run ends first), rerun
  until done, compare; returns (same, row)."""
  for attempt in range(4):
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.time()
    rc, killed_log = run(paths, workdir, kill_after=delay / 2**attempt, signum=signum)
    if not (rc == 0 and time.time() - start < delay / 2**attempt):
      break
    # The run ended before the signal (it went faster than the timed one): no fault was
    # tried. Again, with half the delay.
  delay /= 2**attempt
  left = saved_steps(workdir)
  logs = [killed_log]
  reruns, rerun_rc, stderr = 0, rc, killed_log
  while rerun_rc != 0 and reruns < 3:
    reruns += 1
    rerun_rc, stderr = run(paths, workdir)
    logs.append(stderr)
  same = False
  if rerun_rc != 0:
    result = f'FAILED to finish (rc {rerun_rc}): {stderr.strip().splitlines()[-1][:120]}'
  else:
    with state_lock:  # one restore at a time in this process
      step, state = final_state(workdir)
    same = step == reference_step and sorted(state) == sorted(reference) and all(
        np.array_equal(state[k], v) for k, v in reference.items())
    result = 'bit-identical' if same else f'DIFFERENT (step {step})'
  row = (f'{signal.Signals(signum).name:>8} {delay:>8.1f} {last_logged_step(killed_log):>9} '
         f'{rc:>4} {(max(left) if left else "-")!s:>5} {reruns:>6}  {result}')
  if same:
    shutil.rmtree(workdir, ignore_errors=True)
  else:  # kept for diagnosis, with every run's log
    os.makedirs(workdir, exist_ok=True)
    for i, log in enumerate(logs):
      with open(os.path.join(workdir, f'run{i}.log'), 'w') as f:
        f.write(log)
    row += f'\n      kept {workdir} (run*.log: the killed run, then each rerun)'
  return same, row


_TRIALS = flags.DEFINE_integer('trials', 20, 'Kill-and-resume trials.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the signals and delays.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Trials run at once (the undisturbed run is '
                                 'timed as often at once, so the kill moments still spread '
                                 'over a whole run).')
_WORKDIR = flags.DEFINE_string('workdir', os.path.join(tempfile.gettempdir(), 'bingo_faults'),
                               'Scratch directory (inputs, runs).')


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  print(f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} on {platform.node()} '
        f'({os.cpu_count()} CPUs): python -m bench.faults --trials {_TRIALS.value} '
        f'--seed {_SEED.value} --parallel {_PARALLEL.value}', flush=True)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  paths = make_inputs(os.path.join(_WORKDIR.value, 'inputs'))
  cache = os.path.join(paths['root'], 'jax_cache')
  if not (os.path.isdir(cache) and os.listdir(cache)):
    warm_up = os.path.join(_WORKDIR.value, 'warm_up')
    shutil.rmtree(warm_up, ignore_errors=True)
    run(paths, warm_up)  # fills the compilation cache
    shutil.rmtree(warm_up)

  # The undisturbed run, --parallel copies at once: its duration under the trials' load, and
  # the copies must agree bit for bit.
  def undisturbed(i: int) -> tuple[float, str]:
    directory = os.path.join(_WORKDIR.value, f'reference{i}')
    shutil.rmtree(directory, ignore_errors=True)
    start = time.time()
    rc, stderr = run(paths, directory)
    assert rc == 0, stderr[-3000:]
    return time.time() - start, directory

  with concurrent.futures.ThreadPoolExecutor(_PARALLEL.value) as pool:
    references = list(pool.map(undisturbed, range(_PARALLEL.value)))
  duration = sum(d for d, _ in references) / len(references)
  reference_step, reference = final_state(references[0][1])
  for _, directory in references[1:]:
    step, state = final_state(directory)
    assert step == reference_step and all(np.array_equal(state[k], v)
                                          for k, v in reference.items()), directory
  print(f'undisturbed run ({_PARALLEL.value} at once, identical): {duration:.1f} s to step '
        f'{reference_step}; load average {os.getloadavg()[0]:.2f}', flush=True)

  rng = random.Random(_SEED.value)
  plan = [(trial, rng.choice(SIGNALS)) for trial in range(1, _TRIALS.value + 1)]
  plan = [(trial, signum, rng.uniform(0.0, duration)) for trial, signum in plan]
  header = (f'{"trial":>5} {"signal":>8} {"delay s":>8} {"logged":>9} {"rc":>4} {"left":>5} '
            f'{"reruns":>6}  result')
  print(header)
  print('-' * len(header), flush=True)
  state_lock = threading.Lock()
  with concurrent.futures.ThreadPoolExecutor(_PARALLEL.value) as pool:
    futures = {pool.submit(trial_result, paths, os.path.join(_WORKDIR.value, f'trial{t:02d}'),
                           signum, delay, reference_step, reference, state_lock): t
               for t, signum, delay in plan}
    rows = {}
    for future in concurrent.futures.as_completed(futures):
      same, row = future.result()
      rows[futures[future]] = (same, row)
      print(f'{futures[future]:>5} {row}', flush=True)  # in the order they finish
  identical = sum(same for same, _ in rows.values())
  print('\nBy trial:')
  print(header)
  for trial in sorted(rows):
    print(f'{trial:>5} {rows[trial][1]}')
  by_signal = {}
  for trial, signum, _ in plan:
    counts = by_signal.setdefault(signal.Signals(signum).name, [0, 0])
    counts[0] += 1
    counts[1] += rows[trial][0]
  print('By signal: ' + ', '.join(f'{name} {ok}/{n}' for name, (n, ok) in sorted(
      by_signal.items())))
  print(f'{identical}/{_TRIALS.value} resumed runs bit-identical to the undisturbed run; '
        f'load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} '
        f'{os.getloadavg()[2]:.2f}; {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}')
  return 0 if identical == _TRIALS.value else 1


if __name__ == '__main__':
  app.run(main)

r"""Fault injection: kill a tiny training run at chosen moments, resume it, compare bit for bit.

  python -m bench.faults [--trials 20] [--seed 0] [--parallel 1] [--workdir /tmp/bingo_faults]

Each trial starts ``python -m bingo_jax.train`` on the tiny run of the tests
(``bingo_jax.testing.tiny_run``: 48 random 32 px images, ResNet-18 of width 8, 12 steps,
checkpoints every 2 steps, 2 kept) in a fresh workdir and sends it SIGKILL, SIGTERM or SIGINT
at a moment taken from the run's own progress, not from the clock:

- ``start-up``: a random delay into start-up (imports, restore, compilation), drawn uniformly
  over the undisturbed run's time to its first step line; if the first step line comes first,
  the signal goes at that line (the row says so);
- ``step N``: as soon as the run has logged step N (the log is read as it streams);
- ``save S``: while the asynchronous save of step S is being written: when orbax's
  temporary directory ``checkpoints/S.orbax-checkpoint-tmp`` appears, plus a random 0-200 ms
  (a save of the tiny state takes 0.2-0.5 s; the row says whether the directory was still
  there when the signal went).

N and S are uniform over the steps (S over the saved ones) for SIGKILL, and up to step 10 for
SIGTERM and SIGINT: after the last step these let the run finish its final save and exit 0,
with nothing to resume. The (signal, moment kind) pairs are dealt in shuffled rounds of all
nine, so 20 trials cover each pair at least twice. Then the same command is rerun until it
exits 0 (at most 3 times), and its final checkpoint must equal the undisturbed run's, every
array bit for bit. A trial is a *real fault* when the signal reached the running run and
changed how it ended (killed, or saved and stopped with 75; exit 0 only for a signal after
the last step); the summary counts the trials that were not. The table gives, per trial, the
signal, the moment, the last step logged when the signal went / by the end of the killed run
(0: start-up), its exit status (75: saved and stopped; a negative number: killed by that
signal), the last checkpoint it left, the reruns and the verdict. docs/reliability.md quotes
the result.

``--parallel N`` runs N trials at once (the undisturbed run is run N times at once, to time
the start-up under that load and to check that the copies agree). Too slow for the test
suite: a trial costs one to two runs, a minute or more each on a loaded 2-core machine.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
from absl import app, flags, logging

from bingo_jax import testing
from bingo_jax.testing import tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
KINDS = ('start-up', 'step', 'save')
TOTAL_STEPS = 12           # tiny_run.EPOCHS = 4 of 48 images at batch 16
SAVE_EVERY = 2             # tiny_test's train.checkpoint_every_steps
STEP_LINE = re.compile(r'\[step (\d+)/\d+')
POLL_SECONDS = 0.003


def command(inputs: dict, workdir: str) -> list:
  return tiny_run.train_command(inputs, workdir)


class Run:
  """A training subprocess whose log is read as it streams (a full pipe must not stall it).

  ``last_step`` is the last step line's step (0 before the first), ``first_step_seconds`` the
  time from the start to that first line.
  """

  def __init__(self, inputs: dict, workdir: str):
    self.workdir = workdir
    self.start = time.time()
    self.process = subprocess.Popen(command(inputs, workdir), cwd=REPO,
                                    env=tiny_run.environment(inputs), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, bufsize=1)
    self.lines: list[str] = []
    self.last_step = 0
    self.first_step_seconds = None
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    for line in self.process.stderr:
      self.lines.append(line)
      match = STEP_LINE.search(line)
      if match:
        if self.first_step_seconds is None:
          self.first_step_seconds = time.time() - self.start
        self.last_step = int(match.group(1))

  def wait(self, timeout: float = 1800) -> tuple[int, str]:
    rc = self.process.wait(timeout=timeout)
    self._reader.join(timeout=60)
    return rc, ''.join(self.lines)

  def temporary_saves(self, step: int) -> list:
    return glob.glob(os.path.join(self.workdir, 'checkpoints',
                                  f'{step}.orbax-checkpoint-tmp*'))


def run_to_end(inputs: dict, workdir: str) -> tuple[int, str, Run]:
  run = Run(inputs, workdir)
  rc, log = run.wait()
  return rc, log, run


def wait_for_moment(run: Run, kind: str, value: float, jitter: float) -> tuple[bool, str]:
  """Waits for the trial's moment; returns (reached while running, what happened)."""
  while run.process.poll() is None:
    if kind == 'start-up':
      if run.last_step >= 1:
        return True, 'start-up overran: at step 1 line'
      if time.time() - run.start >= value:
        return True, f'start-up {value:.1f} s'
    elif kind == 'step' and run.last_step >= value:
      return True, f'step {int(value)} line'
    elif kind == 'save' and run.temporary_saves(int(value)):
      time.sleep(jitter)
      still = 'mid-save' if run.temporary_saves(int(value)) else 'save done'
      return True, f'save {int(value)} +{jitter * 1000:.0f} ms ({still})'
    elif kind == 'save' and os.path.isdir(os.path.join(run.workdir, 'checkpoints',
                                                      str(int(value)))):
      return True, f'save {int(value)} (missed: done)'
    time.sleep(POLL_SECONDS)
  return False, f'{kind} {value:g}: the run ended first'


def final_state(workdir: str) -> tuple[int, dict]:
  import jax  # pylint: disable=import-outside-toplevel
  from bingo_jax.store import checkpointing  # pylint: disable=import-outside-toplevel
  checkpointer = checkpointing.TrainCheckpointer(workdir, keep=1, read_only=True)
  step = checkpointer.latest_step()
  stored = checkpointer.restore_arrays(step)
  checkpointer.close()
  return step, {jax.tree_util.keystr(p): np.asarray(x)
                for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}


def saved_steps(workdir: str) -> list:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def trial_result(inputs: dict, workdir: str, plan: tuple, reference: tuple,
                 state_lock: threading.Lock) -> tuple[bool, bool, str]:
  """One trial: signal at the planned moment, rerun until done, compare.

  Returns:
    (real fault, bit-identical, table row).
  """
  signum, kind, value, jitter = plan
  shutil.rmtree(workdir, ignore_errors=True)
  killed = Run(inputs, workdir)
  delivered, moment = wait_for_moment(killed, kind, value, jitter)
  at_signal = killed.last_step
  if delivered:
    try:
      killed.process.send_signal(signum)
    except ProcessLookupError:
      delivered = False  # it exited between the check and the signal
  rc, killed_log = killed.wait()
  # A real fault: the signal reached the running run and changed how it ended (killed, or
  # stopped with 75). Exit 0 after a signal means the signal was lost, unless it came after
  # the last step (then the run rightly finishes its final save and exits 0: nothing to
  # resume; make_plan aims SIGTERM/SIGINT before that).
  real = delivered and (rc != 0 or at_signal == TOTAL_STEPS)
  logged = f'{at_signal}/{killed.last_step}'
  left = saved_steps(workdir)
  logs, reruns, rerun_rc = [killed_log], 0, rc
  while rerun_rc != 0 and reruns < 3:
    reruns += 1
    rerun_rc, log, _ = run_to_end(inputs, workdir)
    logs.append(log)
  same = False
  if rerun_rc != 0:
    result = f'FAILED to finish (rc {rerun_rc}): {logs[-1].strip().splitlines()[-1][:120]}'
  else:
    with state_lock:  # one restore at a time in this process
      step, state = final_state(workdir)
    reference_step, reference_state = reference
    same = step == reference_step and sorted(state) == sorted(reference_state) and all(
        np.array_equal(state[k], v) for k, v in reference_state.items())
    result = 'bit-identical' if same else f'DIFFERENT (step {step})'
  row = (f'{signal.Signals(signum).name:>8}  {moment:<36} {logged:>7} {rc:>4} '
         f'{(max(left) if left else "-")!s:>5} {reruns:>6}  {"yes" if real else "NO":>4}  '
         f'{result}')
  if same:
    shutil.rmtree(workdir, ignore_errors=True)
  else:  # kept for diagnosis, with every run's log
    os.makedirs(workdir, exist_ok=True)
    for i, log in enumerate(logs):
      with open(os.path.join(workdir, f'run{i}.log'), 'w') as f:
        f.write(log)
    row += f'\n      kept {workdir} (run*.log: the killed run, then each rerun)'
  return real, same, row


def make_plan(trials: int, seed: int, start_up_seconds: float) -> list:
  """(signal, kind, value, jitter) per trial: the nine (signal, kind) pairs in shuffled rounds;
  the start-up delay, the step or the saved step and the save's extra delay drawn at random."""
  rng = random.Random(seed)
  pairs = []
  while len(pairs) < trials:
    round_ = [(s, k) for s in SIGNALS for k in KINDS]
    rng.shuffle(round_)
    pairs += round_
  plan = []
  for signum, kind in pairs[:trials]:
    # SIGTERM/SIGINT after the last step lets the run finish (exit 0, nothing to resume): aim
    # them before it. SIGKILL may land anywhere, the final save included.
    last = TOTAL_STEPS if signum == signal.SIGKILL else TOTAL_STEPS - SAVE_EVERY
    if kind == 'start-up':
      value = rng.uniform(0.0, start_up_seconds)
    elif kind == 'step':
      value = rng.randint(1, last)
    else:
      value = rng.choice(range(SAVE_EVERY, last + 1, SAVE_EVERY))
    plan.append((signum, kind, value, rng.uniform(0.0, 0.2)))
  return plan


def prepare_inputs(root: str) -> dict:
  """The tiny run's inputs, made afresh under root (the compilation cache there is kept)."""
  for name in ('images', 'images.txt', 'bags.npz', 'teacher'):
    path = os.path.join(root, name)
    shutil.rmtree(path) if os.path.isdir(path) else (os.path.exists(path) and os.remove(path))
  return tiny_run.make_inputs(root)


def undisturbed_runs(inputs: dict, scratch: str, copies: int) -> tuple[float, tuple]:
  """``copies`` undisturbed runs at once: their mean time to the first step line, and the
  final state (the copies must agree bit for bit)."""
  def one(i: int) -> tuple[float, str]:
    directory = os.path.join(scratch, f'reference{i}')
    shutil.rmtree(directory, ignore_errors=True)
    rc, log, run = run_to_end(inputs, directory)
    assert rc == 0, log[-3000:]
    return run.first_step_seconds, directory

  with concurrent.futures.ThreadPoolExecutor(copies) as pool:
    references = list(pool.map(one, range(copies)))
  reference = final_state(references[0][1])
  for _, directory in references:
    step, state = final_state(directory)
    assert step == reference[0] and all(np.array_equal(state[k], v)
                                        for k, v in reference[1].items()), directory
    shutil.rmtree(directory)
  return sum(s for s, _ in references) / copies, reference


def load() -> str:
  return ' '.join(f'{x:.2f}' for x in os.getloadavg())


_TRIALS = flags.DEFINE_integer('trials', 20, 'Kill-and-resume trials.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the signals and moments.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Trials run at once (the undisturbed run is '
                                 'run as often at once, to time its start-up under that load).')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/bingo_faults', 'Scratch directory (inputs, '
                               'runs; failing trials are kept there).')


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax's lines of the final-state restores
  if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    # Started in the background by a shell (`cmd &`), this process ignores SIGINT, and so
    # would the runs it starts, until their handler is installed: a SIGINT during their
    # start-up would be lost. The runs get the default disposition, as from a terminal.
    signal.signal(signal.SIGINT, signal.default_int_handler)
  print(f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} on {platform.node()} '
        f'({os.cpu_count()} CPUs): python -m bench.faults --trials {_TRIALS.value} '
        f'--seed {_SEED.value} --parallel {_PARALLEL.value}; load average {load()}', flush=True)
  inputs = prepare_inputs(os.path.join(_WORKDIR.value, 'inputs'))
  cache = testing.compilation_cache_dir(os.path.join(inputs['root'], 'jax_cache'))
  if not (os.path.isdir(cache) and os.listdir(cache)):
    warm_up = os.path.join(_WORKDIR.value, 'warm_up')
    shutil.rmtree(warm_up, ignore_errors=True)
    run_to_end(inputs, warm_up)  # fills the compilation cache
    shutil.rmtree(warm_up)
  start_up, reference = undisturbed_runs(inputs, _WORKDIR.value, _PARALLEL.value)
  print(f'undisturbed run ({_PARALLEL.value} at once, identical): first step line after '
        f'{start_up:.1f} s, final step {reference[0]}; load average {load()}', flush=True)

  plan = make_plan(_TRIALS.value, _SEED.value, start_up)
  header = (f'{"trial":>5} {"signal":>8}  {"moment":<36} {"logged":>8} {"rc":>4} {"left":>5} '
            f'{"reruns":>6}  {"real":>4}  result')
  print(header + '\n' + '-' * len(header), flush=True)
  state_lock = threading.Lock()
  rows = {}
  with concurrent.futures.ThreadPoolExecutor(_PARALLEL.value) as pool:
    futures = {pool.submit(trial_result, inputs, os.path.join(_WORKDIR.value, f'trial{t:02d}'),
                           trial_plan, reference, state_lock): t
               for t, trial_plan in enumerate(plan, 1)}
    for future in concurrent.futures.as_completed(futures):
      rows[futures[future]] = future.result()
      print(f'{futures[future]:>5} {rows[futures[future]][2]}', flush=True)  # as they finish
  print('\nBy trial:\n' + header)
  for trial in sorted(rows):
    print(f'{trial:>5} {rows[trial][2]}')
  by_signal = {}
  for trial, (signum, *_) in enumerate(plan, 1):
    counts = by_signal.setdefault(signal.Signals(signum).name, [0, 0])
    counts[0] += 1
    counts[1] += rows[trial][1]
  print('By signal (bit-identical/trials): ' + ', '.join(
      f'{name} {ok}/{n}' for name, (n, ok) in sorted(by_signal.items())))
  real = sum(r for r, _, _ in rows.values())
  identical = sum(s for _, s, _ in rows.values())
  print(f'{real}/{_TRIALS.value} real faults ({_TRIALS.value - real} signals did not reach a '
        f'running run or were lost); {identical}/{_TRIALS.value} resumed runs bit-identical to the '
        f'undisturbed run; load average {load()}; '
        f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}')
  return 0 if identical == real == _TRIALS.value else 1


if __name__ == '__main__':
  app.run(main)

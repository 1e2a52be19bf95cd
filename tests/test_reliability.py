"""Nothing lost under faults (docs/reliability.md): the nine failures of issue 12, each
reproduced through the public command line and checked against an undisturbed run.

References: the straight run's stored arrays (a separate workdir, never touched by a fault),
PyTorch's own tensors for the converter, values written by the test itself. A run that
recovers must end bit-identical to the straight run.

The set-up is the tests' tiny one (bingo_jax/testing/tiny_run.py): 48 random PNG images,
random-neighbour bags, a random ResNet-18 (width 8) teacher; 12 steps of batch 16, checkpoints
every 2 steps, 2 kept.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch

from bingo_jax import train
from bingo_jax.bags import bag_file
from bingo_jax.configs import tiny_test
from bingo_jax.data import sources as data_sources
from bingo_jax.models import create_model, init_variables
from bingo_jax.store import checkpoint_integrity, workdir_records
from bingo_jax.store import checkpointing, model_io, workdir_lock
from bingo_jax.testing import tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 12
TEACHER = tiny_run.TEACHER


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  return tiny_run.make_inputs(tmp_path_factory.mktemp('reliability_inputs'))


def _command(inputs: dict, workdir: str, *extra: str) -> list:
  return tiny_run.train_command(inputs, workdir, *extra)


def _environment(inputs: dict) -> dict:
  # The persistent compilation cache makes every run reuse the first one's executables
  # (identical numerics, no recompilation).
  return tiny_run.environment(inputs)


def _start(inputs: dict, command: list) -> subprocess.Popen:
  # Output goes through a pipe: a file size limit set on the process must not hit its log.
  return subprocess.Popen(command, cwd=REPO, env=_environment(inputs), text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _run(inputs: dict, command: list, timeout: float = 900) -> tuple[int, str]:
  process = _start(inputs, command)
  _, stderr = process.communicate(timeout=timeout)
  return process.returncode, stderr


def _train(inputs: dict, workdir: str, *extra: str, expect: int = 0) -> str:
  rc, stderr = _run(inputs, _command(inputs, workdir, *extra))
  assert rc == expect, f'rc {rc}, expected {expect}:\n{stderr[-4000:]}'
  return stderr


def _wait_for(path: str, process: subprocess.Popen, timeout: float = 600) -> None:
  deadline = time.time() + timeout
  while not os.path.exists(path):
    assert process.poll() is None, f'the run ended before {path} appeared'
    assert time.time() < deadline, f'{path} did not appear'
    time.sleep(0.005)


def _stored(workdir: str, step: int) -> dict:
  checkpointer = checkpointing.TrainCheckpointer(workdir, keep=1, read_only=True)
  stored = checkpointer.restore_arrays(step)
  checkpointer.close()
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]}


def _assert_same_state(workdir: str, reference: str, step: int = TOTAL_STEPS) -> None:
  got, want = _stored(workdir, step), _stored(reference, step)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def _summary(workdir: str) -> dict:
  with open(os.path.join(workdir, train.SUMMARY_RECORD)) as f:
    return json.load(f)


def _steps(workdir: str) -> list:
  return checkpointing.TrainCheckpointer(workdir, 1, read_only=True).all_steps()


@pytest.fixture(scope='module')
def straight(inputs, tmp_path_factory):
  """The undisturbed run: 12 steps, checkpoints 10 and 12 kept."""
  workdir = str(tmp_path_factory.mktemp('straight') / 'run')
  _train(inputs, workdir)
  assert sorted(_steps(workdir)) == [10, 12]
  return workdir


def _data_files(step_dir: str) -> list:
  """The array data files of a checkpoint step (OCDBT ``d/`` files), largest first."""
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, 'state'))
           if os.path.basename(root) == 'd' for name in names]
  return sorted(files, key=os.path.getsize, reverse=True)


# ---------------------------------------------------------------------------------------------
# 9 (SIGINT) and 7 (a finished run re-run)


def test_sigint_saves_exits_75_and_the_resume_equals_the_straight_run(inputs, straight,
                                                                      tmp_path):
  workdir = str(tmp_path / 'run')
  process = _start(inputs, _command(inputs, workdir))
  _wait_for(os.path.join(workdir, 'checkpoints', '2'), process)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=600)
  assert process.returncode == train.EXIT_PREEMPTED, stderr[-3000:]
  first = _summary(workdir)
  assert first['preempted'] and first['status'] == 'preempted'
  assert 2 < first['step'] < TOTAL_STEPS and first['step'] in _steps(workdir), first['step']

  _train(inputs, workdir)  # the same command continues
  summary = _summary(workdir)
  assert (summary['start_step'], summary['step']) == (first['step'], TOTAL_STEPS)
  _assert_same_state(workdir, straight)

  # 7: a rerun of the finished run trains nothing and keeps the record of the run that did.
  _train(inputs, workdir)
  again = _summary(workdir)
  assert again['final_metrics'] == summary['final_metrics'] and again['final_metrics']
  assert again['wall_seconds'] == summary['wall_seconds'] > 0
  assert [r['status'] for r in again['runs']] == ['preempted', 'done', 'nothing to do']
  assert [r['start_step'] for r in again['runs']] == [0, first['step'], TOTAL_STEPS]


# ---------------------------------------------------------------------------------------------
# 6: two runs on one workdir; a resume with another config


def test_second_run_is_refused_and_a_stale_lock_is_taken_over(inputs, straight, tmp_path):
  workdir = str(tmp_path / 'run')
  first = _start(inputs, _command(inputs, workdir))
  _wait_for(os.path.join(workdir, 'checkpoints', '2'), first)
  first.send_signal(signal.SIGSTOP)  # holds the lock, alive, at a step > 2
  try:
    rc, stderr = _run(inputs, _command(inputs, workdir))
    assert rc == 1
    assert f'{workdir} is in use by another run' in stderr and f'pid {first.pid} ' in stderr
    assert 'Traceback' not in stderr
  finally:
    first.send_signal(signal.SIGKILL)
    first.communicate()
  saved = max(_steps(workdir))
  lock = json.load(open(os.path.join(workdir, workdir_lock.LOCK_FILE)))
  assert lock['pid'] == first.pid  # left behind by the killed run

  # Another learning rate on the same workdir: refused, naming the key and both values.
  rc, stderr = _run(inputs, _command(inputs, workdir, '--config.train.base_lr=0.06'))
  assert rc == 1 and 'config.train.base_lr: 0.03 -> 0.06' in stderr, stderr[-3000:]
  assert 'allow_config_change' in stderr
  assert f'Took over the stale lock {os.path.join(workdir, workdir_lock.LOCK_FILE)} of pid ' \
         f'{first.pid}' in stderr
  assert max(_steps(workdir)) == saved and json.load(open(os.path.join(
      workdir, 'config.json')))['train']['base_lr'] == 0.03

  _train(inputs, workdir)  # the original command resumes from the killed run's checkpoint
  assert _summary(workdir)['start_step'] == saved
  _assert_same_state(workdir, straight)
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))


def test_a_refused_resume_leaves_the_workdir_records_as_they_were(inputs, straight, tmp_path):
  """Issue 27: a resume with another queue size, allowed as a config change, is refused by the
  checkpoints (their queue holds 64 keys). Before, W/config.json then said 128, and the
  original command was refused in turn (queue_size: 128 -> 64)."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight, workdir)
  records = {name: open(os.path.join(workdir, name), 'rb').read()
             for name in (workdir_records.CONFIG_RECORD, workdir_records.STUDENT_RECORD)}
  rc, stderr = _run(inputs, _command(inputs, workdir, '--config.train.queue_size=128',
                                     '--config.train.allow_config_change=true'))
  errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
  assert rc == 1 and 'Traceback' not in stderr, stderr[-3000:]
  assert len(errors) == 1 and 'does not fit this config' in errors[0], stderr[-3000:]
  assert {name: open(os.path.join(workdir, name), 'rb').read() for name in records} == records
  _train(inputs, workdir)  # the original command is accepted: nothing left to train
  assert _summary(workdir)['runs'][-1]['start_step'] == TOTAL_STEPS
  _assert_same_state(workdir, straight)


def test_config_change_is_logged_when_allowed(tmp_path):
  workdir = str(tmp_path)
  student = dict(TEACHER, bn_group_size=4)
  old = {'train': {'base_lr': 0.03, 'log_every_steps': 1}, 'data': {'path': 'a.txt'}}
  workdir_records.write_workdir_records(workdir, student, json.dumps(old))
  new = {'train': {'base_lr': 0.06, 'log_every_steps': 5}, 'data': {'path': 'a.txt'}}
  with pytest.raises(workdir_records.ConfigChangedError, match=r'config.train.base_lr: 0.03 -> '
                                                             r'0.06'):
    workdir_records.write_workdir_records(workdir, student, json.dumps(new), resuming=True)
  changes = workdir_records.write_workdir_records(workdir, student, json.dumps(new),
                                                resuming=True, allow_config_change=True)
  assert changes == ['config.train.base_lr: 0.03 -> 0.06']  # log_every_steps is resume-safe
  assert json.load(open(os.path.join(workdir, 'config.json'))) == new


def test_lock_of_a_dead_process_is_stale_and_of_a_live_one_is_not(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  child = subprocess.Popen([sys.executable, '-c', 'pass'])
  child.wait()  # a pid that no longer runs
  host = os.uname().nodename
  assert lock.stale_reason({'pid': child.pid, 'host': host}) == \
      f'process {child.pid} no longer runs'
  assert lock.stale_reason({'pid': os.getpid(), 'host': host}) is None
  assert lock.stale_reason({'pid': child.pid, 'host': 'another-host'}) is None
  with lock:
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f'pid {os.getpid()} on {host}'):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert not os.listdir(tmp_path)  # released, no temporary files left


# ---------------------------------------------------------------------------------------------
# 3 (damaged latest checkpoint) and 2 (flipped bytes in a checkpoint)


def _damage(step_dir: str, how: str) -> str:
  path = _data_files(step_dir)[0]
  data = bytearray(open(path, 'rb').read())
  if how == 'truncate':
    data = data[:len(data) // 3]
  else:  # flip bytes in the middle of the file
    for i in range(len(data) // 2, len(data) // 2 + 64):
      data[i] ^= 0xFF
  open(path, 'wb').write(bytes(data))
  return path


@pytest.mark.parametrize('how', ['truncate', 'flip'])
def test_damaged_latest_step_falls_back_for_export_and_training(inputs, straight, tmp_path, how):
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight, workdir)
  _damage(os.path.join(workdir, 'checkpoints', '12'), how)

  # Export (read-only): one warning line, then the older step's student; an explicit --step
  # on the damaged one names the cause without a traceback.
  export = [sys.executable, '-m', 'bingo_jax.export', workdir, str(tmp_path / 'student.pth'),
            '--format', 'torchvision']
  rc, stderr = _run(inputs, export)
  assert rc == 0, stderr[-3000:]
  warnings = [line for line in stderr.splitlines() if 'is damaged' in line]
  assert len(warnings) == 1 and f'{workdir}/checkpoints/12 is damaged' in warnings[0]
  assert 'falling back to step 10' in warnings[0]
  exported = torch.load(str(tmp_path / 'student.pth'), weights_only=True)
  want = _stored(straight, 10)["['params']['backbone']['conv1']['kernel']"]
  np.testing.assert_array_equal(exported['conv1.weight'].numpy(), want.transpose(3, 2, 0, 1))
  rc, stderr = _run(inputs, export + ['--step', '12', '--overwrite'])
  assert rc == 1 and f'{workdir}/checkpoints/12 is damaged' in stderr.splitlines()[-1]
  assert 'Traceback' not in stderr and 'Event loop is closed' not in stderr

  # Training falls back to step 10, moves step 12 aside, and ends where the straight run did.
  stderr = _train(inputs, workdir)
  assert 'moved to' in stderr and 'falling back to step 10' in stderr
  assert os.listdir(os.path.join(workdir, checkpoint_integrity.DAMAGED_DIR))[0].startswith('12-')
  assert _summary(workdir)['runs'][-1]['start_step'] == 10
  _assert_same_state(workdir, straight)


def _evaluate(inputs: dict, checkpoint: str, output: str) -> tuple[int, str]:
  return _run(inputs, [sys.executable, '-m', 'bingo_jax.evaluate', '--config',
                       'tiny_test', '--checkpoint', checkpoint, '--protocol', 'knn',
                       '--workdir', output, f'--config.data.path={inputs["images"]}',
                       '--config.eval.knn_weighted_k=20'])  # 48 images


def test_evaluation_falls_back_and_refuses_a_workdir_with_no_intact_step(inputs, straight,
                                                                         tmp_path):
  """3 and 2 for evaluation: with the newest step damaged, the older one is evaluated (one
  warning line); with every step damaged (flipped bytes, as in the issue's workdir of NaN
  checkpoints, which training no longer writes), evaluation and export exit 1 naming the
  workdir, instead of a chance-level result with exit 0."""
  from bingo_jax.bags import features  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight, workdir)
  _damage(os.path.join(workdir, 'checkpoints', '12'), 'flip')
  rc, stderr = _evaluate(inputs, workdir, str(tmp_path / 'eval'))
  assert rc == 0, stderr[-3000:]
  warnings = [line for line in stderr.splitlines() if 'is damaged' in line]
  assert len(warnings) == 1 and 'falling back to step 10' in warnings[0]
  with open(tmp_path / 'eval' / 'eval_knn.json') as f:
    model = json.load(f)['model']
  # The undisturbed workdir's step 10, read directly.
  want = features.describe_model(checkpointing.load_student(straight, step=10))
  assert model['metadata']['step'] == 10
  assert model['variables_checksum'] == want['variables_checksum']

  _damage(os.path.join(workdir, 'checkpoints', '10'), 'flip')
  rc, stderr = _evaluate(inputs, workdir, str(tmp_path / 'eval_none'))
  last = stderr.strip().splitlines()[-1]
  assert rc == 1 and f'{workdir}/checkpoints: no checkpoint restores intact' in last, \
      stderr[-3000:]
  assert 'Traceback' not in stderr and not (tmp_path / 'eval_none' / 'eval_knn.json').exists()
  rc, stderr = _tool('export_torch.py', workdir, str(tmp_path / 'student.pth'),
                     '--format', 'torchvision')
  assert rc == 1 and 'no checkpoint restores intact' in stderr
  assert not (tmp_path / 'student.pth').exists()


# ---------------------------------------------------------------------------------------------
# 2: a diverging run


def test_non_finite_loss_stops_the_run_and_keeps_the_good_checkpoints(inputs, straight,
                                                                    tmp_path):
  """The straight run continued for 6 more steps at a learning rate that diverges at once."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight, workdir)
  stderr = _train(inputs, workdir, '--config.train.epochs=6', '--config.train.base_lr=1e30',
                  '--config.train.allow_config_change=true', expect=1)
  last = stderr.strip().splitlines()[-1]
  assert 'non-finite loss = nan' in last and "nan_policy = 'stop'" in last, stderr[-3000:]
  assert 'the last checkpoint, step 12, holds finite values' in last
  bad_step = int(last.split('Step ')[1].split(':')[0])
  assert bad_step > TOTAL_STEPS
  summary = _summary(workdir)
  assert summary['status'] == 'failed' and 'NonFiniteLossError' in summary['error']
  # Nothing after the bad step was saved: the good checkpoints are still the straight run's.
  assert sorted(_steps(workdir)) == [10, 12]
  for step in (10, 12):
    _assert_same_state(workdir, straight, step)


def test_a_non_finite_state_is_never_saved(tmp_path):
  checkpointer = checkpointing.TrainCheckpointer(str(tmp_path), keep=2)
  good = {'params': {'w': np.ones(3, np.float32)}, 'step': np.int32(1)}
  checkpointer.save(1, good, {'step': 1})
  bad = {'params': {'w': np.array([1.0, np.inf, np.nan], np.float32)}, 'step': np.int32(2)}
  with pytest.raises(checkpointing.NonFiniteStateError,
                     match=r"Refusing to save step 2 .*1 of 2 arrays hold NaN or Inf "
                           r"\(\['params'\]\['w'\]\).*step 1\) is kept"):
    checkpointer.save(2, bad, {'step': 2})
  checkpointer.close()
  assert _steps(str(tmp_path)) == [1]


# ---------------------------------------------------------------------------------------------
# 5: a failing checkpoint write (RLIMIT_FSIZE: the stand-in for a full disk, effective for root
# too, unlike a read-only directory)


def test_failed_save_stops_the_run_at_once_and_the_resume_equals_the_straight_run(
    inputs, straight, tmp_path):
  workdir = str(tmp_path / 'run')
  process = _start(inputs, _command(inputs, workdir))
  _wait_for(os.path.join(workdir, 'checkpoints', '2'), process)
  process.send_signal(signal.SIGSTOP)
  # Each checkpoint has one ~1 MB file (the optimizer state); later saves cannot write it.
  resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (200_000, 200_000))
  process.send_signal(signal.SIGCONT)
  start = time.time()
  _, stderr = process.communicate(timeout=600)
  assert process.returncode == 1, stderr[-3000:]
  assert time.time() - start < 120  # no 5-minute orbax timeout
  last = stderr.strip().splitlines()[-1]
  assert 'Saving step' in last and 'File too large' in last and 'last complete checkpoint' in last
  failed_step = int(last.split('Saving step ')[1].split()[0])
  good = _steps(workdir)
  assert good and max(good) < failed_step
  summary = _summary(workdir)
  assert summary['status'] == 'failed' and summary['step'] <= failed_step + 2

  _train(inputs, workdir)  # space is back: the same command resumes from the last good one
  assert _summary(workdir)['runs'][-1]['start_step'] == max(good)
  _assert_same_state(workdir, straight)


# ---------------------------------------------------------------------------------------------
# 1 (--overwrite) and 8 (non-finite teachers): the converter's command line


# The console commands' modules (bingo-convert, bingo-export).
_TOOLS = {'convert_torch_teacher.py': 'bingo_jax.convert', 'export_torch.py': 'bingo_jax.export'}


def _tool(name: str, *args: str) -> tuple[int, str]:
  result = subprocess.run([sys.executable, '-m', _TOOLS[name], *args],
                          cwd=REPO, text=True, capture_output=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  return result.returncode, result.stderr


def _small_resnet_state(nan_key: str = None) -> dict:
  """A torchvision-layout ResNet-18 of width 8 (cifar stem) with random weights."""
  import torch_reference  # pylint: disable=import-outside-toplevel
  reference = torch_reference.make_resnet('resnet18', head='linear', base_width=8, stem='cifar')
  state = {k: v.clone() for k, v in reference.state_dict().items()}
  if nan_key:
    state[nan_key].view(-1)[0] = float('nan')  # one value
  return state


def test_overwrite_only_replaces_a_model_file(tmp_path):
  checkpoints = tmp_path / 'ckpts'
  checkpoints.mkdir()
  source = checkpoints / 'r18.pth'
  torch.save(_small_resnet_state(), source)
  other = checkpoints / 'other_teacher'
  model_io.save_model(str(other), TEACHER,
                      init_variables(create_model(**TEACHER), jax.random.key(1), 32))
  before = {p: open(os.path.join(r, p), 'rb').read() for r, _, ps in os.walk(checkpoints)
            for p in ps}

  rc, stderr = _tool('convert_torch_teacher.py', str(source), str(checkpoints), '--overwrite')
  assert rc == 1 and f'{checkpoints} exists and is not a bingo_jax model file' in stderr
  after = {p: open(os.path.join(r, p), 'rb').read() for r, _, ps in os.walk(checkpoints)
           for p in ps}
  assert after == before  # the source and the other teacher are untouched

  # A model file is replaced; a plain file is not.
  rc, _ = _tool('convert_torch_teacher.py', str(source), str(other), '--overwrite')
  assert rc == 0 and model_io.read_record(str(other))['metadata']['source_file'] == str(source)
  rc, stderr = _tool('convert_torch_teacher.py', str(tmp_path / 'nope.pth'), str(source),
                     '--overwrite')
  assert rc == 1 and open(source, 'rb').read() == before['r18.pth']
  # Export: --overwrite replaces a file, never a directory.
  rc, stderr = _tool('export_torch.py', str(other), str(checkpoints), '--format',
                     'torchvision', '--overwrite')
  assert rc == 1 and 'is not a file' in stderr
  assert os.path.isfile(source) and os.path.isdir(other)
  rc, _ = _tool('export_torch.py', str(other), str(source), '--format', 'torchvision',
                '--overwrite')
  assert rc == 0


def test_non_finite_teacher_is_refused_by_the_converter_and_the_loader(inputs, tmp_path):
  source = tmp_path / 'r18_nan.pth'
  torch.save(_small_resnet_state(nan_key='layer2.0.conv1.weight'), source)
  rc, stderr = _tool('convert_torch_teacher.py', str(source), str(tmp_path / 'teacher'))
  assert rc == 1 and '1 of' in stderr and 'layer2.0.conv1.weight' in stderr
  assert not (tmp_path / 'teacher').exists()

  # Converted anyway on request: every loader (bagging, training, evaluation) still refuses.
  rc, _ = _tool('convert_torch_teacher.py', str(source), str(tmp_path / 'teacher'),
                '--allow_non_finite')
  assert rc == 0
  with pytest.raises(ValueError, match=r"1 of \d+ arrays hold NaN or Inf "
                                       r"\(\['params'\]\['backbone'\]\['layer2_0'\]"):
    model_io.load_model(str(tmp_path / 'teacher'))
  loaded = model_io.load_model(str(tmp_path / 'teacher'), allow_non_finite=True)
  assert np.isnan(np.asarray(loaded.variables['params']['backbone']['layer2_0']['conv1']
                             ['kernel'])).sum() == 1

  # Through the command lines: bagging, training and evaluation stop before any work, naming
  # the file and the array, with no traceback (the bagging gave chance purity). The
  # teacher: the tiny run's (MoCo head, as training needs), one value NaN.
  variables = init_variables(create_model(**TEACHER), jax.random.key(7), 32)
  variables['params']['backbone']['layer2_0']['conv1']['kernel'] = (
      variables['params']['backbone']['layer2_0']['conv1']['kernel'].at[0, 0, 0, 0].set(np.nan))
  teacher = str(tmp_path / 'moco_teacher')
  model_io.save_model(teacher, TEACHER, variables, allow_non_finite=True)
  data = [f'--config.teacher.path={teacher}', f'--config.data.path={inputs["images"]}']
  commands = {
      'bagging': ['-m', 'bingo_jax.bagging', '--workdir', str(tmp_path / 'bags'),
                  f'--config.bags.path={tmp_path}/bags.npz', *data],
      'training': ['-m', 'bingo_jax.train', '--workdir', str(tmp_path / 'run'),
                   f'--config.bags.path={inputs["bags"]}', *data],
      'evaluation': ['-m', 'bingo_jax.evaluate', '--checkpoint', teacher, '--protocol', 'knn',
                     '--workdir', str(tmp_path / 'eval'), *data],
  }
  for stage, command in commands.items():
    rc, stderr = _run(inputs, [sys.executable, *command[:2], '--config', 'tiny_test',
                               *command[2:]])
    last = stderr.strip().splitlines()[-1]
    assert rc == 1 and teacher in last and "['params']['backbone']['layer2_0']" in last, (
        stage, stderr[-3000:])
    assert 'Traceback' not in stderr, stage
  assert not (tmp_path / 'bags.npz').exists() and not (tmp_path / 'eval' / 'eval_knn.json').exists()


# ---------------------------------------------------------------------------------------------
# 4: an undecodable image in training and bagging


def _copy_data(inputs: dict, root: str) -> dict:
  """The tiny images and their list under ``root`` (same identifiers, so the bags still fit)."""
  shutil.copytree(os.path.join(inputs['root'], 'images'), os.path.join(root, 'images'))
  shutil.copy(inputs['images'], os.path.join(root, 'images.txt'))
  return dict(inputs, images=os.path.join(root, 'images.txt'))


def _bags_declared_for(data: dict, root: str) -> dict:
  """``data`` with the tiny bags rewritten under ``root`` for its (changed) files: the same
  neighbours, recording the copy's content fingerprint, which training checks."""
  config = tiny_test.get_config()
  config.data.path = data['images']
  bags = bag_file.load_bags(data['bags'])
  bags.metadata['content_fingerprint'] = data_sources.make_source(
      config.data, 'train').content_fingerprint
  return dict(data, bags=bag_file.save_bags(os.path.join(root, 'bags.npz'), bags))


def _first_read_at(inputs: dict, step: int) -> int:
  """An image the training pipeline first reads (as anchor or positive) at ``step``."""
  from bingo_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  config = tiny_test.get_config()
  config.data.path = inputs['images']
  source = data_sources.make_source(config.data, 'train')
  batches = input_pipeline.create_train_iterator(
      config, source, bag_file.load_bags(inputs['bags']), start_step=0, local_batch_size=16,
      process_index=0, process_count=1)
  seen = set()
  for at in range(1, step + 1):
    batch = next(batches)
    read = set(batch['anchor_index'].tolist()) | set(batch['positive_index'].tolist())
    if at == step:
      return min(read - seen)
    seen |= read


def test_bad_training_image_is_named_or_skipped(inputs, tmp_path):
  bad = _first_read_at(inputs, 2)
  name = f'images/{bad:03d}.png'
  broken = _copy_data(inputs, str(tmp_path / 'broken'))
  with open(tmp_path / 'broken' / name, 'wb') as f:
    f.write(b'not a PNG any more' * 20)
  broken = _bags_declared_for(broken, str(tmp_path / 'broken'))

  # 'error': stops at step 2 naming the file; step 1's work is checkpointed first.
  workdir = str(tmp_path / 'error')
  stderr = _train(broken, workdir, expect=1)
  assert f'image {bad} ({name}) cannot be decoded in training step 2' in stderr, stderr[-3000:]
  assert 'Traceback' not in stderr
  assert _steps(workdir) == [1]
  assert 'BadImageError' in _summary(workdir)['error']
  # The same with the views drawn on the device (canvases decoded on the host).
  workdir = str(tmp_path / 'error_device')
  stderr = _train(broken, workdir, '--config.data.augment_on=device', expect=1)
  assert f'image {bad} ({name}) cannot be decoded in training step 2' in stderr, stderr[-3000:]
  assert 'Traceback' not in stderr and _steps(workdir) == [1]

  # 'skip': the image is read as the next one, and the run equals one whose file at that
  # place holds the next image's bytes.
  skipped = str(tmp_path / 'skip')
  _train(broken, skipped, '--config.data.on_bad_image=skip')
  records = _summary(skipped)['runs'][-1]['bad_images_skipped']
  assert [(r['index'], r['file'], r['replaced_by']) for r in records] == [(bad, name, bad + 1)]
  healed = _copy_data(inputs, str(tmp_path / 'healed'))
  shutil.copy(tmp_path / 'healed' / f'images/{bad + 1:03d}.png', tmp_path / 'healed' / name)
  healed = _bags_declared_for(healed, str(tmp_path / 'healed'))
  reference = str(tmp_path / 'reference')
  _train(healed, reference)
  _assert_same_state(skipped, reference)


def test_bad_image_in_bagging_is_named(inputs, tmp_path):
  broken = _copy_data(inputs, str(tmp_path / 'broken'))
  open(tmp_path / 'broken' / 'images' / '017.png', 'wb').close()  # zero bytes
  rc, stderr = _run(inputs, [
      sys.executable, '-m', 'bingo_jax.bagging', '--config', 'tiny_test',
      '--workdir', str(tmp_path / 'bags'), f'--config.teacher.path={inputs["teacher"]}',
      f'--config.data.path={broken["images"]}', f'--config.bags.path={tmp_path}/bags.npz',
      '--config.bags.batch_size=8', '--config.bags.shard_size=16'])
  assert rc == 1
  assert 'image 17 (images/017.png) cannot be decoded' in stderr, stderr[-3000:]
  assert 'Traceback' not in stderr


def _skip_config(inputs: dict, **train_settings):
  config = tiny_test.get_config()
  config.teacher.path, config.data.path, config.bags.path = (
      inputs['teacher'], inputs['images'], inputs['bags'])
  config.train.update(nan_policy='skip', **train_settings)
  return config


def test_nan_policy_skip_keeps_the_previous_state(inputs, tmp_path, monkeypatch):
  """'skip' leaves the learned state as it was before the first non-finite update.

  An infinite learning rate makes every update non-finite (the loss and the gradient norm of
  step 1 are finite: the overflow is in the updated state): the state stays the initial one,
  created here independently with the same seed. A learning rate of 1e30 gives a finite but
  huge first update, after which every loss is NaN: steps 2 and 3 are skipped and the state is
  the one saved at step 1.
  """
  from bingo_jax.data import parallel  # pylint: disable=import-outside-toplevel
  from bingo_jax.method import config_checks, train_step
  # The config check refuses an infinite learning rate from a user; here it is the tool that
  # makes every update non-finite, so the value check is left out.
  monkeypatch.setattr(config_checks, 'check_values', lambda config: None)
  config = _skip_config(inputs, max_steps=2, base_lr=float('inf'), checkpoint_every_steps=2)
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(config, workdir)
  assert summary['status'] == 'done' and summary['non_finite_steps_skipped'] == [1, 2]
  stored = _stored(workdir, 2)
  mesh = parallel.make_mesh()
  student = create_model(**train.student_model_config(config))
  initial = train_step.create_train_state(config, student, jax.random.key(config.train.seed),
                                          mesh, 3)
  flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in
          jax.tree_util.tree_flatten_with_path({'params': initial.params,
                                                'batch_stats': initial.batch_stats})[0]}
  for key, value in flat.items():
    np.testing.assert_array_equal(stored[key], value, err_msg=key)
  assert int(stored["['step']"]) == 2

  # 1e30: step 1 is a real (huge, finite) update; the NaN losses after it are skipped, and
  # the state saved at step 3 is the one saved at step 1, before any skip.
  diverged = str(tmp_path / 'diverged')
  summary = train.train_and_evaluate(_skip_config(
      inputs, max_steps=3, base_lr=1e30, checkpoint_every_steps=1, keep_checkpoints=3),
      diverged)
  assert summary['status'] == 'done' and summary['non_finite_steps_skipped'] == [2, 3]
  got, want = _stored(diverged, 3), _stored(diverged, 1)
  assert max(np.abs(v).max() for k, v in want.items() if k.startswith("['params']")) > 1e20
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    if key not in ("['step']", "['rng']"):  # both advance over a skipped step
      np.testing.assert_array_equal(got[key], value, err_msg=key)
  assert int(got["['step']"]) == 3


def test_root_cause_names_tensorstore_os_error_codes():
  try:
    try:
      raise ValueError('OUT_OF_RANGE: Error writing "a/.zarray" [os_error_code=\'27\']\nmore')
    except ValueError as inner:
      raise RuntimeError('wrapped') from inner
  except RuntimeError as e:
    cause = checkpoint_integrity.root_cause(e)
  assert cause == ('ValueError: OUT_OF_RANGE: Error writing "a/.zarray" '
                   "[os_error_code='27'] (File too large)")

"""Two processes, each feeding half of the global batch, train like one process."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import multihost_train_worker as worker
from bingo_jax.data import parallel

NUM_PROCESSES = 2
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=repo_root, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  outputs = [str(tmp_path / f'process{i}.npz') for i in range(NUM_PROCESSES)]
  processes = [
      subprocess.Popen(
          [sys.executable, worker.__file__, '--process_id', str(i), '--num_processes',
           str(NUM_PROCESSES), '--port', str(port), '--devices_per_process', '2',
           '--out', outputs[i]],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(NUM_PROCESSES)]
  try:
    # The single-process reference (whole batch, this process's first 4 devices) is computed
    # while the workers run.
    _, _, _, batch = worker.small_setup()
    expected = worker.run(parallel.make_mesh(jax.devices()[:4]), batch)
    logs = [process.communicate(timeout=TIMEOUT_S)[0] for process in processes]
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  for i, process in enumerate(processes):
    assert process.returncode == 0, f'process {i} failed:\n{logs[i][-3000:]}'

  for i, output in enumerate(outputs):
    with np.load(output) as result:
      assert sorted(result.files) == sorted(expected)
      for name, value in expected.items():
        error = np.linalg.norm(result[name] - value) / max(np.linalg.norm(value), 1e-30)
        assert error <= 1e-5, f'process {i} {name}: relative error {error:.2e}'
  assert int(expected['queue_pointer']) == worker.NUM_STEPS * worker.GLOBAL_BATCH % (
      4 * worker.GLOBAL_BATCH)


@pytest.mark.parametrize('victim', [1, 0])
def test_a_dead_peer_ends_the_survivor_with_the_requeue_status(tmp_path, victim):
  """Two training processes; one is killed after step 4 is saved. The other exits 75 (before:
  an abort, 134, after the 100 s heartbeat timeout) within seconds, naming the dead one, and
  leaves only complete steps. Process 0 hosts the coordination service: its loss is the
  client library's abort, turned into the same exit."""
  import signal  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel

  from bingo_jax.store import checkpointing  # pylint: disable=import-outside-toplevel
  from bingo_jax.testing import tiny_run  # pylint: disable=import-outside-toplevel

  inputs = tiny_run.make_inputs(str(tmp_path / 'inputs'))
  workdir = str(tmp_path / 'run')
  env = dict(tiny_run.environment(inputs), JAX_PLATFORMS='cpu',
             JAX_COORDINATOR_ADDRESS=f'localhost:{_free_port()}')
  env['XLA_FLAGS'] = env['XLA_FLAGS'].replace('device_count=2', 'device_count=1')
  command = tiny_run.train_command(inputs, workdir, '--config.train.epochs=100',
                                   '--config.train.checkpoint_every_steps=2',
                                   '--jax_distributed', f'--num_processes={NUM_PROCESSES}')
  logs = [open(tmp_path / f'process{i}.log', 'w') for i in range(NUM_PROCESSES)]
  processes = [subprocess.Popen(command + [f'--process_id={i}'], env=env, stdout=logs[i],
                                stderr=subprocess.STDOUT) for i in range(NUM_PROCESSES)]
  try:
    deadline = time.time() + TIMEOUT_S
    while not os.path.isdir(os.path.join(workdir, 'checkpoints', '4')):
      assert all(p.poll() is None for p in processes), 'a process ended before step 4'
      assert time.time() < deadline, 'step 4 was not saved in time'
      time.sleep(0.05)
    processes[victim].send_signal(signal.SIGKILL)
    killed_at = time.time()
    status = processes[1 - victim].wait(timeout=TIMEOUT_S)
    waited = time.time() - killed_at
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
    for log in logs:
      log.close()
  with open(tmp_path / f'process{1 - victim}.log') as f:
    output = f.read()
  assert status == 75, output[-3000:]
  print(f'process {1 - victim} exited {status} {waited:.1f} s after process {victim} was killed')
  assert waited < 30, waited
  last = output.strip().splitlines()[-1]
  assert f'Peer process {victim}' in last and 'of 2 stopped' in last, last
  assert 'Traceback' not in output
  # Every step left is complete and restores (the survivor saved nothing after the failure).
  checkpointer = checkpointing.TrainCheckpointer(workdir, 1, read_only=True)
  steps = checkpointer.all_steps()
  assert 4 in steps
  for step in steps:
    checkpointer.restore_arrays(step)

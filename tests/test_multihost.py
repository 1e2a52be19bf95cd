"""Two processes, each feeding half of the global batch, train like one process."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

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

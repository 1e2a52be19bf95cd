"""Helpers for the tests and the bench scripts (not used by the package itself): the
subprocesses' environment here, the tiny training run's inputs in ``tiny_run``.

May import: bags, configs, data, models, store.
"""

import os


def cpu_xla_flags(devices: int) -> str:
  """``XLA_FLAGS`` of a test process: ``devices`` virtual CPU devices, and no LLVM
  optimisation of the generated code.

  The tests run tiny networks for a few steps, so XLA:CPU's compilation, not the computation,
  sets their time. ``--xla_backend_optimization_level=0`` cuts a training step's compilation
  by about 60%; convolutions and matrix products still run in XLA's library kernels, so the
  full-size conversion tests are no slower.
  """
  return (f'--xla_force_host_platform_device_count={devices} '
          '--xla_backend_optimization_level=0')


def compilation_cache_dir(fallback: str) -> str:
  """The persistent compilation cache of the processes a test starts.

  The suite's own cache (``JAX_COMPILATION_CACHE_DIR``, set by ``tests/conftest.py``) when
  there is one: CLI runs in different test modules, and in both pytest-xdist workers, then
  reuse each other's compiled programs. Otherwise ``fallback``. A half-written entry read by
  another process is no error: JAX warns and compiles the program itself.
  """
  return os.environ.get('JAX_COMPILATION_CACHE_DIR') or fallback


def subprocess_environment(cache_fallback: str, devices: int = 2,
                           pythonpath: tuple = ()) -> dict:
  """The environment of a CLI subprocess started by a test or a bench script.

  ``devices`` virtual CPU devices (``cpu_xla_flags``), every compiled program kept in the cache
  of ``compilation_cache_dir(cache_fallback)`` (so a rerun uses the first run's executables:
  identical numerics, no recompilation), TensorFlow's C++ log quiet, and ``pythonpath`` ahead
  of the inherited ``PYTHONPATH``.
  """
  return dict(os.environ, XLA_FLAGS=cpu_xla_flags(devices),
              JAX_COMPILATION_CACHE_DIR=compilation_cache_dir(cache_fallback),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1', TF_CPP_MIN_LOG_LEVEL='2',
              PYTHONPATH=os.pathsep.join([*pythonpath, os.environ.get('PYTHONPATH', '')]))

"""The machine a benchmark ran on: accelerator, driver, package versions, load average.

  python -m bench.environment                       # the table
  python -m bench.environment --require_accelerator # and exit 1 when JAX sees no GPU or TPU

The first part of bench/device_check.sh. Versions are read from the installed packages'
metadata (nothing is imported but JAX, which names the devices), so a package missing on the
machine shows as 'not installed' instead of failing.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys

from absl import app, flags

PACKAGES = ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda12-plugin', 'libtpu', 'flax',
            'optax', 'orbax-checkpoint', 'ml_collections', 'absl-py', 'numpy', 'torch',
            'torchvision', 'tensorflow', 'tensorflow-cpu', 'faiss-cpu')


def package_version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return 'not installed'


def nvidia_smi() -> str:
  """GPU name, driver and memory per GPU from nvidia-smi, or why there is none."""
  if shutil.which('nvidia-smi') is None:
    return 'no nvidia-smi'
  try:
    result = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
                             '--format=csv,noheader'], capture_output=True, text=True,
                            timeout=30)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f'nvidia-smi failed: {e}'
  lines = result.stdout.strip().splitlines()
  return '; '.join(lines) if result.returncode == 0 and lines else (
      f'nvidia-smi exit {result.returncode}: {result.stderr.strip()[:200]}')


_REQUIRE_ACCELERATOR = flags.DEFINE_bool('require_accelerator', False, 'Exit 1 (one line on '
                                         'stderr) when JAX sees no GPU or TPU.')


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  backend = jax.default_backend()
  print('| what | value |')
  print('|---|---|')
  print(f'| accelerator (JAX) | {len(devices)} x {devices[0].device_kind} ({backend}) |')
  print(f'| nvidia-smi (name, driver, memory) | {nvidia_smi()} |')
  print(f'| Python | {platform.python_version()} ({sys.executable}) |')
  for name in PACKAGES:
    print(f'| {name} | {package_version(name)} |')
  print(f'| host | {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs |')
  print('| load average (1, 5, 15 min) | '
        f'{", ".join(f"{load:.2f}" for load in os.getloadavg())} |', flush=True)
  if _REQUIRE_ACCELERATOR.value and backend == 'cpu':
    print(f'No GPU or TPU: JAX {jax.__version__} sees only CPU devices (use --smoke for the '
          'CPU run).', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  app.run(main)

"""Helpers for the tests and the bench scripts (not used by the package itself)."""


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

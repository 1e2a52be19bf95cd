"""Test set-up: 8 virtual CPU devices, so that sharded code paths run on this CPU."""

import os
import tempfile

from bingo_jax.testing import cpu_xla_flags

# Must happen before jax is imported by any test module.
os.environ.setdefault('XLA_FLAGS', cpu_xla_flags(8))
# XLA compilation dominates the suite's time on a CPU (tiny models, big graphs). A persistent
# cache lets tests, pytest-xdist workers and the CLI subprocesses the tests start reuse each
# other's compiled programs.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'bingo_jax_test_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import tensorflow as tf  # noqa: E402

# tf.data must not grab the accelerator or all host threads from JAX.
tf.config.set_visible_devices([], 'GPU')

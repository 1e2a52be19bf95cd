"""Test set-up: 8 virtual CPU devices, so that sharded code paths run on this CPU."""

import os

# Must happen before jax is imported by any test module.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import tensorflow as tf  # noqa: E402

# tf.data must not grab the accelerator or all host threads from JAX.
tf.config.set_visible_devices([], 'GPU')

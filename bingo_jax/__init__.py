"""bingo_jax: BINGO self-supervised distillation (ICLR 2022) in JAX/Flax."""

__version__ = '0.1.0'

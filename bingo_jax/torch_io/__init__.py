"""PyTorch files: checkpoint files, their layouts and wrappers (``checkpoints``), and the
PyTorch <-> Flax name mapping of every network (``mapping/``).

May import: models, store.
"""

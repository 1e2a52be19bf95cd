"""Networks of bingo_jax: ResNets (torchvision / SwAV layouts), EfficientNet-B0, heads.

May import: nothing else of bingo_jax.
"""

from bingo_jax.models.registry import Model, available_archs, create_model, init_variables, register_backbone

__all__ = ['Model', 'available_archs', 'create_model', 'init_variables', 'register_backbone']

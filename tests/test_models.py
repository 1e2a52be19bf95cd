"""Networks: BatchNorm semantics against torch, per-group statistics, registry, bf16 option.

The released code runs BatchNorm per GPU (docs/method.md §5): a batch of 256 on 8 GPUs is
normalised in groups of 32, and each replica updates its running statistics from its own
group. ``BatchNorm(group_size=g)`` must equal torch's BatchNorm applied to each consecutive
chunk of g examples in training mode; the running statistics equal the average of the
chunks' updates (the replicas' average, which is what any one replica holds in expectation).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bingo_jax.models import available_archs, create_model
from bingo_jax.models.layers import BatchNorm
from bingo_jax.torch_io import mapping as torch_mapping

import torch_reference
from torch_reference import one_torch_thread  # noqa: F401  (autouse: torch on one thread)



def _torch_bn(channels: int, ndim: int, rng: np.random.Generator):
  bn = torch.nn.BatchNorm2d(channels) if ndim == 4 else torch.nn.BatchNorm1d(channels)
  with torch.no_grad():
    bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, channels).astype(np.float32)))
    bn.bias.copy_(torch.from_numpy(rng.normal(0, 0.3, channels).astype(np.float32)))
    bn.running_mean.copy_(torch.from_numpy(rng.normal(0, 1, channels).astype(np.float32)))
    bn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, channels).astype(np.float32)))
  return bn


def _flax_bn_variables(bn):
  return {'params': {'scale': jnp.asarray(bn.weight.detach().numpy()),
                     'bias': jnp.asarray(bn.bias.detach().numpy())},
          'batch_stats': {'mean': jnp.asarray(bn.running_mean.numpy()),
                          'var': jnp.asarray(bn.running_var.numpy())}}


@pytest.mark.parametrize('shape,group_size', [
    ((8, 5, 7, 6), 4),     # images, two groups
    ((8, 5, 7, 6), None),  # images, the whole batch
    ((12, 16), 3),         # BatchNorm1d of a head, four groups
])
def test_batch_norm_groups_match_torch_per_chunk_in_training(shape, group_size):
  rng = np.random.default_rng(0)
  x = (rng.normal(size=shape) * 3 + 2).astype(np.float32)  # a large mean, as activations have
  channels = shape[-1]
  bn = _torch_bn(channels, len(shape), rng)
  group = group_size or shape[0]

  outputs, means, variances = [], [], []
  for start in range(0, shape[0], group):
    chunk_bn = copy.deepcopy(bn).train()  # one replica per chunk, same starting state
    chunk = torch.from_numpy(x[start:start + group])
    if len(shape) == 4:
      out = chunk_bn(chunk.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    else:
      out = chunk_bn(chunk)
    outputs.append(out.detach().numpy())
    means.append(chunk_bn.running_mean.numpy())
    variances.append(chunk_bn.running_var.numpy())

  module = BatchNorm(use_running_average=False, group_size=group_size)
  y, updated = module.apply(_flax_bn_variables(bn), jnp.asarray(x), mutable=['batch_stats'])
  np.testing.assert_allclose(np.asarray(y), np.concatenate(outputs), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(updated['batch_stats']['mean']), np.mean(means, 0),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(updated['batch_stats']['var']), np.mean(variances, 0),
                             rtol=1e-5, atol=1e-6)


def test_batch_norm_eval_matches_torch():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 3, 3, 5)).astype(np.float32)
  bn = _torch_bn(5, 4, rng).eval()
  want = bn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
  y = BatchNorm(use_running_average=True).apply(_flax_bn_variables(bn), jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-6, atol=1e-6)


def test_batch_norm_rejects_a_batch_not_divisible_by_the_group():
  module = BatchNorm(use_running_average=False, group_size=3)
  variables = module.init(jax.random.key(0), jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match='batch size 4 is not a multiple of the statistics group '
                                       'size 3'):
    module.apply(variables, jnp.zeros((4, 4)), mutable=['batch_stats'])


def test_resnet_training_mode_equals_torch_replicas():
  """A whole (small) ResNet-18 in training mode with ``bn_group_size=4`` on a batch of 8 equals
  two torch replicas each running its own 4 examples (the released per-GPU BatchNorm)."""
  torch.manual_seed(0)
  reference = torch_reference.make_resnet('resnet18', head='swav', base_width=8, stem='cifar',
                                          head_hidden_dim=32)
  torch_reference.randomize_(reference, torch.randn(4, 3, 16, 16))
  state = {k: v.numpy() for k, v in reference.state_dict().items()
           if not k.startswith('prototypes')}
  config = {'arch': 'resnet18', 'base_width': 8, 'stem': 'cifar', 'head': 'swav',
            'head_hidden_dim': 32, 'head_output_dim': 128}
  variables = torch_mapping.torch_to_flax(state, config)
  images = torch.randn(8, 3, 32, 32)

  features, embeddings, replicas = [], [], []
  for start in (0, 4):
    replica = copy.deepcopy(reference).train()
    with torch.no_grad():
      f, e = replica(images[start:start + 4])
    features.append(f.numpy())
    embeddings.append(e.numpy())
    replicas.append(replica)

  model = create_model(**config, bn_group_size=4)
  (got_features, got_embeddings), updated = model.apply(
      variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)), train=True,
      mutable=['batch_stats'])
  np.testing.assert_allclose(np.asarray(got_features), np.concatenate(features),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_embeddings), np.concatenate(embeddings),
                             rtol=1e-4, atol=1e-5)
  stats = updated['batch_stats']
  want_var = (replicas[0].layer3[1].bn2.running_var + replicas[1].layer3[1].bn2.running_var) / 2
  np.testing.assert_allclose(np.asarray(stats['backbone']['layer3_1']['bn2']['var']),
                             want_var.numpy(), rtol=1e-4)
  want_mean = (replicas[0].projection_head[1].running_mean
               + replicas[1].projection_head[1].running_mean) / 2
  np.testing.assert_allclose(np.asarray(stats['head']['bn1']['mean']), want_mean.numpy(),
                             rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_is_close_to_float32():
  config = {'arch': 'resnet18', 'base_width': 8, 'stem': 'cifar', 'head': 'moco',
            'head_hidden_dim': 2048, 'head_output_dim': 128}
  model32 = create_model(**config)
  model16 = create_model(**config, dtype=jnp.bfloat16)
  # Weights from a randomised reference (compiling the Flax initialisers takes ~30 s here).
  torch.manual_seed(0)
  reference = torch_reference.make_resnet('resnet18', head='moco', base_width=8, stem='cifar')
  torch_reference.randomize_(reference, torch.randn(2, 3, 16, 16))
  variables = torch_mapping.torch_to_flax(
      {k: v.numpy() for k, v in reference.state_dict().items()}, config)
  # XLA:CPU emulates bfloat16 convolutions slowly: a small batch at 16 px.
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  f32, e32 = jax.jit(model32.apply)(variables, images)
  f16, e16 = jax.jit(model16.apply)(variables, images)
  assert f16.dtype == jnp.float32 and e16.dtype == jnp.float32
  # Parameters stay float32 (the same variables serve both).
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  for low, high in ((f16, f32), (e16, e32)):
    relative = np.linalg.norm(np.asarray(low) - np.asarray(high)) / np.linalg.norm(high)
    assert 1e-6 < relative < 3e-2, relative  # bf16 really computed, and close


@pytest.mark.parametrize('arch,feature_dim', [
    ('resnet18', 512), ('resnet34', 512), ('resnet50', 2048), ('resnet101', 2048),
    ('resnet152', 2048), ('resnet50w2', 4096), ('resnet50w4', 8192)])
def test_registry_feature_widths_and_parameter_counts(arch, feature_dim):
  """Widths and parameter counts of the full networks against the PyTorch references."""
  model = create_model(arch)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  features = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 64, 64, 3)))[0], shapes)
  assert features.shape == (1, feature_dim)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))
  with torch.device('meta'):
    reference = torch_reference.make_resnet(arch)
  assert num_params == sum(p.numel() for p in reference.parameters())


def test_registry_rejects_unknown_names():
  assert set(available_archs()) >= {'resnet18', 'resnet50w4', 'efficientnet_b0'}
  with pytest.raises(ValueError, match="Unknown architecture 'resnet51'"):
    create_model('resnet51')
  with pytest.raises(ValueError, match="Unknown head 'byol'"):
    create_model('resnet18', head='byol')

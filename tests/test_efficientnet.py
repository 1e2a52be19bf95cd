"""EfficientNet-B0 against efficientnet_pytorch 0.7.1 with the same (random) weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from efficientnet_pytorch import EfficientNet as TorchEfficientNet

from bingo_jax.models import efficientnet as efficientnet_lib
from bingo_jax.models import registry
from bingo_jax.torch_io.mapping import efficientnet as mapping

B0_CONFIG = {'arch': 'efficientnet_b0', 'base_width': None}
# base_width 8 = width coefficient 0.25: first block 8 -> 8 channels, where the package's
# "first block of a stage never skips" rule matters.
NARROW_CONFIG = {'arch': 'efficientnet_b0', 'base_width': 8}


def _torch_model(width_coefficient: float = 1.0, seed: int = 0, **overrides):
  """efficientnet_pytorch model with random weights and non-trivial BatchNorm statistics."""
  torch.manual_seed(seed)
  model = TorchEfficientNet.from_name('efficientnet-b0', width_coefficient=width_coefficient,
                                      **overrides)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.2)
        module.running_mean.normal_(0.0, 0.2)
        module.running_var.uniform_(0.5, 2.0)
  return model


def _numpy_state(model) -> dict:
  return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}


def _torch_features(model, images_nchw: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model.extract_features(torch.from_numpy(images_nchw)).mean((2, 3)).numpy()


def _images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randn(batch, 3, size, size).astype(np.float32)


def _nhwc(images_nchw: np.ndarray) -> jax.Array:
  return jnp.asarray(images_nchw.transpose(0, 2, 3, 1))


def _relative_error(actual, expected) -> float:
  return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


@pytest.fixture(scope='module')
def b0():
  model = _torch_model().eval()
  return model, _numpy_state(model)


@pytest.fixture(scope='module')
def narrow():
  model = _torch_model(width_coefficient=0.25, seed=1).eval()
  return model, _numpy_state(model)


@pytest.mark.parametrize('size', [224, 97])
def test_eval_features_match_torch(b0, size):
  # 97 px: the fixed padding computed for 224 px is no longer SAME padding for this input.
  torch_model, state = b0
  variables = mapping.torch_to_flax(state, B0_CONFIG)
  model = registry.create_model('efficientnet_b0')
  images = _images(size)
  features, head_output = model.apply(variables, _nhwc(images), train=False)
  assert head_output is None
  assert features.shape == (2, 1280) and features.dtype == jnp.float32
  assert _relative_error(features, _torch_features(torch_model, images)) <= 1e-5


def test_narrow_model_matches_torch_at_odd_size(narrow):
  torch_model, state = narrow
  variables = mapping.torch_to_flax(state, NARROW_CONFIG)
  model = registry.create_model('efficientnet_b0', base_width=8)
  assert model.feature_dim == 320
  images = _images(97, seed=1)
  features, _ = model.apply(variables, _nhwc(images), train=False)
  assert _relative_error(features, _torch_features(torch_model, images)) <= 1e-5


def test_round_trip_is_exact_and_loads_strictly(b0):
  torch_model, state = b0
  exported = mapping.flax_to_torch(mapping.torch_to_flax(state, B0_CONFIG), B0_CONFIG)
  backbone_keys = {key for key in state if not key.startswith('_fc.')}
  assert set(exported) == backbone_keys
  for key in backbone_keys:
    assert exported[key].dtype == state[key].dtype, key
    assert np.array_equal(exported[key], state[key]), key
  fresh = TorchEfficientNet.from_name('efficientnet-b0')
  loadable = {key: torch.from_numpy(value) for key, value in exported.items()}
  loadable.update({key: value for key, value in torch_model.state_dict().items()
                   if key.startswith('_fc.')})
  fresh.load_state_dict(loadable, strict=True)


def test_torch_to_flax_names_missing_unexpected_and_misshapen_keys(b0):
  _, state = b0
  missing = dict(state)
  del missing['_blocks.7._se_reduce.bias']
  with pytest.raises(ValueError, match=r'missing keys: _blocks\.7\._se_reduce\.bias'):
    mapping.torch_to_flax(missing, B0_CONFIG)

  misshapen = dict(state)
  misshapen['_blocks.2._depthwise_conv.weight'] = np.zeros((144, 1, 5, 5), np.float32)
  with pytest.raises(ValueError, match=r'_blocks\.2\._depthwise_conv\.weight has \(144, 1, 5, 5\)'):
    mapping.torch_to_flax(misshapen, B0_CONFIG)

  unexpected = dict(state)
  unexpected['_blocks.16._bn0.weight'] = np.ones(8, np.float32)
  with pytest.raises(ValueError, match=r'unexpected keys: _blocks\.16\._bn0\.weight'):
    mapping.torch_to_flax(unexpected, B0_CONFIG)

  # A narrow checkpoint is not a B0 one.
  with pytest.raises(ValueError, match='wrong shapes'):
    mapping.torch_to_flax(state, NARROW_CONFIG)


def test_flax_to_torch_names_missing_and_misshapen_variables(b0):
  _, state = b0
  variables = mapping.torch_to_flax(state, B0_CONFIG)
  del variables['batch_stats']['backbone']['blocks_4']['bn1']['var']
  with pytest.raises(ValueError, match='missing keys: batch_stats/backbone/blocks_4/bn1/var'):
    mapping.flax_to_torch(variables, B0_CONFIG)

  variables = mapping.torch_to_flax(state, B0_CONFIG)
  variables['params']['backbone']['conv_head']['kernel'] = np.zeros((1, 1, 320, 1000))
  with pytest.raises(ValueError, match='params/backbone/conv_head/kernel has'):
    mapping.flax_to_torch(variables, B0_CONFIG)


def test_flax_variables_have_the_mapped_structure(narrow):
  # The Flax module's own variable tree must be exactly the one the mapping produces.
  _, state = narrow
  model = registry.create_model('efficientnet_b0', base_width=8)
  initial = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  mapped = mapping.torch_to_flax(state, NARROW_CONFIG)
  shapes = lambda tree: jax.tree.map(lambda leaf: tuple(leaf.shape), dict(tree))
  assert shapes(initial) == shapes(mapped)


def test_training_mode_batch_statistics_match_torch():
  # Without drop-connect and dropout, training mode is deterministic: batch statistics for the
  # output and PyTorch's running-statistics update (momentum 0.01, unbiased variance).
  torch_model = _torch_model(width_coefficient=0.25, seed=3, drop_connect_rate=0.0).train()
  state = _numpy_state(torch_model)
  images = _images(64, batch=4, seed=2)
  expected_features = _torch_features(torch_model, images)
  expected_state = _numpy_state(torch_model)

  model = efficientnet_lib.EfficientNet(width_coefficient=0.25, drop_connect_rate=0.0,
                                        dropout_rate=0.0)
  variables = mapping.torch_to_flax(state, NARROW_CONFIG)
  flax_variables = {'params': variables['params']['backbone'],
                    'batch_stats': variables['batch_stats']['backbone']}
  features, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      flax_variables, _nhwc(images))
  assert _relative_error(features, expected_features) <= 1e-4
  updated = mapping.flax_to_torch(
      {'params': variables['params'], 'batch_stats': {'backbone': updates['batch_stats']}},
      NARROW_CONFIG)
  for key in expected_state:
    if key.endswith('running_mean') or key.endswith('running_var'):
      np.testing.assert_allclose(updated[key], expected_state[key], rtol=1e-4, atol=1e-5,
                                 err_msg=key)


def test_training_mode_needs_rng_and_applies_dropout(narrow):
  _, state = narrow
  variables = mapping.torch_to_flax(state, NARROW_CONFIG)
  model = registry.create_model('efficientnet_b0', base_width=8)
  images = jnp.asarray(_images(32, batch=8).transpose(0, 2, 3, 1))
  with pytest.raises(ValueError, match="'dropout' rng"):
    model.apply(variables, images, train=True, mutable=['batch_stats'])

  def train_features(module, seed):
    apply = jax.jit(lambda v, x, rng: module.apply(v, x, train=True, mutable=['batch_stats'],
                                                   rngs={'dropout': rng}))
    (features, _), _ = apply(variables, images, jax.random.PRNGKey(seed))
    return np.asarray(features)

  first, second = train_features(model, 1), train_features(model, 2)
  assert np.all(np.isfinite(first)) and not np.array_equal(first, second)

  # Dropout alone (no drop-connect): kept features are the dropout-free ones / 0.8.
  no_drop_connect = efficientnet_lib.EfficientNet(width_coefficient=0.25, drop_connect_rate=0.0,
                                                  name='backbone')
  without_dropout = efficientnet_lib.EfficientNet(width_coefficient=0.25, drop_connect_rate=0.0,
                                                  dropout_rate=0.0, name='backbone')
  dropped = train_features(registry.Model(no_drop_connect), 5)
  reference = train_features(registry.Model(without_dropout), 5)
  kept = dropped != 0
  assert 0.1 < 1 - kept.mean() < 0.3
  np.testing.assert_allclose(dropped[kept], reference[kept] / 0.8, rtol=1e-5, atol=1e-6)

  # Eval mode is deterministic and needs no rng.
  eval_apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  assert np.array_equal(np.asarray(eval_apply(variables, images)),
                        np.asarray(eval_apply(variables, images)))


def test_bfloat16_compute_stays_close_to_torch_float32(b0):
  torch_model, state = b0
  variables = mapping.torch_to_flax(state, B0_CONFIG)
  model = registry.create_model('efficientnet_b0', dtype='bfloat16')
  images = _images(97, seed=4)
  features, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, _nhwc(images))
  assert features.dtype == jnp.float32
  assert _relative_error(features, _torch_features(torch_model, images)) <= 5e-2


def test_registry_and_detection(b0):
  _, state = b0
  assert 'efficientnet_b0' in registry.available_archs()
  assert registry.create_model('efficientnet_b0').feature_dim == 1280
  with pytest.raises(ValueError, match="stem='cifar'"):
    registry.create_model('efficientnet_b0', stem='cifar')
  assert mapping.looks_like_efficientnet(state)
  assert mapping.looks_like_efficientnet({f'module.encoder_q.{k}': v for k, v in state.items()})
  assert not mapping.looks_like_efficientnet({'conv1.weight': 0, 'layer1.0.conv1.weight': 0})


def test_static_padding_matches_the_package():
  # Closed-form values of Conv2dStaticSamePadding for the nominal 224 px image.
  assert efficientnet_lib.static_same_padding(224, 3, 2) == (0, 1)
  assert efficientnet_lib.static_same_padding(56, 5, 2) == (1, 2)
  assert efficientnet_lib.static_same_padding(14, 5, 1) == (2, 2)
  assert efficientnet_lib.static_same_padding(7, 1, 1) == (0, 0)

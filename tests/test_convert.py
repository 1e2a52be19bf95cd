"""PyTorch checkpoint -> Flax conversion: exact parity with the PyTorch networks.

The references are the torchvision-named networks of ``tests/torch_reference.py`` (and the
``efficientnet_pytorch`` package). For every architecture at full width, random weights with
non-trivial BatchNorm statistics are saved in real checkpoint layouts (MoCo v1/v2 with
``encoder_q``/``encoder_k``/``queue``, SwAV with ``prototypes``, torchvision; with and without
``module.``, wrapped in ``state_dict`` or not), converted from the file, and the pooled
features and head outputs are compared with the PyTorch eval-mode forward on the same images
(relative error <= 1e-5, 97 px for all, 224 px for some); exporting the converted variables
back to the same layout must give every tensor bit for bit.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bingo_jax.models import create_model
from bingo_jax.store import model_io
from bingo_jax.torch_io import checkpoints as torch_checkpoints
from bingo_jax.torch_io.checkpoints import CheckpointError

import torch_reference
from tool_runner import run_tool
from torch_reference import one_torch_thread  # noqa: F401  (autouse: torch on one thread)

TOLERANCE = 1e-5


# --- checkpoint layouts, written here from their description (not with the code under test) ---

def to_layout(state_dict: dict, layout: str, arch: str, module_prefix: bool = True,
              wrapped: bool = False, full_key_encoder: bool = True) -> dict:
  """A reference model's ``state_dict()`` saved the way a real release saves it.

  layout: 'moco' (MoCo v1/v2 ``main_moco.py``), 'bingo_teacher' (released BINGO training
  checkpoint, the SwAV teacher as ``encoder_k`` with its head under ``fc.0/1/3``), 'swav',
  'torchvision'. ``full_key_encoder=False`` stores only the stem of the other MoCo encoder
  (for ResNet-50x4, whose two full encoders would take 3.6 GB).
  """
  prefix = 'module.' if module_prefix else ''
  if layout in ('moco', 'bingo_teacher'):
    encoder = 'encoder_q' if layout == 'moco' else 'encoder_k'
    other = 'encoder_k' if layout == 'moco' else 'encoder_q'
    state = {}
    for key, value in state_dict.items():
      if layout == 'bingo_teacher':
        key = key.replace('projection_head.', 'fc.')
        if key.startswith('prototypes'):
          continue
      state[f'{prefix}{encoder}.{key}'] = value
      # The other encoder differs, so that taking the wrong one cannot pass.
      if full_key_encoder or key == 'conv1.weight':
        state[f'{prefix}{other}.{key}'] = value * 2 if value.is_floating_point() else value
    state[f'{prefix}queue'] = torch.randn(128, 256)
    state[f'{prefix}queue_ptr'] = torch.zeros(1, dtype=torch.long)
    return {'epoch': 200, 'arch': arch, 'state_dict': state,
            'optimizer': {'state': {}, 'param_groups': [{'lr': 0.0, 'params': []}]}}
  state = {f'{prefix}{k}': v for k, v in state_dict.items()}
  return {'state_dict': state} if wrapped else state


def model_tensors(obj: dict, layout: str) -> dict:
  """The model's own tensors of a layout, unprefixed (what a round trip must give back)."""
  state = obj.get('state_dict', obj)
  out = {}
  for key, value in state.items():
    key = key[len('module.'):] if key.startswith('module.') else key
    if layout == 'moco':
      if not key.startswith('encoder_q.'):
        continue
      key = key[len('encoder_q.'):]
    if layout == 'swav' and key.startswith('prototypes'):
      continue
    out[key] = value
  return out


def relative_error(actual, expected: torch.Tensor) -> float:
  """Largest per-example ||actual - expected|| / ||expected||."""
  actual = np.asarray(actual, np.float64)
  expected = expected.detach().double().numpy()
  return float(np.max(np.linalg.norm(actual - expected, axis=1)
                      / np.linalg.norm(expected, axis=1)))


def nhwc(images: torch.Tensor) -> jnp.ndarray:
  return jnp.asarray(images.numpy().transpose(0, 2, 3, 1))


class FlaxForward:
  """Backbone and head applied as ``Model.__call__`` applies them, jitted separately so that
  one compiled backbone per architecture and image size serves every head."""

  def __init__(self):
    self._backbones = {}

  def __call__(self, model_config: dict, variables: dict, images: torch.Tensor):
    model = create_model(**model_config)
    key = (model_config['arch'], model_config.get('base_width'), tuple(images.shape))
    if key not in self._backbones:
      self._backbones[key] = jax.jit(
          lambda v, x: model.apply(v, x, method=lambda m, x: m.backbone(x, train=False)))
    backbone_vars = {c: {'backbone': tree['backbone']} for c, tree in variables.items()}
    features = self._backbones[key](backbone_vars, nhwc(images))
    if model.head is None:
      return features, None
    head_vars = {c: {'head': tree['head']} for c, tree in variables.items() if 'head' in tree}
    head_output = jax.jit(lambda v, f: model.apply(
        v, f, method=lambda m, f: m.head(f, train=False)))(head_vars, features)
    return features, head_output


# (head, layout, options) per architecture: every head and every layout variant is covered,
# each architecture at full width. SwAV layouts use SwAV's padded stem.
CASES = {
    'resnet18': [('moco', 'moco', {}), ('linear', 'torchvision', {'module_prefix': False}),
                 ('swav', 'swav', {'module_prefix': True}),
                 ('swav', 'bingo_teacher', {'encoder': 'encoder_k'})],
    'resnet34': [('linear', 'torchvision', {'module_prefix': False, 'wrapped': True}),
                 ('moco', 'moco', {'module_prefix': False}),
                 ('swav', 'swav', {'module_prefix': False})],
    'resnet50': [('moco', 'moco', {}), ('swav', 'swav', {'module_prefix': True}),
                 ('linear', 'torchvision', {'module_prefix': True, 'num_classes': 1000})],
    'resnet101': [('linear', 'torchvision', {'module_prefix': False}), ('moco', 'moco', {}),
                  ('swav', 'swav', {'module_prefix': True, 'wrapped': True})],
    'resnet152': [('moco', 'moco', {}), ('linear', 'moco', {'num_classes': 128}),  # MoCo v1
                  ('swav', 'swav', {'module_prefix': True})],
    'resnet50w2': [('swav', 'swav', {'module_prefix': True, 'head_hidden_dim': 8192}),
                   ('moco', 'moco', {}), ('linear', 'torchvision', {'module_prefix': False})],
    # 375M parameters: one case keeps the test within memory (about 1.8 GB per copy) and
    # time; the MoCo and linear heads are dense layers tested on every other feature width.
    'resnet50w4': [('swav', 'swav', {'module_prefix': True, 'head_hidden_dim': 8192})],
}
SIZES = {'resnet18': (97, 224), 'resnet50': (97, 224)}  # 224 px also in the CLI test
BATCH = {'resnet50w4': 1}


@pytest.mark.parametrize('arch', list(CASES))
def test_full_size_parity_and_round_trip(arch, tmp_path):
  torch.manual_seed(0)
  reference = torch_reference.make_resnet(arch)
  calibration = torch.randn(2, 3, 64, 64)
  sizes = SIZES.get(arch, (97,))
  images = {size: torch.randn(BATCH.get(arch, 2), 3, size, size) for size in sizes}
  forward = FlaxForward()
  failures = []
  for seed, (head, layout, options) in enumerate(CASES[arch]):
    options = dict(options)
    encoder = options.pop('encoder', 'encoder_q')
    module_prefix = options.pop('module_prefix', True)
    wrapped = options.pop('wrapped', False)
    reference.set_head(head, **options)
    reference.use_swav_stem(layout in ('swav', 'bingo_teacher'))
    torch_reference.randomize_(reference, calibration, seed=seed)
    with torch.no_grad():
      expected = {size: reference(x) for size, x in images.items()}
    path = str(tmp_path / f'{head}_{layout}.pth')
    torch.save(to_layout(reference.state_dict(), layout, arch, module_prefix, wrapped), path)
    if seed == len(CASES[arch]) - 1:
      del reference  # the big networks need the memory for the conversion
      gc.collect()

    converted = torch_checkpoints.convert_torch_checkpoint(path, encoder=encoder)
    case = f'{arch} {head} head, {layout} layout'
    assert converted.model_config['arch'] == arch, case
    assert converted.model_config['head'] == head, case
    expected_format = 'moco' if layout == 'bingo_teacher' else layout
    assert converted.metadata['source_format'] == expected_format, case

    # One device copy replaces the numpy one (ResNet-50x4: 1.8 GB each).
    converted.variables = jax.tree.map(jnp.asarray, converted.variables)
    for size, x in images.items():
      features, head_output = forward(converted.model_config, converted.variables, x)
      want_features, want_head = expected[size]
      errors = (relative_error(features, want_features), relative_error(head_output, want_head))
      print(f'{case} at {size} px: relative errors {errors[0]:.1e} (features), '
            f'{errors[1]:.1e} (head)')  # shown with pytest -s
      if max(errors) > TOLERANCE:
        failures.append(f'{case} at {size} px: relative errors features {errors[0]:.2e}, '
                        f'head {errors[1]:.2e}')

    # torch -> Flax -> torch, in the layout the file came in: every tensor bit for bit.
    if layout != 'bingo_teacher':
      exported = model_tensors(torch_checkpoints.torch_layout_state_dict(
          converted.variables, converted.model_config, layout,
          num_batches_tracked=converted.metadata['num_batches_tracked']), layout)
      del converted
      original = model_tensors(torch.load(path, weights_only=True, mmap=True), layout)
      assert sorted(exported) == sorted(original), f'{case}: {set(exported) ^ set(original)}'
      for key in list(original):
        value = original.pop(key).numpy()
        back = exported.pop(key)
        if back.dtype != value.dtype or not np.array_equal(back, value):
          failures.append(f'{case}: round trip changed {key}')
    converted = exported = original = None
    gc.collect()
    os.remove(path)
  assert not failures, '\n'.join(failures)


def test_efficientnet_heads_parity_and_round_trip(tmp_path):
  """EfficientNet-B0 (efficientnet_pytorch) with its ``_fc`` classifier in a flat file, and the
  released-BINGO MoCo layout (``encoder_q`` with the MLP head renamed ``fc.0``/``fc.2``)."""
  from efficientnet_pytorch import EfficientNet
  torch.manual_seed(0)
  reference = EfficientNet.from_name('efficientnet-b0', num_classes=10)
  with torch.no_grad():
    for module in reference.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
        module.weight.uniform_(0.5, 1.2)
        module.bias.normal_(0, 0.1)
        module.num_batches_tracked.fill_(7)
  reference.eval()
  images = torch.randn(1, 3, 97, 97)
  with torch.no_grad():
    want_features = torch.flatten(reference._avg_pooling(reference.extract_features(images)), 1)
    want_logits = reference(images)

  flat_path = str(tmp_path / 'effb0.pth')
  torch.save(reference.state_dict(), flat_path)
  converted = torch_checkpoints.convert_torch_checkpoint(flat_path)
  assert converted.metadata['source_format'] == 'efficientnet'
  assert converted.model_config == {'arch': 'efficientnet_b0', 'head': 'linear',
                                    'num_classes': 10}
  features, logits = FlaxForward()(converted.model_config, converted.variables, images)
  assert relative_error(features, want_features) <= TOLERANCE
  assert relative_error(logits, want_logits) <= TOLERANCE
  exported = torch_checkpoints.torch_layout_state_dict(
      converted.variables, converted.model_config, 'efficientnet',
      num_batches_tracked=converted.metadata['num_batches_tracked'])
  original = reference.state_dict()
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    assert np.array_equal(exported[key], value.numpy()), key

  # BINGO's student layout: encoder_q with the MoCo MLP head as fc.0 / fc.2.
  mlp = torch.nn.Sequential(torch.nn.Linear(1280, 2048), torch.nn.ReLU(),
                            torch.nn.Linear(2048, 128))
  state = {k: v for k, v in original.items() if not k.startswith('_fc')}
  state.update({f'fc.{k}': v for k, v in mlp.state_dict().items()})
  moco_path = str(tmp_path / 'effb0_moco.pth')
  torch.save(to_layout(state, 'moco', 'efficientnet-b0'), moco_path)
  converted = torch_checkpoints.convert_torch_checkpoint(moco_path)
  assert converted.model_config['head'] == 'moco'
  _, embedding = FlaxForward()(converted.model_config, converted.variables, images)
  with torch.no_grad():
    assert relative_error(embedding, mlp(want_features)) <= TOLERANCE


def test_cli_random_checkpoint_convert_load_and_embed(tmp_path):
  """tools/make_random_torch_checkpoint.py -> bingo-convert -> load_model:
  the file loads strictly into the reference ResNet-18, and the model file's ``embed`` (the
  full ``Model.__call__``) matches it at 224 px; the metadata record describes the source."""
  source = str(tmp_path / 'r18_moco.pth')
  assert run_tool('make_random_torch_checkpoint.py', '--arch', 'resnet18', '--format', 'moco',
                  '--out', source) == 0
  destination = str(tmp_path / 'teacher')
  assert run_tool('convert_torch_teacher.py', source, destination) == 0

  checkpoint = torch.load(source, weights_only=True)
  reference = torch_reference.make_resnet('resnet18', head='moco')
  reference.load_state_dict({k[len('module.encoder_q.'):]: v
                             for k, v in checkpoint['state_dict'].items()
                             if k.startswith('module.encoder_q.')}, strict=True)
  reference.eval()
  loaded = model_io.load_model(destination)
  images = torch.randn(2, 3, 224, 224)
  features, embedding = loaded.embed(nhwc(images))
  with torch.no_grad():
    want_features, want_embedding = reference(images)
  assert relative_error(features, want_features) <= TOLERANCE
  assert relative_error(embedding, want_embedding) <= TOLERANCE

  meta = loaded.metadata
  assert meta['arch'] == 'resnet18' and meta['head'] == 'moco'
  assert meta['source_format'] == 'moco'
  assert meta['source_file'] == os.path.abspath(source)
  assert meta['source_sha256'] == torch_checkpoints.sha256_of(source)
  with open(source, 'rb') as f:
    assert meta['source_sha256'] == hashlib.sha256(f.read()).hexdigest()


def test_head_none_drops_the_head_and_records_it(tmp_path):
  reference = torch_reference.make_resnet('resnet18', head='linear', base_width=8, stem='cifar')
  torch_reference.randomize_(reference, torch.randn(2, 3, 16, 16))
  path = str(tmp_path / 'tv.pth')
  torch.save(reference.state_dict(), path)
  converted = torch_checkpoints.convert_torch_checkpoint(path, head='none')
  assert 'head' not in converted.variables['params']
  assert converted.model_config.get('head') is None
  assert converted.metadata['dropped_head_tensors'] == ['fc.bias', 'fc.weight']
  assert converted.model_config['base_width'] == 8 and converted.model_config['stem'] == 'cifar'
  images = torch.randn(2, 3, 32, 32)
  features, head_output = FlaxForward()(converted.model_config, converted.variables, images)
  assert head_output is None
  with torch.no_grad():
    assert relative_error(features, reference(images)[0]) <= TOLERANCE


# --- bad input: one test per case, each message names the file and/or the offending key ---

def _small_state(head='moco'):
  reference = torch_reference.make_resnet('resnet18', head=head, base_width=8, stem='cifar')
  return reference.state_dict()


def _save(tmp_path, obj, name='bad.pth'):
  path = str(tmp_path / name)
  torch.save(obj, path)
  return path


def test_error_not_a_checkpoint(tmp_path):
  path = tmp_path / 'notes.pth'
  path.write_text('this is not a checkpoint')
  with pytest.raises(CheckpointError, match='notes.pth is not a PyTorch checkpoint'):
    torch_checkpoints.convert_torch_checkpoint(str(path))


def test_error_checkpoint_that_is_not_a_dict(tmp_path):
  path = _save(tmp_path, [torch.zeros(3)], 'list.pth')
  with pytest.raises(CheckpointError, match=r'list\.pth is not a checkpoint: .* list'):
    torch_checkpoints.convert_torch_checkpoint(path)


def test_error_checkpoint_with_pickled_objects(tmp_path):
  path = _save(tmp_path, {'args': argparse.Namespace(lr=0.1), 'state_dict': _small_state()},
               'pickled.pth')
  with pytest.raises(CheckpointError, match=r'pickled\.pth .*weights_only=True'):
    torch_checkpoints.convert_torch_checkpoint(path)


def test_error_checkpoint_without_tensors(tmp_path):
  path = _save(tmp_path, {'epoch': 3, 'arch': 'resnet50'}, 'empty.pth')
  with pytest.raises(CheckpointError, match=r'empty\.pth holds no tensors .*arch, epoch'):
    torch_checkpoints.convert_torch_checkpoint(path)


def test_error_unknown_layout(tmp_path):
  path = _save(tmp_path, {'backbone.stem.weight': torch.zeros(8, 3, 3, 3),
                          'backbone.blocks.0.weight': torch.zeros(8)}, 'vit.pth')
  with pytest.raises(CheckpointError,
                     match=r'vit\.pth: unknown checkpoint layout.*backbone\.blocks\.0\.weight'):
    torch_checkpoints.convert_torch_checkpoint(path)


def test_error_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere.pth'):
    torch_checkpoints.convert_torch_checkpoint(str(tmp_path / 'nowhere.pth'))


def test_error_missing_tensor(tmp_path):
  state = _small_state()
  del state['layer3.1.bn2.running_var']
  path = _save(tmp_path, state, 'partial.pth')
  with pytest.raises(ValueError, match=r'(?s)partial\.pth.*missing tensors: layer3\.1\.bn2\.running_var'):
    torch_checkpoints.convert_torch_checkpoint(path)


def test_error_shape_mismatch(tmp_path):
  state = _small_state()
  state['layer2.0.conv2.weight'] = torch.zeros(16, 16, 5, 5)
  path = _save(tmp_path, state, 'shapes.pth')
  with pytest.raises(ValueError, match=r'(?s)shapes\.pth.*layer2\.0\.conv2\.weight: checkpoint '
                                       r'\(16, 16, 5, 5\), model expects \(16, 16, 3, 3\)'):
    torch_checkpoints.convert_torch_checkpoint(path)


def test_error_tensor_that_belongs_to_no_layer(tmp_path):
  state = _small_state()
  state['layer1.0.se.weight'] = torch.zeros(8)
  path = _save(tmp_path, state, 'extra.pth')
  with pytest.raises(ValueError, match=r'(?s)extra\.pth.*belong to no layer: layer1\.0\.se\.weight'):
    torch_checkpoints.convert_torch_checkpoint(path)


def test_error_head_incomplete(tmp_path):
  state = _small_state('moco')
  del state['fc.2.weight']
  path = _save(tmp_path, state, 'head.pth')
  with pytest.raises(ValueError, match=r'head\.pth: the MoCo v2 MLP head is incomplete; '
                                       r'missing tensors: fc\.2\.weight'):
    torch_checkpoints.convert_torch_checkpoint(path)


def test_error_wrong_arch_requested(tmp_path):
  path = _save(tmp_path, _small_state(), 'r18.pth')
  with pytest.raises(ValueError, match=r'(?s)r18\.pth.*resnet50.*missing tensors: .*layer1\.0\.bn3'):
    torch_checkpoints.convert_torch_checkpoint(path, arch='resnet50')


def test_error_wrong_head_requested(tmp_path):
  path = _save(tmp_path, _small_state('linear'), 'linear.pth')
  with pytest.raises(ValueError, match=r'linear\.pth: --head swav .*fc\.bias, fc\.weight.* '
                                       r'are a linear head'):
    torch_checkpoints.convert_torch_checkpoint(path, head='swav')


def test_error_wrong_format_requested(tmp_path):
  path = _save(tmp_path, _small_state(), 'flat.pth')
  with pytest.raises(CheckpointError, match=r'flat\.pth: --format moco expects tensors named '
                                            r'encoder_q\.\*'):
    torch_checkpoints.convert_torch_checkpoint(path, source_format='moco')


def test_error_swav_without_hidden_layer(tmp_path):
  state = {f'module.{k}': v for k, v in _small_state(None).items()}
  state['module.projection_head.weight'] = torch.zeros(128, 64)
  state['module.projection_head.bias'] = torch.zeros(128)
  path = _save(tmp_path, state, 'swav0.pth')
  with pytest.raises(ValueError, match=r'swav0\.pth: projection_head\.weight .*--head none'):
    torch_checkpoints.convert_torch_checkpoint(path)


def test_cli_reports_errors_and_refuses_to_overwrite(tmp_path, capsys):
  path = _save(tmp_path, _small_state(), 'r18.pth')
  bad = tmp_path / 'bad.pth'
  bad.write_bytes(b'\x00' * 10)
  assert run_tool('convert_torch_teacher.py', str(bad), str(tmp_path / 'out_bad')) == 1
  assert 'bad.pth is not a PyTorch checkpoint' in capsys.readouterr().err
  assert not (tmp_path / 'out_bad').exists()
  out = tmp_path / 'out'
  out.mkdir()
  assert run_tool('convert_torch_teacher.py', path, str(out)) == 1
  assert f'{out} already exists' in capsys.readouterr().err


def test_arch_given_keeps_the_checkpoint_width(tmp_path):
  """--arch names the architecture; the width still comes from the tensors (a narrow ResNet-18
  converted with arch='resnet18' must not be read as a 64-wide one)."""
  state = _small_state(None)
  path = _save(tmp_path, state, 'narrow.pth')
  converted = torch_checkpoints.convert_torch_checkpoint(path, arch='resnet18')
  assert converted.model_config['base_width'] == 8
  np.testing.assert_array_equal(converted.variables['params']['backbone']['conv1']['kernel'],
                                state['conv1.weight'].numpy().transpose(2, 3, 1, 0))


def test_overwrite_replaces_the_model_file_and_a_failed_write_keeps_the_old_one(tmp_path):
  out = str(tmp_path / 'model')
  old = {'params': {'w': np.zeros(3, np.float32)}}
  model_io.save_model(out, {'arch': 'resnet18'}, old, metadata={'version': 'old'})
  with pytest.raises(TypeError):  # metadata that JSON cannot hold: fails before the rename
    model_io.save_model(out, {'arch': 'resnet18'}, old, metadata={'bad': object()},
                        overwrite=True)
  assert model_io.read_record(out)['metadata'] == {'version': 'old'}
  model_io.save_model(out, {'arch': 'resnet18'}, old, metadata={'version': 'new'},
                      overwrite=True)
  assert model_io.read_record(out)['metadata'] == {'version': 'new'}
  assert sorted(os.listdir(tmp_path)) == ['model']  # no staging or set-aside directory left


def test_narrow_efficientnet_file_converts_at_its_width(tmp_path):
  """An efficientnet_pytorch file of a narrow network (what exporting a base_width=8 student
  writes) converts at that width and computes what the package computes."""
  from efficientnet_pytorch import EfficientNet
  torch.manual_seed(0)
  reference = EfficientNet.from_name('efficientnet-b0', width_coefficient=0.25,
                                     num_classes=10).eval()
  path = str(tmp_path / 'narrow_effb0.pth')
  torch.save(reference.state_dict(), path)
  converted = torch_checkpoints.convert_torch_checkpoint(path)
  assert converted.model_config == {'arch': 'efficientnet_b0', 'base_width': 8,
                                    'head': 'linear', 'num_classes': 10}
  images = torch.randn(2, 3, 64, 64)
  features, logits = FlaxForward()(converted.model_config, converted.variables, images)
  with torch.no_grad():
    want_features = torch.flatten(reference._avg_pooling(reference.extract_features(images)), 1)
    assert relative_error(features, want_features) <= TOLERANCE
    assert relative_error(logits, reference(images)) <= TOLERANCE


def test_efficientnet_stray_head_named_tensor_is_refused(tmp_path):
  """A tensor under the other head name (``fc.*`` beside the ``_fc`` classifier) belongs to no
  layer of the converted model: refused, not silently skipped."""
  from efficientnet_pytorch import EfficientNet
  state = EfficientNet.from_name('efficientnet-b0', width_coefficient=0.25,
                                 num_classes=10).state_dict()
  state['fc.weight'] = torch.zeros(10, 320)
  path = _save(tmp_path, state, 'stray.pth')
  with pytest.raises(ValueError, match=r'(?s)stray\.pth.*fc\.weight'):
    torch_checkpoints.convert_torch_checkpoint(path)

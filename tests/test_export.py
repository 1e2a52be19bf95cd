"""bingo_jax model -> PyTorch export: what the PyTorch tools downstream of BINGO accept.

Checked against independent consumers: the torchvision-named reference ResNets (strict
loading), the logic of MoCo's ``main_lincls.py`` (key selection and renaming, then a load that
must miss only ``fc``), the key renaming of MoCo's ``detection/convert-pretrain-to-detectron2.py``
against the parameter names detectron2's ResNet builds (both written here from their
descriptions), and the ``efficientnet_pytorch`` package.
"""

from __future__ import annotations


import jax
import numpy as np
import pytest
import torch

from bingo_jax.store import model_io
from bingo_jax.torch_io import checkpoints as torch_checkpoints

import torch_reference
from tool_runner import run_tool
from torch_reference import one_torch_thread  # noqa: F401  (autouse: torch on one thread)


def make_model_file(tmp_path, arch='resnet18', head='moco', name='model', **kwargs):
  """A model file converted from a randomised reference ResNet; returns (path, reference)."""
  torch.manual_seed(0)
  reference = torch_reference.make_resnet(arch, head=head, **kwargs)
  size = 16 if kwargs.get('stem') == 'cifar' else 64
  torch_reference.randomize_(reference, torch.randn(2, 3, size, size))
  source = str(tmp_path / f'{name}.pth')
  torch.save(reference.state_dict(), source)
  destination = str(tmp_path / name)
  torch_checkpoints.convert_to_model_file(source, destination)
  return destination, reference


def assert_same_tensors(actual: dict, expected: dict):
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    assert torch.equal(actual[key], value), key


def test_torchvision_layout_loads_strictly_with_and_without_head(tmp_path):
  model_file, reference = make_model_file(tmp_path, head='linear', num_classes=10)
  out = str(tmp_path / 'r18.pth')
  assert run_tool('export_torch.py', model_file, out, '--format', 'torchvision') == 0
  state = torch.load(out, weights_only=True)
  fresh = torch_reference.make_resnet('resnet18', head='linear', num_classes=10)
  fresh.load_state_dict(state, strict=True)
  assert_same_tensors(fresh.state_dict(), reference.state_dict())

  out = str(tmp_path / 'r18_backbone.pth')
  assert run_tool('export_torch.py', model_file, out, '--format', 'torchvision',
                  '--drop_head') == 0
  backbone = torch_reference.make_resnet('resnet18', head=None)  # torchvision with fc=Identity
  backbone.load_state_dict(torch.load(out, weights_only=True), strict=True)


def test_torchvision_layout_of_mlp_heads(tmp_path):
  model_file, reference = make_model_file(tmp_path, head='swav', head_hidden_dim=64)
  out = str(tmp_path / 'swav_tv.pth')
  assert run_tool('export_torch.py', model_file, out, '--format', 'torchvision') == 0
  fresh = torch_reference.make_resnet('resnet18', head='swav', head_hidden_dim=64)
  result = fresh.load_state_dict(torch.load(out, weights_only=True), strict=False)
  # The prototypes are not part of a bingo_jax model; everything else loads.
  assert result.missing_keys == ['prototypes.weight'] and not result.unexpected_keys
  expected = {k: v for k, v in reference.state_dict().items() if not k.startswith('prototypes')}
  assert_same_tensors({k: v for k, v in fresh.state_dict().items()
                       if not k.startswith('prototypes')}, expected)


def lincls_backbone_state(checkpoint: dict) -> dict:
  """What MoCo's main_lincls.py does with ``--pretrained``: keep the keys under
  ``module.encoder_q`` except its ``fc``, strip the prefix."""
  state = dict(checkpoint['state_dict'])
  for key in list(state):
    if key.startswith('module.encoder_q') and not key.startswith('module.encoder_q.fc'):
      state[key[len('module.encoder_q.'):]] = state[key]
    del state[key]
  return state


def test_moco_layout_feeds_main_lincls(tmp_path):
  model_file, reference = make_model_file(tmp_path, head='moco')
  out = str(tmp_path / 'student.pth.tar')
  assert run_tool('export_torch.py', model_file, out, '--format', 'moco') == 0
  checkpoint = torch.load(out, weights_only=True)
  assert checkpoint['arch'] == 'resnet18'
  assert all(k.startswith('module.encoder_q.') for k in checkpoint['state_dict'])
  assert {'module.encoder_q.fc.0.weight', 'module.encoder_q.fc.2.weight'} <= set(
      checkpoint['state_dict'])

  # main_lincls: a fresh torchvision model with a 1000-way fc; only fc may be missing.
  classifier = torch_reference.make_resnet('resnet18', head='linear')
  result = classifier.load_state_dict(lincls_backbone_state(checkpoint), strict=False)
  assert set(result.missing_keys) == {'fc.weight', 'fc.bias'}
  assert not result.unexpected_keys
  # ... and the selected keys are exactly a backbone: strict load without fc.
  backbone = torch_reference.make_resnet('resnet18', head=None)
  backbone.load_state_dict(lincls_backbone_state(checkpoint), strict=True)
  expected = {k: v for k, v in reference.state_dict().items() if not k.startswith('fc')}
  assert_same_tensors(backbone.state_dict(), expected)


def detectron2_rename(checkpoint: dict) -> dict:
  """The renaming of MoCo's convert-pretrain-to-detectron2.py, from its description: keep
  ``module.encoder_q.*`` without the prefix; keys outside the ``layerN`` stages get ``stem.``;
  ``layerN`` -> ``res{N+1}``; ``bn{1,2,3}`` -> ``conv{1,2,3}.norm``; ``downsample.0`` ->
  ``shortcut``, ``downsample.1`` -> ``shortcut.norm``."""
  renamed = {}
  for key, value in checkpoint['state_dict'].items():
    if not key.startswith('module.encoder_q.'):
      continue
    key = key[len('module.encoder_q.'):]
    if 'layer' not in key:
      key = 'stem.' + key
    for stage in (1, 2, 3, 4):
      key = key.replace(f'layer{stage}', f'res{stage + 1}')
    for index in (1, 2, 3):
      key = key.replace(f'bn{index}', f'conv{index}.norm')
    key = key.replace('downsample.0', 'shortcut').replace('downsample.1', 'shortcut.norm')
    renamed[key] = value
  return renamed


def detectron2_resnet_parameters(stage_sizes, bottleneck: bool, base_width: int,
                                 stem_kernel: int = 7) -> dict:
  """Parameter names and shapes of detectron2's ResNet backbone (``build_resnet_backbone``):
  ``stem.conv1`` with a FrozenBN ``norm``, then per block ``conv{i}`` (+ ``norm``) and a
  ``shortcut`` (+ ``norm``) where the width or stride changes."""
  params = {'stem.conv1.weight': (base_width, 3, stem_kernel, stem_kernel)}
  norms = {'stem.conv1.norm': base_width}
  expansion = 4 if bottleneck else 1
  in_channels = base_width
  for stage, blocks in enumerate(stage_sizes):
    planes = base_width * 2**stage
    out_channels = planes * expansion
    for index in range(blocks):
      name = f'res{stage + 2}.{index}'
      if bottleneck:
        convs = [(in_channels, planes, 1), (planes, planes, 3), (planes, out_channels, 1)]
      else:
        convs = [(in_channels, planes, 3), (planes, planes, 3)]
      for c, (cin, cout, k) in enumerate(convs, start=1):
        params[f'{name}.conv{c}.weight'] = (cout, cin, k, k)
        norms[f'{name}.conv{c}.norm'] = cout
      if in_channels != out_channels or (stage > 0 and index == 0):
        params[f'{name}.shortcut.weight'] = (out_channels, in_channels, 1, 1)
        norms[f'{name}.shortcut.norm'] = out_channels
      in_channels = out_channels
  for norm, channels in norms.items():
    for leaf in ('weight', 'bias', 'running_mean', 'running_var'):
      params[f'{norm}.{leaf}'] = (channels,)
  return params


@pytest.mark.parametrize('arch,kwargs', [
    ('resnet18', {}),  # an R-18 student: detectron2 FPN configs with DEPTH 18
    ('resnet50', {'base_width': 8, 'stem': 'cifar'}),  # bottleneck naming, small
])
def test_moco_layout_feeds_detectron2_conversion(tmp_path, arch, kwargs):
  model_file, _ = make_model_file(tmp_path, arch=arch, head='moco', **kwargs)
  out = str(tmp_path / 'student.pth.tar')
  assert run_tool('export_torch.py', model_file, out, '--format', 'moco') == 0
  renamed = detectron2_rename(torch.load(out, weights_only=True))
  block, stage_sizes, _ = torch_reference.STAGES[arch]
  expected = detectron2_resnet_parameters(
      stage_sizes, block == 'bottleneck', kwargs.get('base_width', 64),
      3 if kwargs.get('stem') == 'cifar' else 7)
  missing = sorted(set(expected) - set(renamed))
  assert not missing, missing
  for key, shape in expected.items():
    assert tuple(renamed[key].shape) == shape, key
  # What detectron2 would not match: the MLP head and the BatchNorm counters only.
  leftovers = sorted(set(renamed) - set(expected))
  assert all(k.startswith('stem.fc.') or k.endswith('num_batches_tracked') for k in leftovers)


def test_swav_layout_round_trip_names(tmp_path):
  model_file, reference = make_model_file(tmp_path, head='swav', head_hidden_dim=64,
                                          base_width=8, stem='cifar')
  out = str(tmp_path / 'swav.pth')
  assert run_tool('export_torch.py', model_file, out, '--format', 'swav') == 0
  state = torch.load(out, weights_only=True)
  assert all(k.startswith('module.') for k in state)
  fresh = torch_reference.make_resnet('resnet18', head='swav', head_hidden_dim=64, base_width=8,
                                      stem='cifar')
  result = fresh.load_state_dict({k[len('module.'):]: v for k, v in state.items()},
                                 strict=False)
  assert result.missing_keys == ['prototypes.weight'] and not result.unexpected_keys
  # The original counters come back (the reference set distinct values per layer).
  assert torch.equal(fresh.projection_head[1].num_batches_tracked,
                     reference.projection_head[1].num_batches_tracked)
  assert torch.equal(fresh.layer2[0].bn1.num_batches_tracked,
                     reference.layer2[0].bn1.num_batches_tracked)


def test_moco_layout_of_swav_head_uses_bingo_names(tmp_path):
  model_file, reference = make_model_file(tmp_path, head='swav', head_hidden_dim=64,
                                          base_width=8, stem='cifar')
  state = torch_checkpoints.export_torch_checkpoint(
      model_io.load_model(model_file), str(tmp_path / 'teacher.pth'), 'moco')['state_dict']
  for index in (0, 1, 3):
    assert f'module.encoder_q.fc.{index}.weight' in state
  np.testing.assert_array_equal(state['module.encoder_q.fc.1.running_var'],
                                reference.projection_head[1].running_var.numpy())


def test_efficientnet_layout_loads_into_efficientnet_pytorch(tmp_path):
  from efficientnet_pytorch import EfficientNet
  torch.manual_seed(0)
  reference = EfficientNet.from_name('efficientnet-b0', num_classes=10)
  source = str(tmp_path / 'effb0.pth')
  torch.save(reference.state_dict(), source)
  torch_checkpoints.convert_to_model_file(source, str(tmp_path / 'effb0'))
  out = str(tmp_path / 'effb0_export.pth')
  assert run_tool('export_torch.py', str(tmp_path / 'effb0'), out,
                  '--format', 'efficientnet') == 0
  fresh = EfficientNet.from_name('efficientnet-b0', num_classes=10)
  fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
  assert_same_tensors(fresh.state_dict(), reference.state_dict())

  # A student with the MoCo MLP head: _fc.0 / _fc.2 in efficientnet_pytorch naming.
  loaded = model_io.load_model(str(tmp_path / 'effb0'))
  config = {**loaded.model_config, 'head': 'moco', 'head_hidden_dim': 32, 'head_output_dim': 8}
  config.pop('num_classes')
  rng = np.random.default_rng(0)
  variables = jax.tree.map(np.asarray, loaded.variables)
  variables['params']['head'] = {
      'fc0': {'kernel': rng.normal(size=(1280, 32)).astype(np.float32),
              'bias': np.zeros(32, np.float32)},
      'fc2': {'kernel': rng.normal(size=(32, 8)).astype(np.float32),
              'bias': np.zeros(8, np.float32)}}
  model_io.save_model(str(tmp_path / 'effb0_mlp'), config, variables)
  out = str(tmp_path / 'effb0_mlp.pth')
  assert run_tool('export_torch.py', str(tmp_path / 'effb0_mlp'), out,
                  '--format', 'efficientnet') == 0
  student = EfficientNet.from_name('efficientnet-b0')
  student._fc = torch.nn.Sequential(torch.nn.Linear(1280, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 8))
  student.load_state_dict(torch.load(out, weights_only=True), strict=True)
  np.testing.assert_array_equal(student._fc[0].weight.detach().numpy(),
                                variables['params']['head']['fc0']['kernel'].T)


def test_export_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
  model_file, _ = make_model_file(tmp_path, head=None, base_width=8, stem='cifar')
  out = tmp_path / 'out.pth'
  out.write_bytes(b'keep me')
  assert run_tool('export_torch.py', model_file, str(out)) == 1
  assert 'already exists' in capsys.readouterr().err and out.read_bytes() == b'keep me'

  def broken_save(obj, file):  # torch.save is handed the open temporary file
    file.write(b'half a file')
    raise OSError('disk full')
  monkeypatch.setattr(torch, 'save', broken_save)
  with pytest.raises(OSError, match='disk full'):
    run_tool('export_torch.py', model_file, str(out), '--overwrite')
  assert out.read_bytes() == b'keep me'
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('out.pth')) == ['out.pth']


def test_export_errors_name_the_problem(tmp_path, capsys):
  assert run_tool('export_torch.py', str(tmp_path / 'missing_model'), str(tmp_path / 'x.pth')) == 1
  assert 'missing_model' in capsys.readouterr().err
  model_file, _ = make_model_file(tmp_path, head=None, base_width=8, stem='cifar')
  assert run_tool('export_torch.py', model_file, str(tmp_path / 'x.pth'),
                  '--format', 'efficientnet') == 1
  assert 'resnet18 is a ResNet; --format efficientnet is for efficientnet_b0' in \
      capsys.readouterr().err

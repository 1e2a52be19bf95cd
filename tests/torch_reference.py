"""PyTorch reference networks for the parity tests, named exactly as torchvision names them.

torchvision has no CPU build in this environment, so the ResNets are written out here:
``conv1``/``bn1`` stem, ``layer1..4`` of ``BasicBlock``/``Bottleneck`` (stride on the 3x3
convolution, projection shortcut ``downsample.0/1``), global average pooling. Options give
SwAV's variant (widened ResNet-50, stem as ``ConstantPad2d(1)`` + ``Conv2d(padding=2)``,
``projection_head`` Linear-BN1d-ReLU-Linear and ``prototypes``) and MoCo's heads (v2 MLP
``fc.0``/``fc.2``, v1 linear ``fc``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import pytest
import torch
from torch import nn

STAGES = {
    'resnet18': ('basic', (2, 2, 2, 2), 1),
    'resnet34': ('basic', (3, 4, 6, 3), 1),
    'resnet50': ('bottleneck', (3, 4, 6, 3), 1),
    'resnet101': ('bottleneck', (3, 4, 23, 3), 1),
    'resnet152': ('bottleneck', (3, 8, 36, 3), 1),
    'resnet50w2': ('bottleneck', (3, 4, 6, 3), 2),
    'resnet50w4': ('bottleneck', (3, 4, 6, 3), 4),
}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int, downsample: Optional[nn.Module]):
    super().__init__()
    self.conv1 = _conv3x3(cin, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    shortcut = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return self.relu(y + shortcut)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int, downsample: Optional[nn.Module]):
    super().__init__()
    self.conv1 = _conv1x1(cin, planes)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv3x3(planes, planes, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = _conv1x1(planes, planes * 4)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    shortcut = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + shortcut)


class ResNet(nn.Module):
  """torchvision-named ResNet; ``forward`` returns ``(pooled features, head output or None)``.

  Args:
    block: 'basic' or 'bottleneck'.
    layers: blocks per stage.
    base_width: stem / first-stage width (64; 128 and 256 for SwAV's x2 / x4).
    stem: 'imagenet' (7x7/2 + max-pool) or 'cifar' (3x3/1, no pool).
    swav_stem: build the 7x7 stem as SwAV does (zero pad 1, then conv padding 2).
    head: None, 'linear' (``fc``), 'moco' (``fc.0``/``fc.2``), 'swav' (``projection_head``,
      plus ``prototypes`` which the forward does not use for its output).
  """

  def __init__(self, block: str, layers: Sequence[int], base_width: int = 64,
               stem: str = 'imagenet', swav_stem: bool = False, head: Optional[str] = None,
               num_classes: int = 1000, head_hidden_dim: int = 2048, head_output_dim: int = 128,
               num_prototypes: int = 30):
    super().__init__()
    block_cls = BasicBlock if block == 'basic' else Bottleneck
    self.stem = stem
    self.swav_stem = swav_stem
    if stem == 'imagenet':
      self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
      self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
      self.use_swav_stem(swav_stem)
    else:
      self.conv1 = nn.Conv2d(3, base_width, 3, stride=1, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(base_width)
    self.relu = nn.ReLU()
    cin = base_width
    for stage, num_blocks in enumerate(layers):
      planes = base_width * 2**stage
      blocks = []
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        downsample = None
        if stride != 1 or cin != planes * block_cls.expansion:
          downsample = nn.Sequential(_conv1x1(cin, planes * block_cls.expansion, stride),
                                     nn.BatchNorm2d(planes * block_cls.expansion))
        blocks.append(block_cls(cin, planes, stride, downsample))
        cin = planes * block_cls.expansion
      setattr(self, f'layer{stage + 1}', nn.Sequential(*blocks))
    self.feature_dim = cin
    self.set_head(head, num_classes, head_hidden_dim, head_output_dim, num_prototypes)

  def set_head(self, head: Optional[str], num_classes: int = 1000, head_hidden_dim: int = 2048,
               head_output_dim: int = 128, num_prototypes: int = 30) -> 'ResNet':
    """Replaces the head (the backbone is kept, so one network serves every head)."""
    for name in ('fc', 'projection_head', 'prototypes'):
      if hasattr(self, name):
        delattr(self, name)
    self.head = head
    cin = self.feature_dim
    if head == 'linear':
      self.fc = nn.Linear(cin, num_classes)
    elif head == 'moco':
      self.fc = nn.Sequential(nn.Linear(cin, head_hidden_dim), nn.ReLU(),
                              nn.Linear(head_hidden_dim, head_output_dim))
    elif head == 'swav':
      self.projection_head = nn.Sequential(
          nn.Linear(cin, head_hidden_dim), nn.BatchNorm1d(head_hidden_dim), nn.ReLU(),
          nn.Linear(head_hidden_dim, head_output_dim))
      self.prototypes = nn.Linear(head_output_dim, num_prototypes, bias=False)
    elif head is not None:
      raise ValueError(head)
    return self

  def use_swav_stem(self, swav_stem: bool) -> 'ResNet':
    """SwAV's stem: ``ConstantPad2d(1)`` then the 7x7 convolution with ``padding=2``."""
    assert self.stem == 'imagenet'
    self.swav_stem = swav_stem
    self.padding = nn.ConstantPad2d(1, 0.0)
    self.conv1.padding = (2, 2) if swav_stem else (3, 3)
    return self

  def features(self, x: torch.Tensor) -> torch.Tensor:
    if self.swav_stem:
      x = self.padding(x)
    x = self.relu(self.bn1(self.conv1(x)))
    if self.stem == 'imagenet':
      x = self.maxpool(x)
    for stage in range(1, 5):
      x = getattr(self, f'layer{stage}')(x)
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

  def forward(self, x: torch.Tensor):
    features = self.features(x)
    if self.head in ('linear', 'moco'):
      return features, self.fc(features)
    if self.head == 'swav':
      return features, self.projection_head(features)
    return features, None


def make_resnet(arch: str, head: Optional[str] = None, base_width: Optional[int] = None,
                **kwargs) -> ResNet:
  """A reference ResNet by registry name (``resnet50w2``...)."""
  block, layers, widen = STAGES[arch]
  return ResNet(block, layers, base_width=base_width or 64 * widen, head=head, **kwargs)


@torch.no_grad()
def randomize_(model: nn.Module, calibration_images: torch.Tensor, seed: int = 0) -> nn.Module:
  """Random weights and non-trivial BatchNorm statistics, keeping activations well scaled.

  Running statistics are set from one training-mode pass over ``calibration_images`` (so that
  eval mode neither explodes nor vanishes in a 152-layer network), then perturbed; affine
  parameters and biases are random; ``num_batches_tracked`` gets distinct values.
  """
  generator = torch.Generator().manual_seed(seed)
  # The norm closing each residual branch gets a small scale, as in trained ResNets: a random
  # 152-layer network with unit scales there is chaotic (it amplifies float rounding).
  branch_ends = set()
  for module in model.modules():
    if isinstance(module, Bottleneck):
      branch_ends.add(module.bn3)
    elif isinstance(module, BasicBlock):
      branch_ends.add(module.bn2)
  norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
  for module in norms:
    c = module.num_features
    low, high = (0.2, 0.5) if module in branch_ends else (0.5, 1.2)
    module.weight.copy_(torch.empty(c).uniform_(low, high, generator=generator))
    module.bias.copy_(0.1 * torch.randn(c, generator=generator))
    module.reset_running_stats()
    module.momentum = None  # cumulative average: after one batch, the batch statistics
  model.train()
  model(calibration_images)
  for index, module in enumerate(norms):
    c = module.num_features
    module.momentum = 0.1
    module.running_mean += 0.1 * torch.randn(c, generator=generator) * module.running_var.sqrt()
    module.running_var *= torch.empty(c).uniform_(0.7, 1.3, generator=generator)
    module.num_batches_tracked.fill_(1000 + index)
  for module in model.modules():
    if isinstance(module, nn.Linear) and module.bias is not None:
      module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
  model.eval()
  return model


@pytest.fixture(autouse=True, scope='module')
def one_torch_thread():
  """Module fixture: torch reference forwards on one thread.

  On a 2-core machine torch's two-thread kernels wait on each other (and on XLA's threads):
  one thread runs the reference forwards several times faster. Import it into a test module
  to apply it there.
  """
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)

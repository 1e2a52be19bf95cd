"""A PyTorch eager BINGO step (docs/method.md §2 to §7), the baseline of bench/train_step.py.

``time_step`` times it (AMP bf16, channels-last); ``python -m bench.torch_step`` is its
command line.

Written from docs/method.md, in the released code's structure on one device: the student embeds
``query``, ``pos_q`` and their CutMix (three forward passes), the teacher embeds ``key`` and
``pos_k`` without gradient on a shuffled batch in training-mode BatchNorm, the six-term loss,
torch SGD with momentum and weight decay, and the FIFO queue update.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or in_planes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    out = planes * 4
    self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    self.downsample = None
    if stride != 1 or in_planes != out:
      self.downsample = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride, bias=False),
                                      nn.BatchNorm2d(out))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


_STAGES = {'resnet18': ((2, 2, 2, 2), BasicBlock), 'resnet34': ((3, 4, 6, 3), BasicBlock),
           'resnet50': ((3, 4, 6, 3), Bottleneck), 'resnet152': ((3, 8, 36, 3), Bottleneck)}


class ResNetWithHead(nn.Module):
  """torchvision-structured ResNet backbone + MoCo MLP head (feature -> 2048 -> 128)."""

  def __init__(self, arch: str, width: int = 64, head_hidden: int = 2048, head_out: int = 128):
    super().__init__()
    stages, block = _STAGES[arch]
    self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                              nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
    layers, in_planes = [], width
    for index, blocks in enumerate(stages):
      planes = width * 2 ** index
      for b in range(blocks):
        layers.append(block(in_planes, planes, 2 if (b == 0 and index > 0) else 1))
        in_planes = planes * block.expansion
    self.layers = nn.Sequential(*layers)
    self.head = nn.Sequential(nn.Linear(in_planes, head_hidden), nn.ReLU(inplace=True),
                              nn.Linear(head_hidden, head_out))

  def forward(self, x):
    features = torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)
    return self.head(features)


def cutmix_batch(query: torch.Tensor, pos_q: torch.Tensor, rng: np.random.Generator):
  """One box per batch (docs/method.md §3): pos_q's box pasted into query; returns (mix, lam)."""
  size = query.shape[-1]
  lam0 = rng.beta(2.0, 2.0)
  cut = int(size * math.sqrt(1.0 - lam0))
  cy, cx = rng.integers(size), rng.integers(size)
  y0, y1 = np.clip(cy - cut // 2, 0, size), np.clip(cy + cut // 2, 0, size)
  x0, x1 = np.clip(cx - cut // 2, 0, size), np.clip(cx + cut // 2, 0, size)
  mix = query.clone()
  mix[:, :, y0:y1, x0:x1] = pos_q[:, :, y0:y1, x0:x1]
  lam = 1.0 - (y1 - y0) * (x1 - x0) / (size * size)
  return mix, float(lam)


class TorchBingoStep:
  """The released training step on one device (batch = one BatchNorm group)."""

  def __init__(self, student_arch: str = 'resnet18', teacher_arch: str = 'resnet50',
               batch_size: int = 32, queue_size: int = 65536, temperature: float = 0.2,
               lr: float = 0.03, seed: int = 0, *, teacher_width: int = 64,
               device: str = 'cpu', amp_dtype: Optional[torch.dtype] = None,
               channels_last: bool = False, student_width: int = 64,
               head_hidden_dim: int = 2048, head_output_dim: int = 128):
    """
    Args:
      teacher_width: the teacher's base width (128 for SwAV's ResNet-50x2).
      student_width, head_hidden_dim, head_output_dim: the student's base width and both
        networks' head sizes (smaller only for the smoke run).
      device: where the networks and the queue live (``'cuda'`` for the GPU row).
      amp_dtype: ``torch.autocast`` compute dtype (``torch.bfloat16`` / ``float16``), or
        None for float32; parameters, the queue and the loss stay float32.
      channels_last: NHWC memory format for the networks and the images (faster
        convolutions with AMP on tensor cores).
    """
    torch.manual_seed(seed)
    self.device = torch.device(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.memory_format = memory_format
    self.amp_dtype = amp_dtype
    self.student = ResNetWithHead(student_arch, student_width, head_hidden_dim,
                                  head_output_dim).train().to(self.device,
                                                              memory_format=memory_format)
    # Training-mode BN (docs/method.md §5).
    self.teacher = ResNetWithHead(teacher_arch, teacher_width, head_hidden_dim,
                                  head_output_dim).train().to(self.device,
                                                              memory_format=memory_format)
    for p in self.teacher.parameters():
      p.requires_grad_(False)
    self.optimizer = torch.optim.SGD(self.student.parameters(), lr=lr * batch_size / 256,
                                     momentum=0.9, weight_decay=1e-4)
    self.queue = F.normalize(torch.randn(queue_size, head_output_dim, device=self.device),
                             dim=1)
    self.pointer = 0
    self.temperature = temperature
    self.rng = np.random.default_rng(seed)

  def _ce(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s, t = s.float(), t.float()
    positive = (s * t).sum(1, keepdim=True)
    negative = s @ self.queue.t()
    logits = torch.cat([positive, negative], 1) / self.temperature
    return F.cross_entropy(logits, torch.zeros(s.shape[0], dtype=torch.long, device=s.device))

  @torch.no_grad()
  def _teacher(self, images: torch.Tensor) -> torch.Tensor:
    permutation = torch.randperm(images.shape[0], device=images.device)
    shuffled = F.normalize(self.teacher(images[permutation]), dim=1)
    out = torch.empty_like(shuffled)
    out[permutation] = shuffled
    return out

  def _autocast(self):
    if self.amp_dtype is None:
      return contextlib.nullcontext()
    return torch.autocast(self.device.type, dtype=self.amp_dtype)

  def __call__(self, query, key, pos_q, pos_k, own_weight: float = 0.5) -> float:
    query, key, pos_q, pos_k = (x.to(self.device, memory_format=self.memory_format)
                                for x in (query, key, pos_q, pos_k))
    mix_q, lam = cutmix_batch(query, pos_q, self.rng)
    with self._autocast():
      k, kp = self._teacher(key).float(), self._teacher(pos_k).float()
      q = F.normalize(self.student(query).float(), dim=1)
      p = F.normalize(self.student(pos_q).float(), dim=1)
      m = F.normalize(self.student(mix_q).float(), dim=1)
    other_weight = 1.0 - own_weight
    loss = (own_weight * self._ce(q, k) + other_weight * self._ce(q, kp)
            + own_weight * self._ce(p, kp) + other_weight * self._ce(p, k)
            + lam * self._ce(m, k) + (1 - lam) * self._ce(m, kp)) / 3
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    batch = k.shape[0]
    self.queue[self.pointer:self.pointer + batch] = k
    self.pointer = (self.pointer + batch) % self.queue.shape[0]
    return loss.item()


def time_step(batch_size: int, image_size: int, steps: int, *, device: str = 'cuda',
              smoke: bool = False) -> float:
  """Median seconds of ``steps`` R-18 <- R-50x2 steps, AMP bf16 and channels-last, after one
  warm-up step, on random views already on ``device`` (no augmentation, no data loading).

  ``smoke``: networks of width 8 with small heads and a queue of four batches (CPU-sized).
  """
  sizes = (dict(student_width=8, teacher_width=8, head_hidden_dim=32, head_output_dim=16)
           if smoke else dict(teacher_width=128))
  queue_size = 4 * batch_size if smoke else 65536
  step = TorchBingoStep('resnet18', 'resnet50', batch_size, queue_size, 0.2, device=device,
                        amp_dtype=torch.bfloat16, channels_last=True, **sizes)
  views = [torch.randn(batch_size, 3, image_size, image_size, device=device) for _ in range(4)]
  step(*views)
  times = []
  for _ in range(steps):
    if device == 'cuda':
      torch.cuda.synchronize()
    began = time.perf_counter()
    step(*views)  # its loss.item() waits for the step
    times.append(time.perf_counter() - began)
  return float(np.median(times))

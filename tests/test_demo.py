"""End to end: the README's main job (``bingo_jax.demo``) on a reduced Fashion-MNIST.

The whole flow runs as a user runs it: the committed PyTorch teacher through the public
conversion tool, bagging, a few distillation steps, kNN and fast linear evaluation, the
analysis plots and the export to PyTorch. What comes out is checked against independent
references: a PyTorch ResNet loaded with the committed checkpoint (conversion), a PyTorch
ResNet loaded with the exported student (export), numpy brute-force nearest neighbours of the
teacher's features (bags), and the quality the committed teacher must have on real images.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

from bingo_jax import demo
from bingo_jax.bags import bag_file
from bingo_jax.data import images, sources as data_sources
from bingo_jax.store import checkpointing, model_io

import torch_reference
from torch_reference import one_torch_thread  # noqa: F401  (autouse: torch on one thread)

TRAIN_SPLIT, EVAL_SPLIT = 'train[:1024]', 'test[:500]'

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(data_sources.FASHION_MNIST_DIR, 'train-images-idx3-ubyte.gz')),
    reason='Fashion-MNIST files not installed (tools/get_fashion_mnist.sh installs them)')


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('demo'))
  result = demo.run(workdir, max_steps=3, train_split=TRAIN_SPLIT, eval_split=EVAL_SPLIT,
                    quick_eval=True)
  return workdir, result


def _fmnist_batch(split: str, count: int) -> np.ndarray:
  """The first ``count`` images of ``split``, padded 28 -> 32 px as uint8 NHWC."""
  source = data_sources.make_source({'source': 'fashion_mnist'}, split)
  batch = np.stack([source.read(i) for i in range(count)])
  return np.pad(batch, ((0, 0), (2, 2), (2, 2), (0, 0)))


def _torch_features(model: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
  x = torch.from_numpy(np.asarray(images.normalize(batch))).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    return model.eval()(x)[0].numpy()


def _state_dict(path: str) -> dict:
  checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  prefix = 'module.encoder_q.'
  return {k[len(prefix):]: v for k, v in checkpoint['state_dict'].items() if k.startswith(prefix)}


def test_committed_teacher_converts_to_the_pytorch_forward(demo_run):
  workdir, _ = demo_run
  reference = torch_reference.make_resnet('resnet18', head='moco', base_width=16, stem='cifar',
                                          head_hidden_dim=128)
  reference.load_state_dict(_state_dict(demo.DEFAULT_TEACHER), strict=True)
  batch = _fmnist_batch('test', 8)
  converted = model_io.load_model(os.path.join(workdir, 'teacher'))
  features, _ = converted.embed(images.normalize(batch))
  expected = _torch_features(reference, batch)
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_bags_are_the_teachers_nearest_neighbours(demo_run):
  workdir, _ = demo_run
  bags = bag_file.load_bags(os.path.join(workdir, 'bags.npz'))
  features = np.load(sorted(glob.glob(os.path.join(workdir, 'bagging', 'features', '*.npy')))[0]
                     ).astype(np.float64)
  assert features.shape[0] == 1024
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  similarity = features @ features.T
  np.fill_diagonal(similarity, -np.inf)
  rows = np.arange(0, 1024, 37)
  for row in rows:
    neighbours = bags.members(row)
    # The bag's members are among the 5 most similar images (ties within float16 rounding).
    fifth = np.sort(similarity[row])[-5]
    assert len(neighbours) == 5 and np.all(similarity[row, neighbours] >= fifth - 2e-3), row


def test_exported_student_matches_the_trained_student(demo_run):
  workdir, result = demo_run
  reference = torch_reference.make_resnet('resnet18', head='moco', base_width=8, stem='cifar',
                                          head_hidden_dim=256)
  reference.load_state_dict(_state_dict(result['exported_student']), strict=True)
  batch = _fmnist_batch('test', 8)
  student = checkpointing.load_any(os.path.join(workdir, 'train'))
  features, _ = student.embed(images.normalize(batch))
  expected = _torch_features(reference, batch)
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  assert result['train']['step'] == 3


def test_outputs_and_table(demo_run):
  workdir, result = demo_run
  for pattern in ('train/events.out.tfevents.*', 'bagging/bag_report.png',
                  'eval/student_after/tsne.png', 'demo_summary.json', 'student_r18w8_moco.pth.tar'):
    assert glob.glob(os.path.join(workdir, pattern)), pattern
  table = result['table']
  assert [label for label, _, _ in demo.ROWS] == list(table)
  for metrics in table.values():
    for key in ('knn10_top1', 'weighted_knn200_top1', 'linear_fast_top1'):
      assert 0.0 <= metrics[key] <= 100.0
  with open(os.path.join(workdir, 'demo_summary.json')) as f:
    assert json.load(f)['data'] == {'train': TRAIN_SPLIT, 'eval': EVAL_SPLIT}


def test_table_says_how_the_student_compares_with_pixels_and_teacher():
  row = lambda knn, linear: {'knn10_top1': knn, 'weighted_knn200_top1': 0.0,  # noqa: E731
                             'linear_fast_top1': linear}
  table = {'raw pixels': row(81.18, 82.97), 'teacher': row(82.19, 84.59),
           'student before distillation (random init)': row(64.04, 64.12),
           'student after distillation': row(81.99, 82.97)}
  text = demo.format_table(table, 60.0)
  assert ('Against the raw pixels, the distilled student is 0.81 points above on 10-NN and '
          'level on fast linear.') in text
  assert ('Against the teacher, the distilled student is 0.20 points below on 10-NN and '
          '1.62 points below on fast linear.') in text
  del table['student after distillation']
  assert 'Against' not in demo.format_table(table, 60.0)


def test_committed_teacher_beats_its_random_initialisation(demo_run, tmp_path):
  """The committed teacher was trained without labels; on real images its kNN classifier must
  clearly beat a randomly initialised network of the same architecture (docs/results.md)."""
  from bingo_jax import evaluate
  from bingo_jax.configs import fmnist_demo
  workdir, result = demo_run
  config = fmnist_demo.get_config()
  config.data.train_split, config.data.eval_split = TRAIN_SPLIT, EVAL_SPLIT
  teacher_model = model_io.read_record(os.path.join(workdir, 'teacher'))['model']
  config.student.base_width = teacher_model['base_width']
  config.student.stem = teacher_model['stem']
  assert (teacher_model['arch'], teacher_model['base_width']) == ('resnet18', 16)
  random_init = evaluate.evaluate(config, 'random', 'knn', str(tmp_path))['metrics']['knn10_top1']
  teacher = result['table']['teacher']['knn10_top1']
  assert teacher > random_init + 5.0, (teacher, random_init)

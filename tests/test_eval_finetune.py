"""Semi-supervised fine-tuning: the labelled subset and the two learning rates of the optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bingo_jax.eval import finetune, subsets


@pytest.fixture(scope='module')
def labels():
  # 10 unbalanced classes, 2000 images.
  rng = np.random.default_rng(0)
  return rng.choice(10, size=2000, p=np.linspace(0.05, 0.15, 10) / np.linspace(0.05, 0.15, 10).sum())


@pytest.mark.parametrize('fraction', [0.01, 0.1, 0.0137])
def test_subset_is_class_balanced_with_requested_size(labels, fraction):
  indices = subsets.class_balanced_subset(labels, fraction, seed=3)
  assert len(indices) == round(fraction * len(labels))
  assert len(np.unique(indices)) == len(indices)
  counts = np.bincount(labels[indices], minlength=10)
  assert counts.max() - counts.min() <= 1


def test_subset_is_fixed_by_the_seed(labels):
  first = subsets.class_balanced_subset(labels, 0.1, seed=7)
  np.testing.assert_array_equal(first, subsets.class_balanced_subset(labels, 0.1, seed=7))
  assert not np.array_equal(first, subsets.class_balanced_subset(labels, 0.1, seed=8))


def test_subset_refuses_classes_smaller_than_their_share():
  with pytest.raises(ValueError, match='class 1 has 2 images'):
    subsets.class_balanced_subset(np.array([0] * 50 + [1] * 2), 0.5, seed=0)


def test_drawn_subset_is_written_and_split_files_match_by_file_name(tmp_path, labels):
  identifiers = [f'n{c:08d}/n{c:08d}_{i}.JPEG' for i, c in enumerate(labels)]
  indices, path = subsets.finetune_subset(identifiers, labels, workdir=str(tmp_path),
                                          fraction=0.01, seed=0)
  assert path.endswith('finetune_subset_0.01_seed0.txt')
  assert open(path).read().split() == [identifiers[i] for i in indices]
  np.testing.assert_array_equal(subsets.read_split_file(path, identifiers), indices)
  # SimCLR split files list bare file names.
  simclr = tmp_path / '1percent.txt'
  simclr.write_text('\n'.join(identifiers[i].split('/')[1] for i in indices[::-1]) + '\n')
  np.testing.assert_array_equal(subsets.read_split_file(str(simclr), identifiers), indices)
  simclr.write_text('n99999999_1.JPEG\n')
  with pytest.raises(ValueError, match='1 of 1 entries name no image'):
    subsets.read_split_file(str(simclr), identifiers)


def test_classifier_learning_rate_is_ten_times_the_backbone_on_the_optimizer():
  params = {'backbone': {'conv': {'kernel': jnp.ones((3, 3, 3, 4))},
                         'bn': {'scale': jnp.ones((4,))}},
            'head': {'fc': {'kernel': jnp.ones((4, 5)), 'bias': jnp.zeros((5,))}}}
  schedule = finetune.epoch_cosine_schedule(0.2, epochs=10, steps_per_epoch=3)
  optimizer = finetune.make_finetune_optimizer(schedule, classifier_lr_multiplier=10.0,
                                               momentum=0.9, weight_decay=0.0)
  assert finetune.param_groups(params) == {
      'backbone': {'conv': {'kernel': 'backbone'}, 'bn': {'scale': 'backbone'}},
      'head': {'fc': {'kernel': 'classifier', 'bias': 'classifier'}}}
  state = optimizer.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for step in range(7):  # into epoch 2 of the cosine
    updates, state = optimizer.update(grads, state, params)
  # With constant unit gradients, the momentum trace after 7 steps is sum_i 0.9^i for both
  # groups, so updates differ only by the learning rates: -lr * trace.
  trace = sum(0.9 ** i for i in range(7))
  backbone_lr = 0.2 * 0.5 * (1 + np.cos(np.pi * 2 / 10))
  for leaf in jax.tree.leaves(updates['backbone']):
    np.testing.assert_allclose(leaf, -backbone_lr * trace, rtol=1e-5)
  for leaf in jax.tree.leaves(updates['head']):
    np.testing.assert_allclose(leaf, -10 * backbone_lr * trace, rtol=1e-5)

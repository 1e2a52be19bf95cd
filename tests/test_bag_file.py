"""Bag files: round trip, integrity errors, refusal of other data, positive sampling."""

import collections
import os

import numpy as np
import pytest
import tensorflow as tf

from bingo_jax.bags import bag_file


def _knn_bags():
  neighbors = np.array([[1, 2], [2, 0], [0, 3], [1, 2]], np.int32)
  return bag_file.Bags.from_neighbors(neighbors, method='knn', fingerprint='abc',
                                      teacher={'path': '/t', 'description': 'r50'},
                                      feature_dim=8)


def _group_bags():
  # Groups: 7 -> {0, 3, 5}, 2 -> {1, 4}, 0 -> {2} (a singleton), 4 -> {6}.
  return bag_file.Bags.from_groups(np.array([7, 2, 0, 7, 2, 7, 4]), method='labels',
                                   fingerprint='xyz')


def test_fixed_round_trip(tmp_path):
  bags = _knn_bags()
  path = bag_file.save_bags(str(tmp_path / 'bags.npz'), bags)
  loaded = bag_file.load_bags(path)
  assert loaded.kind == 'fixed' and loaded.num_images == 4 and loaded.path == path
  np.testing.assert_array_equal(loaded.members(2), [0, 3])
  assert loaded.metadata['method'] == 'knn' and loaded.metadata['k'] == 2
  assert loaded.metadata['teacher'] == {'path': '/t', 'description': 'r50'}
  assert loaded.metadata['feature_dim'] == 8 and loaded.metadata['fingerprint'] == 'abc'
  assert 'created' in loaded.metadata
  assert [p for p in os.listdir(tmp_path) if p != 'bags.npz'] == []  # no staging left over


def test_group_members_follow_definition(tmp_path):
  group_of = np.array([7, 2, 0, 7, 2, 7, 4])
  loaded = bag_file.load_bags(bag_file.save_bags(str(tmp_path / 'g.npz'), _group_bags()))
  assert loaded.kind == 'groups' and loaded.num_images == 7
  for i in range(7):
    expected = [j for j in range(7) if group_of[j] == group_of[i] and j != i]
    np.testing.assert_array_equal(np.sort(loaded.members(i)), expected)
    assert loaded.bag_size(i) == len(expected)


def test_check_matches_refuses_other_data():
  bags = _knn_bags()
  bags.check_matches(4, 'abc', 'the training data')
  with pytest.raises(ValueError, match=r'bags for 4 images but the training data has 5'):
    bags.check_matches(5, 'abc', 'the training data')
  with pytest.raises(ValueError, match=r"fingerprint is 'abc' but the training data has 'abd'"):
    bags.check_matches(4, 'abd', 'the training data')


def test_anchor_in_own_bag_is_rejected():
  with pytest.raises(ValueError, match='list themselves'):
    bag_file.Bags.from_neighbors(np.array([[1], [1]]), method='knn', fingerprint='f')


@pytest.mark.parametrize('damage', ['not_npz', 'no_metadata', 'missing_array', 'bad_groups'])
def test_load_errors_name_the_file(tmp_path, damage):
  path = str(tmp_path / 'bad.npz')
  if damage == 'not_npz':
    with open(path, 'w') as f:
      f.write('hello')
  elif damage == 'no_metadata':
    np.savez(path, neighbors=np.zeros((2, 1), np.int32))
  else:
    bag_file.save_bags(path, _group_bags())
    with np.load(path) as contents:
      stored = dict(contents)
    if damage == 'missing_array':
      del stored['group_members']
    else:
      stored['position_in_group'] = stored['position_in_group'][::-1].copy()
    np.savez(path, **stored)
  with pytest.raises(ValueError, match='bad.npz'):
    bag_file.load_bags(path)
  with pytest.raises(FileNotFoundError, match='nothing.npz'):
    bag_file.load_bags(str(tmp_path / 'nothing.npz'))


def _tf_draws(bags, anchor, count):
  anchors = tf.data.Dataset.from_tensor_slices(tf.fill([count], tf.constant(anchor, tf.int64)))
  dataset = anchors.enumerate().map(
      lambda n, a: bags.tf_sample_positive(a, tf.stack([tf.constant(3, tf.int64), n])))
  return np.array(list(dataset.as_numpy_iterator()))


@pytest.mark.parametrize('make_bags', [_knn_bags, _group_bags])
def test_tf_sampler_is_uniform_over_bag_without_anchor(make_bags):
  bags = make_bags()
  draws = 600
  for anchor in range(bags.num_images):
    members = set(bags.members(anchor).tolist())
    tf_counts = collections.Counter(_tf_draws(bags, anchor, draws).tolist())
    rng = np.random.default_rng(anchor)
    np_counts = collections.Counter(bags.sample_positive(anchor, rng) for _ in range(draws))
    for counts in (tf_counts, np_counts):
      if not members:  # singleton group: the anchor is its own positive
        assert set(counts) == {anchor}
        continue
      assert set(counts) == members
      # Uniform: each member drawn ~draws/|bag| times (binomial 5-sigma band).
      expected = draws / len(members)
      sigma = np.sqrt(draws * (1 / len(members)) * (1 - 1 / len(members)))
      for member in members:
        assert abs(counts[member] - expected) < 5 * sigma + 1, (anchor, counts)


def test_tf_sampler_is_deterministic_in_seed():
  bags = _group_bags()
  seed = tf.constant([5, 9], tf.int64)
  first = [int(bags.tf_sample_positive(tf.constant(0, tf.int64), seed)) for _ in range(5)]
  assert len(set(first)) == 1


def test_saved_bag_file_has_the_usual_permissions(tmp_path):
  """The staging file is created 0600; the bag file gets 0666 minus the process umask."""
  umask = os.umask(0o027)
  os.umask(umask)
  path = bag_file.save_bags(str(tmp_path / 'bags.npz'), _group_bags())
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask

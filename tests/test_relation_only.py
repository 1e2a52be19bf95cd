"""Teacher relation only (paper Table 8 row 3): MoCo v2 with a bag objective.

``config.train.method = 'moco'`` with ``config.train.moco_loss = 'bingo'``: the momentum key
encoder takes the teacher's place in the released loss (docs/method.md §6). The step is
recomputed here in float64 numpy from separately embedded views: the student's passes, the
key encoder's shuffled passes group by group (the released per-GPU BatchNorm), the six CE
terms against the queue, the FIFO queue, the momentum update and the key encoder's running
statistics after its two passes. Plain MoCo keeps its views and PRNG streams.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import multihost_train_worker
from bingo_jax import train
from bingo_jax.bags import bag_file
from bingo_jax.configs import fmnist_ablation, tiny_test
from bingo_jax.data import images as images_lib, parallel
from bingo_jax.data import sources as data_sources
from bingo_jax.method import config_checks, cutmix as cutmix_lib
from bingo_jax.method import moco_step, steps
from bingo_jax.method import train_step as train_step_lib
from bingo_jax.store import checkpointing
from bingo_jax.testing import tiny_run

MOMENTUM = 0.9


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _cross_entropy(s, t, queue, temperature):
  """Per-example CE(s, t) against the queue, in float64."""
  logits = np.concatenate([np.sum(s * t, 1, keepdims=True), s @ queue.T], 1) / temperature
  top = logits.max(1)
  return top + np.log(np.exp(logits - top[:, None]).sum(1)) - logits[:, 0]


def _shuffled_keys_reference(key_model, params, stats, images, rng, group):
  """The released key forward: permute, each "GPU" chunk of ``group`` images normalised with
  its own statistics by a global-statistics model, un-permute; running statistics averaged
  over the chunks. Returns (unit keys, running statistics after the pass)."""
  batch_size = len(images)
  permutation = np.asarray(jax.random.permutation(rng, batch_size))
  global_bn_model = type(key_model)(backbone=type(key_model.backbone)(None, name='backbone'),
                                    head=key_model.head.clone())
  shuffled = images_lib.normalize(images[permutation])
  chunks, chunk_stats = [], []
  for start in range(0, batch_size, group):
    (_, embeddings), updates = global_bn_model.apply(
        {'params': params, 'batch_stats': stats}, shuffled[start:start + group], train=True,
        mutable=['batch_stats'])
    chunks.append(np.asarray(embeddings))
    chunk_stats.append(updates['batch_stats'])
  keys = np.empty((batch_size, chunks[0].shape[1]))
  keys[permutation] = _unit(np.concatenate(chunks))
  return keys, jax.tree.map(lambda *xs: np.mean(xs, axis=0), *chunk_stats)


def _relation_config(config):
  config.train.method, config.train.moco_momentum = 'moco', MOMENTUM
  config.train.moco_loss, config.train.cutmix = 'bingo', 'batch'
  config.train.own_key_warmup_epochs = 0  # (w_own, w_oth) = (0.5, 0.5): every pairing counts
  return config


def test_relation_only_step_matches_numpy_reference():
  config, student, key_model, batch = multihost_train_worker.small_setup()  # tiny networks
  config = _relation_config(config)
  group, temperature = config.teacher.bn_group_size, config.train.temperature
  mesh = parallel.make_mesh(jax.devices()[:2])
  state = train_step_lib.create_train_state(config, student, jax.random.key(0), mesh)
  host = jax.device_get(state)
  state = multihost_train_worker.perturbed_key_encoder(host, mesh)
  key_params, key_stats = jax.device_get((state.key_params, state.key_batch_stats))
  assert steps.batch_views(config) == ('query', 'key', 'pos_q', 'pos_k')
  step = steps.make_train_step(config, student, key_model, mesh, steps_per_epoch=10)
  new_state, metrics = step(state, parallel.replicate({}, mesh),
                            parallel.global_batch(batch, mesh))
  new = jax.device_get(new_state)

  # The step's PRNG streams, in the BINGO step's order: CutMix, the key shuffle, pos_k's.
  _, cutmix_rng, key_rng, pos_k_rng = jax.random.split(
      jax.random.wrap_key_data(jnp.asarray(host.rng)), 4)
  # CutMix (tested against its own numpy reference in test_train_step.py): one box.
  mix_q, lam = cutmix_lib.cutmix(cutmix_rng, batch['query'], batch['pos_q'], mode='batch')
  lam = np.asarray(lam, np.float64)

  # Student: training-mode BatchNorm in groups of 4 of each unshuffled view, one pass each.
  def embed_student(images):
    (_, embeddings), _ = student.apply({'params': host.params, 'batch_stats': host.batch_stats},
                                       images_lib.normalize(images), train=True,
                                       mutable=['batch_stats'])
    return _unit(embeddings)

  q, p, m = (embed_student(images) for images in (batch['query'], batch['pos_q'], mix_q))
  # Key encoder: `key` then `pos_k`, the running statistics threaded through the two passes.
  k, stats_after_key = _shuffled_keys_reference(key_model, key_params, key_stats, batch['key'],
                                                key_rng, group)
  kp, stats_after_pos = _shuffled_keys_reference(key_model, key_params, stats_after_key,
                                                 batch['pos_k'], pos_k_rng, group)

  queue = np.asarray(host.negative_queue, np.float64)
  ce = {name: _cross_entropy(s, t, queue, temperature)
        for name, (s, t) in {'ce_q_k': (q, k), 'ce_q_kp': (q, kp), 'ce_p_kp': (p, kp),
                             'ce_p_k': (p, k), 'ce_m_k': (m, k), 'ce_m_kp': (m, kp)}.items()}
  expected = np.mean(0.5 * (ce['ce_q_k'] + ce['ce_q_kp'] + ce['ce_p_kp'] + ce['ce_p_k'])
                     + lam * ce['ce_m_k'] + (1 - lam) * ce['ce_m_kp']) / 3
  np.testing.assert_allclose(float(metrics['loss']), expected, rtol=1e-5)
  for name, values in ce.items():
    np.testing.assert_allclose(float(metrics[name]), np.mean(values), rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(float(metrics['lam']), np.mean(lam), rtol=1e-6)
  # The positive's key is not the anchor's: the test sees which view went where.
  assert not np.allclose(ce['ce_q_k'], ce['ce_q_kp'], rtol=1e-3)

  # FIFO: the anchors' keys k (not kp) replace the oldest rows.
  batch_size = len(batch['key'])
  np.testing.assert_allclose(new.negative_queue[:batch_size], k, atol=2e-6)
  np.testing.assert_array_equal(new.negative_queue[batch_size:],
                                host.negative_queue[batch_size:])
  assert int(new.queue_pointer) == batch_size
  # Momentum update with the updated student parameters.
  for ours, key_leaf, query_leaf in zip(jax.tree.leaves(new.key_params),
                                        jax.tree.leaves(key_params), jax.tree.leaves(new.params)):
    np.testing.assert_allclose(ours, MOMENTUM * key_leaf + (1 - MOMENTUM) * query_leaf,
                               rtol=1e-6, atol=1e-7)
  # The key encoder's statistics after its two passes (not after the first alone).
  for ours, expected_leaf, after_key in zip(jax.tree.leaves(new.key_batch_stats),
                                            jax.tree.leaves(stats_after_pos),
                                            jax.tree.leaves(stats_after_key)):
    np.testing.assert_allclose(ours, expected_leaf, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours, after_key, rtol=1e-4)


def test_plain_moco_keeps_its_views_streams_and_loss_key():
  """Default ``moco_loss``: the anchor's two views, one shuffle stream, no bag file read;
  ``config.train.loss`` is not read by MoCo, ``config.train.moco_loss`` is checked by name."""
  config = fmnist_ablation.get_config('moco')
  assert config.train.loss == 'bingo'  # the schema default, not MoCo's objective
  assert config_checks.loss_name(config) == 'anchor_only'
  assert steps.batch_views(config) == ('query', 'key')
  assert moco_step.rng_streams(moco_step.objective(config)) == moco_step.RNG_STREAMS == ('key',)
  relation = fmnist_ablation.get_config('relation_labels')
  assert (relation.train.method, relation.train.moco_loss, relation.bags.method) == (
      'moco', 'bingo', 'labels')
  assert moco_step.rng_streams(moco_step.objective(relation)) == ('cutmix', 'key', 'pos_k')
  config.train.moco_loss = 'supcon'
  with pytest.raises(ValueError, match="config.train.moco_loss = 'supcon'"):
    config_checks.check_config(config, 1)


def test_relation_only_run_reads_the_bag_positives(tmp_path):
  """A tiny relation-only run reads the bag file (refused without one) and its positives
  change what is learnt: two bag files, two students."""
  config = _relation_config(tiny_test.get_config())
  config.data.path = tiny_run.write_images(str(tmp_path), np.random.default_rng(0), 32)
  config.train.max_steps, config.train.monitor_every_epochs = 1, 0
  source = data_sources.make_source(config.data, 'train')
  with pytest.raises(ValueError, match='config.bags.path is not set'):
    train.train_and_evaluate(config, str(tmp_path / 'no_bags'))
  params = []
  for shift in (1, 2):
    path = str(tmp_path / f'bags_{shift}.npz')
    bag_file.save_bags(path, bag_file.Bags.from_neighbors(
        np.roll(np.arange(32), shift)[:, None], method='knn', fingerprint=source.fingerprint))
    config.bags.path = path
    summary = train.train_and_evaluate(config, str(tmp_path / f'run_{shift}'))
    assert summary['step'] == 1
    assert {'ce_q_kp', 'ce_p_k', 'ce_m_kp'} <= set(summary['final_metrics'])
    checkpointer = checkpointing.TrainCheckpointer(str(tmp_path / f'run_{shift}'), keep=1,
                                                   read_only=True)
    params.append(jax.tree.leaves(checkpointer.restore_arrays(1)['params']))
    checkpointer.close()
  assert not all(np.array_equal(a, b) for a, b in zip(*params))

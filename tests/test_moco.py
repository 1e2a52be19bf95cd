"""MoCo v2 pre-training (``config.train.method = 'moco'``) against independent references.

The step: query embeddings, shuffled key embeddings, CE(q, k) with the queue and the
momentum update are recomputed here group by group in numpy; the CLI trains two steps
without teacher or bag files and resumes.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import multihost_train_worker
from bingo_jax import input_pipeline
from bingo_jax import train
from bingo_jax.configs import tiny_test
from bingo_jax.data import images as images_lib, sources as data_sources
from bingo_jax.data import parallel
from bingo_jax.method import config_checks, steps, train_step as train_step_lib
from bingo_jax.store import checkpointing
from bingo_jax.testing import subprocess_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOMENTUM = 0.9


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_moco_step_matches_group_by_group_reference():
  """One step from a key encoder that differs from the student: loss, queue, momentum
  update of the parameters, and the key encoder's own running statistics."""
  config, student, key_model, batch = multihost_train_worker.small_setup()  # tiny networks
  config.train.method, config.train.moco_momentum = 'moco', MOMENTUM
  group = config.teacher.bn_group_size
  batch_size = len(batch['key'])
  mesh = parallel.make_mesh(jax.devices()[:2])
  state = train_step_lib.create_train_state(config, student, jax.random.key(0), mesh)
  host = jax.device_get(state)
  # The key encoder starts as a copy of the student (parameters and statistics).
  for ours, student_leaf in zip(jax.tree.leaves((host.key_params, host.key_batch_stats)),
                                jax.tree.leaves((host.params, host.batch_stats))):
    np.testing.assert_array_equal(ours, student_leaf)
  state = multihost_train_worker.perturbed_key_encoder(host, mesh)
  key_params, key_stats = jax.device_get((state.key_params, state.key_batch_stats))
  step = steps.make_train_step(config, student, key_model, mesh, steps_per_epoch=10)
  moco_batch = {name: batch[name] for name in ('query', 'key')}
  new_state, metrics = step(state, parallel.replicate({}, mesh),
                            parallel.global_batch(moco_batch, mesh))
  new = jax.device_get(new_state)

  # Query: the student in training mode (BatchNorm groups of 4 of the unshuffled batch).
  (_, query), student_updates = student.apply(
      {'params': host.params, 'batch_stats': host.batch_stats},
      images_lib.normalize(batch['query']), train=True, mutable=['batch_stats'])
  query = _unit(query)
  # Keys, released shuffle: permute, each "GPU" embeds its own consecutive chunk with its
  # own batch statistics, un-permute. A global-statistics model applied per chunk is the
  # per-GPU BatchNorm; its running-statistics updates are averaged over the chunks.
  _, key_rng = jax.random.split(jax.random.wrap_key_data(jnp.asarray(host.rng)))
  permutation = np.asarray(jax.random.permutation(key_rng, batch_size))
  global_bn_model = type(key_model)(backbone=type(key_model.backbone)(None, name='backbone'),
                                    head=key_model.head.clone())
  shuffled_images = images_lib.normalize(batch['key'][permutation])
  chunks, chunk_stats = [], []
  for start in range(0, batch_size, group):
    (_, embeddings), updates = global_bn_model.apply(
        {'params': key_params, 'batch_stats': key_stats}, shuffled_images[start:start + group],
        train=True, mutable=['batch_stats'])
    chunks.append(np.asarray(embeddings))
    chunk_stats.append(updates['batch_stats'])
  keys = np.empty((batch_size, chunks[0].shape[1]))
  keys[permutation] = _unit(np.concatenate(chunks))
  expected_key_stats = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *chunk_stats)

  logits = np.concatenate([np.sum(query * keys, 1, keepdims=True),
                           query @ np.asarray(host.negative_queue, np.float64).T], 1)
  logits /= config.train.temperature
  top = logits.max(1)
  expected_loss = np.mean(top + np.log(np.exp(logits - top[:, None]).sum(1)) - logits[:, 0])
  np.testing.assert_allclose(float(metrics['loss']), expected_loss, rtol=1e-5)
  assert set(metrics) >= {'loss', 'top1', 'top5', 'learning_rate', 'epoch'}

  # FIFO: the first batch_size rows are the key encoder's keys; the rest untouched.
  np.testing.assert_allclose(new.negative_queue[:batch_size], keys, atol=2e-6)
  np.testing.assert_array_equal(new.negative_queue[batch_size:],
                                host.negative_queue[batch_size:])
  assert int(new.queue_pointer) == batch_size

  # Parameters: k = m k + (1 - m) q with the updated student parameters.
  for ours, k, q in zip(jax.tree.leaves(new.key_params), jax.tree.leaves(key_params),
                        jax.tree.leaves(new.params)):
    np.testing.assert_allclose(ours, MOMENTUM * k + (1 - MOMENTUM) * q, rtol=1e-6, atol=1e-7)
  assert not np.allclose(jax.tree.leaves(new.params)[0], jax.tree.leaves(host.params)[0])
  # Statistics: the key encoder's own training-mode pass, not an average with the student's.
  for ours, expected, k, q in zip(jax.tree.leaves(new.key_batch_stats),
                                  jax.tree.leaves(expected_key_stats), jax.tree.leaves(key_stats),
                                  jax.tree.leaves(new.batch_stats)):
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours, MOMENTUM * k + (1 - MOMENTUM) * q, rtol=1e-3)
  for ours, expected in zip(jax.tree.leaves(new.batch_stats),
                            jax.tree.leaves(student_updates['batch_stats'])):
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_bingo_state_has_no_key_encoder_and_unknown_method_is_named():
  config, student, teacher, _ = multihost_train_worker.small_setup()
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = train_step_lib.create_train_state(config, student, jax.random.key(0), mesh)
  assert state.key_params is None and state.key_batch_stats is None
  config.train.method = 'simclr'
  with pytest.raises(ValueError, match="config.train.method = 'simclr'"):
    steps.make_train_step(config, student, teacher, mesh, 1)
  with pytest.raises(ValueError, match="config.train.method = 'simclr'"):
    config_checks.check_config(config, 1)


# ---------------------------------------------------------------------------------------------
# Command line: no teacher or bag file; the run resumes with its key encoder.


def test_moco_cli_runs_without_teacher_or_bags_and_resumes(tmp_path):
  rng = np.random.default_rng(0)
  os.makedirs(tmp_path / 'images')
  lines = []
  for i in range(32):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        tmp_path / 'images' / f'{i:03d}.png')
    lines.append(f'images/{i:03d}.png 0')
  (tmp_path / 'images.txt').write_text('\n'.join(lines) + '\n')
  workdir = str(tmp_path / 'run')
  command = [sys.executable, '-m', 'bingo_jax.train', '--config', 'tiny_test',
             '--workdir', workdir, f'--config.data.path={tmp_path / "images.txt"}',
             '--config.train.method=moco', '--config.train.max_steps=2']
  environment = subprocess_environment(str(tmp_path / 'jax_cache'), pythonpath=(REPO,))

  def run(*extra):
    result = subprocess.run(command + list(extra), cwd=REPO, env=environment, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(os.path.join(workdir, train.SUMMARY_RECORD)) as f:
      return json.load(f)

  first = run('--simulate_preemption_at_step=1')
  assert first['preempted'] and first['step'] == 1
  checkpointer = checkpointing.TrainCheckpointer(workdir, keep=1, read_only=True)
  at_step_1 = checkpointer.restore_arrays(1)
  checkpointer.close()
  second = run()
  assert (second['start_step'], second['step'], second['preempted']) == (1, 2, False)
  assert np.isfinite(second['final_metrics']['loss'])

  checkpointer = checkpointing.TrainCheckpointer(workdir, keep=1, read_only=True)
  at_step_2 = checkpointer.restore_arrays(2)
  checkpointer.close()
  assert int(at_step_2['queue_pointer']) == 2 * 16 % 64
  # The resumed step continued from the stored key encoder: closed form of its update.
  for ours, k, q in zip(jax.tree.leaves(at_step_2['key_params']),
                        jax.tree.leaves(at_step_1['key_params']),
                        jax.tree.leaves(at_step_2['params'])):
    np.testing.assert_allclose(ours, 0.999 * k + 0.001 * q, rtol=1e-5, atol=1e-7)
  # The student (encoder_q) loads as usual for evaluation.
  student = checkpointing.load_student(workdir)
  np.testing.assert_array_equal(jax.tree.leaves(student.variables['params'])[0],
                                jax.tree.leaves(at_step_2['params'])[0])


def test_moco_views_without_bags_equal_the_full_pipelines_query_and_key(tmp_path):
  rng = np.random.default_rng(1)
  os.makedirs(tmp_path / 'images')
  lines = []
  for i in range(8):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        tmp_path / 'images' / f'{i:03d}.png')
    lines.append(f'images/{i:03d}.png 0')
  (tmp_path / 'images.txt').write_text('\n'.join(lines) + '\n')
  config = tiny_test.get_config()
  config.data.path = str(tmp_path / 'images.txt')
  source = data_sources.make_source(config.data, 'train')
  from bingo_jax.bags import bag_file  # pylint: disable=g-import-not-at-top
  bags = bag_file.Bags.from_neighbors(np.roll(np.arange(8), 1)[:, None], method='knn',
                                      fingerprint=source.fingerprint)
  full = next(input_pipeline.create_train_iterator(
      config, source, bags, start_step=1, local_batch_size=4, process_index=0, process_count=1))
  moco = next(input_pipeline.create_train_iterator(
      config, source, None, start_step=1, local_batch_size=4, process_index=0, process_count=1,
      views=('query', 'key')))
  assert set(moco) == {'query', 'key', 'anchor_index', 'positive_index'}
  for name in ('query', 'key', 'anchor_index'):
    np.testing.assert_array_equal(moco[name], full[name], err_msg=name)
  np.testing.assert_array_equal(moco['positive_index'], moco['anchor_index'])
  with pytest.raises(ValueError, match='need bags'):
    input_pipeline.create_train_iterator(config, source, None, start_step=0,
                                         local_batch_size=4, process_index=0, process_count=1)

"""The teacher's batch shuffle in its two forms (docs/training.md, "The teacher's batch
shuffle"): ``'shuffle_stats'`` sums each group's statistics where the images are,
``'shuffle'`` (released) permutes the images. On the same permutation both give the same keys
and running statistics, on 1 and on 8 devices, and the statistics form moves no image between
devices (read off the compiled program's collectives)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import multihost_train_worker
from bench import scaling
from bingo_jax import testing
from bingo_jax.data import parallel
from bingo_jax.method import steps
from bingo_jax.method import teacher_keys
from bingo_jax.method import train_step as train_step_lib
from bingo_jax.models import layers
from bingo_jax.models.registry import create_model, init_variables

BATCH, GROUP, IMAGE_SIZE = 16, 4, 16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _teacher():
  model = create_model('resnet18', 'moco', base_width=8, stem='cifar', head_hidden_dim=32,
                       head_output_dim=16, bn_group_size=GROUP)
  variables = init_variables(model, jax.random.key(0), image_size=IMAGE_SIZE)
  # Non-trivial affine parameters, so that a wrong group's statistics show in the outputs.
  variables = jax.tree.map(
      lambda x: x + 0.2 * jnp.sin(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape),
      variables)
  return model, variables


def _images(seed=0):
  # A per-image offset and scale: groups' statistics differ a lot, so a wrong grouping shows.
  rs = np.random.RandomState(seed)
  images = rs.normal(size=(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  return images * rs.uniform(0.5, 2.0, (BATCH, 1, 1, 1)) + rs.normal(size=(BATCH, 1, 1, 1))


def _forward(mesh, move_images):
  model, variables = _teacher()
  images = jax.device_put(jnp.asarray(_images()), parallel.data_sharding(mesh))
  variables = parallel.replicate(variables, mesh)
  fn = jax.jit(lambda v, x, rng: teacher_keys.shuffled_forward(model, v, x, rng, move_images))
  embeddings, stats = fn(variables, images, jax.random.key(3))
  return np.asarray(embeddings), jax.tree.map(np.asarray, stats)


def _assert_relative(actual, expected, rtol):
  scale = np.max(np.abs(expected))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize('num_devices', [1, 8])
def test_statistics_form_equals_released_shuffle(num_devices):
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  released, released_stats = _forward(mesh, move_images=True)
  ours, our_stats = _forward(mesh, move_images=False)
  _assert_relative(ours, released, 1e-5)
  jax.tree.map(lambda a, b: _assert_relative(a, b, 1e-5), our_stats, released_stats)
  # The keys depend on the permutation: groups of the unshuffled batch give others.
  model, variables = _teacher()
  (_, unshuffled), _ = model.apply(variables, jnp.asarray(_images()), train=True,
                                   mutable=['batch_stats'])
  assert np.max(np.abs(np.asarray(unshuffled) - released)) > 1e-2 * np.max(np.abs(released))


def test_views_in_one_pass_equal_one_pass_per_view():
  """``keys_by_view`` in ``'shuffle_stats'`` embeds two views in one interleaved pass: the keys
  of the released shuffle run once per view with the same PRNG keys, on 8 devices."""
  mesh = parallel.make_mesh(jax.devices()[:8])
  model, variables = _teacher()
  variables = parallel.replicate(variables, mesh)
  sharding = parallel.data_sharding(mesh)
  images = {view: jax.device_put(jnp.asarray(_images(seed)), sharding)
            for seed, view in enumerate(('key', 'pos_k'))}
  rngs = {'key': jax.random.key(5), 'pos_k': jax.random.key(6)}
  keys = {mode: jax.jit(lambda v, x, m=mode: teacher_keys.keys_by_view(
      model, v, x, m, rngs, sharding))(variables, images) for mode in ('shuffle_stats', 'shuffle')}
  for view in images:
    _assert_relative(np.asarray(keys['shuffle_stats'][view]), np.asarray(keys['shuffle'][view]),
                     1e-5)
  assert not np.allclose(np.asarray(keys['shuffle']['key']), np.asarray(keys['shuffle']['pos_k']),
                         atol=1e-2)


@pytest.mark.parametrize('offset', [0.0, 300.0])
def test_batchnorm_positions_match_numpy_groups(offset):
  """``layers.BatchNorm(positions=...)`` against numpy in float64: group g holds the examples
  whose position // group_size == g; outputs in the input's order; running statistics the
  mean of the groups' (unbiased) statistics. With activations far from zero (offset 300,
  unit scale) and a stored mean near them, as a trained network's, the one-pass variance
  keeps float32 precision."""
  rs = np.random.RandomState(1)
  x = (rs.normal(size=(BATCH, 3, 5, 6)) * rs.uniform(0.1, 3, (BATCH, 1, 1, 1))
       + offset).astype(np.float32)
  positions = rs.permutation(BATCH)
  bn = layers.BatchNorm(use_running_average=False, group_size=GROUP, momentum=0.5)
  variables = bn.init(jax.random.key(0), jnp.asarray(x))
  stored_mean = offset + rs.normal(size=6).astype(np.float32)
  variables = {'params': variables['params'],
               'batch_stats': {'mean': jnp.asarray(stored_mean),
                               'var': variables['batch_stats']['var']}}
  y, updates = bn.apply(variables, jnp.asarray(x), positions=jnp.asarray(positions),
                        mutable=['batch_stats'])
  x64 = x.astype(np.float64)
  expected = np.empty_like(x64)
  means, variances = [], []
  for g in range(BATCH // GROUP):
    members = np.flatnonzero(positions // GROUP == g)
    mean = x64[members].mean(axis=(0, 1, 2))
    var = x64[members].var(axis=(0, 1, 2))
    expected[members] = (x64[members] - mean) / np.sqrt(var + 1e-5)
    count = GROUP * 3 * 5
    means.append(mean)
    variances.append(var * count / (count - 1))
  np.testing.assert_allclose(np.asarray(y), expected, atol=2e-5)
  np.testing.assert_allclose(np.asarray(updates['batch_stats']['mean']),
                             0.5 * stored_mean + 0.5 * np.mean(means, axis=0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(updates['batch_stats']['var']),
                             0.5 + 0.5 * np.mean(variances, axis=0), rtol=1e-5)


def test_statistics_form_moves_no_image_between_devices():
  """On 8 devices the released shuffle's collectives carry the global batch of images; the
  statistics form's carry only (groups, channels) per BatchNorm layer."""
  mesh = parallel.make_mesh(jax.devices()[:8])
  model, variables = _teacher()
  images = jax.ShapeDtypeStruct((BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32,
                                sharding=parallel.data_sharding(mesh))
  variables = parallel.replicate(variables, mesh)
  image_bytes = BATCH * IMAGE_SIZE * IMAGE_SIZE * 3 * 4
  largest = {}
  for move_images in (True, False):
    fn = jax.jit(lambda v, x, rng, m=move_images: teacher_keys.shuffled_forward(
        model, v, x, rng, m))
    hlo = fn.lower(variables, images, jax.random.key(3)).compile().as_text()
    collectives = scaling.parse_collectives(hlo)
    assert collectives, 'no collective found: the parser is broken'
    largest[move_images] = max(c.largest_array_bytes for c in collectives)
  assert largest[True] >= image_bytes
  widest = 8 * 8  # the widest BatchNorm: 8 * base width channels
  # One all-reduce per layer of its groups' sums and sums of squares.
  assert largest[False] <= (BATCH // GROUP) * 2 * widest * 4


def test_collectives_are_read_with_their_sizes():
  """A sum over a sharded axis is one all-reduce of the result's shape, and a replicated
  result of a sharded input one all-gather: their kinds, bytes and ring traffic."""
  mesh = parallel.make_mesh(jax.devices()[:8])
  x = jax.ShapeDtypeStruct((64, 24), jnp.float32, sharding=parallel.data_sharding(mesh))
  hlo = jax.jit(lambda a: jnp.sum(a, axis=0),
                out_shardings=parallel.replicated(mesh)).lower(x).compile().as_text()
  (collective,) = scaling.parse_collectives(hlo)
  assert (collective.kind, collective.array_bytes, collective.group_size) == (
      'all-reduce', 24 * 4, 8)
  assert collective.bytes_sent(8) == 2 * 7 / 8 * 24 * 4
  hlo = jax.jit(lambda a: a + 1.0, out_shardings=parallel.replicated(mesh)).lower(
      x).compile().as_text()
  (collective,) = scaling.parse_collectives(hlo)
  assert (collective.kind, collective.array_bytes, collective.group_size) == (
      'all-gather', 64 * 24 * 4, 8)
  assert collective.bytes_sent(8) == 7 / 8 * 64 * 24 * 4


def _losses(bn_mode: str, method: str, num_steps: int = 4):
  """Loss curve and final student of ``num_steps`` BINGO (or MoCo) steps on 8 devices."""
  config, student, teacher, batch = multihost_train_worker.small_setup()
  config.teacher.bn_mode = bn_mode
  config.train.method = method
  mesh = parallel.make_mesh(jax.devices()[:8])
  key_model = teacher if method == 'bingo' else type(student)(
      backbone=type(student.backbone)(config.teacher.bn_group_size, name='backbone'),
      head=student.head)
  teacher_variables = parallel.replicate(init_variables(teacher, jax.random.key(1), 8), mesh)
  state = train_step_lib.create_train_state(config, student, jax.random.key(0), mesh)
  step = steps.make_train_step(config, student, key_model, mesh, steps_per_epoch=2)
  curve = []
  for index in range(num_steps):
    rolled = {name: np.roll(images, index, axis=0) for name, images in batch.items()}
    state, metrics = step(state, teacher_variables, parallel.global_batch(rolled, mesh))
    curve.append(float(metrics['loss']))
  return np.array(curve), jax.tree.map(np.asarray, (state.params, state.key_batch_stats))


@pytest.mark.parametrize('method', ['bingo', 'moco'])
def test_training_curve_is_the_released_shuffles(method):
  """A few steps of training: the same losses and student with either form."""
  released, released_state = _losses('shuffle', method)
  ours, our_state = _losses('shuffle_stats', method)
  np.testing.assert_allclose(ours, released, rtol=1e-5)
  jax.tree.map(lambda a, b: _assert_relative(a, b, 1e-4), our_state, released_state)
  # The frozen teacher (no shuffle) follows another curve: the comparison can fail.
  if method == 'bingo':
    frozen, _ = _losses('frozen', method)
    assert not np.allclose(frozen, released, rtol=1e-3)


def test_scaling_bench_smoke_reads_the_teacher_shuffle(tmp_path):
  """``bench/scaling.py --smoke`` (8 fake devices, 2 anchors each, 32 px, float32): the
  released shuffle gathers both teacher views of the global batch of images on every device,
  the statistics form sends far less."""
  environment = testing.subprocess_environment(str(tmp_path), pythonpath=(REPO,))
  result = subprocess.run([sys.executable, '-m', 'bench.scaling', '--smoke'], cwd=REPO,
                          env=environment, capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-4000:]
  lines = result.stdout.splitlines()
  header = next(line for line in lines if line.startswith('| devices | global batch'))
  columns = [cell.strip() for cell in header.strip('|').split('|')]
  rows = {cells[2]: cells for cells in (
      [cell.strip() for cell in line.strip('|').split('|')] for line in lines
      if line.startswith('| 8 | 16 |'))}
  teacher = {mode: float(rows[mode][columns.index('teacher_keys')]) for mode in rows}
  # Ring all-gathers of 2 views x 16 images x 32 x 32 x 3 float32 among 8 devices, plus
  # the (16, 16) embeddings gathered back (under the table's 0.01 MB rounding).
  assert teacher['shuffle'] == pytest.approx(7 / 8 * 2 * 16 * 32 * 32 * 3 * 4 / 1e6, abs=0.01)
  assert teacher['shuffle_stats'] < teacher['shuffle'] / 2
  assert any(line.startswith('| 8 | shuffle_stats |') for line in lines)

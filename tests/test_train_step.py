"""The train step's parts against independent references, and its device independence."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import multihost_train_worker
from bingo_jax.configs.common import base_config
from bingo_jax.data import images as images_lib
from bingo_jax.data import parallel
from bingo_jax.data import views
from bingo_jax.method import config_checks
from bingo_jax.method import cutmix as cutmix_lib
from bingo_jax.method import optimization
from bingo_jax.method import steps
from bingo_jax.method import teacher_keys
from bingo_jax.method import train_step as train_step_lib
from bingo_jax.models import layers
from bingo_jax.models.registry import create_model, init_variables

IMAGE_SIZE = 16
SMALL_MODEL = dict(head='moco', base_width=8, stem='cifar', head_hidden_dim=64,
                   head_output_dim=16)


# ---------------------------------------------------------------------------------------------
# CutMix (docs/method.md §3)


def reference_box(lam0: float, row_center: int, col_center: int, height: int, width: int):
  """docs/method.md §3 in numpy: sides int(side * sqrt(1 - lam0)), centred, clipped to the
  image."""
  cut_rows = int(height * np.sqrt(1.0 - lam0))
  cut_cols = int(width * np.sqrt(1.0 - lam0))
  return (np.clip(row_center - cut_rows // 2, 0, height),
          np.clip(row_center + cut_rows // 2, 0, height),
          np.clip(col_center - cut_cols // 2, 0, width),
          np.clip(col_center + cut_cols // 2, 0, width))


def test_cutmix_box_matches_numpy_reference():
  height, width = 16, 12
  draws = [(0.3, 5, 7), (0.05, 0, 11), (0.9, 15, 0), (0.5, 8, 6), (0.01, 8, 6)]
  boxes = cutmix_lib.boxes_from_draws(
      cutmix_lib.BoxDraws(*(jnp.asarray(column) for column in zip(*draws))), height, width)
  lam = cutmix_lib.kept_fraction(boxes, height, width)
  masks = cutmix_lib.box_masks(boxes, height, width)
  for index, draw in enumerate(draws):
    row_start, row_end, col_start, col_end = reference_box(*draw, height, width)
    ours = [int(b[index]) for b in boxes]
    assert ours == [row_start, row_end, col_start, col_end], (draw, ours)
    expected_mask = np.zeros((height, width), bool)
    expected_mask[row_start:row_end, col_start:col_end] = True
    np.testing.assert_array_equal(np.asarray(masks[index]), expected_mask)
    area = (row_end - row_start) * (col_end - col_start)
    np.testing.assert_allclose(float(lam[index]), 1 - area / (height * width), atol=1e-7)


@pytest.mark.parametrize('mode,examples_per_box', [('batch', 8), ('sample', 1), ('group', 4)])
def test_cutmix_pastes_pos_q_box_into_query(mode, examples_per_box):
  rng = np.random.RandomState(0)
  query = rng.randint(0, 256, (8, 16, 16, 3)).astype(np.uint8)
  pos_q = rng.randint(0, 256, (8, 16, 16, 3)).astype(np.uint8)
  key = jax.random.key(3)
  mix, lam = cutmix_lib.cutmix(key, jnp.asarray(query), jnp.asarray(pos_q), mode=mode,
                               beta=2.0, group_size=4)
  draws = cutmix_lib.sample_draws(key, 8 // examples_per_box, 16, 16, 2.0)
  for example in range(8):
    box = example // examples_per_box
    r0, r1, c0, c1 = reference_box(float(draws.lam0[box]), int(draws.row_center[box]),
                                   int(draws.col_center[box]), 16, 16)
    expected = query[example].copy()
    expected[r0:r1, c0:c1] = pos_q[example, r0:r1, c0:c1]
    np.testing.assert_array_equal(np.asarray(mix[example]), expected)
    np.testing.assert_allclose(float(lam[example]), 1 - (r1 - r0) * (c1 - c0) / 256, atol=1e-7)
  assert mix.dtype == jnp.uint8


def test_cutmix_lam0_is_beta_2_2():
  lam0 = np.asarray(cutmix_lib.sample_draws(jax.random.key(0), 20000, 32, 32, 2.0).lam0)
  # Beta(2, 2): mean 1/2, variance 1/20; standard errors ~0.0016 and ~0.0004.
  assert abs(lam0.mean() - 0.5) < 0.01
  assert abs(lam0.var() - 0.05) < 0.003


# ---------------------------------------------------------------------------------------------
# Optimizer (docs/method.md §7)


@pytest.mark.parametrize('lr_schedule', ['cosine_epoch', 'cosine_step'])
def test_optimizer_matches_torch_sgd(lr_schedule):
  train = base_config().train
  train.base_lr, train.batch_size, train.epochs = 0.1, 512, 4
  train.weight_decay, train.momentum, train.lr_schedule = 0.05, 0.9, lr_schedule
  steps_per_epoch, num_steps = 2, 7  # crosses three epoch boundaries
  peak_lr = 0.1 * 512 / 256
  rng = np.random.RandomState(0)
  params = {'w': rng.normal(size=(3, 4)).astype(np.float32),
            'bias': rng.normal(size=(4,)).astype(np.float32)}
  grads = [{name: rng.normal(size=value.shape).astype(np.float32)
            for name, value in params.items()} for _ in range(num_steps)]

  torch_params = {name: torch.tensor(value, requires_grad=True) for name, value in params.items()}
  torch_sgd = torch.optim.SGD(list(torch_params.values()), lr=peak_lr, momentum=0.9,
                              weight_decay=0.05)
  optimizer = optimization.make_optimizer(train, steps_per_epoch)
  opt_state = optimizer.init(params)
  ours = {name: jnp.asarray(value) for name, value in params.items()}
  update = jax.jit(optimizer.update)
  for step in range(num_steps):
    progress = (step // steps_per_epoch if lr_schedule == 'cosine_epoch'
                else step / steps_per_epoch) / train.epochs
    for group in torch_sgd.param_groups:  # released adjust_learning_rate
      group['lr'] = peak_lr * 0.5 * (1 + np.cos(np.pi * progress))
    for name, tensor in torch_params.items():
      tensor.grad = torch.from_numpy(grads[step][name])
    torch_sgd.step()
    updates, opt_state = update({n: jnp.asarray(g) for n, g in grads[step].items()},
                                opt_state, ours)
    ours = jax.tree.map(lambda p, u: p + u, ours, updates)
    for name, tensor in torch_params.items():
      np.testing.assert_allclose(np.asarray(ours[name]), tensor.detach().numpy(),
                                 rtol=1e-6, atol=1e-6, err_msg=f'step {step} {name}')


# ---------------------------------------------------------------------------------------------
# Teacher shuffle BatchNorm (docs/method.md §5)


class TinyTeacher(nn.Module):
  """conv3x3 - BatchNorm(groups) - ReLU - mean pool - Dense, returning (features, head)."""
  group_size: int

  @nn.compact
  def __call__(self, images, train=False):
    x = layers.conv(4, 3, name='conv')(images)
    x = layers.BatchNorm(use_running_average=not train, group_size=self.group_size,
                         name='bn')(x)
    features = jnp.mean(nn.relu(x), axis=(1, 2))
    return features, nn.Dense(5, name='fc')(features)


@pytest.mark.parametrize('bn_mode', config_checks.SHUFFLE_MODES)
def test_teacher_shuffle_bn_matches_torch_per_group_reference(bn_mode):
  """Both shuffle forms against the released one in PyTorch: permuted chunks, one per GPU."""
  batch, group = 16, 4
  images = np.random.RandomState(0).normal(size=(batch, 6, 6, 3)).astype(np.float32)
  model = TinyTeacher(group)
  variables = model.init(jax.random.key(0), jnp.asarray(images))
  # Non-trivial stored statistics and affine parameters (shuffle mode must ignore the former).
  variables = jax.tree.map(lambda x: x + 0.3 * jnp.arange(x.size).reshape(x.shape) / x.size,
                           variables)
  rng = jax.random.key(7)
  ours = teacher_keys.teacher_embeddings(model, variables, jnp.asarray(images), bn_mode, rng)

  params = jax.tree.map(lambda x: torch.from_numpy(np.array(x)), variables['params'])
  torch_teacher = torch.nn.Sequential(
      torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4),
      torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5))
  with torch.no_grad():
    torch_teacher[0].weight.copy_(params['conv']['kernel'].permute(3, 2, 0, 1))
    torch_teacher[1].weight.copy_(params['bn']['scale'])
    torch_teacher[1].bias.copy_(params['bn']['bias'])
    torch_teacher[5].weight.copy_(params['fc']['kernel'].T)
    torch_teacher[5].bias.copy_(params['fc']['bias'])
  torch_teacher.train()
  # The released shuffle: permute the global batch, each "GPU" normalises its group of
  # consecutive permuted examples, outputs go back to their original rows.
  permutation = torch.from_numpy(np.array(jax.random.permutation(rng, batch)))
  nchw = torch.tensor(images).permute(0, 3, 1, 2)[permutation]
  with torch.no_grad():
    shuffled = torch.cat([torch_teacher(chunk) for chunk in nchw.split(group)])
  expected = torch.empty_like(shuffled)
  expected[permutation] = torch.nn.functional.normalize(shuffled, dim=1)
  np.testing.assert_allclose(np.asarray(ours), expected.numpy(), atol=2e-6)

  # Groups of the unshuffled batch would give other embeddings: the test sees the shuffle.
  with torch.no_grad():
    unshuffled = torch.cat([torch_teacher(chunk) for chunk in
                            torch.tensor(images).permute(0, 3, 1, 2).split(group)])
  assert not np.allclose(np.asarray(ours),
                         torch.nn.functional.normalize(unshuffled, dim=1).numpy(), atol=1e-3)

  frozen = teacher_keys.teacher_embeddings(model, variables, jnp.asarray(images), 'frozen', rng)
  torch_teacher.eval()
  torch_teacher[1].running_mean.copy_(torch.from_numpy(np.array(
      variables['batch_stats']['bn']['mean'])))
  torch_teacher[1].running_var.copy_(torch.from_numpy(np.array(
      variables['batch_stats']['bn']['var'])))
  with torch.no_grad():
    expected_frozen = torch.nn.functional.normalize(
        torch_teacher(torch.tensor(images).permute(0, 3, 1, 2)), dim=1)
  np.testing.assert_allclose(np.asarray(frozen), expected_frozen.numpy(), atol=2e-6)


# ---------------------------------------------------------------------------------------------
# The whole step


def small_config(batch_size: int = 32, queue_size: int = 64):
  config = base_config()
  config.student.update(base_width=8, stem='cifar', head_hidden_dim=64, head_output_dim=16,
                        bn_group_size=8)
  config.teacher.bn_group_size = 8
  config.data.image_size = IMAGE_SIZE
  config.train.update(batch_size=batch_size, queue_size=queue_size, epochs=3,
                      own_key_warmup_epochs=1, base_lr=0.03, weight_decay=1e-3)
  return config


def random_batch(batch_size: int, seed: int = 0) -> dict:
  rng = np.random.RandomState(seed)
  batch = {name: rng.randint(0, 256, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
           for name in views.VIEW_KEYS}
  batch['anchor_index'] = np.arange(batch_size, dtype=np.int32)
  batch['positive_index'] = np.arange(batch_size, dtype=np.int32)[::-1].copy()
  return batch


def run_steps(config, mesh, initial_state, teacher_variables, batch, num_steps: int):
  """``num_steps`` steps on ``mesh`` from host copies of the state and teacher variables."""
  student = create_model('resnet18', bn_group_size=config.student.bn_group_size, **SMALL_MODEL)
  teacher = create_model('resnet18', bn_group_size=config.teacher.bn_group_size, **SMALL_MODEL)
  state = parallel.replicate(initial_state, mesh)
  teacher_variables = parallel.replicate(teacher_variables, mesh)
  step = steps.make_train_step(config, student, teacher, mesh, steps_per_epoch=1)
  history = []
  for _ in range(num_steps):
    state, metrics = step(state, teacher_variables, parallel.global_batch(batch, mesh))
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def assert_trees_close(actual, expected, rtol):
  paths_actual, _ = jax.tree_util.tree_flatten_with_path(actual)
  leaves_expected = jax.tree.leaves(expected)
  assert len(paths_actual) == len(leaves_expected)
  for (path, a), b in zip(paths_actual, leaves_expected):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    error = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert error <= rtol, f'{jax.tree_util.keystr(path)}: relative error {error:.2e}'


def test_three_steps_are_device_independent():
  config = small_config()
  batch = random_batch(config.train.batch_size)
  one_device = parallel.make_mesh(jax.devices()[:1])
  # Initialised once (initialisation is the slow part on CPU), then copied to each mesh.
  student = create_model('resnet18', bn_group_size=8, **SMALL_MODEL)
  initial_state = jax.device_get(
      train_step_lib.create_train_state(config, student, jax.random.key(0), one_device))
  # The teacher has the student's architecture: perturbed copies of its initial variables.
  noise = np.random.RandomState(1)
  teacher_variables = jax.tree.map(
      lambda x: x * (1 + 0.2 * noise.normal(size=x.shape)).astype(np.float32),
      {'params': initial_state.params, 'batch_stats': initial_state.batch_stats})
  assert initial_state.negative_queue.shape == (64, 16)
  np.testing.assert_allclose(np.linalg.norm(initial_state.negative_queue, axis=1), 1.0,
                             atol=1e-6)
  state_8, history_8 = run_steps(config, parallel.make_mesh(jax.devices()[:8]), initial_state,
                                 teacher_variables, batch, 3)
  state_1, history_1 = run_steps(config, one_device, initial_state, teacher_variables, batch, 3)
  assert_trees_close(state_8.params, state_1.params, 1e-5)
  assert_trees_close(state_8.batch_stats, state_1.batch_stats, 1e-5)
  assert_trees_close(state_8.negative_queue, state_1.negative_queue, 1e-5)
  assert int(state_8.queue_pointer) == int(state_1.queue_pointer) == 96 % 64
  assert int(state_8.step) == 3

  # The run went through the warm-up switch and the per-epoch learning-rate change.
  assert [h['own_weight'] for h in history_8] == [1.0, 0.5, 0.5]
  peak = 0.03 * 32 / 256
  np.testing.assert_allclose([h['learning_rate'] for h in history_8],
                             [peak * 0.5 * (1 + np.cos(np.pi * e / 3)) for e in range(3)],
                             rtol=1e-6)
  for h8, h1 in zip(history_8, history_1):
    np.testing.assert_allclose(h8['loss'], h1['loss'], rtol=1e-5)
  # Queue rows are unit teacher keys; the last step wrote rows 0..31 again.
  np.testing.assert_allclose(np.linalg.norm(state_8.negative_queue, axis=1), 1.0, atol=1e-5)


def test_frozen_teacher_keys_enter_queue_fifo():
  """Paper loss, frozen teacher: the queue's oldest rows become the teacher keys."""
  config, student, teacher, batch = multihost_train_worker.small_setup()  # tiny networks
  batch_size = len(batch['key'])
  config.train.queue_size = 3 * batch_size
  config.teacher.bn_mode = 'frozen'
  config.train.loss = 'paper_eq8'
  mesh = parallel.make_mesh(jax.devices()[:2])
  teacher_variables = init_variables(teacher, jax.random.key(1), 8)
  _, keys = jax.jit(lambda v, x: teacher.apply(v, images_lib.normalize(x)))(
      teacher_variables, batch['key'])
  keys = np.asarray(keys) / np.linalg.norm(np.asarray(keys), axis=1, keepdims=True)
  state = train_step_lib.create_train_state(config, student, jax.random.key(0), mesh)
  initial_queue = np.asarray(state.negative_queue)
  step = steps.make_train_step(config, student, teacher, mesh, steps_per_epoch=10)
  teacher_variables = parallel.replicate(teacher_variables, mesh)
  for index in range(4):  # 4 batches through a 3-batch queue: wraps around once
    # Step ``index`` sees the anchors rolled by ``index``; frozen keys roll with them.
    rolled = {name: np.roll(images, index, axis=0) for name, images in batch.items()}
    state, metrics = step(state, teacher_variables, parallel.global_batch(rolled, mesh))
  queue = np.asarray(state.negative_queue)
  expected_rows = [np.roll(keys, index, axis=0) for index in (3, 1, 2)]
  np.testing.assert_allclose(queue, np.concatenate(expected_rows), atol=1e-6)
  assert int(state.queue_pointer) == batch_size
  assert not np.allclose(initial_queue[:batch_size], keys, atol=1e-2)
  assert set(metrics) >= {'loss', 'ce_q_k', 'ce_p_k', 'top1', 'top5', 'learning_rate', 'lam'}


def test_bad_settings_are_clear_errors():
  config = small_config(batch_size=32, queue_size=48)
  student = create_model('resnet18', bn_group_size=8, **SMALL_MODEL)
  mesh = parallel.make_mesh(jax.devices()[:1])
  with pytest.raises(ValueError, match='queue_size = 48'):
    steps.make_train_step(config, student, student, mesh, 1)
  config = small_config()
  config.teacher.bn_group_size = 16
  with pytest.raises(ValueError, match='teacher model was built with bn_group_size=8'):
    steps.make_train_step(config, student, student, mesh, 1)
  config = small_config()
  config.student.bn_group_size, config.train.cutmix = None, 'group'
  global_bn_student = create_model('resnet18', bn_group_size=None, **SMALL_MODEL)
  with pytest.raises(ValueError, match="cutmix = 'group'.*config.student.bn_group_size = None"):
    steps.make_train_step(config, global_bn_student, student, mesh, 1)


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _frozen_teacher_step(config, student, teacher, batch):
  """One training step on 2 devices with a frozen teacher of fresh variables (it sets
  ``config.teacher.bn_mode = 'frozen'``). Returns the state's (params, batch_stats, queue)
  before the step, the teacher's variables, the mesh, the new state and the metrics."""
  config.teacher.bn_mode = 'frozen'
  mesh = parallel.make_mesh(jax.devices()[:2])
  teacher_variables = init_variables(teacher, jax.random.key(1), 8)
  state = train_step_lib.create_train_state(config, student, jax.random.key(0), mesh)
  before = jax.device_get(
      (state.params, state.batch_stats, state.negative_queue))  # before the step donates them
  step = steps.make_train_step(config, student, teacher, mesh, steps_per_epoch=10)
  new_state, metrics = step(state, parallel.replicate(teacher_variables, mesh),
                            parallel.global_batch(batch, mesh))
  return before, teacher_variables, mesh, new_state, metrics


def test_step_loss_is_the_spec_formula_of_separately_embedded_views():
  """Warm-up step, frozen teacher, no CutMix: loss = (CE(q, k) + CE(p, kp)) / 2
  (docs/method.md §6), each view embedded on its own and the CE written out in numpy."""
  config, student, teacher, batch = multihost_train_worker.small_setup()
  config.train.cutmix = 'none'
  (params, batch_stats, queue), teacher_variables, _, _, metrics = _frozen_teacher_step(
      config, student, teacher, batch)

  def embed_student(images):  # training-mode BatchNorm in groups of 4, as the step
    (_, embeddings), _ = student.apply({'params': params, 'batch_stats': batch_stats},
                                       images_lib.normalize(images), train=True,
                                       mutable=['batch_stats'])
    return _unit(embeddings)

  def embed_teacher(images):
    return _unit(teacher.apply(teacher_variables, images_lib.normalize(images))[1])

  def cross_entropy(s, t):
    logits = np.concatenate([np.sum(s * t, 1, keepdims=True), s @ np.asarray(queue).T], 1)
    logits /= config.train.temperature
    top = logits.max(1)
    return np.mean(top + np.log(np.exp(logits - top[:, None]).sum(1)) - logits[:, 0])

  q, p = embed_student(batch['query']), embed_student(batch['pos_q'])
  k, kp = embed_teacher(batch['key']), embed_teacher(batch['pos_k'])
  assert float(metrics['own_weight']) == 1.0  # epoch 0 < own_key_warmup_epochs
  np.testing.assert_allclose(float(metrics['loss']),
                             (cross_entropy(q, k) + cross_entropy(p, kp)) / 2, rtol=1e-5)
  # The other pairing gives another value: the test sees which key goes with which view.
  assert not np.isclose(cross_entropy(q, kp) + cross_entropy(p, k),
                        cross_entropy(q, k) + cross_entropy(p, kp), rtol=1e-3)


def test_anchor_only_loss_step_is_ce_of_query_against_its_own_teacher_key():
  """loss = 'anchor_only' (SEED-like, no bags): loss = mean CE(q, k) against the queue, written
  out in float64 numpy from separately embedded views; one student pass; keys enter the
  queue."""
  config, student, teacher, batch = multihost_train_worker.small_setup()
  config.train.loss = 'anchor_only'
  config.train.cutmix = 'batch'  # ignored by 'anchor_only', as by 'paper_eq8'
  batch = {name: batch[name] for name in ('query', 'key')}  # no positive views are needed
  (params, batch_stats, queue), teacher_variables, _, new_state, metrics = (
      _frozen_teacher_step(config, student, teacher, batch))

  # Student: training-mode BatchNorm in groups of 4, as the step; teacher: frozen (eval mode).
  (_, query_embeddings), updates = student.apply(
      {'params': params, 'batch_stats': batch_stats}, images_lib.normalize(batch['query']),
      train=True, mutable=['batch_stats'])
  q = _unit(query_embeddings)
  k = _unit(teacher.apply(teacher_variables, images_lib.normalize(batch['key']))[1])
  logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ np.asarray(queue, np.float64).T],
                          1) / config.train.temperature
  top = logits.max(1)
  expected_loss = np.mean(top + np.log(np.exp(logits - top[:, None]).sum(1)) - logits[:, 0])

  assert set(metrics) == {'loss', 'ce_q_k', 'top1', 'top5', 'learning_rate', 'own_weight', 'lam',
                          'epoch'}
  np.testing.assert_allclose(float(metrics['loss']), expected_loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['ce_q_k']), expected_loss, rtol=1e-5)
  assert float(metrics['own_weight']) == float(metrics['lam']) == 1.0
  # One student pass: the running statistics moved once, by the query batch alone.
  assert_trees_close(new_state.batch_stats, updates['batch_stats'], 1e-5)
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_state.params),
                                                   jax.tree.leaves(params)))
  # The anchors' teacher keys replaced the oldest queue rows.
  np.testing.assert_allclose(np.asarray(new_state.negative_queue)[:len(k)], k, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new_state.negative_queue)[len(k):],
                             np.asarray(queue)[len(k):])


def test_unknown_loss_name_is_a_clear_error():
  config = small_config()
  config.train.loss = 'infonce'
  student = create_model('resnet18', bn_group_size=8, **SMALL_MODEL)
  mesh = parallel.make_mesh(jax.devices()[:1])
  message = (r"config.train.loss = 'infonce'; expected one of "
             r"\('bingo', 'paper_eq8', 'anchor_only'\)")
  with pytest.raises(ValueError, match=message):
    steps.make_train_step(config, student, student, mesh, 1)
  with pytest.raises(ValueError, match=message):
    config_checks.check_config(config, 1)


@pytest.mark.parametrize('loss_name', ['kd', 'rkd'])
def test_baseline_step_compares_student_and_teacher_on_the_same_query_image(loss_name):
  """Table 9's KD and RKD through the registry: the step's loss is the numpy formula of the
  student's and the (frozen) teacher's embeddings of the same ``query`` images, the batch
  holds only the anchor's views, and the teacher's ``key`` embeddings still enter the queue.
  In shuffle mode (the teacher's extra batch-shuffle stream) the loss is finite too."""
  config, student, teacher, batch = multihost_train_worker.small_setup()
  config.train.loss = loss_name
  assert steps.batch_views(config) == ('query', 'key')
  batch = {name: batch[name] for name in ('query', 'key')}
  (params, batch_stats, _), teacher_variables, mesh, new_state, metrics = (
      _frozen_teacher_step(config, student, teacher, batch))

  (_, query_embeddings), _ = student.apply(
      {'params': params, 'batch_stats': batch_stats}, images_lib.normalize(batch['query']),
      train=True, mutable=['batch_stats'])
  q = _unit(query_embeddings)
  tq = _unit(teacher.apply(teacher_variables, images_lib.normalize(batch['query']))[1])
  k = _unit(teacher.apply(teacher_variables, images_lib.normalize(batch['key']))[1])
  if loss_name == 'kd':
    expected, term = np.mean(np.sum((q - tq) ** 2, axis=1)), 'kd_l2'
  else:
    gap = q @ q.T - tq @ tq.T
    expected = (np.sum(gap ** 2) - np.sum(np.diag(gap) ** 2)) / (len(q) * (len(q) - 1))
    term = 'rkd_similarity_mse'
  np.testing.assert_allclose(float(metrics['loss']), expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(metrics[term]), expected, rtol=1e-5, atol=1e-7)
  # The pairing matters: against the key view's teacher embedding the value differs.
  other = (np.mean(np.sum((q - k) ** 2, axis=1)) if loss_name == 'kd' else
           np.sum((q @ q.T - k @ k.T) ** 2) / (len(q) * (len(q) - 1)))
  assert not np.isclose(other, expected, rtol=1e-3)
  np.testing.assert_allclose(np.asarray(new_state.negative_queue)[:len(k)], k, atol=1e-6)

  config.teacher.bn_mode = 'shuffle'
  state = train_step_lib.create_train_state(config, student, jax.random.key(0), mesh)
  step = steps.make_train_step(config, student, teacher, mesh, steps_per_epoch=10)
  _, metrics = step(state, parallel.replicate(teacher_variables, mesh),
                    parallel.global_batch(batch, mesh))
  assert np.isfinite(float(metrics['loss'])) and float(metrics['loss']) > 0

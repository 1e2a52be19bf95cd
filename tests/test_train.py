"""The training command: resume equals a straight run, bad inputs fail early and clearly,
configs carry the released hyper-parameters, progress numbers and TensorBoard logs are right.

The resume test runs the real CLI (``python -m bingo_jax.train``) in subprocesses on the tests'
tiny set-up (bingo_jax/testing/tiny_run.py): 48 random PNG images in a file list,
random-neighbour bags, a randomly initialised small ResNet saved as the teacher model file.
"""

import importlib
import json
import os
import subprocess

import jax
import numpy as np
import pytest
import tensorflow as tf

from bingo_jax import input_pipeline
from bingo_jax import train
from bingo_jax.bags import bag_file
from bingo_jax.configs import tiny_test
from bingo_jax.data import sources as data_sources
from bingo_jax.method import config_checks
from bingo_jax.run import progress
from bingo_jax.store import checkpointing
from bingo_jax.testing import tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = tiny_run.NUM_IMAGES


def _tiny_config(inputs: dict, **train_overrides):
  config = tiny_test.get_config()
  config.teacher.path = inputs['teacher']
  config.data.path = inputs['images']
  config.bags.path = inputs['bags']
  config.train.max_steps = 4
  config.train.update(train_overrides)
  return config


@pytest.fixture(scope='module')
def tiny_inputs(tmp_path_factory):
  return tiny_run.make_inputs(tmp_path_factory.mktemp('tiny_inputs'))


# ---------------------------------------------------------------------------------------------
# Resume (acceptance): 4 steps straight == 2 steps, exit, the same command again, 2 more.


def _command(inputs: dict, workdir: str, *extra: str) -> list:
  return tiny_run.train_command(inputs, workdir, '--config.train.max_steps=4', *extra)


def _environment(inputs: dict) -> dict:
  # Two devices keep the batch sharded; the persistent compilation cache lets the rerun skip
  # recompiling what the first runs compiled (identical executables, identical numerics).
  return tiny_run.environment(inputs)


def _wait(process: subprocess.Popen, what: str) -> None:
  _, stderr = process.communicate(timeout=900)
  assert process.returncode == 0, f'{what} failed (rc {process.returncode}):\n{stderr[-4000:]}'


def _summary(workdir: str) -> dict:
  with open(os.path.join(workdir, train.SUMMARY_RECORD)) as f:
    return json.load(f)


def _stored_state(workdir: str, step: int) -> dict:
  checkpointer = checkpointing.TrainCheckpointer(workdir, keep=1, read_only=True)
  stored = checkpointer.restore_arrays(step)
  checkpointer.close()
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]}


@pytest.mark.parametrize('augment_on', ['device', 'host'])
def test_resumed_run_equals_straight_run(tiny_inputs, tmp_path, augment_on):
  straight_dir, resumed_dir = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  environment = _environment(tiny_inputs)
  mode = f'--config.data.augment_on={augment_on}'
  command = lambda inputs, workdir, *extra: _command(inputs, workdir, mode, *extra)  # noqa: E731
  popen = lambda command: subprocess.Popen(command, cwd=REPO, env=environment, text=True,  # noqa: E731
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  # The straight run and the interrupted run compile the same programs side by side.
  straight = popen(command(tiny_inputs, straight_dir))
  interrupted = popen(command(tiny_inputs, resumed_dir, '--simulate_preemption_at_step=2'))
  _wait(straight, 'straight run')
  _wait(interrupted, 'interrupted run')
  assert _summary(resumed_dir)['preempted'] and _summary(resumed_dir)['step'] == 2
  assert checkpointing.TrainCheckpointer(resumed_dir, 1, read_only=True).all_steps() == [2]

  _wait(popen(command(tiny_inputs, resumed_dir)), 'rerun')  # the straight run's command
  summary = _summary(resumed_dir)
  assert (summary['start_step'], summary['step'], summary['preempted']) == (2, 4, False)

  straight_state, resumed_state = _stored_state(straight_dir, 4), _stored_state(resumed_dir, 4)
  assert sorted(straight_state) == sorted(resumed_state)
  for name in ('.step', '.queue_pointer', '.rng', '.negative_queue'):
    assert any(key.startswith(f"['{name[1:]}']") for key in straight_state), name
  for key, value in straight_state.items():
    np.testing.assert_array_equal(resumed_state[key], value, err_msg=key)
  assert int(straight_state["['step']"]) == 4
  assert int(straight_state["['queue_pointer']"]) == 4 * 16 % 64

  # The batch after step 4 is the one a straight run would see next.
  config = _tiny_config(tiny_inputs, epochs=tiny_run.EPOCHS)
  source = data_sources.make_source(config.data, 'train')
  bags = bag_file.load_bags(tiny_inputs['bags'])
  iterate = lambda start: input_pipeline.create_train_iterator(  # noqa: E731
      config, source, bags, start_step=start, local_batch_size=16, process_index=0,
      process_count=1)
  from_start = iterate(0)
  for _ in range(4):
    next(from_start)
  straight_next, resumed_next = next(from_start), next(iterate(4))
  for key, value in straight_next.items():
    np.testing.assert_array_equal(resumed_next[key], value, err_msg=key)


# ---------------------------------------------------------------------------------------------
# Bad inputs: one clear error naming the file, key or value, before anything is compiled.


@pytest.fixture
def no_compilation(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('the trainer reached state creation / compilation')
  monkeypatch.setattr(train.train_step_lib, 'create_train_state', fail)
  monkeypatch.setattr(train.steps, 'step_builder', fail)


def test_missing_or_wrong_teacher_is_named(tiny_inputs, tmp_path, no_compilation):
  missing = str(tmp_path / 'no_such_teacher')
  with pytest.raises(FileNotFoundError, match=f'config.teacher.path.*{missing}'):
    train.train_and_evaluate(_tiny_config(dict(tiny_inputs, teacher=missing)), str(tmp_path / 'w'))
  not_a_model = os.path.join(tiny_inputs['root'], 'images')
  with pytest.raises(ValueError, match=f'config.teacher.path.*{not_a_model}.*bingo_model.json'):
    train.train_and_evaluate(_tiny_config(dict(tiny_inputs, teacher=not_a_model)),
                             str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_missing_or_foreign_bags_are_named(tiny_inputs, tmp_path, no_compilation):
  missing = str(tmp_path / 'no_such_bags.npz')
  with pytest.raises(FileNotFoundError, match=f'config.bags.path.*{missing}'):
    train.train_and_evaluate(_tiny_config(dict(tiny_inputs, bags=missing)), str(tmp_path / 'w'))
  foreign = str(tmp_path / 'foreign_bags.npz')
  neighbours = (np.arange(NUM_IMAGES)[:, None] + np.arange(1, 4)[None]) % NUM_IMAGES
  bag_file.save_bags(foreign, bag_file.Bags.from_neighbors(
      neighbours, method='knn', fingerprint='another image list'))
  with pytest.raises(ValueError, match=f'Bag file {foreign} does not belong to .*fingerprint'):
    train.train_and_evaluate(_tiny_config(dict(tiny_inputs, bags=foreign)), str(tmp_path / 'w'))


@pytest.mark.parametrize('overrides, message', [
    ({'train.batch_size': 12}, r'config.train.batch_size = 12 is not divisible by the number '
                               r'of devices \(8\)'),
    ({'student.bn_group_size': 6}, r'batch_size = 16 is not divisible by '
                                   r'config.student.bn_group_size = 6'),
    ({'teacher.bn_group_size': 32}, r'batch_size = 16 is not divisible by '
                                    r'config.teacher.bn_group_size = 32'),
    ({'train.queue_size': 72}, r'config.train.queue_size = 72 is not divisible by '
                               r'config.train.batch_size = 16'),
    ({'train.loss': 'infonce'}, r"config.train.loss = 'infonce'"),
])
def test_inconsistent_config_is_named(tiny_inputs, tmp_path, no_compilation, overrides, message):
  config = _tiny_config(tiny_inputs)
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'w'))


# ---------------------------------------------------------------------------------------------
# Configs: the released hyper-parameters (docs/method.md §7) and the variants.

EXPERIMENTS = {  # config -> (student, teacher file, tau, weight decay)
    'r18_r50w2': ('resnet18', 'teachers/r50w2_swav', 0.2, 1e-4),
    'r18_r50': ('resnet18', 'teachers/r50_mocov2', 0.2, 1e-4),
    'r34_r50w2': ('resnet34', 'teachers/r50w2_swav', 0.2, 1e-4),
    'r34_r152': ('resnet34', 'teachers/r152_mocov2', 0.2, 1e-4),
    'effb0_r50w2': ('efficientnet_b0', 'teachers/r50w2_swav', 0.12, 4e-5),
}


@pytest.mark.parametrize('name', sorted(EXPERIMENTS))
def test_experiment_configs_have_the_released_hyperparameters(name):
  config = importlib.import_module(f'bingo_jax.configs.{name}').get_config()
  student, teacher, temperature, weight_decay = EXPERIMENTS[name]
  assert config.student.arch == student and config.teacher.path == teacher
  assert config.bags.path.startswith('bags/') and config.bags.k == 5
  train_config = config.train
  assert (train_config.batch_size, train_config.base_lr, train_config.epochs) == (256, 0.03, 200)
  assert (train_config.momentum, train_config.queue_size) == (0.9, 65536)
  assert (train_config.temperature, train_config.weight_decay) == (temperature, weight_decay)
  assert (train_config.own_key_warmup_epochs, train_config.cutmix,
          train_config.loss) == (11, 'batch', 'bingo')
  assert (config.student.bn_group_size, config.teacher.bn_group_size) == (32, 32)
  assert config.teacher.bn_mode == 'shuffle_stats' and train_config.lr_schedule == 'cosine_epoch'
  assert config.student.head_output_dim == 128 and config.student.head_hidden_dim == 2048
  config_checks.check_config(config, num_devices=8)


def test_config_variants():
  from bingo_jax.configs import r18_r50w2
  config = r18_r50w2.get_config('paper_eq8,bf16,frozen_teacher,labels')
  assert (config.train.loss, config.train.cutmix) == ('paper_eq8', 'none')
  assert config.train.compute_dtype == 'bfloat16' and config.teacher.bn_mode == 'frozen'
  assert config.bags.method == 'labels' and config.bags.path.endswith('_labels.npz')
  assert r18_r50w2.get_config('global_bn').student.bn_group_size is None
  with pytest.raises(ValueError, match="Unknown config variant 'fp8'"):
    r18_r50w2.get_config('fp8')


def test_anchor_only_variant_trains_without_bags(tiny_inputs, tmp_path, monkeypatch):
  """The 'anchor_only' variant (loss 'anchor_only'): no bag file, only the query and key views."""
  config = tiny_test.get_config('anchor_only')
  assert (config.train.loss, config.train.cutmix) == ('anchor_only', 'none')
  config.teacher.path, config.data.path = tiny_inputs['teacher'], tiny_inputs['images']
  config.bags.path, config.train.max_steps = None, 2

  def no_bags(*args, **kwargs):
    raise AssertionError('the trainer read a bag file')
  views = []

  def recording_iterator(*args, **kwargs):
    views.append(tuple(kwargs['views']))
    return make_iterator(*args, **kwargs)
  make_iterator = input_pipeline.create_train_iterator
  monkeypatch.setattr(train, 'load_training_bags', no_bags)
  monkeypatch.setattr(train.input_pipeline, 'create_train_iterator', recording_iterator)
  summary = train.train_and_evaluate(config, str(tmp_path / 'w'))
  assert views == [('query', 'key')]
  assert summary['step'] == 2 and not summary['preempted']
  final = summary['final_metrics']
  assert {'loss', 'ce_q_k', 'top1', 'top5'} <= set(final) and 'ce_p_k' not in set(final)
  # 1 + 64 candidates with unit vectors at temperature 0.2: CE lies in [0, ln 65 + 10].
  assert 0.0 < final['loss'] < np.log(65) + 2 / 0.2


# ---------------------------------------------------------------------------------------------
# Progress: throughput excludes the first (compiling) step and pauses; TensorBoard values.


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_chronometer_rates_and_eta():
  clock = FakeClock()
  chrono = progress.Chronometer(first_step=10, total_steps=110, global_batch_size=64,
                                num_devices=4, clock=clock)
  clock.now += 30.0          # step 11 compiles
  chrono.tick(11)
  assert chrono.images_per_second() is None
  for step in range(12, 22):  # 10 steps of 0.5 s
    clock.now += 0.5
    chrono.tick(step)
  with chrono.paused():      # a checkpoint save does not count
    clock.now += 7.0
  clock.now += 0.5
  chrono.tick(22)
  assert chrono.steps_per_second() == pytest.approx(2.0)
  assert chrono.images_per_second() == pytest.approx(128.0)
  assert chrono.eta_seconds() == pytest.approx((110 - 22) / 2.0)
  assert chrono.core_hours() == pytest.approx((30 + 5.5 + 7) * 4 / 3600)
  assert progress.format_duration(3725) == '1h02m'
  assert progress.format_duration(90061) == '1d01h'


def test_metric_writer_tensorboard_events(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  writer = progress.MetricWriter(str(tmp_path))
  writer.log(5, {'loss': 3.25, 'top1': 12.5}, chrono=None)
  writer.log(10, {'loss': 2.5, 'top1': 25.0}, chrono=None)
  writer.close()
  events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={'tensors': 0})
  events.Reload()
  values = {tag: [(event.step, float(tf.make_ndarray(event.tensor_proto)))
                  for event in events.Tensors(tag)] for tag in events.Tags()['tensors']}
  assert values == {'loss': [(5, 3.25), (10, 2.5)], 'top1': [(5, 12.5), (10, 25.0)]}


def test_resume_with_another_data_order_is_refused():
  stored = {'step': 6, 'global_batch_size': 256, 'seed': 0, 'steps_per_epoch': 5004}
  train._check_resumable(stored, {'global_batch_size': 256, 'seed': 0, 'steps_per_epoch': 5004},
                         'runs/x/checkpoints', 6)
  with pytest.raises(ValueError, match='runs/x/checkpoints/6 was trained with '
                                       'global_batch_size = 256 but this run has 512'):
    train._check_resumable(stored, {'global_batch_size': 512, 'seed': 0,
                                    'steps_per_epoch': 2502}, 'runs/x/checkpoints', 6)


def test_step_receives_only_the_views_it_reads(tiny_inputs, tmp_path, monkeypatch):
  """The pipeline's anchor_index / positive_index stay on the host: the jitted step is
  handed the four views of the released loss and nothing else."""
  config = _tiny_config(tiny_inputs, max_steps=1)
  received = []
  builder = train.steps.step_builder

  def recording_builder(*args, **kwargs):
    build = builder(*args, **kwargs)

    def build_and_record(*build_args):
      step = build(*build_args)

      def recording_step(state, variables, batch):
        received.append(sorted(batch))
        return step(state, variables, batch)
      return recording_step
    return build_and_record
  monkeypatch.setattr(train.steps, 'step_builder', recording_builder)
  train.train_and_evaluate(config, str(tmp_path / 'w'))
  assert received == [['key', 'pos_k', 'pos_q', 'query']]

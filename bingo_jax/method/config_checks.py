"""Every check of a config, in one place, run before anything is compiled.

``check_values`` checks each value of the schema on its own (sizes positive, learning rates
non-negative, ...; every stage calls it first); ``check_training_config`` adds the consistency
of a training config (the trainer calls it before touching a device or a file), and
``check_config`` the split of the batch over the mesh; ``check_step_models`` adds what only the
built networks can tell. The step builders call the last two. Each error names the
``config.*`` keys and their values.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import ml_collections

from bingo_jax.configs import common as config_common
from bingo_jax.data import views
from bingo_jax.method import cutmix as cutmix_lib
from bingo_jax.method import objectives

# config.train.method: one step builder each (steps.STEP_BUILDERS).
METHODS = ('bingo', 'moco')
CUTMIX_CHOICES = cutmix_lib.MODES + ('none',)
LR_SCHEDULES = ('cosine_epoch', 'cosine_step')
# 'auto': bfloat16 on GPU/TPU, float32 on CPU (parallel.resolve_compute_dtype).
COMPUTE_DTYPES = ('float32', 'bfloat16', 'auto')
# config.teacher.bn_mode (docs/training.md, "The teacher's batch shuffle"): 'shuffle_stats'
# (the shuffle's groups, statistics summed across devices) | 'shuffle' (released: the images
# permuted across devices) | 'frozen' (stored running statistics).
TEACHER_BN_MODES = ('shuffle_stats', 'shuffle', 'frozen')
SHUFFLE_MODES = ('shuffle_stats', 'shuffle')
# config.data.augment_on / on_device (bingo_jax/run/device_data.py, docs/data.md).
AUGMENT_ON = ('device', 'host')
ON_DEVICE = ('auto', 'always', 'never')
# 'stop': a non-finite loss or gradient norm stops the run (train.py); 'skip': the step keeps
# the previous state (parameters, optimizer, statistics, queue) and counts it in 'skipped'.
NAN_POLICIES = ('stop', 'skip')
# config.bags.source: a bag file, or bags recomputed from the student
# (bingo_jax/bags/student_bags.py), whose kNN search is one of the exact backends.
BAG_SOURCES = ('file', 'student')
STUDENT_BAG_SEARCH = ('knn', 'jax')


# The range of each numeric key of the schema (configs/common.py), checked by check_values:
# 'positive' (> 0), 'non-negative' (>= 0), 'fraction' (0 < x <= 1), 'unit' (0 <= x <= 1).
# A key missing from a config (one older than the key) is not checked; None is accepted only
# where the schema's default is None (a FieldReference: "not set").
VALUE_RANGES = {
    'data.image_size': 'positive', 'data.canvas_size': 'positive',
    'data.on_device_max_mb': 'non-negative',
    'teacher.bn_group_size': 'positive',
    'student.head_hidden_dim': 'positive', 'student.head_output_dim': 'positive',
    'student.base_width': 'positive', 'student.bn_group_size': 'positive',
    'bags.k': 'positive', 'bags.num_clusters': 'positive', 'bags.batch_size': 'positive',
    'bags.shard_size': 'positive', 'bags.image_size': 'positive',
    'bags.query_batch_size': 'positive', 'bags.approx_recall_sample': 'non-negative',
    'bags.kmeans_iterations': 'positive', 'bags.report_anchors': 'non-negative',
    'bags.report_members': 'non-negative',
    'train.batch_size': 'positive', 'train.epochs': 'positive', 'train.base_lr': 'non-negative',
    'train.momentum': 'unit', 'train.weight_decay': 'non-negative',
    'train.temperature': 'positive', 'train.queue_size': 'positive',
    'train.moco_momentum': 'unit', 'train.own_key_warmup_epochs': 'non-negative',
    'train.cutmix_beta': 'positive', 'train.log_every_steps': 'positive',
    'train.checkpoint_every_steps': 'positive', 'train.keep_checkpoints': 'positive',
    'train.max_steps': 'non-negative', 'train.monitor_every_epochs': 'non-negative',
    'train.monitor_bank_size': 'positive', 'train.monitor_eval_size': 'positive',
    'eval.batch_size': 'positive', 'eval.knn_k': 'positive', 'eval.knn_weighted_k': 'positive',
    'eval.knn_temperature': 'positive', 'eval.linear_epochs': 'positive',
    'eval.linear_lr': 'non-negative', 'eval.linear_min_lr': 'non-negative',
    'eval.linear_fast_epochs': 'positive', 'eval.linear_fast_lr': 'non-negative',
    'eval.finetune_fraction': 'fraction', 'eval.finetune_epochs': 'positive',
    'eval.finetune_lr': 'non-negative', 'eval.finetune_classifier_lr_multiplier': 'non-negative',
    'eval.finetune_weight_decay': 'non-negative', 'eval.tsne_classes': 'positive',
    'eval.tsne_per_class': 'positive', 'eval.tsne_perplexity': 'positive',
}
_RANGE_TESTS = {'positive': (lambda v: v > 0, 'must be positive'),
                'non-negative': (lambda v: v >= 0, 'must be >= 0'),
                'fraction': (lambda v: 0 < v <= 1, 'must lie in (0, 1]'),
                'unit': (lambda v: 0 <= v <= 1, 'must lie in [0, 1]')}
# The smallest training crop a student accepts: its downsampling from the image to the last
# feature map (the 'imagenet' stem: stride-2 convolution, stride-2 max-pool and three
# stride-2 stages = 32, as EfficientNet's five stride-2 stages; the 'cifar' stem keeps the
# resolution: 8). A smaller image reaches the last stage as a single padded pixel.
MIN_IMAGE_SIZE = {'imagenet': 32, 'cifar': 8}


def check_values(config: ml_collections.ConfigDict) -> None:
  """Each numeric value of ``config`` within its range (``VALUE_RANGES``).

  Raises:
    ValueError: naming the first ``config.<key>`` out of range and its value.
  """
  for key, kind in VALUE_RANGES.items():
    section, name = key.split('.')
    if section not in config or name not in config[section]:
      continue
    value = config[section][name]
    if value is None and _default_is_none(section, name):
      continue
    test, requirement = _RANGE_TESTS[kind]
    if (isinstance(value, bool) or not isinstance(value, (int, float))
        or not math.isfinite(value) or not test(value)):
      raise ValueError(f'config.{key} = {value!r} {requirement}'
                       + (' (a number)' if not isinstance(value, (int, float)) else '') + '.')


def _default_is_none(section: str, name: str) -> bool:
  # student/teacher.bn_group_size: None takes the statistics over the whole global batch.
  return (f'{section}.{name}' in ('student.bn_group_size', 'teacher.bn_group_size')
          or config_common.base_config()[section].get(name, 0) is None)


def check_image_size(config: ml_collections.ConfigDict) -> None:
  """``config.data.image_size`` at least the student's downsampling (``MIN_IMAGE_SIZE``).

  Raises:
    ValueError: naming the image size, the student's stem and the minimum.
  """
  stem = 'imagenet' if config.student.arch.startswith('efficientnet') else config.student.stem
  minimum = MIN_IMAGE_SIZE.get(stem)
  if minimum is not None and config.data.image_size < minimum:
    raise ValueError(f'config.data.image_size = {config.data.image_size} is smaller than the '
                     f'student\'s downsampling ({minimum} pixels: config.student.arch = '
                     f'{config.student.arch!r}, stem {stem!r}); its last feature map would be '
                     'one padded pixel.')


def method(config: ml_collections.ConfigDict) -> str:
  """``config.train.method`` (``'bingo'`` where a config predates the key)."""
  return config.train.get('method', 'bingo')


def checked_method(config: ml_collections.ConfigDict) -> str:
  """``config.train.method``, checked.

  Raises:
    ValueError: naming an unknown ``config.train.method``.
  """
  _check_choice('config.train.method', method(config), METHODS)
  return method(config)


def loss_key(config: ml_collections.ConfigDict) -> str:
  """The config key that names the step's objective: ``config.train.loss`` (BINGO) or
  ``config.train.moco_loss`` (MoCo; ``config.train.loss`` is not read there)."""
  return 'config.train.moco_loss' if method(config) == 'moco' else 'config.train.loss'


def loss_name(config: ml_collections.ConfigDict) -> str:
  """The objective of the configured step (``objectives.OBJECTIVES``).

  BINGO reads ``config.train.loss``; MoCo reads ``config.train.moco_loss``, default
  ``'anchor_only'`` (plain MoCo v2); a bag objective there is the paper's "teacher relation
  only" row (docs/method.md §6).
  """
  if method(config) == 'moco':
    return config.train.get('moco_loss', objectives.ANCHOR_ONLY)
  return config.train.loss


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
  if value not in allowed:
    raise ValueError(f'{key} = {value!r}; expected one of {allowed}.')


def key_encoder_shuffles(config: ml_collections.ConfigDict) -> bool:
  """Whether the key side runs training-mode BatchNorm on shuffled groups.

  MoCo's key encoder always does, whatever ``config.teacher.bn_mode`` says.
  """
  return config.teacher.bn_mode in SHUFFLE_MODES or method(config) == 'moco'


def shuffle_moves_images(config: ml_collections.ConfigDict) -> bool:
  """Whether the key side's batch shuffle permutes the images (released ``'shuffle'``)
  rather than summing the shuffled groups' statistics (``'shuffle_stats'``; MoCo's key
  encoder too under ``'frozen'``)."""
  return config.teacher.bn_mode == 'shuffle'


def check_config(config: ml_collections.ConfigDict, num_devices: int,
                 num_processes: Optional[int] = None) -> None:
  """The global batch split over the mesh, and ``check_training_config``.

  Args:
    config: the experiment config.
    num_devices: devices of the mesh (all processes).
    num_processes: processes of the run (default ``jax.process_count()``).
  Raises:
    ValueError: naming the offending ``config.*`` keys and values.
  """
  batch = config.train.batch_size
  num_processes = jax.process_count() if num_processes is None else num_processes
  if isinstance(batch, int) and batch > 0 and batch % num_devices:
    raise ValueError(f'config.train.batch_size = {batch} is not divisible by the number of '
                     f'devices ({num_devices}).')
  if isinstance(batch, int) and batch > 0 and batch % num_processes:
    raise ValueError(f'config.train.batch_size = {batch} is not divisible by the number of '
                     f'processes ({num_processes}).')
  check_training_config(config)


def check_training_config(config: ml_collections.ConfigDict) -> None:
  """Values, choices, batch, BatchNorm-group, queue and option consistency of a training
  config: every check that needs no device (the trainer runs it first).

  Raises:
    ValueError: naming the offending ``config.*`` keys and values.
  """
  check_values(config)
  check_image_size(config)
  train = config.train
  batch = train.batch_size
  choices = {'config.train.method': (method(config), METHODS),
             'config.train.cutmix': (train.cutmix, CUTMIX_CHOICES),
             'config.train.lr_schedule': (train.lr_schedule, LR_SCHEDULES),
             'config.train.compute_dtype': (train.compute_dtype, COMPUTE_DTYPES),
             'config.teacher.bn_mode': (config.teacher.bn_mode, TEACHER_BN_MODES),
             'config.data.augment_on': (config.data.get('augment_on', 'device'), AUGMENT_ON),
             'config.data.on_device': (config.data.get('on_device', 'auto'), ON_DEVICE),
             'config.train.nan_policy': (train.get('nan_policy', 'stop'), NAN_POLICIES),
             'config.data.on_bad_image': (config.data.get('on_bad_image', 'error'),
                                          ('error', 'skip'))}
  for key, (value, allowed) in choices.items():
    _check_choice(key, value, allowed)
  if method(config) == 'moco':  # the key encoder in the teacher's place: BINGO's objectives
    _check_choice('config.train.moco_loss', loss_name(config), objectives.LOSS_NAMES)
  else:
    objectives.check_loss_name(train.loss)  # two groups of names: BINGO's and the baselines
  groups = [('student', config.student.bn_group_size)]
  if key_encoder_shuffles(config):
    groups.append(('teacher', config.teacher.bn_group_size))
  for section, group in groups:
    if group is not None and batch % group:
      raise ValueError(f'config.train.batch_size = {batch} is not divisible by '
                       f'config.{section}.bn_group_size = {group} (BatchNorm statistics are '
                       'taken over groups of that many images).')
  if train.queue_size < batch:
    raise ValueError(f'config.train.queue_size = {train.queue_size} is smaller than one global '
                     f'batch (config.train.batch_size = {batch}): the queue advances by whole '
                     'batches.')
  if train.queue_size % batch:
    raise ValueError(f'config.train.queue_size = {train.queue_size} is not divisible by '
                     f'config.train.batch_size = {batch} (the queue advances by whole batches).')
  _check_method_options(config)


def _check_method_options(config: ml_collections.ConfigDict) -> None:
  """Options that only one method or objective reads."""
  train = config.train
  if method(config) == 'moco' and not 0.0 <= float(train.moco_momentum) <= 1.0:
    raise ValueError(f'config.train.moco_momentum = {train.moco_momentum} must lie in [0, 1].')
  objective = objectives.make_objective(train, loss_name(config))
  if objective.uses_cutmix and train.cutmix == 'group' and not config.student.bn_group_size:
    raise ValueError("config.train.cutmix = 'group' draws one box per student BatchNorm group, "
                     f'but config.student.bn_group_size = {config.student.bn_group_size}.')
  _check_bag_source(config, objective)


def _check_bag_source(config: ml_collections.ConfigDict,
                      objective: objectives.Objective) -> None:
  """``config.bags.source`` and ``refresh_every_epochs``: student bags need positives to
  sample, a refresh period and an exact kNN search."""
  bags = config.bags
  source, every = bags.get('source', 'file'), bags.get('refresh_every_epochs', 0)
  _check_choice('config.bags.source', source, BAG_SOURCES)
  if not isinstance(every, int) or every < 0:
    raise ValueError(f'config.bags.refresh_every_epochs = {every!r} must be an integer >= 0.')
  if source == 'file':
    if every:
      raise ValueError(f'config.bags.refresh_every_epochs = {every} recomputes the bags from '
                       "the student: set config.bags.source = 'student' (or the period to 0).")
    return
  if every < 1:
    raise ValueError("config.bags.source = 'student' needs config.bags.refresh_every_epochs "
                     '>= 1 (the bags are recomputed every that many epochs).')
  _check_choice('config.bags.method (with config.bags.source = \'student\')', bags.method,
                STUDENT_BAG_SEARCH)
  if not views.needs_bags(objective.batch_views):
    raise ValueError(f"config.bags.source = 'student', but {loss_key(config)} = "
                     f'{loss_name(config)!r} reads no bag positives.')


def _built_group_size(model: nn.Module) -> Any:
  return getattr(getattr(model, 'backbone', None), 'bn_group_size', None)


def check_step_models(config: ml_collections.ConfigDict, student_model: nn.Module,
                      key_model: nn.Module) -> None:
  """The networks must have been built with the configured BatchNorm groups.

  Args:
    config: the experiment config.
    student_model: the student.
    key_model: the teacher (BINGO) or the key encoder (MoCo); its groups matter only when
      it shuffles (``key_encoder_shuffles``).
  Raises:
    ValueError: naming ``config.<section>.bn_group_size`` and the model's value.
  """
  models = [('student', student_model)]
  if key_encoder_shuffles(config):
    models.append(('teacher', key_model))
  for section, model in models:
    group = config[section].bn_group_size
    if _built_group_size(model) != group:
      raise ValueError(f'The {section} model was built with bn_group_size='
                       f'{_built_group_size(model)} but config.{section}.bn_group_size = '
                       f'{group}; create it with create_model(..., '
                       f'bn_group_size=config.{section}.bn_group_size).')


def check_step(config: ml_collections.ConfigDict, student_model: nn.Module,
               key_model: nn.Module, mesh: jax.sharding.Mesh) -> None:
  """``check_config`` for ``mesh``, then ``check_step_models``: what a step builder runs."""
  check_config(config, mesh.devices.size)
  check_step_models(config, student_model, key_model)

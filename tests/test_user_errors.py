"""A user's mistake ends every command with one line, ``error: ...``, naming the key, file or
value, and exit status 1; a bug ends in its traceback, and so does every error with
``--verbosity=1`` (bingo_jax/console/cli.py, docs/reliability.md).

Each command runs as a user runs it, in a subprocess, with a mistake that is caught before
anything is compiled. The references are the mistakes themselves: the key, value or path the
test passed must be named in the line.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from bingo_jax.console import cli
from bingo_jax.testing import subprocess_environment, tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What other layers print to stderr that is not the command's message: TensorFlow's and
# XLA's C++ banners, and absl log lines (the command's progress and warnings). The line
# count is of what remains.
_LOG_LINE = re.compile(r'^([IWE]\d{4} [\d:.]+ +\d+ \S+:\d+\]|'
                       r'WARNING: All log messages before absl::InitializeLog\(\))')


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  """The tiny run's images, teacher and bags; a damaged copy of the bag file; a bag file of
  another data set (40 other images)."""
  root = tmp_path_factory.mktemp('user_errors')
  found = tiny_run.make_inputs(str(root / 'data'))
  with open(found['bags'], 'rb') as f:
    data = bytearray(f.read())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(64)  # zeroed bytes inside the archive
  found['damaged_bags'] = str(root / 'damaged.npz')
  with open(found['damaged_bags'], 'wb') as f:
    f.write(bytes(data))
  other = str(root / 'other')
  os.makedirs(other)
  tiny_run.write_bags(os.path.join(other, 'bags.npz'),
                      tiny_run.write_images(other, np.random.default_rng(1), 40),
                      np.random.default_rng(1))
  found['other_bags'] = os.path.join(other, 'bags.npz')
  found['root'] = str(root)
  return found


def _train(inputs, *extra):
  return ['bingo_jax.train', '--config', 'tiny_test', '--workdir', f'{inputs["root"]}/run',
          f'--config.teacher.path={inputs["teacher"]}', f'--config.data.path={inputs["images"]}',
          f'--config.bags.path={inputs["bags"]}', *extra]


def _evaluate(inputs, checkpoint, *extra):
  return ['bingo_jax.evaluate', '--config', 'tiny_test', '--checkpoint', checkpoint,
          '--protocol', 'knn', '--workdir', f'{inputs["root"]}/eval',
          f'--config.data.path={inputs["images"]}', *extra]


# (command, what the line must name); '{root}' and the inputs' names are filled in.
CASES = {
    'train: unknown config key': (
        lambda i: _train(i, '--config.train.batchsize=3'),
        "--config.train.batchsize: no such config key (did you mean 'batch_size'?)"),
    'train: queue size 0': (lambda i: _train(i, '--config.train.queue_size=0'),
                            'config.train.queue_size = 0 must be positive'),
    'train: damaged bag file': (lambda i: _train(i, f'--config.bags.path={i["damaged_bags"]}'),
                                '{damaged_bags} is not a readable bag file'),
    'train: bag file of other data': (
        lambda i: _train(i, f'--config.bags.path={i["other_bags"]}'),
        'Bag file {other_bags} does not belong to the training split'),
    'bagging: k 0': (lambda i: ['bingo_jax.bagging', '--config', 'tiny_test', '--workdir',
                                f'{i["root"]}/bags', f'--config.teacher.path={i["teacher"]}',
                                f'--config.data.path={i["images"]}', '--config.bags.k=0'],
                     'config.bags.k = 0 must be positive'),
    'evaluate: kNN k larger than the bank': (
        lambda i: _evaluate(i, 'pixels', '--config.data.eval_split=train',
                            '--config.eval.knn_weighted_k=200'),
        'config.eval.knn_weighted_k = 200: the kNN bank'),
    'export: missing workdir': (
        lambda i: ['bingo_jax.export', f'{i["root"]}/no_run', f'{i["root"]}/out.pth'],
        '{root}/no_run is neither a bingo_jax model file'),
    'convert: missing checkpoint': (
        lambda i: ['bingo_jax.convert', f'{i["root"]}/no.pth', f'{i["root"]}/teacher_out'],
        '{root}/no.pth: no such checkpoint file'),
    'data_check: missing file list': (
        lambda i: ['bingo_jax.data_check', '--config', 'tiny_test',
                   '--config.data.path={root}/no_list_{{split}}.txt'.format(root=i['root'])],
        'File list {root}/no_list_train.txt does not exist (data.path)'),
    'demo: missing teacher': (
        lambda i: ['bingo_jax.demo', '--teacher', f'{i["root"]}/no_teacher.pth',
                   '--workdir', f'{i["root"]}/demo'],
        '--teacher {root}/no_teacher.pth: no such file'),
}


def _run(inputs, arguments):
  result = subprocess.run([sys.executable, '-m', *arguments], cwd=inputs['root'], text=True,
                          capture_output=True, timeout=600,
                          env=subprocess_environment(os.path.join(inputs['root'], 'jax_cache'),
                                                     pythonpath=(REPO,)))
  said = [line for line in result.stderr.splitlines() if line and not _LOG_LINE.match(line)]
  return result, said


@pytest.mark.parametrize('case', list(CASES))
def test_a_mistake_is_one_line_naming_it_and_exit_1(inputs, case):
  command, named = CASES[case]
  result, said = _run(inputs, command(inputs))
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert len(said) == 1 and said[0].startswith('error: '), result.stderr[-3000:]
  assert named.format(**inputs) in said[0], said[0]


def test_verbosity_1_shows_the_traceback(inputs):
  result, _ = _run(inputs, _train(inputs, '--config.train.base_lr=-0.03', '--verbosity=1'))
  assert result.returncode == 1
  assert 'Traceback' in result.stderr
  assert 'ValueError: config.train.base_lr = -0.03 must be >= 0' in result.stderr


# Config values that were never checked (issue 27: image size 0 trained on empty images, queue
# size 0 failed deep in JAX, a negative learning rate trained and exited 0), and their
# consistency, checked in process: the line they make is the one above.
VALUE_CASES = {
    'train.base_lr=-0.03': 'config.train.base_lr = -0.03 must be >= 0',
    'data.image_size=0': 'config.data.image_size = 0 must be positive',
    'train.queue_size=8': 'config.train.queue_size = 8 is smaller than one global batch '
                          '(config.train.batch_size = 16)',
    'train.batch_size=18': 'config.train.batch_size = 18 is not divisible by '
                           'config.student.bn_group_size = 4',
    'data.image_size=4': "config.data.image_size = 4 is smaller than the student's "
                         "downsampling (8 pixels: config.student.arch = 'resnet18', stem "
                         "'cifar')",
    'eval.finetune_fraction=1.5': 'config.eval.finetune_fraction = 1.5 must lie in (0, 1]',
    'train.momentum=nan': 'config.train.momentum = nan must lie in [0, 1]',
    'bags.k=-1': 'config.bags.k = -1 must be positive',
}


@pytest.mark.parametrize('override', list(VALUE_CASES))
def test_a_config_value_out_of_range_is_named(override):
  from bingo_jax.configs import tiny_test  # pylint: disable=import-outside-toplevel
  from bingo_jax.method import config_checks  # pylint: disable=import-outside-toplevel
  config = tiny_test.get_config()
  key, value = override.split('=')
  section, name = key.split('.')
  config[section][name] = type(config[section][name])(float(value))
  with pytest.raises(ValueError) as raised:
    config_checks.check_training_config(config)
  assert VALUE_CASES[override] in str(raised.value)


def test_every_built_in_config_passes_the_checks():
  from bingo_jax import configs  # pylint: disable=import-outside-toplevel
  from bingo_jax.method import config_checks
  for name in configs.names():
    spec = f'{name}:knn' if name == 'fmnist_ablation' else name  # needs a row
    config_checks.check_training_config(configs.get_config(spec))


def test_the_minimum_image_size_is_the_networks_downsampling():
  """``MIN_IMAGE_SIZE`` against the networks: the image side over the last feature map's."""
  import jax  # pylint: disable=import-outside-toplevel
  from bingo_jax.method import config_checks  # pylint: disable=import-outside-toplevel
  from bingo_jax.models import create_model  # pylint: disable=import-outside-toplevel
  for arch, stem in (('resnet18', 'imagenet'), ('resnet18', 'cifar'),
                     ('efficientnet_b0', 'imagenet')):
    model = create_model(arch, stem=stem, base_width=8)
    size = 64
    images = jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
    _, state = jax.eval_shape(
        lambda x, m=model: m.init_with_output(jax.random.key(0), x, capture_intermediates=True),
        images)
    maps = [v[0].shape for path, v in jax.tree_util.tree_flatten_with_path(
        state['intermediates'], is_leaf=lambda x: isinstance(x, tuple))[0]
            if len(getattr(v[0], 'shape', ())) == 4]
    # 1 x 1 maps are EfficientNet's squeeze-and-excitation pools, not the image's resolution.
    smallest = min(shape[1] for shape in maps if shape[1:3] != (1, 1))
    assert size // smallest == config_checks.MIN_IMAGE_SIZE[stem], (arch, stem, smallest)


def _raise_in_numpy():
  np.zeros(3).reshape(4)  # ValueError raised inside numpy: a bug of the caller


def test_user_errors_are_told_from_bugs():
  from bingo_jax.configs import tiny_test  # pylint: disable=import-outside-toplevel
  from bingo_jax.method import config_checks  # pylint: disable=import-outside-toplevel
  config = tiny_test.get_config()
  config.train.base_lr = -1.0
  caught = {}
  for name, call in {'refusal': lambda: config_checks.check_values(config),
                     'library ValueError': _raise_in_numpy,
                     'missing file': lambda: open('/nonexistent/file', encoding='utf-8'),
                     'other exception': lambda: {}['key']}.items():
    try:
      call()
    except Exception as e:  # pylint: disable=broad-except
      caught[name] = cli.is_user_error(e)
  assert caught == {'refusal': True, 'library ValueError': False, 'missing file': True,
                    'other exception': False}

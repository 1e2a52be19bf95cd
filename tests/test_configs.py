"""``--config`` takes a built-in name (with variants) or a config file path."""

import json
import os

import pytest
from absl import flags

from bingo_jax import configs
from bingo_jax.configs import r18_r50w2, tiny_test

EXPECTED_NAMES = {'bagging_fmnist', 'cifar10', 'cifar100', 'effb0_r50w2', 'eval_fmnist',
                  'fmnist_ablation', 'fmnist_demo', 'moco_fmnist', 'r18_r50', 'r18_r50w2',
                  'r34_r152', 'r34_r50w2', 'stl10', 'tiny_test'}


def test_names_are_the_config_modules():
  assert set(configs.names()) == EXPECTED_NAMES


def test_get_config_by_name_variant_and_path(tmp_path):
  assert configs.get_config('r18_r50w2') == r18_r50w2.get_config()
  with_variant = configs.get_config('r18_r50w2:bf16')
  assert with_variant == r18_r50w2.get_config('bf16')
  assert with_variant.train.compute_dtype == 'bfloat16'
  own = tmp_path / 'my_config.py'
  own.write_text('from bingo_jax.configs import tiny_test\n\n'
                 'def get_config(arg=None):\n'
                 '  config = tiny_test.get_config(arg)\n'
                 '  config.train.epochs = 7\n'
                 '  return config\n')
  mine = configs.get_config(f'{own}:bf16')
  expected = tiny_test.get_config('bf16')
  expected.train.epochs = 7
  assert mine == expected


def test_resolve_names_files_and_the_old_paths(tmp_path):
  assert configs.resolve('tiny_test:bf16') == os.path.join(configs.CONFIG_DIR,
                                                           'tiny_test.py') + ':bf16'
  own = tmp_path / 'x.py'
  own.write_text('')
  assert configs.resolve(str(own)) == str(own)
  # Commands written before the move: configs/NAME.py that does not exist here.
  assert configs.resolve('configs/r18_r50.py') == os.path.join(configs.CONFIG_DIR, 'r18_r50.py')
  with pytest.raises(ValueError, match=r"'no_such_config'.*r18_r50w2"):
    configs.resolve('no_such_config')


def test_the_flag_takes_names_and_overrides():
  argv = ['prog', '--config', 'r18_r50w2:bf16', '--config.train.batch_size=512']
  values = flags.FlagValues()
  holder = configs.define_config_flag('config', 'tiny_test', flag_values=values, sys_argv=argv)
  values(argv)
  expected = r18_r50w2.get_config('bf16')
  expected.train.batch_size = 512
  expected.lock()  # the flag locks its config (lock_config=True): no new keys by typo
  assert holder.value == expected
  defaults = flags.FlagValues()
  holder = configs.define_config_flag('config', 'tiny_test', flag_values=defaults,
                                      sys_argv=['prog'])
  defaults(['prog'])
  expected = tiny_test.get_config()
  expected.lock()
  assert holder.value == expected


def test_a_key_added_to_the_schema_later_is_no_change_at_its_default():
  """A workdir recorded before a key existed resumes when this run holds the key at the
  schema's default (the key's default keeps the old computation), not at another value."""
  from bingo_jax.configs import common  # pylint: disable=import-outside-toplevel
  from bingo_jax.store import workdir_records  # pylint: disable=import-outside-toplevel
  defaults = json.loads(common.base_config().to_json_best_effort())
  assert defaults['student']['init_from'] is None  # the key this test leaves out
  current = json.loads(common.base_config().to_json_best_effort())
  recorded = json.loads(json.dumps(current))
  del recorded['student']['init_from']
  assert workdir_records.config_changes(recorded, current, defaults) == []
  current['student']['init_from'] = '/models/teacher'
  assert workdir_records.config_changes(recorded, current, defaults) == [
      "config.student.init_from: (absent) -> '/models/teacher'"]
  # Without the schema, the absent key is reported as before.
  current['student']['init_from'] = None
  assert workdir_records.config_changes(recorded, current) == [
      'config.student.init_from: (absent) -> None']

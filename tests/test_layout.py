"""The layout of issue 26: the top of bingo_jax/ holds the stage entry points and the folders,
and the built-in configs are the files of the top-level configs/ folder."""

import os
import subprocess
import sys

from bingo_jax import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {'convert', 'bagging', 'train', 'evaluate', 'export', 'demo', 'data_check'}


def test_the_top_of_the_package_holds_the_stages_and_folders():
  top = os.path.join(REPO, 'bingo_jax')
  modules = {name[:-3] for name in os.listdir(top) if name.endswith('.py')}
  assert modules == STAGES | {'input_pipeline', '__init__'}
  folders = {name for name in os.listdir(top)
             if os.path.isdir(os.path.join(top, name)) and name != '__pycache__'}
  assert all(os.path.isfile(os.path.join(top, name, '__init__.py'))
             for name in folders - {'demo_data'}), folders


def test_builtin_names_load_the_top_level_files():
  assert os.path.samefile(configs.CONFIG_DIR, os.path.join(REPO, 'configs'))
  assert os.path.samefile(configs.resolve('r18_r50w2'),
                          os.path.join(REPO, 'configs', 'r18_r50w2.py'))


def test_a_configs_path_reads_the_file_at_that_path(tmp_path, monkeypatch):
  # From the repository root: the file itself (the one the name loads).
  monkeypatch.chdir(REPO)
  assert os.path.samefile(configs.resolve('configs/r18_r50w2.py'), 'configs/r18_r50w2.py')
  # A file of the same name elsewhere is that file, not the built-in.
  own = tmp_path / 'configs' / 'r18_r50w2.py'
  own.parent.mkdir()
  own.write_text('from bingo_jax.configs import r18_r50w2\n\n'
                 'def get_config(arg=None):\n'
                 '  config = r18_r50w2.get_config(arg)\n'
                 '  config.train.epochs = 3\n'
                 '  return config\n')
  monkeypatch.chdir(tmp_path)
  assert configs.resolve('configs/r18_r50w2.py') == 'configs/r18_r50w2.py'
  assert configs.get_config('configs/r18_r50w2.py').train.epochs == 3
  assert configs.get_config('r18_r50w2').train.epochs != 3


def test_the_design_card_tool_runs_the_converter(tmp_path):
  result = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'convert_torch_teacher.py'),
                           '--helpfull'], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2'))
  assert result.returncode == 0, result.stderr[-2000:]
  # bingo-convert's flags: its module's own and the shared --format.
  assert 'bingo_jax.convert:' in result.stdout and '--format' in result.stdout, result.stdout

"""bench/device_check.sh, the one command for a lent GPU: its smoke run on the CPU goes through
every part with TensorFlow, faiss and torchvision unimportable (the lent machine has none of
them), its full run refuses a machine without an accelerator in one line, and its wheels are
installed and visible to the parts."""

import os
import subprocess
import sys
import zipfile

from bingo_jax.testing import subprocess_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'bench', 'device_check.sh')
# Each part's table header, in the order the check prints them.
HEADERS = ('| what | value |',
           '| dtype | batch per device | global batch | step (ms) | anchors/s |',
           '| batch | step (ms) | anchors/s |',
           '| part | ms | share of the step | compile (s) |',
           '| dtype | N | d | anchors timed |')


def _environment(tmp_path) -> dict:
  blocker = tmp_path / 'blocker'
  blocker.mkdir(exist_ok=True)
  (blocker / 'sitecustomize.py').write_text(
      'import sys\n' + ''.join(f'sys.modules[{name!r}] = None\n' for name in (
          'tensorflow', 'tensorflow_datasets', 'faiss', 'torchvision')))
  environment = subprocess_environment(str(tmp_path / 'jax_cache'), devices=2,
                                       pythonpath=(str(blocker),))
  return dict(environment, PYTHON=sys.executable)


def _run(tmp_path, *arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run(['bash', SCRIPT, *arguments], cwd=tmp_path, env=_environment(tmp_path),
                        capture_output=True, text=True, timeout=timeout)


def _table_rows(stdout: str, header: str) -> list[list[str]]:
  """The cells of the rows of the table under ``header``."""
  lines = stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith('|'):
      break
    rows.append([cell.strip() for cell in line.strip('|').split('|')])
  return rows


def test_smoke_check_prints_every_table_without_tensorflow_faiss_torchvision(tmp_path):
  result = _run(tmp_path, '--smoke')
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  positions = [result.stdout.find(header) for header in HEADERS]
  assert -1 not in positions and positions == sorted(positions), result.stdout
  assert 'every part finished' in result.stdout
  # The step row: global batch 2 per device x 2 devices, a positive rate.
  (step,) = _table_rows(result.stdout, HEADERS[1])
  assert step[:3] == ['float32', '2', '4'] and float(step[4].replace(',', '')) > 0
  # The breakdown: four parts, then their sum and the whole step, which took the step row's
  # time from the step part (bench/accelerator.py --json_out), not a time of its own.
  breakdown = _table_rows(result.stdout, HEADERS[3])
  assert len(breakdown) == 6 and all(float(row[1]) > 0 for row in breakdown)
  assert 'bench/accelerator.py' in breakdown[5][0] and breakdown[5][1] == step[3]
  assert abs(sum(float(row[1]) for row in breakdown[:4]) - float(breakdown[4][1])) < 0.25
  # The parts, run one after another, compute what one whole step computes (float32).
  (composition,) = [line for line in result.stdout.splitlines()
                    if line.startswith('# the parts run one after another')]
  errors = dict(item.rsplit(' ', 1) for item in composition.split(': ', 1)[1].split(', '))
  assert sorted(errors) == ['batch_stats', 'loss', 'negative_queue', 'params'], composition
  assert all(float(error) <= 1e-5 for error in errors.values()), composition
  (knn,) = _table_rows(result.stdout, HEADERS[4])
  assert knn[:4] == ['float32', '4,096', '64', '4,096']


def test_full_check_on_a_machine_without_accelerator_says_so_in_one_line(tmp_path):
  result = _run(tmp_path, timeout=300)
  assert result.returncode == 1
  error_lines = [line for line in result.stderr.splitlines() if 'GPU' in line]
  assert len(error_lines) == 1 and 'sees only CPU devices' in error_lines[0], result.stderr
  assert 'Traceback' not in result.stderr and HEADERS[1] not in result.stdout


def test_bad_arguments_get_one_line_and_exit_1(tmp_path):
  (tmp_path / 'empty').mkdir()
  for arguments, message in ((('--wheels', str(tmp_path / 'empty')), 'no *.whl files'),
                             (('--budget_s', 'nine'), "--budget_s 'nine'"),
                             (('--fast',), "unknown argument '--fast'")):
    result = _run(tmp_path, *arguments, timeout=60)
    assert result.returncode == 1 and message in result.stderr, (arguments, result.stderr)
    assert '|' not in result.stdout  # nothing ran


def _write_wheel(directory, name: str, version: str) -> str:
  """A minimal pure-Python wheel of a package ``name`` (PEP 427 layout)."""
  path = os.path.join(directory, f'{name}-{version}-py3-none-any.whl')
  info = f'{name}-{version}.dist-info'
  files = {f'{name}/__init__.py': f'VERSION = {version!r}\n',
           f'{info}/METADATA': f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n',
           f'{info}/WHEEL': 'Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n'
                            'Tag: py3-none-any\n'}
  files[f'{info}/RECORD'] = ''.join(f'{file},,\n' for file in files) + f'{info}/RECORD,,\n'
  with zipfile.ZipFile(path, 'w') as wheel:
    for file, text in files.items():
      wheel.writestr(file, text)
  return path


def test_carried_wheels_are_installed_for_the_run(tmp_path):
  wheels = tmp_path / 'wheels'
  wheels.mkdir()
  _write_wheel(str(wheels), 'device_check_probe', '0.3')
  # A zero time box: the wheels and the machine's table, then every part skipped (exit 1).
  result = _run(tmp_path, '--smoke', '--wheels', str(wheels), '--budget_s', '0', timeout=300)
  assert result.returncode == 1, result.stderr
  assert f'# installed for this run from {wheels}: device_check_probe 0.3' in result.stdout
  assert result.stdout.count('# skipped: ') == 4 and HEADERS[0] in result.stdout

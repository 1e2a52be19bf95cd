"""The suite's deprecation guard (tests/conftest.py, pyproject.toml): a library's
DeprecationWarning triggered by the project's code is an error, whichever frame the library
attributes it to, and one triggered by a test or by another library stays a warning."""

import os

import jax.numpy as jnp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = '''
import jax.core
import optax

def global_norm(tree):
  return optax.global_norm(tree)  # optax 0.2.8 warns from optax's own frame

def core_attribute(name):
  # jax 0.10.2 warns with stacklevel 2 (from this frame), once per name and process: a
  # warning raised as an error is not counted.
  return getattr(jax.core, name)
'''


def _module(filename: str, name: str) -> dict:
  """``SOURCE`` run as module ``name`` whose code lives in ``filename`` (not written)."""
  namespace = {'__name__': name}
  exec(compile(SOURCE, filename, 'exec'), namespace)  # pylint: disable=exec-used
  return namespace


def test_a_library_deprecation_called_from_the_package_is_an_error():
  package = _module(os.path.join(REPO, 'bingo_jax', 'probe.py'), 'bingo_jax.probe')
  with pytest.raises(DeprecationWarning, match=r'optax.global_norm.*bingo_jax/probe.py:6'):
    package['global_norm']({'a': jnp.ones(3)})
  with pytest.raises(DeprecationWarning, match='jax.core.DropVar'):
    package['core_attribute']('DropVar')


def test_a_deprecation_attributed_to_a_project_module_is_an_error():
  # Code outside the project's folders, in a module named as the package's: only
  # pyproject.toml's filter (matching the module the warning is attributed to) applies.
  outside = _module(os.path.join(REPO, 'docs', 'probe.py'), 'bench.probe')
  with pytest.raises(DeprecationWarning, match='jax.core.DropVar'):
    outside['core_attribute']('DropVar')


def test_a_deprecation_triggered_by_a_test_stays_a_warning():
  test = _module(os.path.join(REPO, 'tests', 'probe.py'), 'test_probe')
  with pytest.warns(DeprecationWarning, match='optax.global_norm'):
    assert float(test['global_norm']({'a': jnp.ones(4)})) == 2.0
  with pytest.warns(DeprecationWarning, match='jax.core.Effects'):
    test['core_attribute']('Effects')

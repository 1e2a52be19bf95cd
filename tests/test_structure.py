"""The shape of the package (issue 11's acceptance): no import circle, bounded module and
function sizes, no reference to the method notes that were never part of the repository, and a
docs/architecture.md whose layer table of folders matches the imports of the tree.

Everything here reads source text (``ast``, ``git ls-files``); nothing is imported, so the
tests take well under a second and do not depend on the optional libraries.

Size rules (docs/architecture.md, "Size limits"): a module of the ``bingo_jax`` package has at
most ``MAX_MODULE_LINES`` lines and a function (or method) at most ``MAX_FUNCTION_LINES``
lines, decorators and docstring included. A unit may exceed its limit only if it says why, in a
comment of the form ``# size: <reason>``:

* for a module, on a line of its own between the module docstring and the first statement;
* for a function, in the block of comment lines directly above its ``def`` (above its
  decorators, if any).

Each rule is checked on the real tree and, so that a broken checker cannot pass silently, on a
small package written to ``tmp_path`` whose circles and sizes are known by construction.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
from typing import Iterator, Optional

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'bingo_jax'
# Subpackages whose folder is elsewhere in the repository (pyproject.toml's package-dir).
PACKAGE_DIRS = {'bingo_jax.configs': 'configs'}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
SIZE_MARKER = re.compile(r'^\s*#\s*size:\s*(\S.*)$')
# Spelled in two parts so that this file does not itself contain the name it looks for.
FORBIDDEN_NAME = 'SPEC' + '.md'


# ---------------------------------------------------------------------------------------------
# The package's modules.


def package_modules(root: str, package: str,
                    package_dirs: Optional[dict[str, str]] = None) -> dict[str, str]:
  """Dotted module name -> file path of every ``.py`` file of ``package`` under ``root``,
  and of the subpackages that ``package_dirs`` (dotted name -> folder under ``root``) places
  elsewhere.

  A package's ``__init__.py`` is the module named after the package itself.
  """
  modules = {}
  for name, folder in [(package, package), *(package_dirs or {}).items()]:
    top = os.path.join(root, folder)
    for directory, subdirectories, files in os.walk(top):
      subdirectories[:] = sorted(d for d in subdirectories if not d.startswith(('.', '__')))
      relative = [] if directory == top else os.path.relpath(directory, top).split(os.sep)
      for file in sorted(files):
        if not file.endswith('.py'):
          continue
        parts = relative if file == '__init__.py' else relative + [file[:-3]]
        modules['.'.join([name, *parts])] = os.path.join(directory, file)
  return modules


def _parse(path: str) -> tuple[ast.Module, list[str]]:
  with open(path, encoding='utf-8') as f:
    text = f.read()
  return ast.parse(text, filename=path), text.splitlines()


# ---------------------------------------------------------------------------------------------
# (a) The import graph.


@dataclasses.dataclass(frozen=True)
class Edge:
  """``source`` imports ``target`` at ``path:line``."""
  source: str
  target: str
  path: str
  line: int


def _resolve(name: str, modules: dict[str, str]) -> Optional[str]:
  """The longest prefix of dotted ``name`` that is a module of the package, or None."""
  parts = name.split('.')
  for end in range(len(parts), 0, -1):
    candidate = '.'.join(parts[:end])
    if candidate in modules:
      return candidate
  return None


def _is_package(module: str, modules: dict[str, str]) -> bool:
  return os.path.basename(modules[module]) == '__init__.py'


def import_edges(modules: dict[str, str], root: str = REPO_ROOT) -> list[Edge]:
  """Every import of one package module by another, at any depth of the code.

  Counted: ``import a.b``, ``from a import b`` (an edge to the module ``a.b`` when ``b`` is
  one, else to ``a``), ``from a.b import c``, relative imports (``from . import x``,
  ``from ..y import z``), and imports inside functions, classes, ``try`` and ``if`` blocks
  (``TYPE_CHECKING`` ones included: the goal is layers, not only a working import order).
  An import of a package's submodule counts as an edge to that submodule, not to the
  package's ``__init__``.
  """
  edges = []
  for source, path in modules.items():
    tree, _ = _parse(path)
    # The package a relative import starts from.
    here = source if _is_package(source, modules) else source.rpartition('.')[0]
    for node in ast.walk(tree):
      targets = []
      if isinstance(node, ast.Import):
        targets = [_resolve(alias.name, modules) for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base_parts = here.split('.')
          if node.level > 1:
            base_parts = base_parts[:-(node.level - 1)]
          base = '.'.join(base_parts + ([node.module] if node.module else []))
        else:
          base = node.module or ''
        for alias in node.names:
          submodule = f'{base}.{alias.name}'
          targets.append(submodule if submodule in modules else _resolve(base, modules))
      for target in targets:
        if target is not None and target != source:
          edges.append(Edge(source, target, os.path.relpath(path, root), node.lineno))
  return edges


def import_cycles(modules: dict[str, str], edges: list[Edge]) -> list[list[Edge]]:
  """One import circle per strongly connected component of more than one module.

  Returns:
    For each such component, a closed path ``[a -> b, b -> c, ..., x -> a]`` through it (the
    shortest circle from its alphabetically first module), as the edges that make it.
  """
  graph: dict[str, dict[str, Edge]] = {module: {} for module in modules}
  for edge in edges:
    graph[edge.source].setdefault(edge.target, edge)

  # Tarjan's strongly connected components, iteratively (no recursion limit).
  index, lowlink, on_stack, stack, components = {}, {}, set(), [], []
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(graph[start])))]
    index[start] = lowlink[start] = len(index)
    stack.append(start)
    on_stack.add(start)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = lowlink[child] = len(index)
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          lowlink[node] = min(lowlink[node], index[child])
        continue
      work.pop()
      if work:
        lowlink[work[-1][0]] = min(lowlink[work[-1][0]], lowlink[node])
      if lowlink[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1:
          components.append(sorted(component))

  cycles = []
  for component in sorted(components):
    members = set(component)
    first = component[0]
    # Breadth-first search inside the component back to ``first``: the shortest circle.
    previous: dict[str, Edge] = {}
    frontier = [first]
    while frontier and first not in previous:
      next_frontier = []
      for node in frontier:
        for target, edge in sorted(graph[node].items()):
          if target in members and target not in previous:
            previous[target] = edge
            next_frontier.append(target)
      frontier = next_frontier
    path, node = [], first
    while True:
      edge = previous[node]
      path.append(edge)
      node = edge.source
      if node == first:
        break
    cycles.append(path[::-1])
  return cycles


def describe_cycle(cycle: list[Edge]) -> str:
  chain = ' -> '.join([cycle[0].source] + [edge.target for edge in cycle])
  where = '; '.join(f'{edge.source} imports {edge.target} at {edge.path}:{edge.line}'
                    for edge in cycle)
  return f'{chain} ({where})'


# ---------------------------------------------------------------------------------------------
# (b) Sizes.


def _marker_reason(lines: list[str], first: int, last: int) -> Optional[str]:
  """The reason of the first ``# size: <reason>`` line among 1-based lines first..last."""
  for line in lines[max(first, 1) - 1:max(last, 0)]:
    match = SIZE_MARKER.match(line)
    if match:
      return match.group(1).strip()
  return None


def _comment_block_above(lines: list[str], line: int) -> tuple[int, int]:
  """The 1-based range of the contiguous comment lines just above ``line``."""
  first = line
  while first > 1 and lines[first - 2].lstrip().startswith('#'):
    first -= 1
  return first, line - 1


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
  """(qualified name, node) of every function and method, nested ones included."""
  def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.AST]]:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield f'{prefix}{child.name}', child
        yield from visit(child, f'{prefix}{child.name}.')
      elif isinstance(child, ast.ClassDef):
        yield from visit(child, f'{prefix}{child.name}.')
      else:
        yield from visit(child, prefix)
  yield from visit(tree, '')


def size_violations(modules: dict[str, str], root: str = REPO_ROOT,
                    max_module_lines: int = MAX_MODULE_LINES,
                    max_function_lines: int = MAX_FUNCTION_LINES) -> list[str]:
  """One message per module or function over its limit without a ``# size:`` reason."""
  problems = []
  for module, path in sorted(modules.items()):
    tree, lines = _parse(path)
    shown = os.path.relpath(path, root)
    if len(lines) > max_module_lines:
      body = tree.body
      has_docstring = (body and isinstance(body[0], ast.Expr)
                       and isinstance(body[0].value, ast.Constant)
                       and isinstance(body[0].value.value, str))
      after = body[0].end_lineno + 1 if has_docstring else 1
      rest = body[1:] if has_docstring else body
      before = rest[0].lineno - 1 if rest else len(lines)
      if not _marker_reason(lines, after, before):
        problems.append(f'{shown}: module {module} has {len(lines)} lines > '
                        f'{max_module_lines}, and no "# size: <reason>" line between its '
                        'docstring and its first statement')
    for name, node in _functions(tree):
      start = min([node.lineno] + [d.lineno for d in node.decorator_list])
      length = node.end_lineno - start + 1
      if length <= max_function_lines:
        continue
      if not _marker_reason(lines, *_comment_block_above(lines, start)):
        problems.append(f'{shown}:{node.lineno}: function {module}.{name} has {length} lines '
                        f'> {max_function_lines}, and no "# size: <reason>" comment directly '
                        'above it')
  return problems


# ---------------------------------------------------------------------------------------------
# (c) The removed method notes.


def tracked_files(root: str) -> list[str]:
  """Paths (relative to ``root``) of the files git tracks in the work tree."""
  try:
    listing = subprocess.run(['git', 'ls-files', '-z'], cwd=root, check=True,
                             capture_output=True).stdout
  except (OSError, subprocess.CalledProcessError) as error:
    pytest.skip(f'git ls-files failed in {root}: {error}')
  return [name for name in listing.decode('utf-8').split('\0') if name]


def files_naming(root: str, paths: list[str], needle: str) -> list[str]:
  """``path:line`` of every line of the given text files under ``root`` containing ``needle``.

  Files that are not UTF-8 text (images, checkpoints) are skipped; a file name containing the
  needle counts too.
  """
  hits = []
  for relative in paths:
    if needle in relative:
      hits.append(f'{relative} (file name)')
    path = os.path.join(root, relative)
    if not os.path.isfile(path):  # deleted in the work tree, not yet committed
      continue
    with open(path, 'rb') as f:
      data = f.read()
    if b'\0' in data[:8192]:
      continue
    try:
      text = data.decode('utf-8')
    except UnicodeDecodeError:
      continue
    hits.extend(f'{relative}:{number}' for number, line in enumerate(text.splitlines(), 1)
                if needle in line)
  return hits


# ---------------------------------------------------------------------------------------------
# The checkers on packages with known answers.


def _write_package(root, files: dict[str, str]) -> None:
  for relative, text in files.items():
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_import_graph_of_a_known_package(tmp_path):
  """Every import form becomes the edge written by hand below."""
  _write_package(tmp_path, {
      'pkg/__init__.py': '',
      'pkg/a.py': 'import os\nimport pkg.b\n',
      'pkg/b.py': 'from pkg import c\n',
      'pkg/c.py': 'def f():\n  from pkg.sub.d import thing\n  return thing\n',
      'pkg/sub/__init__.py': 'from .d import thing\n',
      'pkg/sub/d.py': 'from .. import e\nfrom ..e import name\nthing = 1\n',
      'pkg/e.py': 'import numpy\ntry:\n  from pkg import f as g\nexcept ImportError:\n  pass\n',
      'pkg/f.py': 'from pkg import sub\nclass K:\n  from pkg.sub import thing\n',
  })
  modules = package_modules(str(tmp_path), 'pkg')
  assert sorted(modules) == ['pkg', 'pkg.a', 'pkg.b', 'pkg.c', 'pkg.e', 'pkg.f', 'pkg.sub',
                             'pkg.sub.d']
  edges = {(edge.source, edge.target) for edge in import_edges(modules, str(tmp_path))}
  assert edges == {('pkg.a', 'pkg.b'), ('pkg.b', 'pkg.c'), ('pkg.c', 'pkg.sub.d'),
                   ('pkg.sub', 'pkg.sub.d'), ('pkg.sub.d', 'pkg.e'), ('pkg.e', 'pkg.f'),
                   ('pkg.f', 'pkg.sub')}


def test_cycle_finder_on_a_known_package(tmp_path):
  """Two planted circles (one through a function-level, one through a relative import) are
  found and named; an acyclic chain beside them is not reported."""
  _write_package(tmp_path, {
      'pkg/__init__.py': '',
      'pkg/x.py': 'from pkg import y\n',
      'pkg/y.py': 'def load():\n  from pkg import x\n  return x\n',  # x <-> y
      'pkg/p.py': 'from . import q\n',
      'pkg/q.py': 'from .r import value\n',
      'pkg/r.py': 'import pkg.p\nvalue = 0\n',                      # p -> q -> r -> p
      'pkg/s.py': 'from pkg import t\n',
      'pkg/t.py': 'from pkg import x\n',                            # s -> t -> x: no circle
  })
  modules = package_modules(str(tmp_path), 'pkg')
  cycles = import_cycles(modules, import_edges(modules, str(tmp_path)))
  chains = [[cycle[0].source] + [edge.target for edge in cycle] for cycle in cycles]
  assert chains == [['pkg.p', 'pkg.q', 'pkg.r', 'pkg.p'], ['pkg.x', 'pkg.y', 'pkg.x']]
  described = describe_cycle(cycles[1])
  assert 'pkg.x -> pkg.y -> pkg.x' in described and 'pkg/y.py:2' in described


def test_size_checker_on_a_known_package(tmp_path):
  """Long units fail unless a ``# size:`` reason sits where the rules say (limits here: 12
  lines per module, 9 per function)."""
  body = lambda n, indent='  ': ''.join(f'{indent}x{i} = {i}\n' for i in range(n))  # noqa: E731
  statements = ''.join(f'a{i} = {i}\n' for i in range(12))
  _write_package(tmp_path, {
      'pkg/__init__.py': '',
      'pkg/at_limits.py': '"""Doc."""\n# a comment\n' + 'def fine():\n' + body(8) + 'b = 1\n',
      'pkg/long_module.py': '"""Doc."""\n' + statements,
      'pkg/long_module_ok.py': '"""Doc.\n\nTwo lines."""\n\n# size: a reason\n' + statements,
      'pkg/long_module_late.py': '"""Doc."""\nimport os\n# size: too late\n' + statements,
      'pkg/long_function.py': 'def f():\n' + body(9),
      'pkg/long_function_ok.py': '# size: one table\n# (more words)\n@staticmethod\ndef f():\n'
                                 + body(8),
      'pkg/long_method.py': 'class C:\n\n  def m(self):\n' + body(9, '    '),
      'pkg/marker_apart.py': '# size: detached by a blank line\n\ndef f():\n' + body(9),
      'pkg/marker_inside.py': 'def f():\n  # size: inside the body\n' + body(8),
      'pkg/empty_reason.py': '# size:\ndef f():\n' + body(9),
  })
  modules = package_modules(str(tmp_path), 'pkg')
  problems = size_violations(modules, str(tmp_path), max_module_lines=12, max_function_lines=9)
  flagged = sorted(problem.split(': ')[0] for problem in problems)
  assert flagged == ['pkg/empty_reason.py:2', 'pkg/long_function.py:1', 'pkg/long_method.py:3',
                     'pkg/long_module.py', 'pkg/long_module_late.py', 'pkg/marker_apart.py:3',
                     'pkg/marker_inside.py:1'], problems
  assert any('function pkg.long_method.C.m has 10 lines > 9' in problem for problem in problems)
  assert any('module pkg.long_module has 13 lines > 12' in problem for problem in problems)


def test_name_finder_on_known_files(tmp_path):
  _write_package(tmp_path, {'a.md': 'one\nsee NOTES.txt here\n', 'b.py': 'x = 1\n',
                            'NOTES.txt/c.txt': 'none\n'})
  (tmp_path / 'd.bin').write_bytes(b'\0NOTES.txt')
  hits = files_naming(str(tmp_path), ['a.md', 'b.py', 'NOTES.txt/c.txt', 'd.bin', 'gone.py'],
                      'NOTES.txt')
  assert hits == ['a.md:2', 'NOTES.txt/c.txt (file name)']


# ---------------------------------------------------------------------------------------------
# The checks on the tree.


@pytest.fixture(scope='module')
def modules() -> dict[str, str]:
  found = package_modules(REPO_ROOT, PACKAGE, PACKAGE_DIRS)
  assert f'{PACKAGE}.train' in found, f'no {PACKAGE} package under {REPO_ROOT}'
  return found


def test_no_import_cycle_in_the_package(modules):
  cycles = import_cycles(modules, import_edges(modules))
  assert not cycles, 'import circles in the package:\n' + '\n'.join(
      describe_cycle(cycle) for cycle in cycles)


def test_modules_and_functions_are_small_or_say_why(modules):
  problems = size_violations(modules)
  assert not problems, '\n'.join(problems)


def test_no_tracked_file_names_the_removed_notes():
  hits = files_naming(REPO_ROOT, tracked_files(REPO_ROOT), FORBIDDEN_NAME)
  assert not hits, (f'{FORBIDDEN_NAME} is not part of the repository; cite docs/method.md '
                    'and its section numbers instead:\n' + '\n'.join(hits))


# ---------------------------------------------------------------------------------------------
# (d) docs/architecture.md shows the layers of the folders.

ARCHITECTURE_DOC = os.path.join('docs', 'architecture.md')
# | layer | `unit` | what it holds | `imported`, `imported` |
_TABLE_ROW = re.compile(r'^\|\s*(\d+)\s*\|\s*`([\w.]+/?)`\s*\|[^|]*\|([^|]*)\|')
_MAY_IMPORT = re.compile(r'^May import:\s*(.*?)\.?\s*$', re.MULTILINE)
INIT = '__init__'


def unit_of(module: str, modules: dict[str, str], package: str = PACKAGE) -> str:
  """The part of the package a module belongs to: its top-level folder (``data/``), or the
  top-level module itself (``train``), or ``__init__`` for the package's own ``__init__``."""
  parts = module.split('.')
  if len(parts) == 1:
    return INIT
  top = f'{package}.{parts[1]}'
  return f'{parts[1]}/' if _is_package(top, modules) else parts[1]


def unit_edges(modules: dict[str, str], edges: list[Edge],
               package: str = PACKAGE) -> dict[str, set[str]]:
  """Unit -> the other units its modules import (every unit of the package is a key)."""
  units: dict[str, set[str]] = {unit_of(m, modules, package): set() for m in modules}
  for edge in edges:
    source, target = unit_of(edge.source, modules, package), unit_of(edge.target, modules, package)
    if source != target:
      units[source].add(target)
  return units


def documented_layers(text: str) -> dict[str, tuple[int, set[str]]]:
  """Unit -> (layer, the units it imports), read from the table of the ``## Layers`` section.

  Its rows are ``| N | `unit` | what it holds | `imported`, `imported` |``; a folder is written
  with its slash (``data/``), a top-level module without (``train``).

  Raises:
    ValueError: a unit listed twice.
  """
  layers: dict[str, tuple[int, set[str]]] = {}
  in_section = False
  for number, line in enumerate(text.splitlines(), 1):
    if line.startswith('## '):
      in_section = line.strip() == '## Layers'
      continue
    row = _TABLE_ROW.match(line) if in_section else None
    if not row:
      continue
    unit = row.group(2)
    if unit in layers:
      raise ValueError(f'{ARCHITECTURE_DOC}:{number}: {unit} is listed twice.')
    layers[unit] = (int(row.group(1)), set(re.findall(r'`([\w.]+/?)`', row.group(3))))
  return layers


def layer_mismatches(actual: dict[str, set[str]],
                     layers: dict[str, tuple[int, set[str]]]) -> list[str]:
  """How the documented layers differ from the tree: missing or extra units, import lists
  that differ, and imports of a unit that is not in a lower layer (an arrow points down)."""
  problems = [f'{u} is in the package but not in the layer table'
              for u in sorted(set(actual) - set(layers))]
  problems += [f'{u} is in the layer table but not in the package'
               for u in sorted(set(layers) - set(actual))]
  for unit, (layer, listed) in sorted(layers.items()):
    if unit not in actual:
      continue
    if listed != actual[unit]:
      problems.append(f'{unit} imports {sorted(actual[unit])}; the table lists {sorted(listed)}')
    for target in sorted(actual[unit]):
      if target in layers and layers[target][0] >= layer:
        problems.append(f'{unit} (layer {layer}) imports {target} (layer {layers[target][0]}): '
                        'an import must point to a lower layer')
  return problems


def init_mismatches(modules: dict[str, str], layers: dict[str, tuple[int, set[str]]],
                    package: str = PACKAGE) -> list[str]:
  """Folders whose ``__init__.py`` docstring has no ``May import: a, b`` line naming exactly
  the folders and modules the layer table lists for it (``nothing ...`` for none)."""
  problems = []
  for unit, (_, listed) in sorted(layers.items()):
    if not unit.endswith('/'):
      continue
    path = modules.get(f'{package}.{unit[:-1]}')
    if path is None:
      continue
    tree, _ = _parse(path)
    docstring = ast.get_docstring(tree) or ''
    line = _MAY_IMPORT.search(docstring)
    if not line:
      problems.append(f'{package}.{unit[:-1]}: its docstring has no "May import:" line')
      continue
    names = '' if line.group(1).startswith('nothing') else line.group(1)
    said = {name.strip() for name in names.split(',')} - {''}
    said = {name if name.endswith('/') or f'{name}/' not in layers else f'{name}/'
            for name in said}
    if said != listed:
      problems.append(f'{package}.{unit[:-1]} says it may import {sorted(said)}; the layer '
                      f'table lists {sorted(listed)}')
  return problems


def test_layer_reader_on_a_known_package(tmp_path):
  _write_package(tmp_path, {
      'pkg/__init__.py': '',
      'pkg/low/__init__.py': '"""Low.\n\nMay import: nothing.\n"""\n',
      'pkg/low/a.py': '',
      'pkg/mid/__init__.py': '"""Mid.\n\nMay import: low.\n"""\n',
      'pkg/mid/b.py': 'from pkg.low import a\n',
      'pkg/top.py': 'from pkg.mid import b\nfrom pkg import low\n',
      'pkg/new/__init__.py': '"""No line."""\n',
      'pkg/new/c.py': 'from pkg import top\n',
      # pkg.conf, mapped to a folder outside pkg/.
      'elsewhere/__init__.py': '"""Conf.\n\nMay import: low.\n"""\n',
      'elsewhere/x.py': 'from pkg.conf import y\n',
      'elsewhere/y.py': 'from pkg.low import a\n',
  })
  modules = package_modules(str(tmp_path), 'pkg', {'pkg.conf': 'elsewhere'})
  assert {'pkg.conf', 'pkg.conf.x', 'pkg.conf.y'} <= set(modules)
  actual = unit_edges(modules, import_edges(modules, str(tmp_path)), 'pkg')
  assert actual == {'__init__': set(), 'low/': set(), 'mid/': {'low/'},
                    'top': {'low/', 'mid/'}, 'new/': {'top'}, 'conf/': {'low/'}}
  text = '\n'.join([
      '# Title', '## Layers', 'prose', '| layer | unit | holds | imports |', '|---|---|---|---|',
      '| 0 | `__init__` | the version | |', '| 0 | `low/` | a | |',
      '| 1 | `mid/` | b | `low/` |', '| 1 | `top` | the top | `mid/` |',
      '| 0 | `gone/` | nothing | |', '| 1 | `conf/` | c | `low/` |', '## Other', '| 0 | `c` | x | `a` |'])
  layers = documented_layers(text)
  assert layers == {'__init__': (0, set()), 'low/': (0, set()), 'mid/': (1, {'low/'}),
                    'top': (1, {'mid/'}), 'gone/': (0, set()), 'conf/': (1, {'low/'})}
  assert layer_mismatches(actual, layers) == [
      'new/ is in the package but not in the layer table',
      'gone/ is in the layer table but not in the package',
      "top imports ['low/', 'mid/']; the table lists ['mid/']",
      'top (layer 1) imports mid/ (layer 1): an import must point to a lower layer']
  layers['new/'] = (2, {'top'})
  assert init_mismatches(modules, layers, 'pkg') == [
      'pkg.new: its docstring has no "May import:" line']
  layers['mid/'] = (1, set())
  assert init_mismatches(modules, layers, 'pkg')[0] == (
      "pkg.mid says it may import ['low/']; the layer table lists []")
  with pytest.raises(ValueError, match='listed twice'):
    documented_layers(text.replace('`gone/`', '`low/`'))


@pytest.fixture(scope='module')
def documented() -> dict[str, tuple[int, set[str]]]:
  with open(os.path.join(REPO_ROOT, ARCHITECTURE_DOC), encoding='utf-8') as f:
    return documented_layers(f.read())


def test_architecture_doc_shows_the_layers_of_the_tree(modules, documented):
  problems = layer_mismatches(unit_edges(modules, import_edges(modules)), documented)
  assert not problems, (f'{ARCHITECTURE_DOC} (section "## Layers") does not match the '
                        'package:\n' + '\n'.join(problems))


def test_every_folder_says_what_it_may_import(modules, documented):
  problems = init_mismatches(modules, documented)
  assert not problems, '\n'.join(problems)


def test_pyproject_lists_every_package(modules):
  """``pyproject.toml`` names the packages one by one (its package-dir mapping rules out
  setuptools' finder): a folder missing there would be missing from an install."""
  with open(os.path.join(REPO_ROOT, 'pyproject.toml'), encoding='utf-8') as f:
    text = f.read()
  listed = re.search(r'^packages = \[(.*?)\]', text, re.MULTILINE | re.DOTALL)
  assert listed, 'pyproject.toml has no "packages = [...]" list'
  packages = {name for name, path in modules.items() if path.endswith('__init__.py')}
  assert set(re.findall(r'"([\w.]+)"', listed.group(1))) == packages
  for name, folder in PACKAGE_DIRS.items():
    assert f'"{name}" = "{folder}"' in text, f'pyproject.toml does not map {name} to {folder}/'

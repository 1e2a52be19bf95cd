r"""What one BINGO step sends between devices as the device count grows, read off the compiled
program (no accelerator needed: fake CPU devices).

  python -m bench.scaling                  # R-18 <- R-50x2, 224 px, 8/32/128/512 devices
  python -m bench.scaling --networks=tiny  # tiny networks, the real image size (faster)
  python -m bench.scaling --smoke          # tiny networks, 32 px, 8 devices (the suite)

For each device count and teacher BatchNorm mode (``config.teacher.bn_mode``: the released
``'shuffle'``, which permutes the images, and ``'shuffle_stats'``, which sums the shuffled
groups' statistics) a child process with that many fake CPU devices compiles the real step at
a fixed per-device batch from abstract inputs (nothing is allocated or run; the views enter
as uint8 arrays, the device augmentation that draws them is left out), and every
collective of the compiled program is read from its HLO: kind, shape, bytes, and the part of
the step it comes from (the step's named scopes: ``teacher_keys``, ``student``, ``loss``,
``optimizer``, ``queue``, ``cutmix``).

Bytes per device are what a ring algorithm sends for each collective of an array of S bytes
among n devices: all-reduce 2(n-1)/n S, all-gather / reduce-scatter / all-to-all (n-1)/n S
(S the larger side), collective-permute S. The projection turns them into time with stated
link bandwidths (``LINKS``) and sets them against the step's compute (XLA's FLOPs of one
device's program) at 35% of the chip's bf16 peak. GPU clusters: 8 GPUs per node on NVLink,
one 400 Gb/s NIC per GPU between nodes, collectives done hierarchically (within the node
over NVLink, then 1/8 of the array per GPU across nodes). TPU: the chip's whole ICI bandwidth
used by one ring (an optimistic bound: a torus runs a ring per dimension). Communication is
counted as if nothing overlapped with compute, with a fixed latency per collective (per
stage of a hierarchical one): many small all-reduces cost latency more than bandwidth.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from typing import Optional

from absl import app, flags

from bingo_jax.testing import cpu_xla_flags



@dataclasses.dataclass(frozen=True)
class Link:
  """One device's compute and links (assumed figures, stated in the tables)."""
  name: str
  peak_flops: float            # bf16 dense peak, FLOP/s
  intra_bytes_per_s: float     # within a node (GPU: NVLink, one direction) or a TPU slice
  inter_bytes_per_s: float     # between nodes, per device (GPU: its NIC)
  intra_latency_s: float       # per collective
  inter_latency_s: float
  node: Optional[int]          # devices per node; None: one ICI domain throughout


LINKS = (
    Link('H100 SXM: NVLink 4 + 400 Gb/s per GPU', 989e12, 450e9, 50e9, 10e-6, 25e-6, 8),
    Link('TPU v4: ICI 2,400 Gb/s per chip', 275e12, 300e9, 300e9, 10e-6, 10e-6, None),
    Link('TPU v5e: ICI 1,600 Gb/s per chip', 197e12, 200e9, 200e9, 10e-6, 10e-6, None),
)
UTILISATION = 0.35
SOURCES = ('teacher_keys', 'student', 'loss', 'optimizer', 'queue', 'cutmix')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
               'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
                's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>\(.*?\)|\S+)\s+'
    r'(?P<op>' + '|'.join(COLLECTIVES) + r')(?P<start>-start)?\(')
_ARRAY = re.compile(r'(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]')
_OP_NAME = re.compile(r'op_name="(?P<name>[^"]*)"')
_GROUPS_LIST = re.compile(r'replica_groups=\{\{(?P<first>[\d,]*)\}')
_GROUPS_IOTA = re.compile(r'replica_groups=\[(?P<groups>\d+),(?P<size>\d+)\]')
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\]\s*\{(?P<over>[^}]*)\}")
_MESH_AXIS = re.compile(r"'(?P<name>[^']+)'=(?P<size>\d+)")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a compiled program (one device's view of it)."""
  kind: str
  shapes: tuple[str, ...]
  array_bytes: int    # the instruction's result (a combined collective's arrays summed)
  group_size: int     # devices taking part (0: not stated, i.e. all)
  op_name: str

  def bytes_sent(self, num_devices: int) -> float:
    """What one device sends for it under a ring algorithm (module docstring)."""
    n = self.group_size or num_devices
    if n <= 1:
      return 0.0
    if self.kind == 'all-reduce':
      return 2 * (n - 1) / n * self.array_bytes
    if self.kind == 'collective-permute':
      return float(self.array_bytes)
    return (n - 1) / n * self.array_bytes

  @property
  def largest_array_bytes(self) -> int:
    """The largest of the arrays a combined collective carries."""
    return max(size for _, size in _array_bytes(' '.join(self.shapes)))

  @property
  def source(self) -> str:
    """The step's named scope the collective comes from, or 'other'."""
    for name in SOURCES:
      if re.search(rf'(^|/|\(){name}(/|\)|$)', self.op_name):
        return name
    return 'other'


def _array_bytes(shape: str) -> list[tuple[str, int]]:
  arrays = []
  for match in _ARRAY.finditer(shape):
    size = _DTYPE_BYTES.get(match['dtype'])
    if size is None:
      continue
    for dim in filter(None, match['dims'].split(',')):
      size *= int(dim)
    arrays.append((f'{match["dtype"]}[{match["dims"]}]', size))
  return arrays


def parse_collectives(hlo_text: str) -> list[Collective]:
  """Every collective instruction of a compiled HLO module's text (``-done`` halves of
  asynchronous pairs are skipped; of a ``-start``'s result only the outputs count)."""
  collectives = []
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    arrays = _array_bytes(match['shape'])
    if match['start'] and match['op'] != 'all-reduce':
      arrays = arrays[len(arrays) // 2:]  # an async start's result: (operands, outputs)
    if not arrays:
      continue
    op_name = _OP_NAME.search(line)
    collectives.append(Collective(
        kind=match['op'], shapes=tuple(shape for shape, _ in arrays),
        array_bytes=sum(size for _, size in arrays), group_size=_group_size(line),
        op_name=op_name['name'] if op_name else ''))
  return collectives


def _group_size(line: str) -> int:
  """Devices per replica group of a collective's HLO line; 0 where it states none."""
  groups = _GROUPS_LIST.search(line)
  if groups and groups['first']:
    return len(groups['first'].split(','))
  iota = _GROUPS_IOTA.search(line)
  if iota:
    return int(iota['size'])
  mesh = _GROUPS_MESH.search(line)  # replica_groups=mesh['a'=8,'b'=1] {'a'}
  if mesh:
    sizes = {axis['name']: int(axis['size']) for axis in _MESH_AXIS.finditer(mesh['axes'])}
    size = 1
    for name in re.findall(r"'([^']+)'", mesh['over']):
      size *= sizes[name]
    return size
  return 0


# ------------------------------------------------------------------ the child: one compile


def compile_step(networks: str, num_devices: int, per_device: int, image_size: int,
                 bn_mode: str, dtype: str) -> dict:
  """Compiles the step on ``num_devices`` fake devices; its collectives and FLOPs as a dict."""
  import jax
  import jax.numpy as jnp

  from bingo_jax.configs import r18_r50w2
  from bingo_jax.data import parallel
  from bingo_jax.method import steps
  from bingo_jax.method import train_step as train_step_lib
  from bingo_jax.models import init_variables
  from bench import models as bench_models

  devices = jax.devices()
  if len(devices) != num_devices:
    raise RuntimeError(f'expected {num_devices} devices, JAX has {len(devices)}')
  mesh = parallel.make_mesh(devices)
  global_batch = per_device * num_devices
  config = r18_r50w2.get_config()
  config.train.compute_dtype = dtype
  config.train.batch_size = global_batch
  config.train.queue_size = max(config.train.queue_size, global_batch)
  config.train.queue_size -= config.train.queue_size % global_batch
  config.data.image_size = image_size
  config.teacher.bn_mode = bn_mode
  # The released groups of 32 (one GPU's share); smaller per-device batches: one group each.
  config.student.bn_group_size = config.teacher.bn_group_size = min(32, per_device)
  student, teacher = bench_models.create_models(config, networks == 'tiny', dtype)
  replicated, sharded = parallel.replicated(mesh), parallel.data_sharding(mesh)
  abstract = lambda tree, sharding: jax.tree.map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
  teacher_variables = abstract(
      jax.eval_shape(lambda: init_variables(teacher, jax.random.key(1), 32)), replicated)
  state = abstract(jax.eval_shape(lambda: train_step_lib.create_train_state(
      config, student, jax.random.key(0), mesh, 5000)), replicated)
  # The views as the step receives them (the device augmentation before it moves nothing
  # between devices and is left out: it would only lengthen the compile).
  batch = abstract({view: jax.ShapeDtypeStruct((global_batch, image_size, image_size, 3),
                                               jnp.uint8)
                    for view in steps.batch_views(config)}, sharded)
  step = steps.make_train_step(config, student, teacher, mesh, 5000)
  began = time.perf_counter()
  compiled = step.lower(state, teacher_variables, batch).compile()
  compile_seconds = time.perf_counter() - began
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {'collectives': [dataclasses.asdict(c) for c in parse_collectives(compiled.as_text())],
          'flops_per_device': float(cost['flops']), 'compile_seconds': compile_seconds,
          'teacher_groups': global_batch // config.teacher.bn_group_size}


# ------------------------------------------------------------------ the parent: the tables


def run_child(networks: str, num_devices: int, per_device: int, image_size: int,
              bn_mode: str, dtype: str, timeout: float) -> dict:
  """``compile_step`` in a process of its own with ``num_devices`` fake CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='',
             XLA_FLAGS=cpu_xla_flags(num_devices))
  command = [sys.executable, '-m', 'bench.scaling', '--child', f'--networks={networks}',
             f'--child_devices={num_devices}', f'--per_device_batch={per_device}',
             f'--image_size={image_size}', f'--child_bn_mode={bn_mode}', f'--dtype={dtype}']
  done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if done.returncode:
    raise RuntimeError(f'{num_devices} devices, {bn_mode}: {done.stderr.strip()[-2000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def by_source(result: dict, num_devices: int) -> dict[str, float]:
  """Bytes one device sends per step, by the step's part."""
  totals = {}
  for fields in result['collectives']:
    collective = Collective(**{**fields, 'shapes': tuple(fields['shapes'])})
    totals[collective.source] = (totals.get(collective.source, 0.0)
                                 + collective.bytes_sent(num_devices))
  return totals


def communication_seconds(result: dict, num_devices: int, link: Link) -> float:
  """The projected time of the step's collectives (module docstring), none overlapped: bytes
  over bandwidth plus a fixed latency per collective (per stage for a hierarchical one)."""
  total = 0.0
  for fields in result['collectives']:
    collective = Collective(**{**fields, 'shapes': tuple(fields['shapes'])})
    n = collective.group_size or num_devices
    if link.node is None or n <= link.node:
      total += link.intra_latency_s + collective.bytes_sent(n) / link.intra_bytes_per_s
      continue
    # Within the node over NVLink, then each GPU's 1/node share across the nodes.
    within = Collective(collective.kind, (), collective.array_bytes, link.node, '')
    across = Collective(collective.kind, (), collective.array_bytes // link.node,
                        n // link.node, '')
    total += (link.intra_latency_s + within.bytes_sent(link.node) / link.intra_bytes_per_s
              + link.inter_latency_s + across.bytes_sent(n // link.node)
              / link.inter_bytes_per_s)
  return total


def _megabytes(value: float) -> str:
  return f'{value / 1e6:,.2f}'


def print_tables(results: dict, counts: list[int], modes: list[str]) -> None:
  sources = sorted({source for (n, mode), result in results.items()
                    for source in by_source(result, n)},
                   key=lambda s: (SOURCES + ('other',)).index(s))
  print('\n## Bytes each device sends per step (MB, ring algorithm)\n')
  print('| devices | global batch | teacher bn_mode | ' + ' | '.join(sources)
        + ' | total | teacher groups | compile (s) |')
  print('|---' * (len(sources) + 6) + '|')
  for n in counts:
    for mode in modes:
      result = results.get((n, mode))
      if result is None:
        continue
      totals = by_source(result, n)
      print(f'| {n} | {result["global_batch"]:,} | {mode} | '
            + ' | '.join(_megabytes(totals.get(s, 0.0)) for s in sources)
            + f' | {_megabytes(sum(totals.values()))} | {result["teacher_groups"]} | '
            f'{result["compile_seconds"]:.0f} |')
  print('\n## The teacher\'s collectives (one device\'s program)\n')
  print('| devices | teacher bn_mode | collectives | largest (kind, shape) | MB sent |')
  print('|---|---|---|---|---|')
  for n in counts:
    for mode in modes:
      result = results.get((n, mode))
      if result is None:
        continue
      teacher = [Collective(**{**c, 'shapes': tuple(c['shapes'])})
                 for c in result['collectives']]
      teacher = [c for c in teacher if c.source == 'teacher_keys']
      largest = max(teacher, key=lambda c: c.largest_array_bytes, default=None)
      described = (f'{largest.kind} {", ".join(largest.shapes[:2])}' if largest else '-')
      print(f'| {n} | {mode} | {len(teacher)} | {described} | '
            f'{_megabytes(sum(c.bytes_sent(n) for c in teacher))} |')
  print(f'\n## Projection: communication against compute at {UTILISATION:.0%} of the bf16 '
        'peak (ms per step, nothing overlapped)\n')
  for link in LINKS:
    node = (f'{link.node} per node, {link.inter_bytes_per_s / 1e9:.0f} GB/s and '
            f'{1e6 * link.inter_latency_s:.0f} us across nodes' if link.node else 'one domain')
    print(f'- {link.name}: {link.peak_flops / 1e12:.0f} TFLOP/s bf16, '
          f'{link.intra_bytes_per_s / 1e9:.0f} GB/s and {1e6 * link.intra_latency_s:.0f} us '
          f'per collective within, {node}')
  print('\n| devices | teacher bn_mode | collectives | '
        + ' | '.join(f'{link.name.split(":")[0]}: compute | comm' for link in LINKS) + ' |')
  print('|---|---|---' + '|---|---' * len(LINKS) + '|')
  for n in counts:
    for mode in modes:
      result = results.get((n, mode))
      if result is None:
        continue
      cells = []
      for link in LINKS:
        compute = result['flops_per_device'] / (UTILISATION * link.peak_flops)
        comm = communication_seconds(result, n, link)
        flag = ' (exceeds)' if comm > compute else ''
        cells.append(f'{1e3 * compute:.1f} | {1e3 * comm:.1f}{flag}')
      print(f'| {n} | {mode} | {len(result["collectives"])} | ' + ' | '.join(cells) + ' |')
  for link in LINKS:
    for mode in modes:
      crossing = [n for n in counts if (n, mode) in results and communication_seconds(
          results[(n, mode)], n, link) > results[(n, mode)]['flops_per_device'] / (
              UTILISATION * link.peak_flops)]
      print(f'# {link.name.split(":")[0]}, {mode}: communication exceeds compute '
            + (f'from {crossing[0]} devices' if crossing else
               f'at none of {", ".join(map(str, counts))} devices'))


_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny networks, 32 px views, 8 devices.')
_NETWORKS = flags.DEFINE_enum('networks', 'real', ['real', 'tiny'],
                              "'real': R-18 student, R-50x2 teacher; 'tiny': width-8 ResNet-18s.")
_COUNTS = flags.DEFINE_list('device_counts', None, 'Device counts (default 8,32,128,512).')
_PER_DEVICE = flags.DEFINE_integer('per_device_batch', None,
                                   'Anchors per device (default 32, the released 256 / 8 GPUs).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', None, 'View side (default 224; smoke: 32).')
_MODES = flags.DEFINE_list('bn_modes', ['shuffle', 'shuffle_stats'], 'Teacher bn_modes.')
_DTYPE = flags.DEFINE_string('dtype', None, 'Compute dtype (default bfloat16; smoke: float32, '
                             'which XLA:CPU compiles faster).')
_TIMEOUT = flags.DEFINE_float('timeout', 900, 'Seconds per compile.')
_CHILD = flags.DEFINE_bool('child', False, 'Internal: compile one configuration.')
_CHILD_DEVICES = flags.DEFINE_integer('child_devices', 0, 'Internal.')
_CHILD_MODE = flags.DEFINE_string('child_bn_mode', 'shuffle', 'Internal.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  smoke = _SMOKE.value
  networks = 'tiny' if smoke else _NETWORKS.value
  per_device = _PER_DEVICE.value or (2 if smoke else 32)
  image_size = _IMAGE_SIZE.value or (32 if smoke else 224)
  dtype = _DTYPE.value or ('float32' if smoke else 'bfloat16')
  if _CHILD.value:
    result = compile_step(networks, _CHILD_DEVICES.value, per_device, image_size,
                          _CHILD_MODE.value, dtype)
    result['global_batch'] = per_device * _CHILD_DEVICES.value
    print(json.dumps(result))
    return
  counts = [int(n) for n in (_COUNTS.value or (['8'] if smoke else
                                               ['8', '32', '128', '512']))]
  began = time.perf_counter()
  print(f'# BINGO step collectives: {"tiny networks" if networks == "tiny" else "R-18 <- R-50x2"}'
        f', {image_size} px views, {per_device} anchors per device, {dtype}, '
        f'fake CPU devices; load average {os.getloadavg()[0]:.2f}')
  results = {}
  for n in counts:
    for mode in _MODES.value:
      results[(n, mode)] = run_child(networks, n, per_device, image_size, mode, dtype,
                                     _TIMEOUT.value)
      print(f'# compiled {n} devices, {mode}: {results[(n, mode)]["compile_seconds"]:.0f} s',
            flush=True)
  print_tables(results, counts, _MODES.value)
  print(f'\n# done in {time.perf_counter() - began:.0f} s, load average '
        f'{os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  app.run(main)

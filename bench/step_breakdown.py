r"""Where the BINGO step's time goes: its four parts, each jitted and timed alone.

  python -m bench.step_breakdown --dtype bfloat16 --per_device_batch 128
  python -m bench.step_breakdown --step_json STEP.json   # the fastest row of bench/accelerator.py
  python -m bench.step_breakdown --smoke                 # tiny networks on the CPU

The step is bench/accelerator.py's (R-18 <- R-50x2, views drawn on the devices from 512 px
canvases). Its parts, run in the step's order from the same state and batch, each its own
``jax.jit`` over the same mesh and built from the step's own functions
(bingo_jax/method/train_step.py):

1. the device augmentation: the four views from the canvases, and the CutMix of query and
   pos_q (``device_data.views_from_canvases``, ``train_step._student_images``);
2. the teacher's forward passes on key and pos_k, shuffled BatchNorm
   (``teacher_keys.keys_by_view``);
3. the student's forward and backward passes on query, pos_q and mix_q
   (``train_step._student_passes`` under ``jax.vjp``: timed with unit cotangents, checked
   with the loss's gradient);
4. the loss and its gradient with respect to the embeddings, the accuracy, the SGD update and
   the queue write.

Each row gives milliseconds (median of ``--steps`` runs after one warm-up) and the share of
the whole step. The parts sum to more than the step when XLA overlaps or fuses across their
borders inside the one jit, and to less when the step pays for something the parts leave out
(the RNG splits, copies of the donated state). ``--check`` (the default with ``--smoke``)
also runs the parts one after another and compares what they compute with one whole step
(on the CPU, in float32, they agree exactly), so the parts time the step's own work.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from bench import accelerator
from bingo_jax.data import images as images_lib
from bingo_jax.data import parallel
from bingo_jax.data import views as views_lib
from bingo_jax.method import distill_step
from bingo_jax.method import losses
from bingo_jax.method import objectives
from bingo_jax.method import optimization
from bingo_jax.method import teacher_keys
from bingo_jax.method import train_step as train_step_lib
from bingo_jax.run import device_data

PART_NAMES = (
    'device augmentation: 4 views from the canvases, CutMix',
    'teacher forwards: key, pos_k (shuffled BatchNorm)',
    'student forward + backward: query, pos_q, mix_q',
    'loss + its gradient, accuracy, SGD update, queue write',
)


class Parts(NamedTuple):
  """The step's parts as jitted functions (``make_parts``)."""
  # (canvas batch, rngs) -> (student images by view, lam, teacher images by view)
  views: Callable
  # (teacher variables, teacher images, rngs) -> L2-normalised keys by view
  teachers: Callable
  # (params, batch_stats, student images, cotangents) -> (embeddings, batch_stats, grads)
  student: Callable
  # (state, embeddings, keys, grads, lam) -> (params, opt_state, queue, pointer,
  #  (loss, top1, top5), d loss / d embeddings)
  update: Callable


def make_parts(bench: accelerator.StepBench, mesh: jax.sharding.Mesh,
               steps_per_epoch: int = 5000) -> Parts:
  """The four parts of ``bench``'s step (module docstring), each one ``jax.jit``."""
  config, student_model, teacher_model = bench.config, bench.student, bench.teacher
  objective = objectives.make_objective(config.train)
  compute_dtype = jnp.dtype(config.train.compute_dtype)
  image_size = int(config.data.image_size)
  optimizer = optimization.make_optimizer(config.train, steps_per_epoch)
  temperature = config.train.temperature
  sharding = parallel.data_sharding(mesh)

  def normalize(images):
    return images_lib.normalize(images, compute_dtype)

  def make_views(batch, rngs):
    drawn = device_data.views_from_canvases(batch, accelerator.VIEWS, image_size)
    drawn = jax.lax.with_sharding_constraint(drawn, sharding)
    batch_size = drawn[views_lib.QUERY].shape[0]
    student_images, lam = train_step_lib._student_images(  # pylint: disable=protected-access
        config, objective, drawn, batch_size, rngs)
    teacher_images = {view: drawn[objectives.source_view(view)]
                      for view in objective.teacher_views}
    return ({view: student_images[view] for view in objective.student_views}, lam,
            teacher_images)

  def teachers(teacher_variables, teacher_images, rngs):
    return teacher_keys.keys_by_view(
        teacher_model, teacher_variables,
        {view: normalize(images) for view, images in teacher_images.items()},
        config.teacher.bn_mode, rngs, sharding)

  def student(params, batch_stats, student_images, cotangents):
    normalized = {view: normalize(student_images[view]) for view in objective.student_views}
    embeddings, pullback, new_batch_stats = jax.vjp(
        lambda p: train_step_lib._student_passes(  # pylint: disable=protected-access
            student_model, p, batch_stats, normalized), params, has_aux=True)
    return embeddings, new_batch_stats, pullback(cotangents)[0]

  def update(state, embeddings, keys, grads, lam):
    epoch = state.step // steps_per_epoch
    inputs = objectives.LossInputs(state.negative_queue, temperature, epoch, lam)
    (loss, _), embedding_grads = jax.value_and_grad(
        lambda e: objective.loss({**e, **keys}, inputs), has_aux=True)(embeddings)
    top1, top5 = losses.contrastive_accuracy(embeddings[views_lib.QUERY], keys[views_lib.KEY],
                                             state.negative_queue, temperature, (1, 5))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    queue, pointer = train_step_lib.enqueue(state.negative_queue, state.queue_pointer,
                                            keys[views_lib.KEY])
    return params, opt_state, queue, pointer, (loss, top1, top5), embedding_grads

  return Parts(jax.jit(make_views), jax.jit(teachers), jax.jit(student), jax.jit(update))


def step_rngs(state: train_step_lib.TrainState, config) -> dict[str, jax.Array]:
  """The step's PRNG streams, split from ``state.rng`` as ``build_train_step`` splits them."""
  names = distill_step.rng_streams(objectives.make_objective(config.train))
  _, *streams = jax.random.split(jax.random.wrap_key_data(state.rng), 1 + len(names))
  return dict(zip(names, streams))


def time_jitted(function: Callable, args: tuple, steps: int
                ) -> tuple[float, float, Any, Callable]:
  """``(median seconds, compile seconds, outputs, compiled)`` of ``function(*args)``, timed
  after a warm-up run."""
  began = time.perf_counter()
  compiled = function.lower(*args).compile()
  compile_seconds = time.perf_counter() - began
  outputs = jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(steps):
    began = time.perf_counter()
    outputs = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - began)
  return float(np.median(times)), compile_seconds, outputs, compiled


def time_parts(bench: accelerator.StepBench, mesh: jax.sharding.Mesh, steps: int
               ) -> tuple[list[tuple[str, float, float]], Parts]:
  """Each part's ``(name, median seconds, compile seconds)`` in ``PART_NAMES`` order, and the
  compiled parts."""
  parts = make_parts(bench, mesh)
  state = bench.state
  rngs = step_rngs(state, bench.config)
  rows, compiled = [], []

  def timed(index, function, args):
    seconds, compile_seconds, outputs, executable = time_jitted(function, args, steps)
    rows.append((PART_NAMES[index], seconds, compile_seconds))
    compiled.append(executable)
    return outputs

  student_images, lam, teacher_images = timed(0, parts.views, (bench.batch, rngs))
  keys = timed(1, parts.teachers, (bench.teacher_variables, teacher_images, rngs))
  # The student's cotangents: unit vectors shaped like its embeddings, sharded on the batch
  # as the loss's gradient is (the backward pass costs the same for any values).
  cotangents = jax.device_put(
      {view: losses.l2_normalize(jnp.ones_like(keys[views_lib.KEY])) for view in student_images},
      parallel.data_sharding(mesh))
  embeddings, _, grads = timed(
      2, parts.student, (state.params, state.batch_stats, student_images, cotangents))
  timed(3, parts.update, (state, embeddings, keys, grads, lam))
  return rows, Parts(*compiled)


def composition_error(bench: accelerator.StepBench, parts: Parts,
                      mesh: jax.sharding.Mesh) -> dict:
  """How far ``parts`` (``time_parts``'), run one after another, land from one whole step
  (which donates ``bench.state``: the last use of it).

  The student's part runs twice: first for the embeddings (zero cotangents), then pulled
  back from the loss's gradient that the update part returns for them.

  Returns:
    The largest absolute difference in ``params``, ``batch_stats``, ``negative_queue`` and
    the ``loss``.
  """
  state = bench.state
  rngs = step_rngs(state, bench.config)
  student_images, lam, teacher_images = parts.views(bench.batch, rngs)
  keys = parts.teachers(bench.teacher_variables, teacher_images, rngs)
  sharding = parallel.data_sharding(mesh)
  zeros = jax.device_put({view: jnp.zeros_like(keys[views_lib.KEY]) for view in student_images},
                         sharding)
  embeddings, _, no_grads = parts.student(state.params, state.batch_stats, student_images, zeros)
  *_, embedding_grads = parts.update(state, embeddings, keys, no_grads, lam)
  embeddings, batch_stats, grads = parts.student(state.params, state.batch_stats,
                                                 student_images,
                                                 jax.device_put(embedding_grads, sharding))
  params, _, queue, _, (loss, _, _), _ = parts.update(state, embeddings, keys, grads, lam)
  composed = jax.device_get({'params': params, 'batch_stats': batch_stats,
                             'negative_queue': queue, 'loss': loss})
  new_state, metrics = bench.step(state, bench.teacher_variables, bench.batch)
  whole = jax.device_get({'params': new_state.params, 'batch_stats': new_state.batch_stats,
                          'negative_queue': new_state.negative_queue, 'loss': metrics['loss']})
  return {name: max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                    for a, b in zip(jax.tree.leaves(composed[name]), jax.tree.leaves(whole[name])))
          for name in composed}


def fastest_row(path: str, dtype: str) -> dict | None:
  """The fastest ``dtype`` row of bench/accelerator.py's ``--json_out`` file, or None."""
  try:
    with open(path) as f:
      rows = [row for row in json.load(f) if row['dtype'] == dtype]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return max(rows, key=lambda row: row['anchors_per_s']) if rows else None


_SMOKE = accelerator.SMOKE  # shared flags: shown by --help as key flags below
_STEPS = accelerator.STEPS
flags.declare_key_flag(_SMOKE)
flags.declare_key_flag(_STEPS)
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Compute dtype.')
_PER_DEVICE_BATCH = flags.DEFINE_integer(
    'per_device_batch', None, "Batch per device (default: --step_json's fastest row, else 64; "
    'smoke: 2).', lower_bound=1)
_STEP_JSON = flags.DEFINE_string(
    'step_json', None, "bench/accelerator.py's --json_out file: the batch and the whole step's "
    'time from its fastest --dtype row, instead of timing the step here.')
_CHECK = flags.DEFINE_bool(
    'check', None, 'Also run the parts one after another and compare with one whole step '
    '(default: with --smoke only; it compiles the whole step).')


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  smoke, dtype, step_json = _SMOKE.value, _DTYPE.value, _STEP_JSON.value
  steps = _STEPS.value or (1 if smoke else 5)
  canvas_size, image_size = accelerator.sizes(smoke)
  measured = fastest_row(step_json, dtype) if step_json else None
  if step_json and measured is None:
    print(f'# {step_json}: no {dtype} row; the whole step is timed here.')
  per_device = _PER_DEVICE_BATCH.value or (
      measured['per_device_batch'] if measured else (2 if smoke else 64))
  if measured and measured['per_device_batch'] != per_device:
    measured = None
  mesh = parallel.make_mesh()
  devices = mesh.devices.size
  global_batch = per_device * devices
  print(f'# Where the time goes: {dtype}, batch {per_device} per device x {devices} '
        f'{jax.devices()[0].device_kind}, {image_size} px'
        f'{" (smoke: tiny networks)" if smoke else ""}; each part jitted alone')
  began = time.perf_counter()
  if measured:
    step_seconds, step_source = measured['seconds'], 'bench/accelerator.py, same machine'
  else:
    row = accelerator.bench_row(smoke, dtype, per_device, mesh, canvas_size, image_size, steps)
    step_seconds, step_source = row['seconds'], 'timed here'
  bench = accelerator.build(smoke, dtype, global_batch, mesh, canvas_size, image_size)
  rows, parts = time_parts(bench, mesh, steps)
  total = sum(seconds for _, seconds, _ in rows)
  print('| part | ms | share of the step | compile (s) |')
  print('|---|---|---|---|')
  for name, seconds, compile_seconds in rows:
    print(f'| {name} | {1e3 * seconds:.1f} | {100 * seconds / step_seconds:.0f}% | '
          f'{compile_seconds:.0f} |')
  print(f'| sum of the parts | {1e3 * total:.1f} | {100 * total / step_seconds:.0f}% | |')
  print(f'| whole step, one jit ({step_source}) | {1e3 * step_seconds:.1f} | 100% | |')
  if _CHECK.value if _CHECK.value is not None else smoke:
    errors = composition_error(bench, parts, mesh)
    print('# the parts run one after another vs one whole step, largest |difference|: '
          + ', '.join(f'{name} {error:.3g}' for name, error in errors.items()))
  print(f'# {global_batch / step_seconds:,.0f} anchors/s; done in '
        f'{time.perf_counter() - began:.0f} s, load average {os.getloadavg()[0]:.2f}',
        flush=True)
  return 0


if __name__ == '__main__':
  app.run(main)

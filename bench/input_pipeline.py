r"""Host CPU cost of the BINGO input pipeline per anchor, host vs device augmentation.

  python -m bench.input_pipeline            # about 2-3 minutes on 2 cores

Self-contained: it writes a folder of JPEGs of ImageNet-like sizes (a spread around 500 x 375,
some larger, ~100 KB each) into a temporary directory, then for both
``config.data.augment_on`` modes:

* the host CPU-ms per anchor by stage, one thread, process CPU time (all threads counted):
  ``read`` (file bytes), ``decode`` (host: four fused decode-and-crops; device: two decodes,
  DCT-scaled when large), ``canvas`` (device: placing the image in its canvas) or ``augment``
  (host: resize, jitter, grey, blur, flip of four views), ``transfer`` (``jax.device_put`` of
  what the step receives);
* the whole tf.data pipeline (``input_pipeline.create_train_iterator``) plus the transfer, as
  process CPU-ms per anchor, and the anchors/s this projects for 16- and 112-core hosts (CPU
  time scales over cores; the accelerator is not the limit in this projection);
* the device-side augmentation of device mode: XLA's FLOP count (cost analysis) per anchor
  against that of the 224 px R-18 <- R-50x2 BINGO step, and its time per anchor on this
  backend (``--time_step`` also times the step, slow on a CPU);
* what the canvas loses: for the images that do not fit the canvas (held DCT-scaled), the
  mean absolute difference between views drawn from the canvas and from the full-resolution
  image with the same keys;
* the decode floor: one thread's CPU-ms per image for libjpeg-turbo (through TF) decoding to
  RGB with the accurate and the fast IDCT, and to grey only (the chroma is still entropy
  decoded, but not transformed, upsampled or converted: below what any RGB decode of the same
  bytes costs), on the generated set and on two photographs shipped with scikit-learn
  (``china.jpg``, ``flower.jpg``) re-encoded at 500 x 375, quality 90. Two decodes per anchor
  at that floor bound what any host pipeline that reads these JPEGs can reach.

CPU time is ``time.process_time()`` (all threads of the process), so other jobs on a shared
machine inflate it less than wall time; the load average is printed with the table.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

import numpy as np
from absl import app, flags


def make_images(directory: str, count: int, seed: int = 0) -> list[tuple[int, int]]:
  """JPEGs with a spread of ImageNet-like sizes and smooth-plus-texture content."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  sides = [500] * 10 + [375, 400, 333, 450, 640, 800, 1024]
  aspects = [4 / 3, 4 / 3, 4 / 3, 3 / 2, 3 / 2, 1.0, 3 / 4, 2 / 3]
  sizes = []
  lines = []
  for i in range(count):
    long_side = int(rng.choice(sides))
    aspect = float(rng.choice(aspects))
    width, height = ((long_side, int(round(long_side / aspect))) if aspect >= 1
                     else (int(round(long_side * aspect)), long_side))
    # A few random low-frequency waves per channel, plus fine texture: natural-image-like
    # JPEG sizes (~100 KB at 500 x 375, quality 90).
    rows = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    cols = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    image = np.zeros((height, width, 3), np.float32)
    for channel in range(3):
      for _ in range(4):
        fr, fc, phase = rng.uniform(0.5, 6), rng.uniform(0.5, 6), rng.uniform(0, 6.3)
        image[..., channel] += np.sin(2 * np.pi * (fr * rows + fc * cols) + phase)
    image = 128 + 28 * image + rng.normal(0, 9, image.shape)
    name = f'{i:04d}.jpg'
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
        os.path.join(directory, name), quality=90)
    sizes.append((height, width))
    lines.append(name)
  with open(os.path.join(directory, 'list.txt'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return sizes


def cpu_ms_per_call(fn, items, repeats: int = 1) -> float:
  """Process CPU milliseconds per call of ``fn(item)`` over ``items`` (after one warm-up)."""
  fn(items[0])
  began = time.process_time()
  for _ in range(repeats):
    for item in items:
      fn(item)
  return 1e3 * (time.process_time() - began) / (repeats * len(items))


def stage_costs(directory: str, names: list[str], canvas_size: int, image_size: int) -> dict:
  """Single-thread CPU-ms per anchor of each stage, both modes."""
  import jax
  import tensorflow as tf
  from bingo_jax.data import augment, canvases

  paths = [os.path.join(directory, name) for name in names]

  def read(path):
    with open(path, 'rb') as f:
      return f.read()
  encoded = [read(path) for path in paths]
  tensors = [tf.constant(e) for e in encoded]
  seed = tf.constant([1, 2], tf.int64)

  to_canvas = tf.function(lambda e: canvases.decode_to_canvas(e, canvas_size),
                          autograph=False)
  host_crop = tf.function(lambda e: augment.decode_and_random_crop(e, seed), autograph=False)
  host_view = tf.function(lambda e: augment.moco_v2_view(e, seed, image_size, encoded=True),
                          autograph=False)
  decode_only = tf.function(lambda e: _decode_only(e, canvas_size), autograph=False)
  read_ms = cpu_ms_per_call(read, paths)
  device_decode = cpu_ms_per_call(decode_only, tensors)
  device_canvas = cpu_ms_per_call(to_canvas, tensors) - device_decode
  host_decode = cpu_ms_per_call(host_crop, tensors)
  host_augment = cpu_ms_per_call(host_view, tensors) - host_decode

  batch = 32
  device_payload = {'anchor_canvas': np.zeros((batch, canvas_size, canvas_size, 3), np.uint8),
                    'positive_canvas': np.zeros((batch, canvas_size, canvas_size, 3), np.uint8),
                    'anchor_size': np.zeros((batch, 4), np.int32),
                    'positive_size': np.zeros((batch, 4), np.int32),
                    'view_keys': np.zeros((batch, 4, 2), np.uint32)}
  host_payload = {view: np.zeros((batch, image_size, image_size, 3), np.uint8)
                  for view in ('query', 'key', 'pos_q', 'pos_k')}
  transfer = lambda payload: jax.block_until_ready(jax.device_put(payload))  # noqa: E731
  device_transfer = cpu_ms_per_call(transfer, [device_payload] * 5) / batch
  host_transfer = cpu_ms_per_call(transfer, [host_payload] * 5) / batch
  # Per anchor: two images (anchor, positive) read and decoded in device mode; in host mode
  # two reads and four views.
  return {
      'device': {'read': 2 * read_ms, 'decode': 2 * device_decode,
                 'canvas': 2 * max(device_canvas, 0.0), 'transfer': device_transfer},
      'host': {'read': 2 * read_ms, 'decode': 4 * host_decode,
               'augment': 4 * max(host_augment, 0.0), 'transfer': host_transfer}}


def _decode_only(encoded, canvas_size: int):
  """The decode of ``decode_to_canvas`` alone (DCT-scaled JPEG decode, no canvas)."""
  import tensorflow as tf
  from bingo_jax.data import canvases
  shape = tf.image.extract_jpeg_shape(encoded)
  fits = tf.stack([((shape[0] + r - 1) // r <= canvas_size) & ((shape[1] + r - 1) // r <= canvas_size)
                   for r in canvases.DCT_RATIOS])
  index = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  branches = [lambda r=r: tf.io.decode_jpeg(encoded, channels=3, ratio=r,
                                            dct_method='INTEGER_ACCURATE')
              for r in canvases.DCT_RATIOS]
  return tf.switch_case(index, branches)


def pipeline_cost(directory: str, mode: str, canvas_size: int, image_size: int, batch: int,
                  batches: int) -> tuple[float, float]:
  """(process CPU-ms per anchor, wall anchors/s) of the tf.data pipeline + device_put."""
  import jax
  from bingo_jax import input_pipeline
  from bingo_jax.bags import bag_file
  from bingo_jax.configs import common
  from bingo_jax.data import sources as data_sources
  config = common.base_config()
  config.data.source = 'filelist'
  config.data.path = os.path.join(directory, 'list.txt')
  config.data.image_size = image_size
  config.data.canvas_size = canvas_size
  source = data_sources.make_source(config.data, 'train')
  rng = np.random.default_rng(0)
  count = len(source)
  neighbours = np.stack([rng.choice(np.delete(np.arange(count), i), 5, replace=False)
                         for i in range(count)])
  bags = bag_file.Bags.from_neighbors(neighbours, method='knn', fingerprint=source.fingerprint)
  iterator = input_pipeline.create_train_iterator(
      config, source, bags, start_step=0, local_batch_size=batch, process_index=0,
      process_count=1, output='canvases' if mode == 'device' else 'views')
  jax.block_until_ready(jax.device_put(next(iterator)))  # warm-up: tracing, autotuning
  began_cpu, began_wall = time.process_time(), time.perf_counter()
  for _ in range(batches):
    jax.block_until_ready(jax.device_put(next(iterator)))
  cpu = time.process_time() - began_cpu
  wall = time.perf_counter() - began_wall
  return 1e3 * cpu / (batches * batch), batches * batch / wall


def device_costs(canvas_size: int, image_size: int, batch: int, time_step: bool) -> dict:
  """FLOPs (XLA cost analysis) and time per anchor of the device augmentation; the step's."""
  import jax
  import jax.numpy as jnp
  from bingo_jax.configs import r18_r50w2
  from bingo_jax.data import parallel
  from bingo_jax.method import steps
  from bingo_jax.method import train_step as train_step_lib
  from bingo_jax.models import create_model, init_variables
  from bingo_jax.run import device_data

  views = ('query', 'key', 'pos_q', 'pos_k')
  rng = np.random.default_rng(0)
  canvases = {
      'anchor_canvas': rng.integers(0, 256, (batch, canvas_size, canvas_size, 3), np.uint8),
      'positive_canvas': rng.integers(0, 256, (batch, canvas_size, canvas_size, 3), np.uint8),
      'anchor_size': np.tile([375, 500, 375, 500], (batch, 1)).astype(np.int32),
      'positive_size': np.tile([333, 500, 333, 500], (batch, 1)).astype(np.int32),
      'view_keys': rng.integers(0, 2**32, (batch, 4, 2), dtype=np.uint64).astype(np.uint32)}
  augment = jax.jit(lambda b: device_data.views_from_canvases(b, views, image_size))
  lowered = augment.lower(canvases)
  aug_flops = float(_flops(lowered.compile().cost_analysis())) / batch
  compiled = lowered.compile()
  jax.block_until_ready(compiled(canvases))
  times = []
  for _ in range(3):
    began = time.perf_counter()
    jax.block_until_ready(compiled(canvases))
    times.append(time.perf_counter() - began)
  aug_seconds = float(np.median(times)) / batch

  # The BINGO step, R-18 <- R-50x2 at 224 px (random teacher), batch 4 on one device.
  config = r18_r50w2.get_config()
  step_batch = 4
  config.train.batch_size = step_batch
  config.train.queue_size = 4096
  config.student.bn_group_size = 2
  config.teacher.bn_group_size = 2
  config.data.image_size = image_size
  config.train.compute_dtype = 'float32'
  mesh = parallel.make_mesh(jax.devices()[:1])
  student = create_model('resnet18', 'moco', head_hidden_dim=2048, head_output_dim=128,
                         bn_group_size=2)
  teacher = create_model('resnet50w2', 'moco', head_output_dim=128, bn_group_size=2)
  teacher_variables = parallel.replicate(init_variables(teacher, jax.random.key(1)), mesh)
  state = train_step_lib.create_train_state(config, student, jax.random.key(0), mesh, 1000)
  step = steps.make_train_step(config, student, teacher, mesh, 1000)
  batch_views = parallel.global_batch(
      {view: np.zeros((step_batch, image_size, image_size, 3), np.uint8) for view in views}, mesh)
  step_lowered = step.lower(state, teacher_variables, batch_views)
  step_flops = float(_flops(step_lowered.cost_analysis())) / step_batch
  result = {'aug_flops': aug_flops, 'aug_seconds': aug_seconds, 'step_flops': step_flops,
            'step_seconds': None, 'backend': jax.default_backend(),
            'device': jax.devices()[0].device_kind}
  if time_step:
    compiled_step = step_lowered.compile()
    state, metrics = compiled_step(state, teacher_variables, batch_views)
    jax.block_until_ready(metrics)
    began = time.perf_counter()
    state, metrics = compiled_step(state, teacher_variables, batch_views)
    jax.block_until_ready(metrics)
    result['step_seconds'] = (time.perf_counter() - began) / step_batch
  del jnp
  return result


def _flops(cost) -> float:
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def canvas_loss(directory: str, names: list[str], sizes: list[tuple[int, int]],
                canvas_size: int, image_size: int, views_per_image: int = 2,
                max_images: int = 8) -> dict:
  """Views from the default canvas vs from the full-resolution image, the same keys."""
  import jax
  import tensorflow as tf
  from bingo_jax.data import canvases, device_augment
  large = [i for i, (h, w) in enumerate(sizes) if max(h, w) > canvas_size]
  result = {'fraction_resized': len(large) / len(sizes), 'mean_abs_diff_resized': None,
            'p99_abs_diff_resized': None}
  if not large:
    return result
  measured = large[:max_images]
  full_side = max(max(sizes[i]) for i in measured)
  diffs = []
  augment = jax.jit(device_augment.augment_views, static_argnums=3)
  for i in measured:
    with open(os.path.join(directory, names[i]), 'rb') as f:
      encoded = tf.constant(f.read())
    small, small_sizes = canvases.decode_to_canvas(encoded, canvas_size)
    full, full_sizes = canvases.decode_to_canvas(encoded, full_side)
    keys = jax.random.key_data(jax.random.split(jax.random.key(i), views_per_image))[None]
    a = augment(small.numpy()[None], small_sizes.numpy()[None], keys, image_size)
    b = augment(full.numpy()[None], full_sizes.numpy()[None], keys, image_size)
    diffs.append(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).ravel())
  diffs = np.concatenate(diffs)
  result['mean_abs_diff_resized'] = float(diffs.mean())
  result['p99_abs_diff_resized'] = float(np.percentile(diffs, 99))
  return result


_NUM_IMAGES = flags.DEFINE_integer('num_images', 48, 'JPEGs to write and read.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Anchors per pipeline batch.')
_BATCHES = flags.DEFINE_integer('batches', 12, 'Timed pipeline batches per mode.')
_CANVAS_SIZE = flags.DEFINE_integer('canvas_size', 512, 'Canvas side (px).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'View side (px).')
_TIME_STEP = flags.DEFINE_bool('time_step', False,
                               'Also time the R-18 <- R-50x2 step (minutes on a CPU).')
_DIR = flags.DEFINE_string('dir', None, 'Reuse/keep the JPEG folder here.')


def _photographs() -> list[bytes]:
  """scikit-learn's two sample photographs at 500 x 375, JPEG quality 90 (none if absent)."""
  import io
  try:
    import sklearn.datasets
  except ImportError:
    return []
  from PIL import Image
  folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), 'images')
  encoded = []
  for name in ('china.jpg', 'flower.jpg'):
    path = os.path.join(folder, name)
    if os.path.exists(path):
      buffer = io.BytesIO()
      Image.open(path).convert('RGB').resize((500, 375), Image.BICUBIC).save(
          buffer, format='JPEG', quality=90)
      encoded.append(buffer.getvalue())
  return encoded


def decode_floor(directory: str, names: list[str]) -> list[tuple[str, int, float, dict]]:
  """One thread's CPU-ms per image for three libjpeg-turbo decodes (RGB accurate / fast IDCT,
  grey only), per image set: ``[(set, count, mean KB, {decode: ms})]``."""
  import tensorflow as tf
  sets = []
  generated = []
  for name in names:
    with open(os.path.join(directory, name), 'rb') as f:
      generated.append(f.read())
  sets.append(('generated set (full size)', generated))
  photographs = _photographs()
  if photographs:
    sets.append(('photographs, 500 x 375 q90', photographs))
  decodes = {
      'RGB, accurate IDCT': lambda e: tf.io.decode_jpeg(e, channels=3,
                                                       dct_method='INTEGER_ACCURATE'),
      'RGB, fast IDCT': lambda e: tf.io.decode_jpeg(e, channels=3, dct_method='INTEGER_FAST',
                                                   fancy_upscaling=False),
      'grey only': lambda e: tf.io.decode_jpeg(e, channels=1),
  }
  rows = []
  for label, encoded in sets:
    tensors = [tf.constant(e) for e in encoded]
    repeats = max(1, 48 // len(tensors))
    costs = {what: cpu_ms_per_call(tf.function(fn, autograph=False), tensors, repeats)
             for what, fn in decodes.items()}
    rows.append((label, len(encoded), np.mean([len(e) for e in encoded]) / 1024, costs))
  return rows


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import jax
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)

  began = time.perf_counter()
  directory = _DIR.value or tempfile.mkdtemp(prefix='bench_jpegs_')
  os.makedirs(directory, exist_ok=True)
  sizes = make_images(directory, _NUM_IMAGES.value)
  names = [f'{i:04d}.jpg' for i in range(_NUM_IMAGES.value)]
  kilobytes = np.mean([os.path.getsize(os.path.join(directory, n)) for n in names]) / 1024
  print(f'# {_NUM_IMAGES.value} JPEGs in {directory}: '
        f'mean {np.mean([s[1] for s in sizes]):.0f} x '
        f'{np.mean([s[0] for s in sizes]):.0f} px, {kilobytes:.0f} KB; canvas '
        f'{_CANVAS_SIZE.value}, views {_IMAGE_SIZE.value} px')
  print(f'# machine: {platform.machine()}, {os.cpu_count()} CPUs, JAX {jax.__version__} on '
        f'{jax.default_backend()}, TF {tf.__version__}; load average at start '
        f'{os.getloadavg()[0]:.2f}')

  stages = stage_costs(directory, names[:16], _CANVAS_SIZE.value, _IMAGE_SIZE.value)
  pipelines = {mode: pipeline_cost(directory, mode, _CANVAS_SIZE.value, _IMAGE_SIZE.value,
                                   _BATCH.value, _BATCHES.value) for mode in ('host', 'device')}
  # The augmentation's FLOPs are per anchor whatever the batch; 2 anchors keep a CPU quick.
  device = device_costs(_CANVAS_SIZE.value, _IMAGE_SIZE.value, 2, _TIME_STEP.value)
  loss = canvas_loss(directory, names, sizes, _CANVAS_SIZE.value, _IMAGE_SIZE.value)

  print('\n## Host CPU-ms per anchor (stages: one thread; pipeline: tf.data + device_put)')
  print('| mode | read | decode | canvas / augment | transfer | stages sum | whole pipeline | '
        'anchors/s, 16 cores | anchors/s, 112 cores |')
  print('|---|---|---|---|---|---|---|---|---|')
  for mode in ('host', 'device'):
    row = stages[mode]
    middle = row.get('canvas', row.get('augment'))
    total = sum(row.values())
    pipeline_ms = pipelines[mode][0]
    print(f'| {mode} | {row["read"]:.2f} | {row["decode"]:.2f} | {middle:.2f} | '
          f'{row["transfer"]:.2f} | {total:.2f} | **{pipeline_ms:.2f}** | '
          f'{16e3 / pipeline_ms:,.0f} | {112e3 / pipeline_ms:,.0f} |')
  ratio = pipelines['host'][0] / pipelines['device'][0]
  print(f'\nDevice mode: {ratio:.1f}x less host CPU per anchor. Wall rate on this machine: '
        f'host {pipelines["host"][1]:.0f}, device {pipelines["device"][1]:.0f} anchors/s.')

  print('\n## Device-side augmentation (4 views per anchor, from the canvases)')
  print('| | GFLOP per anchor | fraction of the step | time per anchor (ms) |')
  print('|---|---|---|---|')
  step_ms = 'n/a (--time_step)' if device['step_seconds'] is None else (
      f'{1e3 * device["step_seconds"]:.0f}')
  aug_fraction_time = ('' if device['step_seconds'] is None else
                       f', {100 * device["aug_seconds"] / device["step_seconds"]:.2f}% of its time')
  print(f'| MoCo v2 views (device_augment) | {device["aug_flops"] / 1e9:.3f} | '
        f'{100 * device["aug_flops"] / device["step_flops"]:.2f}% of its FLOPs{aug_fraction_time} | '
        f'{1e3 * device["aug_seconds"]:.1f} |')
  print(f'| BINGO step R-18 <- R-50x2, {_IMAGE_SIZE.value} px (fp32) | '
        f'{device["step_flops"] / 1e9:.1f} | 100% | {step_ms} |')
  print(f'(backend {device["backend"]}, {device["device"]})')

  print('\n## What the canvas loses')
  if loss['mean_abs_diff_resized'] is None:
    print(f'No image exceeds the {_CANVAS_SIZE.value} px canvas: nothing is lost.')
  else:
    print(f'{100 * loss["fraction_resized"]:.0f}% of the images exceed {_CANVAS_SIZE.value} px and '
          f'are held DCT-scaled; their views differ from full-resolution views (same keys) by '
          f'{loss["mean_abs_diff_resized"]:.2f} grey levels on average (99th percentile '
          f'{loss["p99_abs_diff_resized"]:.0f}); the other images lose nothing.')

  print('\n## The decode floor (one thread, CPU-ms per image)')
  floor = decode_floor(directory, names)
  print('| images | count | mean KB | RGB, accurate IDCT | RGB, fast IDCT | grey only | '
        'two grey-only decodes per anchor |')
  print('|---|---|---|---|---|---|---|')
  for label, count, kilobytes_mean, costs in floor:
    print(f'| {label} | {count} | {kilobytes_mean:.0f} | {costs["RGB, accurate IDCT"]:.2f} | '
          f'{costs["RGB, fast IDCT"]:.2f} | {costs["grey only"]:.2f} | '
          f'{2 * costs["grey only"]:.2f} |')
  print(f'\n# load average at end {os.getloadavg()[0]:.2f}; {time.perf_counter() - began:.0f} s')


if __name__ == '__main__':
  app.run(main)

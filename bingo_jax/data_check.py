r"""Pre-flight check of a data set: decode every image once and list the ones that fail.

  python -m bingo_jax.data_check --config NAME [--splits train,validation] \
      [--workers 16] [--output bad_images.json]

Run it before bagging or a long training run: one bad file would otherwise stop the job at
the batch that first reads it (``config.data.on_bad_image='error'``, the default) or be
replaced by another image (``'skip'``). Each image is decoded with the data source's own
decoder (``source.read``: the decode the pipelines use), in ``--workers`` threads. Exit status:
0 when every image decodes, 1 when some do not (they are listed, one line each:
``<source>: image <index> (<file>): <problem>``), and 1 with one line, ``error: ...``, for a
config that names no readable data.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

import ml_collections
from absl import flags, logging

from bingo_jax.console import cli
from bingo_jax.data import bad_images
from bingo_jax.data import sources as data_sources
from bingo_jax.store import fileio


def check_split(config: ml_collections.ConfigDict, split: str, workers: int = 0,
                chunk: int = 4096) -> tuple[int, list[tuple[int, str, str]]]:
  """Decodes every image of one split.

  Args:
    config: the experiment config (its ``data`` section).
    split: e.g. ``config.data.train_split``.
    workers: decode threads (0: one per core, at most 16).
    chunk: images per progress line.
  Returns:
    ``(number of images, [(index, identifier, problem)] of the bad ones)``.
  """
  source = data_sources.make_source(config.data, split)
  bad: list[tuple[int, str, str]] = []
  start = time.time()
  for first in range(0, len(source), chunk):
    last = min(first + chunk, len(source))
    bad += bad_images.find_bad_images(source, range(first, last), workers=workers)
    logging.info('%s: %d/%d images decoded, %d bad, %.0f images/s.', source.description, last,
                 len(source), len(bad), last / max(time.time() - start, 1e-9))
  return len(source), bad


def run(config: ml_collections.ConfigDict, splits: Sequence[str], workers: int = 0,
        output: Optional[str] = None) -> dict:
  """Checks ``splits`` and returns (and optionally writes) ``{split: {images, bad: [...]}}``."""
  report = {}
  for split in splits:
    num_images, bad = check_split(config, split, workers)
    report[split] = {'images': num_images,
                     'bad': [{'index': i, 'file': ident, 'problem': problem}
                             for i, ident, problem in bad]}
    source_name = f'split {split!r} of config.data.source={config.data.source!r}'
    if bad:
      print(f'{source_name}: {len(bad)} of {num_images} images cannot be decoded:')
      for i, ident, problem in bad:
        print(f'  image {i} ({ident}): {problem}')
    else:
      print(f'{source_name}: all {num_images} images decode.')
  if output:
    fileio.write_json_atomically(output, report)
  return report


# ---------------------------------------------------------------------------------------------
# Command line

_CONFIG = cli.shared(cli.CONFIG)
_SPLITS = flags.DEFINE_list('splits', None, 'Splits to check (default: config.data.train_split '
                            'and config.data.eval_split).')
_WORKERS = flags.DEFINE_integer('workers', 0, 'Decode threads (0: one per core, at most 16).')
_OUTPUT = flags.DEFINE_string('output', None, 'Also write the report as JSON here.')


def main(argv: list[str]) -> None:
  cli.no_positional_arguments(argv)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # decoding only: no accelerator memory
  config = _CONFIG.value
  splits = _SPLITS.value or list(dict.fromkeys([config.data.train_split,
                                                config.data.eval_split]))
  report = run(config, splits, _WORKERS.value, _OUTPUT.value)  # a bad config: cli.run's line
  sys.exit(1 if any(entry['bad'] for entry in report.values()) else 0)


def cli_main() -> None:
  """``python -m bingo_jax.data_check``."""
  cli.run(main, ('config',))


if __name__ == '__main__':
  cli_main()

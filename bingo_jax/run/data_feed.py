"""The trainer's data feed: ``run_step(state) -> (state, metrics)`` on the next batch.

Three feeds (docs/data.md): views drawn in the step from images held on the devices
(``config.data.augment_on = 'device'`` and a source that fits), views drawn in the step from
canvases the host decodes (``'device'``), or views augmented on the host (``'host'``).

Bags that change during the run (student relation, ``config.bags.source = 'student'``,
docs/method.md §1) are swapped in at the steps where a ``BagSource`` says so: the on-device
feed replaces its bag tables (same shapes, so the compiled step is reused); the host feeds
restart their iterator at that step with the new bags (the batches of a step are a function
of the seed, the step and the bags, so an iterator started at any step is exact).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import jax
import ml_collections
from absl import logging

from bingo_jax import input_pipeline
from bingo_jax.bags import bag_file
from bingo_jax.data import parallel
from bingo_jax.run import device_data

RunStep = Callable[[Any], tuple[Any, dict]]


class BagSource(Protocol):
  """Bags that change during the run (``student_bags.StudentBags``)."""

  def bags_at(self, step: int, state: Any) -> bag_file.Bags:
    """The bags of the batches from ``step`` on (``state``: the state before that step)."""

  def refreshes_at(self, step: int) -> bool:
    """Whether new bags start at ``step``."""


def make_data_feed(config: ml_collections.ConfigDict, train_step: Callable,
                   teacher_variables: Any, source: Any, bags: Optional[bag_file.Bags],
                   mesh: jax.sharding.Mesh, batch_views: tuple[str, ...], *, start_step: int,
                   local_batch_size: int, steps_per_epoch: int,
                   bag_source: Optional[BagSource] = None) -> RunStep:
  """``run_step(state) -> (state, metrics)``: one step on the next batch.

  Args:
    config: the experiment config (``data.augment_on``, ``train.seed``, ...).
    train_step: the jitted step ``(state, teacher_variables, batch)``.
    teacher_variables: its second argument (replicated).
    source: the training images.
    bags: their bags (None without bag positives, or when ``bag_source`` gives them).
    mesh: the device mesh.
    batch_views: the views the step reads.
    start_step: the global step of the first call.
    local_batch_size: examples per process.
    steps_per_epoch: optimizer steps per epoch.
    bag_source: bags that change during the run; asked at the first call and wherever
      ``refreshes_at`` the step.
  Returns:
    ``run_step``; call it once per step, in order.
  """
  if device_data.augment_on(config) == 'device' and device_data.use_on_device_source(config,
                                                                                   source):
    logging.info('Training images held on the devices; views drawn in the step.')
    data = device_data.place_on_devices(source, None, mesh)  # the bag tables: feed()
    device_step = device_data.on_device_step(train_step, config, mesh, batch_views,
                                             steps_per_epoch)

    def feed(new_bags: Optional[bag_file.Bags], step: int) -> RunStep:
      del step  # the batch of a step is drawn from state.step inside the jit
      tables = data if new_bags is None else dict(data, **device_data.bag_tables(new_bags, mesh))
      return lambda state: device_step(state, teacher_variables, tables)
  else:
    host_views = device_data.augment_on(config) == 'host'
    # The pipeline's anchor_index / positive_index stay on the host: the step reads views,
    # or the canvases, sizes and view keys it draws them from.
    keys = batch_views if host_views else device_data.canvas_keys(batch_views)
    if not host_views:
      train_step = device_data.canvas_step(train_step, config, mesh, batch_views)

    def feed(new_bags: Optional[bag_file.Bags], step: int) -> RunStep:
      batches = input_pipeline.create_train_iterator(
          config, source, new_bags, start_step=step, local_batch_size=local_batch_size,
          process_index=jax.process_index(), process_count=jax.process_count(),
          views=batch_views, output='views' if host_views else 'canvases')

      def run(state):
        local_batch = next(batches)
        batch = parallel.global_batch({key: local_batch[key] for key in keys}, mesh)
        return train_step(state, teacher_variables, batch)
      return run

  if bag_source is None:
    return feed(bags, start_step)
  current = {'step': start_step, 'run': None}

  def run_step(state):
    step = current['step']
    if current['run'] is None or bag_source.refreshes_at(step):
      current['run'] = feed(bag_source.bags_at(step, state), step)
    current['step'] = step + 1
    return current['run'](state)
  return run_step

"""Elapsed time and core-hours accumulate over resumes (progress.Chronometer.record)."""

import json

import pytest

from bingo_jax.run import progress


class FakeClock:
  def __init__(self):
    self.now = 50.0

  def __call__(self):
    return self.now


def test_elapsed_time_and_core_hours_carry_across_resumes():
  clock = FakeClock()
  first = progress.Chronometer(0, 100, 32, num_devices=4, clock=clock)
  clock.now += 20.0
  first.tick(1)
  with first.paused():  # a checkpoint write: not training, but devices are held
    clock.now += 5.0
  stored = json.loads(json.dumps(first.record()))  # as the checkpoint's JSON keeps it
  assert stored == pytest.approx({'elapsed_seconds': 25.0, 'training_seconds': 20.0,
                                  'core_hours': 25.0 * 4 / 3600})

  # The resumed run has another device count: each run's share is its own devices x time.
  clock.now += 1000.0  # time between the runs (the job was queued) is not counted
  second = progress.Chronometer(1, 100, 32, num_devices=2, clock=clock, previous=stored)
  clock.now += 10.0
  second.tick(2)
  assert second.wall_seconds == pytest.approx(10.0)
  assert second.elapsed_seconds == pytest.approx(35.0)
  assert second.core_hours_this_run() == pytest.approx(10.0 * 2 / 3600)
  assert second.core_hours() == pytest.approx((25.0 * 4 + 10.0 * 2) / 3600)
  assert second.record() == pytest.approx({'elapsed_seconds': 35.0, 'training_seconds': 30.0,
                                           'core_hours': (25.0 * 4 + 10.0 * 2) / 3600})
  measured = second.measurements()
  assert measured['progress/core_hours'] == pytest.approx((25.0 * 4 + 10.0 * 2) / 3600)
  assert measured['progress/elapsed_seconds'] == pytest.approx(35.0)
  assert f'{(25.0 * 4 + 10.0 * 2) / 3600:.2f} core-h' in second.summary_line()


def test_checkpoints_without_the_record_count_from_zero():
  clock = FakeClock()
  chrono = progress.Chronometer(6, 10, 8, num_devices=1, clock=clock,
                                previous={'step': 6, 'global_batch_size': 8})
  clock.now += 36.0
  assert chrono.core_hours() == pytest.approx(0.01)
  assert chrono.elapsed_seconds == pytest.approx(36.0)
